//! Client deadlines: the `grpc-timeout` header, counted from when the
//! request reached our first layer and ended a little early, so that our
//! answer (DEADLINE_EXCEEDED, usage recorded with that reason) comes before
//! tonic's own timer, which would answer CANCELLED.
//!
//! Knows the header format; nothing of the RPCs.

use std::time::{Duration, Instant};

/// The client's deadline, computed once by the auth layer and left in the
/// request's extensions for handlers that pass it on (to the serving queue).
#[derive(Debug, Clone, Copy)]
pub struct ClientDeadline(pub Instant);

/// The duration in a `grpc-timeout` header value (gRPC over HTTP/2: up to
/// 8 digits and a unit).
pub fn grpc_timeout(value: &str) -> Option<Duration> {
    let (digits, unit) = value.split_at(value.len().checked_sub(1)?);
    let amount: u64 = digits.parse().ok()?;
    Some(match unit {
        "H" => Duration::from_secs(amount.saturating_mul(3600)),
        "M" => Duration::from_secs(amount.saturating_mul(60)),
        "S" => Duration::from_secs(amount),
        "m" => Duration::from_millis(amount),
        "u" => Duration::from_micros(amount),
        "n" => Duration::from_nanos(amount),
        _ => return None,
    })
}

/// The instant by which we answer a request received at `received` with
/// `timeout`.
pub fn deadline(received: Instant, timeout: Duration) -> Instant {
    let margin = (timeout / 2).min(Duration::from_millis(5));
    received + timeout - margin
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn timeouts_parse_in_every_unit_and_garbage_does_not() {
        for (value, expected) in [
            ("2H", Duration::from_secs(7200)),
            ("3M", Duration::from_secs(180)),
            ("4S", Duration::from_secs(4)),
            ("250m", Duration::from_millis(250)),
            ("99u", Duration::from_micros(99)),
            ("7n", Duration::from_nanos(7)),
        ] {
            assert_eq!(grpc_timeout(value), Some(expected), "{value}");
        }
        for bad in ["", "5", "5x", "m", "-1m"] {
            assert_eq!(grpc_timeout(bad), None, "{bad:?}");
        }
    }

    #[test]
    fn the_deadline_comes_early_but_never_before_receipt() {
        let now = Instant::now();
        assert_eq!(
            deadline(now, Duration::from_secs(1)),
            now + Duration::from_millis(995)
        );
        assert_eq!(
            deadline(now, Duration::from_millis(2)),
            now + Duration::from_millis(1)
        );
    }
}
