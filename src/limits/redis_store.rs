//! Limits shared by every gateway replica, kept in Redis.
//!
//! Each admission is one Lua script that checks every limit and applies the
//! reservations only if all pass, atomically, with Redis's own clock (so
//! replicas with skewed clocks agree). Concurrency slots are leases in a
//! sorted set scored by expiry, short and renewed every third of their
//! lifetime while their request runs: a gateway that dies holding slots
//! loses them when its leases run out, and a long request keeps its slot.
//! Settlement is a second script; settlements run concurrently over the
//! multiplexed connection, which pipelines them. Keys carry the
//! tenant id in a hash tag so one tenant's keys share a cluster slot.

use std::time::Duration;

use redis::Script;
use redis::aio::ConnectionManager;

use super::error::{LimitError, LimitKind};
use super::rate::Gcra;
use super::{BudgetCounters, Cost, Headroom, MonthToDate, RateState, TokenState, Used};
use crate::calendar::Month;
use crate::tenancy::Limits;

const ADMIT: &str = r"
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000000 + tonumber(t[2])
local interval = tonumber(ARGV[1])
local burst = tonumber(ARGV[2])
local maxc = tonumber(ARGV[3])
local lease_ttl = tonumber(ARGV[5])
local tpm = tonumber(ARGV[6])
local tokens = tonumber(ARGV[7])
local quota = tonumber(ARGV[8])
local budget = tonumber(ARGV[10])
local spend = tonumber(ARGV[11])

if maxc > 0 then
  redis.call('ZREMRANGEBYSCORE', KEYS[2], '-inf', string.format('%.0f', now))
  if redis.call('ZCARD', KEYS[2]) >= maxc then
    -- A slot frees at the latest when the earliest lease expires.
    local first = redis.call('ZRANGE', KEYS[2], 0, 0, 'WITHSCORES')
    return {2, math.max(1000, tonumber(first[2]) - now), 0, -1}
  end
end

local level = 0
if tpm > 0 then
  local b = redis.call('HMGET', KEYS[3], 'level', 'at')
  level = tonumber(b[1])
  local at = tonumber(b[2])
  if level == nil or at == nil then level = tpm; at = now end
  level = math.min(tpm, level + (now - at) * tpm / 60000000)
  if level < tokens then
    return {3, math.ceil((tokens - level) * 60000000 / tpm), 0, -1}
  end
end

if quota > 0 or budget > 0 then
  -- No counter: this month's was never seeded here, or Redis lost it (a
  -- restart without persistence). Counting from zero would hand the month's
  -- quota out again: the caller seeds it from the metered usage first. A
  -- counter without 'spent' was seeded before the budget was set.
  if redis.call('EXISTS', KEYS[4]) == 0
    or (budget > 0 and redis.call('HEXISTS', KEYS[4], 'spent') == 0) then
    return {5, 0, 0, -1}
  end
  local q = redis.call('HMGET', KEYS[4], 'used', 'reserved', 'spent', 'spend_reserved')
  local used = tonumber(q[1]) or 0
  local reserved = tonumber(q[2]) or 0
  if quota > 0 and used + reserved + tokens > quota then
    return {4, 0, 0, -1}
  end
  local spent = tonumber(q[3]) or 0
  local spend_reserved = tonumber(q[4]) or 0
  if budget > 0 and spent + spend_reserved + spend > budget then
    return {6, 0, 0, -1}
  end
end

local remaining = -1
if interval > 0 then
  -- The state remembers the rate it was kept under: a changed rate starts
  -- afresh, as the in-process limiter does, so a raised limit applies at
  -- once instead of inheriting the old rate's debt.
  local g = redis.call('HMGET', KEYS[1], 'tat', 'interval', 'burst')
  local tat = tonumber(g[1]) or now
  if tonumber(g[2]) ~= interval or tonumber(g[3]) ~= burst then tat = now end
  if tat < now then tat = now end
  local new_tat = tat + interval
  local allow_at = new_tat - burst * interval
  if now < allow_at then
    return {1, allow_at - now, 0, -1}
  end
  redis.call('HSET', KEYS[1], 'tat', string.format('%.0f', new_tat), 'interval', ARGV[1], 'burst', ARGV[2])
  redis.call('PEXPIRE', KEYS[1], math.ceil((new_tat - now) / 1000) + 1000)
  remaining = math.floor((burst * interval - (new_tat - now)) / interval)
end

if maxc > 0 then
  redis.call('ZADD', KEYS[2], string.format('%.0f', now + lease_ttl), ARGV[4])
  redis.call('PEXPIRE', KEYS[2], math.ceil(lease_ttl / 1000) + 1000)
