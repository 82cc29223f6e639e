//! Matmul / linear in every weight format, and grouped matmul over experts.
//!
//! Owns the numerics of `y = x · Wᵀ` (activations f32 in memory, rounded or quantised to the
//! weight's input format, fp32 accumulation; int8 accumulates exactly in int32; FP8 promotes to
//! fp32 every 128 elements with the block scales) and the CPU strategy, all spread over every
//! core: a fused SIMD GEMV that converts weights in registers for 1-3 rows (int8/FP8: up to 8);
//! for 4-48 rows of float formats, weight rows decoded to f32 four at a time and a 4x4
//! register-blocked kernel; above, 128-row weight panels decoded to f32 and multiplied by the
//! `gemm` crate's micro-kernel. [`linear_rowwise`] is the batch-invariant alternative the
//! model uses for float weights: every output computed alike whatever the rows (bf16 through
//! panels packed at load). It must not know costs or profiles.

use rayon::prelude::*;

use super::simd;
use crate::npu::error::{Result, arg_err, check_len, shape_err};
use crate::npu::format::{
    FP8_BLOCK, WeightFormat, quantize_fp8_tile, quantize_int8_row, round_slice_to,
};
use crate::npu::weights::{LinearWeight, PANEL_WIDTH, PackedBf16, WeightData};

/// Up to this many rows the fused GEMV is used for int8 / FP8; above, decoded panels and GEMM.
pub const GEMV_MAX_ROWS: usize = 8;
/// From this many rows f32 / fp16 / bf16 use the register-blocked small-batch kernel (below,
/// the fused GEMV, which converts weights in registers).
pub const SMALL_BATCH_MIN_ROWS: usize = 4;
/// Up to this many rows f32 / fp16 / bf16 use the register-blocked small-batch kernel.
pub const SMALL_BATCH_MAX_ROWS: usize = 48;
/// Output features per GEMM panel (a multiple of the FP8 block).
const PANEL_N: usize = 128;
/// Output features per GEMV task: bounds.
const GEMV_MIN_CHUNK_N: usize = 16;
const GEMV_MAX_CHUNK_N: usize = 1024;
/// K chunk for int8 through the f32 micro-kernel: 1024 x 127 x 127 < 2^24, so every partial
/// sum is an exactly representable integer.
const INT8_K_CHUNK: usize = 1024;

const OP: &str = "linear";

/// Activations prepared for one weight format.
enum Act {
    /// Rounded to fp16/bf16 (or untouched for f32 weights).
    Float(Vec<f32>),
    /// Per-token int8: values, the same values as f32 (for the GEMM path), and scales `[m]`.
    Int8 {
        q: Vec<i8>,
        qf: Vec<f32>,
        scales: Vec<f32>,
    },
    /// 1x128-tile E4M3: grid values as f32 and scales `[m, ceil(k/128)]`.
    Fp8 { qf: Vec<f32>, scales: Vec<f32> },
}

fn prepare(x: &[f32], m: usize, k: usize, format: WeightFormat) -> Act {
    match format {
        WeightFormat::F32 | WeightFormat::F16 | WeightFormat::Bf16 => {
            let mut v = x.to_vec();
            round_slice_to(format, &mut v);
            Act::Float(v)
        }
        WeightFormat::Int8 => {
            let mut q = vec![0i8; m * k];
            let scales = x
                .chunks(k)
                .zip(q.chunks_mut(k))
                .map(|(row, qrow)| quantize_int8_row(row, qrow))
                .collect();
            let qf = q.iter().map(|&v| f32::from(v)).collect();
            Act::Int8 { q, qf, scales }
        }
        WeightFormat::Fp8E4m3 => {
            let kb = k.div_ceil(FP8_BLOCK);
            let mut qf = vec![0.0f32; m * k];
            let mut scales = vec![1.0f32; m * kb];
            let mut codes = [0u8; FP8_BLOCK];
            for r in 0..m {
                for b in 0..kb {
                    let cols = b * FP8_BLOCK..((b + 1) * FP8_BLOCK).min(k);
                    let w = cols.len();
                    let src = &x[r * k + cols.start..r * k + cols.end];
                    scales[r * kb + b] = quantize_fp8_tile(src, &mut codes[..w]);
                    for (o, c) in qf[r * k + cols.start..r * k + cols.end]
                        .iter_mut()
                        .zip(&codes[..w])
                    {
                        *o = crate::npu::format::e4m3_to_f32(*c);
                    }
                }
            }
            Act::Fp8 { qf, scales }
        }
    }
}

/// Bytes of device workspace the activation quantiser needs (int8 / FP8 copies and scales).
pub fn activation_workspace_bytes(m: usize, k: usize, format: WeightFormat) -> u64 {
    match format {
        WeightFormat::Int8 => (m * k + m * 4) as u64,
        WeightFormat::Fp8E4m3 => (m * k + m * k.div_ceil(FP8_BLOCK) * 4) as u64,
        _ => 0,
    }
}

