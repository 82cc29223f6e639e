//! Remembers when each key was last used and writes it to the database in
//! batches, so authentication never waits on a write.

use std::collections::HashMap;
use std::sync::Mutex;
use std::time::Duration;

use tokio_util::sync::CancellationToken;

use crate::store::now_us;
use crate::tenancy::TenancyService;

#[derive(Default)]
pub struct LastUsedRecorder {
    pending: Mutex<HashMap<String, i64>>,
}

impl LastUsedRecorder {
    pub fn record(&self, key_id: &str) {
        let mut pending = self.pending.lock().unwrap_or_else(|e| e.into_inner());
        pending.insert(key_id.to_owned(), now_us());
    }

    fn take(&self) -> Vec<(String, i64)> {
        let mut pending = self.pending.lock().unwrap_or_else(|e| e.into_inner());
        pending.drain().collect()
    }

    /// Writes what is pending; on failure the times go back for the next try.
    pub async fn flush(&self, tenancy: &TenancyService) {
        let uses = self.take();
        if uses.is_empty() {
            return;
        }
        if let Err(e) = tenancy.touch_last_used(&uses).await {
            tracing::warn!(error = %e, keys = uses.len(), "cannot record key last-use times; will retry");
            let mut pending = self.pending.lock().unwrap_or_else(|e| e.into_inner());
            for (key_id, at) in uses {
                let slot = pending.entry(key_id).or_insert(at);
                *slot = (*slot).max(at);
            }
        }
    }

    /// Flushes every `interval` until `stop`, then once more.
    pub async fn run(&self, tenancy: TenancyService, interval: Duration, stop: CancellationToken) {
        loop {
            tokio::select! {
                () = tokio::time::sleep(interval) => self.flush(&tenancy).await,
                () = stop.cancelled() => break,
            }
        }
        self.flush(&tenancy).await;
    }
}
