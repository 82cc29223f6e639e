//! "Served-as" shape: a model entry runs a small executable model but declares the full-size
//! shape it stands for (e.g. a 175B-parameter MoE on 8 tensor-parallel devices), and the step
//! costs are scaled to that shape.
//!
//! Owns the scaling rule. It must not know kernels, the forward pass or who consumes the
//! numbers (pacing, metering).
//!
//! # Scaling rule
//!
//! Per token, both the flops and the weight bytes of a transformer grow with its *active*
//! parameters (for MoE: attention + shared experts + `num_experts_per_tok` routed experts +
//! embeddings). With `r = active_served / active_executed`, `n` devices in tensor parallel and
//! a parallel efficiency `e` in (0, 1] (communication and imbalance):
//!
//! - device time: `t_served = t_executed x r / (n x e)`: each device does `1/n` of the work,
//!   slowed by `1/e`;
//! - energy: `E_served = E_executed x r / e`: the same total work summed over the `n` devices,
//!   and the `n` devices' idle power over `t_served` is the executed idle energy times `r / e`.
//!
//! **With `layers` given** the served shape is costed directly instead, step by step, by the
//! device's own cost model: a dense transformer with `active_params` in `layers` layers
//! (`12 x layers x hidden^2` parameters, hidden rounded to a multiple of 128, FFN 4 x hidden,
//! 128-dimensional heads, a 129,280-token vocabulary), each layer's weights split over the `n`
//! devices (tensor parallel), running the executed step's token count with its sequences'
//! context lengths: per device and layer the QKV, output, FFN-up and FFN-down matmuls and paged
//! attention over the KV cache, then the LM head for the sequences that produce a token; time
//! divided by `e` for the all-reduces the model leaves out, energy over all `n` devices. That
//! is what makes decode bandwidth-bound at the real shape, as it is on the hardware. The rule
//! below is the fallback when `layers` is not given.
//!
//! Kernel launch overheads are the exception: they do not grow with the width of a layer, only
//! with the number of layers. The executed step's launch part (`launches x
//! launch.overhead_us` of the profile, at idle power) is scaled by `layers_served /
//! layers_executed` instead (1 when `layers` is not given), on each of the `n` devices at
//! once; the rest, the work, by the factors above. Without this split a tiny executed model,
//! whose decode step is mostly launch overhead, would charge the served shape thousands of
//! times its real launch cost. Attention over the KV cache scales with the work: a first-order
//! model, as attention is small next to the matmuls at the context lengths served here. Each
//! sequence's share is scaled by the step's overall ratios, so shares still sum to the step
//! totals.

use serde::{Deserialize, Serialize};

use super::config::ModelConfig;
use super::error::{Result, config_err};
use super::ops::decode_workload;
use super::transformer::StepOutput;
use crate::npu::DeviceProfile;
use crate::npu::{AttnShape, Device, WeightFormat};

/// The shape a served model stands for.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ServedAs {
    /// Display name, e.g. `deepseek-v4-175b`.
    pub name: String,
    /// Total parameters (weights resident in HBM across the devices).
    pub total_params: u64,
    /// Parameters active per token.
    pub active_params: u64,
    /// Devices in tensor parallel.
    pub devices: u32,
    /// Parallel efficiency in (0, 1].
    pub tp_efficiency: f64,
    /// Transformer layers of the served shape. Given: each step is costed
    /// at the served shape by the cost model; unset: the executed step is
    /// scaled (see the module notes).
    #[serde(default)]
    pub layers: Option<u32>,
}

/// What the executed step did, for costing it at the served shape.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct StepShape {
    /// Tokens processed (prefill chunks and decodes).
    pub tokens: usize,
    /// Context length of each sequence after the step.
    pub contexts: Vec<usize>,
}

/// Dense dimensions standing for a parameter count.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct DenseDims {
    pub layers: usize,
    pub hidden: usize,
    pub ffn: usize,
    pub heads: usize,
}

const HEAD_DIM: usize = 128;
const SERVED_VOCAB: usize = 129_280;

/// Multipliers of [`ServedAs::factors`].
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct ScaleFactors {
    /// Device-time multiplier.
    pub time: f64,
    /// Energy multiplier.
    pub energy: f64,
}

impl ServedAs {
    /// Checks the fields; errors name them (prefixed `served_as.`).
    pub fn validate(&self) -> Result<()> {
        if self.active_params == 0 || self.active_params > self.total_params {
            return Err(config_err(
                "served_as.active_params",
                "must be > 0 and <= total_params",
            ));
        }
        if self.devices == 0 {
            return Err(config_err("served_as.devices", "must be > 0"));
        }
        if !(self.tp_efficiency > 0.0 && self.tp_efficiency <= 1.0) {
            return Err(config_err("served_as.tp_efficiency", "must be in (0, 1]"));
        }
        Ok(())
    }

