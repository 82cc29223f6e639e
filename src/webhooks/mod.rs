//! Webhooks: endpoints operators register, and the delivery of the
//! outbox's events to them, signed, at least once, off the request path.
//!
//! - `target`: which URLs are accepted (http(s), a host, public addresses
//!   unless `webhooks.allow_private`), checked at creation and at every
//!   delivery.
//! - `signature`: the `Ascend-Signature` header and signing secrets.
//! - `delivery`: each replica claims due deliveries under a lease, posts
//!   them with bounded concurrency and a timeout, and retries non-2xx
//!   answers with exponential backoff for `webhooks.retry_for`.
//! - `watcher`: events read off the metered usage and the keys (budget
//!   thresholds, an exhausted token quota, a key about to expire), written
//!   once per dedupe key whichever replica sees them first.
//! - `repo`: the SQL.
//!
//! Knows events as stored bodies (`outbox` writes them) and tenants as ids;
//! knows nothing of gRPC.

pub mod delivery;
mod repo;
pub mod signature;
pub mod target;
pub mod watcher;

use std::time::Duration;

use serde::{Deserialize, Serialize};

use crate::error::{Classified, ErrorKind};
use crate::outbox::{self, EventType, NewEvent};
use crate::store::{Db, now_us};
pub use repo::{DeliveryRecord, Webhook};
use target::Target;

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct WebhookSettings {
    /// Allow endpoints on loopback, private and link-local addresses
    /// (environment `ASCEND_WEBHOOKS_ALLOW_PRIVATE`). Off: a tenant's
    /// operator cannot aim the gateway at internal services.
    pub allow_private: bool,
    /// How long one delivery may take, connecting included.
    #[serde(with = "humantime_serde")]
    pub timeout: Duration,
    /// Deliveries in flight at once on one replica.
    pub max_in_flight: usize,
    /// How long an event is retried after it was written.
    #[serde(with = "humantime_serde")]
    pub retry_for: Duration,
    /// The first retry's delay; each next one doubles it, up to an hour.
    #[serde(with = "humantime_serde")]
    pub retry_base: Duration,
    /// How often a replica looks for due deliveries.
    #[serde(with = "humantime_serde")]
    pub poll_interval: Duration,
    /// How often a replica checks budgets, quotas and expiring keys.
    #[serde(with = "humantime_serde")]
    pub watch_interval: Duration,
    /// Percentages of a monthly budget that send `budget.threshold_reached`.
    pub budget_thresholds: Vec<u32>,
    /// How long before a key expires `api_key.expiring` is sent.
    #[serde(with = "humantime_serde")]
    pub key_expiry_notice: Duration,
}

impl Default for WebhookSettings {
    fn default() -> Self {
        WebhookSettings {
            allow_private: false,
            timeout: Duration::from_secs(10),
            max_in_flight: 16,
            retry_for: Duration::from_secs(24 * 3600),
            retry_base: Duration::from_secs(10),
            poll_interval: Duration::from_secs(1),
            watch_interval: Duration::from_secs(30),
            budget_thresholds: vec![50, 80, 100],
            key_expiry_notice: Duration::from_secs(7 * 86_400),
        }
    }
}

impl WebhookSettings {
    /// The problem with these settings, naming the key, if any.
    pub fn problem(&self) -> Option<(&'static str, String)> {
        let positive = [
            ("webhooks.timeout", self.timeout),
            ("webhooks.retry_base", self.retry_base),
            ("webhooks.poll_interval", self.poll_interval),
            ("webhooks.watch_interval", self.watch_interval),
        ];
        if let Some((key, _)) = positive.iter().find(|(_, d)| d.is_zero()) {
            return Some((key, "must be positive, e.g. \"10s\"".to_owned()));
        }
        if self.max_in_flight == 0 {
            return Some(("webhooks.max_in_flight", "at least 1".to_owned()));
        }
        let mut seen = std::collections::HashSet::new();
        for &p in &self.budget_thresholds {
            if !(1..=100).contains(&p) || !seen.insert(p) {
                return Some((
                    "webhooks.budget_thresholds",
                    format!("{p}: distinct percentages from 1 to 100, e.g. [50, 80, 100]"),
                ));
            }
        }
        None
    }
}

