//! SQL for prices, invoices, invoice lines and the usage billing reads,
//! written once for both backends (see `store` for the conventions).
//! Functions take a connection so the service can group them in one
//! transaction. Knows rows and statements, not the rules that pick them.
//!
//! A tenant itself is read through tenancy's repository. The statements
//! here join `tenants` only where a listing needs its slug or its plan in
//! the same statement (invoice headers, stored lines, a plan's latest
//! finalized period): one join rather than a query per row. They read the
//! columns `id`, `slug` and `price_plan`, which tenancy keeps.

use sqlx::{AnyConnection, FromRow};

use super::BillingError;
use super::invoice::{InvoiceLine, InvoiceStatus, LineKind, UsageGroup};
use super::money::Currency;
use super::prices::{self, Price, PriceBook, PricePlan};
use crate::calendar::Month;
use crate::store::Backend;

/// The database's clock in microseconds since the epoch; the same expression
/// the metering insert stamps `recorded_at_us` with.
pub fn now_sql(backend: Backend) -> &'static str {
    match backend {
        Backend::Postgres => "(extract(epoch FROM clock_timestamp()) * 1000000)::bigint",
        Backend::Sqlite => "CAST(unixepoch('subsec') * 1000000 AS INTEGER)",
    }
}

pub async fn db_now_us(conn: &mut AnyConnection, backend: Backend) -> Result<i64, BillingError> {
    let (now,): (i64,) = sqlx::query_as(&format!("SELECT {}", now_sql(backend)))
        .fetch_one(&mut *conn)
        .await?;
    Ok(now)
}

/// Until the transaction ends, usage inserts wait (PostgreSQL; SQLite's one
/// writer is this transaction already).
pub async fn hold_usage_inserts(
    conn: &mut AnyConnection,
    backend: Backend,
) -> Result<(), BillingError> {
    if backend == Backend::Postgres {
        sqlx::query("LOCK TABLE usage_events IN SHARE MODE")
            .execute(&mut *conn)
            .await?;
    }
    Ok(())
}

fn corrupt(what: &str) -> BillingError {
    BillingError::from(sqlx::Error::Decode(
        format!("unexpected value in column {what}").into(),
    ))
}

#[derive(FromRow)]
struct PlanRow {
    name: String,
    currency_code: String,
    description: String,
}

#[derive(FromRow)]
struct PriceRow {
    plan: String,
    model: String,
    device_class: String,
    effective_from_us: i64,
    prompt_per_million_nanos: i64,
    cached_prompt_per_million_nanos: Option<i64>,
    completion_per_million_nanos: i64,
    per_kwh_nanos: Option<i64>,
}

impl From<PriceRow> for Price {
    fn from(r: PriceRow) -> Price {
        Price {
            model: r.model,
            device_class: r.device_class,
            prompt_per_million_nanos: r.prompt_per_million_nanos,
            cached_prompt_per_million_nanos: r.cached_prompt_per_million_nanos,
            completion_per_million_nanos: r.completion_per_million_nanos,
            per_kwh_nanos: r.per_kwh_nanos,
            effective_from_us: r.effective_from_us,
        }
    }
}

const PRICE_COLUMNS: &str = "plan, model, device_class, effective_from_us, \
     prompt_per_million_nanos, completion_per_million_nanos, per_kwh_nanos, \
     cached_prompt_per_million_nanos";

/// The named plan's price book and currency; `None` if there is no such
/// plan.
pub async fn fetch_book(
    conn: &mut AnyConnection,
    plan: &str,
) -> Result<Option<(PriceBook, Currency)>, BillingError> {
    let Some(plan) = fetch_plans(conn, Some(plan)).await?.into_iter().next() else {
        return Ok(None);
    };
    let currency = prices::currency("currency_code", &plan.currency_code)?;
    Ok(Some((PriceBook::new(plan.name, plan.prices), currency)))
}

/// Plans (all, or the one named) with their prices, by name.
pub async fn fetch_plans(
    conn: &mut AnyConnection,
    only: Option<&str>,
) -> Result<Vec<PricePlan>, BillingError> {
    let plans: Vec<PlanRow> = sqlx::query_as(
        "SELECT name, currency_code, description FROM price_plans \
         WHERE ($1 = '' OR name = $1) ORDER BY name",
    )
    .bind(only.unwrap_or(""))
    .fetch_all(&mut *conn)
    .await?;
    let prices: Vec<PriceRow> = sqlx::query_as(&format!(
        "SELECT {PRICE_COLUMNS} FROM prices WHERE ($1 = '' OR plan = $1) \
         ORDER BY plan, model, device_class, effective_from_us"
    ))
    .bind(only.unwrap_or(""))
    .fetch_all(&mut *conn)
    .await?;
    let mut out: Vec<PricePlan> = plans
        .into_iter()
        .map(|p| PricePlan {
            name: p.name,
            currency_code: p.currency_code,
            description: p.description,
            prices: Vec::new(),
        })
        .collect();
    for row in prices {
        if let Some(plan) = out.iter_mut().find(|p| p.name == row.plan) {
            plan.prices.push(row.into());
        }
    }
    Ok(out)
}

