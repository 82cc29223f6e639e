//! SIMD inner loops with runtime CPU feature detection: f32 dot products, fp16-weight dot
//! products, int8 dot products and axpy.
//!
//! Owns the only `unsafe` of the module apart from the GEMM micro-kernel call: calls into
//! `#[target_feature]` functions after checking the feature at run time, and the x86 intrinsics
//! of the fp16 path. It must not know shapes beyond slices, nor costs.

#![allow(unsafe_code)] // SIMD kernels: every block carries its SAFETY argument

use half::f16;

#[inline(always)]
fn dot_impl<const FMA: bool>(a: &[f32], b: &[f32]) -> f32 {
    let n = a.len().min(b.len());
    let (a, b) = (&a[..n], &b[..n]);
    let mut acc = [0.0f32; 16];
    let ca = a.chunks_exact(16);
    let cb = b.chunks_exact(16);
    let (ra, rb) = (ca.remainder(), cb.remainder());
    for (x, y) in ca.zip(cb) {
        for i in 0..16 {
            acc[i] = if FMA {
                x[i].mul_add(y[i], acc[i])
            } else {
                acc[i] + x[i] * y[i]
            };
        }
    }
    for (i, (x, y)) in ra.iter().zip(rb).enumerate() {
        acc[i] = if FMA {
            x.mul_add(*y, acc[i])
        } else {
            acc[i] + x * y
        };
    }
    let mut s8 = [0.0f32; 8];
    for i in 0..8 {
        s8[i] = acc[i] + acc[i + 8];
    }
    (s8[0] + s8[4]) + (s8[1] + s8[5]) + ((s8[2] + s8[6]) + (s8[3] + s8[7]))
}

#[inline(always)]
fn axpy_impl<const FMA: bool>(y: &mut [f32], a: f32, x: &[f32]) {
    for (yi, xi) in y.iter_mut().zip(x) {
        *yi = if FMA {
            xi.mul_add(a, *yi)
        } else {
            *yi + xi * a
        };
    }
}

#[inline(always)]
fn dot_i8_impl(a: &[i8], b: &[i8]) -> i32 {
    let n = a.len().min(b.len());
    let (a, b) = (&a[..n], &b[..n]);
    let mut acc = [0i32; 32];
    let ca = a.chunks_exact(32);
    let cb = b.chunks_exact(32);
    let (ra, rb) = (ca.remainder(), cb.remainder());
    for (x, y) in ca.zip(cb) {
        for i in 0..32 {
            acc[i] += i32::from(x[i]) * i32::from(y[i]);
        }
    }
    let tail: i32 = ra
        .iter()
        .zip(rb)
        .map(|(x, y)| i32::from(*x) * i32::from(*y))
        .sum();
    acc.iter().sum::<i32>() + tail
}

/// `v[i] = exp(v[i] - shift)`, returns the sum; Cephes-style polynomial, about 2 ulp,
/// inputs below -87.3 (after the shift) give 0. Written so the compiler vectorises it.
#[inline(always)]
fn exp_shift_sum_impl<const FMA: bool>(v: &mut [f32], shift: f32) -> f32 {
    const LOG2E: f32 = std::f32::consts::LOG2_E;
    const LN2_HI: f32 = 0.693_359_4;
    const LN2_LO: f32 = -2.121_944_4e-4;
    const ROUND: f32 = 12_582_912.0; // 1.5 x 2^23: adding and subtracting rounds to an integer
    let fma = |a: f32, b: f32, c: f32| if FMA { a.mul_add(b, c) } else { a * b + c };
    let mut acc = [0.0f32; 16];
    let mut chunks = v.chunks_exact_mut(16);
    let one = |x: f32| {
        let x = x - shift;
        let xc = x.clamp(-87.3, 88.7);
        let n = (xc * LOG2E + ROUND) - ROUND;
        let r = fma(n, -LN2_LO, fma(n, -LN2_HI, xc));
        let mut p = 1.987_569_1e-4f32;
        p = fma(p, r, 1.398_199_9e-3);
        p = fma(p, r, 8.333_452e-3);
        p = fma(p, r, 4.166_579_6e-2);
        p = fma(p, r, 1.666_666_5e-1);
        p = fma(p, r, 0.5);
        let y = fma(p, r * r, r) + 1.0;
        let scale = f32::from_bits(((n as i32 + 127) as u32) << 23);
        if x < -87.3 { 0.0 } else { y * scale }
    };
    for c in &mut chunks {
        for i in 0..16 {
            c[i] = one(c[i]);
            acc[i] += c[i];
        }
    }
    let mut total: f32 = acc.iter().sum();
    for x in chunks.into_remainder() {
        *x = one(*x);
        total += *x;
    }
    total
}

#[cfg(target_arch = "x86_64")]
mod x86 {
    use half::f16;
    use std::arch::x86_64::*;

    #[target_feature(enable = "avx2,fma")]
    pub(super) fn dot_avx2(a: &[f32], b: &[f32]) -> f32 {
        super::dot_impl::<true>(a, b)
    }

