//! Weight matrices as stored on the device, laid out like a Hugging Face `Linear`:
//! `[out_features, in_features]`, row-major.
//!
//! Owns the storage formats (f32, fp16, bf16, int8 + per-channel scales, FP8 E4M3 + 128x128
//! block `weight_scale_inv`), their validation, quantisation from f32 and dequantisation. It must
//! not know about kernels, costs or where the numbers came from (checkpoint loading is the
//! caller's business).

use half::{bf16, f16};

use super::error::{Result, arg_err, check_len};
use super::format::{FP8_BLOCK, WeightFormat, e4m3_to_f32, quantize_fp8_tile, quantize_int8_row};

/// Stored elements of a weight matrix.
#[derive(Debug, Clone, PartialEq)]
pub enum WeightData {
    /// f32 values.
    F32(Vec<f32>),
    /// fp16 values.
    F16(Vec<f16>),
    /// bf16 values.
    Bf16(Vec<bf16>),
    /// int8 values and one scale per output row: `w[n][k] = q[n][k] * scales[n]`.
    Int8 {
        /// `[out, in]` quantised values.
        q: Vec<i8>,
        /// `[out]` per-output-channel scales.
        scales: Vec<f32>,
    },
    /// E4M3 codes and one scale per 128x128 block:
    /// `w[n][k] = e4m3(q[n][k]) * scale_inv[n / 128][k / 128]`.
    Fp8E4m3 {
        /// `[out, in]` E4M3 codes.
        q: Vec<u8>,
        /// `[ceil(out/128), ceil(in/128)]` block scales (DeepSeek-V3 `weight_scale_inv`).
        scale_inv: Vec<f32>,
    },
}

/// A `[out_features, in_features]` weight in one storage format.
#[derive(Debug, Clone, PartialEq)]
pub struct LinearWeight {
    out_features: usize,
    in_features: usize,
    data: WeightData,
    /// bf16 weights also in the matmul kernel's layout, packed once here.
    packed: Option<std::sync::Arc<PackedBf16>>,
}

/// Output features per packed panel.
pub const PANEL_WIDTH: usize = 16;

/// bf16 weights packed for the row-wise kernel: panels of [`PANEL_WIDTH`] output features,
/// each `[in_features][PANEL_WIDTH]` (the features of one input position side by side, so one
/// load feeds one multiply-add per output feature), an even number of panels, the last
/// features zero-padded.
#[derive(Debug, PartialEq)]
pub struct PackedBf16 {
    pub panels: usize,
    pub in_features: usize,
    /// bf16 bits, panel after panel.
    pub data: Vec<u16>,
}

impl PackedBf16 {
    fn pack(out_features: usize, in_features: usize, rows: &[bf16]) -> Self {
        let panels = out_features.div_ceil(PANEL_WIDTH).next_multiple_of(2);
        let k = in_features;
        let mut data = vec![0u16; panels * PANEL_WIDTH * k];
        for (j, row) in rows.chunks(k).enumerate() {
            let (p, c) = (j / PANEL_WIDTH, j % PANEL_WIDTH);
            let panel = &mut data[p * PANEL_WIDTH * k..(p + 1) * PANEL_WIDTH * k];
            for (t, v) in row.iter().enumerate() {
                panel[t * PANEL_WIDTH + c] = v.to_bits();
            }
        }
        Self {
            panels,
            in_features,
            data,
        }
    }

    /// Panel `p`'s `[in_features][PANEL_WIDTH]` values.
    pub fn panel(&self, p: usize) -> &[u16] {
        let len = PANEL_WIDTH * self.in_features;
        &self.data[p * len..(p + 1) * len]
    }
}

const OP: &str = "LinearWeight";

fn blocks(n: usize) -> usize {
    n.div_ceil(FP8_BLOCK)
}

