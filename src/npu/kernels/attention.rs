//! Attention: prefill (flash-style online softmax, causal, variable lengths packed in one
//! batch) and decode over a paged KV cache addressed by per-sequence block tables.
//!
//! Owns the attention numerics: scores in f32 with a caller-given scale, online softmax across
//! key chunks (256-512 keys in prefill, one cache block in decode), GQA/MQA
//! (`num_q_heads = G x num_kv_heads`: the G query heads of a KV head are stacked as rows of one
//! GEMM), a K head dim different from the V head dim, and V as a prefix of K (MLA absorbed
//! form). `Q·Kᵀ` and `P·V` of each chunk run on the `gemm` micro-kernel. It must not know rope,
//! costs, or how blocks are allocated.

use rayon::prelude::*;

use super::kv_cache::PagedKvCache;
use super::matmul::{sgemm_nn, sgemm_nt};
use super::simd;
use crate::npu::error::{Result, arg_err, check_len, shape_err};

/// Keys per online-softmax block on the device (one UB tile of scores), for the cost model.
pub const KEY_BLOCK: usize = 64;

/// Head counts and dims of one attention launch.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct AttnShape {
    /// Query heads.
    pub num_q_heads: usize,
    /// KV heads; must divide `num_q_heads`.
    pub num_kv_heads: usize,
    /// Q and K head dim.
    pub qk_dim: usize,
    /// V (and output) head dim.
    pub v_dim: usize,
}

impl AttnShape {
    fn validate(&self, op: &'static str) -> Result<usize> {
        let s = self;
        if s.num_q_heads == 0 || s.num_kv_heads == 0 || s.qk_dim == 0 || s.v_dim == 0 {
            return Err(arg_err(
                op,
                "shape",
                format!("all dims must be non-zero, got {s:?}"),
            ));
        }
        if !s.num_q_heads.is_multiple_of(s.num_kv_heads) {
            return Err(arg_err(
                op,
                "num_q_heads",
                format!(
                    "{} is not a multiple of num_kv_heads {}",
                    s.num_q_heads, s.num_kv_heads
                ),
            ));
        }
        Ok(s.num_q_heads / s.num_kv_heads)
    }
}

/// Where prefill V comes from.
#[derive(Debug, Clone, Copy)]
pub enum Values<'a> {
    /// `[tokens, num_kv_heads, v_dim]`.
    Separate(&'a [f32]),
    /// The first `v_dim` elements of each K row (MLA absorbed form).
    PrefixOfK,
}

/// One run of consecutive keys: `n` rows of K (row stride `ldk`) and of V (row stride `ldv`),
/// whose first key has logical index `j0` in its sequence.
struct KeyChunk<'a> {
    j0: usize,
    n: usize,
    k: &'a [f32],
    ldk: usize,
    v: &'a [f32],
    ldv: usize,
}

