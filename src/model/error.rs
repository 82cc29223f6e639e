//! Errors of the model module: bad configs, bad checkpoints, tokenizer failures, KV cache
//! exhaustion and bad step or sampling inputs.
//!
//! Owns the one error enum of `model`; every message names the offending field, tensor or
//! sequence. It must not know gRPC codes, tenants or the serving policy: callers map these kinds
//! to their own (an out-of-blocks result is an expected outcome for a scheduler, not a bug).

use thiserror::Error;

use crate::npu::NpuError;

/// Everything that can go wrong in the model module.
#[derive(Debug, Error)]
pub enum ModelError {
    /// `config.json` parsed but a field is unusable.
    #[error("config field `{field}`: {detail}")]
    Config {
        /// DeepSeek-V3 name of the field.
        field: String,
        /// Why it was rejected.
        detail: String,
    },
    /// `config.json` is not valid JSON for the config schema.
    #[error("config `{path}`: cannot parse: {message}")]
    ConfigParse {
        /// File that was read.
        path: String,
        /// Parser message (names the field and line).
        message: String,
    },
    /// A tensor the model needs is absent from the checkpoint.
    #[error("checkpoint: missing tensor `{name}`")]
    MissingTensor {
        /// DeepSeek-V3 tensor name.
        name: String,
    },
    /// A tensor exists but has the wrong shape or dtype.
    #[error("checkpoint: tensor `{name}`: {detail}")]
    BadTensor {
        /// DeepSeek-V3 tensor name.
        name: String,
        /// Expected and actual shape or dtype.
        detail: String,
    },
    /// A checkpoint file is not valid safetensors (or its shard index is invalid).
    #[error("checkpoint file `{path}`: {message}")]
    Checkpoint {
        /// File that was read or written.
        path: String,
        /// What went wrong.
        message: String,
    },
    /// Reading or writing a model directory failed.
    #[error("model directory I/O on `{path}`: {source}")]
    Io {
        /// Path that was read or written.
        path: String,
        /// Underlying error.
        #[source]
        source: std::io::Error,
    },
    /// The tokenizer file could not be loaded, trained or used.
    #[error("tokenizer: {0}")]
    Tokenizer(String),
    /// The tokenizer can produce ids the model has no embedding for.
    #[error(
        "tokenizer.json has {tokenizer} ids but config.json's vocab_size is {config}: \
         every id the tokenizer can produce needs a row of the embedding"
    )]
    VocabMismatch {
        /// Ids of `tokenizer.json` (the largest id plus one).
        tokenizer: usize,
        /// `vocab_size` of `config.json`.
        config: usize,
    },
    /// Input bytes are not valid UTF-8.
    #[error("input is not valid UTF-8 (first bad byte at offset {offset})")]
    InvalidUtf8 {
        /// Byte offset of the first invalid sequence.
        offset: usize,
    },
    /// A token id outside the vocabulary.
    #[error("token id {id} is outside the vocabulary (vocab_size {vocab_size})")]
    TokenOutOfRange {
        /// The bad id.
        id: u32,
        /// Vocabulary size.
        vocab_size: usize,
    },
    /// The KV pool has too few free blocks for a sequence: the scheduler should preempt or wait.
    #[error("KV cache out of blocks: sequence {seq} needs {needed} more, {free} free")]
    OutOfBlocks {
        /// Sequence that could not grow.
        seq: u64,
        /// Blocks it needs.
        needed: usize,
        /// Blocks free in the pool.
        free: usize,
    },
    /// A step or cache request is inconsistent (unknown sequence, wrong position, empty chunk...).
    #[error("invalid `{field}`: {detail}")]
    InvalidInput {
        /// Name of the argument or field.
        field: String,
        /// Why it was rejected.
        detail: String,
    },
    /// A kernel rejected its operands (a bug in the model if the config validated).
    #[error("npu: {0}")]
    Npu(#[from] NpuError),
}

/// Result alias of the model module.
pub type Result<T> = std::result::Result<T, ModelError>;

pub(crate) fn config_err(field: &str, detail: impl Into<String>) -> ModelError {
    ModelError::Config {
        field: field.to_string(),
        detail: detail.into(),
    }
}

pub(crate) fn input_err(field: &str, detail: impl Into<String>) -> ModelError {
    ModelError::InvalidInput {
        field: field.to_string(),
        detail: detail.into(),
    }
}

pub(crate) fn io_err(path: &std::path::Path, source: std::io::Error) -> ModelError {
    ModelError::Io {
        path: path.display().to_string(),
        source,
    }
}