    #[target_feature(enable = "avx512f")]
    pub(super) fn exp_shift_sum_avx512(v: &mut [f32], shift: f32) -> f32 {
        super::exp_shift_sum_impl::<true>(v, shift)
    }

    #[target_feature(enable = "avx2,fma")]
    pub(super) fn exp_shift_sum_avx2(v: &mut [f32], shift: f32) -> f32 {
        super::exp_shift_sum_impl::<true>(v, shift)
    }

    #[target_feature(enable = "avx2,fma")]
    pub(super) fn axpy_avx2(y: &mut [f32], a: f32, x: &[f32]) {
        super::axpy_impl::<true>(y, a, x)
    }

    #[target_feature(enable = "avx2")]
    pub(super) fn dot_i8_avx2(a: &[i8], b: &[i8]) -> i32 {
        super::dot_i8_impl(a, b)
    }

    /// f32 dot, AVX-512: 64 elements per iteration, 4 accumulators.
    #[target_feature(enable = "avx512f")]
    pub(super) fn dot_avx512(x: &[f32], y: &[f32]) -> f32 {
        let n = x.len().min(y.len());
        let (xp, yp) = (x.as_ptr(), y.as_ptr());
        let mut acc = [_mm512_setzero_ps(); 4];
        let mut i = 0;
        while i + 64 <= n {
            for (j, a) in acc.iter_mut().enumerate() {
                // SAFETY: i + 16 * j + 16 <= n <= len of both slices; unaligned loads.
                unsafe {
                    *a = _mm512_fmadd_ps(
                        _mm512_loadu_ps(xp.add(i + 16 * j)),
                        _mm512_loadu_ps(yp.add(i + 16 * j)),
                        *a,
                    );
                }
            }
            i += 64;
        }
        while i + 16 <= n {
            // SAFETY: i + 16 <= n, as above.
            unsafe {
                acc[0] = _mm512_fmadd_ps(
                    _mm512_loadu_ps(xp.add(i)),
                    _mm512_loadu_ps(yp.add(i)),
                    acc[0],
                )
            };
            i += 16;
        }
        if i < n {
            let mask: __mmask16 = (1u32 << (n - i)).wrapping_sub(1) as __mmask16;
            // SAFETY: masked loads touch only lanes i..n, which are in bounds.
            unsafe {
                acc[1] = _mm512_fmadd_ps(
                    _mm512_maskz_loadu_ps(mask, xp.add(i)),
                    _mm512_maskz_loadu_ps(mask, yp.add(i)),
                    acc[1],
                );
            }
        }
        let s = _mm512_add_ps(_mm512_add_ps(acc[0], acc[1]), _mm512_add_ps(acc[2], acc[3]));
        _mm512_reduce_add_ps(s)
    }

    /// `y += a * x`, AVX-512 with a masked tail.
    #[target_feature(enable = "avx512f")]
    pub(super) fn axpy_avx512(y: &mut [f32], a: f32, x: &[f32]) {
        let n = x.len().min(y.len());
        let (xp, yp) = (x.as_ptr(), y.as_mut_ptr());
        let av = _mm512_set1_ps(a);
        let mut i = 0;
        while i + 16 <= n {
            // SAFETY: i + 16 <= n <= len of both slices; `y` is borrowed mutably.
            unsafe {
                let r = _mm512_fmadd_ps(_mm512_loadu_ps(xp.add(i)), av, _mm512_loadu_ps(yp.add(i)));
                _mm512_storeu_ps(yp.add(i), r);
            }
            i += 16;
        }
        if i < n {
            let mask: __mmask16 = (1u32 << (n - i)).wrapping_sub(1) as __mmask16;
            // SAFETY: masked loads and stores touch only lanes i..n, which are in bounds.
            unsafe {
                let r = _mm512_fmadd_ps(
                    _mm512_maskz_loadu_ps(mask, xp.add(i)),
                    av,
                    _mm512_maskz_loadu_ps(mask, yp.add(i)),
                );
                _mm512_mask_storeu_ps(yp.add(i), mask, r);
            }
        }
    }

    /// bf16 weights x f32 activations, AVX-512: widen u16 to u32 and shift into the high half.
    #[target_feature(enable = "avx512f")]
    pub(super) fn dot_bf16_avx512(x: &[f32], w: &[half::bf16]) -> f32 {
        let n = x.len().min(w.len());
        let xp = x.as_ptr();
        let wp = w.as_ptr().cast::<u16>();
        let mut acc = [_mm512_setzero_ps(); 4];
        let mut i = 0;
        while i + 64 <= n {
            for (j, a) in acc.iter_mut().enumerate() {
                let o = i + 16 * j;
                // SAFETY: o + 16 <= n <= len of both slices; unaligned loads.
                unsafe {
                    let wi = _mm512_slli_epi32::<16>(_mm512_cvtepu16_epi32(_mm256_loadu_si256(
                        wp.add(o).cast(),
                    )));
                    *a = _mm512_fmadd_ps(_mm512_castsi512_ps(wi), _mm512_loadu_ps(xp.add(o)), *a);
                }
            }
            i += 64;
        }
        let s = _mm512_add_ps(_mm512_add_ps(acc[0], acc[1]), _mm512_add_ps(acc[2], acc[3]));
        let mut total = _mm512_reduce_add_ps(s);
        for j in i..n {
            total += x[j] * w[j].to_f32();
        }
        total
    }