end
if tpm > 0 then
  redis.call('HSET', KEYS[3], 'level', string.format('%.6f', level - tokens), 'at', string.format('%.0f', now))
  redis.call('PEXPIRE', KEYS[3], 120000)
end
if quota > 0 then
  redis.call('HINCRBY', KEYS[4], 'reserved', tokens)
end
if budget > 0 then
  -- The argument's own decimal text: Lua would print a large number as
  -- 1e+15, which HINCRBY refuses.
  redis.call('HINCRBY', KEYS[4], 'spend_reserved', ARGV[11])
end
if quota > 0 or budget > 0 then
  redis.call('EXPIRE', KEYS[4], tonumber(ARGV[9]))
end
local tokens_left = -1
if tpm > 0 then tokens_left = math.floor(math.max(0, level - tokens)) end
return {0, 0, remaining, tokens_left}
";

/// Settles one or more grants of one tenant (same month, same
/// tokens-per-minute): their leases go, the sum of their unused tokens goes
/// back to the bucket, their quota reservations turn into the tokens used.
/// One script call for many settlements is what keeps Redis's CPU per
/// request low. KEYS: leases, tokens-per-minute bucket, the month's quota;
/// ARGV: tokens per minute, tokens to refund, tokens reserved, tokens used,
/// nanos reserved against the budget, nanos spent, then the lease ids
/// (possibly none).
const SETTLE: &str = r"
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000000 + tonumber(t[2])
if #ARGV > 6 then
  redis.call('ZREM', KEYS[1], unpack(ARGV, 7))
end
local tpm = tonumber(ARGV[1])
local refund = tonumber(ARGV[2])
if tpm > 0 and refund > 0 then
  local b = redis.call('HMGET', KEYS[2], 'level', 'at')
  local level = tonumber(b[1])
  local at = tonumber(b[2])
  if level ~= nil and at ~= nil then
    level = math.min(tpm, level + (now - at) * tpm / 60000000 + refund)
    redis.call('HSET', KEYS[2], 'level', string.format('%.6f', level), 'at', string.format('%.0f', now))
  end
end
local reserved = tonumber(ARGV[3])
-- No counter: Redis lost it since admission; writing here would create it
-- near zero. The next admission seeds it from the metered usage instead.
if reserved > 0 and redis.call('EXISTS', KEYS[3]) == 1 then
  -- A counter re-seeded after Redis lost it never held this reservation.
  if redis.call('HINCRBY', KEYS[3], 'reserved', -reserved) < 0 then
    redis.call('HSET', KEYS[3], 'reserved', 0)
  end
  redis.call('HINCRBY', KEYS[3], 'used', tonumber(ARGV[4]))
end
local spend_reserved = tonumber(ARGV[5])
local spent = tonumber(ARGV[6])
-- Spend counts only where a budget counter was seeded ('spent' exists).
if (spend_reserved > 0 or spent > 0) and redis.call('HEXISTS', KEYS[3], 'spent') == 1 then
  -- Decimal texts as given: Lua would print large numbers as 1e+15.
  -- ('-0' is not an integer to Redis.)
  if spend_reserved > 0
    and redis.call('HINCRBY', KEYS[3], 'spend_reserved', '-' .. ARGV[5]) < 0 then
    redis.call('HSET', KEYS[3], 'spend_reserved', 0)
  end
  if spent > 0 then
    redis.call('HINCRBY', KEYS[3], 'spent', ARGV[6])
  end
end
return 0
";

/// Pushes the expiry of this node's live leases of one tenant to now + the
/// lease lifetime. `XX`: a lease already released (or expired and swept)
/// is not brought back. KEYS[1] the tenant's leases; ARGV[1] the lifetime
/// in microseconds, then the lease ids.
const RENEW: &str = r"
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000000 + tonumber(t[2])
local ttl = tonumber(ARGV[1])
local until_us = string.format('%.0f', now + ttl)
local renewed = 0
for i = 2, #ARGV do
  renewed = renewed + redis.call('ZADD', KEYS[1], 'XX', 'CH', until_us, ARGV[i])
end
redis.call('PEXPIRE', KEYS[1], math.ceil(ttl / 1000) + 1000)
return renewed
";

/// Raises a quota counter's `used` (and `spent`, when the spend is given)
/// to at least the metered usage; never lowers them. KEYS[1] the month's
/// quota hash; ARGV: used, expiry seconds, spent (-1: not given).
const SEED: &str = r"
local seed = tonumber(ARGV[1])
local spend = tonumber(ARGV[3])
if redis.call('EXISTS', KEYS[1]) == 0 then
  redis.call('HSET', KEYS[1], 'used', seed, 'reserved', 0)