/// `c[m, n] (+)= a[m, k] · b[n, k]ᵀ` with row strides `lda`, `ldb`, `ldc`, through the `gemm`
/// crate's f32 micro-kernel.
#[allow(clippy::too_many_arguments)]
pub(crate) fn sgemm_nt(
    m: usize,
    n: usize,
    k: usize,
    a: &[f32],
    lda: usize,
    b: &[f32],
    ldb: usize,
    c: &mut [f32],
    ldc: usize,
    accumulate: bool,
    threads: usize,
) -> Result<()> {
    sgemm_strided(
        m,
        n,
        k,
        (a, lda, 1),
        (b, 1, ldb),
        c,
        ldc,
        accumulate,
        threads,
    )
}

/// `c[m, n] (+)= a[m, k] · b[k, n]` with row strides `lda`, `ldb`, `ldc`.
#[allow(clippy::too_many_arguments)]
pub(crate) fn sgemm_nn(
    m: usize,
    n: usize,
    k: usize,
    a: &[f32],
    lda: usize,
    b: &[f32],
    ldb: usize,
    c: &mut [f32],
    ldc: usize,
    accumulate: bool,
    threads: usize,
) -> Result<()> {
    sgemm_strided(
        m,
        n,
        k,
        (a, lda, 1),
        (b, ldb, 1),
        c,
        ldc,
        accumulate,
        threads,
    )
}

/// `c[m, n] (+)= A · B` where `A(i, t) = a[i * a_rs + t * a_cs]`, `B(t, j) = b[t * b_rs + j * b_cs]`
/// and `c` is row-major with row stride `ldc`. Every addressed element is bounds-checked first.
#[allow(clippy::too_many_arguments)]
#[allow(unsafe_code)] // the GEMM micro-kernel call; SAFETY below
fn sgemm_strided(
    m: usize,
    n: usize,
    k: usize,
    (a, a_rs, a_cs): (&[f32], usize, usize),
    (b, b_rs, b_cs): (&[f32], usize, usize),
    c: &mut [f32],
    ldc: usize,
    accumulate: bool,
    threads: usize,
) -> Result<()> {
    if m == 0 || n == 0 {
        return Ok(());
    }
    if k == 0 {
        if !accumulate {
            for row in c.chunks_mut(ldc.max(1)).take(m) {
                row.iter_mut().take(n).for_each(|v| *v = 0.0);
            }
        }
        return Ok(());
    }
    let last = |r: usize, rs: usize, cl: usize, cs: usize| (r - 1) * rs + (cl - 1) * cs;
    if ldc < n
        || a.len() <= last(m, a_rs, k, a_cs)
        || b.len() <= last(k, b_rs, n, b_cs)
        || c.len() <= last(m, ldc, n, 1)
    {
        return Err(shape_err(
            "sgemm",
            format!(
                "m={m} n={n} k={k} a=({}, rs {a_rs}, cs {a_cs}) b=({}, rs {b_rs}, cs {b_cs}) c=({}, ld {ldc})",
                a.len(),
                b.len(),
                c.len()
            ),
        ));
    }
    let parallelism = if threads > 1 {
        gemm::Parallelism::Rayon(threads)
    } else {
        gemm::Parallelism::None
    };
    // SAFETY: the checks above guarantee that every element the strides address lies inside
    // `a`, `b` and `c`; `c` is borrowed mutably so nothing aliases it.
    unsafe {
        gemm::gemm(
            m,
            n,
            k,
            c.as_mut_ptr(),
            1,
            ldc as isize,
            accumulate,
            a.as_ptr(),
            a_cs as isize,
            a_rs as isize,
            b.as_ptr(),
            b_cs as isize,
            b_rs as isize,
            if accumulate { 1.0 } else { 0.0 },
            1.0,
            false,
            false,
            false,
            parallelism,
        );
    }
    Ok(())
}

/// `y[m, out] = x[m, in] · Wᵀ` in the weight's format (see the module docs for numerics).
pub fn linear(x: &[f32], m: usize, w: &LinearWeight) -> Result<Vec<f32>> {
    let (n, k) = (w.out_features(), w.in_features());
    check_len(
        OP,
        "x",
        x.len(),
        m * k,
        &format!("rows({m}) x in_features({k})"),
    )?;
    let mut out = vec![0.0f32; m * n];
    if m == 0 {
        return Ok(out);
    }
    let act = prepare(x, m, k, w.format());
    let float = matches!(
        w.format(),
        WeightFormat::F32 | WeightFormat::F16 | WeightFormat::Bf16
    );
    if m < SMALL_BATCH_MIN_ROWS || (m <= GEMV_MAX_ROWS && !float) {
        gemv(&act, m, w, &mut out)?;
    } else if float && m <= SMALL_BATCH_MAX_ROWS {
        if let Act::Float(a) = &act {
            small_batch(a, m, w, &mut out);
        }
    } else {
        gemm_panels(&act, m, w, &mut out)?;
    }
    Ok(out)
}

/// Output features per task of [`linear_rowwise`]: a multiple of the 4-row weight groups.
const ROWWISE_CHUNK_N: usize = 64;