    /// Whether the weights (`bytes_per_param` each) fit in the devices' HBM.
    pub fn fits(&self, profile: &DeviceProfile, bytes_per_param: f64) -> bool {
        let need = self.total_params as f64 * bytes_per_param / f64::from(self.devices);
        need <= profile.memory.hbm_gib * (1u64 << 30) as f64
    }

    /// Multipliers relative to the executed model.
    pub fn factors(&self, executed: &ModelConfig) -> ScaleFactors {
        let r = self.active_params as f64 / executed.active_param_count().max(1) as f64;
        ScaleFactors {
            time: r / (f64::from(self.devices) * self.tp_efficiency),
            energy: r / self.tp_efficiency,
        }
    }

    /// The dense dimensions of this shape, when `layers` is given.
    pub fn dense_dims(&self) -> Option<DenseDims> {
        let layers = self.layers? as usize;
        let per_layer = self.active_params as f64 / (12.0 * layers.max(1) as f64);
        let hidden = ((per_layer.sqrt() / HEAD_DIM as f64).round() as usize).max(1) * HEAD_DIM;
        Some(DenseDims {
            layers,
            hidden,
            ffn: 4 * hidden,
            heads: hidden / HEAD_DIM,
        })
    }

    /// Device time (µs) and energy (J, all devices) of one step of `step`'s
    /// size at this shape on `device`'s profile; `None` without `layers`.
    pub fn served_step_cost(&self, device: &Device, step: &StepShape) -> Option<(f64, f64)> {
        let dims = self.dense_dims()?;
        let n = self.devices.max(1) as usize;
        let (m, h) = (step.tokens.max(1), dims.hidden);
        let bf16 = WeightFormat::Bf16;
        let linear = |rows: usize, out: usize, inp: usize| {
            let cost = device.estimate(&device.linear_shape_workload(
                rows,
                out,
                inp,
                bf16,
                (out * inp * bf16.bytes_per_element()) as u64,
            ));
            (cost.device_us, cost.energy_j)
        };
        let heads = (dims.heads / n).max(1);
        let shape = AttnShape {
            num_q_heads: heads,
            num_kv_heads: heads,
            qk_dim: HEAD_DIM,
            v_dim: HEAD_DIM,
        };
        let contexts: Vec<usize> = if step.contexts.is_empty() {
            vec![1]
        } else {
            step.contexts.clone()
        };
        let kv_bytes_per_token = 2 * heads * HEAD_DIM * 2;
        let attention = device.estimate(&decode_workload(
            device,
            shape,
            &contexts,
            kv_bytes_per_token,
        ));
        let layer = [
            linear(m, 3 * h / n, h),
            linear(m, h, h / n),
            linear(m, dims.ffn / n, h),
            linear(m, h, dims.ffn / n),
            (attention.device_us, attention.energy_j),
        ]
        .iter()
        .fold((0.0, 0.0), |(t, e), (dt, de)| (t + dt, e + de));
        let head = linear(contexts.len(), SERVED_VOCAB / n, h);
        let tp = self.tp_efficiency.clamp(f64::MIN_POSITIVE, 1.0);
        let time = (layer.0 * dims.layers as f64 + head.0) / tp;
        let energy = (layer.1 * dims.layers as f64 + head.1) * n as f64 / tp;
        Some((time, energy))
    }

    /// A step's costs as the served shape would incur them on `device`
    /// (logits untouched): costed at the served shape when `layers` is
    /// given, else scaled from the executed step.
    pub fn scale_step(
        &self,
        executed: &ModelConfig,
        device: &Device,
        shape: &StepShape,
        step: &mut StepOutput,
    ) {
        match self.served_step_cost(device, shape) {
            Some((device_us, energy_j)) => set_step_totals(step, device_us, energy_j),
            None => self.scale(executed, device.profile(), step),
        }
    }

    /// A step's costs as the served shape would incur them on `profile`
    /// (logits untouched).
    pub fn scale(&self, executed: &ModelConfig, profile: &DeviceProfile, step: &mut StepOutput) {
        let f = self.factors(executed);
        let layer_ratio = self.layers.map_or(1.0, |l| {
            f64::from(l) / executed.num_hidden_layers.max(1) as f64
        });
        let launch_us = (step.launches as f64 * profile.launch.overhead_us).min(step.device_us);
        let launch_j = (profile.power.idle_watts * launch_us * 1e-6).min(step.energy_j);
        let device_us = launch_us * layer_ratio + (step.device_us - launch_us).max(0.0) * f.time;
        let energy_j = launch_j * layer_ratio * f64::from(self.devices)
            + (step.energy_j - launch_j).max(0.0) * f.energy;
        set_step_totals(step, device_us, energy_j);
    }
}

