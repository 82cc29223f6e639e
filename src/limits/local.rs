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
use crate::calendar::{self, Month};
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
    /// The month the counters hold; `None` before any monthly limit.
    month: Option<Month>,
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
    /// The month reserved against; `None` without a monthly limit.
    pub month: Option<Month>,
    pub tokens_per_minute: u64,
}

fn refill(bucket: &mut Bucket, capacity: f64, now: Instant) {
    let elapsed = now.saturating_duration_since(bucket.at).as_secs_f64();
    bucket.level = (bucket.level + elapsed * capacity / 60.0).min(capacity);
    bucket.at = now;
}

/// What `TenantState::check` found the request may reserve.
struct Checked {
    concurrency: bool,
    tokens_per_minute: Option<u64>,
    quota: bool,
    budget: bool,
    month: Option<Month>,
    rate: Option<RateState>,
}

impl TenantState {
    /// Whether the sweep must keep this tenant: it holds something, or was
    /// seen lately.
    fn is_live(&self, now: Instant) -> bool {
        self.in_flight > 0
            || self.quota.reserved > 0
            || self.quota.used > 0
            || self.quota.spent > 0
            || self.quota.spend_reserved > 0
            || self
                .last_seen
                .is_some_and(|at| now.duration_since(at) < IDLE_EVICTION)
    }

    /// Every limit in turn; the first refusal is the answer. Consumes
    /// nothing except the rate limiter's cell, which is checked last
    /// because it is the only check that consumes by itself.
    fn check(
        &mut self,
        limits: &Limits,
        cost: Cost,
        now: Instant,
        now_unix_secs: i64,
    ) -> Result<Checked, LimitError> {
        if let Some(max) = limits.max_concurrent_requests
            && self.in_flight >= max
        {
            return Err(LimitError::Exceeded {
                kind: LimitKind::Concurrency,
                retry_after: Duration::from_secs(1),
            });
        }
        let tokens_per_minute = limits.tokens_per_minute.filter(|_| cost.tokens > 0);
        if let Some(tpm) = tokens_per_minute {
            self.check_token_bucket(tpm, cost.tokens, now)?;
        }
        let quota = limits.monthly_token_quota.filter(|_| cost.tokens > 0);
        let budget = limits
            .monthly_budget
            .as_ref()
            .map(|b| b.amount_nanos)
            .filter(|_| cost.tokens > 0);
        let month = (quota.is_some() || budget.is_some()).then(|| {
            let month = Month::of_unix_secs(now_unix_secs);
            self.quota.roll_to(month);
            month
        });
        self.check_monthly(quota, budget, cost, now_unix_secs)?;
        let rate = self.check_rate(limits)?;
        Ok(Checked {
            concurrency: limits.max_concurrent_requests.is_some(),
            tokens_per_minute,
            quota: quota.is_some(),
            budget: budget.is_some(),
            month,
            rate,
        })
    }

    fn check_token_bucket(
        &mut self,
        tpm: u64,
        tokens: u64,
        now: Instant,
    ) -> Result<(), LimitError> {
        if tokens > tpm {
            return Err(LimitError::TooLarge {
                kind: LimitKind::TokensPerMinute,
                needed: tokens,
                limit: tpm,
            });
        }
        let capacity = tpm as f64;
        let bucket = self.bucket.get_or_insert(Bucket {
            level: capacity,
            at: now,
        });
        refill(bucket, capacity, now);
        let needed = tokens as f64;
        if bucket.level < needed {
            let wait = (needed - bucket.level) * 60.0 / capacity;
            return Err(LimitError::Exceeded {
                kind: LimitKind::TokensPerMinute,
                retry_after: Duration::from_secs_f64(wait),
            });
        }
        Ok(())
    }

    /// The monthly quota and budget, against this month's counters.
    fn check_monthly(
        &self,
        quota: Option<u64>,
        budget: Option<u64>,
        cost: Cost,
        now_unix_secs: i64,
    ) -> Result<(), LimitError> {
        let until_reset = || {
            Duration::from_secs(
                u64::try_from(calendar::secs_until_month_end(now_unix_secs)).unwrap_or(1),
            )
        };
        if let Some(quota) = quota {
            let committed = self.quota.used + self.quota.reserved;
            if committed.saturating_add(cost.tokens) > quota {
                return Err(LimitError::Exceeded {
                    kind: LimitKind::MonthlyQuota,
                    retry_after: until_reset(),
                });
            }
        }
        if let Some(budget) = budget {
            let committed = self.quota.spent.saturating_add(self.quota.spend_reserved);
            if committed.saturating_add(cost.spend_nanos) > budget {
                return Err(LimitError::Exceeded {
                    kind: LimitKind::MonthlyBudget,
                    retry_after: until_reset(),
                });
            }
        }
        Ok(())
    }

