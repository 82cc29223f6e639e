//! Per-tenant rate limits, concurrency caps, tokens-per-minute, monthly
//! token quotas and monthly spend budgets, checked after authentication and
//! before a request reaches the serving queue.
//!
//! [`Limiter::admit`] checks every limit of the tenant at once and reserves
//! what the request may use (prompt tokens + `max_tokens`, and their
//! worst-case cost in nanos); the returned [`Permit`] is settled with what
//! was actually used, which refunds the rest. Money is only ever integer
//! nanos here, priced by the caller: the limiter knows no prices. A permit dropped without settling (a cancelled or failed request
//! whose handler unwound) is settled in the background as if it used its
//! whole reservation, so nothing is refunded twice or leaked.
//!
//! Backends: in process ([`local`], the default) or Redis ([`redis_store`],
//! shared by every replica) when `redis.url` is set. If Redis fails, the
//! configured [`FailurePolicy`] applies: `fail_open` falls back to local
//! limits divided by `limits.replicas`, `fail_closed` refuses with
//! UNAVAILABLE; recovery is automatic on the next call that reaches Redis.
//!
//! Knows tenants only as ids with [`Limits`]; knows nothing of gRPC.

mod error;
pub mod local;
pub mod rate;
pub mod redis_store;

use std::collections::HashMap;
use std::future::Future;
use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use serde::{Deserialize, Serialize};
use tokio::sync::mpsc;

pub use error::{LimitError, LimitKind};
use local::{LocalGrant, LocalLimits};
use redis_store::{Admission, RedisGrant, RedisLimits};

use crate::calendar::{self, Month};
use crate::tenancy::Limits;

/// What a request may consume: the tokens reserved against tokens-per-minute
/// and the monthly quota (0 for calls that generate nothing), and its
/// worst-case cost against the monthly budget.
#[derive(Debug, Clone, Copy, Default)]
pub struct Cost {
    pub tokens: u64,
    /// Nanos of the plan's currency; checked only when `tokens` > 0.
    pub spend_nanos: u64,
}

impl Cost {
    /// A cost in tokens alone (no budget to reserve against).
    pub fn of_tokens(tokens: u64) -> Cost {
        Cost {
            tokens,
            spend_nanos: 0,
        }
    }
}

/// What a request consumed, to settle its permit with.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Used {
    pub tokens: u64,
    /// Its exact cost in nanos (0 when it has no budget to count against).
    pub spend_nanos: u64,
}

impl Used {
    /// Tokens alone, no spend.
    pub fn of_tokens(tokens: u64) -> Used {
        Used {
            tokens,
            spend_nanos: 0,
        }
    }

    /// A call that ended without using anything.
    pub const NOTHING: Used = Used {
        tokens: 0,
        spend_nanos: 0,
    };
}

/// The month so far, as the metered usage records it: the seed of the
/// monthly counters.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct MonthToDate {
    pub tokens: u64,
    /// The month's spend in nanos (the invoice draft's total); `None` when
    /// it was not asked for.
    pub spend_nanos: Option<u64>,
}

impl MonthToDate {
    /// Tokens alone (the spend not asked for).
    pub fn of_tokens(tokens: u64) -> MonthToDate {
        MonthToDate {
            tokens,
            spend_nanos: None,
        }
    }

    /// One node's share of the month, for the fail-open fallback.
    fn share(self, replicas: u32) -> MonthToDate {
        let n = u64::from(replicas.max(1));
        MonthToDate {
            tokens: self.tokens / n,
            spend_nanos: self.spend_nanos.map(|spend| spend / n),
        }
    }
}

/// A tenant's monthly budget counters, as the limiter admits against them.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct BudgetCounters {
    /// Settled spend counted this month (seeded from the invoice draft).
    pub spent_nanos: u64,
    /// Worst-case cost of admitted requests not yet settled.
    pub reserved_nanos: u64,
}

/// The request-rate state after an admission, for the IETF `ratelimit`
/// response fields.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RateState {
    /// Requests allowed at once (the burst).
    pub limit: u32,
    pub remaining: u32,
    /// Time for a spent burst to refill completely.
    pub window: Duration,
}

/// The tokens-per-minute bucket after an admission took its reservation.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct TokenState {
    /// Tokens per minute, which is also what a full bucket holds.
    pub limit: u64,
    pub remaining: u64,
}

