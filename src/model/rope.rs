//! Rotary embedding setup from the config: plain frequencies from `rope_theta`, or DeepSeek-V3's
//! YaRN `rope_scaling` (frequency interpolation with a linear ramp between `beta_fast` and
//! `beta_slow`, and the `mscale` corrections).
//!
//! Owns the frequency table and the two scalar corrections YaRN implies: the magnitude of the
//! rotated parts (`mscale(factor, mscale) / mscale(factor, mscale_all_dim)`) and the extra
//! softmax scale (`mscale(factor, mscale_all_dim)²`). It must not know attention or caches; the
//! npu [`Rope`] applies the rotation.

use serde::Deserialize;

use super::config::ModelConfig;
use super::error::{Result, config_err};
use crate::npu::{Rope, RopeMode};

fn d32() -> f64 {
    32.0
}
fn d1() -> f64 {
    1.0
}

/// DeepSeek-V3's `rope_scaling` object.
#[derive(Debug, Clone, PartialEq, Deserialize)]
pub struct YarnScaling {
    /// `yarn` (also accepted under `rope_type`).
    #[serde(rename = "type", alias = "rope_type")]
    pub kind: String,
    /// Context extension factor.
    pub factor: f64,
    /// Context length the model was trained with before extension.
    pub original_max_position_embeddings: usize,
    /// Rotations above which dimensions keep their original frequency.
    #[serde(default = "d32")]
    pub beta_fast: f64,
    /// Rotations below which dimensions are fully interpolated.
    #[serde(default = "d1")]
    pub beta_slow: f64,
    /// Magnitude correction of the rotated parts.
    #[serde(default = "d1")]
    pub mscale: f64,
    /// Magnitude correction applied to the softmax scale (0: none).
    #[serde(default)]
    pub mscale_all_dim: f64,
}

fn yarn_mscale(scale: f64, m: f64) -> f64 {
    if scale <= 1.0 {
        1.0
    } else {
        0.1 * m * scale.ln() + 1.0
    }
}

/// The rotary setup of a model.
#[derive(Debug, Clone)]
pub struct RopeSetup {
    /// Rotation (interleaved pairs, as DeepSeek-V3 uses).
    pub rope: Rope,
    /// Multiplier of the rotated q/k parts after rotation (1 without YaRN).
    pub magnitude: f32,
    /// Multiplier of the softmax scale (1 without YaRN).
    pub softmax_factor: f32,
}

/// Parses and checks `rope_scaling` (`None` for null/absent); errors name `rope_scaling.<field>`.
pub fn parse_scaling(c: &ModelConfig) -> Result<Option<YarnScaling>> {
    let Some(v) = c.rope_scaling.as_ref().filter(|v| !v.is_null()) else {
        return Ok(None);
    };
    let y: YarnScaling =
        serde_json::from_value(v.clone()).map_err(|e| config_err("rope_scaling", e.to_string()))?;
    if y.kind != "yarn" {
        return Err(config_err(
            "rope_scaling.type",
            format!("only `yarn` is supported, got `{}`", y.kind),
        ));
    }
    if !(y.factor.is_finite() && y.factor >= 1.0) {
        return Err(config_err("rope_scaling.factor", "must be finite and >= 1"));
    }
    if y.original_max_position_embeddings == 0 {
        return Err(config_err(
            "rope_scaling.original_max_position_embeddings",
            "must be > 0",
        ));
    }
    for (f, v) in [
        ("rope_scaling.beta_fast", y.beta_fast),
        ("rope_scaling.beta_slow", y.beta_slow),
    ] {
        if !(v.is_finite() && v > 0.0) {
            return Err(config_err(f, "must be finite and > 0"));
        }
    }
    for (f, v) in [
        ("rope_scaling.mscale", y.mscale),
        ("rope_scaling.mscale_all_dim", y.mscale_all_dim),
    ] {
        if !v.is_finite() {
            return Err(config_err(f, "must be finite"));
        }
    }
    Ok(Some(y))
}

/// Builds the rotary setup of a validated config.
pub fn rope_setup(c: &ModelConfig) -> Result<RopeSetup> {
    let dim = c.qk_rope_head_dim;
    let base = c.rope_theta;
    let Some(y) = parse_scaling(c)? else {
        return Ok(RopeSetup {
            rope: Rope::new(dim, base, RopeMode::Interleave)?,
            magnitude: 1.0,
            softmax_factor: 1.0,
        });
    };
    let half = dim / 2;
    let corr = |rot: f64| {
        (dim as f64
            * (y.original_max_position_embeddings as f64 / (rot * std::f64::consts::TAU)).ln())
            / (2.0 * base.ln())
    };
    let low = corr(y.beta_fast).floor().max(0.0);
    let mut high = corr(y.beta_slow).ceil().min(dim as f64 - 1.0);
    if high == low {
        high += 0.001;
    }
    let inv_freq = (0..half)
        .map(|i| {
            let extra = 1.0 / base.powf(2.0 * i as f64 / dim as f64);
            let inter = extra / y.factor;
            let ramp = ((i as f64 - low) / (high - low)).clamp(0.0, 1.0);
            let keep = 1.0 - ramp;
            inter * (1.0 - keep) + extra * keep
        })
        .collect();
    let all = if y.mscale_all_dim != 0.0 {
        yarn_mscale(y.factor, y.mscale_all_dim)
    } else {
        1.0
    };
    Ok(RopeSetup {
        rope: Rope::with_inv_freq(inv_freq, RopeMode::Interleave)?,
        magnitude: (yarn_mscale(y.factor, y.mscale) / yarn_mscale(y.factor, y.mscale_all_dim))
            as f32,
        softmax_factor: (all * all) as f32,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::config::Preset;

    #[test]
    fn deepseek_v3_yarn_is_accepted_and_interpolates_low_frequencies() {
        let mut c = Preset::Tiny.config(512);
        c.rope_scaling = Some(serde_json::json!({
            "type": "yarn", "factor": 40, "original_max_position_embeddings": 4096,
            "beta_fast": 32, "beta_slow": 1, "mscale": 1.0, "mscale_all_dim": 1.0
        }));
        c.validate().unwrap();
        let s = rope_setup(&c).unwrap();
        assert_eq!(s.magnitude, 1.0);
        let m = 0.1 * 40f64.ln() + 1.0;
        assert!((f64::from(s.softmax_factor) - m * m).abs() < 1e-6);
        c.rope_scaling = Some(serde_json::json!({"type": "dynamic", "factor": 2.0,
            "original_max_position_embeddings": 4096}));
        let e = c.validate().unwrap_err();
        assert!(e.to_string().contains("rope_scaling.type"), "{e}");
    }
}
