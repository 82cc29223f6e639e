//! Ships sealed spool segments into the database, oldest first, and deletes
//! each segment only after the transactions holding all its events commit.
//! If the database is down, segments wait on disk and ship when it returns.

use std::sync::Arc;
use std::time::Duration;

use tokio_util::sync::CancellationToken;

use super::spool::{Spool, read_segment};
use super::{MeteringError, repo};
use crate::store::Db;

/// What one shipping round did.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct ShipReport {
    pub segments: usize,
    /// Events read from the spool.
    pub events: usize,
    /// Of those, events not already recorded (the rest were replays).
    pub inserted: u64,
    /// Segments that had a torn or corrupt tail cut off.
    pub torn: usize,
    /// Events of archived months, set aside rather than inserted.
    pub refused: usize,
}

pub struct UsageWriter {
    spool: Arc<Spool>,
    db: Db,
    batch_size: usize,
}

impl UsageWriter {
    pub fn new(spool: Arc<Spool>, db: Db, batch_size: usize) -> UsageWriter {
        UsageWriter {
            spool,
            db,
            batch_size: batch_size.max(1),
        }
    }

    /// Seals the current segment and ships every sealed one.
    pub async fn ship(&self) -> Result<ShipReport, MeteringError> {
        self.spool.seal().await?;
        let mut report = ShipReport::default();
        for segment in self.spool.sealed_segments()? {
            let path = segment.clone();
            let read = tokio::task::spawn_blocking(move || read_segment(&path))
                .await
                .map_err(|e| MeteringError::Io {
                    path: segment.clone(),
                    source: std::io::Error::other(e.to_string()),
                })??;
            for chunk in read.events.chunks(self.batch_size) {
                let batch = repo::insert_batch(&self.db, chunk).await?;
                report.inserted += batch.new;
                if !batch.refused.is_empty() {
                    let file = self.spool.set_aside(&batch.refused)?;
                    let periods: std::collections::BTreeSet<String> = batch
                        .refused
                        .iter()
                        .map(|e| crate::calendar::Month::of_us(e.finished_at_us).to_string())
                        .collect();
                    tracing::error!(
                        events = batch.refused.len(),
                        ?periods,
                        file = %file.display(),
                        "usage of archived months refused and set aside: restore the month \
                         (ascendctl billing restore) to look at it"
                    );
                    report.refused += batch.refused.len();
                }
            }
            self.spool.remove(&segment)?;
            self.spool.stats().shipped(read.events.len() as u64);
            report.segments += 1;
            report.events += read.events.len();
            report.torn += usize::from(read.truncated_at.is_some());
        }
        Ok(report)
    }

    /// Ships every `interval` until `stop`, then once more (bounded by
    /// `final_deadline`) so a graceful shutdown leaves nothing behind that
    /// the database could take.
    pub async fn run(self, interval: Duration, final_deadline: Duration, stop: CancellationToken) {
        loop {
            tokio::select! {
                () = tokio::time::sleep(interval) => {}
                () = stop.cancelled() => break,
            }
            self.ship_logged().await;
        }
        if tokio::time::timeout(final_deadline, self.ship_logged())
            .await
            .is_err()
        {
            tracing::warn!("usage still spooled at shutdown; it ships at the next start");
        }
        self.spool.close();
    }

    async fn ship_logged(&self) {
        match self.ship().await {
            Ok(report) if report.events > 0 => {
                tracing::debug!(?report, "usage shipped");
            }
            Ok(_) => {}
            Err(e) => {
                self.spool.stats().count_write_error();
                tracing::warn!(error = %e, "usage not shipped yet; it stays in the spool");
            }
        }
    }
}
