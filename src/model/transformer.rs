//! The executable model: config + weights loaded from a model directory, and the batched
//! [`Model::step`] that continuous batching drives.
//!
//! Owns the whole-model dataflow (embedding, layers, final norm, LM head on the last token of
//! each chunk), batch validation, KV block reservation for a step, and attributing a step's
//! device time and energy to its sequences in proportion to the tokens each processed. It must
//! not know scheduling policy, tenants, sampling or async: a step is one synchronous call.

use std::collections::HashSet;
use std::path::Path;
use std::time::Instant;

use crate::npu::{Device, DeviceProfile, GateConfig, ScoringFunc, WeightFormat};

use super::checkpoint::{TensorStore, write_dir};
use super::config::ModelConfig;
use super::error::{ModelError, Result, input_err, io_err};
use super::kv_cache::{KvPool, KvPoolOptions, SeqId};
use super::layers::{self, TokenLayout};
use super::ops;
use super::rope::{RopeSetup, rope_setup};
use super::weights::{Ffn, ModelWeights};

/// Name of the config file in a model directory.
pub const CONFIG_FILE: &str = "config.json";

/// How to load a model directory.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct LoadOptions {
    /// Re-quantise every linear weight to this format after loading (e.g. bf16 -> int8 W8A8);
    /// `None` runs the checkpoint's own formats.
    pub weight_format: Option<WeightFormat>,
}

/// A loaded, immutable model; share it between workers with an `Arc` (each worker brings its
/// own [`Device`] and [`KvPool`]).
#[derive(Debug, Clone)]
pub struct Model {
    config: ModelConfig,
    weights: ModelWeights,
    rope: RopeSetup,
    gate: Option<GateConfig>,
}

/// New tokens of one sequence in a step: a prefill chunk or a single decode token. Their
/// positions continue from what the pool already holds for `seq`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SeqChunk<'a> {
    /// Sequence (registered in the pool on its first chunk).
    pub seq: SeqId,
    /// Token ids to process (non-empty).
    pub tokens: &'a [u32],
}

/// One sequence's share of a step.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct SeqCost {
    /// Sequence.
    pub seq: SeqId,
    /// Tokens it processed in the step.
    pub tokens: usize,
    /// Its share of the step's emulated device time, µs.
    pub device_us: f64,
    /// Its share of the step's energy, J.
    pub energy_j: f64,
}

/// Result of a step.
#[derive(Debug, Clone, PartialEq)]
pub struct StepOutput {
    /// Logits (`vocab_size`) after the last token of each chunk, in batch order.
    pub logits: Vec<Vec<f32>>,
    /// Emulated device time of the step (sum of its launches), µs.
    pub device_us: f64,
    /// Emulated energy of the step, J.
    pub energy_j: f64,
    /// Host wall time of the step, µs.
    pub cpu_us: f64,
    /// Kernel launches in the step.
    pub launches: u64,
    /// Per-sequence shares, in batch order; they sum to the step totals.
    pub per_seq: Vec<SeqCost>,
}

impl Model {
    /// Loads `config.json` and the checkpoint of a model directory.
    pub fn load(dir: &Path, opts: &LoadOptions) -> Result<Self> {
        let config = ModelConfig::from_file(&dir.join(CONFIG_FILE))?;
        let store = TensorStore::open_dir(dir)?;
        let weights = ModelWeights::load(&config, &store, opts.weight_format)?;
        Self::from_parts(config, weights)
    }

    /// A model from a config and weights loaded for it by [`ModelWeights::load`].
    pub(crate) fn from_parts(config: ModelConfig, weights: ModelWeights) -> Result<Self> {
        config.validate()?;
        let rope = rope_setup(&config)?;
        let gate = (config.n_routed() > 0).then(|| GateConfig {
            n_routed_experts: config.n_routed(),
            top_k: config.num_experts_per_tok.unwrap_or(1),
            n_group: config.n_group,
            topk_group: config.topk_group,
            norm_topk_prob: config.norm_topk_prob,
            routed_scaling_factor: config.routed_scaling_factor,
            scoring: if config.scoring_func == "softmax" {
                ScoringFunc::Softmax
            } else {
                ScoringFunc::Sigmoid
            },
        });
        Ok(Self {
            config,
            weights,
            rope,
            gate,
        })
    }