pub async fn insert_plan(
    conn: &mut AnyConnection,
    name: &str,
    currency_code: &str,
    description: &str,
    now_us: i64,
) -> Result<(), BillingError> {
    sqlx::query(
        "INSERT INTO price_plans (name, currency_code, description, created_at_us) \
         VALUES ($1, $2, $3, $4)",
    )
    .bind(name)
    .bind(currency_code)
    .bind(description)
    .bind(now_us)
    .execute(&mut *conn)
    .await?;
    Ok(())
}

pub async fn set_plan_description(
    conn: &mut AnyConnection,
    name: &str,
    description: &str,
) -> Result<(), BillingError> {
    sqlx::query("UPDATE price_plans SET description = $2 WHERE name = $1")
        .bind(name)
        .bind(description)
        .execute(&mut *conn)
        .await?;
    Ok(())
}

pub async fn insert_price(
    conn: &mut AnyConnection,
    plan: &str,
    price: &Price,
    now_us: i64,
) -> Result<(), BillingError> {
    let result = sqlx::query(&format!(
        "INSERT INTO prices ({PRICE_COLUMNS}, created_at_us) VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9)"
    ))
    .bind(plan)
    .bind(&price.model)
    .bind(&price.device_class)
    .bind(price.effective_from_us)
    .bind(price.prompt_per_million_nanos)
    .bind(price.completion_per_million_nanos)
    .bind(price.per_kwh_nanos)
    .bind(price.cached_prompt_per_million_nanos)
    .bind(now_us)
    .execute(&mut *conn)
    .await;
    match result {
        Err(sqlx::Error::Database(e)) if e.is_unique_violation() => {
            Err(BillingError::AlreadyExists(format!(
                "a price of plan `{plan}` for model `{}` on device class {:?} from the same effective_from",
                price.model, price.device_class
            )))
        }
        other => other.map(|_| ()).map_err(BillingError::from),
    }
}

/// The latest period finalized for any tenant now on `plan`.
pub async fn latest_finalized_period_of_plan(
    conn: &mut AnyConnection,
    plan: &str,
) -> Result<Option<String>, BillingError> {
    let row: Option<(Option<String>,)> = sqlx::query_as(
        "SELECT MAX(i.period) FROM invoices i JOIN tenants t ON t.id = i.tenant_id \
         WHERE i.status = 'finalized' AND (t.price_plan = $1 OR i.price_plan = $1)",
    )
    .bind(plan)
    .fetch_optional(&mut *conn)
    .await?;
    Ok(row.and_then(|(p,)| p))
}

/// Per tenant (all, or the one given): the hour of its first usage.
pub async fn first_usage(
    conn: &mut AnyConnection,
    tenant_id: Option<&str>,
) -> Result<Vec<(String, i64)>, BillingError> {
    Ok(sqlx::query_as(
        "SELECT tenant_id, MIN(hour_us) FROM usage_hourly WHERE ($1 = '' OR tenant_id = $1) \
         GROUP BY tenant_id",
    )
    .bind(tenant_id.unwrap_or(""))
    .fetch_all(&mut *conn)
    .await?)
}

/// Per tenant: its first and last invoice periods, and how many are final.
pub async fn invoice_spans(
    conn: &mut AnyConnection,
    tenant_id: Option<&str>,
) -> Result<Vec<(String, String, String, i64)>, BillingError> {
    Ok(sqlx::query_as(
        "SELECT tenant_id, MIN(period), MAX(period), \
         CAST(SUM(CASE WHEN status = 'finalized' THEN 1 ELSE 0 END) AS BIGINT) \
         FROM invoices WHERE ($1 = '' OR tenant_id = $1) GROUP BY tenant_id",
    )
    .bind(tenant_id.unwrap_or(""))
    .fetch_all(&mut *conn)
    .await?)
}

