//! Every RESOURCE_EXHAUSTED this gateway answers, counted by cause for
//! `/metrics`: read off the response as it leaves (a refusal is always a
//! trailers-only response, its status in the headers), so no handler can
//! refuse without being counted. The HTTP front end's 429s are counted by
//! its one error mapping.
//!
//! Knows gRPC response headers and the messages of our refusals; nothing
//! of the components that refused.

use std::sync::atomic::{AtomicU64, Ordering};

use tonic::codegen::http;

/// Why a request was refused with RESOURCE_EXHAUSTED.
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

    /// The cause of a refusal by its (percent-encoded) `grpc-message`.
    fn of(message: &[u8]) -> RefusalCause {
        let contains = |needle: &[u8]| message.windows(needle.len()).any(|w| w == needle);
        if contains(b"tenant%20limit") || contains(b"the%20request%20needs") {
            RefusalCause::TenantLimit
        } else if contains(b"queue%20holds") {
            RefusalCause::QueueFull
        } else if contains(b"failed%20authentications") {
            RefusalCause::AuthThrottled
        } else if contains(b"message%20length%20too%20large") {
            RefusalCause::MessageTooLarge
        } else {
            RefusalCause::Other
        }
    }

    fn index(self) -> usize {
        Self::ALL.iter().position(|c| *c == self).unwrap_or(0)
    }
}

#[derive(Debug, Default)]
pub struct Refusals {
    counts: [AtomicU64; RefusalCause::ALL.len()],
}

impl Refusals {
    /// Counts the response if it is a RESOURCE_EXHAUSTED.
    pub fn observe<B>(&self, response: &http::Response<B>) {
        let headers = response.headers();
        if headers
            .get("grpc-status")
            .is_some_and(|code| code.as_bytes() == b"8")
        {
            let message = headers
                .get("grpc-message")
                .map_or(&b""[..], |m| m.as_bytes());
            self.counts[RefusalCause::of(message).index()].fetch_add(1, Ordering::Relaxed);
        }
    }

    /// Counts a refusal the HTTP front end answered (429).
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
    fn causes_are_read_from_our_own_messages() {
        let refusals = Refusals::default();
        for (message, cause) in [
            (
                "tenant%20limit%20%60requests_per_second%60%20reached",
                RefusalCause::TenantLimit,
            ),
            (
                "the%20model's%20queue%20holds%20its%20maximum",
                RefusalCause::QueueFull,
            ),
            ("something%20else", RefusalCause::Other),
        ] {
            let response = http::Response::builder()
                .header("grpc-status", "8")
                .header("grpc-message", message)
                .body(())
                .expect("response");
            refusals.observe(&response);
            assert_eq!(refusals.count(cause), 1, "{message}");
        }
        let ok = http::Response::builder()
            .header("grpc-status", "0")
            .body(())
            .expect("response");
        refusals.observe(&ok);
        let total: u64 = RefusalCause::ALL.iter().map(|c| refusals.count(*c)).sum();
        assert_eq!(total, 3);
    }
}
