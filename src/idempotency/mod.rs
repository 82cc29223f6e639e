//! Idempotency of client request ids, decided at admission.
//!
//! The first request with a `(tenant, request_id)` claims it atomically in
//! the database every replica shares, before any limit is checked or any
//! work is done. While that request runs, a duplicate is refused
//! ([`ClaimError::InProgress`]); once it completed, a duplicate within
//! `idempotency.retention` gets the stored final answer and costs nothing
//! ([`Claimed::Replay`]); after the retention, or after the first request
//! was refused or failed (the claim is released), the id may be claimed
//! again as the next *attempt* (the same attempt number when the one
//! released never reached serving, so nothing was metered under it). Each attempt is metered under its own key
//! ([`Claim::metered_request_id`]), so every execution is billed exactly
//! once and no replay ever is.
//!
//! When the database cannot be reached, claims fall back on this process
//! alone (concurrent duplicates on this node are still refused, and each
//! execution is metered under a key of its own, so nothing is served free;
//! replays need the database). A running claim whose gateway died is
//! abandoned after `idempotency.in_progress_ttl`.
//!
//! Owns the claims table. The stored answer is opaque bytes: the API layer
//! encodes and decodes it; this module knows nothing of gRPC or serving.

mod repo;

pub use repo::claim_days;

use std::collections::HashSet;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

use crate::error::{Classified, ErrorKind};
use crate::store::{Backend, Db, now_us};

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct IdempotencySettings {
    /// How long a completed request's answer is replayed for a duplicate.
    #[serde(with = "humantime_serde")]
    pub retention: Duration,
    /// How long a running claim holds its id when nothing completes or
    /// releases it (its gateway died). Longer than the longest request.
    #[serde(with = "humantime_serde")]
    pub in_progress_ttl: Duration,
}

impl Default for IdempotencySettings {
    fn default() -> Self {
        IdempotencySettings {
            retention: Duration::from_secs(24 * 3600),
            in_progress_ttl: Duration::from_secs(600),
        }
    }
}

/// A digest of the request as the client sent it, without its id: the same
/// id with another request is refused, not answered with the wrong text.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Fingerprint(String);

impl Fingerprint {
    pub fn of(bytes: &[u8]) -> Fingerprint {
        Fingerprint(crate::hex::encode(&Sha256::digest(bytes)))
    }

    fn as_str(&self) -> &str {
        &self.0
    }
}

/// A client request id under a tenant.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct RequestKey {
    pub tenant_id: String,
    pub request_id: String,
}

#[derive(Debug, thiserror::Error)]
pub enum ClaimError {
    #[error("request_id already in progress ({0:?}); wait for it, or use a new request_id")]
    InProgress(String),
    #[error(
        "invalid `request_id`: {0:?} was already used for a different request (within idempotency.retention); use a new request_id"
    )]
    Mismatch(String),
}

impl Classified for ClaimError {
    fn kind(&self) -> ErrorKind {
        match self {
            ClaimError::InProgress(_) => ErrorKind::Aborted,
            ClaimError::Mismatch(_) => ErrorKind::InvalidArgument,
        }
    }
}

/// What a claim found.
pub enum Claimed {
    /// This request owns the id: run it, then complete or release the claim.
    New(Claim),
    /// The id's request completed within the retention: its stored answer.
    Replay(Vec<u8>),
}

/// How a database claim attempt ended, from the repository.
enum Decision {
    Won(i64),
    Running,
    Completed {
        fingerprint: String,
        answer: Option<Vec<u8>>,
    },
}

enum Finish {
    Complete(Vec<u8>),
    /// Given up; `worked`: the attempt ran and its usage is metered.
    Release {
        worked: bool,
    },
}

struct Pending {
    key: RequestKey,
    attempt: Attempt,
    finish: Finish,
}

#[derive(Debug, Clone)]
enum Attempt {
    /// Claimed in the database, with its attempt number.
    Shared(i64),
    /// Claimed in this process only, while the database was unreachable.
    Local(String),
}

