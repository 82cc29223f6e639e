//! Batch-invariant launches built from npu kernels: linear, grouped linear and attention whose
//! result for one token does not depend on which other tokens share the launch, each recorded
//! on the [`Device`] with the cost the npu's own launch would be charged.
//!
//! Owns the row tiling that makes results batch-invariant, and the cost records for them. It
//! must not know the transformer's dataflow, sequences or sampling.
//!
//! # Why
//!
//! A request must yield the same tokens alone or in a batch of 32 (and however its prompt was
//! chunked). The npu's [`crate::npu::Device::linear`] picks a different CPU kernel (fused GEMV,
//! register-blocked small batch, blocked GEMM) by row count, and they sum in different orders;
//! a one-ulp change in a logit is enough to flip a sampled token (measured: 23 of 32 requests
//! diverged on `small`). So float weights (f32, fp16, bf16) go through
//! `matmul::linear_rowwise`, one launch over every row, whose every output is computed the same
//! way whatever rows share the launch; int8 and FP8 weights through calls of exactly
//! [`ROW_TILE`] rows (the last tile zero-padded), one kernel path always. Either way no kernel
//! mixes rows, so a row's result depends only on the row
//! (`tests::linear_rows_do_not_depend_on_the_batch` guards that), with the work spread over
//! the cores. Attention always runs the paged decode kernel, one query token at a time
//! over the cache, whose key blocks do not depend on how the prompt was chunked. The cost model
//! is unchanged: a linear is charged as one `[m, k] x Wᵀ` launch, a grouped linear as the npu's
//! grouped launch, and the attention of a fresh prompt chunk as the npu's fused prefill
//! attention (flash-style, causal).

use std::time::Instant;

use rayon::prelude::*;

use super::error::{Result, input_err};
use crate::npu::cost::Workload;
use crate::npu::device::ACT_BYTES;
use crate::npu::kernels::attention;
use crate::npu::kernels::matmul;
use crate::npu::{AttnShape, Device, LinearWeight, PagedKvCache};

/// Rows per matmul tile of int8 / FP8 weights: every such npu matmul call has exactly this many
/// rows.
pub const ROW_TILE: usize = 8;

fn record(dev: &mut Device, wl: &Workload, start: Instant) {
    let cpu_us = start.elapsed().as_secs_f64() * 1e6;
    let cost = dev.estimate(wl);
    dev.profiler_mut().record(cost, start, cpu_us);
}

/// `rows` rows of `x` (row-major, `k` wide) through `w` as one tile of exactly [`ROW_TILE`]
/// rows (zero-padded), so every call takes the same kernel path whatever the batch.
fn tile(x: &[f32], rows: usize, k: usize, w: &LinearWeight) -> Result<Vec<f32>> {
    let n = w.out_features();
    let mut y = if rows == ROW_TILE {
        matmul::linear(x, ROW_TILE, w)?
    } else {
        let mut padded = vec![0.0f32; ROW_TILE * k];
        padded[..rows * k].copy_from_slice(x);
        matmul::linear(&padded, ROW_TILE, w)?
    };
    y.truncate(rows * n);
    Ok(y)
}

/// `x[m, k] · Wᵀ` in fixed tiles (numerics only).
fn linear_rows(x: &[f32], m: usize, w: &LinearWeight) -> Result<Vec<f32>> {
    let (n, k) = (w.out_features(), w.in_features());
    if x.len() != m * k {
        return Err(input_err(
            "x",
            format!(
                "{} elements, expected rows({m}) x in_features({k})",
                x.len()
            ),
        ));
    }
    // Float weights: one launch for every row, each output element one fixed-order pair
    // (no padding, the weights decoded once).
    if let Some(y) = matmul::linear_rowwise(x, m, w)? {
        return Ok(y);
    }
    if m <= ROW_TILE {
        return tile(x, m, k, w);
    }
    let tiles: Vec<Result<Vec<f32>>> = x
        .par_chunks(ROW_TILE * k)
        .map(|t| tile(t, t.len() / k, k, w))
        .collect();
    let mut y = Vec::with_capacity(m * n);
    for t in tiles {
        y.extend_from_slice(&t?);
    }
    Ok(y)
}

/// Batch-invariant `y[m, out] = x[m, in] · Wᵀ`, recorded as one linear launch.
pub(crate) fn linear(dev: &mut Device, x: &[f32], m: usize, w: &LinearWeight) -> Result<Vec<f32>> {
    let start = Instant::now();
    let y = linear_rows(x, m, w)?;
    let wl = dev.linear_workload(m, w);
    record(dev, &wl, start);
    Ok(y)
}

