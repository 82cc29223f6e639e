//! The billing operations: price plans, invoices (drafts computed from usage
//! on read, finalization in one transaction) and the rules that decide which
//! usage an invoice holds.
//!
//! Which usage an invoice holds. Invoice Q of a tenant (period P_Q, and if
//! finalized, finalization time F_Q from the database clock):
//! - its own usage: events finished in P_Q (when finalized, only those
//!   recorded before F_Q);
//! - adjustments, on the tenant's earliest draft only (and kept by it when
//!   it is finalized): events finished before P_Q and recorded from the
//!   previous finalization F_prev on (before F_Q if finalized). Because
//!   invoices are finalized in period order, F is increasing, so each late
//!   event lands on exactly one invoice: the first one finalized after it
//!   was recorded, and never on its own period's finalized one.
//!
//! Finalization takes a lock that waits for usage inserts in flight and
//! reads F from the database clock after it; inserts stamp `recorded_at_us`
//! from the same clock after their own lock, so every event is either in the
//! finalization's snapshot with `recorded_at_us < F` or recorded at `>= F`.
//!
//! Knows the database through `repo`, nothing of gRPC.

use std::time::Duration;

use sqlx::AnyConnection;

use super::invoice::{self, Invoice, InvoiceLine, InvoiceStatus, UsageGroup};
use super::money::Currency;
use super::prices::{self, PriceBook, PricePlan, PutPrices};
use super::repo::{self, InvoiceFilter, InvoiceRow, UsageWindow};
use super::{BillingError, BillingSettings};
use crate::calendar::Month;
use crate::store::{Db, now_us};
use crate::tenancy::Tenant;
use crate::tenancy::{Page, PageRequest};

/// Billing over one database. Cheap to clone.
#[derive(Debug, Clone)]
pub struct BillingService {
    db: Db,
    grace_period: Duration,
}

/// The id of a tenant's invoice for a period: stable, so opening a draft
/// twice opens one.
pub fn invoice_id(tenant_id: &str, period: Month) -> String {
    format!("inv-{period}-{tenant_id}")
}

/// A tenant's invoice draft for the current month, in sums.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MonthSpend {
    pub period: Month,
    pub currency_code: String,
    /// The draft's total: each line rounded to the minor unit.
    pub total_nanos: i64,
    /// Its lines exact to the nano (see `invoice::exact_total`).
    pub exact_nanos: i64,
}

impl BillingService {
    pub fn new(db: Db, settings: &BillingSettings) -> BillingService {
        BillingService {
            db,
            grace_period: settings.grace_period,
        }
    }

    pub fn db(&self) -> &Db {
        &self.db
    }

    fn grace_us(&self) -> i64 {
        i64::try_from(self.grace_period.as_micros()).unwrap_or(i64::MAX)
    }

    /// `period` as given by the API: "YYYY-MM" and not after the current month.
    pub fn parse_period(field: &str, text: &str) -> Result<Month, BillingError> {
        let period = Month::parse(text).ok_or_else(|| {
            BillingError::invalid(field, format!("{text:?} is not a month written YYYY-MM"))
        })?;
        if period > Month::of_us(now_us()) {
            return Err(BillingError::invalid(
                field,
                format!("{period} is in the future"),
            ));
        }
        Ok(period)
    }

    pub async fn list_plans(&self) -> Result<Vec<PricePlan>, BillingError> {
        let mut conn = self.db.pool().acquire().await?;
        repo::fetch_plans(&mut conn, None).await
    }

