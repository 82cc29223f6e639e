//! The paged KV cache of one device: a pool of fixed-size blocks (one npu [`PagedKvCache`] per
//! layer, sharing block ids), per-sequence block tables, allocation and free.
//!
//! Owns pool sizing (from the device profile's HBM, the weights' footprint and the model's KV
//! bytes per token, optionally capped so the host does not allocate a 64 GiB emulation), the
//! free list, and the all-or-nothing reservation that gives a scheduler a clear
//! [`ModelError::OutOfBlocks`]. It must not know scheduling policy, priorities or tenants:
//! which sequence to preempt when blocks run out is the caller's decision.

use std::collections::{BTreeMap, HashMap};

use super::config::ModelConfig;
use super::error::{ModelError, Result, input_err};
use super::prefix::{BlockHash, PrefixHasher};
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
    /// Share of the pool's blocks the prefix cache may retain after their sequences end
    /// (0: no prefix caching).
    pub prefix_cache_share: f64,
}

impl Default for KvPoolOptions {
    fn default() -> Self {
        Self {
            block_size: 16,
            hbm_utilization: 0.9,
            max_blocks: Some(2048),
            dtype: KvDtype::Bf16,
            prefix_cache_share: 0.0,
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

#[derive(Debug, Clone)]
struct SeqBlocks {
    table: Vec<u32>,
    len: usize,
    /// Leading blocks whose content address is known (taken from the cache or published).
    addressed: usize,
    /// The address of the last of them, or the chain's root.
    chain: Option<BlockHash>,
}

/// One block's bookkeeping: who holds it and what it is known to contain.
#[derive(Debug, Clone, Default)]
struct BlockMeta {
    /// Sequences whose table holds the block.
    refs: u32,
    /// Its content address, once it is full and published.
    hash: Option<BlockHash>,
    /// Its place in the retained LRU while no sequence holds it.
    retained_at: Option<u64>,
}

/// Prefix-cache counters of one pool, since it was made.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct PrefixCacheStats {
    /// Retained blocks evicted (to make room, or over the retention cap).
    pub evictions: u64,
}

/// The pool: per-layer caches, a free list, the block table of every live sequence, and the
/// prefix cache: full blocks kept under their content address after their sequences end.
///
/// A block is free, held (by one or more sequences: full blocks with an address may be shared,
/// since a sequence only ever writes past its last full block), or retained (no holder, found
/// again by its address). Retained blocks count as free capacity: taking a block for new tokens
/// uses the free list first, then evicts the least recently released retained block.
#[derive(Debug, Clone)]
pub struct KvPool {
    layers: Vec<PagedKvCache>,
    block_size: usize,
    hbm_blocks: usize,
    free: Vec<u32>,
    seqs: HashMap<SeqId, SeqBlocks>,
    meta: Vec<BlockMeta>,
    by_hash: HashMap<BlockHash, u32>,
    /// Retained blocks by release order (oldest first).
    retained: BTreeMap<u64, u32>,
    release_clock: u64,
    /// Most blocks the cache may retain; 0 turns prefix caching off.
    retain_cap: usize,
    stats: PrefixCacheStats,
    /// Addresses gained and lost since the last [`Self::take_cache_changes`], when tracked.
    changes: Option<CacheChanges>,
}

/// Content addresses a pool gained and lost: what a router needs to know where prefixes are.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct CacheChanges {
    pub added: Vec<BlockHash>,
    pub removed: Vec<BlockHash>,
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
        pool.set_prefix_cache_share(opts.prefix_cache_share);
        Ok(pool)
    }