else
  local used = tonumber(redis.call('HGET', KEYS[1], 'used')) or 0
  if seed > used then
    redis.call('HSET', KEYS[1], 'used', seed)
  end
end
if spend >= 0 then
  redis.call('HSETNX', KEYS[1], 'spend_reserved', 0)
  local spent = tonumber(redis.call('HGET', KEYS[1], 'spent'))
  if spent == nil or spend > spent then
    redis.call('HSET', KEYS[1], 'spent', string.format('%.0f', spend))
  end
end
redis.call('EXPIRE', KEYS[1], tonumber(ARGV[2]))
return 0
";

/// Renewal rounds that remove a lease an unanswered admission may have
/// added (three rounds span a whole lease lifetime).
const ORPHAN_ROUNDS: u32 = 3;

pub struct RedisLimits {
    connection: ConnectionManager,
    prefix: String,
    lease_ttl: Duration,
    admit: Script,
    settle: Script,
    seed: Script,
    renew: Script,
    /// This node's leases not yet released, by lease id: the tenant.
    live: std::sync::Mutex<std::collections::HashMap<String, String>>,
    /// (tenant, lease id, removals left) of admissions that failed without
    /// an answer.
    orphans: std::sync::Mutex<Vec<(String, String, u32)>>,
}

/// What the admission script decided.
#[derive(Debug)]
pub enum Admission {
    Granted(RedisGrant, Headroom),
    Refused(LimitError),
    /// The tenant's monthly quota counter does not exist in Redis: seed it
    /// from the metered usage, then ask again.
    Unseeded,
}

/// Grants that one settlement script can settle together: one tenant, one
/// month, one tokens-per-minute limit.
pub type SettleGroup = (String, Month, u64);

/// What an admission reserved in Redis.
#[derive(Debug, Clone)]
pub struct RedisGrant {
    pub lease_id: String,
    pub concurrency: bool,
    pub bucket_tokens: u64,
    pub quota_tokens: u64,
    /// Nanos reserved against the monthly budget.
    pub budget_nanos: u64,
    pub month: Month,
    pub tokens_per_minute: u64,
}

impl RedisLimits {
    pub fn new(connection: ConnectionManager, prefix: String, lease_ttl: Duration) -> RedisLimits {
        RedisLimits {
            connection,
            prefix,
            lease_ttl,
            admit: Script::new(ADMIT),
            settle: Script::new(SETTLE),
            seed: Script::new(SEED),
            renew: Script::new(RENEW),
            live: std::sync::Mutex::new(std::collections::HashMap::new()),
            orphans: std::sync::Mutex::new(Vec::new()),
        }
    }

    /// Forgets a lease whose settlement is lost, so it is no longer renewed
    /// and expires by itself.
    pub fn forget(&self, lease_id: &str) {
        self.live().remove(lease_id);
    }

    fn live(&self) -> std::sync::MutexGuard<'_, std::collections::HashMap<String, String>> {
        self.live.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Leases this node holds in Redis (granted, not yet released).
    pub fn leases_held(&self) -> u64 {
        self.live().len() as u64
    }

    /// Renews every live lease of this node, one script per tenant, all
    /// pipelined.
    fn orphans(&self) -> std::sync::MutexGuard<'_, Vec<(String, String, u32)>> {
        self.orphans.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Removes leases that admissions we gave up on may have added.
    async fn remove_orphans(&self) -> Result<(), redis::RedisError> {
        let orphans = std::mem::take(&mut *self.orphans());
        if orphans.is_empty() {
            return Ok(());
        }
        let mut pipeline = redis::pipe();
        for (tenant, lease, _) in &orphans {
            pipeline.zrem(self.key(tenant, "leases"), lease).ignore();
        }
        let mut connection = self.connection.clone();
        let result: Result<(), redis::RedisError> = pipeline.query_async(&mut connection).await;
        // Unreachable: all again next round. Reached: again for a few rounds
        // all the same, since the lost script may land after this removal.
        let again = orphans
            .into_iter()
            .filter_map(|(tenant, lease, rounds)| match result {
                Ok(()) => (rounds > 1).then(|| (tenant, lease, rounds - 1)),
                Err(_) => Some((tenant, lease, rounds)),
            });
        self.orphans().extend(again);
        result
    }