#[derive(Debug, thiserror::Error)]
pub enum WebhookError {
    #[error("invalid `{field}`: {reason}")]
    Invalid { field: &'static str, reason: String },
    #[error("webhook {0} not found")]
    NotFound(String),
    #[error("cannot make a signing secret: {0}")]
    Random(String),
    #[error("TLS for webhook deliveries: {0}")]
    Tls(String),
    #[error("webhook storage: {0}")]
    Db(#[from] sqlx::Error),
    #[error(transparent)]
    Outbox(#[from] outbox::OutboxError),
}

impl Classified for WebhookError {
    fn kind(&self) -> ErrorKind {
        match self {
            WebhookError::Invalid { .. } => ErrorKind::InvalidArgument,
            WebhookError::NotFound(_) => ErrorKind::NotFound,
            WebhookError::Random(_) | WebhookError::Tls(_) => ErrorKind::Internal,
            WebhookError::Db(_) | WebhookError::Outbox(_) => ErrorKind::Unavailable,
        }
    }

    fn field(&self) -> Option<&str> {
        match self {
            WebhookError::Invalid { field, .. } => Some(field),
            _ => None,
        }
    }
}

/// Registering, listing and testing endpoints. Cheap to clone.
#[derive(Clone)]
pub struct WebhookService {
    db: Db,
    allow_private: bool,
}

/// The most deliveries one listing returns.
pub const MAX_DELIVERIES_LISTED: u32 = 1000;

impl WebhookService {
    pub fn new(db: Db, settings: &WebhookSettings) -> WebhookService {
        WebhookService {
            db,
            allow_private: settings.allow_private,
        }
    }

    /// A new endpoint for `events` of `tenant_id` (`None`: every tenant's),
    /// and its signing secret, returned this once.
    pub async fn create(
        &self,
        tenant_id: Option<&str>,
        url: &str,
        events: &[String],
    ) -> Result<(Webhook, String), WebhookError> {
        let events = parse_events(events)?;
        let target = Target::parse(url)?;
        target.resolve(self.allow_private).await?;
        let secret = signature::new_secret().map_err(|e| WebhookError::Random(e.to_string()))?;
        let webhook = Webhook {
            id: format!("wh_{}", uuid::Uuid::now_v7().simple()),
            tenant_id: tenant_id.map(str::to_owned),
            url: url.to_owned(),
            events,
            created_at_us: now_us(),
        };
        let mut conn = self.db.pool().acquire().await?;
        repo::insert(&mut conn, &webhook, &secret).await?;
        Ok((webhook, secret))
    }

    /// Live endpoints, of one tenant (its own only) or all.
    pub async fn list(&self, tenant_id: Option<&str>) -> Result<Vec<Webhook>, WebhookError> {
        let mut conn = self.db.pool().acquire().await?;
        repo::list(&mut conn, tenant_id).await
    }

    /// Deletes an endpoint; its pending deliveries are given up.
    pub async fn delete(&self, id: &str) -> Result<(), WebhookError> {
        let mut tx = self.db.begin_write().await?;
        if !repo::delete(&mut tx, id, now_us()).await? {
            return Err(WebhookError::NotFound(id.to_owned()));
        }
        tx.commit().await?;
        Ok(())
    }

    /// Queues a `webhook.test` event to this endpoint alone; its id.
    pub async fn test(&self, id: &str) -> Result<String, WebhookError> {
        let mut tx = self.db.begin_write().await?;
        let webhook = repo::get(&mut tx, id)
            .await?
            .ok_or_else(|| WebhookError::NotFound(id.to_owned()))?;
        let event = NewEvent {
            event_type: EventType::WebhookTest,
            tenant_id: webhook.tenant_id.clone(),
            dedupe_key: format!("webhook.test:{}", uuid::Uuid::new_v4().simple()),
            data: serde_json::json!({ "webhook_id": webhook.id }),
        };
        let event_id = outbox::record(&mut tx, &event, Some(&webhook.id))
            .await?
            .ok_or_else(|| WebhookError::NotFound(id.to_owned()))?;
        tx.commit().await?;
        Ok(event_id)
    }

    /// The endpoint's deliveries, newest first, at most `limit`.
    pub async fn deliveries(
        &self,
        id: &str,
        limit: u32,
    ) -> Result<Vec<DeliveryRecord>, WebhookError> {
        if limit > MAX_DELIVERIES_LISTED {
            return Err(WebhookError::Invalid {
                field: "page_size",
                reason: format!("at most {MAX_DELIVERIES_LISTED}"),
            });
        }
        let mut conn = self.db.pool().acquire().await?;
        if repo::get(&mut conn, id).await?.is_none() {
            return Err(WebhookError::NotFound(id.to_owned()));
        }
        repo::deliveries(&mut conn, id, if limit == 0 { 100 } else { limit }).await
    }
}

/// The subscribed types, known and at least one.
fn parse_events(events: &[String]) -> Result<Vec<EventType>, WebhookError> {
    let known = || {
        EventType::SUBSCRIBABLE
            .iter()
            .map(|t| t.as_str())
            .collect::<Vec<_>>()
            .join(", ")
    };
    if events.is_empty() {
        return Err(WebhookError::Invalid {
            field: "events",
            reason: format!("at least one of {}", known()),
        });
    }
    let mut parsed = Vec::new();
    for text in events {
        let event = EventType::parse(text)
            .filter(|t| *t != EventType::WebhookTest)
            .ok_or_else(|| WebhookError::Invalid {
                field: "events",
                reason: format!("unknown event {text:?}; known: {}", known()),
            })?;
        if !parsed.contains(&event) {
            parsed.push(event);
        }
    }
    Ok(parsed)
}
