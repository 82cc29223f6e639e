//! Events read off durable state rather than caused by one write: a month's
//! metered spend passing a budget threshold, a month's tokens reaching the
//! quota, a key about to expire. Every replica looks every
//! `webhooks.watch_interval`; an event's dedupe key (tenant, month,
//! threshold; key and expiry) makes it one event whoever writes it first,
//! and since the spend it is read from is durable, a crash between the
//! crossing and the event only delays the event to the next look.
//!
//! Budgets count what the budget counts: the month's draft lines exact to
//! the nano. Only tenants with an endpoint subscribed to the event are
//! looked at.

use serde::Serialize;
use tokio_util::sync::CancellationToken;

use super::{WebhookError, WebhookSettings};
use crate::billing::BillingService;
use crate::outbox::{self, EventType, MoneyField, NewEvent};
use crate::store::{Db, now_us};

#[derive(Serialize)]
struct ThresholdData {
    period: String,
    threshold_percent: u32,
    monthly_budget: MoneyField,
    spent: MoneyField,
}

#[derive(Serialize)]
struct QuotaData {
    period: String,
    monthly_token_quota: i64,
    tokens_used: u64,
}

#[derive(Serialize)]
struct ExpiringData {
    key_id: String,
    name: String,
    expires_at: i64,
}

#[derive(sqlx::FromRow)]
struct Watched {
    id: String,
    monthly_budget_nanos: Option<i64>,
    monthly_budget_currency: Option<String>,
    monthly_token_quota: Option<i64>,
    budget_alert_percents: Option<String>,
}

pub struct Watcher {
    db: Db,
    billing: BillingService,
    settings: WebhookSettings,
}

impl Watcher {
    pub fn new(db: Db, billing: BillingService, settings: WebhookSettings) -> Watcher {
        Watcher {
            db,
            billing,
            settings,
        }
    }

