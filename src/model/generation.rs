//! One request's generation state (sampler, stop sequences, max tokens, EOS, streamed text),
//! and a simple run-to-completion batch driver used by tests, benchmarks and one-shot local
//! generation.
//!
//! Owns turning sampled tokens into text deltas that never leak a stop sequence (text that could
//! still become one is held back) and finish reasons. It must not know scheduling policy,
//! tenants, queues or the network: the serving layer drives [`Generation::push_logits`] from its
//! own batching loop.

use super::error::{Result, input_err};
use super::kv_cache::{KvPool, SeqId};
use super::sampling::{Sampler, SamplingParams, TokenLogprob};
use super::tokenizer::{TextStream, Tokenizer};
use super::transformer::{Model, SeqChunk};
use crate::npu::Device;

/// Why a generation ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FinishReason {
    /// `max_tokens` reached.
    Length,
    /// A stop sequence appeared (it is not part of the text).
    Stop,
    /// The model produced EOS.
    Eos,
}

/// What one new token produced.
#[derive(Debug, Clone, PartialEq)]
pub struct TokenEvent {
    /// The token.
    pub token: u32,
    /// New text safe to show (may be empty).
    pub delta: String,
    /// Log-probabilities, when asked for.
    pub logprob: Option<TokenLogprob>,
    /// Set on the last token.
    pub finish: Option<FinishReason>,
}

/// Generation state of one request.
#[derive(Debug, Clone)]
pub struct Generation {
    sampler: Sampler,
    stream: TextStream,
    text: String,
    emitted: usize,
    tokens: Vec<u32>,
    eos: Option<u32>,
    finish: Option<FinishReason>,
}

impl Generation {
    /// State for one request; `eos` is the tokenizer's EOS id.
    pub fn new(params: SamplingParams, eos: Option<u32>) -> Result<Self> {
        Ok(Self {
            sampler: Sampler::new(params)?,
            stream: TextStream::new(true),
            text: String::new(),
            emitted: 0,
            tokens: Vec::new(),
            eos,
            finish: None,
        })
    }

    /// Samples from `logits`, updates the text and decides whether the request is finished.
    pub fn push_logits(&mut self, tok: &Tokenizer, logits: &[f32]) -> Result<TokenEvent> {
        let s = self.sampler.sample(logits)?;
        let params = self.sampler.params();
        self.tokens.push(s.token);
        let is_eos = Some(s.token) == self.eos && !params.ignore_eos;
        if !is_eos {
            let piece = self.stream.push(tok, s.token)?;
            self.text.push_str(&piece);
        }
        let stop_at = params
            .stop
            .iter()
            .filter_map(|st| self.text.find(st.as_str()))
            .min();
        let mut finish = if let Some(i) = stop_at {
            self.text.truncate(i);
            Some(FinishReason::Stop)
        } else if is_eos {
            Some(FinishReason::Eos)
        } else if self.tokens.len() >= params.max_tokens {
            Some(FinishReason::Length)
        } else {
            None
        };
        if matches!(finish, Some(FinishReason::Length | FinishReason::Eos)) && stop_at.is_none() {
            let rest = self.stream.finish(tok)?;
            self.text.push_str(&rest);
            if let Some(i) = params
                .stop
                .iter()
                .filter_map(|st| self.text.find(st.as_str()))
                .min()
            {
                self.text.truncate(i);
                finish = Some(FinishReason::Stop);
            }
        }
        // Hold back a tail that could still grow into a stop sequence.
        let safe = if finish.is_some() {
            self.text.len()
        } else {
            let mut hold = 0;
            for st in &params.stop {
                for (i, _) in st.char_indices().skip(1) {
                    if i > hold && self.text.ends_with(&st[..i]) {
                        hold = i;
                    }
                }
            }
            self.text.len() - hold
        };
        let delta = self
            .text
            .get(self.emitted..safe)
            .unwrap_or_default()
            .to_string();
        self.emitted = self.emitted.max(safe);
        self.finish = finish;
        Ok(TokenEvent {
            token: s.token,
            delta,
            logprob: s.logprob,
            finish,
        })
    }

