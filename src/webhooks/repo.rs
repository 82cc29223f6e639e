//! SQL for endpoints and deliveries, written once for both backends (see
//! `store`). The outbox's own writes are in `outbox`.

use sqlx::{AnyConnection, FromRow};

use super::WebhookError;
use crate::outbox::EventType;

/// A registered endpoint (its secret is read only to sign).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Webhook {
    pub id: String,
    /// `None`: every tenant's events.
    pub tenant_id: Option<String>,
    pub url: String,
    pub events: Vec<EventType>,
    pub created_at_us: i64,
}

#[derive(FromRow)]
struct WebhookRow {
    id: String,
    tenant_id: Option<String>,
    url: String,
    events: String,
    created_at_us: i64,
}

impl From<WebhookRow> for Webhook {
    fn from(row: WebhookRow) -> Webhook {
        Webhook {
            id: row.id,
            tenant_id: row.tenant_id,
            url: row.url,
            // Written from parsed types only; an unknown word is skipped.
            events: row
                .events
                .split_whitespace()
                .filter_map(EventType::parse)
                .collect(),
            created_at_us: row.created_at_us,
        }
    }
}

/// The events column: space-separated, with a space at each end, so that
/// `LIKE '% type %'` matches whole types only.
fn events_column(events: &[EventType]) -> String {
    let words: Vec<&str> = events.iter().map(|e| e.as_str()).collect();
    format!(" {} ", words.join(" "))
}

pub async fn insert(
    conn: &mut AnyConnection,
    webhook: &Webhook,
    secret: &str,
) -> Result<(), WebhookError> {
    sqlx::query(
        "INSERT INTO webhooks (id, tenant_id, url, events, signing_secret, created_at_us) \
         VALUES ($1, $2, $3, $4, $5, $6)",
    )
    .bind(&webhook.id)
    .bind(webhook.tenant_id.as_deref())
    .bind(&webhook.url)
    .bind(events_column(&webhook.events))
    .bind(secret)
    .bind(webhook.created_at_us)
    .execute(&mut *conn)
    .await?;
    Ok(())
}

const COLUMNS: &str = "id, tenant_id, url, events, created_at_us";

pub async fn get(conn: &mut AnyConnection, id: &str) -> Result<Option<Webhook>, WebhookError> {
    let sql = format!("SELECT {COLUMNS} FROM webhooks WHERE id = $1 AND deleted_at_us IS NULL");
    let row: Option<WebhookRow> = sqlx::query_as(&sql)
        .bind(id)
        .fetch_optional(&mut *conn)
        .await?;
    Ok(row.map(Webhook::from))
}

pub async fn list(
    conn: &mut AnyConnection,
    tenant_id: Option<&str>,
) -> Result<Vec<Webhook>, WebhookError> {
    let sql = format!(
        "SELECT {COLUMNS} FROM webhooks WHERE deleted_at_us IS NULL \
         AND ($1 = '' OR tenant_id = $1) ORDER BY id"
    );
    let rows: Vec<WebhookRow> = sqlx::query_as(&sql)
        .bind(tenant_id.unwrap_or(""))
        .fetch_all(&mut *conn)
        .await?;
    Ok(rows.into_iter().map(Webhook::from).collect())
}

/// Marks the endpoint deleted and gives up its pending deliveries; false
/// when there was no live endpoint `id`.
pub async fn delete(conn: &mut AnyConnection, id: &str, now_us: i64) -> Result<bool, WebhookError> {
    let deleted = sqlx::query(
        "UPDATE webhooks SET deleted_at_us = $2 WHERE id = $1 AND deleted_at_us IS NULL",
    )
    .bind(id)
    .bind(now_us)
    .execute(&mut *conn)
    .await?
    .rows_affected();
    sqlx::query(
        "UPDATE webhook_deliveries SET failed_at_us = $2, last_error = 'endpoint deleted' \
         WHERE webhook_id = $1 AND delivered_at_us IS NULL AND failed_at_us IS NULL",
    )
    .bind(id)
    .bind(now_us)
    .execute(&mut *conn)
    .await?;
    Ok(deleted == 1)
}

/// One delivery of one event to one endpoint, as the log shows it.
#[derive(Debug, Clone, PartialEq, Eq, FromRow)]
pub struct DeliveryRecord {
    pub event_id: String,
    pub event_type: String,
    pub attempts: i64,
    pub next_attempt_at_us: i64,
    pub delivered_at_us: Option<i64>,
    pub failed_at_us: Option<i64>,
    pub last_status: Option<i64>,
    pub last_error: String,
    pub event_created_at_us: i64,
}

