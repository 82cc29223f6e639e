//! Failed authentications per peer: a token bucket per client address, so a
//! guesser of admin tokens or API keys gets `auth.failed_auth_burst`
//! failures at once and then `auth.failed_auth_per_minute`, while every
//! other client is untouched. An IPv6 peer is counted by its /64, which one
//! host can rotate through freely.
//!
//! Also counts failures by kind for `/metrics`, and logs them at most once
//! per [`LOG_EVERY`] with what happened since, so a flood cannot flood the
//! log. Knows addresses and counts; nothing of keys or gRPC.

use std::collections::HashMap;
use std::net::IpAddr;
use std::sync::Mutex;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

/// Why a credential was refused, as `/metrics` labels it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FailureKind {
    Missing,
    Malformed,
    /// An API key whose id is unknown or whose secret is wrong: one kind,
    /// as the client is told one thing.
    InvalidKey,
    RevokedKey,
    ExpiredKey,
    DeletedTenant,
    /// A credential that is neither a key nor the admin token.
    InvalidToken,
    /// Refused unchecked: the peer spent its failure budget.
    Throttled,
}

impl FailureKind {
    pub const ALL: [FailureKind; 8] = [
        FailureKind::Missing,
        FailureKind::Malformed,
        FailureKind::InvalidKey,
        FailureKind::RevokedKey,
        FailureKind::ExpiredKey,
        FailureKind::DeletedTenant,
        FailureKind::InvalidToken,
        FailureKind::Throttled,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            FailureKind::Missing => "missing",
            FailureKind::Malformed => "malformed",
            FailureKind::InvalidKey => "invalid_key",
            FailureKind::RevokedKey => "revoked_key",
            FailureKind::ExpiredKey => "expired_key",
            FailureKind::DeletedTenant => "deleted_tenant",
            FailureKind::InvalidToken => "invalid_token",
            FailureKind::Throttled => "throttled",
        }
    }

    fn index(self) -> usize {
        Self::ALL.iter().position(|k| *k == self).unwrap_or(0)
    }
}

/// How often failures are logged while they go on.
const LOG_EVERY: Duration = Duration::from_secs(10);
/// Peers tracked before full buckets are swept.
const SWEEP_AT: usize = 65_536;

struct Bucket {
    level: f64,
    at: Instant,
}

struct LogState {
    last: Option<Instant>,
    since: u64,
}

pub struct FailureThrottle {
    burst: f64,
    per_second: f64,
    peers: Mutex<HashMap<IpAddr, Bucket>>,
    /// How many addresses `peers` holds, readable without its lock.
    tracked: std::sync::atomic::AtomicUsize,
    counts: [AtomicU64; FailureKind::ALL.len()],
    log: Mutex<LogState>,
}

/// The address a peer is counted under.
fn peer_key(ip: IpAddr) -> IpAddr {
    match ip {
        IpAddr::V4(_) => ip,
        IpAddr::V6(v6) => match v6.to_ipv4_mapped() {
            Some(v4) => IpAddr::V4(v4),
            None => {
                let mut octets = v6.octets();
                octets[8..].fill(0);
                IpAddr::V6(octets.into())
            }
        },
    }
}

impl FailureThrottle {
    pub fn new(burst: u32, per_minute: u32) -> FailureThrottle {
        FailureThrottle {
            burst: f64::from(burst.max(1)),
            per_second: f64::from(per_minute.max(1)) / 60.0,
            peers: Mutex::new(HashMap::new()),
            tracked: Default::default(),
            counts: Default::default(),
            log: Mutex::new(LogState {
                last: None,
                since: 0,
            }),
        }
    }

    fn refill(&self, bucket: &mut Bucket, now: Instant) {
        let elapsed = now.saturating_duration_since(bucket.at).as_secs_f64();
        bucket.level = (bucket.level + elapsed * self.per_second).min(self.burst);
        bucket.at = now;
    }