    /// Tokens generated so far (EOS included): the completion tokens billed.
    pub fn tokens(&self) -> &[u32] {
        &self.tokens
    }
    /// Text so far (stop sequence excluded).
    pub fn text(&self) -> &str {
        &self.text
    }
    /// Finish reason, once finished.
    pub fn finish_reason(&self) -> Option<FinishReason> {
        self.finish
    }
}

/// A request for [`generate`].
#[derive(Debug, Clone)]
pub struct GenerateRequest {
    /// Prompt token ids (non-empty).
    pub prompt: Vec<u32>,
    /// Sampling.
    pub params: SamplingParams,
}

/// Outcome of one [`generate`] request.
#[derive(Debug, Clone, PartialEq)]
pub struct GenerateResult {
    /// Generated token ids.
    pub tokens: Vec<u32>,
    /// Generated text.
    pub text: String,
    /// Why it ended.
    pub finish: FinishReason,
    /// Emulated device time attributed to it, µs.
    pub device_us: f64,
    /// Energy attributed to it, J.
    pub energy_j: f64,
}

/// Runs requests to completion as one batch: a first step prefills every prompt, then each
/// step decodes one token for every unfinished request. Sequence ids `0..n` are used in `kv`
/// (they must be free) and freed at the end, also on error. Each request's tokens are the same
/// as when it runs alone (see `ops` for why that holds bit for bit).
pub fn generate(
    model: &Model,
    dev: &mut Device,
    kv: &mut KvPool,
    tok: &Tokenizer,
    reqs: &[GenerateRequest],
) -> Result<Vec<GenerateResult>> {
    let ids: Vec<SeqId> = (0..reqs.len() as u64).collect();
    if let Some(id) = ids.iter().find(|&&id| kv.contains(id)) {
        return Err(input_err(
            "kv",
            format!(
                "sequence {id} is already in the pool; generate needs ids 0..{}",
                reqs.len()
            ),
        ));
    }
    let r = run(model, dev, kv, tok, reqs, &ids);
    for &id in &ids {
        kv.free(id);
    }
    r
}

fn run(
    model: &Model,
    dev: &mut Device,
    kv: &mut KvPool,
    tok: &Tokenizer,
    reqs: &[GenerateRequest],
    ids: &[SeqId],
) -> Result<Vec<GenerateResult>> {
    let mut gens = reqs
        .iter()
        .map(|r| Generation::new(r.params.clone(), tok.eos_id()))
        .collect::<Result<Vec<_>>>()?;
    let mut cost = vec![(0.0f64, 0.0f64); reqs.len()];
    let mut next: Vec<Vec<u32>> = reqs.iter().map(|r| r.prompt.clone()).collect();
    loop {
        let live: Vec<usize> = (0..reqs.len())
            .filter(|&i| gens[i].finish_reason().is_none())
            .collect();
        if live.is_empty() {
            break;
        }
        let batch: Vec<SeqChunk<'_>> = live
            .iter()
            .map(|&i| SeqChunk {
                seq: ids[i],
                tokens: &next[i],
            })
            .collect();
        let out = model.step(dev, kv, &batch)?;
        for ((&i, logits), share) in live.iter().zip(&out.logits).zip(&out.per_seq) {
            cost[i].0 += share.device_us;
            cost[i].1 += share.energy_j;
            let ev = gens[i].push_logits(tok, logits)?;
            next[i] = vec![ev.token];
        }
    }
    Ok(gens
        .into_iter()
        .zip(cost)
        .map(|(g, (d, e))| GenerateResult {
            tokens: g.tokens().to_vec(),
            text: g.text().to_string(),
            finish: g.finish_reason().unwrap_or(FinishReason::Length),
            device_us: d,
            energy_j: e,
        })
        .collect())
}