    /// The request rate, on a GCRA limiter rebuilt when the tenant's rate
    /// changed. Takes a cell when it admits.
    fn check_rate(&mut self, limits: &Limits) -> Result<Option<RateState>, LimitError> {
        let Some(gcra) = Gcra::of(limits) else {
            return Ok(None);
        };
        let (interval, burst) = (gcra.interval, gcra.burst);
        let wanted = (
            u64::try_from(interval.as_nanos()).unwrap_or(u64::MAX),
            burst,
        );
        let limiter = match &self.rate {
            Some((have, limiter)) if *have == wanted => limiter,
            _ => {
                let burst_nz = NonZeroU32::new(burst).unwrap_or(NonZeroU32::MIN);
                // `Gcra` keeps the interval at least 1 ns, so a period exists.
                let quota = Quota::with_period(interval)
                    .unwrap_or_else(|| Quota::per_second(NonZeroU32::MAX))
                    .allow_burst(burst_nz);
                let limiter =
                    RateLimiter::direct(quota).with_middleware::<StateInformationMiddleware>();
                &self.rate.insert((wanted, limiter)).1
            }
        };
        match limiter.check() {
            Ok(snapshot) => Ok(Some(RateState {
                limit: burst,
                remaining: snapshot.remaining_burst_capacity(),
                window: gcra.window(),
            })),
            Err(not_until) => Err(LimitError::Exceeded {
                kind: LimitKind::Requests,
                retry_after: not_until.wait_time_from(DefaultClock::default().now()),
            }),
        }
    }

    /// Reserves what `check` allowed: the concurrency slot, the bucket's
    /// tokens, the quota's tokens and the budget's nanos.
    fn commit(&mut self, checked: Checked, cost: Cost) -> (LocalGrant, Headroom) {
        if checked.concurrency {
            self.in_flight += 1;
        }
        let mut tokens = None;
        if let (Some(tpm), Some(bucket)) = (checked.tokens_per_minute, self.bucket.as_mut()) {
            bucket.level -= cost.tokens as f64;
            tokens = Some(TokenState {
                limit: tpm,
                remaining: bucket.level.max(0.0) as u64,
            });
        }
        if checked.quota {
            self.quota.reserved += cost.tokens;
        }
        if checked.budget {
            self.quota.spend_reserved += cost.spend_nanos;
        }
        let only_if = |reserved: bool, amount: u64| if reserved { amount } else { 0 };
        (
            LocalGrant {
                concurrency: checked.concurrency,
                bucket_tokens: only_if(checked.tokens_per_minute.is_some(), cost.tokens),
                quota_tokens: only_if(checked.quota, cost.tokens),
                budget_nanos: only_if(checked.budget, cost.spend_nanos),
                month: checked.month,
                tokens_per_minute: checked.tokens_per_minute.unwrap_or(0),
            },
            Headroom {
                requests: checked.rate,
                tokens,
            },
        )
    }
}

impl QuotaState {
    /// Starts `month`'s counters from zero when they hold another month's.
    fn roll_to(&mut self, month: Month) {
        if self.month != Some(month) {
            *self = QuotaState {
                month: Some(month),
                ..QuotaState::default()
            };
        }
    }
}

impl LocalLimits {
    /// Raises the tenant's `month` usage to at least `used` (tokens, and
    /// spend when given, that the metered usage already holds), so a
    /// restarted node does not hand out the month's quota or budget again.
    /// Idempotent.
    pub fn seed_quota(&self, tenant_id: &str, month: Month, used: MonthToDate) {
        let mut tenants = self.tenants.lock().unwrap_or_else(|e| e.into_inner());
        let state = tenants.entry(tenant_id.to_owned()).or_default();
        state.quota.roll_to(month);
        state.quota.used = state.quota.used.max(used.tokens);
        if let Some(spend) = used.spend_nanos {
            state.quota.spent = state.quota.spent.max(spend);
        }
    }

    /// The tenant's budget counters for `month` on this node.
    pub fn budget_counters(&self, tenant_id: &str, month: Month) -> BudgetCounters {
        let tenants = self.tenants.lock().unwrap_or_else(|e| e.into_inner());
        match tenants.get(tenant_id) {
            Some(state) if state.quota.month == Some(month) => BudgetCounters {
                spent_nanos: state.quota.spent,
                reserved_nanos: state.quota.spend_reserved,
            },
            _ => BudgetCounters::default(),
        }
    }

    /// Checks the request against every limit of the tenant and, only when
    /// all pass, reserves what it may use: one step under the lock, so a
    /// refusal by one limit takes nothing from the others.
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
            tenants.retain(|_, t| t.is_live(now));
        }
        // Look up before inserting: the hot path allocates no key.
        if !tenants.contains_key(tenant_id) {
            tenants.insert(tenant_id.to_owned(), TenantState::default());
        }
        let Some(state) = tenants.get_mut(tenant_id) else {
            return Err(LimitError::Unavailable("limit state vanished".to_owned()));
        };
        state.last_seen = Some(now);
        let checked = state.check(limits, cost, now, now_unix_secs)?;
        Ok(state.commit(checked, cost))
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