    /// Creates a plan or adds prices to one, in one transaction with its
    /// audit row. A price may not start inside or before a period already
    /// finalized for a tenant on the plan: finalized history is not repriced.
    pub async fn put_prices(
        &self,
        actor: &str,
        request: PutPrices,
    ) -> Result<PricePlan, BillingError> {
        prices::validate_plan_name(&request.plan)?;
        let now = now_us();
        let mut tx = self.db.begin_write().await?;
        let existing = repo::fetch_plans(&mut tx, Some(&request.plan))
            .await?
            .into_iter()
            .next();
        let currency = match &existing {
            Some(plan) => {
                if !request.currency_code.is_empty() && request.currency_code != plan.currency_code
                {
                    return Err(BillingError::invalid(
                        "currency_code",
                        format!(
                            "plan `{}` is in {}; a plan's currency never changes",
                            plan.name, plan.currency_code
                        ),
                    ));
                }
                prices::currency("currency_code", &plan.currency_code)?
            }
            None => {
                if request.currency_code.is_empty() {
                    return Err(BillingError::NotFound(format!(
                        "price plan `{}` (give `currency_code` to create it)",
                        request.plan
                    )));
                }
                prices::currency("currency_code", &request.currency_code)?
            }
        };
        let new_prices = prices::validate_prices(&request.prices, currency, now)?;
        if let Some(last) = repo::latest_finalized_period_of_plan(&mut tx, &request.plan).await?
            && let Some(last) = Month::parse(&last)
        {
            for (i, price) in new_prices.iter().enumerate() {
                if price.effective_from_us < last.end_us() {
                    return Err(BillingError::invalid(
                        format!("prices[{i}].effective_from"),
                        format!(
                            "invoices of plan `{}` are finalized through {last}; a new price may start at {} at the earliest",
                            request.plan,
                            last.next()
                        ),
                    ));
                }
            }
        }
        match &existing {
            None => {
                repo::insert_plan(
                    &mut tx,
                    &request.plan,
                    currency.code,
                    &request.description,
                    now,
                )
                .await?
            }
            Some(plan)
                if !request.description.is_empty() && request.description != plan.description =>
            {
                repo::set_plan_description(&mut tx, &request.plan, &request.description).await?
            }
            Some(_) => {}
        }
        for price in &new_prices {
            repo::insert_price(&mut tx, &request.plan, price, now).await?;
        }
        let summary = serde_json::json!({
            "plan": request.plan,
            "currency_code": currency.code,
            "prices": new_prices.iter().map(|p| serde_json::json!({
                "model": p.model,
                "device_class": p.device_class,
                "prompt_per_million_nanos": p.prompt_per_million_nanos,
                "cached_prompt_per_million_nanos": p.cached_prompt_per_million_nanos,
                "completion_per_million_nanos": p.completion_per_million_nanos,
                "per_kwh_nanos": p.per_kwh_nanos,
                "effective_from_us": p.effective_from_us,
            })).collect::<Vec<_>>(),
        });
        repo::audit(
            &mut tx,
            now,
            actor,
            "billing.put_prices",
            &request.plan,
            None,
            &summary.to_string(),
        )
        .await?;
        let plan = repo::fetch_plans(&mut tx, Some(&request.plan))
            .await?
            .into_iter()
            .next()
            .ok_or_else(|| BillingError::NotFound(format!("price plan `{}`", request.plan)))?;
        tx.commit().await?;
        Ok(plan)
    }

    /// Opens the draft invoices that usage calls for: every month from a
    /// tenant's first usage to now while it has no finalized invoice, else
    /// every month after its last invoice. Idempotent.
    pub async fn open_drafts(&self, tenant_id: Option<&str>) -> Result<(), BillingError> {
        let mut conn = self.db.pool().acquire().await?;
        let now = now_us();
        let current = Month::of_us(now);
        let firsts = repo::first_usage(&mut conn, tenant_id).await?;
        let spans = repo::invoice_spans(&mut conn, tenant_id).await?;
        for (tenant, first_hour) in firsts {
            let span = spans.iter().find(|(t, ..)| *t == tenant);
            let first_needed = Month::of_us(first_hour);
            let from = match span {
                None => first_needed,
                Some((_, min, max, finalized)) => {
                    let min = Month::parse(min).unwrap_or(first_needed);
                    let max = Month::parse(max).unwrap_or(current);
                    if *finalized == 0 && first_needed < min {
                        first_needed
                    } else if max < current {
                        max.next()
                    } else {
                        continue;
                    }
                }
            };
            for period in from.through(current) {
                repo::insert_draft(
                    &mut conn,
                    &invoice_id(&tenant, period),
                    &tenant,
                    &period.to_string(),
                    now,
                )
                .await?;
            }
        }
        Ok(())
    }

    async fn tenant(conn: &mut AnyConnection, tenant_id: &str) -> Result<Tenant, BillingError> {
        crate::tenancy::fetch_tenant_by_id(conn, tenant_id)
            .await?
            .ok_or_else(|| BillingError::NotFound(format!("tenant {tenant_id}")))
    }

    async fn price_book(
        conn: &mut AnyConnection,
        plan: &str,
    ) -> Result<(PriceBook, Currency), BillingError> {
        repo::fetch_book(conn, plan)
            .await?
            .ok_or_else(|| BillingError::NotFound(format!("price plan `{plan}`")))
    }

    /// Bucket starts covering `[from, to)`: `from`, each month start and each
    /// price change inside it.
    fn bucket_starts(from: i64, to: i64, book: &PriceBook) -> Vec<i64> {
        let mut starts = vec![from];
        let mut month = Month::of_us(from).next();
        while month.start_us() < to {
            starts.push(month.start_us());
            month = month.next();
        }
        starts.extend(
            book.change_points()
                .into_iter()
                .filter(|t| *t > from && *t < to),
        );
        starts.sort_unstable();
        starts.dedup();
        starts
    }