/// Flash-style attention of `rows` query rows (`qbuf[rows, dk]`) over key chunks, online
/// softmax across chunks; scores and `P·V` through the GEMM micro-kernel. With
/// `causal = Some((q0, g))`, row `r` is query position `q0 + r / g` and sees keys `j <= q0 + r / g`.
/// Writes `out[rows, dv]`.
#[allow(clippy::too_many_arguments)]
fn flash_rows<'a>(
    qbuf: &[f32],
    rows: usize,
    dk: usize,
    dv: usize,
    chunks: impl Iterator<Item = KeyChunk<'a>>,
    scale: f32,
    causal: Option<(usize, usize)>,
    threads: usize,
    out: &mut [f32],
) -> Result<()> {
    let mut m = vec![f32::NEG_INFINITY; rows];
    let mut l = vec![0.0f32; rows];
    out.iter_mut().for_each(|o| *o = 0.0);
    let mut s = Vec::new();
    for c in chunks {
        if c.n == 0 {
            continue;
        }
        s.resize(rows * c.n, 0.0);
        sgemm_nt(
            rows, c.n, dk, qbuf, dk, c.k, c.ldk, &mut s, c.n, false, threads,
        )?;
        for r in 0..rows {
            let srow = &mut s[r * c.n..(r + 1) * c.n];
            let visible = match causal {
                Some((q0, g)) => (q0 + r / g + 1).saturating_sub(c.j0).min(c.n),
                None => c.n,
            };
            let mut bm = f32::NEG_INFINITY;
            for v in srow[..visible].iter_mut() {
                *v *= scale;
                bm = bm.max(*v);
            }
            let m_new = m[r].max(bm);
            if m_new == f32::NEG_INFINITY {
                // Nothing visible yet for this row.
                srow.iter_mut().for_each(|v| *v = 0.0);
                continue;
            }
            let corr = (m[r] - m_new).exp();
            let sum = simd::exp_shift_sum(&mut srow[..visible], m_new);
            srow[visible..].iter_mut().for_each(|v| *v = 0.0);
            l[r] = l[r] * corr + sum;
            m[r] = m_new;
            if corr != 1.0 {
                out[r * dv..(r + 1) * dv]
                    .iter_mut()
                    .for_each(|o| *o *= corr);
            }
        }
        sgemm_nn(rows, dv, c.n, &s, c.n, c.v, c.ldv, out, dv, true, threads)?;
    }
    for (r, orow) in out.chunks_mut(dv).enumerate() {
        let inv = if l[r] > 0.0 { 1.0 / l[r] } else { 0.0 };
        orow.iter_mut().for_each(|o| *o *= inv);
    }
    Ok(())
}

/// Keys per chunk in prefill.
const PREFILL_KEY_CHUNK: usize = 512;
/// Query rows (positions x heads of a group) per prefill task.
const PREFILL_ROWS: usize = 128;

/// Prefill attention. `q[tokens, Hq, qk_dim]`, `k[tokens, Hkv, qk_dim]`, values as given;
/// sequences are packed back to back with lengths `seq_lens`. Returns `[tokens, Hq, v_dim]`.
/// With `causal`, query `i` of a sequence sees keys `0..=i` of the same sequence.
pub fn prefill_attention(
    q: &[f32],
    k: &[f32],
    v: Values<'_>,
    shape: AttnShape,
    seq_lens: &[usize],
    scale: f32,
    causal: bool,
) -> Result<Vec<f32>> {
    prefill_attention_with_prefix(q, k, v, shape, seq_lens, seq_lens, scale, causal)
}