impl LinearWeight {
    /// Wraps already-stored data after checking every length against the shape.
    pub fn new(out_features: usize, in_features: usize, data: WeightData) -> Result<Self> {
        if out_features == 0 || in_features == 0 {
            return Err(arg_err(
                OP,
                "out_features/in_features",
                format!("must be non-zero, got [{out_features}, {in_features}]"),
            ));
        }
        let n = out_features * in_features;
        let dims = format!("out_features({out_features}) x in_features({in_features})");
        match &data {
            WeightData::F32(v) => check_len(OP, "values", v.len(), n, &dims)?,
            WeightData::F16(v) => check_len(OP, "values", v.len(), n, &dims)?,
            WeightData::Bf16(v) => check_len(OP, "values", v.len(), n, &dims)?,
            WeightData::Int8 { q, scales } => {
                check_len(OP, "q", q.len(), n, &dims)?;
                check_len(OP, "scales", scales.len(), out_features, "out_features")?;
            }
            WeightData::Fp8E4m3 { q, scale_inv } => {
                check_len(OP, "q", q.len(), n, &dims)?;
                let (bo, bi) = (blocks(out_features), blocks(in_features));
                if let Some(i) = q.iter().position(|c| c & 0x7f == 0x7f) {
                    return Err(arg_err(
                        OP,
                        "q",
                        format!("E4M3 NaN code {:#04x} at element {i}", q[i]),
                    ));
                }
                check_len(
                    OP,
                    "scale_inv",
                    scale_inv.len(),
                    bo * bi,
                    &format!("ceil(out/128)({bo}) x ceil(in/128)({bi})"),
                )?;
            }
        }
        let packed = match &data {
            WeightData::Bf16(v) => Some(std::sync::Arc::new(PackedBf16::pack(
                out_features,
                in_features,
                v,
            ))),
            _ => None,
        };
        Ok(Self {
            out_features,
            in_features,
            data,
            packed,
        })
    }

    /// The kernel layout of bf16 weights.
    pub fn packed_bf16(&self) -> Option<&PackedBf16> {
        self.packed.as_deref()
    }

    /// Quantises or rounds an f32 `[out, in]` matrix into `format`.
    pub fn from_f32(
        out_features: usize,
        in_features: usize,
        values: &[f32],
        format: WeightFormat,
    ) -> Result<Self> {
        check_len(
            OP,
            "values",
            values.len(),
            out_features * in_features,
            &format!("out_features({out_features}) x in_features({in_features})"),
        )?;
        let data = match format {
            WeightFormat::F32 => WeightData::F32(values.to_vec()),
            WeightFormat::F16 => {
                WeightData::F16(values.iter().map(|&v| f16::from_f32(v)).collect())
            }
            WeightFormat::Bf16 => {
                WeightData::Bf16(values.iter().map(|&v| bf16::from_f32(v)).collect())
            }
            WeightFormat::Int8 => {
                let mut q = vec![0i8; values.len()];
                let scales = values
                    .chunks(in_features.max(1))
                    .zip(q.chunks_mut(in_features.max(1)))
                    .map(|(row, qrow)| quantize_int8_row(row, qrow))
                    .collect();
                WeightData::Int8 { q, scales }
            }
            WeightFormat::Fp8E4m3 => {
                let (bo, bi) = (blocks(out_features), blocks(in_features));
                let mut q = vec![0u8; values.len()];
                let mut scale_inv = vec![1.0f32; bo * bi];
                let mut tile = Vec::with_capacity(FP8_BLOCK * FP8_BLOCK);
                let mut qtile = vec![0u8; FP8_BLOCK * FP8_BLOCK];
                for b_o in 0..bo {
                    let rows = b_o * FP8_BLOCK..((b_o + 1) * FP8_BLOCK).min(out_features);
                    for b_i in 0..bi {
                        let cols = b_i * FP8_BLOCK..((b_i + 1) * FP8_BLOCK).min(in_features);
                        tile.clear();
                        for r in rows.clone() {
                            tile.extend_from_slice(
                                &values[r * in_features + cols.start..r * in_features + cols.end],
                            );
                        }
                        let s = quantize_fp8_tile(&tile, &mut qtile[..tile.len()]);
                        scale_inv[b_o * bi + b_i] = s;
                        let w = cols.len();
                        for (i, r) in rows.clone().enumerate() {
                            q[r * in_features + cols.start..r * in_features + cols.end]
                                .copy_from_slice(&qtile[i * w..(i + 1) * w]);
                        }
                    }
                }
                WeightData::Fp8E4m3 { q, scale_inv }
            }
        };
        Self::new(out_features, in_features, data)
    }

    /// Output features (rows).
    pub fn out_features(&self) -> usize {
        self.out_features
    }

    /// Input features (columns).
    pub fn in_features(&self) -> usize {
        self.in_features
    }

