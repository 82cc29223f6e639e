//! The durable outbox of events that webhooks deliver: what happened, as the
//! exact JSON body every delivery of it sends, with one delivery row per
//! subscribed endpoint, written in the caller's transaction.
//!
//! Whoever causes an event (tenancy suspending a tenant, billing finalizing
//! an invoice, the threshold watcher) calls [`record`] inside the
//! transaction of the change, so the event exists if and only if the change
//! does: a crash loses none. An event's `dedupe_key` is unique, so an event
//! that several replicas notice (a budget threshold of a month) is written
//! once. Knows endpoints only as rows to fan out to; knows nothing of HTTP,
//! signatures or retries (`webhooks`).

use serde::Serialize;
use sqlx::AnyConnection;

use crate::billing::money::{Currency, format_decimal};
use crate::store::now_us;

/// What an event is about. The wire names are the webhook `type`s.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum EventType {
    BudgetThresholdReached,
    QuotaExhausted,
    InvoiceFinalized,
    ApiKeyExpiring,
    TenantSuspended,
    /// Sent by `webhook test` to one endpoint only.
    WebhookTest,
}

impl EventType {
    /// The types an endpoint may subscribe to.
    pub const SUBSCRIBABLE: [EventType; 5] = [
        EventType::BudgetThresholdReached,
        EventType::QuotaExhausted,
        EventType::InvoiceFinalized,
        EventType::ApiKeyExpiring,
        EventType::TenantSuspended,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            EventType::BudgetThresholdReached => "budget.threshold_reached",
            EventType::QuotaExhausted => "quota.exhausted",
            EventType::InvoiceFinalized => "invoice.finalized",
            EventType::ApiKeyExpiring => "api_key.expiring",
            EventType::TenantSuspended => "tenant.suspended",
            EventType::WebhookTest => "webhook.test",
        }
    }

    pub fn parse(text: &str) -> Option<EventType> {
        Self::SUBSCRIBABLE
            .into_iter()
            .chain([EventType::WebhookTest])
            .find(|t| t.as_str() == text)
    }
}

/// Money in an event body: exact nanos and the decimal for people.
#[derive(Debug, Serialize)]
pub struct MoneyField {
    pub currency_code: String,
    pub amount_nanos: i64,
    pub amount: String,
}

impl MoneyField {
    pub fn new(currency_code: &str, amount_nanos: i64) -> MoneyField {
        let decimals = Currency::find(currency_code).map_or(2, |c| c.minor_units);
        MoneyField {
            currency_code: currency_code.to_owned(),
            amount_nanos,
            amount: format_decimal(amount_nanos, decimals),
        }
    }
}

/// An event to record.
#[derive(Debug, Clone)]
pub struct NewEvent<D> {
    pub event_type: EventType,
    /// The tenant it is about; `None` for none in particular.
    pub tenant_id: Option<String>,
    /// Two events with one key are one event.
    pub dedupe_key: String,
    /// The event's own fields, the body's `data`.
    pub data: D,
}

/// The body every delivery of an event sends.
#[derive(Serialize)]
struct Body<'a, D> {
    id: &'a str,
    #[serde(rename = "type")]
    event_type: &'static str,
    /// Unix seconds.
    created: i64,
    tenant_id: Option<&'a str>,
    data: &'a D,
}

#[derive(Debug, thiserror::Error)]
pub enum OutboxError {
    #[error("outbox: {0}")]
    Db(#[from] sqlx::Error),
    #[error("outbox: the event body does not serialize: {0}")]
    Body(#[from] serde_json::Error),
}

/// Writes the event and a delivery to every live endpoint subscribed to it
/// (the tenant's own and the operator's), in `conn`'s transaction; `only`
/// restricts the fan-out to one endpoint. Returns the event's id, or `None`
/// when an event with its `dedupe_key` already exists (then nothing is
/// written).
pub async fn record<D: Serialize>(
    conn: &mut AnyConnection,
    event: &NewEvent<D>,
    only: Option<&str>,
) -> Result<Option<String>, OutboxError> {
    let id = format!("evt_{}", uuid::Uuid::now_v7().simple());
    let now = now_us();
    let body = serde_json::to_string(&Body {
        id: &id,
        event_type: event.event_type.as_str(),
        created: now.div_euclid(1_000_000),
        tenant_id: event.tenant_id.as_deref(),
        data: &event.data,
    })?;
    let inserted = sqlx::query(
        "INSERT INTO webhook_events (id, type, tenant_id, dedupe_key, body, created_at_us) \
         VALUES ($1, $2, $3, $4, $5, $6) ON CONFLICT (dedupe_key) DO NOTHING",
    )
    .bind(&id)
    .bind(event.event_type.as_str())
    .bind(event.tenant_id.as_deref())
    .bind(&event.dedupe_key)
    .bind(&body)
    .bind(now)
    .execute(&mut *conn)
    .await?
    .rows_affected();
    if inserted == 0 {
        return Ok(None);
    }
    // Delivery ids: the event's and the endpoint's, so a fan-out repeated
    // by a retried transaction cannot make a second row.
    sqlx::query(
        "INSERT INTO webhook_deliveries (id, event_id, webhook_id, next_attempt_at_us) \
         SELECT $1 || ':' || w.id, $1, w.id, $2 FROM webhooks w \
         WHERE w.deleted_at_us IS NULL \
           AND (w.tenant_id IS NULL OR w.tenant_id = $3) \
           AND ($5 <> '' OR w.events LIKE $4) \
           AND ($5 = '' OR w.id = $5)",
    )
    .bind(&id)
    .bind(now)
    .bind(event.tenant_id.as_deref().unwrap_or(""))
    .bind(format!("% {} %", event.event_type.as_str()))
    .bind(only.unwrap_or(""))
    .execute(&mut *conn)
    .await?;
    Ok(Some(id))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_type_parses_back_from_its_wire_name() {
        for t in EventType::SUBSCRIBABLE
            .into_iter()
            .chain([EventType::WebhookTest])
        {
            assert_eq!(EventType::parse(t.as_str()), Some(t));
        }
        assert_eq!(EventType::parse("budget"), None);
        assert_eq!(EventType::parse(""), None);
    }
}