/// Batch-invariant grouped matmul: rows `offsets[g]..offsets[g+1]` go through `weights[g]`;
/// recorded as one grouped launch whose blocks share the cube cores (as the npu charges it).
pub(crate) fn grouped_linear(
    dev: &mut Device,
    x: &[f32],
    offsets: &[usize],
    weights: &[&LinearWeight],
) -> Result<Vec<f32>> {
    let start = Instant::now();
    if offsets.len() != weights.len() + 1 || offsets.windows(2).any(|p| p[1] < p[0]) {
        return Err(input_err(
            "offsets",
            format!(
                "{} non-decreasing entries expected for {} groups",
                weights.len() + 1,
                weights.len()
            ),
        ));
    }
    let Some(first) = weights.first() else {
        return Ok(Vec::new());
    };
    let (n, k) = (first.out_features(), first.in_features());
    if weights
        .iter()
        .any(|w| (w.out_features(), w.in_features()) != (n, k))
    {
        return Err(input_err("weights", "all groups must have the same shape"));
    }
    let rows = offsets[weights.len()];
    if x.len() != rows * k {
        return Err(input_err(
            "x",
            format!(
                "{} elements, expected rows({rows}) x in_features({k})",
                x.len()
            ),
        ));
    }
    // Each non-empty group through the same batch-invariant path as a linear (row-wise for
    // float weights, fixed tiles for int8 / FP8), the groups spread over the cores.
    let parts: Vec<Result<Vec<f32>>> = (0..weights.len())
        .into_par_iter()
        .filter(|&g| offsets[g + 1] > offsets[g])
        .map(|g| {
            let (r0, r1) = (offsets[g], offsets[g + 1]);
            linear_rows(&x[r0 * k..r1 * k], r1 - r0, weights[g])
        })
        .collect();
    let mut y = Vec::with_capacity(rows * n);
    for p in parts {
        y.extend_from_slice(&p?);
    }
    if let Some(wl) = dev.grouped_linear_workload(offsets, weights) {
        record(dev, &wl, start);
    }
    Ok(y)
}

/// Attention of query tokens over the paged cache (their own K/V already written): token `i`
/// attends to the first `ctx[i]` cached tokens of its sequence. `fresh` lists the chunks
/// `(first token, len)` that start their sequence: they are charged as one fused causal prefill
/// launch, the other tokens as one paged decode launch. Numerics are the decode kernel's for
/// every token.
#[allow(clippy::too_many_arguments)]
pub(crate) fn attention(
    dev: &mut Device,
    q: &[f32],
    cache: &PagedKvCache,
    tables: &[&[u32]],
    ctx: &[usize],
    heads: usize,
    scale: f32,
    fresh: &[(usize, usize)],
) -> Result<Vec<f32>> {
    let start = Instant::now();
    let y = attention::decode_attention(q, cache, tables, ctx, heads, scale)?;
    let shape = AttnShape {
        num_q_heads: heads,
        num_kv_heads: cache.num_kv_heads(),
        qk_dim: cache.k_dim(),
        v_dim: cache.v_dim(),
    };
    let mut in_fresh = vec![false; ctx.len()];
    for &(s, n) in fresh {
        in_fresh[s..s + n].iter_mut().for_each(|f| *f = true);
    }
    let paged: Vec<usize> = (0..ctx.len())
        .filter(|&i| !in_fresh[i])
        .map(|i| ctx[i])
        .collect();
    let lens: Vec<usize> = fresh.iter().map(|&(_, n)| n).collect();
    let mut wls = Vec::with_capacity(2);
    if !lens.is_empty() {
        wls.push(prefill_workload(dev, shape, &lens, cache.bytes_per_token()));
    }
    if !paged.is_empty() {
        wls.push(decode_workload(dev, shape, &paged, cache.bytes_per_token()));
    }
    // Both launches ran inside one host computation: split its CPU time by token count.
    let cpu_us = start.elapsed().as_secs_f64() * 1e6;
    let total = ctx.len().max(1) as f64;
    let shares = [lens.iter().sum::<usize>() as f64, paged.len() as f64];
    for (wl, share) in wls.iter().zip(shares.iter().filter(|s| **s > 0.0)) {
        let cost = dev.estimate(wl);
        dev.profiler_mut()
            .record(cost, start, cpu_us * share / total);
    }
    Ok(y)
}

