//! The paged KV cache pool: fixed-size blocks of token slots, addressed by per-sequence block
//! tables, as decode attention reads it.
//!
//! Owns the pool layout (`[num_blocks, block_size, num_kv_heads, dim]` for K and for V),
//! rounding written values to the cache dtype, and the "V is a prefix of K" layout used by
//! Multi-head Latent Attention in absorbed form. It must not know which sequence owns which
//! block: allocating blocks and building block tables is the caller's job.

use crate::npu::error::{Result, arg_err, check_len, shape_err};
use crate::npu::format::{round_bf16, round_f16};

/// Element type the cache emulates (values are kept as f32 rounded to it).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum KvDtype {
    /// fp32.
    F32,
    /// fp16.
    F16,
    /// bf16.
    Bf16,
}

impl KvDtype {
    /// Bytes per element on the device.
    pub fn bytes(self) -> usize {
        match self {
            Self::F32 => 4,
            Self::F16 | Self::Bf16 => 2,
        }
    }

    fn round(self, x: f32) -> f32 {
        match self {
            Self::F32 => x,
            Self::F16 => round_f16(x),
            Self::Bf16 => round_bf16(x),
        }
    }
}

/// Where V lives.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ValueLayout {
    /// Its own pool with this head dim.
    Separate(usize),
    /// The first `dim` elements of each K row (MLA absorbed: V = latent part of the KV).
    PrefixOfK(usize),
}

/// A pool of KV blocks.
#[derive(Debug, Clone)]
pub struct PagedKvCache {
    num_blocks: usize,
    block_size: usize,
    num_kv_heads: usize,
    k_dim: usize,
    v_layout: ValueLayout,
    dtype: KvDtype,
    k: Vec<f32>,
    v: Vec<f32>,
}

const OP: &str = "PagedKvCache";

impl PagedKvCache {
    /// Allocates a zeroed pool.
    pub fn new(
        num_blocks: usize,
        block_size: usize,
        num_kv_heads: usize,
        k_dim: usize,
        v_layout: ValueLayout,
        dtype: KvDtype,
    ) -> Result<Self> {
        for (field, v) in [
            ("num_blocks", num_blocks),
            ("block_size", block_size),
            ("num_kv_heads", num_kv_heads),
            ("k_dim", k_dim),
        ] {
            if v == 0 {
                return Err(arg_err(OP, field, "must be non-zero"));
            }
        }
        let v_len = match v_layout {
            ValueLayout::Separate(d) if d > 0 => num_blocks * block_size * num_kv_heads * d,
            ValueLayout::PrefixOfK(d) if d > 0 && d <= k_dim => 0,
            _ => {
                return Err(arg_err(
                    OP,
                    "v_layout",
                    format!(
                        "{v_layout:?}: V dim must be > 0 (and <= k_dim({k_dim}) for PrefixOfK)"
                    ),
                ));
            }
        };
        Ok(Self {
            num_blocks,
            block_size,
            num_kv_heads,
            k_dim,
            v_layout,
            dtype,
            k: vec![0.0; num_blocks * block_size * num_kv_heads * k_dim],
            v: vec![0.0; v_len],
        })
    }

    /// Blocks in the pool.
    pub fn num_blocks(&self) -> usize {
        self.num_blocks
    }
    /// Token slots per block.
    pub fn block_size(&self) -> usize {
        self.block_size
    }
    /// KV heads.
    pub fn num_kv_heads(&self) -> usize {
        self.num_kv_heads
    }
    /// K head dim.
    pub fn k_dim(&self) -> usize {
        self.k_dim
    }
    /// V head dim.
    pub fn v_dim(&self) -> usize {
        match self.v_layout {
            ValueLayout::Separate(d) | ValueLayout::PrefixOfK(d) => d,
        }
    }
    /// V layout.
    pub fn v_layout(&self) -> ValueLayout {
        self.v_layout
    }
    /// Emulated element type.
    pub fn dtype(&self) -> KvDtype {
        self.dtype
    }

    /// Device bytes one cached token occupies (all heads, K and stored V).
    pub fn bytes_per_token(&self) -> usize {
        let v = match self.v_layout {
            ValueLayout::Separate(d) => d,
            ValueLayout::PrefixOfK(_) => 0,
        };
        self.num_kv_heads * (self.k_dim + v) * self.dtype.bytes()
    }

    /// Slot index of token `pos` of a sequence with this block table.
    pub fn slot(&self, block_table: &[u32], pos: usize) -> Result<usize> {
        let b = pos / self.block_size;
        let Some(&block) = block_table.get(b) else {
            return Err(shape_err(
                OP,
                format!(
                    "position {pos} needs block_table[{b}] but the table has {} entries",
                    block_table.len()
                ),
            ));
        };
        let block = block as usize;
        if block >= self.num_blocks {
            return Err(shape_err(
                OP,
                format!(
                    "block_table[{b}] = {block} >= num_blocks({})",
                    self.num_blocks
                ),
            ));
        }
        Ok(block * self.block_size + pos % self.block_size)
    }

    /// Writes one token's K (`[num_kv_heads, k_dim]`) and, for a separate V, its V
    /// (`[num_kv_heads, v_dim]`), rounded to the cache dtype.
    pub fn write(
        &mut self,
        block_table: &[u32],
        pos: usize,
        k: &[f32],
        v: Option<&[f32]>,
    ) -> Result<()> {
        let slot = self.slot(block_table, pos)?;
        let kl = self.num_kv_heads * self.k_dim;
        check_len(OP, "k", k.len(), kl, "num_kv_heads x k_dim")?;
        let dt = self.dtype;
        for (d, s) in self.k[slot * kl..(slot + 1) * kl].iter_mut().zip(k) {
            *d = dt.round(*s);
        }
        match (self.v_layout, v) {
            (ValueLayout::Separate(dv), Some(v)) => {
                let vl = self.num_kv_heads * dv;
                check_len(OP, "v", v.len(), vl, "num_kv_heads x v_dim")?;
                for (d, s) in self.v[slot * vl..(slot + 1) * vl].iter_mut().zip(v) {
                    *d = dt.round(*s);
                }
                Ok(())
            }
            (ValueLayout::PrefixOfK(_), None) => Ok(()),
            (ValueLayout::Separate(_), None) => {
                Err(arg_err(OP, "v", "required: V has its own pool"))
            }
            (ValueLayout::PrefixOfK(_), Some(_)) => {
                Err(arg_err(OP, "v", "must be None: V is a prefix of K"))
            }
        }
    }

    /// K rows of `head` in `block`, from the block's first slot to the end of the pool, and
    /// their row stride (`num_kv_heads * k_dim`). `block` must be `< num_blocks` (checked by
    /// [`Self::slot`] before use).
    pub(crate) fn k_block(&self, block: usize, head: usize) -> (&[f32], usize) {
        let o = (block * self.block_size * self.num_kv_heads + head) * self.k_dim;
        (
            &self.k[o.min(self.k.len())..],
            self.num_kv_heads * self.k_dim,
        )
    }

    /// V rows of `head` in `block` (see [`Self::k_block`]) and their row stride.
    pub(crate) fn v_block(&self, block: usize, head: usize) -> (&[f32], usize) {
        match self.v_layout {
            ValueLayout::Separate(d) => {
                let o = (block * self.block_size * self.num_kv_heads + head) * d;
                (&self.v[o.min(self.v.len())..], self.num_kv_heads * d)
            }
            ValueLayout::PrefixOfK(_) => self.k_block(block, head),
        }
    }
}