/// `y[m, out] = x[m, in] · Wᵀ` for float weight formats where every output element is computed
/// the same way whatever `m`, the other rows, or how the work is split: bf16 weights through
/// their packed panels (one sequential FMA chain over `k` per output, [`linear_packed`]),
/// f32 / fp16 as one [`simd::block_dots`] pair (a 16-lane accumulator over `k` and one final
/// reduction). So a row's result depends only on the row, and any number of rows can share a
/// launch (no padding, the weights read once per launch). Tasks own runs of output features,
/// spread over every core. Returns `None` for int8 / FP8 weights, whose kernels differ.
pub fn linear_rowwise(x: &[f32], m: usize, w: &LinearWeight) -> Result<Option<Vec<f32>>> {
    const WB: usize = 4;
    let (n, k) = (w.out_features(), w.in_features());
    if !w.format().is_float() {
        return Ok(None);
    }
    check_len(
        OP,
        "x",
        x.len(),
        m * k,
        &format!("rows({m}) x in_features({k})"),
    )?;
    let mut out = vec![0.0f32; m * n];
    if m == 0 {
        return Ok(Some(out));
    }
    let mut xr = x.to_vec();
    round_slice_to(w.format(), &mut xr);
    if let Some(packed) = w.packed_bf16() {
        return Ok(Some(linear_packed(&xr, m, n, packed)));
    }
    let xrow = |i: usize| &xr[i * k..(i + 1) * k];
    let mut out_t = vec![0.0f32; n * m];
    out_t
        .par_chunks_mut(ROWWISE_CHUNK_N * m)
        .enumerate()
        .for_each(|(chunk, dst)| {
            let n0 = chunk * ROWWISE_CHUNK_N;
            let rows_here = dst.len() / m;
            let mut wbuf = vec![0.0f32; WB * k];
            let mut r0 = 0;
            while r0 < rows_here {
                let nb = WB.min(rows_here - r0);
                w.decode_rows(n0 + r0..n0 + r0 + nb, true, &mut wbuf[..nb * k]);
                let wr: Vec<&[f32]> = wbuf[..nb * k].chunks(k).collect();
                let mut mi = 0;
                while mi < m {
                    let rb = (m - mi).min(4);
                    let mut put = |b: &[[f32; 4]], cols: usize| {
                        for (r, row) in b.iter().enumerate() {
                            for (c, v) in row.iter().take(cols).enumerate() {
                                dst[(r0 + c) * m + mi + r] = *v;
                            }
                        }
                    };
                    if nb == WB {
                        let ws = [wr[0], wr[1], wr[2], wr[3]];
                        match rb {
                            4 => put(
                                &simd::block_dots::<4, 4>(
                                    [xrow(mi), xrow(mi + 1), xrow(mi + 2), xrow(mi + 3)],
                                    ws,
                                    k,
                                ),
                                4,
                            ),
                            3 => put(
                                &simd::block_dots::<3, 4>(
                                    [xrow(mi), xrow(mi + 1), xrow(mi + 2)],
                                    ws,
                                    k,
                                ),
                                4,
                            ),
                            2 => put(
                                &simd::block_dots::<2, 4>([xrow(mi), xrow(mi + 1)], ws, k),
                                4,
                            ),
                            _ => put(&simd::block_dots::<1, 4>([xrow(mi)], ws, k), 4),
                        }
                    } else {
                        // The last few weight rows: one pair at a time, the same pair numerics.
                        for r in 0..rb {
                            for (c, wrow) in wr.iter().enumerate() {
                                let v = simd::block_dots::<1, 1>([xrow(mi + r)], [wrow], k)[0][0];
                                dst[(r0 + c) * m + mi + r] = v;
                            }
                        }
                    }
                    mi += rb;
                }
                r0 += nb;
            }
        });
    untranspose(&out_t, m, n, &mut out);
    Ok(Some(out))
}

/// `out[m, n]` (row-major) from `out_t[n, m]`: the per-feature task buffers back in row order.
fn untranspose(out_t: &[f32], m: usize, n: usize, out: &mut [f32]) {
    for (r, row) in out_t.chunks(m).enumerate().take(n) {
        for (mi, v) in row.iter().enumerate() {
            out[mi * n + r] = *v;
        }
    }
}

/// Rows per [`simd::panel_dots`] call: 6 rows x 32 features keep 12 accumulators in registers.
const PANEL_ROWS: usize = 6;
/// From this many rows the panels are decoded to f32 once per launch.
const DECODE_PANELS_FROM_ROWS: usize = 24;