    /// A pool of exactly `num_blocks` blocks (tests, preemption experiments), prefix caching
    /// off until [`Self::set_prefix_cache_share`].
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
            meta: vec![BlockMeta::default(); num_blocks],
            by_hash: HashMap::new(),
            retained: BTreeMap::new(),
            release_clock: 0,
            retain_cap: 0,
            stats: PrefixCacheStats::default(),
            changes: None,
        })
    }

    /// Lets the prefix cache retain up to `share` of the pool's blocks (0: off). Lowering it
    /// evicts the oldest retained blocks at once.
    pub fn set_prefix_cache_share(&mut self, share: f64) {
        let share = if share.is_finite() {
            share.clamp(0.0, 1.0)
        } else {
            0.0
        };
        self.retain_cap = (self.total_blocks() as f64 * share).floor() as usize;
        while self.retained.len() > self.retain_cap {
            if let Some(block) = self.evict_oldest() {
                self.free.push(block);
            }
        }
    }

    /// Starts recording the addresses the pool gains and loses.
    pub fn track_cache_changes(&mut self) {
        self.changes.get_or_insert_with(CacheChanges::default);
    }

    /// The addresses gained and lost since the last call, netted against what the pool holds
    /// now (an address published and evicted in between is neither); empty when not tracked.
    pub fn take_cache_changes(&mut self) -> CacheChanges {
        let Some(changes) = self.changes.as_mut().map(std::mem::take) else {
            return CacheChanges::default();
        };
        let mut touched: Vec<BlockHash> = changes.added;
        touched.extend(changes.removed);
        touched.sort_unstable();
        touched.dedup();
        let (added, removed) = touched
            .into_iter()
            .partition(|hash| self.by_hash.contains_key(hash));
        CacheChanges { added, removed }
    }

    /// Whether full blocks are kept for reuse.
    pub fn prefix_caching(&self) -> bool {
        self.retain_cap > 0
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
    /// Blocks available for new tokens: free ones and retained ones (evicted on demand).
    pub fn free_blocks(&self) -> usize {
        self.free.len() + self.retained.len()
    }
    /// Blocks held by sequences.
    pub fn used_blocks(&self) -> usize {
        self.total_blocks() - self.free_blocks()
    }
    /// Blocks with a content address (held or retained).
    pub fn cached_blocks(&self) -> usize {
        self.by_hash.len()
    }
    /// Blocks retained with no holder.
    pub fn retained_blocks(&self) -> usize {
        self.retained.len()
    }
    /// Prefix-cache counters.
    pub fn prefix_stats(&self) -> PrefixCacheStats {
        self.stats
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

    /// How many leading blocks of `hashes` the cache holds: what a sequence with this prefix
    /// would reuse.
    pub fn cached_prefix_blocks(&self, hashes: &[BlockHash]) -> usize {
        if !self.prefix_caching() {
            return 0;
        }
        hashes
            .iter()
            .take_while(|h| self.by_hash.contains_key(h))
            .count()
    }

    /// Starts the new sequence `seq` on the longest cached run of `hashes` (the addresses of
    /// its leading full blocks, chained from `root`), at most `max_tokens` tokens of it, and
    /// returns how many tokens it reuses. Its next chunk continues from there. With caching
    /// off, or for a sequence the pool already knows, reuses nothing.
    pub fn attach_prefix(
        &mut self,
        seq: SeqId,
        root: BlockHash,
        hashes: &[BlockHash],
        max_tokens: usize,
    ) -> usize {
        if self.seqs.contains_key(&seq) {
            return 0;
        }
        let limit = (max_tokens / self.block_size).min(hashes.len());
        let reuse = self.cached_prefix_blocks(&hashes[..limit]);
        let mut table = Vec::with_capacity(reuse + 1);
        for hash in &hashes[..reuse] {
            // `cached_prefix_blocks` just found every one of them.
            let Some(&block) = self.by_hash.get(hash) else {
                break;
            };
            self.hold(block);
            table.push(block);
        }
        let reused = table.len();
        self.seqs.insert(
            seq,
            SeqBlocks {
                len: reused * self.block_size,
                addressed: reused,
                chain: Some(if reused == 0 {
                    root
                } else {
                    hashes[reused - 1]
                }),
                table,
            },
        );
        reused * self.block_size
    }

    /// Full blocks of `seq` not yet published, and the position of the first token of the
    /// first of them: what [`Self::publish`] wants next.
    pub fn unpublished(&self, seq: SeqId) -> (usize, usize) {
        match self.seqs.get(&seq) {
            Some(s) if s.chain.is_some() && self.prefix_caching() => (
                (s.len / self.block_size).saturating_sub(s.addressed),
                s.addressed * self.block_size,
            ),
            _ => (0, 0),
        }
    }

    /// Publishes the full blocks of `seq` past its addressed ones under their content
    /// addresses: `tokens` are its tokens from the position [`Self::unpublished`] gave (at
    /// least one full block of them; a partial tail is ignored). A block whose address another
    /// block already has stays private to `seq` (the cache keeps one copy).
    pub fn publish(&mut self, seq: SeqId, hasher: &PrefixHasher, tokens: &[u32]) {
        if !self.prefix_caching() {
            return;
        }
        let bs = self.block_size;
        let Some(s) = self.seqs.get_mut(&seq) else {
            return;
        };
        let Some(mut parent) = s.chain else { return };
        let full = s.len / bs;
        for block in tokens
            .chunks_exact(bs)
            .take(full.saturating_sub(s.addressed))
        {
            let hash = hasher.next(parent, block);
            let id = s.table[s.addressed];
            if let std::collections::hash_map::Entry::Vacant(slot) = self.by_hash.entry(hash) {
                slot.insert(id);
                self.meta[id as usize].hash = Some(hash);
                if let Some(changes) = self.changes.as_mut() {
                    changes.added.push(hash);
                }
            }
            parent = hash;
            s.addressed += 1;
        }
        s.chain = Some(parent);
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
        if needed > self.free_blocks() {
            return Err(ModelError::OutOfBlocks {
                seq,
                needed,
                free: self.free_blocks(),
            });
        }
        let mut new = Vec::with_capacity(needed);
        for _ in 0..needed {
            match self.take_block() {
                Some(block) => new.push(block),
                None => break, // cannot happen: `needed` was checked against both sources
            }
        }
        for &block in &new {
            self.meta[block as usize].refs = 1;
        }
        let entry = self.seqs.entry(seq).or_insert_with(|| SeqBlocks {
            table: Vec::new(),
            len: 0,
            addressed: 0,
            chain: None,
        });
        entry.table.extend(new);
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

    /// Ends `seq`: its blocks are released (published ones retained for reuse, the tail
    /// first in eviction order); returns how many it held (0 for an unknown sequence).
    pub fn free(&mut self, seq: SeqId) -> usize {
        match self.seqs.remove(&seq) {
            Some(s) => {
                let n = s.table.len();
                // Tail first: a prefix's later blocks are evicted before its earlier ones,
                // which more prompts share.
                for &block in s.table.iter().rev() {
                    self.release(block);
                }
                n
            }
            None => 0,
        }
    }

    /// Drops the cached tokens of `seq` from position `len` on (keeps the blocks still needed),
    /// e.g. to re-run a chunk. Blocks whose content address is published (possibly shared)
    /// are never rewritten: `len` may not cut into them.
    pub fn truncate(&mut self, seq: SeqId, len: usize) -> Result<()> {
        let bs = self.block_size;
        let Some(s) = self.seqs.get_mut(&seq) else {
            return Ok(());
        };
        if len >= s.len {
            return Ok(());
        }
        if len < s.addressed * bs {
            return Err(input_err(
                "len",
                format!(
                    "sequence {seq}: {len} would cut into its {} published blocks",
                    s.addressed
                ),
            ));
        }
        s.len = len;
        self.release_past(seq, len.div_ceil(bs));
        Ok(())
    }

    /// Returns blocks reserved beyond the cached tokens of `seq` (and forgets a sequence with
    /// no cached token), undoing a [`Self::reserve`] whose step failed.
    pub(crate) fn trim(&mut self, seq: SeqId) {
        let Some(len) = self.seqs.get(&seq).map(|s| s.len) else {
            return;
        };
        self.release_past(seq, len.div_ceil(self.block_size));
        if len == 0 {
            self.seqs.remove(&seq);
        }
    }

    /// Releases the blocks of `seq`'s table from index `keep` on, the last first.
    fn release_past(&mut self, seq: SeqId, keep: usize) {
        let dropped: Vec<u32> = match self.seqs.get_mut(&seq) {
            Some(s) if keep < s.table.len() => s.table.drain(keep..).collect(),
            _ => return,
        };
        for block in dropped.into_iter().rev() {
            self.release(block);
        }
    }

    /// Forgets `block`'s content address, if it has one (telling the router).
    fn unpublish(&mut self, block: u32) {
        if let Some(hash) = self.meta[block as usize].hash.take() {
            self.by_hash.remove(&hash);
            if let Some(changes) = self.changes.as_mut() {
                changes.removed.push(hash);
            }
        }
    }

    /// A block for new tokens: a free one, else the oldest retained one, evicted.
    fn take_block(&mut self) -> Option<u32> {
        if let Some(block) = self.free.pop() {
            return Some(block);
        }
        self.evict_oldest()
    }

    /// Evicts the least recently released retained block and returns it (no longer cached).
    fn evict_oldest(&mut self) -> Option<u32> {
        let (_, block) = self.retained.pop_first()?;
        self.meta[block as usize].retained_at = None;
        self.unpublish(block);
        self.stats.evictions += 1;
        Some(block)
    }

    /// One more sequence holds `block` (a cache hit): it leaves the retained LRU.
    fn hold(&mut self, block: u32) {
        let meta = &mut self.meta[block as usize];
        if let Some(at) = meta.retained_at.take() {
            self.retained.remove(&at);
        }
        meta.refs += 1;
    }

    /// One sequence lets go of `block`: with no holder left it is retained if it has an
    /// address and the cache has room (evicting the oldest to make it), else freed.
    fn release(&mut self, block: u32) {
        let meta = &mut self.meta[block as usize];
        meta.refs = meta.refs.saturating_sub(1);
        if meta.refs > 0 {
            return;
        }
        if meta.hash.is_some() && self.retain_cap > 0 {
            if self.retained.len() >= self.retain_cap
                && let Some(oldest) = self.evict_oldest()
            {
                self.free.push(oldest);
            }
            self.release_clock += 1;
            let meta = &mut self.meta[block as usize];
            meta.retained_at = Some(self.release_clock);
            self.retained.insert(self.release_clock, block);
        } else {
            self.unpublish(block);
            self.free.push(block);
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

    /// A pool of `blocks` blocks of 4 tokens with the prefix cache allowed `share` of it, and
    /// a hasher.
    fn caching_pool(blocks: usize, share: f64) -> (KvPool, PrefixHasher) {
        let c = Preset::Tiny.config(512);
        let mut p = KvPool::with_blocks(&c, blocks, 4, KvDtype::Bf16).unwrap();
        p.set_prefix_cache_share(share);
        (p, PrefixHasher::new("tiny"))
    }

    /// Runs `tokens` through the pool as sequence `seq` would: attach its cached prefix, write
    /// the rest, publish; returns the tokens it reused.
    fn run_seq(p: &mut KvPool, h: &PrefixHasher, seq: SeqId, scope: &str, tokens: &[u32]) -> usize {
        let hashes = h.chain(scope, tokens, p.block_size());
        let reused = p.attach_prefix(seq, h.root(scope), &hashes, tokens.len() - 1);
        p.reserve(seq, tokens.len() - reused).unwrap();
        p.advance(seq, tokens.len() - reused).unwrap();
        let (blocks, from) = p.unpublished(seq);
        if p.prefix_caching() {
            assert_eq!(from + blocks * p.block_size(), tokens.len() / 4 * 4);
        }
        p.publish(seq, h, &tokens[from..]);
        reused
    }

    #[test]
    fn a_repeated_prefix_reuses_its_blocks_and_never_the_last_token() {
        let (mut p, h) = caching_pool(16, 1.0);
        let prompt: Vec<u32> = (0..10).collect();
        assert_eq!(run_seq(&mut p, &h, 1, "t", &prompt), 0);
        let first = p.block_table(1).unwrap().to_vec();
        assert_eq!(p.cached_blocks(), 2, "two full blocks of 4 published");
        p.free(1);
        assert_eq!((p.retained_blocks(), p.free_blocks()), (2, 16));
        // Same prompt: both full blocks come back, the tail is computed.
        assert_eq!(run_seq(&mut p, &h, 2, "t", &prompt), 8);
        assert_eq!(&p.block_table(2).unwrap()[..2], &first[..2]);
        assert_eq!(p.retained_blocks(), 0, "held again, out of the LRU");
        // A prompt of exactly two blocks keeps its last token to compute: one block reused.
        assert_eq!(run_seq(&mut p, &h, 3, "t", &prompt[..8]), 4);
        // Another scope shares nothing.
        assert_eq!(run_seq(&mut p, &h, 4, "u", &prompt), 0);
        // A prompt that differs in its second block reuses the first only.
        let mut other = prompt.clone();
        other[5] = 99;
        assert_eq!(run_seq(&mut p, &h, 5, "t", &other), 4);
    }

    #[test]
    fn held_blocks_are_never_evicted_and_retained_ones_go_oldest_first() {
        let (mut p, h) = caching_pool(6, 1.0);
        let a: Vec<u32> = (0..9).collect(); // 3 blocks, 2 full
        let b: Vec<u32> = (100..109).collect();
        run_seq(&mut p, &h, 1, "t", &a);
        run_seq(&mut p, &h, 2, "t", &b);
        p.free(2); // b's blocks retained first: oldest
        // Sequence 1 still holds a's blocks: 6 - 3 = 3 available (b's three: 2 retained + 1 free).
        assert_eq!(p.free_blocks(), 3);
        p.reserve(3, 8).unwrap(); // takes the free one, then evicts b's tail block first
        assert_eq!(p.prefix_stats().evictions, 1);
        // b's first block is still there, its second is gone.
        let hb = h.chain("t", &b, 4);
        assert_eq!(p.cached_prefix_blocks(&hb), 1);
        assert_eq!(
            p.cached_prefix_blocks(&h.chain("t", &a, 4)),
            2,
            "held, untouched"
        );
        assert!(p.reserve(4, 8).is_err(), "only one block left");
        p.free(3);
        p.free(1);
        assert_eq!(p.free_blocks(), 6);
    }

    #[test]
    fn the_cache_keeps_at_most_its_share_and_off_means_off() {
        let (mut p, h) = caching_pool(8, 0.25); // 2 retained blocks at most
        for seq in 0..3u64 {
            let tokens: Vec<u32> = (0..5).map(|t| t + 10 * seq as u32).collect();
            run_seq(&mut p, &h, seq, "t", &tokens);
            p.free(seq);
        }
        assert_eq!(p.retained_blocks(), 2);
        assert_eq!(p.free_blocks(), 8);
        assert_eq!(p.prefix_stats().evictions, 1);
        p.set_prefix_cache_share(0.0);
        assert_eq!((p.retained_blocks(), p.cached_blocks()), (0, 0));
        let tokens: Vec<u32> = (0..9).collect();
        assert_eq!(run_seq(&mut p, &h, 9, "t", &tokens), 0);
        p.free(9);
        assert_eq!(run_seq(&mut p, &h, 10, "t", &tokens), 0, "nothing was kept");
        assert_eq!(p.free(10), 3);
        assert_eq!(p.free_blocks(), 8);
    }

    #[test]
    fn cache_changes_are_netted_against_what_the_pool_holds() {
        let (mut p, h) = caching_pool(4, 0.25); // one retained block at most
        p.track_cache_changes();
        let a: Vec<u32> = (0..5).collect();
        let b: Vec<u32> = (10..15).collect();
        run_seq(&mut p, &h, 1, "t", &a);
        run_seq(&mut p, &h, 2, "t", &b);
        p.free(1); // a's block retained
        p.free(2); // b's block retained, a's evicted over the cap
        let changes = p.take_cache_changes();
        assert_eq!(
            changes.added,
            h.chain("t", &b, 4),
            "only what is still cached"
        );
        assert!(changes.removed.contains(&h.chain("t", &a, 4)[0]));
        assert!(!changes.added.contains(&h.chain("t", &a, 4)[0]));
        assert_eq!(p.take_cache_changes(), CacheChanges::default());
    }
}