    /// The lines of invoice `row`, computed from usage. `recorded_before`:
    /// the finalization time when finalizing, else none (a draft).
    async fn compute_lines(
        conn: &mut AnyConnection,
        row: &InvoiceRow,
        book: &PriceBook,
        currency: Currency,
        recorded_before: Option<i64>,
    ) -> Result<Vec<InvoiceLine>, BillingError> {
        let period = row.period;
        let recorded_to = recorded_before.unwrap_or(i64::MAX);
        let own = UsageWindow {
            tenant_id: &row.tenant_id,
            key_id: "",
            finished_from: period.start_us(),
            finished_to: period.end_us(),
            recorded_from: i64::MIN,
            recorded_to,
        };
        let starts = Self::bucket_starts(own.finished_from, own.finished_to, book);
        let groups = repo::usage_groups(conn, &own, &starts).await?;
        let mut lines = invoice::price_lines(&groups, false, book, currency, 1)?;

        let earliest_draft = repo::earliest_draft(conn, &row.tenant_id).await?;
        if earliest_draft == Some(row.period) {
            let previous = repo::previous_finalized(conn, &row.tenant_id, row.period).await?;
            let late = UsageWindow {
                tenant_id: &row.tenant_id,
                key_id: "",
                finished_from: i64::MIN,
                finished_to: period.start_us(),
                recorded_from: previous.map_or(i64::MIN, |(_, at)| at),
                recorded_to,
            };
            if let Some(first) = repo::earliest_finished(conn, &late).await? {
                let from = Month::of_us(first).start_us();
                let late = UsageWindow {
                    finished_from: from,
                    ..late
                };
                let starts = Self::bucket_starts(from, late.finished_to, book);
                let groups: Vec<UsageGroup> = repo::usage_groups(conn, &late, &starts).await?;
                let next_number = u32::try_from(lines.len() + 1).unwrap_or(u32::MAX);
                lines.extend(invoice::price_lines(
                    &groups,
                    true,
                    book,
                    currency,
                    next_number,
                )?);
            }
        }
        for line in &mut lines {
            line.invoice_id.clone_from(&row.id);
            line.tenant_id.clone_from(&row.tenant_id);
            line.tenant_slug.clone_from(&row.tenant_slug);
            line.period = row.period.to_string();
            line.currency_code = currency.code.to_owned();
        }
        Ok(lines)
    }

    /// The invoice of `row`: stored if finalized, computed if a draft.
    /// `with_lines`: include the lines (a draft's total needs them anyway).
    async fn assemble(
        &self,
        conn: &mut AnyConnection,
        row: InvoiceRow,
        with_lines: bool,
    ) -> Result<Invoice, BillingError> {
        let (period, status) = (row.period, row.status);
        let (lines, total, currency_code) = match status {
            InvoiceStatus::Finalized => {
                let lines = if with_lines {
                    repo::stored_lines(conn, &row.id, 0, i64::MAX).await?
                } else {
                    Vec::new()
                };
                (
                    lines,
                    row.total_nanos.unwrap_or(0),
                    row.currency_code.clone().unwrap_or_default(),
                )
            }
            InvoiceStatus::Draft => {
                let tenant = Self::tenant(conn, &row.tenant_id).await?;
                let (book, currency) = Self::price_book(conn, &tenant.price_plan).await?;
                let lines = Self::compute_lines(conn, &row, &book, currency, None).await?;
                let total = invoice::total(&lines)?;
                (
                    if with_lines { lines } else { Vec::new() },
                    total,
                    currency.code.to_owned(),
                )
            }
        };
        Ok(Invoice {
            grace_ends_at_us: period.end_us().saturating_add(self.grace_us()),
            id: row.id,
            tenant_id: row.tenant_id,
            tenant_slug: row.tenant_slug,
            period,
            status,
            currency_code,
            total_nanos: total,
            lines,
            created_at_us: row.created_at_us,
            finalized_at_us: row.finalized_at_us,
        })
    }

    async fn row_by_id(conn: &mut AnyConnection, id: &str) -> Result<InvoiceRow, BillingError> {
        let filter = InvoiceFilter {
            id: Some(id.to_owned()),
            ..InvoiceFilter::default()
        };
        repo::list_invoices(conn, &filter, "", 1)
            .await?
            .into_iter()
            .next()
            .ok_or_else(|| BillingError::NotFound(format!("invoice {id}")))
    }