/// After a claim found the database down, claims within this long go
/// straight to the local fallback instead of each waiting for a connection.
const OUTAGE_SHORTCUT: Duration = Duration::from_secs(1);
/// How often answers past their retention are dropped, days ahead created
/// and days past the window dropped.
const SWEEP_EVERY: Duration = Duration::from_secs(300);
/// Claims partitions made ahead of today (PostgreSQL).
const DAYS_AHEAD: i64 = 2;

/// What one sweep did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SweepReport {
    /// Stored answers dropped past their retention.
    pub answers_dropped: u64,
    /// Claims removed past the window: day partitions on PostgreSQL, rows
    /// on SQLite.
    pub removed: u64,
}

pub struct Idempotency {
    db: Db,
    settings: IdempotencySettings,
    /// Ids claimed by this process while the database was unreachable.
    local: Mutex<HashSet<RequestKey>>,
    last_outage: Mutex<Option<Instant>>,
    finishes: mpsc::UnboundedSender<Pending>,
    replays: std::sync::atomic::AtomicU64,
    conflicts: std::sync::atomic::AtomicU64,
    /// The last day whose claims partition this process made sure of.
    ready_through_day: std::sync::atomic::AtomicI64,
}

/// Receiver of claim completions and releases for [`Idempotency::run`].
pub struct PendingFinishes(mpsc::UnboundedReceiver<Pending>);

/// An id this request owns. Complete it with the final answer; dropped
/// without that, it is released in the background, so a retry may run.
pub struct Claim {
    owner: Arc<Idempotency>,
    key: RequestKey,
    attempt: Option<Attempt>,
    /// Work began: usage will be metered under this attempt's key.
    worked: bool,
}

impl std::fmt::Debug for Claim {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Claim")
            .field("key", &self.key)
            .field("attempt", &self.attempt)
            .finish_non_exhaustive()
    }
}

impl Claim {
    /// The id this attempt's usage is metered under: the request id for the
    /// first attempt, `"<id> #<n>"` for attempt n (a space cannot occur in a
    /// client's id, so no client id collides with it).
    pub fn metered_request_id(&self) -> String {
        match &self.attempt {
            Some(Attempt::Shared(0)) | None => self.key.request_id.clone(),
            Some(Attempt::Shared(n)) => format!("{} #{n}", self.key.request_id),
            Some(Attempt::Local(tag)) => format!("{} #{tag}", self.key.request_id),
        }
    }

    /// Says that the request went to serving: whatever happens now, usage
    /// is metered under this attempt, so a later claim takes the next one.
    pub fn mark_started(&mut self) {
        self.worked = true;
    }

    /// Stores the final answer for duplicates within the retention. Waits
    /// for the database, so a duplicate sent after the client saw the answer
    /// is replayed rather than refused as in progress.
    pub async fn complete(mut self, answer: Vec<u8>) {
        if let Some(attempt) = self.attempt.take() {
            let pending = Pending {
                key: self.key.clone(),
                attempt,
                finish: Finish::Complete(answer),
            };
            finish_uncancellable(&self.owner, pending).await;
        }
    }
}

impl Claim {
    /// Gives the id up now (the request was refused), so that a retry sent
    /// as soon as the client reads the refusal finds it free.
    pub async fn release(mut self) {
        if let Some(attempt) = self.attempt.take() {
            let pending = Pending {
                key: self.key.clone(),
                attempt,
                finish: Finish::Release {
                    worked: self.worked,
                },
            };
            finish_uncancellable(&self.owner, pending).await;
        }
    }
}

impl Drop for Claim {
    fn drop(&mut self) {
        if let Some(attempt) = self.attempt.take() {
            let _ = self.owner.finishes.send(Pending {
                key: self.key.clone(),
                attempt,
                finish: Finish::Release {
                    worked: self.worked,
                },
            });
        }
    }
}

impl Idempotency {
    pub fn new(db: Db, settings: IdempotencySettings) -> (Arc<Idempotency>, PendingFinishes) {
        let (finishes, receiver) = mpsc::unbounded_channel();
        let idempotency = Arc::new(Idempotency {
            db,
            settings,
            local: Mutex::new(HashSet::new()),
            last_outage: Mutex::new(None),
            finishes,
            replays: Default::default(),
            conflicts: Default::default(),
            ready_through_day: std::sync::atomic::AtomicI64::new(i64::MIN),
        });
        (idempotency, PendingFinishes(receiver))
    }

