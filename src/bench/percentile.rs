//! Summaries of latency samples: mean and nearest-rank percentiles, exact
//! over every sample (a run keeps them all; no binning error).
//!
//! Knows nothing of where samples come from.

use serde::{Deserialize, Serialize};

/// Milliseconds, rounded to microseconds.
#[derive(Debug, Clone, Copy, Default, PartialEq, Serialize, Deserialize)]
pub struct Summary {
    pub count: usize,
    pub mean: f64,
    pub p50: f64,
    pub p90: f64,
    pub p99: f64,
    pub max: f64,
}

/// The nearest-rank percentile `p` (0 < p <= 100) of sorted values: the
/// smallest value with at least p% of the values at or below it.
pub fn nearest_rank(sorted: &[f64], p: f64) -> f64 {
    if sorted.is_empty() {
        return 0.0;
    }
    let rank = ((p / 100.0) * sorted.len() as f64).ceil() as usize;
    sorted[rank.clamp(1, sorted.len()) - 1]
}

fn round_us(ms: f64) -> f64 {
    (ms * 1000.0).round() / 1000.0
}

impl Summary {
    /// Summarises durations given in microseconds, reported in milliseconds.
    pub fn of_micros(values: impl IntoIterator<Item = u64>) -> Summary {
        let mut ms: Vec<f64> = values.into_iter().map(|us| us as f64 / 1000.0).collect();
        ms.sort_by(f64::total_cmp);
        if ms.is_empty() {
            return Summary::default();
        }
        let mean = ms.iter().sum::<f64>() / ms.len() as f64;
        Summary {
            count: ms.len(),
            mean: round_us(mean),
            p50: round_us(nearest_rank(&ms, 50.0)),
            p90: round_us(nearest_rank(&ms, 90.0)),
            p99: round_us(nearest_rank(&ms, 99.0)),
            max: round_us(ms[ms.len() - 1]),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn nearest_rank_on_known_inputs() {
        let hundred: Vec<f64> = (1..=100).map(f64::from).collect();
        assert_eq!(nearest_rank(&hundred, 50.0), 50.0);
        assert_eq!(nearest_rank(&hundred, 90.0), 90.0);
        assert_eq!(nearest_rank(&hundred, 99.0), 99.0);
        assert_eq!(nearest_rank(&hundred, 100.0), 100.0);
        let five = [15.0, 20.0, 35.0, 40.0, 50.0];
        // The textbook example: 30th percentile is 20, 40th 20, 50th 35.
        assert_eq!(nearest_rank(&five, 30.0), 20.0);
        assert_eq!(nearest_rank(&five, 40.0), 20.0);
        assert_eq!(nearest_rank(&five, 50.0), 35.0);
        assert_eq!(nearest_rank(&five, 100.0), 50.0);
        assert_eq!(nearest_rank(&[7.0], 99.0), 7.0);
        assert_eq!(nearest_rank(&[], 99.0), 0.0);
    }

    #[test]
    fn summaries_are_in_milliseconds_whatever_the_order() {
        let s = Summary::of_micros([3000, 1000, 2000, 4000]);
        assert_eq!(s.count, 4);
        assert_eq!(s.mean, 2.5);
        assert_eq!(s.p50, 2.0);
        assert_eq!(s.p99, 4.0);
        assert_eq!(s.max, 4.0);
        assert_eq!(Summary::of_micros([]), Summary::default());
    }
}
