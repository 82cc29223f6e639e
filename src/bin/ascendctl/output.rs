//! Rendering: a table for people, JSON (one document per command) for
//! scripts. Views are plain structs so both formats show the same fields.

use std::time::{Duration, UNIX_EPOCH};

use ascend_gateway::api::pb::v1::{self as pb, ApiKey, AuditEvent, CreateApiKeyResponse};
use ascend_gateway::billing::money::{Currency, format_decimal};
use clap::ValueEnum;
use comfy_table::Table;
use serde::Serialize;

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum Output {
    Table,
    Json,
}

pub fn code_name(code: tonic::Code) -> String {
    format!("{code:?}")
        .chars()
        .fold(String::new(), |mut name, c| {
            if c.is_uppercase() && !name.is_empty() {
                name.push('_');
            }
            name.push(c.to_ascii_uppercase());
            name
        })
}

pub(crate) fn time(ts: Option<&prost_types::Timestamp>) -> Option<String> {
    let ts = ts?;
    let secs = u64::try_from(ts.seconds).ok()?;
    let at = UNIX_EPOCH + Duration::from_secs(secs);
    Some(humantime::format_rfc3339_seconds(at).to_string())
}

pub(crate) fn or_dash<T: ToString>(value: Option<T>) -> String {
    value.map_or_else(|| "-".to_owned(), |v| v.to_string())
}

#[derive(Serialize)]
struct TenantView {
    id: String,
    slug: String,
    display_name: String,
    status: String,
    price_plan: String,
    scheduling_weight: u32,
    requests_per_second: Option<f64>,
    burst: Option<u32>,
    tokens_per_minute: Option<u64>,
    max_concurrent_requests: Option<u32>,
    monthly_token_quota: Option<u64>,
    monthly_budget: Option<MoneyView>,
    /// Empty: the gateway's default thresholds.
    budget_alert_percents: Vec<u32>,
    /// "tenant" or "shared".
    cache_scope: String,
    created_at: Option<String>,
    updated_at: Option<String>,
}

impl From<pb::Tenant> for TenantView {
    fn from(t: pb::Tenant) -> TenantView {
        let limits = t.limits.clone().unwrap_or_default();
        TenantView {
            status: t
                .status()
                .as_str_name()
                .trim_start_matches("TENANT_STATUS_")
                .to_lowercase(),
            cache_scope: t
                .cache_scope()
                .as_str_name()
                .trim_start_matches("CACHE_SCOPE_")
                .to_lowercase(),
            created_at: time(t.created_at.as_ref()),
            updated_at: time(t.updated_at.as_ref()),
            id: t.id,
            slug: t.slug,
            display_name: t.display_name,
            price_plan: t.price_plan,
            scheduling_weight: t.scheduling_weight,
            requests_per_second: limits.requests_per_second,
            burst: limits.burst,
            tokens_per_minute: limits.tokens_per_minute,
            max_concurrent_requests: limits.max_concurrent_requests,
            monthly_token_quota: limits.monthly_token_quota,
            monthly_budget: money_view(limits.monthly_budget.as_ref()),
            budget_alert_percents: t.budget_alert_percents,
        }
    }
}

#[derive(Serialize)]
struct KeyView {
    key_id: String,
    tenant_id: String,
    name: String,
    scopes: Vec<String>,
    created_at: Option<String>,
    expires_at: Option<String>,
    revoked_at: Option<String>,
    last_used_at: Option<String>,
    previous_secret_expires_at: Option<String>,
    /// The key's own limits (inside its tenant's).
    requests_per_second: Option<f64>,
    burst: Option<u32>,
    tokens_per_minute: Option<u64>,
    max_concurrent_requests: Option<u32>,
    monthly_budget: Option<MoneyView>,
}

impl From<ApiKey> for KeyView {
    fn from(k: ApiKey) -> KeyView {
        let limits = k.limits.clone().unwrap_or_default();
        KeyView {
            requests_per_second: limits.requests_per_second,
            burst: limits.burst,
            tokens_per_minute: limits.tokens_per_minute,
            max_concurrent_requests: limits.max_concurrent_requests,
            monthly_budget: money_view(limits.monthly_budget.as_ref()),
            created_at: time(k.created_at.as_ref()),
            expires_at: time(k.expires_at.as_ref()),
            revoked_at: time(k.revoked_at.as_ref()),
            last_used_at: time(k.last_used_at.as_ref()),
            previous_secret_expires_at: time(k.previous_secret_expires_at.as_ref()),
            key_id: k.key_id,
            tenant_id: k.tenant_id,
            name: k.name,
            scopes: k.scopes,
        }
    }
}

