//! Rotary position embedding, in interleaved (GPT-J / DeepSeek) and half (GPT-NeoX) pairing,
//! on the last `rope_dim` dimensions of each head (DeepSeek-V3 decoupled rope uses the last
//! `qk_rope_head_dim`; a full-head rope uses `rope_dim = head_dim`).
//!
//! Owns the frequency table and the rotation. It must not know attention, caches or costs;
//! scaled variants (YaRN, NTK) are the caller's: pass their frequencies to
//! [`Rope::with_inv_freq`].

use crate::npu::error::{Result, arg_err, check_len, shape_err};

/// Which dimensions form a rotation pair.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RopeMode {
    /// Pairs `(2i, 2i+1)`.
    Interleave,
    /// Pairs `(i, i + rope_dim/2)`.
    Half,
}

/// A rotary embedding: pairing mode and one inverse frequency per pair.
#[derive(Debug, Clone, PartialEq)]
pub struct Rope {
    mode: RopeMode,
    inv_freq: Vec<f64>,
}

impl Rope {
    /// Standard frequencies `base^(-2i/rope_dim)`.
    pub fn new(rope_dim: usize, base: f64, mode: RopeMode) -> Result<Self> {
        if rope_dim == 0 || !rope_dim.is_multiple_of(2) {
            return Err(arg_err(
                "rope",
                "rope_dim",
                format!("must be even and > 0, got {rope_dim}"),
            ));
        }
        if !(base.is_finite() && base > 1.0) {
            return Err(arg_err("rope", "base", format!("must be > 1, got {base}")));
        }
        let inv_freq = (0..rope_dim / 2)
            .map(|i| base.powf(-2.0 * i as f64 / rope_dim as f64))
            .collect();
        Ok(Self { mode, inv_freq })
    }

    /// Caller-given inverse frequencies (one per pair), e.g. YaRN-scaled.
    pub fn with_inv_freq(inv_freq: Vec<f64>, mode: RopeMode) -> Result<Self> {
        if inv_freq.is_empty() || inv_freq.iter().any(|f| !f.is_finite()) {
            return Err(arg_err("rope", "inv_freq", "must be non-empty and finite"));
        }
        Ok(Self { mode, inv_freq })
    }

    /// Rotated dimensions per head.
    pub fn rope_dim(&self) -> usize {
        self.inv_freq.len() * 2
    }

    /// Pairing mode.
    pub fn mode(&self) -> RopeMode {
        self.mode
    }
}

/// Rotates `x[tokens, heads, head_dim]` in place; token `t` is at position `positions[t]`.
pub fn apply_rope(
    x: &mut [f32],
    heads: usize,
    head_dim: usize,
    positions: &[usize],
    rope: &Rope,
) -> Result<()> {
    const OP: &str = "rope";
    let tokens = positions.len();
    check_len(
        OP,
        "x",
        x.len(),
        tokens * heads * head_dim,
        &format!("tokens(positions.len()={tokens}) x heads({heads}) x head_dim({head_dim})"),
    )?;
    let rd = rope.rope_dim();
    if rd > head_dim {
        return Err(shape_err(
            OP,
            format!("rope_dim({rd}) exceeds head_dim({head_dim})"),
        ));
    }
    let off = head_dim - rd;
    let half = rd / 2;
    let mut cs = vec![(0.0f32, 0.0f32); half];
    for (t, &pos) in positions.iter().enumerate() {
        for (c, f) in cs.iter_mut().zip(&rope.inv_freq) {
            let a = pos as f64 * f;
            *c = (a.cos() as f32, a.sin() as f32);
        }
        for h in 0..heads {
            let base = (t * heads + h) * head_dim + off;
            let v = &mut x[base..base + rd];
            for (i, &(c, s)) in cs.iter().enumerate() {
                let (a, b) = match rope.mode {
                    RopeMode::Interleave => (2 * i, 2 * i + 1),
                    RopeMode::Half => (i, i + half),
                };
                let (x0, x1) = (v[a], v[b]);
                v[a] = x0 * c - x1 * s;
                v[b] = x0 * s + x1 * c;
            }
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn matches_f64_rotation_and_leaves_nope_part() {
        let (heads, hd, rd) = (3, 10, 6);
        let positions = [0usize, 5, 4095];
        for mode in [RopeMode::Interleave, RopeMode::Half] {
            let rope = Rope::new(rd, 10000.0, mode).unwrap();
            let x: Vec<f32> = (0..positions.len() * heads * hd)
                .map(|i| (i as f32 * 0.37).sin())
                .collect();
            let mut y = x.clone();
            apply_rope(&mut y, heads, hd, &positions, &rope).unwrap();
            for (t, &p) in positions.iter().enumerate() {
                for h in 0..heads {
                    let b = (t * heads + h) * hd;
                    assert_eq!(&y[b..b + hd - rd], &x[b..b + hd - rd]);
                    for i in 0..rd / 2 {
                        let (ia, ib) = match mode {
                            RopeMode::Interleave => (2 * i, 2 * i + 1),
                            RopeMode::Half => (i, i + rd / 2),
                        };
                        let ang = p as f64 * 10000f64.powf(-2.0 * i as f64 / rd as f64);
                        let (x0, x1) = (
                            f64::from(x[b + hd - rd + ia]),
                            f64::from(x[b + hd - rd + ib]),
                        );
                        let e0 = x0 * ang.cos() - x1 * ang.sin();
                        let e1 = x0 * ang.sin() + x1 * ang.cos();
                        assert!((f64::from(y[b + hd - rd + ia]) - e0).abs() < 1e-6);
                        assert!((f64::from(y[b + hd - rd + ib]) - e1).abs() < 1e-6);
                    }
                }
            }
        }
    }

    #[test]
    fn rejects_bad_arguments() {
        assert!(Rope::new(5, 10000.0, RopeMode::Half).is_err());
        let rope = Rope::new(8, 10000.0, RopeMode::Half).unwrap();
        assert!(apply_rope(&mut [0.0; 12], 1, 4, &[0, 1, 2], &rope).is_err());
        assert!(apply_rope(&mut [0.0; 11], 1, 4, &[0, 1, 2], &rope).is_err());
    }
}
