//! Number formats of the NPU: fp16, bf16, int8 and FP8 E4M3, and their rounding rules.
//!
//! Owns scalar and slice conversions (round-to-nearest-even everywhere, saturation for FP8 and
//! int8) and the quantisers used by W8A8 and by DeepSeek-V3 style FP8 block scaling. It must not
//! know about matrices, kernels or costs.

use half::{bf16, f16};
use serde::{Deserialize, Serialize};

/// Storage format of a weight matrix.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub enum WeightFormat {
    /// IEEE binary32 (e.g. a router gate kept in full precision).
    F32,
    /// IEEE binary16.
    F16,
    /// bfloat16.
    Bf16,
    /// int8 with one f32 scale per output channel (W8A8: activations quantised per token).
    Int8,
    /// FP8 E4M3 (`e4m3fn`: max 448, no infinities) with one f32 `weight_scale_inv` per
    /// 128x128 block; activations quantised in 1x128 tiles.
    Fp8E4m3,
}

impl WeightFormat {
    /// Bytes per stored element (scales excluded).
    pub fn bytes_per_element(self) -> usize {
        match self {
            Self::F32 => 4,
            Self::F16 | Self::Bf16 => 2,
            Self::Int8 | Self::Fp8E4m3 => 1,
        }
    }

    /// f32, fp16 or bf16: stored values decode to f32 exactly.
    pub fn is_float(self) -> bool {
        matches!(self, Self::F32 | Self::F16 | Self::Bf16)
    }

    /// Short lower-case name for tables and traces.
    pub fn name(self) -> &'static str {
        match self {
            Self::F32 => "f32",
            Self::F16 => "f16",
            Self::Bf16 => "bf16",
            Self::Int8 => "int8",
            Self::Fp8E4m3 => "fp8e4m3",
        }
    }
}

/// Block edge of FP8 weight scales and activation tiles (DeepSeek-V3: 128).
pub const FP8_BLOCK: usize = 128;
/// Largest finite E4M3 magnitude.
pub const E4M3_MAX: f32 = 448.0;
/// Largest int8 magnitude used by symmetric quantisation.
pub const INT8_MAX: f32 = 127.0;

/// Rounds an f32 to the nearest fp16 and back.
pub fn round_f16(x: f32) -> f32 {
    f16::from_f32(x).to_f32()
}

/// Rounds an f32 to the nearest bf16 and back.
pub fn round_bf16(x: f32) -> f32 {
    bf16::from_f32(x).to_f32()
}

/// Rounds every element of `xs` in place to the activation format that goes with `format`
/// (fp16 or bf16; f32 leaves the values alone; quantised formats are handled by their quantiser).
pub fn round_slice_to(format: WeightFormat, xs: &mut [f32]) {
    match format {
        WeightFormat::F16 => {
            // Slice conversions use F16C when the CPU has it (runtime detection in `half`).
            use half::slice::HalfFloatSliceExt;
            let mut buf = [f16::ZERO; 1024];
            for chunk in xs.chunks_mut(1024) {
                let b = &mut buf[..chunk.len()];
                b.convert_from_f32_slice(chunk);
                b.convert_to_f32_slice(chunk);
            }
        }
        WeightFormat::Bf16 => xs.iter_mut().for_each(|x| *x = round_bf16(*x)),
        WeightFormat::F32 | WeightFormat::Int8 | WeightFormat::Fp8E4m3 => {}
    }
}

const fn e4m3_decode_const(code: u8) -> f32 {
    let sign = if code & 0x80 != 0 { -1.0f32 } else { 1.0f32 };
    let exp = ((code >> 3) & 0x0f) as u32;
    let man = (code & 0x07) as u32;
    if exp == 0x0f && man == 0x07 {
        return f32::NAN;
    }
    if exp == 0 {
        // Subnormal: man x 2^-9.
        return sign * (man as f32) * (1.0 / 512.0);
    }
    // Normal: (1 + man/8) x 2^(exp - 7); as f32 bits the exponent field is exp - 7 + 127.
    sign * f32::from_bits(((exp + 120) << 23) | (man << 20))
}

const fn build_e4m3_table() -> [f32; 256] {
    let mut t = [0.0f32; 256];
    let mut i = 0;
    while i < 256 {
        t[i] = e4m3_decode_const(i as u8);
        i += 1;
    }
    t
}

/// Value of every E4M3 code, indexed by the code.
pub static E4M3_TABLE: [f32; 256] = build_e4m3_table();

/// Decodes one E4M3 code.
#[inline]
pub fn e4m3_to_f32(code: u8) -> f32 {
    E4M3_TABLE[code as usize]
}