    pub async fn renew_leases(&self) -> Result<(), redis::RedisError> {
        self.remove_orphans().await?;
        let mut by_tenant: std::collections::HashMap<String, Vec<String>> =
            std::collections::HashMap::new();
        for (lease, tenant) in self.live().iter() {
            by_tenant
                .entry(tenant.clone())
                .or_default()
                .push(lease.clone());
        }
        if by_tenant.is_empty() {
            return Ok(());
        }
        let lease_ttl_us = u64::try_from(self.lease_ttl.as_micros()).unwrap_or(u64::MAX);
        let mut pipeline = redis::pipe();
        // Loaded first: a Redis restarted (or SCRIPT FLUSHed) since the
        // last round has forgotten it.
        pipeline.load_script(&self.renew).ignore();
        for (tenant, leases) in &by_tenant {
            let mut invocation = self.renew.key(self.key(tenant, "leases"));
            invocation.arg(lease_ttl_us).arg(leases);
            pipeline.invoke_script(&invocation);
        }
        let mut connection = self.connection.clone();
        let _: Vec<i64> = pipeline.query_async(&mut connection).await?;
        Ok(())
    }

    fn key(&self, tenant_id: &str, what: &str) -> String {
        format!("{}{{{tenant_id}}}:{what}", self.prefix)
    }

    pub async fn admit(
        &self,
        tenant_id: &str,
        limits: &Limits,
        cost: Cost,
        month: Month,
        secs_until_month_end: i64,
    ) -> Result<Admission, redis::RedisError> {
        let gcra = Gcra::of(limits);
        let burst = gcra.map_or(1, |g| g.burst);
        let interval_us = gcra.map_or(0, |g| g.interval_us());
        let max_concurrent = limits.max_concurrent_requests.unwrap_or(0);
        let tpm = limits
            .tokens_per_minute
            .filter(|_| cost.tokens > 0)
            .unwrap_or(0);
        let quota = limits
            .monthly_token_quota
            .filter(|_| cost.tokens > 0)
            .unwrap_or(0);
        let budget = limits
            .monthly_budget
            .as_ref()
            .map(|b| b.amount_nanos)
            .filter(|_| cost.tokens > 0)
            .unwrap_or(0);
        if tpm > 0 && cost.tokens > tpm {
            return Ok(Admission::Refused(LimitError::TooLarge {
                kind: LimitKind::TokensPerMinute,
                needed: cost.tokens,
                limit: tpm,
            }));
        }
        let lease_id = uuid::Uuid::new_v4().simple().to_string();
        let lease_ttl_us = u64::try_from(self.lease_ttl.as_micros()).unwrap_or(u64::MAX);
        let mut connection = self.connection.clone();
        let (outcome, wait_us, remaining, tokens_left): (i64, i64, i64, i64) = self
            .admit
            // A hash (the string "rate" of earlier versions expires by itself).
            .key(self.key(tenant_id, "gcra"))
            .key(self.key(tenant_id, "leases"))
            .key(self.key(tenant_id, "tpm"))
            .key(self.key(tenant_id, &format!("quota:{month}")))
            .arg(interval_us)
            .arg(burst)
            .arg(max_concurrent)
            .arg(&lease_id)
            .arg(lease_ttl_us)
            .arg(tpm)
            .arg(cost.tokens)
            .arg(quota)
            // Quota counters outlive their month by a week for late settlements.
            .arg(secs_until_month_end + 7 * 86_400)
            .arg(budget)
            .arg(cost.spend_nanos)
            .invoke_async(&mut connection)
            .await
            .inspect_err(|_| {
                // The script may still run after we gave up on its answer
                // (it sat in a socket buffer while the link was down): the
                // lease it would add is removed on the next renewal round.
                if max_concurrent > 0 {
                    self.orphans()
                        .push((tenant_id.to_owned(), lease_id.clone(), ORPHAN_ROUNDS));
                }
            })?;
        let wait = Duration::from_micros(u64::try_from(wait_us).unwrap_or(0));
        let refusal = |kind| {
            Ok(Admission::Refused(LimitError::Exceeded {
                kind,
                retry_after: wait,
            }))
        };
        match outcome {
            0 => {}
            1 => return refusal(LimitKind::Requests),
            2 => return refusal(LimitKind::Concurrency),
            3 => return refusal(LimitKind::TokensPerMinute),
            5 => return Ok(Admission::Unseeded),
            6 => {
                return Ok(Admission::Refused(LimitError::Exceeded {
                    kind: LimitKind::MonthlyBudget,
                    retry_after: Duration::from_secs(
                        u64::try_from(secs_until_month_end).unwrap_or(1),
                    ),
                }));
            }
            _ => {
                return Ok(Admission::Refused(LimitError::Exceeded {
                    kind: LimitKind::MonthlyQuota,
                    retry_after: Duration::from_secs(
                        u64::try_from(secs_until_month_end).unwrap_or(1),
                    ),
                }));
            }
        }
        if max_concurrent > 0 {
            self.live().insert(lease_id.clone(), tenant_id.to_owned());
        }
        let headroom = Headroom {
            requests: gcra.map(|gcra| RateState {
                limit: gcra.burst,
                remaining: u32::try_from(remaining.max(0)).unwrap_or(0),
                window: gcra.window(),
            }),
            tokens: (tpm > 0).then(|| TokenState {
                limit: tpm,
                remaining: u64::try_from(tokens_left.max(0)).unwrap_or(0),
            }),
        };
        Ok(Admission::Granted(
            RedisGrant {
                lease_id,
                concurrency: max_concurrent > 0,
                bucket_tokens: if tpm > 0 { cost.tokens } else { 0 },
                quota_tokens: if quota > 0 { cost.tokens } else { 0 },
                budget_nanos: if budget > 0 { cost.spend_nanos } else { 0 },
                month,
                tokens_per_minute: tpm,
            },
            headroom,
        ))
    }

