//! Honest pacing: with `pace = "device"` every step lasts at least its emulated device time,
//! but a step the CPU computes more slowly than the emulated device would lasts longer, and
//! clients then see this machine's latency, not the emulated Ascend's. This counts those
//! overruns and warns in the log when they persist.
//!
//! It owns the overrun window and the warning's rate; the counters it feeds are in
//! `stats`. It must not know the model or the device.

use std::time::{Duration, Instant};

use super::stats::ServingStats;
use std::sync::atomic::Ordering;

/// Steps per judgement window.
const WINDOW_STEPS: u32 = 200;
/// A window in which more than this share of steps overran is worth a warning.
const WARN_SHARE: f64 = 0.5;
/// At most one warning per this long.
const WARN_EVERY: Duration = Duration::from_secs(60);

/// One worker's overrun window.
#[derive(Debug, Default)]
pub(crate) struct PaceWatch {
    steps: u32,
    overruns: u32,
    overrun: Duration,
    largest_batch: usize,
    last_warned: Option<Instant>,
}

impl PaceWatch {
    /// A paced step of `batch` sequences took `elapsed` on the CPU against `device` emulated:
    /// sleeps off the difference when the CPU was faster, else counts the overrun.
    pub fn pace(
        &mut self,
        model: &str,
        stats: &ServingStats,
        batch: usize,
        elapsed: Duration,
        device: Duration,
    ) {
        stats.paced_steps.fetch_add(1, Ordering::Relaxed);
        self.steps += 1;
        match device.checked_sub(elapsed) {
            Some(rest) => std::thread::sleep(rest),
            None => {
                let over = elapsed - device;
                stats.pace_overrun_steps.fetch_add(1, Ordering::Relaxed);
                stats.pace_overrun_us.fetch_add(
                    u64::try_from(over.as_micros()).unwrap_or(u64::MAX),
                    Ordering::Relaxed,
                );
                self.overruns += 1;
                self.overrun += over;
                self.largest_batch = self.largest_batch.max(batch);
            }
        }
        if self.steps >= WINDOW_STEPS {
            let share = f64::from(self.overruns) / f64::from(self.steps);
            let due = self.last_warned.is_none_or(|t| t.elapsed() >= WARN_EVERY);
            if share > WARN_SHARE && due {
                tracing::warn!(
                    model,
                    overrun_share = format!("{:.0}%", share * 100.0),
                    mean_overrun_ms =
                        self.overrun.as_secs_f64() * 1e3 / f64::from(self.overruns.max(1)),
                    largest_batch = self.largest_batch,
                    "pace = \"device\": the CPU computes steps more slowly than the emulated \
                     device, so clients see this machine's latency (smaller max_batch_size or \
                     a larger served_as shape keeps device pace)"
                );
                self.last_warned = Some(Instant::now());
            }
            let last_warned = self.last_warned;
            *self = PaceWatch {
                last_warned,
                ..PaceWatch::default()
            };
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn overruns_are_counted_and_fast_steps_sleep_to_the_device_time() {
        let stats = ServingStats::default();
        let mut watch = PaceWatch::default();
        let start = Instant::now();
        watch.pace("m", &stats, 1, Duration::ZERO, Duration::from_millis(20));
        assert!(
            start.elapsed() >= Duration::from_millis(20),
            "slept off the difference"
        );
        watch.pace(
            "m",
            &stats,
            8,
            Duration::from_millis(5),
            Duration::from_millis(2),
        );
        assert_eq!(stats.paced_steps.load(Ordering::Relaxed), 2);
        assert_eq!(stats.pace_overrun_steps.load(Ordering::Relaxed), 1);
        assert_eq!(stats.pace_overrun_us.load(Ordering::Relaxed), 3000);
        for _ in 0..WINDOW_STEPS {
            watch.pace(
                "m",
                &stats,
                8,
                Duration::from_millis(2),
                Duration::from_millis(1),
            );
        }
        assert!(
            watch.last_warned.is_some(),
            "a persistent overrun is warned"
        );
        assert_eq!(watch.steps, 2, "a new window");
    }
}
