//! A DeepSeek-V3 style MoE transformer running on the emulated NPU: config, checkpoints,
//! tokenizer, paged KV cache, batched steps and sampling.
//!
//! Owns everything needed to turn a model directory and token ids into logits and tokens, with
//! every launch priced by the npu cost model. It is plain synchronous compute: it must not know
//! tenants, requests' priorities, queues, async runtimes or networks, and its only I/O is
//! reading and writing a model directory.
//!
//! # Layout
//!
//! - [`config`]: `config.json` with DeepSeek-V3 field names, validation, presets.
//! - [`checkpoint`]: safetensors reading/writing (bf16, f16, f32, int8 + scales, FP8 + block
//!   `weight_scale_inv`; single file or sharded with an index).
//! - [`weights`]: tensor names and shapes per config, loading, random init, MLA absorption.
//! - [`tokenizer`], [`corpus`]: `tokenizer.json` (byte-level BPE), chat template, streaming
//!   detokenization, BPE training for `init`.
//! - [`kv_cache`]: the paged KV pool of a device: sizing from HBM, block tables, out-of-blocks.
//! - `ops`: batch-invariant linear / grouped linear / attention launches over npu kernels.
//! - `layers`, [`transformer`]: the forward pass from npu kernels and the batched
//!   [`Model::step`].
//! - [`rope`]: rotary frequencies, DeepSeek-V3 YaRN scaling.
//! - [`sampling`], [`generation`]: token choice and per-request generation state.
//! - [`served_as`]: charging the cost of a full-size shape while running a small one.
//! - [`prefix`]: content addresses of full KV blocks, for the pool's prefix cache.
//! - [`init`]: `model init` as a library function; [`vendored`]: tokenizers compiled in
//!   (DeepSeek V4's).
//!
//! # Serving contract
//!
//! A worker owns a [`crate::npu::Device`] and a [`KvPool`] and shares an `Arc<Model>`. Each
//! iteration it builds a batch of [`SeqChunk`]s (decodes and prefill chunks), calls
//! [`Model::step`], feeds each sequence's logits to its [`Generation`], and frees finished
//! sequences with [`KvPool::free`]. [`ModelError::OutOfBlocks`] leaves the pool unchanged.
//! With prefix caching on, a new sequence first takes the cached blocks of its prompt's
//! prefix ([`KvPool::attach_prefix`]) and feeds only the rest; after each step the worker
//! publishes its newly full blocks ([`KvPool::publish`]).
//!
//! Results are batch-invariant bit for bit: a sequence's logits do not depend on the other
//! sequences in the step nor on how its prompt was chunked, so with a per-request seed it yields
//! the same tokens alone or in a batch of 32, and preemption by recompute (free, then prefill
//! prompt + generated tokens again) reproduces the same continuation. The same holds for a
//! prefix taken from the cache: attention reads every earlier position from the pool in any
//! case, so cached blocks are read exactly as the ones a longer chunk would have written.

#![forbid(unsafe_code)]

pub mod checkpoint;
pub mod config;
pub mod corpus;
pub mod error;
pub mod generation;
pub mod init;
pub mod kv_cache;
pub(crate) mod layers;
pub(crate) mod ops;
pub mod prefix;
pub mod rope;
pub mod sampling;
pub mod served_as;
pub mod tokenizer;
pub mod transformer;
pub mod vendored;
pub mod weights;

pub use config::{ModelConfig, Preset};
pub use error::{ModelError, Result};
pub use generation::{
    FinishReason, GenerateRequest, GenerateResult, Generation, TokenEvent, generate,
};
pub use init::{InitOptions, init_model_dir, init_model_dir_with};
pub use kv_cache::{KvPool, KvPoolOptions, SeqId};
pub use sampling::{Sampled, Sampler, SamplingParams, TokenLogprob};
pub use served_as::ServedAs;
pub use tokenizer::{ChatMessage, Role, TextStream, Tokenizer};
pub use transformer::{LoadOptions, Model, SeqChunk, SeqCost, StepOutput};

#[cfg(test)]
mod tests;
