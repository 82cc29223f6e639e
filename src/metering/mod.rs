//! Metering: every admitted request's usage recorded in the database exactly
//! once, through crashes and database outages.
//!
//! The path: [`Metering::record`] appends the event to the local spool and
//! returns once it is on disk (group commit with fsync); only then may the
//! request's final response be sent. [`UsageWriter`] ships sealed segments
//! in batches; the database makes `(tenant, request_id)` unique in the same
//! transaction as the insert and keeps hourly rollups in step. A segment is
//! deleted after its events commit, and replayed at start if it is still
//! there, which at worst inserts nothing new.
//!
//! Knows usage events, the spool directory and the database; knows nothing
//! of gRPC, tenants' limits or how usage was produced.

mod error;
mod event;
pub mod query;
mod repo;
pub mod spool;
mod writer;

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use serde::{Deserialize, Serialize};

pub use error::MeteringError;
pub use event::{FinishReason, HOUR_US, UsageEvent};
pub use query::{Grouping, UsageTotals};
pub(crate) use repo::create_partition;
pub use repo::{ARCHIVE_LOCK_KEY, Inserted, insert_batch};
pub use spool::{Spool, SpoolSettings, SpoolStats, WhenDurable};
pub use writer::{ShipReport, UsageWriter};

/// What happens when the spool outgrows `spool_max_bytes` (the database has
/// been down long enough to fill it).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum SpoolFullPolicy {
    /// New requests get UNAVAILABLE; usage already spooled is safe.
    Reject,
    /// Keep serving and keep spooling; an error is logged on each round.
    KeepServing,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct MeteringSettings {
    /// Spool directory; default `<data_dir>/spool`.
    pub spool_dir: Option<PathBuf>,
    pub spool_max_bytes: u64,
    pub on_spool_full: SpoolFullPolicy,
    /// `[metering.spool]`: segment size and fsync.
    pub spool: SpoolSettings,
    /// How often sealed usage is shipped to the database.
    #[serde(with = "humantime_serde")]
    pub ship_interval: Duration,
    /// Events per database statement.
    pub batch_size: usize,
}

impl Default for MeteringSettings {
    fn default() -> Self {
        MeteringSettings {
            spool_dir: None,
            spool_max_bytes: 1 << 30,
            on_spool_full: SpoolFullPolicy::Reject,
            spool: SpoolSettings::default(),
            ship_interval: spool::DEFAULT_SHIP_INTERVAL,
            batch_size: 5000,
        }
    }
}

/// The one way usage leaves the serving side.
pub struct Metering {
    spool: Arc<Spool>,
    max_bytes: u64,
    policy: SpoolFullPolicy,
}

impl Metering {
    pub fn new(spool: Arc<Spool>, settings: &MeteringSettings) -> Metering {
        Metering {
            spool,
            max_bytes: settings.spool_max_bytes,
            policy: settings.on_spool_full,
        }
    }

    /// Whether new requests may be admitted, given the spool's size.
    pub fn admitting(&self) -> Result<(), MeteringError> {
        let bytes = self.spool.stats().bytes();
        if bytes > self.max_bytes && self.policy == SpoolFullPolicy::Reject {
            return Err(MeteringError::SpoolFull { bytes });
        }
        Ok(())
    }

    /// Makes `event` durable; returns once it is on disk.
    pub async fn record(&self, event: &UsageEvent) -> Result<(), MeteringError> {
        self.spool.append(event).await
    }

    /// As [`Metering::record`] without waiting, for threads outside the
    /// async runtime: `then` runs once the event is durable.
    pub fn record_then(&self, event: &UsageEvent, then: WhenDurable) {
        self.spool.append_then(event, then);
    }

    /// Returns once every event handed over before it is durable and its
    /// completion (for [`Metering::record_then`]) has run.
    pub async fn flush(&self) -> Result<(), MeteringError> {
        self.spool.seal().await
    }

    pub fn stats(&self) -> &SpoolStats {
        self.spool.stats()
    }
}