    /// An invoice by id, with lines. `tenant_id`: the caller's tenant, when
    /// it is not the admin; another tenant's invoice is reported missing.
    pub async fn get_invoice(
        &self,
        id: &str,
        tenant_id: Option<&str>,
    ) -> Result<Invoice, BillingError> {
        let mut conn = self.db.pool().acquire().await?;
        let row = Self::row_by_id(&mut conn, id).await?;
        if tenant_id.is_some_and(|t| t != row.tenant_id) {
            return Err(BillingError::NotFound(format!("invoice {id}")));
        }
        self.open_drafts(Some(&row.tenant_id)).await?;
        self.assemble(&mut conn, row, true).await
    }

    /// The invoice of a tenant for a period, with lines.
    pub async fn get_invoice_of(
        &self,
        tenant_id: &str,
        period: Month,
    ) -> Result<Invoice, BillingError> {
        self.open_drafts(Some(tenant_id)).await?;
        let id = invoice_id(tenant_id, period);
        let mut conn = self.db.pool().acquire().await?;
        let row = match Self::row_by_id(&mut conn, &id).await {
            Err(BillingError::NotFound(_)) => {
                return Err(BillingError::NotFound(format!(
                    "invoice of tenant {tenant_id} for {period} (the tenant has no usage then)"
                )));
            }
            other => other?,
        };
        self.assemble(&mut conn, row, true).await
    }

    /// The current month's invoice draft total of a tenant (zero before
    /// its first usage of the month), in its plan's currency, and the same
    /// lines' exact amounts before rounding.
    pub async fn month_spend(&self, tenant_id: &str) -> Result<MonthSpend, BillingError> {
        let period = Month::of_us(now_us());
        match self.get_invoice_of(tenant_id, period).await {
            Ok(invoice) => Ok(MonthSpend {
                period,
                exact_nanos: crate::billing::invoice::exact_total(&invoice.lines)?,
                currency_code: invoice.currency_code,
                total_nanos: invoice.total_nanos,
            }),
            Err(BillingError::NotFound(_)) => {
                let mut conn = self.db.pool().acquire().await?;
                let tenant = Self::tenant(&mut conn, tenant_id).await?;
                let currency_code = crate::tenancy::plan_currency(&mut conn, &tenant.price_plan)
                    .await?
                    .ok_or_else(|| {
                        BillingError::NotFound(format!("price plan `{}`", tenant.price_plan))
                    })?;
                Ok(MonthSpend {
                    period,
                    currency_code,
                    total_nanos: 0,
                    exact_nanos: 0,
                })
            }
            Err(e) => Err(e),
        }
    }

    /// One API key's spend this month, exact to the nano: its usage finished
    /// this month, priced as the draft's lines are (before their rounding).
    /// What a key's budget counts from.
    pub async fn key_month_spend(
        &self,
        tenant_id: &str,
        key_id: &str,
    ) -> Result<i64, BillingError> {
        let mut conn = self.db.pool().acquire().await?;
        let tenant = Self::tenant(&mut conn, tenant_id).await?;
        let (book, currency) = Self::price_book(&mut conn, &tenant.price_plan).await?;
        let period = Month::of_us(now_us());
        let window = UsageWindow {
            tenant_id,
            key_id,
            finished_from: period.start_us(),
            finished_to: period.end_us(),
            recorded_from: i64::MIN,
            recorded_to: i64::MAX,
        };
        let starts = Self::bucket_starts(window.finished_from, window.finished_to, &book);
        let groups = repo::usage_groups(&mut conn, &window, &starts).await?;
        let lines = invoice::price_lines(&groups, false, &book, currency, 1)?;
        invoice::exact_total(&lines)
    }

    /// Invoice headers (without lines), by id, one page.
    pub async fn list_invoices(
        &self,
        tenant_id: Option<&str>,
        period: Option<Month>,
        status: Option<InvoiceStatus>,
        page: &PageRequest,
    ) -> Result<Page<Invoice>, BillingError> {
        self.open_drafts(tenant_id).await?;
        let mut conn = self.db.pool().acquire().await?;
        let filter = InvoiceFilter {
            tenant_id: tenant_id.map(str::to_owned),
            period,
            status,
            id: None,
        };
        let rows = repo::list_invoices(
            &mut conn,
            &filter,
            page.after.as_deref().unwrap_or(""),
            page.fetch_limit(),
        )
        .await?;
        let mut invoices = Vec::with_capacity(rows.len());
        for row in rows {
            invoices.push(self.assemble(&mut conn, row, false).await?);
        }
        Ok(page.finish("invoices", invoices, |i| i.id.clone()))
    }