    /// E4M3 codes x f32 activations, AVX-512: an E4M3 code moved into fp16 bit positions
    /// (sign to bit 15, exponent and mantissa shifted left by 7) is the same number divided by
    /// 2^8 (fp16 bias 15 vs 7), subnormals included; NaN codes are rejected at weight load.
    #[target_feature(enable = "avx512f,avx512bw")]
    pub(super) fn dot_e4m3_avx512(x: &[f32], w: &[u8]) -> f32 {
        let n = x.len().min(w.len());
        let xp = x.as_ptr();
        let wp = w.as_ptr();
        let mut acc = [_mm512_setzero_ps(); 2];
        let sign = _mm256_set1_epi16(0x80);
        let mag = _mm256_set1_epi16(0x7f);
        let mut i = 0;
        while i + 32 <= n {
            for (j, a) in acc.iter_mut().enumerate() {
                let o = i + 16 * j;
                // SAFETY: o + 16 <= n <= len of both slices; unaligned loads.
                unsafe {
                    let c = _mm256_cvtepu8_epi16(_mm_loadu_si128(wp.add(o).cast()));
                    let h = _mm256_or_si256(
                        _mm256_slli_epi16::<8>(_mm256_and_si256(c, sign)),
                        _mm256_slli_epi16::<7>(_mm256_and_si256(c, mag)),
                    );
                    *a = _mm512_fmadd_ps(_mm512_cvtph_ps(h), _mm512_loadu_ps(xp.add(o)), *a);
                }
            }
            i += 32;
        }
        let s = _mm512_add_ps(acc[0], acc[1]);
        let mut total = _mm512_reduce_add_ps(s) * 256.0;
        for j in i..n {
            total += x[j] * crate::npu::format::e4m3_to_f32(w[j]);
        }
        total
    }

    /// Block-scaled E4M3 dot: `sum_b scales[b] * sum_{i in block b} x[i] * e4m3(w[i])`, blocks
    /// of `block` elements; each block's fp32 partial is scaled and added lane-wise, with one
    /// horizontal sum at the end.
    #[target_feature(enable = "avx512f,avx512bw")]
    pub(super) fn dot_e4m3_scaled_avx512(x: &[f32], w: &[u8], block: usize, scales: &[f32]) -> f32 {
        let n = x.len().min(w.len());
        let xp = x.as_ptr();
        let wp = w.as_ptr();
        let sign = _mm256_set1_epi16(0x80);
        let mag = _mm256_set1_epi16(0x7f);
        let mut total = _mm512_setzero_ps();
        let mut tail = 0.0f32;
        for (b, &sc) in scales.iter().enumerate() {
            let start = b * block;
            if start >= n {
                break;
            }
            let end = (start + block).min(n);
            let mut acc = _mm512_setzero_ps();
            let mut i = start;
            while i + 16 <= end {
                // SAFETY: i + 16 <= end <= n <= len of both slices; unaligned loads.
                unsafe {
                    let c = _mm256_cvtepu8_epi16(_mm_loadu_si128(wp.add(i).cast()));
                    let h = _mm256_or_si256(
                        _mm256_slli_epi16::<8>(_mm256_and_si256(c, sign)),
                        _mm256_slli_epi16::<7>(_mm256_and_si256(c, mag)),
                    );
                    acc = _mm512_fmadd_ps(_mm512_cvtph_ps(h), _mm512_loadu_ps(xp.add(i)), acc);
                }
                i += 16;
            }
            total = _mm512_fmadd_ps(acc, _mm512_set1_ps(sc * 256.0), total);
            for j in i..end {
                tail += x[j] * crate::npu::format::e4m3_to_f32(w[j]) * sc;
            }
        }
        _mm512_reduce_add_ps(total) + tail
    }

    /// `out[r][c] = dot(xs[r], ws[c])` for an R x C block, AVX-512: R x C accumulators, each
    /// 16-element step loads R + C vectors for R x C FMAs; masked tail.
    #[target_feature(enable = "avx512f")]
    pub(super) fn block_dots_avx512<const R: usize, const C: usize>(
        xs: [&[f32]; R],
        ws: [&[f32]; C],
        k: usize,
    ) -> [[f32; C]; R] {
        let mut acc = [[_mm512_setzero_ps(); C]; R];
        let mut i = 0;
        while i + 16 <= k {
            let mut wv = [_mm512_setzero_ps(); C];
            for (c, v) in wv.iter_mut().enumerate() {
                // SAFETY: the caller guarantees every slice has at least k elements; i + 16 <= k.
                *v = unsafe { _mm512_loadu_ps(ws[c].as_ptr().add(i)) };
            }
            for (r, row) in acc.iter_mut().enumerate() {
                // SAFETY: as above.
                let xv = unsafe { _mm512_loadu_ps(xs[r].as_ptr().add(i)) };
                for (a, v) in row.iter_mut().zip(&wv) {
                    *a = _mm512_fmadd_ps(xv, *v, *a);
                }
            }
            i += 16;
        }
        if i < k {
            let mask: __mmask16 = (1u32 << (k - i)).wrapping_sub(1) as __mmask16;
            let mut wv = [_mm512_setzero_ps(); C];
            for (c, v) in wv.iter_mut().enumerate() {
                // SAFETY: masked load touches only lanes i..k, in bounds.
                *v = unsafe { _mm512_maskz_loadu_ps(mask, ws[c].as_ptr().add(i)) };
            }
            for (r, row) in acc.iter_mut().enumerate() {
                // SAFETY: as above.
                let xv = unsafe { _mm512_maskz_loadu_ps(mask, xs[r].as_ptr().add(i)) };
                for (a, v) in row.iter_mut().zip(&wv) {
                    *a = _mm512_fmadd_ps(xv, *v, *a);
                }
            }
        }
        let mut out = [[0.0f32; C]; R];
        for (orow, arow) in out.iter_mut().zip(&acc) {
            for (o, a) in orow.iter_mut().zip(arow) {
                *o = _mm512_reduce_add_ps(*a);
            }
        }
        out
    }

