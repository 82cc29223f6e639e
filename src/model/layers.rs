//! The per-layer compute of the forward pass, written only with npu kernels: Multi-head Latent
//! Attention in absorbed form over the paged cache, the dense SwiGLU MLP and the DeepSeek-V3
//! MoE block (shared + routed experts, group-limited routing, grouped matmul).
//!
//! Owns the dataflow inside one layer for a packed batch of tokens; matmuls and attention go
//! through the batch-invariant launches of `ops`. It must not know how a batch
//! was formed, sequences' lifetimes, sampling or I/O; the caller hands it token positions and
//! block tables.
//!
//! # MLA in absorbed form
//!
//! Per token, `kv_a_proj_with_mqa` gives the latent `c` (`kv_lora_rank`, then RMSNorm) and the
//! shared rope key `k_pe`; the cache stores `[c, rope(k_pe)]`, one "KV head" whose first
//! `kv_lora_rank` elements double as the value. Each query head's non-rotary part is mapped into
//! the latent space by `W_UKᵀ` (from `kv_b_proj`), so `q·k = (W_UKᵀ q_nope)·c + q_pe·k_pe`
//! without ever expanding keys; attention returns a latent per head, and `W_UV` maps it to the
//! head's value before `o_proj`. Both per-head maps run as one grouped matmul (heads as groups).
//! The softmax scale is `1/sqrt(qk_nope_head_dim + qk_rope_head_dim)` as in the unabsorbed
//! form, times YaRN's `mscale²` when `rope_scaling` asks for it.

use crate::npu::{Device, GateConfig, LinearWeight};

use super::config::ModelConfig;
use super::error::Result;
use super::kv_cache::KvPool;
use super::ops;
use super::rope::RopeSetup;
use super::weights::{MlaWeights, Mlp, MoeWeights, QProj};

/// Where each token of the packed batch sits.
pub(crate) struct TokenLayout<'a> {
    /// Absolute position of each token.
    pub positions: &'a [usize],
    /// Block table of each token's sequence.
    pub tables: &'a [&'a [u32]],
    /// Fresh prefill chunks (starting at position 0): `(first token, length)`, charged as a
    /// fused prefill launch.
    pub prefill: &'a [(usize, usize)],
}

/// `[T, H, D]` -> `[H, T, D]` (head-major rows for a grouped matmul over heads).
fn to_head_major(
    x: &[f32],
    t: usize,
    heads: usize,
    stride: usize,
    off: usize,
    d: usize,
) -> Vec<f32> {
    let mut out = Vec::with_capacity(heads * t * d);
    for h in 0..heads {
        for i in 0..t {
            let o = i * stride + h * (stride / heads) + off;
            out.extend_from_slice(&x[o..o + d]);
        }
    }
    out
}

