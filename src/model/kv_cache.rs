//! The paged KV cache of one device: a pool of fixed-size blocks (one npu [`PagedKvCache`] per
//! layer, sharing block ids), per-sequence block tables, allocation and free.
//!
//! Owns pool sizing (from the device profile's HBM, the weights' footprint and the model's KV
//! bytes per token, optionally capped so the host does not allocate a 64 GiB emulation), the
//! free list, and the all-or-nothing reservation that gives a scheduler a clear
//! [`ModelError::OutOfBlocks`]. It must not know scheduling policy, priorities or tenants:
//! which sequence to preempt when blocks run out is the caller's decision.

use std::collections::HashMap;

use super::config::ModelConfig;
use super::error::{ModelError, Result, input_err};
use crate::npu::{DeviceProfile, KvDtype, PagedKvCache, ValueLayout};

/// Identifies a sequence in the pool (the caller's request id or slot id).
pub type SeqId = u64;

/// How to size the pool.
#[derive(Debug, Clone, PartialEq)]
pub struct KvPoolOptions {
    /// Tokens per block.
    pub block_size: usize,
    /// Fraction of HBM the model (weights + KV) may use, like vLLM's `gpu_memory_utilization`.
    pub hbm_utilization: f64,
    /// Upper bound on blocks regardless of HBM (host memory of the emulation); `None`: no cap.
    pub max_blocks: Option<usize>,
    /// Element type of the cache.
    pub dtype: KvDtype,
}

impl Default for KvPoolOptions {
    fn default() -> Self {
        Self {
            block_size: 16,
            hbm_utilization: 0.9,
            max_blocks: Some(2048),
            dtype: KvDtype::Bf16,
        }
    }
}

/// KV bytes one token occupies on the device over all layers (MLA: latent + rope key).
pub fn kv_bytes_per_token(c: &ModelConfig, dtype: KvDtype) -> usize {
    c.num_hidden_layers * c.kv_dim() * dtype.bytes()
}

/// Blocks the device's HBM can hold after the weights: `floor((hbm x utilization - weights) /
/// (block_size x kv_bytes_per_token))`.
pub fn blocks_for_hbm(
    c: &ModelConfig,
    profile: &DeviceProfile,
    weight_bytes: u64,
    opts: &KvPoolOptions,
) -> usize {
    let hbm = profile.memory.hbm_gib * (1u64 << 30) as f64 * opts.hbm_utilization;
    let free = (hbm - weight_bytes as f64).max(0.0);
    let per_block = (opts.block_size * kv_bytes_per_token(c, opts.dtype)) as f64;
    (free / per_block).floor() as usize
}

#[derive(Debug, Clone, Default)]
struct SeqBlocks {
    table: Vec<u32>,
    len: usize,
}

/// The pool: per-layer caches, a free list, and the block table of every live sequence.
#[derive(Debug, Clone)]
pub struct KvPool {
    layers: Vec<PagedKvCache>,
    block_size: usize,
    hbm_blocks: usize,
    free: Vec<u32>,
    seqs: HashMap<SeqId, SeqBlocks>,
}

impl KvPool {
    /// A pool sized from HBM (see [`blocks_for_hbm`]) and capped by `opts.max_blocks`.
    pub fn for_device(
        c: &ModelConfig,
        profile: &DeviceProfile,
        weight_bytes: u64,
        opts: &KvPoolOptions,
    ) -> Result<Self> {
        let hbm_blocks = blocks_for_hbm(c, profile, weight_bytes, opts);
        let n = opts.max_blocks.map_or(hbm_blocks, |m| m.min(hbm_blocks));
        let mut pool = Self::with_blocks(c, n, opts.block_size, opts.dtype)?;
        pool.hbm_blocks = hbm_blocks;
        Ok(pool)
    }

    /// A pool of exactly `num_blocks` blocks (tests, preemption experiments).
    pub fn with_blocks(
        c: &ModelConfig,
        num_blocks: usize,
        block_size: usize,
        dtype: KvDtype,
    ) -> Result<Self> {
        if num_blocks == 0 {
            return Err(input_err(
                "num_blocks",
                "the KV pool has no blocks (HBM too small for the weights, or a cap of 0)",
            ));
        }
        if num_blocks > u32::MAX as usize {
            return Err(input_err("num_blocks", "exceeds u32 block ids"));
        }
        let layers = (0..c.num_hidden_layers)
            .map(|_| {
                PagedKvCache::new(
                    num_blocks,
                    block_size,
                    1,
                    c.kv_dim(),
                    ValueLayout::PrefixOfK(c.kv_lora_rank),
                    dtype,
                )
            })
            .collect::<std::result::Result<Vec<_>, _>>()?;
        Ok(Self {
            layers,
            block_size,
            hbm_blocks: num_blocks,
            // Pop from the end: low ids first.
            free: (0..num_blocks as u32).rev().collect(),
            seqs: HashMap::new(),
        })
    }

    /// Tokens per block.
    pub fn block_size(&self) -> usize {
        self.block_size
    }
    /// Blocks in the pool.
    pub fn total_blocks(&self) -> usize {
        self.layers.first().map_or(0, PagedKvCache::num_blocks)
    }
    /// Blocks HBM alone would allow (before the host cap).
    pub fn hbm_blocks(&self) -> usize {
        self.hbm_blocks
    }
    /// Free blocks.
    pub fn free_blocks(&self) -> usize {
        self.free.len()
    }
    /// Blocks in use.
    pub fn used_blocks(&self) -> usize {
        self.total_blocks() - self.free.len()
    }
    /// Live sequences.
    pub fn num_seqs(&self) -> usize {
        self.seqs.len()
    }
    /// Tokens cached for `seq` (0 for an unknown sequence).
    pub fn seq_len(&self, seq: SeqId) -> usize {
        self.seqs.get(&seq).map_or(0, |s| s.len)
    }
    /// Whether the pool knows `seq`.
    pub fn contains(&self, seq: SeqId) -> bool {
        self.seqs.contains_key(&seq)
    }
    /// Block table of `seq`.
    pub fn block_table(&self, seq: SeqId) -> Option<&[u32]> {
        self.seqs.get(&seq).map(|s| s.table.as_slice())
    }

