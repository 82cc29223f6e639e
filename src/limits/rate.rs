//! The request-rate parameters both backends compute with: the GCRA
//! emission interval and burst of a tenant's `requests_per_second`.
//!
//! Tenancy refuses rates outside [`Limits::MIN_REQUESTS_PER_SECOND`] ..=
//! [`Limits::MAX_REQUESTS_PER_SECOND`] and windows (burst / rate) beyond
//! [`Limits::MAX_RATE_WINDOW_SECS`]; this module clamps to the same bounds again, so a
//! value stored before those checks existed (or written straight into the
//! database) can never overflow a `Duration`, governor's nanosecond
//! arithmetic or the Redis script's microseconds. Knows nothing of tenants
//! beyond their [`Limits`].

use std::time::Duration;

use crate::tenancy::Limits;

/// The longest time a spent burst may take to refill. Keeps governor's
/// tolerance (interval x burst, in u64 nanoseconds) far from overflow.
const MAX_RATE_WINDOW: Duration = Duration::from_secs(Limits::MAX_RATE_WINDOW_SECS);

/// A request rate as the GCRA sees it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Gcra {
    /// Time between two requests at the sustained rate.
    pub interval: Duration,
    /// Requests allowed at once.
    pub burst: u32,
}

impl Gcra {
    /// The tenant's rate limit, clamped into the supported bounds; `None`
    /// when the tenant has none (or a stored rate that is not a number).
    pub fn of(limits: &Limits) -> Option<Gcra> {
        let rps = limits.requests_per_second.filter(|r| !r.is_nan())?;
        let rps = rps.clamp(
            Limits::MIN_REQUESTS_PER_SECOND,
            Limits::MAX_REQUESTS_PER_SECOND,
        );
        // Whole nanoseconds: 1 ns at 1e9 rps, 86,400 s at the minimum.
        let interval_ns = (1e9 / rps).ceil().max(1.0);
        let interval = Duration::from_nanos(interval_ns as u64);
        let max_burst_for_window = MAX_RATE_WINDOW.as_nanos() / interval.as_nanos().max(1);
        let burst = limits.burst.unwrap_or(1).clamp(1, Limits::MAX_BURST).min(
            u32::try_from(max_burst_for_window)
                .unwrap_or(u32::MAX)
                .max(1),
        );
        Some(Gcra { interval, burst })
    }

    /// Time for a spent burst to refill completely.
    pub fn window(&self) -> Duration {
        self.interval.saturating_mul(self.burst)
    }

    /// The emission interval in whole microseconds, as the Redis script
    /// takes it (at least 1).
    pub fn interval_us(&self) -> u64 {
        u64::try_from(self.interval.as_micros())
            .unwrap_or(u64::MAX)
            .max(1)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn limits(rps: f64, burst: Option<u32>) -> Limits {
        Limits {
            requests_per_second: Some(rps),
            burst,
            ..Limits::default()
        }
    }

    #[test]
    fn absurd_rates_are_clamped_not_overflowed() {
        for rps in [
            0.0,
            -1.0,
            1e-300,
            1e-11,
            f64::MIN_POSITIVE,
            f64::INFINITY,
            1e300,
        ] {
            let gcra = Gcra::of(&limits(rps, Some(u32::MAX))).expect("a rate");
            assert!(gcra.interval >= Duration::from_nanos(1));
            assert!(gcra.interval <= Duration::from_secs(86_400));
            assert!(gcra.window() <= MAX_RATE_WINDOW + gcra.interval, "{rps}");
        }
        assert_eq!(Gcra::of(&limits(f64::NAN, None)), None);
        assert_eq!(Gcra::of(&Limits::default()), None);
    }

    #[test]
    fn ordinary_rates_are_exact() {
        let gcra = Gcra::of(&limits(20.0, Some(40))).expect("a rate");
        assert_eq!(gcra.interval, Duration::from_millis(50));
        assert_eq!(gcra.burst, 40);
        assert_eq!(gcra.window(), Duration::from_secs(2));
        assert_eq!(gcra.interval_us(), 50_000);
    }
}
