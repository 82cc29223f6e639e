//! Vector-core kernels: RMSNorm, SwiGLU, residual add, softmax and log-softmax.
//!
//! Owns their numerics (f32 in and out, f32 reductions in 16 lanes, max-subtracted
//! exponentials). It must not know costs, profiles or what the rows mean.

use rayon::prelude::*;

use super::simd;
use crate::npu::error::{Result, arg_err, check_len, shape_err};

/// Rows per rayon task; small launches stay on the calling thread.
const ROWS_PER_TASK: usize = 4;
/// Below this many elements the kernels do not fan out.
const PAR_MIN_ELEMS: usize = 1 << 15;

fn cols_of(op: &'static str, len: usize, rows: usize) -> Result<usize> {
    if rows == 0 {
        return if len == 0 {
            Ok(0)
        } else {
            Err(shape_err(
                op,
                format!("rows is 0 but `x` has {len} elements"),
            ))
        };
    }
    if !len.is_multiple_of(rows) {
        return Err(shape_err(
            op,
            format!("`x` has {len} elements, not a multiple of rows({rows})"),
        ));
    }
    Ok(len / rows)
}

fn for_rows(out: &mut [f32], cols: usize, f: impl Fn(usize, &mut [f32]) + Sync + Send) {
    if cols == 0 {
        return;
    }
    if out.len() >= PAR_MIN_ELEMS {
        out.par_chunks_mut(cols * ROWS_PER_TASK)
            .enumerate()
            .for_each(|(t, chunk)| {
                for (i, row) in chunk.chunks_mut(cols).enumerate() {
                    f(t * ROWS_PER_TASK + i, row);
                }
            });
    } else {
        for (i, row) in out.chunks_mut(cols).enumerate() {
            f(i, row);
        }
    }
}

/// `y = x / sqrt(mean(x²) + eps) * weight`, per row of `x[rows, weight.len()]`.
pub fn rms_norm(x: &[f32], rows: usize, weight: &[f32], eps: f32) -> Result<Vec<f32>> {
    const OP: &str = "rms_norm";
    let h = weight.len();
    check_len(
        OP,
        "x",
        x.len(),
        rows * h,
        &format!("rows({rows}) x hidden(weight.len()={h})"),
    )?;
    if !(eps.is_finite() && eps >= 0.0) {
        return Err(arg_err(
            OP,
            "eps",
            format!("must be finite and >= 0, got {eps}"),
        ));
    }
    let mut out = vec![0.0f32; x.len()];
    for_rows(&mut out, h, |r, row| {
        let xr = &x[r * h..(r + 1) * h];
        let ms = simd::dot(xr, xr) / h as f32;
        let inv = 1.0 / (ms + eps).sqrt();
        for ((o, v), g) in row.iter_mut().zip(xr).zip(weight) {
            *o = v * inv * g;
        }
    });
    Ok(out)
}

/// `silu(gate) * up` elementwise, `silu(g) = g / (1 + e^-g)`.
pub fn swiglu(gate: &[f32], up: &[f32]) -> Result<Vec<f32>> {
    check_len("swiglu", "up", up.len(), gate.len(), "gate.len()")?;
    Ok(gate
        .iter()
        .zip(up)
        .map(|(g, u)| g / (1.0 + (-g).exp()) * u)
        .collect())
}

/// `x += residual` elementwise.
pub fn residual_add(x: &mut [f32], residual: &[f32]) -> Result<()> {
    check_len(
        "residual_add",
        "residual",
        residual.len(),
        x.len(),
        "x.len()",
    )?;
    x.iter_mut().zip(residual).for_each(|(a, b)| *a += b);
    Ok(())
}