    /// `R` activation rows against two packed bf16 panels of 16 output features each: for
    /// every `t` in order, `acc[r][p] = fma(x[r][t], w[p][t], acc[r][p])`, one lane per output
    /// feature, so each output is one sequential f32 FMA chain over `k` whatever `R`.
    #[target_feature(enable = "avx512f")]
    pub(super) fn panel_dots_avx512<const R: usize>(
        xs: [&[f32]; R],
        panels: [&[u16]; 2],
        k: usize,
        out: &mut [[f32; 32]; R],
    ) {
        let mut acc = [[_mm512_setzero_ps(); 2]; R];
        for t in 0..k {
            // SAFETY: the caller guarantees each panel holds 16 * k values and each row k.
            let w = unsafe {
                [
                    _mm512_castsi512_ps(_mm512_slli_epi32::<16>(_mm512_cvtepu16_epi32(
                        _mm256_loadu_si256(panels[0].as_ptr().add(t * 16).cast()),
                    ))),
                    _mm512_castsi512_ps(_mm512_slli_epi32::<16>(_mm512_cvtepu16_epi32(
                        _mm256_loadu_si256(panels[1].as_ptr().add(t * 16).cast()),
                    ))),
                ]
            };
            for (r, a) in acc.iter_mut().enumerate() {
                // SAFETY: t < k <= xs[r].len(), checked by the caller.
                let xv = _mm512_set1_ps(unsafe { *xs[r].get_unchecked(t) });
                a[0] = _mm512_fmadd_ps(xv, w[0], a[0]);
                a[1] = _mm512_fmadd_ps(xv, w[1], a[1]);
            }
        }
        for (o, a) in out.iter_mut().zip(&acc) {
            // SAFETY: each output row holds 32 floats.
            unsafe {
                _mm512_storeu_ps(o.as_mut_ptr(), a[0]);
                _mm512_storeu_ps(o.as_mut_ptr().add(16), a[1]);
            }
        }
    }

    /// [`panel_dots_avx512`] on panels already decoded to f32 (the same values, the same
    /// FMA chains): for many rows, the conversion is done once per panel instead of per row
    /// block.
    #[target_feature(enable = "avx512f")]
    pub(super) fn panel_dots_f32_avx512<const R: usize>(
        xs: [&[f32]; R],
        panels: [&[f32]; 2],
        k: usize,
        out: &mut [[f32; 32]; R],
    ) {
        let mut acc = [[_mm512_setzero_ps(); 2]; R];
        for t in 0..k {
            // SAFETY: the caller guarantees each panel holds 16 * k values and each row k.
            let w = unsafe {
                [
                    _mm512_loadu_ps(panels[0].as_ptr().add(t * 16)),
                    _mm512_loadu_ps(panels[1].as_ptr().add(t * 16)),
                ]
            };
            for (r, a) in acc.iter_mut().enumerate() {
                // SAFETY: t < k <= xs[r].len(), checked by the caller.
                let xv = _mm512_set1_ps(unsafe { *xs[r].get_unchecked(t) });
                a[0] = _mm512_fmadd_ps(xv, w[0], a[0]);
                a[1] = _mm512_fmadd_ps(xv, w[1], a[1]);
            }
        }
        for (o, a) in out.iter_mut().zip(&acc) {
            // SAFETY: each output row holds 32 floats.
            unsafe {
                _mm512_storeu_ps(o.as_mut_ptr(), a[0]);
                _mm512_storeu_ps(o.as_mut_ptr().add(16), a[1]);
            }
        }
    }