pub async fn deliveries(
    conn: &mut AnyConnection,
    webhook_id: &str,
    limit: u32,
) -> Result<Vec<DeliveryRecord>, WebhookError> {
    Ok(sqlx::query_as(
        "SELECT d.event_id, e.type AS event_type, d.attempts, d.next_attempt_at_us, \
         d.delivered_at_us, d.failed_at_us, d.last_status, d.last_error, \
         e.created_at_us AS event_created_at_us \
         FROM webhook_deliveries d JOIN webhook_events e ON e.id = d.event_id \
         WHERE d.webhook_id = $1 ORDER BY d.id DESC LIMIT $2",
    )
    .bind(webhook_id)
    .bind(i64::from(limit))
    .fetch_all(&mut *conn)
    .await?)
}

/// A claimed delivery with what sending it needs.
#[derive(Debug, Clone, FromRow)]
pub struct Due {
    pub id: String,
    pub event_id: String,
    pub attempts: i64,
    pub url: String,
    pub signing_secret: String,
    /// 1 when the endpoint was deleted since the event (an integer: one
    /// type on both backends).
    pub webhook_deleted: i64,
    pub body: String,
    pub event_type: String,
    pub event_created_at_us: i64,
}

/// Claims up to `limit` due deliveries until `lease_until_us` (one more
/// attempt counted for each); another replica skips them until then.
pub async fn claim(
    conn: &mut AnyConnection,
    now_us: i64,
    lease_until_us: i64,
    limit: usize,
) -> Result<Vec<String>, WebhookError> {
    // The outer condition is checked again on each row as it is updated, so
    // two replicas racing for one row cannot both claim it.
    let rows: Vec<(String,)> = sqlx::query_as(
        "UPDATE webhook_deliveries SET locked_until_us = $1, attempts = attempts + 1 \
         WHERE id IN (SELECT id FROM webhook_deliveries \
             WHERE delivered_at_us IS NULL AND failed_at_us IS NULL \
               AND next_attempt_at_us <= $2 \
               AND (locked_until_us IS NULL OR locked_until_us < $2) \
             ORDER BY next_attempt_at_us LIMIT $3) \
         AND delivered_at_us IS NULL AND failed_at_us IS NULL \
         AND (locked_until_us IS NULL OR locked_until_us < $2) \
         RETURNING id",
    )
    .bind(lease_until_us)
    .bind(now_us)
    .bind(i64::try_from(limit).unwrap_or(i64::MAX))
    .fetch_all(&mut *conn)
    .await?;
    Ok(rows.into_iter().map(|(id,)| id).collect())
}

pub async fn due(conn: &mut AnyConnection, id: &str) -> Result<Option<Due>, WebhookError> {
    Ok(sqlx::query_as(
        "SELECT d.id, d.event_id, d.attempts, w.url, w.signing_secret, \
         CASE WHEN w.deleted_at_us IS NULL THEN 0 ELSE 1 END AS webhook_deleted, e.body, e.type AS event_type, \
         e.created_at_us AS event_created_at_us \
         FROM webhook_deliveries d JOIN webhooks w ON w.id = d.webhook_id \
         JOIN webhook_events e ON e.id = d.event_id WHERE d.id = $1",
    )
    .bind(id)
    .fetch_optional(&mut *conn)
    .await?)
}

/// What one attempt came to.
pub enum Outcome {
    Delivered {
        status: u16,
    },
    Retry {
        status: Option<u16>,
        error: String,
        at_us: i64,
    },
    GiveUp {
        status: Option<u16>,
        error: String,
    },
}

pub async fn finish(
    conn: &mut AnyConnection,
    id: &str,
    now_us: i64,
    outcome: &Outcome,
) -> Result<(), WebhookError> {
    let query = match outcome {
        Outcome::Delivered { status } => sqlx::query(
            "UPDATE webhook_deliveries SET delivered_at_us = $2, last_status = $3, \
             last_error = '', locked_until_us = NULL WHERE id = $1",
        )
        .bind(id)
        .bind(now_us)
        .bind(i64::from(*status)),
        Outcome::Retry {
            status,
            error,
            at_us,
        } => sqlx::query(
            "UPDATE webhook_deliveries SET next_attempt_at_us = $2, last_status = $3, \
             last_error = $4, locked_until_us = NULL WHERE id = $1",
        )
        .bind(id)
        .bind(*at_us)
        .bind(status.map(i64::from))
        .bind(error.clone()),
        Outcome::GiveUp { status, error } => sqlx::query(
            "UPDATE webhook_deliveries SET failed_at_us = $2, last_status = $3, \
             last_error = $4, locked_until_us = NULL WHERE id = $1",
        )
        .bind(id)
        .bind(now_us)
        .bind(status.map(i64::from))
        .bind(error.clone()),
    };
    query.execute(&mut *conn).await?;
    Ok(())
}
