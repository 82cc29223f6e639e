//! Choosing the next token from logits: greedy, temperature, top-k, top-p, with a per-request
//! seeded RNG, and optional log-probabilities.
//!
//! Owns the sampling numerics (f64 on the host, ties to the lower token id) and the RNG stream
//! of one request: each sequence has its own ChaCha8 stream seeded by its request seed and draws
//! exactly one number per token, so its tokens do not depend on which other sequences share the
//! batch. It must not know the transformer, the tokenizer, stop sequences or batching.

use rand_chacha::ChaCha8Rng;
use rand_chacha::rand_core::{RngCore, SeedableRng};
use serde::{Deserialize, Serialize};

use super::error::{ModelError, Result, input_err};

/// Most alternatives [`SamplingParams::logprobs`] may ask for.
pub const MAX_LOGPROBS: usize = 20;

/// How one request samples.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct SamplingParams {
    /// 0 means greedy; otherwise logits are divided by it.
    pub temperature: f32,
    /// Keep the `top_k` most likely tokens (0: all).
    pub top_k: usize,
    /// Keep the smallest set of most likely tokens whose probability reaches `top_p` (1: all).
    pub top_p: f32,
    /// RNG seed of this request.
    pub seed: u64,
    /// Tokens to generate at most.
    pub max_tokens: usize,
    /// Generation stops before the first occurrence of any of these strings.
    pub stop: Vec<String>,
    /// Return the chosen token's log-probability and this many alternatives (`None`: no
    /// log-probabilities).
    pub logprobs: Option<usize>,
    /// Keep generating after EOS.
    pub ignore_eos: bool,
}

impl Default for SamplingParams {
    fn default() -> Self {
        Self {
            temperature: 0.0,
            top_k: 0,
            top_p: 1.0,
            seed: 0,
            max_tokens: 16,
            stop: Vec::new(),
            logprobs: None,
            ignore_eos: false,
        }
    }
}

impl SamplingParams {
    /// Checks ranges; the error names the field.
    pub fn validate(&self) -> Result<()> {
        if !(self.temperature.is_finite() && self.temperature >= 0.0) {
            return Err(input_err(
                "temperature",
                format!("must be finite and >= 0, got {}", self.temperature),
            ));
        }
        if !(self.top_p.is_finite() && self.top_p > 0.0 && self.top_p <= 1.0) {
            return Err(input_err(
                "top_p",
                format!("must be in (0, 1], got {}", self.top_p),
            ));
        }
        if self.max_tokens == 0 {
            return Err(input_err("max_tokens", "must be > 0"));
        }
        if self.stop.iter().any(String::is_empty) {
            return Err(input_err("stop", "stop sequences must be non-empty"));
        }
        if let Some(n) = self.logprobs
            && n > MAX_LOGPROBS
        {
            return Err(input_err(
                "logprobs",
                format!("at most {MAX_LOGPROBS}, got {n}"),
            ));
        }
        Ok(())
    }
}

/// Log-probability of the chosen token and the most likely alternatives.
#[derive(Debug, Clone, PartialEq)]
pub struct TokenLogprob {
    /// Log-probability of the chosen token under the model (before temperature and filtering).
    pub logprob: f32,
    /// The most likely tokens and their log-probabilities, most likely first.
    pub top: Vec<(u32, f32)>,
}

/// One sampled token.
#[derive(Debug, Clone, PartialEq)]
pub struct Sampled {
    /// Token id.
    pub token: u32,
    /// Log-probabilities, when asked for.
    pub logprob: Option<TokenLogprob>,
}

/// The sampler of one request.
#[derive(Debug, Clone)]
pub struct Sampler {
    params: SamplingParams,
    rng: ChaCha8Rng,
}

/// Token ids by decreasing logit, ties to the lower id.
fn ranked(logits: &[f32]) -> Vec<usize> {
    let mut idx: Vec<usize> = (0..logits.len()).collect();
    idx.sort_unstable_by(|&a, &b| logits[b].total_cmp(&logits[a]).then(a.cmp(&b)));
    idx
}

fn log_softmax(logits: &[f32]) -> Vec<f64> {
    let m = logits
        .iter()
        .fold(f64::NEG_INFINITY, |a, &b| a.max(f64::from(b)));
    let z: f64 = logits.iter().map(|&x| (f64::from(x) - m).exp()).sum();
    let lz = m + z.ln();
    logits.iter().map(|&x| f64::from(x) - lz).collect()
}

impl Sampler {
    /// A sampler for validated params.
    pub fn new(params: SamplingParams) -> Result<Self> {
        params.validate()?;
        let rng = ChaCha8Rng::seed_from_u64(params.seed);
        Ok(Self { params, rng })
    }

    /// The params.
    pub fn params(&self) -> &SamplingParams {
        &self.params
    }