#[derive(Serialize)]
struct AuditView {
    id: i64,
    at: Option<String>,
    actor: String,
    action: String,
    target: String,
    before: serde_json::Value,
    after: serde_json::Value,
}

pub(crate) fn print_json<T: Serialize>(value: &T) -> anyhow::Result<()> {
    println!("{}", serde_json::to_string_pretty(value)?);
    Ok(())
}

/// One record as an object, several as an array.
fn print_json_records<T: Serialize>(views: &[T]) -> anyhow::Result<()> {
    match views {
        [one] => print_json(one),
        many => print_json(&many),
    }
}

pub(crate) fn print_table(header: &[&str], rows: Vec<Vec<String>>) {
    let mut table = Table::new();
    table.load_preset(comfy_table::presets::UTF8_BORDERS_ONLY);
    table.set_header(header.to_vec());
    for row in rows {
        table.add_row(row);
    }
    println!("{table}");
}

pub fn tenants(output: Output, tenants: Vec<pb::Tenant>) -> anyhow::Result<()> {
    let views: Vec<TenantView> = tenants.into_iter().map(TenantView::from).collect();
    if output == Output::Json {
        return print_json_records(&views);
    }
    let rows = views
        .into_iter()
        .map(|t| {
            vec![
                t.slug,
                t.display_name,
                t.status,
                t.price_plan,
                t.scheduling_weight.to_string(),
                match (t.requests_per_second, t.burst) {
                    (Some(rps), Some(burst)) => format!("{rps} (burst {burst})"),
                    (rps, _) => or_dash(rps),
                },
                or_dash(t.tokens_per_minute),
                or_dash(t.max_concurrent_requests),
                or_dash(t.monthly_token_quota),
                t.monthly_budget.as_ref().map_or_else(
                    || "-".to_owned(),
                    |m| format!("{} {}", m.amount, m.currency_code),
                ),
                t.cache_scope,
                t.id,
            ]
        })
        .collect();
    print_table(
        &[
            "SLUG",
            "NAME",
            "STATUS",
            "PLAN",
            "WEIGHT",
            "RPS",
            "TOKENS/MIN",
            "CONCURRENT",
            "MONTHLY QUOTA",
            "MONTHLY BUDGET",
            "CACHE",
            "ID",
        ],
        rows,
    );
    Ok(())
}

pub fn keys(output: Output, keys: Vec<ApiKey>) -> anyhow::Result<()> {
    let views: Vec<KeyView> = keys.into_iter().map(KeyView::from).collect();
    if output == Output::Json {
        return print_json_records(&views);
    }
    let rows = views
        .into_iter()
        .map(|k| {
            let limits = key_limits_text(&k);
            vec![
                k.key_id,
                k.name,
                k.scopes.join(" "),
                or_dash(k.created_at),
                or_dash(k.expires_at),
                or_dash(k.revoked_at),
                or_dash(k.last_used_at),
                limits,
            ]
        })
        .collect();
    print_table(
        &[
            "KEY ID",
            "NAME",
            "SCOPES",
            "CREATED",
            "EXPIRES",
            "REVOKED",
            "LAST USED",
            "KEY LIMITS",
        ],
        rows,
    );
    Ok(())
}

/// A key's own limits in a few words, "-" for none.
fn key_limits_text(k: &KeyView) -> String {
    let mut parts = Vec::new();
    if let Some(rps) = k.requests_per_second {
        parts.push(format!("{rps} rps (burst {})", k.burst.unwrap_or(1)));
    }
    if let Some(tpm) = k.tokens_per_minute {
        parts.push(format!("{tpm} tokens/min"));
    }
    if let Some(n) = k.max_concurrent_requests {
        parts.push(format!("{n} at once"));
    }
    if let Some(budget) = &k.monthly_budget {
        parts.push(format!("{} {}/month", budget.amount, budget.currency_code));
    }
    if parts.is_empty() {
        "-".to_owned()
    } else {
        parts.join(", ")
    }
}

/// A new key: the only time the secret is shown.
pub fn issued_key(output: Output, issued: CreateApiKeyResponse) -> anyhow::Result<()> {
    let key = KeyView::from(issued.key.unwrap_or_default());
    if output == Output::Json {
        #[derive(Serialize)]
        struct Issued {
            key: KeyView,
            secret: String,
        }
        return print_json(&Issued {
            key,
            secret: issued.secret,
        });
    }
    println!("API key {} for tenant {}", key.key_id, key.tenant_id);
    println!();
    println!("    {}", issued.secret);
    println!();
    println!("Store it now: it is shown only this once.");
    Ok(())
}