    /// Finalizes a draft: checks the grace period and the order, computes
    /// its lines under the usage lock, stores lines, total and status in one
    /// transaction. Immutable afterwards (database triggers).
    pub async fn finalize(&self, actor: &str, id: &str) -> Result<Invoice, BillingError> {
        let mut tx = self.db.begin_write().await?;
        // A write first: it serializes with other finalizations of this
        // invoice and, on SQLite, makes this the one writer before anything
        // is read.
        let locked = repo::lock_draft(&mut tx, id).await?;
        let row = Self::row_by_id(&mut tx, id).await?;
        if locked == 0 || row.status == InvoiceStatus::Finalized {
            return Err(BillingError::Precondition(format!(
                "invoice {id} is already finalized"
            )));
        }
        let period = row.period;
        // Waits for usage inserts in flight and holds new ones until
        // commit; see the module comment.
        repo::hold_usage_inserts(&mut tx, self.db.backend()).await?;
        let finalized_at = repo::db_now_us(&mut tx, self.db.backend()).await?;
        let grace_ends = period.end_us().saturating_add(self.grace_us());
        if finalized_at < grace_ends {
            return Err(BillingError::Precondition(format!(
                "invoice {id} for {period} is still open: its grace period ends at {} \
                 (microseconds since the epoch; setting `billing.grace_period`)",
                grace_ends
            )));
        }
        if let Some(earlier) = repo::earliest_draft(&mut tx, &row.tenant_id).await?
            && earlier < row.period
        {
            return Err(BillingError::Precondition(format!(
                "invoice {id}: the tenant's invoice for {earlier} is still a draft; finalize in period order"
            )));
        }
        let tenant = Self::tenant(&mut tx, &row.tenant_id).await?;
        let (book, currency) = Self::price_book(&mut tx, &tenant.price_plan).await?;
        let lines = Self::compute_lines(&mut tx, &row, &book, currency, Some(finalized_at)).await?;
        let total = invoice::total(&lines)?;
        repo::insert_lines(&mut tx, &lines).await?;
        repo::mark_finalized(
            &mut tx,
            id,
            &tenant.price_plan,
            currency.code,
            total,
            finalized_at,
        )
        .await?;
        let summary = serde_json::json!({
            "invoice_id": id,
            "period": period.to_string(),
            "currency_code": currency.code,
            "total_nanos": total,
            "lines": lines.len(),
        });
        repo::audit(
            &mut tx,
            finalized_at,
            actor,
            "billing.finalize_invoice",
            id,
            Some(&row.tenant_id),
            &summary.to_string(),
        )
        .await?;
        // In the same transaction: the finalization and its webhook event
        // exist together or not at all.
        crate::outbox::record(
            &mut tx,
            &crate::outbox::NewEvent {
                event_type: crate::outbox::EventType::InvoiceFinalized,
                tenant_id: Some(row.tenant_id.clone()),
                dedupe_key: format!("invoice.finalized:{id}"),
                data: serde_json::json!({
                    "invoice_id": id,
                    "period": period.to_string(),
                    "total": crate::outbox::MoneyField::new(currency.code, total),
                    "lines": lines.len(),
                }),
            },
            None,
        )
        .await?;
        let row = Self::row_by_id(&mut tx, id).await?;
        let invoice = self.assemble(&mut tx, row, true).await?;
        tx.commit().await?;
        Ok(invoice)
    }

    /// Invoice headers of `period` (one tenant or all), by id.
    pub(crate) async fn invoices_of_period(
        &self,
        tenant_id: Option<&str>,
        period: Month,
    ) -> Result<Vec<InvoiceRow>, BillingError> {
        self.open_drafts(tenant_id).await?;
        let mut conn = self.db.pool().acquire().await?;
        let filter = InvoiceFilter {
            tenant_id: tenant_id.map(str::to_owned),
            period: Some(period),
            ..InvoiceFilter::default()
        };
        repo::list_invoices(&mut conn, &filter, "", i64::MAX).await
    }

    /// A draft's lines, computed now.
    pub(crate) async fn draft_lines(
        &self,
        row: &InvoiceRow,
    ) -> Result<Vec<InvoiceLine>, BillingError> {
        let mut conn = self.db.pool().acquire().await?;
        let tenant = Self::tenant(&mut conn, &row.tenant_id).await?;
        let (book, currency) = Self::price_book(&mut conn, &tenant.price_plan).await?;
        Self::compute_lines(&mut conn, row, &book, currency, None).await
    }
}