/// Prefill over a cached prefix (chunked prefill): sequence `s` has `q_lens[s]` new queries,
/// packed in `q[sum q_lens, Hq, qk_dim]`, and `kv_lens[s] >= q_lens[s]` keys and values
/// (prefix + new), packed in `k[sum kv_lens, Hkv, qk_dim]`. Query `i` is at position
/// `kv_lens[s] - q_lens[s] + i`; with `causal` it sees keys up to that position.
/// Returns `[sum q_lens, Hq, v_dim]`.
#[allow(clippy::too_many_arguments)]
pub fn prefill_attention_with_prefix(
    q: &[f32],
    k: &[f32],
    v: Values<'_>,
    shape: AttnShape,
    q_lens: &[usize],
    kv_lens: &[usize],
    scale: f32,
    causal: bool,
) -> Result<Vec<f32>> {
    const OP: &str = "prefill_attention";
    let g = shape.validate(OP)?;
    let AttnShape {
        num_q_heads: hq,
        num_kv_heads: hkv,
        qk_dim: dk,
        v_dim: dv,
    } = shape;
    if kv_lens.len() != q_lens.len() {
        return Err(shape_err(
            OP,
            format!(
                "kv_lens has {} entries, q_lens has {}",
                kv_lens.len(),
                q_lens.len()
            ),
        ));
    }
    if let Some(s) = (0..q_lens.len()).find(|&s| kv_lens[s] < q_lens[s]) {
        return Err(shape_err(
            OP,
            format!(
                "kv_lens[{s}] = {} < q_lens[{s}] = {}",
                kv_lens[s], q_lens[s]
            ),
        ));
    }
    let q_tokens: usize = q_lens.iter().sum();
    let tokens: usize = kv_lens.iter().sum();
    check_len(
        OP,
        "q",
        q.len(),
        q_tokens * hq * dk,
        &format!("tokens(sum q_lens={q_tokens}) x num_q_heads({hq}) x qk_dim({dk})"),
    )?;
    check_len(
        OP,
        "k",
        k.len(),
        tokens * hkv * dk,
        &format!("tokens(sum kv_lens={tokens}) x num_kv_heads({hkv}) x qk_dim({dk})"),
    )?;
    let (vsrc, ldv) = match v {
        Values::Separate(v) => {
            check_len(
                OP,
                "v",
                v.len(),
                tokens * hkv * dv,
                &format!("tokens({tokens}) x num_kv_heads({hkv}) x v_dim({dv})"),
            )?;
            (v, hkv * dv)
        }
        Values::PrefixOfK if dv > dk => {
            return Err(shape_err(
                OP,
                format!("v_dim({dv}) > qk_dim({dk}) with V a prefix of K"),
            ));
        }
        Values::PrefixOfK => (k, hkv * dk),
    };
    let v_head_dim = if matches!(v, Values::Separate(_)) {
        dv
    } else {
        dk
    };
    if !scale.is_finite() {
        return Err(arg_err(OP, "scale", format!("must be finite, got {scale}")));
    }
    let qb = (PREFILL_ROWS / g).max(1);
    // (first query token, first kv token, kv_len, position offset of query 0, kv head, p0, p1)
    let mut tasks = Vec::new();
    let (mut tq0, mut tk0) = (0, 0);
    for (&qlen, &kvlen) in q_lens.iter().zip(kv_lens) {
        for kvh in 0..hkv {
            let mut p0 = 0;
            while p0 < qlen {
                tasks.push((tq0, tk0, kvlen, kvlen - qlen, kvh, p0, (p0 + qb).min(qlen)));
                p0 += qb;
            }
        }
        tq0 += qlen;
        tk0 += kvlen;
    }
    let threads = rayon::current_num_threads();
    let inner = if tasks.len() >= threads { 1 } else { threads };
    let results: Vec<Result<Vec<f32>>> = tasks
        .par_iter()
        .map(|&(tq0, t0, len, off, kvh, p0, p1)| {
            let rows = (p1 - p0) * g;
            let mut qbuf = Vec::with_capacity(rows * dk);
            for p in p0..p1 {
                let o = ((tq0 + p) * hq + kvh * g) * dk;
                qbuf.extend_from_slice(&q[o..o + g * dk]);
            }
            let kend = if causal { off + p1 } else { len };
            let kbase = (t0 * hkv + kvh) * dk;
            let vbase = (t0 * hkv + kvh) * v_head_dim;
            let chunks = (0..kend).step_by(PREFILL_KEY_CHUNK).map(|j0| KeyChunk {
                j0,
                n: PREFILL_KEY_CHUNK.min(kend - j0),
                k: &k[kbase + j0 * hkv * dk..],
                ldk: hkv * dk,
                v: &vsrc[vbase + j0 * ldv..],
                ldv,
            });
            let mut out = vec![0.0f32; rows * dv];
            flash_rows(
                &qbuf,
                rows,
                dk,
                dv,
                chunks,
                scale,
                causal.then_some((off + p0, g)),
                inner,
                &mut out,
            )?;
            Ok(out)
        })
        .collect();
    let mut out = vec![0.0f32; q_tokens * hq * dv];
    for (&(tq0, _, _, _, kvh, p0, _), r) in tasks.iter().zip(results) {
        let r = r?;
        for (i, rows) in r.chunks(g * dv).enumerate() {
            let o = ((tq0 + p0 + i) * hq + kvh * g) * dv;
            out[o..o + g * dv].copy_from_slice(rows);
        }
    }
    Ok(out)
}