pub fn audit(output: Output, events: Vec<AuditEvent>) -> anyhow::Result<()> {
    let views: Vec<AuditView> = events
        .into_iter()
        .map(|e| AuditView {
            id: e.id,
            at: time(e.at.as_ref()),
            actor: e.actor,
            action: e.action,
            target: e.target,
            before: serde_json::from_str(&e.before_json).unwrap_or(serde_json::Value::Null),
            after: serde_json::from_str(&e.after_json).unwrap_or(serde_json::Value::Null),
        })
        .collect();
    if output == Output::Json {
        return print_json(&views);
    }
    let rows = views
        .into_iter()
        .map(|e| vec![e.id.to_string(), or_dash(e.at), e.actor, e.action, e.target])
        .collect();
    print_table(&["ID", "AT", "ACTOR", "ACTION", "TARGET"], rows);
    Ok(())
}

/// Money as a decimal in its currency's minor units ("1.23 USD").
fn money_text(money: Option<&pb::Money>) -> String {
    let Some(money) = money else {
        return "-".to_owned();
    };
    let decimals = Currency::find(&money.currency_code).map_or(2, |c| c.minor_units);
    format!(
        "{} {}",
        format_decimal(money.amount_nanos, decimals),
        money.currency_code
    )
}

#[derive(Serialize)]
struct MoneyView {
    currency_code: String,
    amount_nanos: i64,
    amount: String,
}

fn money_view(money: Option<&pb::Money>) -> Option<MoneyView> {
    let money = money?;
    let decimals = Currency::find(&money.currency_code).map_or(2, |c| c.minor_units);
    Some(MoneyView {
        currency_code: money.currency_code.clone(),
        amount_nanos: money.amount_nanos,
        amount: format_decimal(money.amount_nanos, decimals),
    })
}

#[derive(Serialize)]
struct PriceView {
    model: String,
    device_class: String,
    prompt_per_million_tokens: Option<MoneyView>,
    /// Absent: cache hits cost the prompt price.
    cached_prompt_per_million_tokens: Option<MoneyView>,
    completion_per_million_tokens: Option<MoneyView>,
    per_kwh: Option<MoneyView>,
    effective_from: Option<String>,
}

#[derive(Serialize)]
struct PlanView {
    name: String,
    currency_code: String,
    description: String,
    prices: Vec<PriceView>,
}

pub fn price_plans(output: Output, plans: Vec<pb::PricePlan>) -> anyhow::Result<()> {
    if output == Output::Json {
        let views: Vec<PlanView> = plans
            .into_iter()
            .map(|p| PlanView {
                prices: p
                    .prices
                    .iter()
                    .map(|price| PriceView {
                        model: price.model.clone(),
                        device_class: price.device_class.clone(),
                        prompt_per_million_tokens: money_view(
                            price.prompt_per_million_tokens.as_ref(),
                        ),
                        cached_prompt_per_million_tokens: money_view(
                            price.cached_prompt_per_million_tokens.as_ref(),
                        ),
                        completion_per_million_tokens: money_view(
                            price.completion_per_million_tokens.as_ref(),
                        ),
                        per_kwh: money_view(price.per_kwh.as_ref()),
                        effective_from: time(price.effective_from.as_ref()),
                    })
                    .collect(),
                name: p.name,
                currency_code: p.currency_code,
                description: p.description,
            })
            .collect();
        return print_json_records(&views);
    }
    let mut rows = Vec::new();
    for plan in &plans {
        for price in &plan.prices {
            rows.push(vec![
                plan.name.clone(),
                price.model.clone(),
                if price.device_class.is_empty() {
                    "(any)".to_owned()
                } else {
                    price.device_class.clone()
                },
                money_text(price.prompt_per_million_tokens.as_ref()),
                // No price of its own: cache hits cost the prompt price.
                money_text(
                    price
                        .cached_prompt_per_million_tokens
                        .as_ref()
                        .or(price.prompt_per_million_tokens.as_ref()),
                ),
                money_text(price.completion_per_million_tokens.as_ref()),
                money_text(price.per_kwh.as_ref()),
                or_dash(time(price.effective_from.as_ref())),
            ]);
        }
    }
    print_table(
        &[
            "PLAN",
            "MODEL",
            "DEVICE",
            "PROMPT /M",
            "CACHED PROMPT /M",
            "COMPLETION /M",
            "PER KWH",
            "FROM",
        ],
        rows,
    );
    for plan in plans {
        println!(
            "{} ({}): {}",
            plan.name, plan.currency_code, plan.description
        );
    }
    Ok(())
}