    /// fp16 weights x f32 activations, AVX-512: 64 elements per iteration, 4 accumulators.
    #[target_feature(enable = "avx512f")]
    pub(super) fn dot_f16_avx512(x: &[f32], w: &[f16]) -> f32 {
        let n = x.len().min(w.len());
        let mut i = 0;
        let mut acc = [_mm512_setzero_ps(); 4];
        let xp = x.as_ptr();
        let wp = w.as_ptr().cast::<u16>();
        while i + 64 <= n {
            for (j, a) in acc.iter_mut().enumerate() {
                let o = i + 16 * j;
                // SAFETY: o + 16 <= n <= len of both slices, so the 16-lane loads are in bounds;
                // unaligned loads are used.
                unsafe {
                    let wv = _mm512_cvtph_ps(_mm256_loadu_si256(wp.add(o).cast()));
                    let xv = _mm512_loadu_ps(xp.add(o));
                    *a = _mm512_fmadd_ps(wv, xv, *a);
                }
            }
            i += 64;
        }
        while i + 16 <= n {
            // SAFETY: i + 16 <= n, as above.
            unsafe {
                let wv = _mm512_cvtph_ps(_mm256_loadu_si256(wp.add(i).cast()));
                let xv = _mm512_loadu_ps(xp.add(i));
                acc[0] = _mm512_fmadd_ps(wv, xv, acc[0]);
            }
            i += 16;
        }
        let s = _mm512_add_ps(_mm512_add_ps(acc[0], acc[1]), _mm512_add_ps(acc[2], acc[3]));
        let mut total = _mm512_reduce_add_ps(s);
        for j in i..n {
            total += x[j] * w[j].to_f32();
        }
        total
    }

    /// fp16 weights x f32 activations, AVX2 + F16C: 32 elements per iteration.
    #[target_feature(enable = "avx2,fma,f16c")]
    pub(super) fn dot_f16_avx2(x: &[f32], w: &[f16]) -> f32 {
        let n = x.len().min(w.len());
        let mut i = 0;
        let mut acc = [_mm256_setzero_ps(); 4];
        let xp = x.as_ptr();
        let wp = w.as_ptr().cast::<u16>();
        while i + 32 <= n {
            for (j, a) in acc.iter_mut().enumerate() {
                let o = i + 8 * j;
                // SAFETY: o + 8 <= n <= len of both slices; unaligned loads.
                unsafe {
                    let wv = _mm256_cvtph_ps(_mm_loadu_si128(wp.add(o).cast()));
                    let xv = _mm256_loadu_ps(xp.add(o));
                    *a = _mm256_fmadd_ps(wv, xv, *a);
                }
            }
            i += 32;
        }
        let s = _mm256_add_ps(_mm256_add_ps(acc[0], acc[1]), _mm256_add_ps(acc[2], acc[3]));
        let mut lanes = [0.0f32; 8];
        // SAFETY: `lanes` holds exactly 8 f32; unaligned store.
        unsafe { _mm256_storeu_ps(lanes.as_mut_ptr(), s) };
        let mut total: f32 = lanes.iter().sum();
        for j in i..n {
            total += x[j] * w[j].to_f32();
        }
        total
    }
}

/// Which SIMD level the kernels use on this CPU, for reports.
pub fn simd_level() -> &'static str {
    #[cfg(target_arch = "x86_64")]
    {
        if std::arch::is_x86_feature_detected!("avx512f") {
            return "avx512f";
        }
        if std::arch::is_x86_feature_detected!("avx2") && std::arch::is_x86_feature_detected!("fma")
        {
            return "avx2+fma";
        }
    }
    "portable"
}

#[cfg(target_arch = "x86_64")]
fn has_avx2_fma() -> bool {
    std::arch::is_x86_feature_detected!("avx2") && std::arch::is_x86_feature_detected!("fma")
}

/// `sum(a[i] * b[i])` over the common length, f32 accumulation in 16 lanes.
pub fn dot(a: &[f32], b: &[f32]) -> f32 {
    #[cfg(target_arch = "x86_64")]
    if std::arch::is_x86_feature_detected!("avx512f") {
        // SAFETY: avx512f was detected at run time.
        return unsafe { x86::dot_avx512(a, b) };
    }
    #[cfg(target_arch = "x86_64")]
    if has_avx2_fma() {
        // SAFETY: avx2 and fma were detected at run time.
        return unsafe { x86::dot_avx2(a, b) };
    }
    dot_impl::<false>(a, b)
}

/// `y[i] += a * x[i]` over the common length.
pub fn axpy(y: &mut [f32], a: f32, x: &[f32]) {
    #[cfg(target_arch = "x86_64")]
    if std::arch::is_x86_feature_detected!("avx512f") {
        // SAFETY: avx512f was detected at run time.
        return unsafe { x86::axpy_avx512(y, a, x) };
    }
    #[cfg(target_arch = "x86_64")]
    if has_avx2_fma() {
        // SAFETY: avx2 and fma were detected at run time.
        return unsafe { x86::axpy_avx2(y, a, x) };
    }
    axpy_impl::<false>(y, a, x)
}

/// Exact int8 dot product with i32 accumulation.
pub fn dot_i8(a: &[i8], b: &[i8]) -> i32 {
    #[cfg(target_arch = "x86_64")]
    if std::arch::is_x86_feature_detected!("avx2") {
        // SAFETY: avx2 was detected at run time.
        return unsafe { x86::dot_i8_avx2(a, b) };
    }
    dot_i8_impl(a, b)
}