impl TokenState {
    /// Time for the bucket to refill completely.
    pub fn until_full(&self) -> Duration {
        let missing = self.limit.saturating_sub(self.remaining);
        Duration::from_secs_f64(60.0 * missing as f64 / self.limit.max(1) as f64)
    }
}

/// What an admission left of the tenant's rate limits, for the response's
/// rate-limit headers: each is `None` when the tenant has no such limit (or
/// the call reserved no tokens).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Headroom {
    pub requests: Option<RateState>,
    pub tokens: Option<TokenState>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum FailurePolicy {
    /// Keep serving under per-node limits (the shared limit / replicas).
    FailOpen,
    /// Refuse with UNAVAILABLE until Redis answers again.
    FailClosed,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct LimitSettings {
    /// What to do when Redis cannot be reached.
    pub redis_failure: FailurePolicy,
    /// Gateway replicas sharing the limits; under `fail_open` each node
    /// enforces 1/replicas of every limit on its own.
    pub replicas: u32,
    /// Lifetime of a concurrency lease in Redis, renewed every third of it
    /// while its request runs: how long a crashed gateway's slots stay
    /// taken.
    #[serde(with = "humantime_serde")]
    pub lease_ttl: Duration,
    /// Prefix of every Redis key.
    pub redis_prefix: String,
}

impl Default for LimitSettings {
    fn default() -> Self {
        LimitSettings {
            redis_failure: FailurePolicy::FailOpen,
            replicas: 1,
            lease_ttl: Duration::from_secs(30),
            redis_prefix: "agw:".to_owned(),
        }
    }
}

/// After Redis was found unreachable, decisions within this long apply the
/// failure policy at once; the next one after it tries Redis again.
const OUTAGE_SHORTCUT: Duration = Duration::from_secs(1);

/// Whether an error means Redis could not be reached (rather than that it
/// answered with an error).
fn is_unreachable(error: &redis::RedisError) -> bool {
    error.is_io_error()
        || error.is_timeout()
        || error.is_connection_dropped()
        || error.is_connection_refusal()
}

/// How often a node raises a tenant's local quota share from the metered
/// usage while it decides alone.
const FALLBACK_RESEED: Duration = Duration::from_secs(10);

/// How often a Redis outage is logged while it lasts.
const OUTAGE_LOG_INTERVAL: Duration = Duration::from_secs(30);

enum Grant {
    Local(LocalGrant),
    Redis(RedisGrant),
}

struct Settlement {
    tenant_id: String,
    grant: Grant,
    used: Used,
}

/// What a tenant has used since a moment (the month's start), as the
/// metered usage records it; the spend too when the flag asks for it. Given
/// by the application, which knows the database and the prices; the
/// limiter knows only that it can ask.
pub type QuotaSeed = Arc<
    dyn Fn(
            String,
            i64,
            bool,
        ) -> Pin<Box<dyn Future<Output = Result<MonthToDate, SeedError>> + Send>>
        + Send
        + Sync,
>;

/// Why a seed could not be read (the application's own error, kept whole
/// for the log).
pub type SeedError = Box<dyn std::error::Error + Send + Sync>;

/// A failed seeding is retried no sooner than this, so a database outage
/// does not add a query to every request.
const SEED_RETRY: Duration = Duration::from_secs(30);

/// How long an admission waits for the metered usage before going on
/// without it (the counter is then seeded on a later try).
const SEED_TIMEOUT: Duration = Duration::from_secs(1);

/// What `seed` says the tenant used this month (its spend too if
/// `with_spend`), waiting at most [`SEED_TIMEOUT`].
async fn metered_this_month(
    seed: &QuotaSeed,
    tenant_id: &str,
    now: i64,
    with_spend: bool,
) -> Result<MonthToDate, SeedError> {
    let month_start_us = Month::of_unix_secs(now).start_us();
    tokio::time::timeout(
        SEED_TIMEOUT,
        seed(tenant_id.to_owned(), month_start_us, with_spend),
    )
    .await
    .unwrap_or_else(|_| Err(format!("no answer within {SEED_TIMEOUT:?}").into()))
}

/// Whether a tenant's monthly counters have been seeded on this node, and
/// whether the spend was among them.
enum Seeded {
    /// `refresh_at`: when a budget's spend is read again (a raise).
    Done {
        with_spend: bool,
        refresh_at: Instant,
    },
    FailedAt(Instant),
}

/// A budgeted tenant's spend counter is raised to the month's metered spend
/// at least this often by each node that admits it (a raise never lowers
/// it), so spend the counter missed (while the budget was unset, or since
/// Redis rebuilt it) is counted within this plus the metering lag.
const SPEND_RESEED: Duration = Duration::from_secs(60);

pub struct Limiter {
    local: LocalLimits,
    /// Where monthly quota counters start when this node has none.
    quota_seed: std::sync::OnceLock<QuotaSeed>,
    /// By tenant: the month last seeded (or tried) and how it went.
    seeded: Mutex<HashMap<String, (Month, Seeded)>>,
    redis: Option<RedisLimits>,
    settings: LimitSettings,
    outage_logged_at: Mutex<Option<Instant>>,
    /// When a decision last found Redis unreachable.
    redis_down_at: Mutex<Option<Instant>>,
    /// By tenant: when the local quota share was last raised for fail_open.
    fallback_reseeded: Mutex<HashMap<String, Instant>>,
    fallbacks: std::sync::atomic::AtomicU64,
    /// Refusals by limit, indexed like `LimitKind::ALL`.
    rejections: [std::sync::atomic::AtomicU64; LimitKind::ALL.len()],
    background: mpsc::Sender<Settlement>,
    /// Permits admitted and not yet settled by their request (alive).
    in_flight: std::sync::atomic::AtomicU64,
    /// Settlements that found the queue full and were left to expire.
    settlements_dropped: std::sync::atomic::AtomicU64,
}

/// Settlements waiting for the background task at most; past it a worker
/// waits (back-pressure), a dropped permit's is left to its lease expiry.
const SETTLEMENT_QUEUE: usize = 65_536;
/// Redis settlements in flight at once over the multiplexed connection,
/// which pipelines them.
const SETTLEMENTS_IN_FLIGHT: usize = 512;

/// An admitted request's reservations. Settle it with the tokens used.
pub struct Permit {
    limiter: Arc<Limiter>,
    tenant_id: String,
    grant: Option<Grant>,
    headroom: Headroom,
    /// The API key's own permit, settled with this one.
    inner: Option<Box<Permit>>,
}

impl Limiter {
    /// A limiter and the receiver of background settlements, which
    /// [`Limiter::run_background`] must drain.
    pub fn new(
        redis: Option<redis::aio::ConnectionManager>,
        settings: LimitSettings,
    ) -> (Arc<Limiter>, BackgroundSettlements) {
        let (background, receiver) = mpsc::channel(SETTLEMENT_QUEUE);
        let redis = redis.map(|connection| {
            RedisLimits::new(
                connection,
                settings.redis_prefix.clone(),
                settings.lease_ttl,
            )
        });
        let limiter = Arc::new(Limiter {
            local: LocalLimits::default(),
            quota_seed: std::sync::OnceLock::new(),
            seeded: Mutex::new(HashMap::new()),
            redis,
            settings,
            outage_logged_at: Mutex::new(None),
            redis_down_at: Mutex::new(None),
            fallback_reseeded: Mutex::new(HashMap::new()),
            fallbacks: std::sync::atomic::AtomicU64::new(0),
            rejections: Default::default(),
            background,
            in_flight: Default::default(),
            settlements_dropped: Default::default(),
        });
        (limiter, BackgroundSettlements(receiver))
    }

    /// Makes monthly quotas start from the metered usage of the month the
    /// first time this node admits a tenant in it (after a restart, local
    /// counters are empty; Redis may have lost its own). Set once.
    pub fn set_quota_seed(&self, seed: QuotaSeed) {
        let _ = self.quota_seed.set(seed);
    }

    /// Seeds the tenant's counter for the current month once per node.
    /// What the usage writer has not shipped yet is not counted: at most
    /// one ship interval of usage.
    ///
    /// `again`: Redis has no counter although this node seeded one (Redis
    /// lost its keys): seed it anew. `with_spend`: the tenant has a budget,
    /// so the month's spend is seeded too (a counter seeded before the
    /// budget was set has none). Returns whether the counter is seeded.
    async fn seed_quota(&self, tenant_id: &str, now: i64, again: bool, with_spend: bool) -> bool {
        let month = Month::of_unix_secs(now);
        let Some(seed) = self.quota_seed.get() else {
            // Nothing metered to start from: the counter starts at zero.
            let zero = MonthToDate {
                tokens: 0,
                spend_nanos: with_spend.then_some(0),
            };
            return match &self.redis {
                Some(redis) if again => redis
                    .seed_quota(tenant_id, month, zero, calendar::secs_until_month_end(now))
                    .await
                    .is_ok(),
                _ => true,
            };
        };
        {
            let seeded = self.seeded.lock().unwrap_or_else(|e| e.into_inner());
            match seeded.get(tenant_id) {
                Some((
                    m,
                    Seeded::Done {
                        with_spend: had,
                        refresh_at,
                    },
                )) if *m == month
                    && !again
                    && (!with_spend || (*had && Instant::now() < *refresh_at)) =>
                {
                    return true;
                }
                Some((m, Seeded::FailedAt(at))) if *m == month && at.elapsed() < SEED_RETRY => {
                    return false;
                }
                _ => {}
            }
        }
        let outcome = match metered_this_month(seed, tenant_id, now, with_spend).await {
            Ok(used) => {
                // With Redis, local counters serve only the fail-open
                // fallback, which holds each node to its share.
                let local_share = match &self.redis {
                    Some(_) => used.share(self.settings.replicas),
                    None => used,
                };
                self.local.seed_quota(tenant_id, month, local_share);
                match &self.redis {
                    Some(redis) => redis
                        .seed_quota(tenant_id, month, used, calendar::secs_until_month_end(now))
                        .await
                        .map_err(SeedError::from),
                    None => Ok(()),
                }
            }
            Err(e) => Err(e),
        };
        let mut seeded = self.seeded.lock().unwrap_or_else(|e| e.into_inner());
        // A counter seeded this month stays seeded when only a periodic
        // reseed fails: the next try comes after SEED_RETRY.
        let seeded_before = matches!(
            seeded.get(tenant_id),
            Some((m, Seeded::Done { with_spend: had, .. })) if *m == month && (*had || !with_spend)
        ) && !again;
        let (state, ok) = match outcome {
            Ok(()) => (
                Seeded::Done {
                    with_spend,
                    refresh_at: Instant::now() + SPEND_RESEED,
                },
                true,
            ),
            Err(error) if seeded_before => {
                tracing::warn!(%error, tenant = tenant_id, "monthly spend not re-seeded from metered usage; the counter goes on, retrying later");
                (
                    Seeded::Done {
                        with_spend,
                        refresh_at: Instant::now() + SEED_RETRY,
                    },
                    true,
                )
            }
            Err(error) => {
                tracing::warn!(%error, tenant = tenant_id, "monthly quota not seeded from metered usage; retrying later");
                (Seeded::FailedAt(Instant::now()), false)
            }
        };
        seeded.insert(tenant_id.to_owned(), (month, state));
        ok
    }

    /// Admissions decided locally because Redis failed (fail_open).
    pub fn fallback_count(&self) -> u64 {
        self.fallbacks.load(std::sync::atomic::Ordering::Relaxed)
    }

    /// Requests refused by limit `kind` so far.
    pub fn rejections(&self, kind: LimitKind) -> u64 {
        self.rejections[kind.index()].load(std::sync::atomic::Ordering::Relaxed)
    }

    /// Checks every limit of the tenant and reserves `cost`.
    pub async fn admit(
        self: &Arc<Self>,
        tenant_id: &str,
        limits: &Limits,
        cost: Cost,
    ) -> Result<Permit, LimitError> {
        let result = self.decide(tenant_id, limits, cost).await;
        if let Err(LimitError::Exceeded { kind, .. } | LimitError::TooLarge { kind, .. }) = &result
        {
            self.rejections[kind.index()].fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        }
        result
    }

    async fn decide(
        self: &Arc<Self>,
        tenant_id: &str,
        limits: &Limits,
        cost: Cost,
    ) -> Result<Permit, LimitError> {
        let now = unix_secs();
        let with_spend = limits.monthly_budget.is_some();
        if (limits.monthly_token_quota.is_some() || with_spend) && cost.tokens > 0 {
            let seeded = self.seed_quota(tenant_id, now, false, with_spend).await;
            // Money is not counted from zero: without the month's spend a
            // budget cannot be checked. (On Redis the script insists on a
            // seeded counter by itself.)
            if with_spend && !seeded && self.redis.is_none() {
                return Err(LimitError::Unavailable(
                    "the month's spend cannot be read to check the monthly budget".to_owned(),
                ));
            }
        }
        let (grant, rate) = match &self.redis {
            None => {
                let (grant, rate) = self.local.admit(tenant_id, limits, cost, now)?;
                (Grant::Local(grant), rate)
            }
            Some(redis) => {
                let month = Month::of_unix_secs(now);
                let until_end = calendar::secs_until_month_end(now);
                let mut reseeded = false;
                if let Some(error) = self.recently_unreachable() {
                    // Redis failed under a second ago: decide by the
                    // policy now instead of waiting for it again.
                    let (grant, rate) =
                        self.fall_back(tenant_id, limits, cost, now, &error).await?;
                    return Ok(self.permit(tenant_id, grant, rate));
                }
                loop {
                    match redis.admit(tenant_id, limits, cost, month, until_end).await {
                        Ok(Admission::Granted(grant, rate)) => break (Grant::Redis(grant), rate),
                        Ok(Admission::Refused(refusal)) => return Err(refusal),
                        // Redis lost the month's counter: start it again from
                        // the metered usage, never from zero.
                        Ok(Admission::Unseeded) if !reseeded => {
                            reseeded = true;
                            if !self.seed_quota(tenant_id, now, true, with_spend).await {
                                return Err(LimitError::Unavailable(
                                    "the monthly quota counter is lost and the metered usage cannot be read".to_owned(),
                                ));
                            }
                        }
                        Ok(Admission::Unseeded) => {
                            return Err(LimitError::Unavailable(
                                "the monthly quota counter could not be seeded".to_owned(),
                            ));
                        }
                        Err(error) => {
                            if is_unreachable(&error) {
                                *self.redis_down_at.lock().unwrap_or_else(|e| e.into_inner()) =
                                    Some(Instant::now());
                            }
                            break self.fall_back(tenant_id, limits, cost, now, &error).await?;
                        }
                    }
                }
            }
        };
        Ok(self.permit(tenant_id, grant, rate))
    }

    fn permit(self: &Arc<Self>, tenant_id: &str, grant: Grant, headroom: Headroom) -> Permit {
        self.in_flight
            .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        Permit {
            limiter: self.clone(),
            tenant_id: tenant_id.to_owned(),
            grant: Some(grant),
            headroom,
            inner: None,
        }
    }

    /// The decision without Redis: the failure policy, after raising the
    /// local quota share (see [`Limiter::before_fallback`]).
    async fn fall_back(
        &self,
        tenant_id: &str,
        limits: &Limits,
        cost: Cost,
        now: i64,
        error: &redis::RedisError,
    ) -> Result<(Grant, Headroom), LimitError> {
        self.before_fallback(tenant_id, limits, cost, now).await;
        self.on_redis_failure(tenant_id, limits, cost, now, error)
    }

    /// Under `fail_open`, a node's local quota counter for a tenant knows
    /// only what this node admitted while Redis was away; before it decides
    /// alone, it is raised to this node's share of the month's metered
    /// usage (at most once per [`FALLBACK_RESEED`] per tenant), so the
    /// nodes together hand out only what is left of the quota, not a whole
    /// quota again.
    async fn before_fallback(&self, tenant_id: &str, limits: &Limits, cost: Cost, now: i64) {
        let with_spend = limits.monthly_budget.is_some();
        if self.settings.redis_failure != FailurePolicy::FailOpen
            || (limits.monthly_token_quota.is_none() && !with_spend)
            || cost.tokens == 0
        {
            return;
        }
        let Some(seed) = self.quota_seed.get() else {
            return;
        };
        {
            let mut reseeded = self
                .fallback_reseeded
                .lock()
                .unwrap_or_else(|e| e.into_inner());
            if reseeded
                .get(tenant_id)
                .is_some_and(|at| at.elapsed() < FALLBACK_RESEED)
            {
                return;
            }
            reseeded.insert(tenant_id.to_owned(), Instant::now());
        }
        match metered_this_month(seed, tenant_id, now, with_spend).await {
            Ok(used) => {
                self.local.seed_quota(
                    tenant_id,
                    Month::of_unix_secs(now),
                    used.share(self.settings.replicas),
                );
            }
            Err(error) => {
                tracing::warn!(%error, tenant = tenant_id, "fail_open: the local quota share is not seeded from metered usage");
            }
        }
    }

    /// An error standing for Redis's last failure, when that was under
    /// [`OUTAGE_SHORTCUT`] ago.
    fn recently_unreachable(&self) -> Option<redis::RedisError> {
        let down_at = *self.redis_down_at.lock().unwrap_or_else(|e| e.into_inner());
        down_at
            .filter(|at| at.elapsed() < OUTAGE_SHORTCUT)
            .map(|_| {
                redis::RedisError::from((
                    redis::ErrorKind::Io,
                    "Redis was unreachable less than a second ago",
                ))
            })
    }

    fn on_redis_failure(
        &self,
        tenant_id: &str,
        limits: &Limits,
        cost: Cost,
        now: i64,
        error: &redis::RedisError,
    ) -> Result<(Grant, Headroom), LimitError> {
        self.log_outage(error);
        match self.settings.redis_failure {
            FailurePolicy::FailClosed => Err(LimitError::Unavailable(error.to_string())),
            FailurePolicy::FailOpen => {
                self.fallbacks
                    .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                let per_node = per_node(limits, self.settings.replicas);
                let (grant, rate) = self.local.admit(tenant_id, &per_node, cost, now)?;
                Ok((Grant::Local(grant), rate))
            }
        }
    }

    fn log_outage(&self, error: &redis::RedisError) {
        let mut logged = self
            .outage_logged_at
            .lock()
            .unwrap_or_else(|e| e.into_inner());
        if logged.is_none_or(|at| at.elapsed() >= OUTAGE_LOG_INTERVAL) {
            *logged = Some(Instant::now());
            tracing::warn!(
                error = %error,
                policy = ?self.settings.redis_failure,
                fallbacks = self.fallback_count(),
                "Redis unreachable for rate limits"
            );
        }
    }

    async fn settle_now(&self, settlement: Settlement) {
        match &settlement.grant {
            Grant::Local(grant) => {
                self.local
                    .settle(&settlement.tenant_id, grant, settlement.used);
            }
            Grant::Redis(grant) => {
                self.settle_in_redis(&settlement.tenant_id, &[(grant, settlement.used)])
                    .await;
            }
        }
    }

    /// Settles grants of one [`redis_store::SettleGroup`] in one call.
    async fn settle_in_redis(&self, tenant_id: &str, grants: &[(&RedisGrant, Used)]) {
        if let Some(redis) = &self.redis
            && let Err(error) = redis.settle_many(tenant_id, grants).await
        {
            // The lease expires by itself; the bucket refills by itself;
            // only the quota reservation stays until the month's counters
            // expire. Logged, never retried twice.
            tracing::warn!(error = %error, tenant = %tenant_id, settlements = grants.len(), "cannot settle limits in Redis");
        }
    }

    /// Runs queued settlements (permits settled from worker threads, and
    /// permits dropped unsettled) until `stop`, many at once so that none
    /// waits behind another; renews this node's Redis leases every third
    /// of `limits.lease_ttl`. Then settles what is still queued.
    pub async fn run_background(
        self: Arc<Self>,
        mut settlements: BackgroundSettlements,
        stop: tokio_util::sync::CancellationToken,
    ) {
        // Renewal runs beside the settlements, so a busy or slow settlement
        // loop can never let live leases lapse.
        let renewer = async {
            let mut renew = tokio::time::interval(self.settings.lease_ttl / 3);
            renew.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            loop {
                tokio::select! {
                    _ = renew.tick() => {
                        if let Some(redis) = &self.redis
                            && let Err(error) = redis.renew_leases().await
                        {
                            self.log_outage(&error);
                        }
                    }
                    () = stop.cancelled() => break,
                }
            }
        };
        let settler = async {
            let slots = Arc::new(tokio::sync::Semaphore::new(SETTLEMENTS_IN_FLIGHT));
            let mut running = tokio::task::JoinSet::new();
            let mut batch = Vec::with_capacity(256);
            loop {
                tokio::select! {
                    received = settlements.0.recv_many(&mut batch, 256) => {
                        if received == 0 {
                            break;
                        }
                        self.spawn_settlements(&mut running, &slots, batch.drain(..)).await;
                    }
                    Some(_) = running.join_next(), if !running.is_empty() => {}
                    () = stop.cancelled() => break,
                }
            }
            settlements.0.close();
            while settlements.0.recv_many(&mut batch, 256).await > 0 {
                self.spawn_settlements(&mut running, &slots, batch.drain(..))
                    .await;
            }
            while running.join_next().await.is_some() {}
        };
        tokio::join!(renewer, settler);
    }

    /// Settles local grants at once; Redis ones grouped by what one script
    /// call can settle together (tenant, month, tokens-per-minute), each
    /// group on its own task once one of the in-flight slots is free.
    async fn spawn_settlements(
        self: &Arc<Self>,
        running: &mut tokio::task::JoinSet<()>,
        slots: &Arc<tokio::sync::Semaphore>,
        batch: impl Iterator<Item = Settlement>,
    ) {
        let mut groups: HashMap<redis_store::SettleGroup, Vec<(RedisGrant, Used)>> = HashMap::new();
        for settlement in batch {
            match settlement.grant {
                Grant::Local(grant) => {
                    self.local
                        .settle(&settlement.tenant_id, &grant, settlement.used);
                }
                Grant::Redis(grant) => groups
                    .entry((settlement.tenant_id, grant.month, grant.tokens_per_minute))
                    .or_default()
                    .push((grant, settlement.used)),
            }
        }
        for ((tenant_id, _, _), grants) in groups {
            let Ok(slot) = slots.clone().acquire_owned().await else {
                return;
            };
            let limiter = self.clone();
            running.spawn(async move {
                let grants: Vec<(&RedisGrant, Used)> =
                    grants.iter().map(|(g, used)| (g, *used)).collect();
                limiter.settle_in_redis(&tenant_id, &grants).await;
                drop(slot);
            });
        }
    }

    /// The tenant's budget counters this month, where admissions are
    /// decided: Redis when it is configured, else this node's own.
    /// Seeded first, as an admission would, so a node that has not admitted
    /// the tenant this month still reports the month's spend.
    pub async fn budget_counters(&self, tenant_id: &str) -> Result<BudgetCounters, LimitError> {
        let now = unix_secs();
        if !self.seed_quota(tenant_id, now, false, true).await {
            return Err(LimitError::Unavailable(
                "the month's spend cannot be read".to_owned(),
            ));
        }
        let month = Month::of_unix_secs(now);
        match &self.redis {
            None => Ok(self.local.budget_counters(tenant_id, month)),
            Some(redis) => redis
                .budget_counters(tenant_id, month)
                .await
                .map_err(|e| LimitError::Unavailable(e.to_string())),
        }
    }

    /// Permits alive: admitted, their request not yet ended.
    pub fn in_flight(&self) -> u64 {
        self.in_flight.load(std::sync::atomic::Ordering::Relaxed)
    }

    /// Concurrency leases this node holds in Redis (granted and not yet
    /// released there). Above [`Limiter::in_flight`] by the settlements
    /// still on their way: a growing gap is a settlement backlog.
    pub fn leases_held(&self) -> u64 {
        self.redis.as_ref().map_or(0, RedisLimits::leases_held)
    }

    /// Settlements lost to a full queue (their leases expire by themselves).
    pub fn settlements_dropped(&self) -> u64 {
        self.settlements_dropped
            .load(std::sync::atomic::Ordering::Relaxed)
    }

    /// A settlement that will not run: its lease must not be renewed, so
    /// that it expires by itself.
    fn forget(&self, settlement: &Settlement) {
        if let (Some(redis), Grant::Redis(grant)) = (&self.redis, &settlement.grant)
            && grant.concurrency
        {
            redis.forget(&grant.lease_id);
        }
    }

    fn queue_settlement(&self, settlement: Settlement, may_block: bool) {
        let settlement = match self.background.try_send(settlement) {
            Ok(()) => return,
            Err(mpsc::error::TrySendError::Closed(settlement)) => {
                self.forget(&settlement);
                return;
            }
            Err(mpsc::error::TrySendError::Full(settlement)) => settlement,
        };
        if may_block && tokio::runtime::Handle::try_current().is_err() {
            // A worker's thread: wait for room rather than lose it.
            let _ = self.background.blocking_send(settlement);
            return;
        }
        self.forget(&settlement);
        self.settlements_dropped
            .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        tracing::warn!(
            tenant = %settlement.tenant_id,
            "limit settlement queue full: a lease is left to expire"
        );
    }
}

/// Receiver of the settlements the background task runs.
pub struct BackgroundSettlements(mpsc::Receiver<Settlement>);

impl std::fmt::Debug for Permit {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Permit")
            .field("tenant_id", &self.tenant_id)
            .field("headroom", &self.headroom)
            .finish_non_exhaustive()
    }
}