/// Opens a draft invoice unless the period already has one.
pub async fn insert_draft(
    conn: &mut AnyConnection,
    id: &str,
    tenant_id: &str,
    period: &str,
    now_us: i64,
) -> Result<(), BillingError> {
    sqlx::query(
        "INSERT INTO invoices (id, tenant_id, period, status, created_at_us) \
         VALUES ($1, $2, $3, 'draft', $4) ON CONFLICT DO NOTHING",
    )
    .bind(id)
    .bind(tenant_id)
    .bind(period)
    .bind(now_us)
    .execute(&mut *conn)
    .await?;
    Ok(())
}

/// An invoice header as stored, its period and status parsed on read (a
/// row that holds neither is a decoding error, not a later surprise).
#[derive(Debug, Clone, FromRow)]
pub struct InvoiceRow {
    pub id: String,
    pub tenant_id: String,
    pub tenant_slug: String,
    #[sqlx(try_from = "String")]
    pub period: Month,
    #[sqlx(try_from = "String")]
    pub status: InvoiceStatus,
    pub currency_code: Option<String>,
    pub total_nanos: Option<i64>,
    pub created_at_us: i64,
    pub finalized_at_us: Option<i64>,
}

const INVOICE_COLUMNS: &str = "i.id, i.tenant_id, t.slug AS tenant_slug, i.period, i.status, \
     i.currency_code, i.total_nanos, i.created_at_us, i.finalized_at_us";

/// Filters of an invoice listing; `None` matches everything.
#[derive(Debug, Clone, Default)]
pub struct InvoiceFilter {
    pub tenant_id: Option<String>,
    pub period: Option<Month>,
    pub status: Option<InvoiceStatus>,
    pub id: Option<String>,
}

/// Invoice headers matching `filter` with ids after `after_id`, by id.
pub async fn list_invoices(
    conn: &mut AnyConnection,
    filter: &InvoiceFilter,
    after_id: &str,
    limit: i64,
) -> Result<Vec<InvoiceRow>, BillingError> {
    Ok(sqlx::query_as(&format!(
        "SELECT {INVOICE_COLUMNS} FROM invoices i JOIN tenants t ON t.id = i.tenant_id \
         WHERE ($1 = '' OR i.tenant_id = $1) AND ($2 = '' OR i.period = $2) \
         AND ($3 = '' OR i.status = $3) AND ($4 = '' OR i.id = $4) AND i.id > $5 \
         ORDER BY i.id LIMIT $6"
    ))
    // The statement reads an empty string as "any" (one plan for all filters).
    .bind(filter.tenant_id.as_deref().unwrap_or(""))
    .bind(filter.period.map(|p| p.to_string()).unwrap_or_default())
    .bind(filter.status.map_or("", |s| s.as_str()))
    .bind(filter.id.as_deref().unwrap_or(""))
    .bind(after_id)
    .bind(limit)
    .fetch_all(&mut *conn)
    .await?)
}

/// The latest finalized invoice of `tenant_id` before `period`: its period
/// and finalization time.
pub async fn previous_finalized(
    conn: &mut AnyConnection,
    tenant_id: &str,
    period: Month,
) -> Result<Option<(String, i64)>, BillingError> {
    Ok(sqlx::query_as(
        "SELECT period, finalized_at_us FROM invoices WHERE tenant_id = $1 AND period < $2 \
         AND status = 'finalized' ORDER BY period DESC LIMIT 1",
    )
    .bind(tenant_id)
    .bind(period.to_string())
    .fetch_optional(&mut *conn)
    .await?)
}

/// The earliest draft period of `tenant_id`.
pub async fn earliest_draft(
    conn: &mut AnyConnection,
    tenant_id: &str,
) -> Result<Option<Month>, BillingError> {
    let row: Option<(String,)> = sqlx::query_as(
        "SELECT period FROM invoices WHERE tenant_id = $1 AND status = 'draft' \
         ORDER BY period LIMIT 1",
    )
    .bind(tenant_id)
    .fetch_optional(&mut *conn)
    .await?;
    row.map(|(p,)| Month::try_from(p).map_err(|e| sqlx::Error::Decode(e.into())))
        .transpose()
        .map_err(BillingError::from)
}

/// Which usage events of one tenant to total: finished in
/// `[finished_from, finished_to)` and recorded in `[recorded_from, recorded_to)`.
#[derive(Debug, Clone)]
pub struct UsageWindow<'a> {
    pub tenant_id: &'a str,
    /// Only this key's usage; "" for the whole tenant's.
    pub key_id: &'a str,
    pub finished_from: i64,
    pub finished_to: i64,
    pub recorded_from: i64,
    pub recorded_to: i64,
}

