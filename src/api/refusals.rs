//! Every RESOURCE_EXHAUSTED the gRPC services answer, counted by cause:
//! read off the response as it leaves (a refusal is always a trailers-only
//! response, its status in the headers), so no handler can refuse without
//! being counted. The counters are `metrics::refusals`.
//!
//! Knows gRPC response headers and the messages of our refusals; nothing
//! of the components that refused.

use tonic::codegen::http;

use crate::metrics::refusals::{RefusalCause, Refusals};

/// The cause of a refusal by its (percent-encoded) `grpc-message`.
fn cause_of(message: &[u8]) -> RefusalCause {
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

/// Counts the response if it is a RESOURCE_EXHAUSTED.
pub fn observe<B>(refusals: &Refusals, response: &http::Response<B>) {
    let headers = response.headers();
    if headers
        .get("grpc-status")
        .is_some_and(|code| code.as_bytes() == b"8")
    {
        let message = headers
            .get("grpc-message")
            .map_or(&b""[..], |m| m.as_bytes());
        refusals.record(cause_of(message));
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
            observe(&refusals, &response);
            assert_eq!(refusals.count(cause), 1, "{message}");
        }
        let ok = http::Response::builder()
            .header("grpc-status", "0")
            .body(())
            .expect("response");
        observe(&refusals, &ok);
        let total: u64 = RefusalCause::ALL.iter().map(|c| refusals.count(*c)).sum();
        assert_eq!(total, 3);
    }
}