#[derive(Serialize)]
struct LineView {
    line_number: u32,
    model: String,
    device_class: String,
    kind: String,
    quantity: u64,
    unit_price: Option<MoneyView>,
    amount: Option<MoneyView>,
    adjusts_period: String,
    price_effective_from: Option<String>,
}

#[derive(Serialize)]
struct InvoiceView {
    id: String,
    tenant_id: String,
    tenant_slug: String,
    period: String,
    status: String,
    total: Option<MoneyView>,
    created_at: Option<String>,
    finalized_at: Option<String>,
    grace_ends_at: Option<String>,
    lines: Vec<LineView>,
}

fn kind_name(kind: pb::LineKind) -> String {
    kind.as_str_name()
        .trim_start_matches("LINE_KIND_")
        .to_lowercase()
}

impl From<pb::Invoice> for InvoiceView {
    fn from(i: pb::Invoice) -> InvoiceView {
        InvoiceView {
            status: i
                .status()
                .as_str_name()
                .trim_start_matches("INVOICE_STATUS_")
                .to_lowercase(),
            total: money_view(i.total.as_ref()),
            created_at: time(i.created_at.as_ref()),
            finalized_at: time(i.finalized_at.as_ref()),
            grace_ends_at: time(i.grace_ends_at.as_ref()),
            lines: i
                .lines
                .iter()
                .map(|l| LineView {
                    line_number: l.line_number,
                    model: l.model.clone(),
                    device_class: l.device_class.clone(),
                    kind: kind_name(l.kind()),
                    quantity: l.quantity,
                    unit_price: money_view(l.unit_price.as_ref()),
                    amount: money_view(l.amount.as_ref()),
                    adjusts_period: l.adjusts_period.clone(),
                    price_effective_from: time(l.price_effective_from.as_ref()),
                })
                .collect(),
            id: i.id,
            tenant_id: i.tenant_id,
            tenant_slug: i.tenant_slug,
            period: i.period,
        }
    }
}

#[derive(Serialize)]
struct BalanceView {
    tenant_id: String,
    period: String,
    spent: Option<MoneyView>,
    monthly_budget: Option<MoneyView>,
    remaining: Option<MoneyView>,
    reserved: Option<MoneyView>,
    is_available: bool,
}

/// An archived (or restored) month of raw usage.
pub fn usage_archive(output: Output, a: pb::UsageArchive) -> anyhow::Result<()> {
    if output == Output::Json {
        return print_json(&serde_json::json!({
            "period": a.period,
            "file": a.file,
            "sha256": a.sha256,
            "events": a.events,
            "prompt_tokens": a.prompt_tokens,
            "completion_tokens": a.completion_tokens,
        }));
    }
    print_table(
        &[
            "PERIOD",
            "EVENTS",
            "PROMPT TOKENS",
            "COMPLETION TOKENS",
            "FILE",
            "SHA-256",
        ],
        vec![vec![
            a.period.clone(),
            a.events.to_string(),
            a.prompt_tokens.to_string(),
            a.completion_tokens.to_string(),
            a.file.clone(),
            a.sha256.clone(),
        ]],
    );
    Ok(())
}

pub fn balance(output: Output, b: pb::Balance) -> anyhow::Result<()> {
    if output == Output::Json {
        return print_json(&BalanceView {
            spent: money_view(b.spent.as_ref()),
            monthly_budget: money_view(b.monthly_budget.as_ref()),
            remaining: money_view(b.remaining.as_ref()),
            reserved: money_view(b.reserved.as_ref()),
            tenant_id: b.tenant_id,
            period: b.period,
            is_available: b.is_available,
        });
    }
    print_table(
        &[
            "TENANT",
            "PERIOD",
            "SPENT",
            "BUDGET",
            "RESERVED",
            "REMAINING",
            "AVAILABLE",
        ],
        vec![vec![
            b.tenant_id.clone(),
            b.period.clone(),
            money_text(b.spent.as_ref()),
            money_text(b.monthly_budget.as_ref()),
            money_text(b.reserved.as_ref()),
            money_text(b.remaining.as_ref()),
            if b.is_available { "yes" } else { "no" }.to_owned(),
        ]],
    );
    Ok(())
}