impl Permit {
    pub fn headroom(&self) -> Headroom {
        self.headroom
    }

    /// Carries `inner` (an API key's permit) with this one: settled with the
    /// same use when this one is, or dropped with it.
    pub fn with_inner(mut self, inner: Option<Permit>) -> Permit {
        self.inner = inner.map(Box::new);
        self
    }

    /// The grant, taken once: the request it admitted has ended.
    fn end(&mut self) -> Option<(String, Grant)> {
        let grant = self.grant.take()?;
        self.limiter
            .in_flight
            .fetch_sub(1, std::sync::atomic::Ordering::Relaxed);
        Some((std::mem::take(&mut self.tenant_id), grant))
    }

    /// Returns the concurrency slot and refunds what was reserved but not
    /// used. Tokens beyond the reservation are not charged here; spend is
    /// counted exactly, even past its reservation.
    pub async fn settle(mut self, used: Used) {
        if let Some(inner) = self.inner.take() {
            // Awaited, not queued: a full settlement queue must not drop it.
            Box::pin(inner.settle(used)).await;
        }
        if let Some((tenant_id, grant)) = self.end() {
            let settlement = Settlement {
                tenant_id,
                grant,
                used,
            };
            self.limiter.settle_now(settlement).await;
        }
    }

    /// Settles from a thread outside the async runtime without blocking it:
    /// a local grant at once (a short lock), a Redis one on the background
    /// task (a worker waits only if that task's queue is full), both with
    /// exactly what was used.
    pub fn settle_detached(mut self, used: Used) {
        if let Some(inner) = self.inner.take() {
            inner.settle_detached(used);
        }
        match self.end() {
            Some((tenant_id, Grant::Local(grant))) => {
                self.limiter.local.settle(&tenant_id, &grant, used);
            }
            Some((tenant_id, grant)) => self.limiter.queue_settlement(
                Settlement {
                    tenant_id,
                    grant,
                    used,
                },
                true,
            ),
            None => {}
        }
    }
}

