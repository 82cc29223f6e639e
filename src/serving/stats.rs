//! Serving's own measurements: fixed-bucket histograms and counters on
//! atomics, written by the workers on their hot path (one relaxed add per
//! observation, no lock) and read by the metrics endpoint at scrape time.
//!
//! It knows no exporter format: [`Histogram::snapshot`] hands out plain
//! numbers.

use std::sync::atomic::{AtomicU64, Ordering};

/// Upper bounds, in seconds, for latencies from a millisecond to minutes.
pub const LATENCY_BOUNDS_S: &[f64] = &[
    0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0,
];

/// Upper bounds for counts (sequences or tokens in a step).
pub const COUNT_BOUNDS: &[f64] = &[
    1.0, 2.0, 4.0, 8.0, 16.0, 32.0, 64.0, 128.0, 256.0, 512.0, 1024.0, 2048.0, 4096.0,
];

/// A histogram of non-negative integer observations in a base unit (µs for
/// latencies), exported in `unit_scale` units (1e-6 turns µs into seconds).
pub struct Histogram {
    bounds: &'static [f64],
    unit_scale: f64,
    /// One more than `bounds`: the last counts what exceeds every bound.
    counts: Box<[AtomicU64]>,
    sum: AtomicU64,
    count: AtomicU64,
}

/// What a scrape sees: per-bucket (not cumulative) counts, the last bucket's
/// bound being infinity.
#[derive(Debug, Clone, PartialEq)]
pub struct HistogramSnapshot {
    pub sum: f64,
    pub count: u64,
    pub buckets: Vec<(f64, u64)>,
}

impl Histogram {
    pub fn new(bounds: &'static [f64], unit_scale: f64) -> Histogram {
        Histogram {
            bounds,
            unit_scale,
            counts: (0..=bounds.len()).map(|_| AtomicU64::new(0)).collect(),
            sum: AtomicU64::new(0),
            count: AtomicU64::new(0),
        }
    }

    /// A latency histogram fed in microseconds, exported in seconds.
    pub fn latency() -> Histogram {
        Histogram::new(LATENCY_BOUNDS_S, 1e-6)
    }

    pub fn counts() -> Histogram {
        Histogram::new(COUNT_BOUNDS, 1.0)
    }

    pub fn observe(&self, value: u64) {
        let scaled = value as f64 * self.unit_scale;
        let bucket = self
            .bounds
            .iter()
            .position(|&bound| scaled <= bound)
            .unwrap_or(self.bounds.len());
        self.counts[bucket].fetch_add(1, Ordering::Relaxed);
        self.sum.fetch_add(value, Ordering::Relaxed);
        self.count.fetch_add(1, Ordering::Relaxed);
    }

    pub fn snapshot(&self) -> HistogramSnapshot {
        let buckets = self
            .bounds
            .iter()
            .copied()
            .chain(std::iter::once(f64::INFINITY))
            .zip(self.counts.iter())
            .map(|(bound, n)| (bound, n.load(Ordering::Relaxed)))
            .collect();
        HistogramSnapshot {
            sum: self.sum.load(Ordering::Relaxed) as f64 * self.unit_scale,
            count: self.count.load(Ordering::Relaxed),
            buckets,
        }
    }
}

/// How a request left serving, for the finished-requests counter.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Outcome {
    Eos,
    Stop,
    Length,
    Cancelled,
    DeadlineExceeded,
    Error,
}

impl Outcome {
    pub const ALL: [Outcome; 6] = [
        Outcome::Eos,
        Outcome::Stop,
        Outcome::Length,
        Outcome::Cancelled,
        Outcome::DeadlineExceeded,
        Outcome::Error,
    ];

    /// The name used in usage records and metric labels.
    pub fn as_str(self) -> &'static str {
        match self {
            Outcome::Eos => "eos",
            Outcome::Stop => "stop",
            Outcome::Length => "length",
            Outcome::Cancelled => "cancelled",
            Outcome::DeadlineExceeded => "deadline_exceeded",
            Outcome::Error => "error",
        }
    }
}