pub fn invoices(output: Output, invoices: Vec<pb::Invoice>) -> anyhow::Result<()> {
    if output == Output::Json {
        let views: Vec<InvoiceView> = invoices.into_iter().map(InvoiceView::from).collect();
        return print_json(&views);
    }
    let rows = invoices
        .into_iter()
        .map(|i| {
            let total = money_text(i.total.as_ref());
            let view = InvoiceView::from(i);
            vec![
                view.tenant_slug,
                view.period,
                view.status,
                total,
                or_dash(view.finalized_at),
                view.id,
            ]
        })
        .collect();
    print_table(
        &["TENANT", "PERIOD", "STATUS", "TOTAL", "FINALIZED", "ID"],
        rows,
    );
    Ok(())
}

pub fn invoice(output: Output, invoice: pb::Invoice) -> anyhow::Result<()> {
    if output == Output::Json {
        return print_json(&InvoiceView::from(invoice));
    }
    println!(
        "Invoice {} for {} ({}), {}: {}",
        invoice.id,
        invoice.tenant_slug,
        invoice.tenant_id,
        invoice.period,
        invoice
            .status()
            .as_str_name()
            .trim_start_matches("INVOICE_STATUS_")
            .to_lowercase()
    );
    let rows = invoice
        .lines
        .iter()
        .map(|l| {
            vec![
                l.line_number.to_string(),
                l.model.clone(),
                l.device_class.clone(),
                kind_name(l.kind()),
                l.quantity.to_string(),
                money_text(l.unit_price.as_ref()),
                money_text(l.amount.as_ref()),
                if l.adjusts_period.is_empty() {
                    "-".to_owned()
                } else {
                    l.adjusts_period.clone()
                },
            ]
        })
        .collect();
    print_table(
        &[
            "#",
            "MODEL",
            "DEVICE",
            "KIND",
            "QUANTITY",
            "UNIT PRICE",
            "AMOUNT",
            "ADJUSTS",
        ],
        rows,
    );
    println!("Total: {}", money_text(invoice.total.as_ref()));
    Ok(())
}

#[derive(Serialize)]
struct UsageView {
    start: Option<String>,
    model: String,
    requests: u64,
    prompt_tokens: u64,
    cached_prompt_tokens: u64,
    completion_tokens: u64,
    device_time_us: u64,
    energy_mj: u64,
}

impl From<&pb::UsageBucket> for UsageView {
    fn from(b: &pb::UsageBucket) -> UsageView {
        UsageView {
            start: time(b.start_time.as_ref()),
            model: b.model.clone(),
            requests: b.requests,
            prompt_tokens: b.prompt_tokens,
            cached_prompt_tokens: b.cached_prompt_tokens,
            completion_tokens: b.completion_tokens,
            device_time_us: b.device_time_us,
            energy_mj: b.energy_mj,
        }
    }
}

pub fn usage(output: Output, usage: pb::GetUsageResponse) -> anyhow::Result<()> {
    let buckets: Vec<UsageView> = usage.buckets.iter().map(UsageView::from).collect();
    let total = usage.total.as_ref().map(UsageView::from);
    if output == Output::Json {
        #[derive(Serialize)]
        struct Usage {
            tenant_id: String,
            buckets: Vec<UsageView>,
            total: Option<UsageView>,
        }
        return print_json(&Usage {
            tenant_id: usage.tenant_id,
            buckets,
            total,
        });
    }
    let row = |label: Option<String>, v: UsageView| {
        vec![
            label.or(v.start).unwrap_or_default(),
            v.model,
            v.requests.to_string(),
            v.prompt_tokens.to_string(),
            v.cached_prompt_tokens.to_string(),
            v.completion_tokens.to_string(),
            v.device_time_us.to_string(),
            v.energy_mj.to_string(),
        ]
    };
    let mut rows: Vec<Vec<String>> = buckets.into_iter().map(|b| row(None, b)).collect();
    if let Some(total) = total {
        rows.push(row(Some("TOTAL".to_owned()), total));
    }
    print_table(
        &[
            "START",
            "MODEL",
            "REQUESTS",
            "PROMPT TOKENS",
            "CACHED PROMPT TOKENS",
            "COMPLETION TOKENS",
            "DEVICE TIME US",
            "ENERGY MJ",
        ],
        rows,
    );
    Ok(())
}