/// Encodes an f32 as E4M3 with round-to-nearest-even, saturating at ±448; NaN maps to NaN.
pub fn f32_to_e4m3(x: f32) -> u8 {
    if x.is_nan() {
        return 0x7f;
    }
    let sign: u8 = if x.is_sign_negative() { 0x80 } else { 0 };
    let a = x.abs();
    if a >= E4M3_MAX {
        return sign | 0x7e;
    }
    let min_normal = 1.0 / 64.0;
    if a < min_normal {
        // Subnormal grid: multiples of 2^-9; 8 x 2^-9 is the smallest normal, code 0x08.
        let m = (a * 512.0).round_ties_even() as u8;
        return sign | m;
    }
    let exp = ((a.to_bits() >> 23) & 0xff) as i32 - 127; // -6..=8
    let scaled = a / f32::from_bits(((exp + 127) as u32) << 23); // in [1, 2)
    let mut m = ((scaled - 1.0) * 8.0).round_ties_even() as i32;
    let mut e = exp + 7;
    if m == 8 {
        m = 0;
        e += 1;
    }
    let code = ((e as u8) << 3) | (m as u8);
    sign | code.min(0x7e)
}

/// Quantises one row symmetrically to int8; returns the scale (`x ≈ q * scale`).
pub fn quantize_int8_row(x: &[f32], q: &mut [i8]) -> f32 {
    let amax = x.iter().fold(0.0f32, |m, v| m.max(v.abs()));
    let scale = if amax > 0.0 { amax / INT8_MAX } else { 1.0 };
    let inv = 1.0 / scale;
    for (o, v) in q.iter_mut().zip(x) {
        *o = (v * inv).round_ties_even().clamp(-INT8_MAX, INT8_MAX) as i8;
    }
    scale
}

/// Quantises one tile to E4M3 with a single scale (`x ≈ decode(q) * scale`); returns the scale.
pub fn quantize_fp8_tile(x: &[f32], q: &mut [u8]) -> f32 {
    let amax = x.iter().fold(0.0f32, |m, v| m.max(v.abs()));
    let scale = if amax > 0.0 { amax / E4M3_MAX } else { 1.0 };
    let inv = 1.0 / scale;
    for (o, v) in q.iter_mut().zip(x) {
        *o = f32_to_e4m3(v * inv);
    }
    scale
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn e4m3_round_trips_every_code() {
        for code in 0u8..=255 {
            let v = e4m3_to_f32(code);
            if v.is_nan() {
                assert!(code & 0x7f == 0x7f);
                continue;
            }
            let back = f32_to_e4m3(v);
            // +0 and -0 are distinct codes with equal values.
            assert_eq!(e4m3_to_f32(back), v, "code {code:#x}");
        }
        assert_eq!(e4m3_to_f32(0x7e), 448.0);
        assert_eq!(e4m3_to_f32(0x01), 1.0 / 512.0);
        assert_eq!(e4m3_to_f32(0x08), 1.0 / 64.0);
    }

    #[test]
    fn e4m3_rounds_to_nearest_and_saturates() {
        assert_eq!(e4m3_to_f32(f32_to_e4m3(1000.0)), 448.0);
        assert_eq!(e4m3_to_f32(f32_to_e4m3(-1000.0)), -448.0);
        // Between 1.0 and 1.125 the midpoint 1.0625 ties to even (1.0).
        assert_eq!(e4m3_to_f32(f32_to_e4m3(1.0625)), 1.0);
        assert_eq!(e4m3_to_f32(f32_to_e4m3(1.07)), 1.125);
        // Relative error of normal values is at most 2^-4.
        let mut x = 0.02f32;
        while x < 440.0 {
            let r = e4m3_to_f32(f32_to_e4m3(x));
            assert!(((r - x) / x).abs() <= 1.0 / 16.0 + 1e-6, "{x} -> {r}");
            x *= 1.013;
        }
    }

    #[test]
    fn slice_rounding_equals_scalar_rounding() {
        let xs: Vec<f32> = (0..3000)
            .map(|i| (i as f32 * 0.37).sin() * 70000.0 / (1.0 + i as f32))
            .collect();
        for format in [WeightFormat::F16, WeightFormat::Bf16] {
            let mut v = xs.clone();
            round_slice_to(format, &mut v);
            for (a, b) in xs.iter().zip(&v) {
                let e = if format == WeightFormat::F16 {
                    round_f16(*a)
                } else {
                    round_bf16(*a)
                };
                assert_eq!(e.to_bits(), b.to_bits());
            }
        }
    }

    #[test]
    fn int8_quantisation_error_is_half_a_step() {
        let x: Vec<f32> = (0..300)
            .map(|i| ((i * 37 % 101) as f32 - 50.0) / 7.0)
            .collect();
        let mut q = vec![0i8; x.len()];
        let s = quantize_int8_row(&x, &mut q);
        for (v, qi) in x.iter().zip(&q) {
            assert!((v - f32::from(*qi) * s).abs() <= 0.5 * s * 1.0001);
        }
    }
}