    /// Extra blocks `seq` needs to hold `extra` more tokens.
    pub fn blocks_needed(&self, seq: SeqId, extra: usize) -> usize {
        let (have, len) = self
            .seqs
            .get(&seq)
            .map_or((0, 0), |s| (s.table.len(), s.len));
        (len + extra).div_ceil(self.block_size).saturating_sub(have)
    }

    /// Makes room for `extra` more tokens of `seq` (registering it if new): all the blocks or
    /// none, [`ModelError::OutOfBlocks`] when the pool is short.
    pub fn reserve(&mut self, seq: SeqId, extra: usize) -> Result<()> {
        let needed = self.blocks_needed(seq, extra);
        if needed > self.free.len() {
            return Err(ModelError::OutOfBlocks {
                seq,
                needed,
                free: self.free.len(),
            });
        }
        let at = self.free.len() - needed;
        let new = self.free.split_off(at);
        let entry = self.seqs.entry(seq).or_default();
        entry.table.extend(new.into_iter().rev());
        Ok(())
    }

    /// Records that `n` tokens of `seq` were written (after a step).
    pub(crate) fn advance(&mut self, seq: SeqId, n: usize) -> Result<()> {
        let bs = self.block_size;
        let s = self
            .seqs
            .get_mut(&seq)
            .ok_or_else(|| input_err("seq", format!("sequence {seq} is not in the KV pool")))?;
        if (s.len + n).div_ceil(bs) > s.table.len() {
            return Err(input_err(
                "seq",
                format!("sequence {seq} advanced past its blocks"),
            ));
        }
        s.len += n;
        Ok(())
    }

    /// Frees every block of `seq`; returns how many were freed (0 for an unknown sequence).
    pub fn free(&mut self, seq: SeqId) -> usize {
        match self.seqs.remove(&seq) {
            Some(s) => {
                let n = s.table.len();
                self.free.extend(s.table.into_iter().rev());
                n
            }
            None => 0,
        }
    }

    /// Drops the cached tokens of `seq` from position `len` on (keeps the blocks still needed),
    /// e.g. to re-run a chunk.
    pub fn truncate(&mut self, seq: SeqId, len: usize) {
        if let Some(s) = self.seqs.get_mut(&seq)
            && len < s.len
        {
            s.len = len;
            let keep = len.div_ceil(self.block_size);
            let dropped: Vec<u32> = s.table.drain(keep..).collect();
            self.free.extend(dropped.into_iter().rev());
        }
    }

    /// Returns blocks reserved beyond the cached tokens of `seq` (and forgets a sequence with
    /// no cached token), undoing a [`Self::reserve`] whose step failed.
    pub(crate) fn trim(&mut self, seq: SeqId) {
        if let Some(s) = self.seqs.get_mut(&seq) {
            let keep = s.len.div_ceil(self.block_size);
            let dropped: Vec<u32> = s.table.drain(keep..).collect();
            self.free.extend(dropped.into_iter().rev());
            if s.len == 0 {
                self.seqs.remove(&seq);
            }
        }
    }

    pub(crate) fn layer(&self, i: usize) -> &PagedKvCache {
        &self.layers[i]
    }

    pub(crate) fn layer_mut(&mut self, i: usize) -> &mut PagedKvCache {
        &mut self.layers[i]
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::config::Preset;

    #[test]
    fn reserve_is_all_or_nothing_and_free_returns_blocks() {
        let c = Preset::Tiny.config(512);
        let mut p = KvPool::with_blocks(&c, 4, 16, KvDtype::Bf16).unwrap();
        p.reserve(1, 20).unwrap();
        assert_eq!(p.block_table(1).unwrap(), &[0, 1]);
        assert_eq!(p.free_blocks(), 2);
        let e = p.reserve(2, 40).unwrap_err();
        assert!(
            matches!(
                e,
                ModelError::OutOfBlocks {
                    seq: 2,
                    needed: 3,
                    free: 2
                }
            ),
            "{e}"
        );
        assert_eq!(p.free_blocks(), 2);
        assert!(!p.contains(2));
        p.advance(1, 20).unwrap();
        assert_eq!(p.blocks_needed(1, 12), 0);
        assert_eq!(p.blocks_needed(1, 13), 1);
        assert_eq!(p.free(1), 2);
        assert_eq!(p.free_blocks(), 4);
    }

    #[test]
    fn pool_is_sized_from_hbm_and_capped() {
        let c = Preset::Small.config(4096);
        let prof = DeviceProfile::builtin("ascend-910b").unwrap();
        let opts = KvPoolOptions::default();
        let n = blocks_for_hbm(&c, &prof, 100 << 20, &opts);
        let expect = ((64.0 * (1u64 << 30) as f64 * 0.9 - (100u64 << 20) as f64)
            / (16 * kv_bytes_per_token(&c, KvDtype::Bf16)) as f64)
            .floor() as usize;
        assert_eq!(n, expect);
        let p = KvPool::for_device(&c, &prof, 100 << 20, &opts).unwrap();
        assert_eq!(p.total_blocks(), 2048);
        assert_eq!(p.hbm_blocks(), n);
    }
}