/// The earliest `finished_at_us` in the window, if it holds any event.
pub async fn earliest_finished(
    conn: &mut AnyConnection,
    w: &UsageWindow<'_>,
) -> Result<Option<i64>, BillingError> {
    let (min,): (Option<i64>,) = sqlx::query_as(
        "SELECT MIN(finished_at_us) FROM usage_events WHERE tenant_id = $1 \
         AND finished_at_us >= $2 AND finished_at_us < $3 \
         AND recorded_at_us >= $4 AND recorded_at_us < $5",
    )
    .bind(w.tenant_id)
    .bind(w.finished_from)
    .bind(w.finished_to)
    .bind(w.recorded_from)
    .bind(w.recorded_to)
    .fetch_one(&mut *conn)
    .await?;
    Ok(min)
}

#[derive(FromRow)]
struct GroupRow {
    model: String,
    device_profile: String,
    bucket: i64,
    prompt_tokens: i64,
    cached_prompt_tokens: i64,
    completion_tokens: i64,
    energy_mj: i64,
}

/// Usage totals in the window per model, device and bucket, where bucket `i`
/// holds the events finished in `[starts[i], starts[i + 1])` (`starts`
/// ascending, `starts[0]` the window's start).
pub async fn usage_groups(
    conn: &mut AnyConnection,
    w: &UsageWindow<'_>,
    starts: &[i64],
) -> Result<Vec<UsageGroup>, BillingError> {
    // The bucket of each event, by its finish time against the bound starts
    // ($6 onwards), latest first.
    let mut bucket = String::from("CAST(");
    if starts.len() > 1 {
        bucket.push_str("CASE");
        for i in (1..starts.len()).rev() {
            bucket.push_str(&format!(" WHEN finished_at_us >= ${} THEN {i}", 6 + i));
        }
        bucket.push_str(" ELSE 0 END");
    } else {
        bucket.push('0');
    }
    bucket.push_str(" AS BIGINT)");
    let sql = format!(
        "SELECT model, device_profile, {bucket} AS bucket, \
         CAST(SUM(prompt_tokens) AS BIGINT) AS prompt_tokens, \
         CAST(SUM(cached_prompt_tokens) AS BIGINT) AS cached_prompt_tokens, \
         CAST(SUM(completion_tokens) AS BIGINT) AS completion_tokens, \
         CAST(SUM(energy_mj) AS BIGINT) AS energy_mj \
         FROM usage_events WHERE tenant_id = $1 AND finished_at_us >= $2 AND finished_at_us < $3 \
         AND recorded_at_us >= $4 AND recorded_at_us < $5 AND ($6 = '' OR key_id = $6) \
         GROUP BY 1, 2, 3 ORDER BY 1, 2, 3"
    );
    let mut query = sqlx::query_as::<_, GroupRow>(&sql)
        .bind(w.tenant_id)
        .bind(w.finished_from)
        .bind(w.finished_to)
        .bind(w.recorded_from)
        .bind(w.recorded_to)
        .bind(w.key_id);
    for start in starts.iter().skip(1) {
        query = query.bind(*start);
    }
    let rows = query.fetch_all(&mut *conn).await?;
    rows.into_iter()
        .map(|r| {
            let start = usize::try_from(r.bucket)
                .ok()
                .and_then(|b| starts.get(b))
                .ok_or_else(|| corrupt("usage bucket"))?;
            Ok(UsageGroup {
                model: r.model,
                device: r.device_profile,
                bucket_start_us: *start,
                prompt_tokens: r.prompt_tokens,
                cached_prompt_tokens: r.cached_prompt_tokens,
                completion_tokens: r.completion_tokens,
                energy_mj: r.energy_mj,
            })
        })
        .collect()
}

pub async fn insert_lines(
    conn: &mut AnyConnection,
    lines: &[InvoiceLine],
) -> Result<(), BillingError> {
    for line in lines {
        sqlx::query(
            "INSERT INTO invoice_lines (invoice_id, line_number, model, device_class, kind, \
             quantity, unit_price_nanos, amount_nanos, adjusts_period, price_effective_from_us) \
             VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10)",
        )
        .bind(&line.invoice_id)
        .bind(i64::from(line.line_number))
        .bind(&line.model)
        .bind(&line.device_class)
        .bind(line.kind.as_str())
        .bind(line.quantity)
        .bind(line.unit_price_nanos)
        .bind(line.amount_nanos)
        .bind(&line.adjusts_period)
        .bind(line.price_effective_from_us)
        .execute(&mut *conn)
        .await?;
    }
    Ok(())
}