/// MLA over `h[T, hidden]` (already normalised); writes the layer's KV into the cache and
/// returns `[T, hidden]`.
#[allow(clippy::too_many_arguments)]
pub(crate) fn mla(
    dev: &mut Device,
    c: &ModelConfig,
    w: &MlaWeights,
    rope: &RopeSetup,
    h: &[f32],
    layout: &TokenLayout<'_>,
    kv: &mut KvPool,
    layer: usize,
) -> Result<Vec<f32>> {
    let t = layout.positions.len();
    let heads = c.num_attention_heads;
    let (nope, rd, kvl, qk) = (
        c.qk_nope_head_dim,
        c.qk_rope_head_dim,
        c.kv_lora_rank,
        c.qk_head_dim(),
    );
    let kd = c.kv_dim();

    let mut q = match &w.q {
        QProj::LowRank { a, norm, b } => {
            let qa = ops::linear(dev, h, t, a)?;
            let qa = dev.rms_norm(&qa, t, norm, c.rms_norm_eps)?;
            ops::linear(dev, &qa, t, b)?
        }
        QProj::Direct(p) => ops::linear(dev, h, t, p)?,
    };
    dev.rope(&mut q, heads, qk, layout.positions, &rope.rope)?;
    if rope.magnitude != 1.0 {
        for head in q.chunks_mut(qk) {
            head[nope..].iter_mut().for_each(|v| *v *= rope.magnitude);
        }
    }

    let kv_a = ops::linear(dev, h, t, &w.kv_a)?;
    let mut latent = Vec::with_capacity(t * kvl);
    for row in kv_a.chunks(kd) {
        latent.extend_from_slice(&row[..kvl]);
    }
    let latent = dev.rms_norm(&latent, t, &w.kv_norm, c.rms_norm_eps)?;
    let mut kv_full = kv_a;
    for (row, l) in kv_full.chunks_mut(kd).zip(latent.chunks(kvl)) {
        row[..kvl].copy_from_slice(l);
    }
    dev.rope(&mut kv_full, 1, kd, layout.positions, &rope.rope)?;
    if rope.magnitude != 1.0 {
        for row in kv_full.chunks_mut(kd) {
            row[kvl..].iter_mut().for_each(|v| *v *= rope.magnitude);
        }
    }
    let slots: Vec<(&[u32], usize)> = layout
        .tables
        .iter()
        .zip(layout.positions)
        .map(|(tb, &p)| (*tb, p))
        .collect();
    dev.cache_kv(kv.layer_mut(layer), &slots, &kv_full, None)?;

    // Absorb W_UK into the queries: [H*T, nope] -> [H*T, kvl].
    let q_nope = to_head_major(&q, t, heads, heads * qk, 0, nope);
    let offsets: Vec<usize> = (0..=heads).map(|i| i * t).collect();
    let uk: Vec<&LinearWeight> = w.w_uk_t.iter().collect();
    let q_lat = ops::grouped_linear(dev, &q_nope, &offsets, &uk)?;
    let mut q_full = vec![0.0f32; t * heads * kd];
    for i in 0..t {
        for hh in 0..heads {
            let dst = &mut q_full[(i * heads + hh) * kd..(i * heads + hh + 1) * kd];
            dst[..kvl].copy_from_slice(&q_lat[(hh * t + i) * kvl..(hh * t + i + 1) * kvl]);
            let src = (i * heads + hh) * qk + nope;
            dst[kvl..].copy_from_slice(&q[src..src + rd]);
        }
    }

    let scale = rope.softmax_factor / (qk as f32).sqrt();
    let ctx: Vec<usize> = layout.positions.iter().map(|p| p + 1).collect();
    let o_lat = ops::attention(
        dev,
        &q_full,
        kv.layer(layer),
        layout.tables,
        &ctx,
        heads,
        scale,
        layout.prefill,
    )?;
    let row = heads * kvl;

    // Values: W_UV per head, [H*T, kvl] -> [H*T, v].
    let o_hm = to_head_major(&o_lat, t, heads, row, 0, kvl);
    let uv: Vec<&LinearWeight> = w.w_uv.iter().collect();
    let v = ops::grouped_linear(dev, &o_hm, &offsets, &uv)?;
    let vd = c.v_head_dim;
    let mut attn = vec![0.0f32; t * heads * vd];
    for hh in 0..heads {
        for i in 0..t {
            attn[(i * heads + hh) * vd..(i * heads + hh + 1) * vd]
                .copy_from_slice(&v[(hh * t + i) * vd..(hh * t + i + 1) * vd]);
        }
    }
    ops::linear(dev, &attn, t, &w.o)
}

/// Dense SwiGLU MLP over `h[t, hidden]`.
pub(crate) fn mlp(dev: &mut Device, w: &Mlp, h: &[f32], t: usize) -> Result<Vec<f32>> {
    let g = ops::linear(dev, h, t, &w.gate)?;
    let u = ops::linear(dev, h, t, &w.up)?;
    let a = dev.swiglu(&g, &u)?;
    ops::linear(dev, &a, t, &w.down)
}

/// The DeepSeek-V3 MoE block over `h[t, hidden]`: routed experts through dispatch, three
/// grouped matmuls and combine, plus the shared experts.
pub(crate) fn moe(
    dev: &mut Device,
    w: &MoeWeights,
    gate: &GateConfig,
    h: &[f32],
    t: usize,
    hidden: usize,
) -> Result<Vec<f32>> {
    let logits = ops::linear(dev, h, t, &w.router)?;
    let routing = dev.moe_gate(&logits, t, &w.bias, gate)?;
    let d = dev.moe_dispatch(h, hidden, &routing, w.experts.len())?;
    let gates: Vec<&LinearWeight> = w.experts.iter().map(|e| &e.gate).collect();
    let ups: Vec<&LinearWeight> = w.experts.iter().map(|e| &e.up).collect();
    let downs: Vec<&LinearWeight> = w.experts.iter().map(|e| &e.down).collect();
    let g = ops::grouped_linear(dev, &d.rows, &d.offsets, &gates)?;
    let u = ops::grouped_linear(dev, &d.rows, &d.offsets, &ups)?;
    let a = dev.swiglu(&g, &u)?;
    let o = ops::grouped_linear(dev, &a, &d.offsets, &downs)?;
    let mut y = dev.moe_combine(&o, hidden, &d, &routing)?;
    if let Some(s) = &w.shared {
        let ys = mlp(dev, s, h, t)?;
        dev.residual_add(&mut y, &ys)?;
    }
    Ok(y)
}