    /// `Err(wait)` when the peer has spent its failures: refuse it without
    /// checking the credential.
    pub fn check(&self, peer: Option<IpAddr>) -> Result<(), Duration> {
        let Some(ip) = peer else { return Ok(()) };
        // Every request asks; while no address has failed, none takes the lock.
        if self.tracked.load(Ordering::Relaxed) == 0 {
            return Ok(());
        }
        let now = Instant::now();
        let mut peers = self.peers.lock().unwrap_or_else(|e| e.into_inner());
        let Some(bucket) = peers.get_mut(&peer_key(ip)) else {
            return Ok(());
        };
        self.refill(bucket, now);
        if bucket.level >= 1.0 {
            Ok(())
        } else {
            Err(Duration::from_secs_f64(
                (1.0 - bucket.level) / self.per_second,
            ))
        }
    }

    /// Counts a refusal of `kind` from `peer` (against its budget, unless it
    /// was itself a throttled refusal) and logs now and then.
    pub fn record(&self, peer: Option<IpAddr>, kind: FailureKind, detail: &str) {
        self.counts[kind.index()].fetch_add(1, Ordering::Relaxed);
        if kind != FailureKind::Throttled
            && let Some(ip) = peer
        {
            let now = Instant::now();
            let mut peers = self.peers.lock().unwrap_or_else(|e| e.into_inner());
            if peers.len() >= SWEEP_AT {
                let (burst, per_second) = (self.burst, self.per_second);
                peers.retain(|_, b| {
                    b.level + now.saturating_duration_since(b.at).as_secs_f64() * per_second < burst
                });
            }
            let bucket = peers.entry(peer_key(ip)).or_insert(Bucket {
                level: self.burst,
                at: now,
            });
            self.refill(bucket, now);
            bucket.level = (bucket.level - 1.0).max(0.0);
            self.tracked.store(peers.len(), Ordering::Relaxed);
        }
        let mut log = self.log.lock().unwrap_or_else(|e| e.into_inner());
        log.since += 1;
        if log.last.is_none_or(|at| at.elapsed() >= LOG_EVERY) {
            tracing::warn!(
                peer = ?peer,
                kind = kind.as_str(),
                detail,
                failures_since_last_log = log.since,
                "authentication failed"
            );
            log.last = Some(Instant::now());
            log.since = 0;
        }
    }

    /// Refusals of `kind` so far.
    pub fn count(&self, kind: FailureKind) -> u64 {
        self.counts[kind.index()].load(Ordering::Relaxed)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_peer_gets_its_burst_then_waits_and_others_are_untouched() {
        let throttle = FailureThrottle::new(3, 60);
        let guesser: IpAddr = "203.0.113.7".parse().unwrap();
        let other: IpAddr = "198.51.100.1".parse().unwrap();
        for _ in 0..3 {
            assert!(throttle.check(Some(guesser)).is_ok());
            throttle.record(Some(guesser), FailureKind::InvalidToken, "test");
        }
        let wait = throttle.check(Some(guesser)).expect_err("burst spent");
        assert!(
            wait <= Duration::from_secs(1) && wait > Duration::ZERO,
            "{wait:?}"
        );
        assert!(throttle.check(Some(other)).is_ok());
        assert!(throttle.check(None).is_ok(), "no address, no throttle");
        assert_eq!(throttle.count(FailureKind::InvalidToken), 3);
    }

    #[test]
    fn an_ipv6_host_cannot_escape_by_rotating_its_interface_id() {
        let throttle = FailureThrottle::new(2, 1);
        for host in ["2001:db8::1", "2001:db8::2", "2001:db8::ffff:1"] {
            throttle.record(Some(host.parse().unwrap()), FailureKind::InvalidKey, "test");
        }
        assert!(
            throttle
                .check(Some("2001:db8::9".parse().unwrap()))
                .is_err()
        );
        assert!(
            throttle
                .check(Some("2001:db8:0:1::1".parse().unwrap()))
                .is_ok()
        );
    }
}