/// Fused causal prefill over fresh chunks of `lens` tokens: K (with V as its prefix) read once.
fn prefill_workload(dev: &Device, shape: AttnShape, lens: &[usize], kv_bytes: usize) -> Workload {
    let pairs: f64 = lens.iter().map(|&l| (l * (l + 1) / 2) as f64).sum();
    let tokens: usize = lens.iter().sum();
    let tasks = lens.iter().map(|&l| l.div_ceil(128)).sum::<usize>() * shape.num_q_heads;
    let read =
        ACT_BYTES * (tokens * shape.num_q_heads * shape.qk_dim) as u64 + (tokens * kv_bytes) as u64;
    let written = ACT_BYTES * (tokens * shape.num_q_heads * shape.v_dim) as u64;
    dev.attention_workload("prefill_attention", pairs, tasks, shape, read, written)
}

/// Paged decode (flash-decoding: each query's context split in 512-token chunks).
pub(crate) fn decode_workload(
    dev: &Device,
    shape: AttnShape,
    ctx: &[usize],
    kv_bytes: usize,
) -> Workload {
    let total: usize = ctx.iter().sum();
    let tasks = ctx.iter().map(|&l| l.div_ceil(512).max(1)).sum::<usize>() * shape.num_kv_heads;
    let b = ctx.len();
    let read =
        (total * kv_bytes) as u64 + ACT_BYTES * (b * shape.num_q_heads * shape.qk_dim) as u64;
    let written = ACT_BYTES * (b * shape.num_q_heads * shape.v_dim) as u64;
    dev.attention_workload(
        "decode_attention",
        total as f64,
        tasks,
        shape,
        read,
        written,
    )
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::npu::WeightFormat;

    fn data(n: usize, seed: u32) -> Vec<f32> {
        (0..n)
            .map(|i| {
                ((i as u32).wrapping_mul(2_654_435_761).wrapping_add(seed) % 2001) as f32 / 1000.0
                    - 1.0
            })
            .collect()
    }

    #[test]
    fn linear_rows_do_not_depend_on_the_batch() {
        let (n, k) = (96, 200);
        for fmt in [
            WeightFormat::Bf16,
            WeightFormat::F16,
            WeightFormat::Int8,
            WeightFormat::Fp8E4m3,
        ] {
            let w = LinearWeight::from_f32(n, k, &data(n * k, 1), fmt).unwrap();
            let x = data(37 * k, 2);
            let mut dev = Device::builtin("ascend-910b").unwrap();
            let all = linear(&mut dev, &x, 37, &w).unwrap();
            for r in [0, 8, 20, 36] {
                let one = linear(&mut dev, &x[r * k..(r + 1) * k], 1, &w).unwrap();
                assert_eq!(one, all[r * n..(r + 1) * n], "{fmt:?} row {r}");
            }
            // Charged as a single launch, like the npu's own linear.
            let before = dev.take_step();
            assert_eq!(before.launches, 5);
            let _ = linear(&mut dev, &x, 37, &w).unwrap();
            let ours = dev.take_step();
            let _ = dev.linear(&x, 37, &w).unwrap();
            let npu = dev.take_step();
            assert!((ours.device_us - npu.device_us).abs() < 1e-9);
            assert!((ours.energy_j - npu.energy_j).abs() < 1e-15);
        }
    }

    #[test]
    fn grouped_linear_matches_per_group_rows_and_npu_cost() {
        let (n, k) = (48, 64);
        let ws: Vec<LinearWeight> = (0..4)
            .map(|e| {
                LinearWeight::from_f32(n, k, &data(n * k, 10 + e), WeightFormat::Bf16).unwrap()
            })
            .collect();
        let refs: Vec<&LinearWeight> = ws.iter().collect();
        let offsets = [0, 3, 3, 20, 21];
        let x = data(21 * k, 3);
        let mut dev = Device::builtin("ascend-910b").unwrap();
        let y = grouped_linear(&mut dev, &x, &offsets, &refs).unwrap();
        let ours = dev.take_step();
        for (g, w) in ws.iter().enumerate() {
            for r in offsets[g]..offsets[g + 1] {
                let one = linear(&mut dev, &x[r * k..(r + 1) * k], 1, w).unwrap();
                assert_eq!(one, y[r * n..(r + 1) * n]);
            }
        }
        let _ = dev.take_step();
        let _ = dev.grouped_linear(&x, &offsets, &refs).unwrap();
        let npu = dev.take_step();
        assert!(
            (ours.device_us - npu.device_us).abs() < 1e-9,
            "{} vs {}",
            ours.device_us,
            npu.device_us
        );
    }
}