    /// How long a claim is kept: a duplicate within it is refused or
    /// replayed. The answers' retention, plus the longest a claim may stay
    /// running, plus one day (claims go a whole day at a time).
    pub fn window(&self) -> Duration {
        self.settings.retention + self.settings.in_progress_ttl + Duration::from_secs(86_400)
    }

    /// Drops answers past their retention, makes sure of the days ahead,
    /// and removes claims made before the window. Every replica may run it.
    pub async fn sweep(&self, now: i64) -> Result<SweepReport, sqlx::Error> {
        let answers_dropped = repo::drop_expired_answers(&self.db, now).await?;
        self.ensure_today(now).await?;
        // Day D's claims were all made before D + 1, so none matters after
        // D + 1 + in_progress_ttl + retention: D goes once a day past that.
        let horizon = now
            .saturating_sub(micros(self.settings.retention))
            .saturating_sub(micros(self.settings.in_progress_ttl));
        let first_kept = horizon.div_euclid(repo::DAY_US) - 1;
        let removed = repo::drop_days_before(&self.db, first_kept).await?;
        Ok(SweepReport {
            answers_dropped,
            removed,
        })
    }

    /// Today's claims partition and the next days' exist (PostgreSQL).
    async fn ensure_today(&self, now: i64) -> Result<(), sqlx::Error> {
        use std::sync::atomic::Ordering;
        let today = now.div_euclid(repo::DAY_US);
        if self.db.backend() != Backend::Postgres
            || self.ready_through_day.load(Ordering::Relaxed) > today
        {
            return Ok(());
        }
        repo::ensure_days(&self.db, today, today + DAYS_AHEAD).await?;
        self.ready_through_day
            .fetch_max(today + DAYS_AHEAD, Ordering::Relaxed);
        Ok(())
    }

    /// Duplicates answered from a stored answer so far.
    pub fn replay_count(&self) -> u64 {
        self.replays.load(std::sync::atomic::Ordering::Relaxed)
    }

    /// Duplicates refused (in progress, or another request) so far.
    pub fn conflict_count(&self) -> u64 {
        self.conflicts.load(std::sync::atomic::Ordering::Relaxed)
    }

    fn in_outage(&self) -> bool {
        let last = self.last_outage.lock().unwrap_or_else(|e| e.into_inner());
        last.is_some_and(|at| at.elapsed() < OUTAGE_SHORTCUT)
    }

    /// Claims `key` for a request with this fingerprint.
    pub async fn claim(
        self: &Arc<Self>,
        key: RequestKey,
        fingerprint: &Fingerprint,
    ) -> Result<Claimed, ClaimError> {
        let outcome = self.claim_shared(&key, fingerprint).await;
        let count = |counter: &std::sync::atomic::AtomicU64| {
            counter.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        };
        match outcome {
            Ok(Some(Ok(claimed))) => {
                if matches!(claimed, Claimed::Replay(_)) {
                    count(&self.replays);
                }
                Ok(claimed)
            }
            Ok(Some(Err(refused))) => {
                count(&self.conflicts);
                Err(refused)
            }
            // The database is unreachable: this process decides alone.
            Ok(None) | Err(()) => self
                .claim_local(key)
                .inspect_err(|_| count(&self.conflicts)),
        }
    }