    /// Raises the tenant's `month` usage to at least `used` (the metered
    /// usage, when the counters were lost or never existed); a higher
    /// counter is left alone.
    pub async fn seed_quota(
        &self,
        tenant_id: &str,
        month: Month,
        used: MonthToDate,
        secs_until_month_end: i64,
    ) -> Result<(), redis::RedisError> {
        let mut connection = self.connection.clone();
        let spend = used
            .spend_nanos
            .map_or(-1, |spend| i64::try_from(spend).unwrap_or(i64::MAX));
        self.seed
            .key(self.key(tenant_id, &format!("quota:{month}")))
            .arg(used.tokens)
            .arg(secs_until_month_end + 7 * 86_400)
            .arg(spend)
            .invoke_async::<i64>(&mut connection)
            .await
            .map(|_| ())
    }

    /// The tenant's budget counters for `month`.
    pub async fn budget_counters(
        &self,
        tenant_id: &str,
        month: Month,
    ) -> Result<BudgetCounters, redis::RedisError> {
        let mut connection = self.connection.clone();
        let (spent, reserved): (Option<i64>, Option<i64>) = redis::cmd("HMGET")
            .arg(self.key(tenant_id, &format!("quota:{month}")))
            .arg("spent")
            .arg("spend_reserved")
            .query_async(&mut connection)
            .await?;
        let nanos = |v: Option<i64>| u64::try_from(v.unwrap_or(0)).unwrap_or(0);
        Ok(BudgetCounters {
            spent_nanos: nanos(spent),
            reserved_nanos: nanos(reserved),
        })
    }

    /// Settles grants of one tenant that share a month and a
    /// tokens-per-minute limit (see [`SettleGroup`]) in one script call.
    pub async fn settle_many(
        &self,
        tenant_id: &str,
        grants: &[(&RedisGrant, Used)],
    ) -> Result<(), redis::RedisError> {
        let Some((first, _)) = grants.first() else {
            return Ok(());
        };
        let (mut refund, mut reserved, mut used) = (0u64, 0u64, 0u64);
        let (mut spend_reserved, mut spent) = (0u64, 0u64);
        let mut leases = Vec::new();
        {
            let mut live = self.live();
            for (grant, consumed) in grants {
                let used_tokens = consumed.tokens;
                refund += grant.bucket_tokens.saturating_sub(used_tokens);
                reserved += grant.quota_tokens;
                used += used_tokens.min(grant.quota_tokens);
                spend_reserved += grant.budget_nanos;
                spent = spent.saturating_add(consumed.spend_nanos);
                if grant.concurrency {
                    // Ended: never renewed again, whether or not Redis
                    // answers now (then the lease expires by itself).
                    live.remove(&grant.lease_id);
                    leases.push(grant.lease_id.as_str());
                }
            }
        }
        let mut connection = self.connection.clone();
        let mut invocation = self.settle.key(self.key(tenant_id, "leases"));
        invocation
            .key(self.key(tenant_id, "tpm"))
            .key(self.key(tenant_id, &format!("quota:{}", first.month)))
            .arg(first.tokens_per_minute)
            .arg(refund)
            .arg(reserved)
            .arg(used)
            .arg(spend_reserved)
            .arg(spent)
            .arg(leases);
        let _: i64 = invocation.invoke_async(&mut connection).await?;
        Ok(())
    }
}
