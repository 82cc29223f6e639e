//! In-process limits: the embedded default, and the fallback when Redis is
//! unreachable under `fail_open`.
//!
//! One mutex guards every tenant's state so that a request is checked
//! against all its limits and admitted (or not) as one step: a request
//! refused by one limit consumes nothing from the others. Rates use
//! governor's GCRA limiters, one per tenant, rebuilt when the tenant's rate
//! changes; idle tenants are swept so memory stays bounded. Token buckets and
//! quota counters are plain arithmetic because they need refunds, which
//! governor does not offer.

use std::collections::HashMap;
use std::num::NonZeroU32;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use governor::clock::{Clock, DefaultClock};
use governor::middleware::StateInformationMiddleware;
use governor::{Quota, RateLimiter};

use super::error::{LimitError, LimitKind};
use super::rate::Gcra;
use super::{BudgetCounters, Cost, Headroom, MonthToDate, RateState, TokenState, Used};
use crate::calendar;
use crate::tenancy::Limits;

type TenantRateLimiter = RateLimiter<
    governor::state::NotKeyed,
    governor::state::InMemoryState,
    DefaultClock,
    StateInformationMiddleware,
>;

/// Tenants idle this long lose their rate and bucket state.
const IDLE_EVICTION: Duration = Duration::from_secs(600);
/// Sweep idle tenants once per this many admissions.
const SWEEP_EVERY: u64 = 4096;

struct Bucket {
    level: f64,
    at: Instant,
}

#[derive(Default)]
struct QuotaState {
    month: String,
    used: u64,
    reserved: u64,
    /// Nanos settled and reserved against the monthly budget.
    spent: u64,
    spend_reserved: u64,
}

#[derive(Default)]
struct TenantState {
    rate: Option<((u64, u32), TenantRateLimiter)>,
    in_flight: u32,
    bucket: Option<Bucket>,
    quota: QuotaState,
    last_seen: Option<Instant>,
}

#[derive(Default)]
pub struct LocalLimits {
    tenants: Mutex<HashMap<String, TenantState>>,
    admissions: std::sync::atomic::AtomicU64,
}

/// What an admission reserved, to be returned or settled.
#[derive(Debug, Clone)]
pub struct LocalGrant {
    pub concurrency: bool,
    pub bucket_tokens: u64,
    pub quota_tokens: u64,
    /// Nanos reserved against the monthly budget.
    pub budget_nanos: u64,
    pub month: String,
    pub tokens_per_minute: u64,
}

fn refill(bucket: &mut Bucket, capacity: f64, now: Instant) {
    let elapsed = now.saturating_duration_since(bucket.at).as_secs_f64();
    bucket.level = (bucket.level + elapsed * capacity / 60.0).min(capacity);
    bucket.at = now;
}

impl LocalLimits {
    /// Raises the tenant's `month` usage to at least `used` (tokens, and
    /// spend when given, that the metered usage already holds), so a
    /// restarted node does not hand out the month's quota or budget again.
    /// Idempotent.
    pub fn seed_quota(&self, tenant_id: &str, month: &str, used: MonthToDate) {
        let mut tenants = self.tenants.lock().unwrap_or_else(|e| e.into_inner());
        let state = tenants.entry(tenant_id.to_owned()).or_default();
        if state.quota.month != month {
            state.quota = QuotaState {
                month: month.to_owned(),
                ..QuotaState::default()
            };
        }
        state.quota.used = state.quota.used.max(used.tokens);
        if let Some(spend) = used.spend_nanos {
            state.quota.spent = state.quota.spent.max(spend);
        }
    }

    /// The tenant's budget counters for `month` on this node.
    pub fn budget_counters(&self, tenant_id: &str, month: &str) -> BudgetCounters {
        let tenants = self.tenants.lock().unwrap_or_else(|e| e.into_inner());
        match tenants.get(tenant_id) {
            Some(state) if state.quota.month == month => BudgetCounters {
                spent_nanos: state.quota.spent,
                reserved_nanos: state.quota.spend_reserved,
            },
            _ => BudgetCounters::default(),
        }
    }

