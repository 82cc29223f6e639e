//! Rendering: a table for people, JSON (one document per command) for
//! scripts. Views are plain structs so both formats show the same fields.

use std::time::{Duration, UNIX_EPOCH};

use ascend_gateway::api::pb::v1::{self as pb, ApiKey, AuditEvent, CreateApiKeyResponse};
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

fn time(ts: Option<&prost_types::Timestamp>) -> Option<String> {
    let ts = ts?;
    let secs = u64::try_from(ts.seconds).ok()?;
    let at = UNIX_EPOCH + Duration::from_secs(secs);
    Some(humantime::format_rfc3339_seconds(at).to_string())
}

fn or_dash<T: ToString>(value: Option<T>) -> String {
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
    created_at: Option<String>,
    updated_at: Option<String>,
}

impl From<pb::Tenant> for TenantView {
    fn from(t: pb::Tenant) -> TenantView {
        let limits = t.limits.unwrap_or_default();
        TenantView {
            status: t
                .status()
                .as_str_name()
                .trim_start_matches("TENANT_STATUS_")
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
}

impl From<ApiKey> for KeyView {
    fn from(k: ApiKey) -> KeyView {
        KeyView {
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

fn print_json<T: Serialize>(value: &T) -> anyhow::Result<()> {
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

fn print_table(header: &[&str], rows: Vec<Vec<String>>) {
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
            vec![
                k.key_id,
                k.name,
                k.scopes.join(" "),
                or_dash(k.created_at),
                or_dash(k.expires_at),
                or_dash(k.revoked_at),
                or_dash(k.last_used_at),
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
        ],
        rows,
    );
    Ok(())
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