/// `sum(x[i] * f32(w[i]))` for fp16 weights, converting in registers.
pub fn dot_f16(x: &[f32], w: &[f16]) -> f32 {
    #[cfg(target_arch = "x86_64")]
    {
        if std::arch::is_x86_feature_detected!("avx512f") {
            // SAFETY: avx512f was detected at run time.
            return unsafe { x86::dot_f16_avx512(x, w) };
        }
        if has_avx2_fma() && std::arch::is_x86_feature_detected!("f16c") {
            // SAFETY: avx2, fma and f16c were detected at run time.
            return unsafe { x86::dot_f16_avx2(x, w) };
        }
    }
    let mut acc = [0.0f32; 8];
    let cx = x.chunks_exact(8);
    let cw = w.chunks_exact(8);
    let (rx, rw) = (cx.remainder(), cw.remainder());
    for (a, b) in cx.zip(cw) {
        for i in 0..8 {
            acc[i] += a[i] * b[i].to_f32();
        }
    }
    acc.iter().sum::<f32>() + rx.iter().zip(rw).map(|(a, b)| a * b.to_f32()).sum::<f32>()
}

/// `out[r][c] = dot(xs[r][..k], ws[c][..k])` for a block of R activation rows and C weight
/// rows, so each loaded weight vector serves R rows (the small-batch GEMV micro-kernel).
/// Every slice must hold at least `k` elements; shorter slices give an empty (zero) block.
pub fn block_dots<const R: usize, const C: usize>(
    xs: [&[f32]; R],
    ws: [&[f32]; C],
    k: usize,
) -> [[f32; C]; R] {
    if xs.iter().any(|x| x.len() < k) || ws.iter().any(|w| w.len() < k) {
        return [[0.0; C]; R];
    }
    #[cfg(target_arch = "x86_64")]
    if std::arch::is_x86_feature_detected!("avx512f") {
        // SAFETY: avx512f was detected at run time; lengths were checked above.
        return unsafe { x86::block_dots_avx512::<R, C>(xs, ws, k) };
    }
    let mut out = [[0.0f32; C]; R];
    for (orow, x) in out.iter_mut().zip(xs) {
        for (o, w) in orow.iter_mut().zip(ws) {
            *o = dot(&x[..k], &w[..k]);
        }
    }
    out
}

/// `R` rows against two packed bf16 panels (`[k][16]` values each, see
/// `matmul::PackedBf16`): `out[r][p * 16 + c]` is the sequential FMA chain over `t` of
/// `x[r][t] * w_p[t][c]`, computed alike by the AVX-512 and the portable path (fused
/// multiply-adds in the same order), so results never depend on the CPU path or on `R`.
pub fn panel_dots<const R: usize>(
    xs: [&[f32]; R],
    panels: [&[u16]; 2],
    k: usize,
    out: &mut [[f32; 32]; R],
) {
    if !panel_fits(&xs, &panels, k, out) {
        return;
    }
    #[cfg(target_arch = "x86_64")]
    if std::arch::is_x86_feature_detected!("avx512f") {
        // SAFETY: avx512f was detected at run time; lengths were checked above.
        return unsafe { x86::panel_dots_avx512::<R>(xs, panels, k, out) };
    }
    panel_dots_portable(xs, panels, k, out);
}

/// [`panel_dots`] on panels decoded to f32 (`[k][16]` each): bit for bit the same results.
pub fn panel_dots_f32<const R: usize>(
    xs: [&[f32]; R],
    panels: [&[f32]; 2],
    k: usize,
    out: &mut [[f32; 32]; R],
) {
    if !panel_fits(&xs, &panels, k, out) {
        return;
    }
    #[cfg(target_arch = "x86_64")]
    if std::arch::is_x86_feature_detected!("avx512f") {
        // SAFETY: avx512f was detected at run time; lengths were checked above.
        return unsafe { x86::panel_dots_f32_avx512::<R>(xs, panels, k, out) };
    }
    panel_dots_portable(xs, panels, k, out);
}

/// A panel value as f32: bf16 bits, or an f32 already decoded.
trait PanelValue: Copy {
    fn value(self) -> f32;
}

impl PanelValue for u16 {
    fn value(self) -> f32 {
        f32::from_bits(u32::from(self) << 16)
    }
}

impl PanelValue for f32 {
    fn value(self) -> f32 {
        self
    }
}

/// Whether every row holds `k` values and every panel `16 * k`; if not, `out` is zeroed.
fn panel_fits<const R: usize, W>(
    xs: &[&[f32]; R],
    panels: &[&[W]; 2],
    k: usize,
    out: &mut [[f32; 32]; R],
) -> bool {
    let fits = xs.iter().all(|x| x.len() >= k) && panels.iter().all(|p| p.len() >= 16 * k);
    if !fits {
        *out = [[0.0; 32]; R];
    }
    fits
}

/// [`panel_dots`] without SIMD: the same fused multiply-adds in the same order.
fn panel_dots_portable<const R: usize, W: PanelValue>(
    xs: [&[f32]; R],
    panels: [&[W]; 2],
    k: usize,
    out: &mut [[f32; 32]; R],
) {
    *out = [[0.0; 32]; R];
    for t in 0..k {
        for (r, o) in out.iter_mut().enumerate() {
            let xv = xs[r][t];
            for (p, panel) in panels.iter().enumerate() {
                for c in 0..16 {
                    o[p * 16 + c] = xv.mul_add(panel[t * 16 + c].value(), o[p * 16 + c]);
                }
            }
        }
    }
}