/// `x[m, k]` (already rounded to bf16) through packed bf16 panels: tasks own runs of panel
/// pairs (32 output features), each pair multiplied against every row, six rows at a time.
/// Each output is one sequential FMA chain over `k`, so no row, split or CPU path changes it.
fn linear_packed(x: &[f32], m: usize, n: usize, packed: &PackedBf16) -> Vec<f32> {
    let k = packed.in_features;
    let pairs = packed.panels / 2;
    let per_task = pairs
        .div_ceil(4 * rayon::current_num_threads().max(1))
        .max(1);
    let xrow = |i: usize| &x[i * k..(i + 1) * k];
    // Each task's block: [m][its pairs x 32], row-major.
    let blocks: Vec<(usize, Vec<f32>)> = (0..pairs)
        .step_by(per_task)
        .collect::<Vec<_>>()
        .into_par_iter()
        .map(|first| {
            let last = (first + per_task).min(pairs);
            let width = (last - first) * 32;
            let mut block = vec![0.0f32; m * width];
            // With many row blocks, each pair is decoded to f32 once and reused by all of
            // them (with few, converting in registers is cheaper than the decode's stores).
            let decode = m >= DECODE_PANELS_FROM_ROWS;
            let mut decoded = vec![0.0f32; if decode { 2 * PANEL_WIDTH * k } else { 0 }];
            for pair in first..last {
                let panels = [packed.panel(2 * pair), packed.panel(2 * pair + 1)];
                if decode {
                    let (d0, d1) = decoded.split_at_mut(PANEL_WIDTH * k);
                    for (dst, src) in [(d0, panels[0]), (d1, panels[1])] {
                        for (o, &b) in dst.iter_mut().zip(src) {
                            *o = f32::from_bits(u32::from(b) << 16);
                        }
                    }
                }
                let (f0, f1) = decoded.split_at(decoded.len() / 2);
                let col = (pair - first) * 32;
                let mut r0 = 0;
                while r0 < m {
                    let rows = (m - r0).min(PANEL_ROWS);
                    let mut put = |out: &[[f32; 32]]| {
                        for (r, o) in out.iter().enumerate() {
                            let at = (r0 + r) * width + col;
                            block[at..at + 32].copy_from_slice(o);
                        }
                    };
                    macro_rules! rows {
                        ($r:literal) => {{
                            let mut out = [[0.0f32; 32]; $r];
                            let xs: [&[f32]; $r] = std::array::from_fn(|i| xrow(r0 + i));
                            if decode {
                                simd::panel_dots_f32::<$r>(xs, [f0, f1], k, &mut out);
                            } else {
                                simd::panel_dots::<$r>(xs, panels, k, &mut out);
                            }
                            put(&out);
                        }};
                    }
                    match rows {
                        6 => rows!(6),
                        5 => rows!(5),
                        4 => rows!(4),
                        3 => rows!(3),
                        2 => rows!(2),
                        _ => rows!(1),
                    }
                    r0 += rows;
                }
            }
            (first, block)
        })
        .collect();
    let mut out = vec![0.0f32; m * n];
    for (first, block) in blocks {
        let col0 = first * 32;
        let width = block.len() / m.max(1);
        let take = width.min(n.saturating_sub(col0));
        for (r, row) in block.chunks(width).enumerate() {
            out[r * n + col0..r * n + col0 + take].copy_from_slice(&row[..take]);
        }
    }
    out
}

fn gemv(act: &Act, m: usize, w: &LinearWeight, out: &mut [f32]) -> Result<()> {
    let (n, k) = (w.out_features(), w.in_features());
    let kb = k.div_ceil(FP8_BLOCK);
    // out_t[n, m]: each task owns a contiguous run of output features, long enough that each
    // core streams megabytes of weights, short enough that work stealing can balance.
    let chunk_n = n
        .div_ceil(4 * rayon::current_num_threads().max(1))
        .clamp(GEMV_MIN_CHUNK_N, GEMV_MAX_CHUNK_N);
    let mut out_t = vec![0.0f32; n * m];
    out_t
        .par_chunks_mut(chunk_n * m)
        .enumerate()
        .for_each(|(chunk, dst)| {
            let n0 = chunk * chunk_n;
            let mut comb = vec![0.0f32; kb];
            for (j, row_out) in dst.chunks_mut(m).enumerate() {
                let r = n0 + j;
                match (w.data(), act) {
                    (WeightData::F16(v), Act::Float(x)) => {
                        let wr = &v[r * k..(r + 1) * k];
                        for (mi, o) in row_out.iter_mut().enumerate() {
                            *o = simd::dot_f16(&x[mi * k..(mi + 1) * k], wr);
                        }
                    }
                    (WeightData::F32(v), Act::Float(x)) => {
                        let wr = &v[r * k..(r + 1) * k];
                        for (mi, o) in row_out.iter_mut().enumerate() {
                            *o = simd::dot(&x[mi * k..(mi + 1) * k], wr);
                        }
                    }
                    (WeightData::Bf16(v), Act::Float(x)) => {
                        let wr = &v[r * k..(r + 1) * k];
                        for (mi, o) in row_out.iter_mut().enumerate() {
                            *o = simd::dot_bf16(&x[mi * k..(mi + 1) * k], wr);
                        }
                    }
                    (WeightData::Int8 { q: wq, scales: ws }, Act::Int8 { q, scales, .. }) => {
                        let wr = &wq[r * k..(r + 1) * k];
                        for (mi, o) in row_out.iter_mut().enumerate() {
                            let acc = simd::dot_i8(&q[mi * k..(mi + 1) * k], wr);
                            *o = acc as f32 * scales[mi] * ws[r];
                        }
                    }
                    (WeightData::Fp8E4m3 { q: wq, scale_inv }, Act::Fp8 { qf, scales }) => {
                        let wr = &wq[r * k..(r + 1) * k];
                        let ws = &scale_inv[(r / FP8_BLOCK) * kb..(r / FP8_BLOCK + 1) * kb];
                        for (mi, o) in row_out.iter_mut().enumerate() {
                            // Combined scale of each 128-deep block: activation tile x weight block.
                            for (c, (a, b)) in comb
                                .iter_mut()
                                .zip(scales[mi * kb..(mi + 1) * kb].iter().zip(ws))
                            {
                                *c = a * b;
                            }
                            *o = simd::dot_e4m3_scaled(
                                &qf[mi * k..(mi + 1) * k],
                                wr,
                                FP8_BLOCK,
                                &comb,
                            );
                        }
                    }
                    // `prepare` builds the activation variant from the weight's own format.
                    _ => {}
                }
            }
        });
    untranspose(&out_t, m, n, out);
    Ok(())
}

