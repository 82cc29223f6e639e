//! What the load generator asks for: prompts and output lengths drawn from
//! seeded distributions, so two runs (or two configurations) see the same
//! sequence of requests.
//!
//! Knows the request message, not how it is sent.

use rand_chacha::ChaCha8Rng;
use rand_chacha::rand_core::{RngCore, SeedableRng};
use serde::Serialize;

use crate::api::pb::v1::GenerateRequest;

/// How output lengths (max_tokens, with ignore_eos) are spread between the
/// bounds.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, clap::ValueEnum)]
#[serde(rename_all = "kebab-case")]
pub enum LengthDistribution {
    /// Every length equally likely.
    Uniform,
    /// Uniform in the logarithm: many short answers, a few long ones, as in
    /// chat traces.
    LogUniform,
}

/// The shape of the requests of a run.
#[derive(Debug, Clone, Serialize)]
pub struct WorkloadSpec {
    pub model: String,
    pub prompt_words: (u32, u32),
    pub output_tokens: (u32, u32),
    pub output_distribution: LengthDistribution,
    pub temperature: f32,
    pub seed: u64,
}

const WORDS: &[&str] = &[
    "the",
    "cluster",
    "serves",
    "tokens",
    "for",
    "many",
    "tenants",
    "while",
    "each",
    "device",
    "runs",
    "fused",
    "kernels",
    "over",
    "paged",
    "memory",
    "and",
    "a",
    "scheduler",
    "keeps",
    "queues",
    "fair",
    "so",
    "no",
    "one",
    "waits",
    "too",
    "long",
    "when",
    "load",
    "rises",
    "billing",
    "counts",
    "every",
    "request",
    "exactly",
    "once",
    "in",
    "hours",
    "months",
];

/// Draws requests; one per client or arrival stream, seeded from the spec.
pub struct RequestSource {
    spec: WorkloadSpec,
    rng: ChaCha8Rng,
    drawn: u64,
}

impl RequestSource {
    /// The `stream`-th independent source of this workload.
    pub fn new(spec: &WorkloadSpec, stream: u64) -> RequestSource {
        let mut rng = ChaCha8Rng::seed_from_u64(spec.seed);
        rng.set_stream(stream);
        RequestSource {
            spec: spec.clone(),
            rng,
            drawn: 0,
        }
    }

    /// A float in [0, 1).
    pub fn unit(&mut self) -> f64 {
        (self.rng.next_u64() >> 11) as f64 / (1u64 << 53) as f64
    }

    fn between(&mut self, (lo, hi): (u32, u32)) -> u32 {
        let (lo, hi) = (lo.min(hi), lo.max(hi));
        lo + (self.rng.next_u64() % u64::from(hi - lo + 1)) as u32
    }

    fn output_tokens(&mut self) -> u32 {
        let (lo, hi) = self.spec.output_tokens;
        let (lo, hi) = (lo.clamp(1, hi.max(1)), hi.max(1));
        match self.spec.output_distribution {
            LengthDistribution::Uniform => self.between((lo, hi)),
            LengthDistribution::LogUniform => {
                let (ln_lo, ln_hi) = (f64::from(lo).ln(), f64::from(hi + 1).ln());
                let drawn = (ln_lo + self.unit() * (ln_hi - ln_lo)).exp().floor() as u32;
                drawn.clamp(lo, hi)
            }
        }
    }

    /// The next request of this source.
    pub fn next_request(&mut self) -> GenerateRequest {
        let words = self.between(self.spec.prompt_words).max(1);
        let prompt = (0..words)
            .map(|_| WORDS[(self.rng.next_u64() % WORDS.len() as u64) as usize])
            .collect::<Vec<_>>()
            .join(" ");
        let max_tokens = self.output_tokens();
        self.drawn += 1;
        GenerateRequest {
            model: self.spec.model.clone(),
            prompt,
            max_tokens: Some(max_tokens),
            temperature: Some(self.spec.temperature),
            seed: Some(self.spec.seed.wrapping_add(self.drawn)),
            ignore_eos: true,
            ..Default::default()
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn spec(distribution: LengthDistribution) -> WorkloadSpec {
        WorkloadSpec {
            model: "m".to_owned(),
            prompt_words: (4, 8),
            output_tokens: (8, 256),
            output_distribution: distribution,
            temperature: 0.8,
            seed: 1,
        }
    }

    #[test]
    fn a_source_repeats_itself_and_streams_differ() {
        let s = spec(LengthDistribution::Uniform);
        let first: Vec<_> = {
            let mut src = RequestSource::new(&s, 0);
            (0..10).map(|_| src.next_request()).collect()
        };
        let again: Vec<_> = {
            let mut src = RequestSource::new(&s, 0);
            (0..10).map(|_| src.next_request()).collect()
        };
        let other: Vec<_> = {
            let mut src = RequestSource::new(&s, 1);
            (0..10).map(|_| src.next_request()).collect()
        };
        assert_eq!(first, again);
        assert_ne!(first, other);
    }

    #[test]
    fn lengths_stay_in_bounds_and_log_uniform_favours_short() {
        for distribution in [LengthDistribution::Uniform, LengthDistribution::LogUniform] {
            let mut src = RequestSource::new(&spec(distribution), 3);
            let lengths: Vec<u32> = (0..4000)
                .map(|_| src.next_request().max_tokens.unwrap_or(0))
                .collect();
            assert!(lengths.iter().all(|&n| (8..=256).contains(&n)));
            let median = {
                let mut sorted = lengths.clone();
                sorted.sort_unstable();
                sorted[sorted.len() / 2]
            };
            match distribution {
                // Uniform on [8, 256]: median near 132.
                LengthDistribution::Uniform => assert!((120..=145).contains(&median), "{median}"),
                // Log-uniform: median near sqrt(8 * 257) = 45.
                LengthDistribution::LogUniform => assert!((38..=53).contains(&median), "{median}"),
            }
        }
    }
}