    pub fn admit(
        &self,
        tenant_id: &str,
        limits: &Limits,
        cost: Cost,
        now_unix_secs: i64,
    ) -> Result<(LocalGrant, Headroom), LimitError> {
        let now = Instant::now();
        let mut tenants = self.tenants.lock().unwrap_or_else(|e| e.into_inner());
        let count = self
            .admissions
            .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        if count % SWEEP_EVERY == SWEEP_EVERY - 1 {
            tenants.retain(|_, t| {
                t.in_flight > 0
                    || t.quota.reserved > 0
                    || t.quota.used > 0
                    || t.quota.spent > 0
                    || t.quota.spend_reserved > 0
                    || t.last_seen
                        .is_some_and(|at| now.duration_since(at) < IDLE_EVICTION)
            });
        }
        // Look up before inserting: the hot path allocates no key.
        if !tenants.contains_key(tenant_id) {
            tenants.insert(tenant_id.to_owned(), TenantState::default());
        }
        let Some(state) = tenants.get_mut(tenant_id) else {
            return Err(LimitError::Unavailable("limit state vanished".to_owned()));
        };
        state.last_seen = Some(now);

        if let Some(max) = limits.max_concurrent_requests
            && state.in_flight >= max
        {
            return Err(LimitError::Exceeded {
                kind: LimitKind::Concurrency,
                retry_after: Duration::from_secs(1),
            });
        }

        let tpm = limits.tokens_per_minute.filter(|_| cost.tokens > 0);
        if let Some(tpm) = tpm {
            if cost.tokens > tpm {
                return Err(LimitError::TooLarge {
                    kind: LimitKind::TokensPerMinute,
                    needed: cost.tokens,
                    limit: tpm,
                });
            }
            let capacity = tpm as f64;
            let bucket = state.bucket.get_or_insert(Bucket {
                level: capacity,
                at: now,
            });
            refill(bucket, capacity, now);
            let needed = cost.tokens as f64;
            if bucket.level < needed {
                let wait = (needed - bucket.level) * 60.0 / capacity;
                return Err(LimitError::Exceeded {
                    kind: LimitKind::TokensPerMinute,
                    retry_after: Duration::from_secs_f64(wait),
                });
            }
        }

        let quota = limits.monthly_token_quota.filter(|_| cost.tokens > 0);
        let budget = limits
            .monthly_budget
            .as_ref()
            .map(|b| b.amount_nanos)
            .filter(|_| cost.tokens > 0);
        let month = if quota.is_some() || budget.is_some() {
            calendar::month_key(now_unix_secs)
        } else {
            String::new()
        };
        if (quota.is_some() || budget.is_some()) && state.quota.month != month {
            state.quota = QuotaState {
                month: month.clone(),
                ..QuotaState::default()
            };
        }
        if let Some(quota) = quota {
            let committed = state.quota.used + state.quota.reserved;
            if committed.saturating_add(cost.tokens) > quota {
                let until_reset = calendar::secs_until_month_end(now_unix_secs);
                return Err(LimitError::Exceeded {
                    kind: LimitKind::MonthlyQuota,
                    retry_after: Duration::from_secs(u64::try_from(until_reset).unwrap_or(1)),
                });
            }
        }
        if let Some(budget) = budget {
            let committed = state.quota.spent.saturating_add(state.quota.spend_reserved);
            if committed.saturating_add(cost.spend_nanos) > budget {
                let until_reset = calendar::secs_until_month_end(now_unix_secs);
                return Err(LimitError::Exceeded {
                    kind: LimitKind::MonthlyBudget,
                    retry_after: Duration::from_secs(u64::try_from(until_reset).unwrap_or(1)),
                });
            }
        }

        // The rate check goes last: it is the only one that consumes by itself.
        let mut rate_state = None;
        if let Some(gcra) = Gcra::of(limits) {
            let (interval, burst) = (gcra.interval, gcra.burst);
            let wanted = (
                u64::try_from(interval.as_nanos()).unwrap_or(u64::MAX),
                burst,
            );
            let rebuild = state.rate.as_ref().is_none_or(|(have, _)| *have != wanted);
            if rebuild {
                let burst_nz = NonZeroU32::new(burst).unwrap_or(NonZeroU32::MIN);
                // `Gcra` keeps the interval at least 1 ns, so a period exists.
                let quota = Quota::with_period(interval)
                    .unwrap_or_else(|| Quota::per_second(NonZeroU32::MAX))
                    .allow_burst(burst_nz);
                let limiter =
                    RateLimiter::direct(quota).with_middleware::<StateInformationMiddleware>();
                state.rate = Some((wanted, limiter));
            }
            if let Some((_, limiter)) = &state.rate {
                match limiter.check() {
                    Ok(snapshot) => {
                        rate_state = Some(RateState {
                            limit: burst,
                            remaining: snapshot.remaining_burst_capacity(),
                            window: gcra.window(),
                        });
                    }
                    Err(not_until) => {
                        let wait = not_until.wait_time_from(DefaultClock::default().now());
                        return Err(LimitError::Exceeded {
                            kind: LimitKind::Requests,
                            retry_after: wait,
                        });
                    }
                }
            }
        }

        let concurrency = limits.max_concurrent_requests.is_some();
        if concurrency {
            state.in_flight += 1;
        }
        let mut tokens = None;
        if let (Some(tpm), Some(bucket)) = (tpm, state.bucket.as_mut()) {
            bucket.level -= cost.tokens as f64;
            tokens = Some(TokenState {
                limit: tpm,
                remaining: bucket.level.max(0.0) as u64,
            });
        }
        if quota.is_some() {
            state.quota.reserved += cost.tokens;
        }
        if budget.is_some() {
            state.quota.spend_reserved += cost.spend_nanos;
        }
        Ok((
            LocalGrant {
                concurrency,
                bucket_tokens: if tpm.is_some() { cost.tokens } else { 0 },
                quota_tokens: if quota.is_some() { cost.tokens } else { 0 },
                budget_nanos: if budget.is_some() {
                    cost.spend_nanos
                } else {
                    0
                },
                month,
                tokens_per_minute: tpm.unwrap_or(0),
            },
            Headroom {
                requests: rate_state,
                tokens,
            },
        ))
    }