/// `v[i] = exp(v[i] - shift)` (about 2 ulp; 0 below -87.3), returning the sum of the results.
pub fn exp_shift_sum(v: &mut [f32], shift: f32) -> f32 {
    #[cfg(target_arch = "x86_64")]
    {
        if std::arch::is_x86_feature_detected!("avx512f") {
            // SAFETY: avx512f was detected at run time.
            return unsafe { x86::exp_shift_sum_avx512(v, shift) };
        }
        if has_avx2_fma() {
            // SAFETY: avx2 and fma were detected at run time.
            return unsafe { x86::exp_shift_sum_avx2(v, shift) };
        }
    }
    exp_shift_sum_impl::<false>(v, shift)
}

/// Block-scaled E4M3 dot (FP8 with fp32 promotion per block):
/// `sum_b scales[b] * (sum over block b of x[i] * e4m3(w[i]))`, blocks of `block` elements.
pub fn dot_e4m3_scaled(x: &[f32], w: &[u8], block: usize, scales: &[f32]) -> f32 {
    let block = block.max(1);
    #[cfg(target_arch = "x86_64")]
    if std::arch::is_x86_feature_detected!("avx512f")
        && std::arch::is_x86_feature_detected!("avx512bw")
    {
        // SAFETY: avx512f and avx512bw were detected at run time.
        return unsafe { x86::dot_e4m3_scaled_avx512(x, w, block, scales) };
    }
    let n = x.len().min(w.len());
    scales
        .iter()
        .enumerate()
        .take_while(|(b, _)| b * block < n)
        .map(|(b, sc)| {
            let r = b * block..((b + 1) * block).min(n);
            dot_e4m3(&x[r.clone()], &w[r]) * sc
        })
        .sum()
}

/// `sum(x[i] * f32(w[i]))` for bf16 weights.
pub fn dot_bf16(x: &[f32], w: &[half::bf16]) -> f32 {
    #[cfg(target_arch = "x86_64")]
    if std::arch::is_x86_feature_detected!("avx512f") {
        // SAFETY: avx512f was detected at run time.
        return unsafe { x86::dot_bf16_avx512(x, w) };
    }
    let mut buf = [0.0f32; 256];
    let mut total = 0.0;
    for (xc, wc) in x.chunks(256).zip(w.chunks(256)) {
        let b = &mut buf[..wc.len()];
        for (o, v) in b.iter_mut().zip(wc) {
            *o = f32::from_bits(u32::from(v.to_bits()) << 16);
        }
        total += dot(xc, b);
    }
    total
}