fn softmax_like(op: &'static str, x: &[f32], rows: usize, log: bool) -> Result<Vec<f32>> {
    let cols = cols_of(op, x.len(), rows)?;
    let mut out = vec![0.0f32; x.len()];
    for_rows(&mut out, cols, |r, row| {
        let xr = &x[r * cols..(r + 1) * cols];
        let max = xr.iter().fold(f32::NEG_INFINITY, |m, v| m.max(*v));
        if max == f32::NEG_INFINITY {
            // Every entry masked: a uniform row is the only finite answer.
            let u = 1.0 / cols as f32;
            row.iter_mut()
                .for_each(|o| *o = if log { u.ln() } else { u });
            return;
        }
        row.copy_from_slice(xr);
        let sum = simd::exp_shift_sum(row, max);
        if log {
            let lse = sum.ln();
            for (o, v) in row.iter_mut().zip(xr) {
                *o = v - max - lse;
            }
        } else {
            let inv = 1.0 / sum;
            row.iter_mut().for_each(|o| *o *= inv);
        }
    });
    Ok(out)
}

/// Softmax over each row of `x[rows, cols]`.
pub fn softmax(x: &[f32], rows: usize) -> Result<Vec<f32>> {
    softmax_like("softmax", x, rows, false)
}

/// Log-softmax over each row of `x[rows, cols]`.
pub fn log_softmax(x: &[f32], rows: usize) -> Result<Vec<f32>> {
    softmax_like("log_softmax", x, rows, true)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn data(n: usize) -> Vec<f32> {
        (0..n)
            .map(|i| ((i * 7919 % 1013) as f32 - 506.0) / 101.0)
            .collect()
    }

    #[test]
    fn rms_norm_matches_f64() {
        for (rows, h) in [(1, 7), (3, 33), (20, 4100)] {
            let x = data(rows * h);
            let w: Vec<f32> = (0..h).map(|i| 0.5 + (i % 5) as f32 * 0.1).collect();
            let y = rms_norm(&x, rows, &w, 1e-6).unwrap();
            for r in 0..rows {
                let xr = &x[r * h..(r + 1) * h];
                let ms: f64 = xr.iter().map(|v| f64::from(*v).powi(2)).sum::<f64>() / h as f64;
                for c in 0..h {
                    let e = f64::from(xr[c]) / (ms + 1e-6).sqrt() * f64::from(w[c]);
                    assert!((f64::from(y[r * h + c]) - e).abs() <= 1e-5 * (1.0 + e.abs()));
                }
            }
        }
        assert!(rms_norm(&[1.0; 5], 2, &[1.0; 3], 1e-6).is_err());
    }

    #[test]
    fn swiglu_and_residual_match_f64() {
        let g = data(100);
        let u: Vec<f32> = data(100).iter().map(|v| v * 0.3).collect();
        let y = swiglu(&g, &u).unwrap();
        for i in 0..100 {
            let gd = f64::from(g[i]);
            let e = gd / (1.0 + (-gd).exp()) * f64::from(u[i]);
            assert!((f64::from(y[i]) - e).abs() <= 1e-6 * (1.0 + e.abs()));
        }
        let mut x = g.clone();
        residual_add(&mut x, &u).unwrap();
        assert_eq!(x[3], g[3] + u[3]);
        assert!(swiglu(&g, &u[..99]).is_err());
    }

    #[test]
    fn softmax_and_log_softmax_match_f64() {
        let (rows, cols) = (3, 1001);
        let x: Vec<f32> = data(rows * cols).iter().map(|v| v * 8.0).collect();
        let p = softmax(&x, rows).unwrap();
        let lp = log_softmax(&x, rows).unwrap();
        for r in 0..rows {
            let xr: Vec<f64> = x[r * cols..(r + 1) * cols]
                .iter()
                .map(|v| f64::from(*v))
                .collect();
            let max = xr.iter().cloned().fold(f64::NEG_INFINITY, f64::max);
            let lse = max + xr.iter().map(|v| (v - max).exp()).sum::<f64>().ln();
            for c in 0..cols {
                let e = xr[c] - lse;
                assert!((f64::from(lp[r * cols + c]) - e).abs() <= 1e-4);
                assert!((f64::from(p[r * cols + c]) - e.exp()).abs() <= 1e-6);
            }
        }
        let masked = softmax(&[f32::NEG_INFINITY; 4], 1).unwrap();
        assert_eq!(masked, vec![0.25; 4]);
    }
}