/// Marks a draft finalized with its total. The triggers refuse any change
/// after this.
pub async fn mark_finalized(
    conn: &mut AnyConnection,
    id: &str,
    plan: &str,
    currency_code: &str,
    total_nanos: i64,
    finalized_at_us: i64,
) -> Result<(), BillingError> {
    sqlx::query(
        "UPDATE invoices SET status = 'finalized', price_plan = $2, currency_code = $3, \
         total_nanos = $4, finalized_at_us = $5 WHERE id = $1 AND status = 'draft'",
    )
    .bind(id)
    .bind(plan)
    .bind(currency_code)
    .bind(total_nanos)
    .bind(finalized_at_us)
    .execute(&mut *conn)
    .await?;
    Ok(())
}

/// Takes the write lock on a draft invoice (a no-op update), so that two
/// finalizations of it queue, and on SQLite the whole database's.
pub async fn lock_draft(conn: &mut AnyConnection, id: &str) -> Result<u64, BillingError> {
    Ok(
        sqlx::query("UPDATE invoices SET status = status WHERE id = $1 AND status = 'draft'")
            .bind(id)
            .execute(&mut *conn)
            .await?
            .rows_affected(),
    )
}

#[derive(FromRow)]
struct LineRow {
    invoice_id: String,
    line_number: i64,
    model: String,
    device_class: String,
    kind: String,
    quantity: i64,
    unit_price_nanos: i64,
    amount_nanos: i64,
    adjusts_period: String,
    price_effective_from_us: i64,
    tenant_id: String,
    tenant_slug: String,
    period: String,
    currency_code: Option<String>,
}

/// Stored lines of invoice `invoice_id` numbered after `after_line`, in
/// order, at most `limit`.
pub async fn stored_lines(
    conn: &mut AnyConnection,
    invoice_id: &str,
    after_line: i64,
    limit: i64,
) -> Result<Vec<InvoiceLine>, BillingError> {
    let rows: Vec<LineRow> = sqlx::query_as(
        "SELECT l.invoice_id, l.line_number, l.model, l.device_class, l.kind, l.quantity, \
         l.unit_price_nanos, l.amount_nanos, l.adjusts_period, l.price_effective_from_us, \
         i.tenant_id, t.slug AS tenant_slug, i.period, i.currency_code \
         FROM invoice_lines l JOIN invoices i ON i.id = l.invoice_id \
         JOIN tenants t ON t.id = i.tenant_id \
         WHERE l.invoice_id = $1 AND l.line_number > $2 ORDER BY l.line_number LIMIT $3",
    )
    .bind(invoice_id)
    .bind(after_line)
    .bind(limit)
    .fetch_all(&mut *conn)
    .await?;
    rows.into_iter()
        .map(|r| {
            Ok(InvoiceLine {
                kind: LineKind::parse(&r.kind).ok_or_else(|| corrupt("invoice_lines.kind"))?,
                line_number: u32::try_from(r.line_number)
                    .map_err(|_| corrupt("invoice_lines.line_number"))?,
                invoice_id: r.invoice_id,
                model: r.model,
                device_class: r.device_class,
                quantity: r.quantity,
                unit_price_nanos: r.unit_price_nanos,
                amount_nanos: r.amount_nanos,
                adjusts_period: r.adjusts_period,
                price_effective_from_us: r.price_effective_from_us,
                tenant_id: r.tenant_id,
                tenant_slug: r.tenant_slug,
                period: r.period,
                currency_code: r.currency_code.unwrap_or_default(),
            })
        })
        .collect()
}

/// How many lines invoice `invoice_id` has stored.
pub async fn count_stored_lines(
    conn: &mut AnyConnection,
    invoice_id: &str,
) -> Result<u64, BillingError> {
    let (n,): (i64,) = sqlx::query_as("SELECT COUNT(*) FROM invoice_lines WHERE invoice_id = $1")
        .bind(invoice_id)
        .fetch_one(&mut *conn)
        .await?;
    Ok(u64::try_from(n).unwrap_or(0))
}

/// An admin audit row for a billing change, in the caller's transaction.
pub async fn audit(
    conn: &mut AnyConnection,
    at_us: i64,
    actor: &str,
    action: &str,
    target: &str,
    tenant_id: Option<&str>,
    after_json: &str,
) -> Result<(), BillingError> {
    sqlx::query(
        "INSERT INTO admin_audit_log (at_us, actor, action, target, tenant_id, before_json, \
         after_json) VALUES ($1, $2, $3, $4, $5, '{}', $6)",
    )
    .bind(at_us)
    .bind(actor)
    .bind(action)
    .bind(target)
    .bind(tenant_id)
    .bind(after_json)
    .execute(&mut *conn)
    .await?;
    Ok(())
}