    /// Returns the concurrency slot, refunds unused bucket tokens, and turns
    /// the quota and budget reservations into usage (spend exactly, even
    /// past its reservation, so the counter never falls behind the cost).
    pub fn settle(&self, tenant_id: &str, grant: &LocalGrant, used: Used) {
        let used_tokens = used.tokens;
        let mut tenants = self.tenants.lock().unwrap_or_else(|e| e.into_inner());
        let Some(state) = tenants.get_mut(tenant_id) else {
            return;
        };
        if grant.concurrency {
            state.in_flight = state.in_flight.saturating_sub(1);
        }
        if grant.bucket_tokens > 0
            && let Some(bucket) = state.bucket.as_mut()
        {
            let capacity = grant.tokens_per_minute as f64;
            refill(bucket, capacity, Instant::now());
            let unused = grant.bucket_tokens.saturating_sub(used_tokens) as f64;
            bucket.level = (bucket.level + unused).min(capacity);
        }
        if grant.quota_tokens > 0 && state.quota.month == grant.month {
            state.quota.reserved = state.quota.reserved.saturating_sub(grant.quota_tokens);
            state.quota.used += used_tokens.min(grant.quota_tokens);
        }
        if state.quota.month == grant.month && (grant.budget_nanos > 0 || used.spend_nanos > 0) {
            state.quota.spend_reserved = state
                .quota
                .spend_reserved
                .saturating_sub(grant.budget_nanos);
            state.quota.spent = state.quota.spent.saturating_add(used.spend_nanos);
        }
    }
}

#[cfg(test)]
mod tests {
    use proptest::prelude::*;

    use super::*;

    /// Rates from every corner of f64: tiny, huge, negative, subnormal, NaN.
    fn any_rate() -> impl Strategy<Value = Option<f64>> {
        prop_oneof![
            Just(None),
            any::<f64>().prop_map(Some),
            (-330i32..330).prop_map(|e| Some(10f64.powi(e))),
            (0.0f64..10.0).prop_map(Some),
        ]
    }

    fn any_limits() -> impl Strategy<Value = Limits> {
        (
            any_rate(),
            proptest::option::of(any::<u32>()),
            proptest::option::of(any::<u64>()),
            proptest::option::of(any::<u32>()),
            proptest::option::of(any::<u64>()),
        )
            .prop_map(|(rps, burst, tpm, concurrent, quota)| Limits {
                requests_per_second: rps,
                burst,
                tokens_per_minute: tpm,
                max_concurrent_requests: concurrent,
                monthly_token_quota: quota,
                monthly_budget: None,
            })
    }

    proptest! {
        /// No limit value panics the limiter, accepted by tenancy or not
        /// (a row written before a check existed is still served).
        #[test]
        fn no_limit_value_panics(limits in any_limits(), tokens in 0u64..1_000_000) {
            let local = LocalLimits::default();
            for _ in 0..3 {
                if let Ok((grant, headroom)) = local.admit("t", &limits, Cost { tokens, spend_nanos: tokens }, 1_800_000_000) {
                    if let Some(rate) = headroom.requests {
                        prop_assert!(rate.remaining <= rate.limit);
                    }
                    local.settle("t", &grant, Used { tokens: tokens / 2, spend_nanos: tokens / 2 });
                }
            }
            let gcra = super::super::rate::Gcra::of(&limits);
            if let Some(gcra) = gcra {
                // What the Redis script is sent stays exact in a Lua double.
                let window_us = u128::from(gcra.interval_us()) * u128::from(gcra.burst);
                prop_assert!(window_us < 1u128 << 53);
            }
            if crate::tenancy::validate_limits(&limits).is_ok()
                && let Some(rps) = limits.requests_per_second
            {
                // An accepted rate is served as given, not clamped.
                let gcra = gcra.expect("an accepted rate has a GCRA");
                let asked = 1e9 / rps;
                prop_assert!((gcra.interval.as_nanos() as f64 - asked).abs() <= 1.0 + asked * 1e-12);
                prop_assert_eq!(gcra.burst, limits.burst.unwrap_or(1));
            }
        }
    }
}