    /// Picks the next token. Draws exactly one random number per call (also when greedy).
    pub fn sample(&mut self, logits: &[f32]) -> Result<Sampled> {
        if logits.is_empty() {
            return Err(input_err("logits", "is empty"));
        }
        if let Some(i) = logits.iter().position(|x| x.is_nan()) {
            return Err(input_err("logits", format!("NaN at token {i}")));
        }
        let u = (self.rng.next_u64() >> 11) as f64 / (1u64 << 53) as f64;
        let p = &self.params;
        let token = if p.temperature == 0.0 || p.top_k == 1 {
            ranked(logits)[0]
        } else {
            let order = ranked(logits);
            let k = if p.top_k == 0 {
                order.len()
            } else {
                p.top_k.min(order.len())
            };
            let cand = &order[..k];
            let t = f64::from(p.temperature);
            let m = f64::from(logits[cand[0]]) / t;
            let mut probs: Vec<f64> = cand
                .iter()
                .map(|&i| (f64::from(logits[i]) / t - m).exp())
                .collect();
            let z: f64 = probs.iter().sum();
            probs.iter_mut().for_each(|x| *x /= z);
            let mut keep = probs.len();
            if p.top_p < 1.0 {
                let mut acc = 0.0;
                for (j, q) in probs.iter().enumerate() {
                    acc += q;
                    if acc >= f64::from(p.top_p) {
                        keep = j + 1;
                        break;
                    }
                }
            }
            let z: f64 = probs[..keep].iter().sum();
            let target = u * z;
            let mut acc = 0.0;
            let mut chosen = cand[keep - 1];
            for (j, q) in probs[..keep].iter().enumerate() {
                acc += q;
                if target < acc {
                    chosen = cand[j];
                    break;
                }
            }
            chosen
        };
        let logprob = p.logprobs.map(|n| {
            let lp = log_softmax(logits);
            let top = ranked(logits)
                .into_iter()
                .take(n)
                .map(|i| (i as u32, lp[i] as f32))
                .collect();
            TokenLogprob {
                logprob: lp[token] as f32,
                top,
            }
        });
        let token = u32::try_from(token).map_err(|_| ModelError::TokenOutOfRange {
            id: u32::MAX,
            vocab_size: logits.len(),
        })?;
        Ok(Sampled { token, logprob })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn logits() -> Vec<f32> {
        (0..100).map(|i| ((i * 37 % 100) as f32) / 25.0).collect()
    }

    #[test]
    fn greedy_picks_argmax_with_low_index_ties() {
        let mut s = Sampler::new(SamplingParams::default()).unwrap();
        assert_eq!(s.sample(&[0.0, 2.0, 2.0, 1.0]).unwrap().token, 1);
    }

    #[test]
    fn same_seed_same_tokens_and_seeds_differ() {
        let p = SamplingParams {
            temperature: 1.0,
            seed: 9,
            ..Default::default()
        };
        let run = |p: &SamplingParams| {
            let mut s = Sampler::new(p.clone()).unwrap();
            (0..50)
                .map(|_| s.sample(&logits()).unwrap().token)
                .collect::<Vec<_>>()
        };
        assert_eq!(run(&p), run(&p));
        assert_ne!(
            run(&p),
            run(&SamplingParams {
                seed: 10,
                ..p.clone()
            })
        );
    }

    #[test]
    fn top_k_and_top_p_restrict_the_support() {
        let l = logits();
        let order = ranked(&l);
        let mut s = Sampler::new(SamplingParams {
            temperature: 2.0,
            top_k: 3,
            seed: 1,
            ..Default::default()
        })
        .unwrap();
        for _ in 0..200 {
            let t = s.sample(&l).unwrap().token as usize;
            assert!(order[..3].contains(&t));
        }
        // top_p tiny: only the most likely token survives.
        let mut s = Sampler::new(SamplingParams {
            temperature: 1.0,
            top_p: 1e-6,
            seed: 1,
            ..Default::default()
        })
        .unwrap();
        for _ in 0..50 {
            assert_eq!(s.sample(&l).unwrap().token as usize, order[0]);
        }
    }

    #[test]
    fn logprobs_are_normalised_and_ranked() {
        let mut s = Sampler::new(SamplingParams {
            logprobs: Some(3),
            ..Default::default()
        })
        .unwrap();
        let r = s.sample(&[1.0, 3.0, 2.0]).unwrap();
        let lp = r.logprob.unwrap();
        assert_eq!(r.token, 1);
        assert_eq!(
            lp.top.iter().map(|x| x.0).collect::<Vec<_>>(),
            vec![1, 2, 0]
        );
        let total: f32 = lp.top.iter().map(|x| x.1.exp()).sum();
        assert!((total - 1.0).abs() < 1e-5);
        assert_eq!(lp.logprob, lp.top[0].1);
    }

    #[test]
    fn bad_params_name_the_field() {
        for (p, f) in [
            (
                SamplingParams {
                    temperature: f32::NAN,
                    ..Default::default()
                },
                "temperature",
            ),
            (
                SamplingParams {
                    top_p: 0.0,
                    ..Default::default()
                },
                "top_p",
            ),
            (
                SamplingParams {
                    max_tokens: 0,
                    ..Default::default()
                },
                "max_tokens",
            ),
            (
                SamplingParams {
                    logprobs: Some(99),
                    ..Default::default()
                },
                "logprobs",
            ),
            (
                SamplingParams {
                    stop: vec![String::new()],
                    ..Default::default()
                },
                "stop",
            ),
        ] {
            let e = Sampler::new(p).unwrap_err();
            assert!(e.to_string().contains(f), "{e}");
        }
        let mut s = Sampler::new(SamplingParams::default()).unwrap();
        assert!(s.sample(&[0.0, f32::NAN]).is_err());
    }
}