/// Decode attention: one new query per sequence, `q[batch, Hq, qk_dim]`, over the first
/// `context_lens[b]` cached tokens of sequence `b`, found through `block_tables[b]`.
/// Returns `[batch, Hq, v_dim]`.
pub fn decode_attention(
    q: &[f32],
    cache: &PagedKvCache,
    block_tables: &[&[u32]],
    context_lens: &[usize],
    num_q_heads: usize,
    scale: f32,
) -> Result<Vec<f32>> {
    const OP: &str = "decode_attention";
    let shape = AttnShape {
        num_q_heads,
        num_kv_heads: cache.num_kv_heads(),
        qk_dim: cache.k_dim(),
        v_dim: cache.v_dim(),
    };
    let g = shape.validate(OP)?;
    let b = context_lens.len();
    if block_tables.len() != b {
        return Err(shape_err(
            OP,
            format!(
                "block_tables has {} entries, context_lens has {b}",
                block_tables.len()
            ),
        ));
    }
    let (dk, dv, hkv) = (shape.qk_dim, shape.v_dim, shape.num_kv_heads);
    check_len(
        OP,
        "q",
        q.len(),
        b * num_q_heads * dk,
        &format!("batch({b}) x num_q_heads({num_q_heads}) x qk_dim({dk})"),
    )?;
    if !scale.is_finite() {
        return Err(arg_err(OP, "scale", format!("must be finite, got {scale}")));
    }
    // Validate every table entry the context needs before any work.
    let bs = cache.block_size();
    for (t, &n) in block_tables.iter().zip(context_lens) {
        if n > 0 {
            cache.slot(t, n - 1)?;
            for blk in 0..n.div_ceil(bs) {
                cache.slot(t, blk * bs)?;
            }
        }
    }
    let tasks: Vec<(usize, usize)> = (0..b).flat_map(|s| (0..hkv).map(move |h| (s, h))).collect();
    let threads = rayon::current_num_threads();
    let inner = if tasks.len() >= threads { 1 } else { threads };
    let results: Vec<Result<Vec<f32>>> = tasks
        .par_iter()
        .map(|&(s, kvh)| {
            let n = context_lens[s];
            let table = block_tables[s];
            let qo = (s * num_q_heads + kvh * g) * dk;
            let chunks = (0..n.div_ceil(bs)).map(|blk| {
                let (k, ldk) = cache.k_block(table[blk] as usize, kvh);
                let (v, ldv) = cache.v_block(table[blk] as usize, kvh);
                KeyChunk {
                    j0: blk * bs,
                    n: bs.min(n - blk * bs),
                    k,
                    ldk,
                    v,
                    ldv,
                }
            });
            let mut out = vec![0.0f32; g * dv];
            flash_rows(
                &q[qo..qo + g * dk],
                g,
                dk,
                dv,
                chunks,
                scale,
                None,
                inner,
                &mut out,
            )?;
            Ok(out)
        })
        .collect();
    let mut out = vec![0.0f32; b * num_q_heads * dv];
    for (&(s, kvh), r) in tasks.iter().zip(results) {
        let o = (s * num_q_heads + kvh * g) * dv;
        out[o..o + g * dv].copy_from_slice(&r?);
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::super::kv_cache::{KvDtype, ValueLayout};
    use super::*;
    use proptest::prelude::*;

    fn data(n: usize, seed: u64) -> Vec<f32> {
        let mut s = seed.wrapping_add(0x9E3779B97F4A7C15);
        (0..n)
            .map(|_| {
                s ^= s << 13;
                s ^= s >> 7;
                s ^= s << 17;
                ((s >> 40) as f32 / (1u64 << 24) as f32) * 2.0 - 1.0
            })
            .collect()
    }

    /// Plain f64 softmax attention for one sequence.
    #[allow(clippy::too_many_arguments)]
    fn reference(
        q: &[f32],
        k: &[f32],
        v: Option<&[f32]>,
        shape: AttnShape,
        t0: usize,
        len: usize,
        scale: f64,
        causal: bool,
    ) -> Vec<f64> {
        let AttnShape {
            num_q_heads: hq,
            num_kv_heads: hkv,
            qk_dim: dk,
            v_dim: dv,
        } = shape;
        let g = hq / hkv;
        let mut out = vec![0.0; len * hq * dv];
        for i in 0..len {
            for h in 0..hq {
                let kvh = h / g;
                let n = if causal { i + 1 } else { len };
                let s: Vec<f64> = (0..n)
                    .map(|j| {
                        (0..dk)
                            .map(|d| {
                                f64::from(q[((t0 + i) * hq + h) * dk + d])
                                    * f64::from(k[((t0 + j) * hkv + kvh) * dk + d])
                            })
                            .sum::<f64>()
                            * scale
                    })
                    .collect();
                let m = s.iter().cloned().fold(f64::NEG_INFINITY, f64::max);
                let z: f64 = s.iter().map(|x| (x - m).exp()).sum();
                for d in 0..dv {
                    out[(i * hq + h) * dv + d] = (0..n)
                        .map(|j| {
                            let vv = match v {
                                Some(v) => v[((t0 + j) * hkv + kvh) * dv + d],
                                None => k[((t0 + j) * hkv + kvh) * dk + d],
                            };
                            (s[j] - m).exp() / z * f64::from(vv)
                        })
                        .sum();
                }
            }
        }
        out
    }

    fn check_prefill(shape: AttnShape, seq_lens: &[usize], causal: bool, prefix: bool, seed: u64) {
        let t: usize = seq_lens.iter().sum();
        let q = data(t * shape.num_q_heads * shape.qk_dim, seed);
        let k = data(t * shape.num_kv_heads * shape.qk_dim, seed + 1);
        let v = data(t * shape.num_kv_heads * shape.v_dim, seed + 2);
        let scale = 1.0 / (shape.qk_dim as f32).sqrt();
        let vals = if prefix {
            Values::PrefixOfK
        } else {
            Values::Separate(&v)
        };
        let y = prefill_attention(&q, &k, vals, shape, seq_lens, scale, causal).unwrap();
        let mut t0 = 0;
        for &len in seq_lens {
            let r = reference(
                &q,
                &k,
                if prefix { None } else { Some(&v) },
                shape,
                t0,
                len,
                f64::from(scale),
                causal,
            );
            let w = shape.num_q_heads * shape.v_dim;
            for (a, b) in y[t0 * w..(t0 + len) * w].iter().zip(&r) {
                assert!((f64::from(*a) - b).abs() < 2e-5, "{a} vs {b}");
            }
            t0 += len;
        }
    }

    #[test]
    fn prefill_matches_reference_gqa_mla_and_varlen() {
        let gqa = AttnShape {
            num_q_heads: 4,
            num_kv_heads: 2,
            qk_dim: 24,
            v_dim: 20,
        };
        check_prefill(gqa, &[1, 70, 5, 130], true, false, 1);
        check_prefill(gqa, &[3, 66], false, false, 2);
        let mla = AttnShape {
            num_q_heads: 3,
            num_kv_heads: 1,
            qk_dim: 40,
            v_dim: 32,
        };
        check_prefill(mla, &[9, 65], true, true, 3);
    }

    #[test]
    fn chunked_prefill_over_prefix_equals_tail_of_full_prefill() {
        let shape = AttnShape {
            num_q_heads: 6,
            num_kv_heads: 2,
            qk_dim: 20,
            v_dim: 12,
        };
        let kv_lens = [70usize, 9];
        let q_lens = [33usize, 9];
        let t: usize = kv_lens.iter().sum();
        let q = data(t * 6 * 20, 21);
        let k = data(t * 2 * 20, 22);
        let v = data(t * 2 * 12, 23);
        for causal in [true, false] {
            let full =
                prefill_attention(&q, &k, Values::Separate(&v), shape, &kv_lens, 0.3, causal)
                    .unwrap();
            // Queries: the last q_len tokens of each sequence.
            let (qw, ow) = (6 * 20, 6 * 12);
            let mut qs = Vec::new();
            let mut expect = Vec::new();
            let mut t0 = 0;
            for (&ql, &kl) in q_lens.iter().zip(&kv_lens) {
                qs.extend_from_slice(&q[(t0 + kl - ql) * qw..(t0 + kl) * qw]);
                expect.extend_from_slice(&full[(t0 + kl - ql) * ow..(t0 + kl) * ow]);
                t0 += kl;
            }
            let y = prefill_attention_with_prefix(
                &qs,
                &k,
                Values::Separate(&v),
                shape,
                &q_lens,
                &kv_lens,
                0.3,
                causal,
            )
            .unwrap();
            for (a, b) in y.iter().zip(&expect) {
                assert!((a - b).abs() < 1e-5, "{a} vs {b}");
            }
        }
        assert!(
            prefill_attention_with_prefix(
                &q,
                &k,
                Values::Separate(&v),
                shape,
                &[71, 9],
                &kv_lens,
                0.3,
                true
            )
            .is_err()
        );
    }

    #[test]
    fn causal_mask_hides_the_future() {
        let shape = AttnShape {
            num_q_heads: 2,
            num_kv_heads: 1,
            qk_dim: 8,
            v_dim: 8,
        };
        let t = 10;
        let q = data(t * 2 * 8, 4);
        let k = data(t * 8, 5);
        let v = data(t * 8, 6);
        let y = prefill_attention(&q, &k, Values::Separate(&v), shape, &[t], 0.3, true).unwrap();
        // Changing keys/values of the last token must not change earlier outputs.
        let (mut k2, mut v2) = (k.clone(), v.clone());
        k2[(t - 1) * 8..].iter_mut().for_each(|x| *x = 100.0);
        v2[(t - 1) * 8..].iter_mut().for_each(|x| *x = -100.0);
        let y2 = prefill_attention(&q, &k2, Values::Separate(&v2), shape, &[t], 0.3, true).unwrap();
        assert_eq!(&y[..(t - 1) * 16], &y2[..(t - 1) * 16]);
        assert_ne!(&y[(t - 1) * 16..], &y2[(t - 1) * 16..]);
        // The first query sees only itself: output = its own value row.
        for h in 0..2 {
            for d in 0..8 {
                assert!((y[h * 8 + d] - v[d]).abs() < 1e-6);
            }
        }
    }

    /// Paged decode over scattered blocks equals contiguous (non-causal prefill of the last
    /// query) attention over the same tokens.
    fn check_paged(shape: AttnShape, lens: &[usize], block_size: usize, prefix: bool, seed: u64) {
        let layout = if prefix {
            ValueLayout::PrefixOfK(shape.v_dim)
        } else {
            ValueLayout::Separate(shape.v_dim)
        };
        let total_blocks: usize = lens.iter().map(|l| l.div_ceil(block_size)).sum::<usize>() + 3;
        let mut cache = PagedKvCache::new(
            total_blocks,
            block_size,
            shape.num_kv_heads,
            shape.qk_dim,
            layout,
            KvDtype::F32,
        )
        .unwrap();
        // Hand out blocks in a scrambled order.
        let mut free: Vec<u32> = (0..total_blocks as u32).rev().collect();
        free.swap(0, total_blocks / 2);
        let mut tables = Vec::new();
        let mut qs = Vec::new();
        let mut refs = Vec::new();
        for (s, &len) in lens.iter().enumerate() {
            let table: Vec<u32> = (0..len.div_ceil(block_size))
                .map(|_| free.pop().unwrap_or(0))
                .collect();
            let k = data(
                len * shape.num_kv_heads * shape.qk_dim,
                seed + s as u64 * 10,
            );
            let v = data(
                len * shape.num_kv_heads * shape.v_dim,
                seed + s as u64 * 10 + 1,
            );
            let kw = shape.num_kv_heads * shape.qk_dim;
            let vw = shape.num_kv_heads * shape.v_dim;
            for p in 0..len {
                let vrow = if prefix {
                    None
                } else {
                    Some(&v[p * vw..(p + 1) * vw])
                };
                cache
                    .write(&table, p, &k[p * kw..(p + 1) * kw], vrow)
                    .unwrap();
            }
            // Query: the last position; contiguous reference = non-causal over the same keys with
            // a query block whose last row is this query.
            let qw = shape.num_q_heads * shape.qk_dim;
            let mut qfull = vec![0.0f32; len * qw];
            let qlast = data(qw, seed + s as u64 * 10 + 2);
            qfull[(len - 1) * qw..].copy_from_slice(&qlast);
            let vals = if prefix {
                Values::PrefixOfK
            } else {
                Values::Separate(&v)
            };
            let contiguous = prefill_attention(&qfull, &k, vals, shape, &[len], 0.2, true).unwrap();
            let ow = shape.num_q_heads * shape.v_dim;
            refs.push(contiguous[(len - 1) * ow..].to_vec());
            qs.extend_from_slice(&qlast);
            tables.push(table);
        }
        let trefs: Vec<&[u32]> = tables.iter().map(|t| t.as_slice()).collect();
        let y = decode_attention(&qs, &cache, &trefs, lens, shape.num_q_heads, 0.2).unwrap();
        let ow = shape.num_q_heads * shape.v_dim;
        for (s, r) in refs.iter().enumerate() {
            for (a, b) in y[s * ow..(s + 1) * ow].iter().zip(r) {
                assert!((a - b).abs() < 1e-5, "seq {s}: {a} vs {b}");
            }
        }
    }

    #[test]
    fn paged_decode_equals_contiguous() {
        check_paged(
            AttnShape {
                num_q_heads: 8,
                num_kv_heads: 2,
                qk_dim: 16,
                v_dim: 12,
            },
            &[1, 17, 100],
            16,
            false,
            7,
        );
        check_paged(
            AttnShape {
                num_q_heads: 4,
                num_kv_heads: 1,
                qk_dim: 36,
                v_dim: 32,
            },
            &[5, 33],
            8,
            true,
            8,
        );
    }

    #[test]
    fn bad_block_tables_are_errors() {
        let cache = PagedKvCache::new(2, 4, 1, 8, ValueLayout::Separate(8), KvDtype::F16).unwrap();
        let q = vec![0.0; 8];
        let e = decode_attention(&q, &cache, &[&[0]], &[5], 1, 1.0)
            .unwrap_err()
            .to_string();
        assert!(e.contains("block_table[1]"), "{e}");
        let e = decode_attention(&q, &cache, &[&[7]], &[1], 1, 1.0)
            .unwrap_err()
            .to_string();
        assert!(e.contains("num_blocks"), "{e}");
        let e = decode_attention(&q, &cache, &[&[0]], &[1], 3, 1.0)
            .unwrap_err()
            .to_string();
        assert!(e.contains("num_q_heads"), "{e}");
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(16))]
        #[test]
        fn random_prefill_shapes(kvh in 1usize..3, g in 1usize..4, dk in 1usize..40, dv in 1usize..40,
                                 lens in proptest::collection::vec(1usize..40, 1..4), causal: bool, seed in 0u64..100) {
            let shape = AttnShape { num_q_heads: kvh * g, num_kv_heads: kvh, qk_dim: dk, v_dim: dv };
            check_prefill(shape, &lens, causal, false, seed);
        }

        #[test]
        fn random_paged_shapes(g in 1usize..4, dk in 1usize..40, bs in 1usize..20,
                               lens in proptest::collection::vec(1usize..50, 1..4), seed in 0u64..100) {
            let shape = AttnShape { num_q_heads: 2 * g, num_kv_heads: 2, qk_dim: dk, v_dim: dk.div_ceil(2) };
            check_paged(shape, &lens, bs, false, seed);
        }
    }
}
