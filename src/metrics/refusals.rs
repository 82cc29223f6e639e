//! Every RESOURCE_EXHAUSTED (gRPC) and 429 (HTTP) this gateway answers,
//! counted by cause for `/metrics`. Each front end classifies its own
//! refusals (`api::refusals` reads gRPC responses as they leave, the HTTP
//! API's one error mapping records its 429s); this module only counts.
//!
//! Knows neither protocol nor the components that refused.

use std::sync::atomic::{AtomicU64, Ordering};

/// Why a request was refused with RESOURCE_EXHAUSTED (or 429).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RefusalCause {
    /// A tenant limit (rate, tokens per minute, concurrency, quota), on
    /// Inference or Billing.
    TenantLimit,
    /// The model's queue is full.
    QueueFull,
    /// The client's address failed authentication too often.
    AuthThrottled,
    /// The request message was over the decoding limit.
    MessageTooLarge,
    Other,
}

impl RefusalCause {
    pub const ALL: [RefusalCause; 5] = [
        RefusalCause::TenantLimit,
        RefusalCause::QueueFull,
        RefusalCause::AuthThrottled,
        RefusalCause::MessageTooLarge,
        RefusalCause::Other,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            RefusalCause::TenantLimit => "tenant_limit",
            RefusalCause::QueueFull => "queue_full",
            RefusalCause::AuthThrottled => "auth_throttled",
            RefusalCause::MessageTooLarge => "message_too_large",
            RefusalCause::Other => "other",
        }
    }

    /// Its place in [`RefusalCause::ALL`] (and in the counters).
    fn index(self) -> usize {
        match self {
            RefusalCause::TenantLimit => 0,
            RefusalCause::QueueFull => 1,
            RefusalCause::AuthThrottled => 2,
            RefusalCause::MessageTooLarge => 3,
            RefusalCause::Other => 4,
        }
    }
}

#[derive(Debug, Default)]
pub struct Refusals {
    counts: [AtomicU64; RefusalCause::ALL.len()],
}

impl Refusals {
    pub fn record(&self, cause: RefusalCause) {
        self.counts[cause.index()].fetch_add(1, Ordering::Relaxed);
    }

    pub fn count(&self, cause: RefusalCause) -> u64 {
        self.counts[cause.index()].load(Ordering::Relaxed)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_cause_has_its_own_counter_in_order() {
        let refusals = Refusals::default();
        for (n, cause) in RefusalCause::ALL.into_iter().enumerate() {
            assert_eq!(cause.index(), n, "{cause:?}");
            refusals.record(cause);
            assert_eq!(refusals.count(cause), 1, "{cause:?}");
        }
    }
}