/// Small batches of float formats: weight rows are decoded to f32 four at a time and multiplied
/// against blocks of four activation rows with [`simd::block_dots`], so each weight element is
/// read from memory once and each loaded vector feeds four FMAs.
fn small_batch(x: &[f32], m: usize, w: &LinearWeight, out: &mut [f32]) {
    const WB: usize = 4;
    let (n, k) = (w.out_features(), w.in_features());
    let chunk_n = n
        .div_ceil(4 * rayon::current_num_threads().max(1))
        .clamp(GEMV_MIN_CHUNK_N, GEMV_MAX_CHUNK_N)
        .next_multiple_of(WB);
    let mut out_t = vec![0.0f32; n * m];
    out_t
        .par_chunks_mut(chunk_n * m)
        .enumerate()
        .for_each(|(chunk, dst)| {
            let n0 = chunk * chunk_n;
            let rows_here = dst.len() / m;
            let mut wbuf = vec![0.0f32; WB * k];
            let mut r0 = 0;
            while r0 < rows_here {
                let nb = WB.min(rows_here - r0);
                w.decode_rows(n0 + r0..n0 + r0 + nb, true, &mut wbuf[..nb * k]);
                let wr: Vec<&[f32]> = wbuf.chunks(k).collect();
                let xr = |i: usize| &x[i * k..(i + 1) * k];
                let mut put = |mi: usize, c: usize, v: f32| dst[(r0 + c) * m + mi] = v;
                let mut mi = 0;
                while mi < m {
                    let rb = (m - mi).min(4);
                    if nb == WB && rb == 4 {
                        let b = simd::block_dots::<4, 4>(
                            [xr(mi), xr(mi + 1), xr(mi + 2), xr(mi + 3)],
                            [wr[0], wr[1], wr[2], wr[3]],
                            k,
                        );
                        for (r, row) in b.iter().enumerate() {
                            for (c, v) in row.iter().enumerate() {
                                put(mi + r, c, *v);
                            }
                        }
                    } else if nb == WB {
                        let ws4 = [wr[0], wr[1], wr[2], wr[3]];
                        let mut put_block = |b: &[[f32; 4]]| {
                            for (r, row) in b.iter().enumerate() {
                                for (c, v) in row.iter().enumerate() {
                                    put(mi + r, c, *v);
                                }
                            }
                        };
                        match rb {
                            1 => put_block(&simd::block_dots::<1, 4>([xr(mi)], ws4, k)),
                            2 => put_block(&simd::block_dots::<2, 4>([xr(mi), xr(mi + 1)], ws4, k)),
                            _ => put_block(&simd::block_dots::<3, 4>(
                                [xr(mi), xr(mi + 1), xr(mi + 2)],
                                ws4,
                                k,
                            )),
                        }
                    } else {
                        for r in 0..rb {
                            for (c, wrow) in wr.iter().enumerate().take(nb) {
                                put(mi + r, c, simd::dot(xr(mi + r), wrow));
                            }
                        }
                    }
                    mi += rb;
                }
                r0 += nb;
            }
        });
    untranspose(&out_t, m, n, out);
}