    /// Storage format.
    pub fn format(&self) -> WeightFormat {
        match self.data {
            WeightData::F32(_) => WeightFormat::F32,
            WeightData::F16(_) => WeightFormat::F16,
            WeightData::Bf16(_) => WeightFormat::Bf16,
            WeightData::Int8 { .. } => WeightFormat::Int8,
            WeightData::Fp8E4m3 { .. } => WeightFormat::Fp8E4m3,
        }
    }

    /// Stored data.
    pub fn data(&self) -> &WeightData {
        &self.data
    }

    /// Bytes of device memory the weight occupies, scales included.
    pub fn storage_bytes(&self) -> u64 {
        let n = (self.out_features * self.in_features) as u64;
        let elems = n * self.format().bytes_per_element() as u64;
        let scales = match &self.data {
            WeightData::Int8 { scales, .. } => scales.len() as u64 * 4,
            WeightData::Fp8E4m3 { scale_inv, .. } => scale_inv.len() as u64 * 4,
            _ => 0,
        };
        elems + scales
    }

    /// Decodes rows `rows` of the stored matrix (without scales for int8/FP8 when `raw`) into
    /// `out` as f32, row-major `[rows.len(), in_features]`.
    ///
    /// With `raw = false` the values are fully dequantised; with `raw = true` quantised formats
    /// give their integer / E4M3 grid values, as the cube sees them before scaling.
    pub(crate) fn decode_rows(&self, rows: std::ops::Range<usize>, raw: bool, out: &mut [f32]) {
        let k = self.in_features;
        let src = rows.start * k..rows.end * k;
        match &self.data {
            WeightData::F32(v) => out.copy_from_slice(&v[src]),
            WeightData::F16(v) => {
                use half::slice::HalfFloatSliceExt;
                v[src].convert_to_f32_slice(out);
            }
            WeightData::Bf16(v) => {
                for (o, b) in out.iter_mut().zip(&v[src]) {
                    *o = f32::from_bits(u32::from(b.to_bits()) << 16);
                }
            }
            WeightData::Int8 { q, scales } => {
                for (r, orow) in rows.clone().zip(out.chunks_mut(k)) {
                    let s = if raw { 1.0 } else { scales[r] };
                    for (o, v) in orow.iter_mut().zip(&q[r * k..(r + 1) * k]) {
                        *o = f32::from(*v) * s;
                    }
                }
            }
            WeightData::Fp8E4m3 { q, scale_inv } => {
                let bi = blocks(k);
                for (r, orow) in rows.clone().zip(out.chunks_mut(k)) {
                    for (c, (o, v)) in orow.iter_mut().zip(&q[r * k..(r + 1) * k]).enumerate() {
                        let s = if raw {
                            1.0
                        } else {
                            scale_inv[(r / FP8_BLOCK) * bi + c / FP8_BLOCK]
                        };
                        *o = e4m3_to_f32(*v) * s;
                    }
                }
            }
        }
    }

    /// Fully dequantised f32 copy, `[out, in]` (for references and debugging).
    pub fn dequantize(&self) -> Vec<f32> {
        let mut out = vec![0.0; self.out_features * self.in_features];
        self.decode_rows(0..self.out_features, false, &mut out);
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn shape_errors_name_the_field() {
        let e = LinearWeight::new(2, 3, WeightData::F32(vec![0.0; 5])).unwrap_err();
        assert!(e.to_string().contains("values"), "{e}");
        let e = LinearWeight::new(
            200,
            130,
            WeightData::Fp8E4m3 {
                q: vec![0; 200 * 130],
                scale_inv: vec![1.0; 3],
            },
        )
        .unwrap_err();
        assert!(e.to_string().contains("scale_inv"), "{e}");
    }

    #[test]
    fn fp8_block_dequant_error_is_bounded() {
        let (o, i) = (130, 200);
        let w: Vec<f32> = (0..o * i)
            .map(|j| ((j * 7919 % 1000) as f32 - 500.0) / 250.0)
            .collect();
        let q = LinearWeight::from_f32(o, i, &w, WeightFormat::Fp8E4m3).unwrap();
        let d = q.dequantize();
        // Per element: relative 2^-4 of the value, or half a subnormal step of the block scale.
        let amax = 2.0f32;
        for (a, b) in w.iter().zip(&d) {
            assert!(
                (a - b).abs() <= a.abs() / 16.0 + amax / 448.0 / 1024.0 + 1e-7,
                "{a} {b}"
            );
        }
        assert_eq!(q.storage_bytes(), (o * i) as u64 + 2 * 2 * 4);
    }
}