/// `sum(x[i] * e4m3(w[i]))` for E4M3 codes (no scales).
pub fn dot_e4m3(x: &[f32], w: &[u8]) -> f32 {
    #[cfg(target_arch = "x86_64")]
    if std::arch::is_x86_feature_detected!("avx512f")
        && std::arch::is_x86_feature_detected!("avx512bw")
    {
        // SAFETY: avx512f and avx512bw were detected at run time.
        return unsafe { x86::dot_e4m3_avx512(x, w) };
    }
    let mut buf = [0.0f32; 256];
    let mut total = 0.0;
    for (xc, wc) in x.chunks(256).zip(w.chunks(256)) {
        let b = &mut buf[..wc.len()];
        for (o, v) in b.iter_mut().zip(wc) {
            *o = crate::npu::format::e4m3_to_f32(*v);
        }
        total += dot(xc, b);
    }
    total
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn panel_dots_are_the_same_on_every_path_and_for_every_row_count() {
        let k = 37;
        let x: Vec<Vec<f32>> = (0..3)
            .map(|r| {
                (0..k)
                    .map(|t| ((r * 31 + t * 7) % 13) as f32 * 0.37 - 2.0)
                    .collect()
            })
            .collect();
        let panel = |s: usize| -> Vec<u16> {
            (0..16 * k)
                .map(|i| half::bf16::from_f32(((i * 11 + s) % 17) as f32 * 0.21 - 1.5).to_bits())
                .collect()
        };
        let (p0, p1) = (panel(1), panel(2));
        let mut three = [[0.0f32; 32]; 3];
        panel_dots::<3>([&x[0], &x[1], &x[2]], [&p0, &p1], k, &mut three);
        let mut portable = [[0.0f32; 32]; 3];
        panel_dots_portable::<3, u16>([&x[0], &x[1], &x[2]], [&p0, &p1], k, &mut portable);
        let mut one = [[0.0f32; 32]; 1];
        panel_dots::<1>([&x[2]], [&p0, &p1], k, &mut one);
        let bits = |v: &[f32]| v.iter().map(|f| f.to_bits()).collect::<Vec<_>>();
        for r in 0..3 {
            assert_eq!(
                bits(&three[r]),
                bits(&portable[r]),
                "row {r}: SIMD = portable"
            );
        }
        assert_eq!(bits(&one[0]), bits(&three[2]), "a row alone = in a block");
        let decode = |p: &[u16]| -> Vec<f32> {
            p.iter()
                .map(|&b| f32::from_bits(u32::from(b) << 16))
                .collect()
        };
        let (f0, f1) = (decode(&p0), decode(&p1));
        let mut decoded = [[0.0f32; 32]; 3];
        panel_dots_f32::<3>([&x[0], &x[1], &x[2]], [&f0, &f1], k, &mut decoded);
        for r in 0..3 {
            assert_eq!(
                bits(&decoded[r]),
                bits(&three[r]),
                "row {r}: f32 panels = bf16 panels"
            );
        }
    }

    #[test]
    fn block_dots_match_pairwise_dots() {
        for k in [1usize, 15, 16, 33, 100] {
            let rows: Vec<Vec<f32>> = (0..4)
                .map(|r| (0..k).map(|i| ((i * 7 + r) % 11) as f32 - 5.0).collect())
                .collect();
            let ws: Vec<Vec<f32>> = (0..4)
                .map(|c| (0..k).map(|i| ((i * 3 + c) % 13) as f32 / 13.0).collect())
                .collect();
            let out = block_dots::<4, 4>(
                [&rows[0], &rows[1], &rows[2], &rows[3]],
                [&ws[0], &ws[1], &ws[2], &ws[3]],
                k,
            );
            for r in 0..4 {
                for c in 0..4 {
                    let e: f64 = rows[r]
                        .iter()
                        .zip(&ws[c])
                        .map(|(a, b)| f64::from(*a) * f64::from(*b))
                        .sum();
                    assert!(
                        (f64::from(out[r][c]) - e).abs() < 1e-4 * (1.0 + e.abs()),
                        "k={k} r={r} c={c}"
                    );
                }
            }
            let one = block_dots::<3, 1>([&rows[0], &rows[1], &rows[2]], [&ws[2]], k);
            assert_eq!(one[1][0], out[1][2]);
        }
    }

    #[test]
    fn exp_is_accurate_and_sums() {
        let xs: Vec<f32> = (0..2001).map(|i| -100.0 + i as f32 * 0.0523).collect();
        let mut v = xs.clone();
        let s = exp_shift_sum(&mut v, 3.0);
        let mut total = 0.0f64;
        for (x, y) in xs.iter().zip(&v) {
            let e = f64::from(*x - 3.0).exp();
            total += e;
            if *x - 3.0 < -87.3 {
                assert_eq!(*y, 0.0);
            } else {
                assert!((f64::from(*y) - e).abs() <= 3e-7 * e, "{x}: {y} vs {e}");
            }
        }
        assert!((f64::from(s) - total).abs() <= 1e-5 * total);
    }

    #[test]
    fn dots_match_f64_for_odd_lengths() {
        for n in [0, 1, 7, 15, 16, 17, 63, 64, 65, 130, 1001] {
            let a: Vec<f32> = (0..n).map(|i| ((i * 31 % 17) as f32 - 8.0) / 8.0).collect();
            let b: Vec<f32> = (0..n).map(|i| ((i * 7 % 13) as f32 - 6.0) / 4.0).collect();
            let r: f64 = a
                .iter()
                .zip(&b)
                .map(|(x, y)| f64::from(*x) * f64::from(*y))
                .sum();
            assert!((f64::from(dot(&a, &b)) - r).abs() < 1e-4, "n={n}");
            let bh: Vec<f16> = b.iter().map(|&v| f16::from_f32(v)).collect();
            assert!((f64::from(dot_f16(&a, &bh)) - r).abs() < 1e-4, "f16 n={n}");
            let bb: Vec<half::bf16> = b.iter().map(|&v| half::bf16::from_f32(v)).collect();
            assert!(
                (f64::from(dot_bf16(&a, &bb)) - r).abs() < 1e-4,
                "bf16 n={n}"
            );
            let codes: Vec<u8> = (0..n)
                .map(|i| ((i * 29) % 256) as u8)
                .filter(|c| c & 0x7f != 0x7f)
                .collect();
            let xs = &a[..codes.len()];
            let re: f64 = xs
                .iter()
                .zip(&codes)
                .map(|(x, c)| f64::from(*x) * f64::from(crate::npu::format::e4m3_to_f32(*c)))
                .sum();
            assert!(
                (f64::from(dot_e4m3(xs, &codes)) - re).abs() < 1e-3 * (1.0 + re.abs()),
                "e4m3 n={n}"
            );
            let ai: Vec<i8> = (0..n)
                .map(|i| ((i * 37 % 255) as i32 - 127) as i8)
                .collect();
            let bi: Vec<i8> = (0..n)
                .map(|i| ((i * 11 % 255) as i32 - 127) as i8)
                .collect();
            let ri: i32 = ai
                .iter()
                .zip(&bi)
                .map(|(x, y)| i32::from(*x) * i32::from(*y))
                .sum();
            assert_eq!(dot_i8(&ai, &bi), ri);
            let mut y = vec![1.0f32; n];
            axpy(&mut y, 2.0, &a);
            for (yi, ai) in y.iter().zip(&a) {
                assert_eq!(*yi, 1.0 + 2.0 * ai);
            }
        }
    }
}
