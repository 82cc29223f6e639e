//! `model init`: writes a complete model directory (config.json, model.safetensors,
//! tokenizer.json, tokenizer_config.json) with a trained BPE vocabulary, or any given
//! Hugging Face tokenizer, and seeded random weights, to be loaded through the same code a
//! real checkpoint takes.
//!
//! Owns the preset-to-directory recipe. It must not know the CLI (the binary parses flags and
//! calls [`init_model_dir`]), devices or serving.

use std::path::Path;

use super::checkpoint::write_dir;
use super::config::Preset;
use super::error::{Result, io_err};
use super::tokenizer::Tokenizer;
use super::transformer::CONFIG_FILE;
use super::vendored::TokenizerSource;
use super::weights::random_tensors;
use crate::npu::WeightFormat;

/// Options of [`init_model_dir_with`].
#[derive(Debug, Clone, PartialEq)]
pub struct InitOptions {
    /// Storage format of the linear weights (bf16 by default; int8 and FP8 write their scales).
    pub weight_format: WeightFormat,
    /// Number of checkpoint shards (1: a single `model.safetensors`).
    pub shards: usize,
    /// The vocabulary to build on instead of the preset's (trained, or
    /// DeepSeek V4's for `v4-small`); the embedding and output sizes follow it.
    pub tokenizer: Option<TokenizerSource>,
}

impl Default for InitOptions {
    fn default() -> Self {
        Self {
            weight_format: WeightFormat::Bf16,
            shards: 1,
            tokenizer: None,
        }
    }
}

/// Writes a `preset` model with weights from `seed` into `out` (created if needed).
pub fn init_model_dir(preset: Preset, seed: u64, out: &Path) -> Result<()> {
    init_model_dir_with(preset, seed, out, &InitOptions::default())
}

/// [`init_model_dir`] with a weight format and sharding.
pub fn init_model_dir_with(
    preset: Preset,
    seed: u64,
    out: &Path,
    opts: &InitOptions,
) -> Result<()> {
    std::fs::create_dir_all(out).map_err(|e| io_err(out, e))?;
    let tok = match opts.tokenizer.clone().or_else(|| preset.tokenizer()) {
        // A given tokenizer is copied byte for byte: its counts are the ones billed.
        Some(source) => {
            source.write_to(out)?;
            Tokenizer::from_dir(out)?
        }
        None => {
            let trained = Tokenizer::train_bpe(preset.vocab_target(), seed)?;
            trained.save(out)?;
            trained
        }
    };
    let mut config = preset.config(tok.vocab_size());
    config.bos_token_id = tok.bos_id();
    config.eos_token_id = tok.eos_id();
    config.validate()?;
    let tensors = random_tensors(&config, seed, opts.weight_format)?;
    write_dir(out, &tensors, opts.shards)?;
    let path = out.join(CONFIG_FILE);
    let text = serde_json::to_string_pretty(&config).map_err(|e| {
        super::error::ModelError::Checkpoint {
            path: path.display().to_string(),
            message: e.to_string(),
        }
    })?;
    std::fs::write(&path, text).map_err(|e| io_err(&path, e))
}