/// Gives `step` new totals, scaling each sequence's share by the same
/// ratios so the shares still sum to the totals.
fn set_step_totals(step: &mut StepOutput, device_us: f64, energy_j: f64) {
    let ratio = |new: f64, old: f64| if old > 0.0 { new / old } else { 0.0 };
    let (time_ratio, energy_ratio) = (
        ratio(device_us, step.device_us),
        ratio(energy_j, step.energy_j),
    );
    step.device_us = device_us;
    step.energy_j = energy_j;
    for s in &mut step.per_seq {
        s.device_us *= time_ratio;
        s.energy_j *= energy_ratio;
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::config::Preset;
    use crate::model::transformer::SeqCost;

    #[test]
    fn scaling_follows_the_documented_rule() {
        let c = Preset::Small.config(4096);
        let s = ServedAs {
            name: "deepseek-v4-175b".into(),
            total_params: 175_000_000_000,
            active_params: 22_000_000_000,
            devices: 8,
            tp_efficiency: 0.8,
            layers: None,
        };
        s.validate().unwrap();
        let r = 22e9 / c.active_param_count() as f64;
        let f = s.factors(&c);
        assert!((f.time - r / 6.4).abs() < 1e-9 * f.time);
        assert!((f.energy - r / 0.8).abs() < 1e-9 * f.energy);
        let mut step = StepOutput {
            logits: vec![],
            device_us: 100.0,
            energy_j: 2.0,
            cpu_us: 1.0,
            launches: 1,
            per_seq: vec![
                SeqCost {
                    seq: 1,
                    tokens: 3,
                    device_us: 75.0,
                    energy_j: 1.5,
                },
                SeqCost {
                    seq: 2,
                    tokens: 1,
                    device_us: 25.0,
                    energy_j: 0.5,
                },
            ],
        };
        let profile = DeviceProfile::builtin("ascend-910b").unwrap();
        let executed = step.clone();
        s.scale(&c, &profile, &mut step);
        let sum: f64 = step.per_seq.iter().map(|x| x.device_us).sum();
        assert!((sum - step.device_us).abs() < 1e-6 * sum);
        // One launch of 3 us stays one launch (same layer count); the
        // other 97 us is work and scales by the time factor.
        let launch = profile.launch.overhead_us;
        let expected = launch + (100.0 - launch) * f.time;
        assert!((step.device_us - expected).abs() < 1e-9 * expected);
        // With 60 layers served for the executed 6, launches count 10x.
        let deeper = ServedAs {
            layers: Some(60),
            ..s.clone()
        };
        let mut deep_step = executed;
        deeper.scale(&c, &profile, &mut deep_step);
        let expected = 10.0 * launch + (100.0 - launch) * f.time;
        assert!((deep_step.device_us - expected).abs() < 1e-9 * expected);
        let energy: f64 = deep_step.per_seq.iter().map(|x| x.energy_j).sum();
        assert!((energy - deep_step.energy_j).abs() < 1e-9 * energy);
        assert!(s.fits(&DeviceProfile::builtin("ascend-910b").unwrap(), 2.0));
        let bad = ServedAs { devices: 0, ..s };
        assert!(
            bad.validate()
                .unwrap_err()
                .to_string()
                .contains("served_as.devices")
        );
    }

    #[test]
    fn the_launch_shape_is_costed_bandwidth_bound_at_decode() {
        let shape = ServedAs {
            name: "deepseek-v4-175b".into(),
            total_params: 175_000_000_000,
            active_params: 175_000_000_000,
            devices: 8,
            tp_efficiency: 1.0,
            layers: Some(96),
        };
        let dims = shape.dense_dims().unwrap();
        assert_eq!((dims.hidden, dims.heads), (12288, 96), "GPT-3's width");
        let decode = StepShape {
            tokens: 8,
            contexts: vec![512; 8],
        };
        let cost = |name: &str| {
            let device = Device::new(DeviceProfile::builtin(name).unwrap()).unwrap();
            shape.served_step_cost(&device, &decode).unwrap()
        };
        let (b, h) = (cost("ascend-910b"), cost("h100-sxm"));
        // Each device reads its 1/8 of 174 G bf16 weights once per step.
        let bytes = 12.0 * 96.0 * 12288f64.powi(2) * 2.0 / 8.0;
        let floor_b = bytes / 1600e9 * 1e6;
        assert!(b.0 > floor_b && b.0 < 1.5 * floor_b, "{} vs {floor_b}", b.0);
        let ratio = h.0 / b.0;
        assert!(
            (ratio - 1600.0 / 3350.0).abs() < 0.1,
            "the throughput ratio follows HBM bandwidth: {ratio}"
        );
        assert!(b.1 > 0.0 && h.1 > 0.0);
        let none = ServedAs {
            layers: None,
            ..shape
        };
        assert!(
            none.served_step_cost(
                &Device::new(DeviceProfile::builtin("h100-sxm").unwrap()).unwrap(),
                &decode
            )
            .is_none()
        );
    }
}