    /// Writes `config.json` and the checkpoint (`shards > 1`: sharded with an index).
    pub fn save(&self, dir: &Path, shards: usize) -> Result<()> {
        std::fs::create_dir_all(dir).map_err(|e| io_err(dir, e))?;
        let path = dir.join(CONFIG_FILE);
        let text =
            serde_json::to_string_pretty(&self.config).map_err(|e| ModelError::Checkpoint {
                path: path.display().to_string(),
                message: e.to_string(),
            })?;
        std::fs::write(&path, text).map_err(|e| io_err(&path, e))?;
        write_dir(dir, &self.weights.to_tensors(&self.config), shards)
    }

    /// The config.
    pub fn config(&self) -> &ModelConfig {
        &self.config
    }

    /// The weights.
    pub fn weights(&self) -> &ModelWeights {
        &self.weights
    }

    /// A KV pool for one device with this profile: HBM left after the weights, capped by
    /// `opts.max_blocks` (see [`KvPool::for_device`]).
    pub fn new_kv_pool(&self, profile: &DeviceProfile, opts: &KvPoolOptions) -> Result<KvPool> {
        KvPool::for_device(&self.config, profile, self.weights.device_bytes(), opts)
    }

    /// Runs one batched step: for each chunk, its tokens are appended to its sequence's cache
    /// and the logits after its last token are returned.
    ///
    /// Blocks for the whole batch are reserved first, all or nothing: if the pool is short the
    /// step returns [`ModelError::OutOfBlocks`] having changed nothing, and the caller preempts
    /// or retries with a smaller batch. The device's step counter is reset at the start, so the
    /// returned totals are exactly this step's launches.
    pub fn step(
        &self,
        dev: &mut Device,
        kv: &mut KvPool,
        batch: &[SeqChunk<'_>],
    ) -> Result<StepOutput> {
        let start = Instant::now();
        self.validate_batch(kv, batch)?;
        let need: usize = batch
            .iter()
            .map(|b| kv.blocks_needed(b.seq, b.tokens.len()))
            .sum();
        if need > kv.free_blocks() {
            let first = batch
                .iter()
                .find(|b| kv.blocks_needed(b.seq, b.tokens.len()) > 0)
                .map_or(0, |b| b.seq);
            return Err(ModelError::OutOfBlocks {
                seq: first,
                needed: need,
                free: kv.free_blocks(),
            });
        }
        for b in batch {
            kv.reserve(b.seq, b.tokens.len())?;
        }
        let _ = dev.take_step();
        let result = self.forward(dev, kv, batch);
        let totals = dev.take_step();
        let logits = match result {
            Ok(l) => l,
            Err(e) => {
                // Keep the pool consistent: the tokens of this step were not committed.
                for b in batch {
                    kv.trim(b.seq);
                }
                return Err(e);
            }
        };
        let total_tokens: usize = batch.iter().map(|b| b.tokens.len()).sum();
        let mut per_seq = Vec::with_capacity(batch.len());
        for b in batch {
            kv.advance(b.seq, b.tokens.len())?;
            let share = b.tokens.len() as f64 / total_tokens as f64;
            per_seq.push(SeqCost {
                seq: b.seq,
                tokens: b.tokens.len(),
                device_us: totals.device_us * share,
                energy_j: totals.energy_j * share,
            });
        }
        Ok(StepOutput {
            logits,
            device_us: totals.device_us,
            energy_j: totals.energy_j,
            cpu_us: start.elapsed().as_secs_f64() * 1e6,
            launches: totals.launches,
            per_seq,
        })
    }

    fn validate_batch(&self, kv: &KvPool, batch: &[SeqChunk<'_>]) -> Result<()> {
        let c = &self.config;
        if batch.is_empty() {
            return Err(input_err("batch", "is empty"));
        }
        let mut seen = HashSet::with_capacity(batch.len());
        for b in batch {
            if !seen.insert(b.seq) {
                return Err(input_err(
                    "batch",
                    format!("sequence {} appears twice", b.seq),
                ));
            }
            if b.tokens.is_empty() {
                return Err(input_err(
                    "tokens",
                    format!("sequence {} has an empty chunk", b.seq),
                ));
            }
            if let Some(&id) = b.tokens.iter().find(|&&id| id as usize >= c.vocab_size) {
                return Err(ModelError::TokenOutOfRange {
                    id,
                    vocab_size: c.vocab_size,
                });
            }
            let end = kv.seq_len(b.seq) + b.tokens.len();
            if end > c.max_position_embeddings {
                return Err(input_err(
                    "tokens",
                    format!(
                        "sequence {} would reach {end} tokens, beyond max_position_embeddings {}",
                        b.seq, c.max_position_embeddings
                    ),
                ));
            }
        }
        Ok(())
    }

    fn forward(
        &self,
        dev: &mut Device,
        kv: &mut KvPool,
        batch: &[SeqChunk<'_>],
    ) -> Result<Vec<Vec<f32>>> {
        let c = &self.config;
        let hdim = c.hidden_size;
        let mut positions = Vec::new();
        let mut tables: Vec<&[u32]> = Vec::new();
        let mut prefill = Vec::new();
        let mut last = Vec::with_capacity(batch.len());
        // Block tables are cloned so the pool can be borrowed mutably by the cache writes.
        let owned: Vec<Vec<u32>> = batch
            .iter()
            .map(|b| {
                kv.block_table(b.seq)
                    .map(<[u32]>::to_vec)
                    .unwrap_or_default()
            })
            .collect();
        for (b, table) in batch.iter().zip(&owned) {
            let start = kv.seq_len(b.seq);
            let first = positions.len();
            for i in 0..b.tokens.len() {
                positions.push(start + i);
                tables.push(table.as_slice());
            }
            if start == 0 {
                prefill.push((first, b.tokens.len()));
            }
            last.push(first + b.tokens.len() - 1);
        }
        let t = positions.len();
        let mut x = Vec::with_capacity(t * hdim);
        for b in batch {
            for &id in b.tokens {
                let r = id as usize * hdim;
                x.extend_from_slice(&self.weights.embed[r..r + hdim]);
            }
        }
        let layout = TokenLayout {
            positions: &positions,
            tables: &tables,
            prefill: &prefill,
        };
        for (i, l) in self.weights.layers.iter().enumerate() {
            let h = dev.rms_norm(&x, t, &l.input_norm, c.rms_norm_eps)?;
            let a = layers::mla(dev, c, &l.attn, &self.rope, &h, &layout, kv, i)?;
            dev.residual_add(&mut x, &a)?;
            let h = dev.rms_norm(&x, t, &l.post_norm, c.rms_norm_eps)?;
            let f = match (&l.ffn, &self.gate) {
                (Ffn::Dense(m), _) => layers::mlp(dev, m, &h, t)?,
                (Ffn::Moe(m), Some(g)) => layers::moe(dev, m, g, &h, t, hdim)?,
                (Ffn::Moe(_), None) => {
                    return Err(input_err(
                        "n_routed_experts",
                        "MoE layer without a router config",
                    ));
                }
            };
            dev.residual_add(&mut x, &f)?;
        }
        let mut xl = Vec::with_capacity(last.len() * hdim);
        for &i in &last {
            xl.extend_from_slice(&x[i * hdim..(i + 1) * hdim]);
        }
        let xl = dev.rms_norm(&xl, last.len(), &self.weights.norm, c.rms_norm_eps)?;
        let logits = ops::linear(dev, &xl, last.len(), &self.weights.lm_head)?;
        Ok(logits.chunks(c.vocab_size).map(<[f32]>::to_vec).collect())
    }
}