/// Everything one served model measures.
pub struct ServingStats {
    /// From receipt to the first generated token.
    pub time_to_first_token: Histogram,
    /// Between consecutive tokens of one sequence.
    pub inter_token_latency: Histogram,
    /// From receipt to the last event.
    pub end_to_end: Histogram,
    /// From receipt to admission into a batch.
    pub queue_time: Histogram,
    /// Wall time of one batched step (the model call, pacing included).
    pub step_duration: Histogram,
    pub step_sequences: Histogram,
    pub step_tokens: Histogram,
    pub prompt_tokens: AtomicU64,
    /// Prompt tokens whose KV came from the prefix cache, counted at admission.
    pub prompt_cache_hit_tokens: AtomicU64,
    /// Prompt tokens computed at admission (not found in the prefix cache).
    pub prompt_cache_miss_tokens: AtomicU64,
    /// Cached blocks evicted from the workers' pools.
    pub prefix_cache_evictions: AtomicU64,
    /// Steps run under `pace = "device"`.
    pub paced_steps: AtomicU64,
    /// Of those, steps the CPU computed more slowly than the emulated device.
    pub pace_overrun_steps: AtomicU64,
    /// Their total time past the emulated device time, µs.
    pub pace_overrun_us: AtomicU64,
    pub generation_tokens: AtomicU64,
    finished: [AtomicU64; Outcome::ALL.len()],
    pub queue_full_rejections: AtomicU64,
}

impl Default for ServingStats {
    fn default() -> Self {
        ServingStats {
            time_to_first_token: Histogram::latency(),
            inter_token_latency: Histogram::latency(),
            end_to_end: Histogram::latency(),
            queue_time: Histogram::latency(),
            step_duration: Histogram::latency(),
            step_sequences: Histogram::counts(),
            step_tokens: Histogram::counts(),
            prompt_tokens: AtomicU64::new(0),
            prompt_cache_hit_tokens: AtomicU64::new(0),
            prompt_cache_miss_tokens: AtomicU64::new(0),
            prefix_cache_evictions: AtomicU64::new(0),
            paced_steps: AtomicU64::new(0),
            pace_overrun_steps: AtomicU64::new(0),
            pace_overrun_us: AtomicU64::new(0),
            generation_tokens: AtomicU64::new(0),
            finished: Default::default(),
            queue_full_rejections: AtomicU64::new(0),
        }
    }
}

impl ServingStats {
    pub fn count_finished(&self, outcome: Outcome) {
        self.finished[outcome as usize].fetch_add(1, Ordering::Relaxed);
    }

    pub fn finished(&self, outcome: Outcome) -> u64 {
        self.finished[outcome as usize].load(Ordering::Relaxed)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn observations_land_in_the_first_bucket_that_holds_them() {
        let h = Histogram::latency();
        h.observe(1_000); // exactly 1 ms: the 0.001 s bucket
        h.observe(1_001); // just above: the next
        h.observe(500_000_000); // 500 s: beyond every bound
        let s = h.snapshot();
        assert_eq!(s.count, 3);
        assert!((s.sum - 500.002001).abs() < 1e-9, "{}", s.sum);
        assert_eq!(s.buckets[0], (0.001, 1));
        assert_eq!(s.buckets[1], (0.0025, 1));
        assert_eq!(s.buckets.last(), Some(&(f64::INFINITY, 1)));
        assert_eq!(s.buckets.iter().map(|b| b.1).sum::<u64>(), 3);
    }

    #[test]
    fn finished_requests_are_counted_by_outcome() {
        let stats = ServingStats::default();
        stats.count_finished(Outcome::Length);
        stats.count_finished(Outcome::Length);
        stats.count_finished(Outcome::Cancelled);
        assert_eq!(stats.finished(Outcome::Length), 2);
        assert_eq!(stats.finished(Outcome::Cancelled), 1);
        assert_eq!(stats.finished(Outcome::Eos), 0);
    }
}