fn gemm_panels(act: &Act, m: usize, w: &LinearWeight, out: &mut [f32]) -> Result<()> {
    let (n, k) = (w.out_features(), w.in_features());
    let panels = n.div_ceil(PANEL_N);
    let threads = rayon::current_num_threads();
    let inner_threads = if panels >= 2 * threads { 1 } else { threads };
    let kb = k.div_ceil(FP8_BLOCK);
    let results: Vec<Result<Vec<f32>>> = (0..panels)
        .into_par_iter()
        .map(|p| {
            let n0 = p * PANEL_N;
            let n1 = (n0 + PANEL_N).min(n);
            let nb = n1 - n0;
            let mut panel = vec![0.0f32; nb * k];
            w.decode_rows(n0..n1, true, &mut panel);
            let mut local = vec![0.0f32; m * nb];
            match (w.data(), act) {
                (_, Act::Float(a)) => {
                    sgemm_nt(
                        m,
                        nb,
                        k,
                        a,
                        k,
                        &panel,
                        k,
                        &mut local,
                        nb,
                        false,
                        inner_threads,
                    )?;
                }
                (WeightData::Int8 { scales: ws, .. }, Act::Int8 { qf, scales, .. }) => {
                    let mut acc = vec![0i32; m * nb];
                    let mut tmp = vec![0.0f32; m * nb];
                    let mut k0 = 0;
                    while k0 < k {
                        let kw = INT8_K_CHUNK.min(k - k0);
                        sgemm_nt(
                            m,
                            nb,
                            kw,
                            &qf[k0..],
                            k,
                            &panel[k0..],
                            k,
                            &mut tmp,
                            nb,
                            false,
                            inner_threads,
                        )?;
                        for (a, t) in acc.iter_mut().zip(&tmp) {
                            // Exact: |t| < 2^24 is an integer (see INT8_K_CHUNK).
                            *a += *t as i32;
                        }
                        k0 += kw;
                    }
                    for (mi, row) in local.chunks_mut(nb).enumerate() {
                        for (j, o) in row.iter_mut().enumerate() {
                            *o = acc[mi * nb + j] as f32 * scales[mi] * ws[n0 + j];
                        }
                    }
                }
                (WeightData::Fp8E4m3 { scale_inv, .. }, Act::Fp8 { qf, scales }) => {
                    let mut tmp = vec![0.0f32; m * nb];
                    let wsb = &scale_inv[(n0 / FP8_BLOCK) * kb..(n0 / FP8_BLOCK + 1) * kb];
                    for b in 0..kb {
                        let k0 = b * FP8_BLOCK;
                        let kw = FP8_BLOCK.min(k - k0);
                        sgemm_nt(
                            m,
                            nb,
                            kw,
                            &qf[k0..],
                            k,
                            &panel[k0..],
                            k,
                            &mut tmp,
                            nb,
                            false,
                            inner_threads,
                        )?;
                        // PANEL_N == FP8_BLOCK, so the whole panel shares one weight scale.
                        let sw = wsb[b];
                        for (mi, (row, trow)) in
                            local.chunks_mut(nb).zip(tmp.chunks(nb)).enumerate()
                        {
                            let s = scales[mi * kb + b] * sw;
                            simd::axpy(row, s, trow);
                        }
                    }
                }
                _ => {
                    return Err(arg_err(
                        OP,
                        "format",
                        "activation and weight formats disagree",
                    ));
                }
            }
            Ok(local)
        })
        .collect();
    for (p, local) in results.into_iter().enumerate() {
        let local = local?;
        let n0 = p * PANEL_N;
        let nb = local.len() / m;
        for (mi, row) in local.chunks(nb).enumerate() {
            out[mi * n + n0..mi * n + n0 + nb].copy_from_slice(row);
        }
    }
    Ok(())
}