    /// `Ok(None)`: no decision (the database kept changing under us);
    /// `Err(())`: the database is unreachable.
    async fn claim_shared(
        self: &Arc<Self>,
        key: &RequestKey,
        fingerprint: &Fingerprint,
    ) -> Result<Option<Result<Claimed, ClaimError>>, ()> {
        if self.in_outage() {
            return Err(());
        }
        for _ in 0..3 {
            let now = now_us();
            if let Err(error) = self.ensure_today(now).await {
                tracing::warn!(%error, "cannot create the day's idempotency claims partition");
            }
            let decision = repo::claim(
                &self.db,
                key,
                fingerprint.as_str(),
                now,
                now.saturating_add(micros(self.settings.in_progress_ttl)),
            )
            .await;
            let decision = match decision {
                Ok(decision) => decision,
                Err(error) if repo::is_missing_day(&error) => {
                    // Another process dropped what this one thought ready,
                    // or the clock moved on: make the day and try again.
                    self.ready_through_day
                        .store(i64::MIN, std::sync::atomic::Ordering::Relaxed);
                    continue;
                }
                Err(error) => {
                    *self.last_outage.lock().unwrap_or_else(|e| e.into_inner()) =
                        Some(Instant::now());
                    tracing::warn!(%error, "idempotency claims unavailable: deciding on this node alone");
                    return Err(());
                }
            };
            return Ok(Some(match decision {
                Decision::Won(attempt) => Ok(Claimed::New(Claim {
                    owner: self.clone(),
                    key: key.clone(),
                    attempt: Some(Attempt::Shared(attempt)),
                    worked: false,
                })),
                Decision::Running => Err(ClaimError::InProgress(key.request_id.clone())),
                Decision::Completed {
                    fingerprint: stored,
                    answer,
                } => {
                    if stored != fingerprint.as_str() {
                        Err(ClaimError::Mismatch(key.request_id.clone()))
                    } else if let Some(answer) = answer {
                        Ok(Claimed::Replay(answer))
                    } else {
                        // Swept just as it expired: claim anew.
                        continue;
                    }
                }
            }));
        }
        tracing::warn!(
            request_id = %key.request_id,
            "no idempotency decision from the database after three tries: deciding on this node alone"
        );
        Ok(None)
    }

    fn claim_local(self: &Arc<Self>, key: RequestKey) -> Result<Claimed, ClaimError> {
        let mut local = self.local.lock().unwrap_or_else(|e| e.into_inner());
        if !local.insert(key.clone()) {
            return Err(ClaimError::InProgress(key.request_id));
        }
        Ok(Claimed::New(Claim {
            owner: self.clone(),
            key,
            attempt: Some(Attempt::Local(format!(
                "local-{}",
                uuid::Uuid::now_v7().simple()
            ))),
            worked: false,
        }))
    }

    async fn finish(&self, pending: Pending) {
        match &pending.attempt {
            Attempt::Local(_) => {
                let mut local = self.local.lock().unwrap_or_else(|e| e.into_inner());
                local.remove(&pending.key);
            }
            Attempt::Shared(attempt) => {
                let now = now_us();
                let result = match &pending.finish {
                    Finish::Complete(answer) => {
                        repo::complete(
                            &self.db,
                            &pending.key,
                            *attempt,
                            answer,
                            now.saturating_add(micros(self.settings.retention)),
                        )
                        .await
                    }
                    Finish::Release { worked } => {
                        repo::release(&self.db, &pending.key, *attempt, *worked).await
                    }
                };
                if let Err(error) = result {
                    // The claim stays running until in_progress_ttl: a
                    // duplicate is refused, never served twice.
                    tracing::warn!(%error, request_id = %pending.key.request_id, "cannot finish an idempotency claim");
                }
            }
        }
    }

    /// Releases the claims of requests that ended without an answer, and
    /// drops answers past their retention, until `stop`; then finishes what
    /// is queued.
    pub async fn run(self: Arc<Self>, mut pending: PendingFinishes, stop: CancellationToken) {
        let mut sweep = tokio::time::interval(SWEEP_EVERY);
        loop {
            tokio::select! {
                received = pending.0.recv() => match received {
                    Some(finish) => self.finish(finish).await,
                    None => return,
                },
                _ = sweep.tick() => {
                    if let Err(error) = self.sweep(now_us()).await {
                        tracing::warn!(%error, "idempotency sweep failed; trying again later");
                    }
                }
                () = stop.cancelled() => break,
            }
        }
        while let Ok(finish) = pending.0.try_recv() {
            self.finish(finish).await;
        }
    }
}

/// Finishes a claim on a task of its own and waits for it: a caller cut off
/// by its deadline or a disconnect must not leave the id "in progress".
async fn finish_uncancellable(owner: &Arc<Idempotency>, pending: Pending) {
    let owner = owner.clone();
    let _ = tokio::spawn(async move { owner.finish(pending).await }).await;
}

fn micros(d: Duration) -> i64 {
    i64::try_from(d.as_micros()).unwrap_or(i64::MAX)
}