    /// Looks every `webhooks.watch_interval` until `stop`.
    pub async fn run(self, stop: CancellationToken) {
        let mut tick = tokio::time::interval(self.settings.watch_interval);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tokio::select! {
                _ = tick.tick() => {}
                () = stop.cancelled() => return,
            }
            if let Err(error) = self.look().await {
                tracing::warn!(%error, "webhook watcher: budgets, quotas or keys not checked; next look in one interval");
            }
        }
    }

    /// One look at every watched tenant and every expiring key.
    pub async fn look(&self) -> Result<(), WebhookError> {
        let tenants: Vec<Watched> = {
            let mut conn = self.db.pool().acquire().await?;
            sqlx::query_as(
                "SELECT t.id, t.monthly_budget_nanos, t.monthly_budget_currency, \
                 t.monthly_token_quota, t.budget_alert_percents FROM tenants t \
                 WHERE t.status = 'active' \
                 AND (t.monthly_budget_nanos IS NOT NULL OR t.monthly_token_quota IS NOT NULL) \
                 AND EXISTS (SELECT 1 FROM webhooks w WHERE w.deleted_at_us IS NULL \
                   AND (w.tenant_id IS NULL OR w.tenant_id = t.id) \
                   AND (w.events LIKE '% budget.threshold_reached %' \
                        OR w.events LIKE '% quota.exhausted %'))",
            )
            .fetch_all(&mut *conn)
            .await?
        };
        for tenant in tenants {
            if let (Some(budget), Some(currency)) =
                (tenant.monthly_budget_nanos, &tenant.monthly_budget_currency)
            {
                let thresholds = match &tenant.budget_alert_percents {
                    Some(text) => text
                        .split_whitespace()
                        .filter_map(|p| p.parse().ok())
                        .collect(),
                    None => self.settings.budget_thresholds.clone(),
                };
                self.budget(&tenant.id, budget, currency, thresholds)
                    .await?;
            }
            if let Some(quota) = tenant.monthly_token_quota {
                self.quota(&tenant.id, quota).await?;
            }
        }
        self.expiring_keys().await
    }

    async fn recorded(&self, keys: &[String]) -> Result<Vec<bool>, WebhookError> {
        let mut conn = self.db.pool().acquire().await?;
        let mut found = Vec::with_capacity(keys.len());
        for key in keys {
            let row: Option<(String,)> =
                sqlx::query_as("SELECT id FROM webhook_events WHERE dedupe_key = $1")
                    .bind(key)
                    .fetch_optional(&mut *conn)
                    .await?;
            found.push(row.is_some());
        }
        Ok(found)
    }

    async fn record<D: Serialize>(&self, event: NewEvent<D>) -> Result<(), WebhookError> {
        let mut tx = self.db.begin_write().await?;
        if let Some(id) = outbox::record(&mut tx, &event, None).await? {
            tracing::info!(event = %id, kind = event.event_type.as_str(), key = %event.dedupe_key, "webhook event recorded");
        }
        tx.commit().await?;
        Ok(())
    }

    /// Records each of `thresholds` (percentages) the month's spend reached.
    async fn budget(
        &self,
        tenant_id: &str,
        budget: i64,
        currency: &str,
        mut thresholds: Vec<u32>,
    ) -> Result<(), WebhookError> {
        let period = crate::calendar::Month::of_us(now_us()).to_string();
        thresholds.sort_unstable();
        let keys: Vec<String> = thresholds
            .iter()
            .map(|p| format!("budget.threshold_reached:{tenant_id}:{period}:{p}"))
            .collect();
        let recorded = self.recorded(&keys).await?;
        if recorded.iter().all(|r| *r) {
            return Ok(());
        }
        let spent = match self.billing.month_spend(tenant_id).await {
            Ok(spend) => spend.exact_nanos,
            Err(error) => {
                tracing::warn!(%error, tenant = tenant_id, "webhook watcher: the month's spend is not readable");
                return Ok(());
            }
        };
        for ((percent, key), done) in thresholds.iter().zip(keys).zip(recorded) {
            let reached = i128::from(spent) * 100 >= i128::from(*percent) * i128::from(budget);
            if done || !reached {
                continue;
            }
            self.record(NewEvent {
                event_type: EventType::BudgetThresholdReached,
                tenant_id: Some(tenant_id.to_owned()),
                dedupe_key: key,
                data: ThresholdData {
                    period: period.clone(),
                    threshold_percent: *percent,
                    monthly_budget: MoneyField::new(currency, budget),
                    spent: MoneyField::new(currency, spent),
                },
            })
            .await?;
        }
        Ok(())
    }

    async fn quota(&self, tenant_id: &str, quota: i64) -> Result<(), WebhookError> {
        let now = now_us();
        let period = crate::calendar::Month::of_us(now);
        let key = format!("quota.exhausted:{tenant_id}:{period}");
        if self.recorded(std::slice::from_ref(&key)).await?[0] {
            return Ok(());
        }
        let used = match crate::metering::query::usage(
            &self.db,
            tenant_id,
            period.start_us(),
            i64::MAX,
            None,
            crate::metering::Grouping::Total,
        )
        .await
        {
            Ok((_, total)) => total.prompt_tokens + total.completion_tokens,
            Err(error) => {
                tracing::warn!(%error, tenant = tenant_id, "webhook watcher: the month's usage is not readable");
                return Ok(());
            }
        };
        if used < u64::try_from(quota).unwrap_or(u64::MAX) {
            return Ok(());
        }
        self.record(NewEvent {
            event_type: EventType::QuotaExhausted,
            tenant_id: Some(tenant_id.to_owned()),
            dedupe_key: key,
            data: QuotaData {
                period: period.to_string(),
                monthly_token_quota: quota,
                tokens_used: used,
            },
        })
        .await
    }

    async fn expiring_keys(&self) -> Result<(), WebhookError> {
        let now = now_us();
        let notice = i64::try_from(self.settings.key_expiry_notice.as_micros()).unwrap_or(i64::MAX);
        let keys: Vec<(String, String, String, i64)> = {
            let mut conn = self.db.pool().acquire().await?;
            sqlx::query_as(
                "SELECT k.key_id, k.tenant_id, k.name, k.expires_at_us FROM api_keys k \
                 WHERE k.revoked_at_us IS NULL AND k.expires_at_us > $1 \
                 AND k.expires_at_us <= $2 \
                 AND EXISTS (SELECT 1 FROM webhooks w WHERE w.deleted_at_us IS NULL \
                   AND (w.tenant_id IS NULL OR w.tenant_id = k.tenant_id) \
                   AND w.events LIKE '% api_key.expiring %')",
            )
            .bind(now)
            .bind(now.saturating_add(notice))
            .fetch_all(&mut *conn)
            .await?
        };
        for (key_id, tenant_id, name, expires_at_us) in keys {
            self.record(NewEvent {
                event_type: EventType::ApiKeyExpiring,
                tenant_id: Some(tenant_id),
                dedupe_key: format!("api_key.expiring:{key_id}:{expires_at_us}"),
                data: ExpiringData {
                    key_id,
                    name,
                    expires_at: expires_at_us.div_euclid(1_000_000),
                },
            })
            .await?;
        }
        Ok(())
    }
}