impl Drop for Permit {
    fn drop(&mut self) {
        if let Some((tenant_id, grant)) = self.end() {
            // Unknown use: the whole reservation, never a refund.
            let (tokens, spend_nanos) = match &grant {
                Grant::Local(g) => (g.bucket_tokens.max(g.quota_tokens), g.budget_nanos),
                Grant::Redis(g) => (g.bucket_tokens.max(g.quota_tokens), g.budget_nanos),
            };
            let used = Used {
                tokens,
                spend_nanos,
            };
            // If the background task is gone the process is shutting down;
            // leases expire and local state dies with the process.
            self.limiter.queue_settlement(
                Settlement {
                    tenant_id,
                    grant,
                    used,
                },
                false,
            );
        }
    }
}

/// One node's share of a shared limit, for fail-open.
fn per_node(limits: &Limits, replicas: u32) -> Limits {
    let n = replicas.max(1);
    let share_u32 = |v: u32| (v / n).max(1);
    let share_u64 = |v: u64| (v / u64::from(n)).max(1);
    Limits {
        requests_per_second: limits.requests_per_second.map(|r| r / f64::from(n)),
        burst: limits.burst.map(share_u32),
        tokens_per_minute: limits.tokens_per_minute.map(share_u64),
        max_concurrent_requests: limits.max_concurrent_requests.map(share_u32),
        monthly_token_quota: limits.monthly_token_quota.map(share_u64),
        monthly_budget: limits
            .monthly_budget
            .as_ref()
            .map(|budget| crate::tenancy::Budget {
                currency_code: budget.currency_code.clone(),
                amount_nanos: share_u64(budget.amount_nanos),
            }),
    }
}

fn unix_secs() -> i64 {
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap_or_default();
    i64::try_from(now.as_secs()).unwrap_or(i64::MAX)
}