/// Grouped matmul over experts: rows `offsets[e]..offsets[e+1]` of `x` go through `weights[e]`.
/// Every weight must have the same shape; output is `[offsets.last(), out_features]`.
pub fn grouped_linear(x: &[f32], offsets: &[usize], weights: &[&LinearWeight]) -> Result<Vec<f32>> {
    const GOP: &str = "grouped_linear";
    if offsets.len() != weights.len() + 1 {
        return Err(shape_err(
            GOP,
            format!(
                "`offsets` has {} entries, expected experts({}) + 1",
                offsets.len(),
                weights.len()
            ),
        ));
    }
    let Some(first) = weights.first() else {
        return Ok(Vec::new());
    };
    let (n, k) = (first.out_features(), first.in_features());
    for (e, w) in weights.iter().enumerate() {
        if (w.out_features(), w.in_features()) != (n, k) {
            return Err(shape_err(
                GOP,
                format!(
                    "weights[{e}] is [{}, {}], expected [{n}, {k}] like weights[0]",
                    w.out_features(),
                    w.in_features()
                ),
            ));
        }
    }
    if offsets[0] != 0 || offsets.windows(2).any(|p| p[1] < p[0]) {
        return Err(arg_err(
            GOP,
            "offsets",
            "must start at 0 and be non-decreasing",
        ));
    }
    let rows = offsets[weights.len()];
    check_len(
        GOP,
        "x",
        x.len(),
        rows * k,
        &format!("offsets.last()({rows}) x in_features({k})"),
    )?;
    let mut out = vec![0.0f32; rows * n];
    for (e, w) in weights.iter().enumerate() {
        let (r0, r1) = (offsets[e], offsets[e + 1]);
        if r1 > r0 {
            let y = linear(&x[r0 * k..r1 * k], r1 - r0, w)?;
            out[r0 * n..r1 * n].copy_from_slice(&y);
        }
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::npu::format::{round_bf16, round_f16};
    use proptest::prelude::*;

    fn data(len: usize, seed: u64) -> Vec<f32> {
        let mut s = seed
            .wrapping_mul(6364136223846793005)
            .wrapping_add(1442695040888963407);
        (0..len)
            .map(|_| {
                s = s
                    .wrapping_mul(6364136223846793005)
                    .wrapping_add(1442695040888963407);
                ((s >> 33) as f64 / (1u64 << 31) as f64 * 2.0 - 1.0) as f32
            })
            .collect()
    }

    /// f64 reference of `x · Wᵀ` on already-rounded operands.
    fn reference(x: &[f32], m: usize, w: &[f32], n: usize, k: usize) -> Vec<f64> {
        let mut y = vec![0.0f64; m * n];
        for i in 0..m {
            for j in 0..n {
                y[i * n + j] = (0..k)
                    .map(|t| f64::from(x[i * k + t]) * f64::from(w[j * k + t]))
                    .sum();
            }
        }
        y
    }

    fn max_err(a: &[f32], b: &[f64]) -> f64 {
        a.iter()
            .zip(b)
            .map(|(x, y)| (f64::from(*x) - y).abs())
            .fold(0.0, f64::max)
    }

    /// fp16/bf16: inputs rounded to the format, then exact products summed in f32:
    /// error <= k * 2^-23 * sum|x||w| (f32 accumulation bound), here checked as 1e-5 * k * rms.
    fn check_float(m: usize, n: usize, k: usize, format: WeightFormat, seed: u64) {
        let x = data(m * k, seed);
        let wf = data(n * k, seed + 1);
        let w = LinearWeight::from_f32(n, k, &wf, format).unwrap();
        let round = |v: f32| match format {
            WeightFormat::F16 => round_f16(v),
            WeightFormat::Bf16 => round_bf16(v),
            _ => v,
        };
        let xr: Vec<f32> = x.iter().map(|&v| round(v)).collect();
        let wr: Vec<f32> = wf.iter().map(|&v| round(v)).collect();
        let r = reference(&xr, m, &wr, n, k);
        let y = linear(&x, m, &w).unwrap();
        let tol = 1e-6 * k as f64 + 1e-6;
        assert!(
            max_err(&y, &r) <= tol,
            "{format:?} {m}x{n}x{k}: {} > {tol}",
            max_err(&y, &r)
        );
    }

    #[test]
    fn float_formats_match_reference_on_all_paths() {
        for format in [WeightFormat::F32, WeightFormat::F16, WeightFormat::Bf16] {
            check_float(1, 200, 300, format, 1);
            check_float(5, 70, 33, format, 2);
            check_float(40, 300, 257, format, 3);
            check_float(70, 131, 200, format, 4);
        }
    }

    /// int8: exact on the quantised grid (integer dot x scales) and, against the unquantised
    /// f64 product, within k x (half step of x + half step of w + their product) for |x|,|w| <= 1.
    fn check_int8(m: usize, n: usize, k: usize, seed: u64) {
        let x = data(m * k, seed);
        let wf = data(n * k, seed + 1);
        let w = LinearWeight::from_f32(n, k, &wf, WeightFormat::Int8).unwrap();
        let y = linear(&x, m, &w).unwrap();
        let WeightData::Int8 { q: wq, scales: ws } = w.data() else {
            unreachable!()
        };
        for i in 0..m {
            let mut q = vec![0i8; k];
            let s = quantize_int8_row(&x[i * k..(i + 1) * k], &mut q);
            for j in 0..n {
                let acc: i64 = (0..k)
                    .map(|t| i64::from(q[t]) * i64::from(wq[j * k + t]))
                    .sum();
                let expect = acc as f32 * s * ws[j];
                assert_eq!(y[i * n + j], expect, "({i},{j})");
            }
        }
        let r = reference(&x, m, &wf, n, k);
        let bound = k as f64 * (0.5 / 127.0 + 0.5 / 127.0 + 0.25 / 127.0 / 127.0) * 1.01;
        assert!(max_err(&y, &r) <= bound, "{} > {bound}", max_err(&y, &r));
    }

    /// FP8: equal (to f32 rounding) to the f64 product of the block-dequantised operands, and
    /// within k x (2/16 + 1/256) of the unquantised f64 product (relative 2^-4 per operand).
    fn check_fp8(m: usize, n: usize, k: usize, seed: u64) {
        let x = data(m * k, seed);
        let wf = data(n * k, seed + 1);
        let w = LinearWeight::from_f32(n, k, &wf, WeightFormat::Fp8E4m3).unwrap();
        let y = linear(&x, m, &w).unwrap();
        let wd = w.dequantize();
        let Act::Fp8 { qf, scales } = prepare(&x, m, k, WeightFormat::Fp8E4m3) else {
            unreachable!()
        };
        let kb = k.div_ceil(FP8_BLOCK);
        let xd: Vec<f32> = (0..m * k)
            .map(|i| qf[i] * scales[(i / k) * kb + (i % k) / FP8_BLOCK])
            .collect();
        let r = reference(&xd, m, &wd, n, k);
        let grid_tol = 1e-6 * k as f64 + 1e-6;
        assert!(max_err(&y, &r) <= grid_tol, "grid: {}", max_err(&y, &r));
        let r0 = reference(&x, m, &wf, n, k);
        let bound = k as f64 * (2.0 / 16.0 + 1.0 / 256.0);
        assert!(max_err(&y, &r0) <= bound);
    }

    #[test]
    fn int8_is_exact_on_the_quantised_grid_and_bounded_against_f64() {
        check_int8(3, 50, 2100, 4);
        check_int8(20, 130, 2100, 5);
    }

    #[test]
    fn fp8_matches_blockwise_reference_and_error_bound() {
        for (m, n, k, seed) in [(2, 150, 300, 6u64), (17, 260, 300, 7)] {
            check_fp8(m, n, k, seed);
            // Typical (rms) error is far below the worst case.
            let x = data(m * k, seed);
            let wf = data(n * k, seed + 1);
            let w = LinearWeight::from_f32(n, k, &wf, WeightFormat::Fp8E4m3).unwrap();
            let y = linear(&x, m, &w).unwrap();
            let r0 = reference(&x, m, &wf, n, k);
            let rms = (y
                .iter()
                .zip(&r0)
                .map(|(a, b)| (f64::from(*a) - b).powi(2))
                .sum::<f64>()
                / y.len() as f64)
                .sqrt();
            assert!(rms < 0.05 * (k as f64).sqrt() / 3.0, "rms {rms}");
        }
    }

    #[test]
    fn bad_shapes_are_errors() {
        let w = LinearWeight::from_f32(4, 3, &[0.0; 12], WeightFormat::F16).unwrap();
        let e = linear(&[0.0; 5], 2, &w).unwrap_err().to_string();
        assert!(e.contains("`x`") && e.contains("in_features(3)"), "{e}");
        let e = grouped_linear(&[0.0; 6], &[0, 1], &[&w, &w])
            .unwrap_err()
            .to_string();
        assert!(e.contains("offsets"), "{e}");
    }

    #[test]
    fn rowwise_rows_do_not_depend_on_the_batch_and_match_the_reference() {
        for (n, k) in [(70, 33), (129, 300), (8, 16)] {
            for format in [WeightFormat::F32, WeightFormat::F16, WeightFormat::Bf16] {
                let w32 = data(n * k, 5);
                let w = LinearWeight::from_f32(n, k, &w32, format).expect("weight");
                let m = 29; // past DECODE_PANELS_FROM_ROWS: both bf16 paths
                let x = data(m * k, 9);
                let all = linear_rowwise(&x, m, &w).expect("ok").expect("float");
                for r in 0..m {
                    let alone = linear_rowwise(&x[r * k..(r + 1) * k], 1, &w)
                        .expect("ok")
                        .expect("float");
                    assert_eq!(
                        alone.iter().map(|v| v.to_bits()).collect::<Vec<_>>(),
                        all[r * n..(r + 1) * n]
                            .iter()
                            .map(|v| v.to_bits())
                            .collect::<Vec<_>>(),
                        "row {r} of {m}, {n}x{k} {format:?}: bit for bit"
                    );
                }
                let mut xr = x.clone();
                round_slice_to(format, &mut xr);
                let mut wd = vec![0.0f32; n * k];
                w.decode_rows(0..n, true, &mut wd);
                let reference = reference(&xr, m, &wd, n, k);
                assert!(max_err(&all, &reference) < 1e-4, "{format:?}");
            }
        }
        let int8 = LinearWeight::from_f32(4, 4, &[0.5; 16], WeightFormat::Int8).expect("int8");
        assert!(linear_rowwise(&[1.0; 4], 1, &int8).expect("ok").is_none());
    }

    #[test]
    fn grouped_equals_per_expert_linear() {
        let k = 40;
        let ws: Vec<LinearWeight> = (0..3)
            .map(|e| {
                LinearWeight::from_f32(24, k, &data(24 * k, 10 + e), WeightFormat::Bf16).unwrap()
            })
            .collect();
        let refs: Vec<&LinearWeight> = ws.iter().collect();
        let offsets = [0, 2, 2, 13];
        let x = data(13 * k, 99);
        let y = grouped_linear(&x, &offsets, &refs).unwrap();
        for e in 0..3 {
            let (r0, r1) = (offsets[e], offsets[e + 1]);
            if r1 > r0 {
                let ye = linear(&x[r0 * k..r1 * k], r1 - r0, &ws[e]).unwrap();
                assert_eq!(&y[r0 * 24..r1 * 24], &ye[..]);
            }
        }
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(24))]
        #[test]
        fn random_shapes_match_reference(m in 1usize..24, n in 1usize..150, k in 1usize..300, seed in 0u64..1000) {
            check_float(m, n, k, WeightFormat::F16, seed);
            check_float(m, n, k, WeightFormat::Bf16, seed);
        }

        #[test]
        fn random_shapes_quantised(m in 1usize..20, n in 1usize..140, k in 1usize..300, seed in 0u64..1000) {
            check_int8(m, n, k, seed);
            check_fp8(m, n, k, seed);
        }
    }
}
