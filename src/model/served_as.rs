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
//! **With `moe` given as well** the shape is a DeepSeek-style mixture of experts: `dense_layers`
//! leading layers as above, the rest with `shared_experts` SwiGLU experts every token passes and
//! `experts_per_token` of `routed_experts` routed ones. The width and the experts' FFN width
//! follow from the parameter counts: the parameters total and active differ only by the routed
//! experts no token takes, so `(total - active) / (moe_layers x (routed - per_token))` is one
//! expert's `3 x hidden x expert_ffn`, and what active leaves after the experts is attention's
//! `4 x hidden^2` per layer (plus `8 x hidden^2` per dense layer). Attention and the shared
//! experts are split over the `n` devices; the routed experts are spread over them (expert
//! parallel). A step of `m` tokens with uniform routing touches `routed x (1 - (1 -
//! per_token/routed)^m)` distinct experts in expectation, and each device runs its share of
//! them in one grouped matmul over its `m x per_token / n` rows: decode reads only the experts
//! its tokens chose, so its cost climbs with the batch until every expert is read each step.
//! Routing imbalance and the all-to-all exchange are not modelled beyond `tp_efficiency`.
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
    /// Mixture-of-experts layout; unset: dense. Needs `layers`.
    #[serde(default)]
    pub moe: Option<ServedMoe>,
}

/// A served shape's mixture-of-experts layout, by DeepSeek-V3's fields.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ServedMoe {
    /// Routed experts per MoE layer (`n_routed_experts`).
    pub routed_experts: u32,
    /// Routed experts each token goes to (`num_experts_per_tok`).
    pub experts_per_token: u32,
    /// Experts every token goes through (`n_shared_experts`).
    #[serde(default)]
    pub shared_experts: u32,
    /// Leading layers with a dense FFN (`first_k_dense_replace`).
    #[serde(default)]
    pub dense_layers: u32,
}

/// What the executed step did, for costing it at the served shape.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct StepShape {
    /// Tokens processed (prefill chunks and decodes).
    pub tokens: usize,
    /// Context length of each sequence after the step.
    pub contexts: Vec<usize>,
}

/// Dimensions standing for a parameter count.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ShapeDims {
    pub layers: usize,
    pub hidden: usize,
    /// FFN width of a dense layer.
    pub ffn: usize,
    pub heads: usize,
    pub moe: Option<MoeDims>,
}

/// The expert part of [`ShapeDims`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct MoeDims {
    pub dense_layers: usize,
    pub routed: usize,
    pub per_token: usize,
    pub shared: usize,
    /// FFN width of one expert.
    pub expert_ffn: usize,
}

/// Rounds to the nearest multiple of 128, at least 128.
fn round_128(x: f64) -> usize {
    ((x / 128.0).round() as usize).max(1) * 128
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
        if self.moe.is_some() {
            self.moe_dims()?;
        }
        Ok(())
    }

    /// The expert dimensions (see the module notes); errors name the field
    /// that makes them impossible.
    fn moe_dims(&self) -> Result<Option<(usize, MoeDims)>> {
        let Some(moe) = self.moe else {
            return Ok(None);
        };
        let layers = self
            .layers
            .ok_or_else(|| config_err("served_as.layers", "required with served_as.moe"))?
            as f64;
        if moe.experts_per_token == 0 || moe.experts_per_token >= moe.routed_experts {
            return Err(config_err(
                "served_as.moe.experts_per_token",
                "must be at least 1 and below routed_experts",
            ));
        }
        if f64::from(moe.dense_layers) >= layers {
            return Err(config_err(
                "served_as.moe.dense_layers",
                "must leave at least one MoE layer",
            ));
        }
        let dense = f64::from(moe.dense_layers);
        let moe_layers = layers - dense;
        let (routed, per_token, shared) = (
            f64::from(moe.routed_experts),
            f64::from(moe.experts_per_token),
            f64::from(moe.shared_experts),
        );
        // One expert's parameters, 3 x hidden x expert_ffn.
        let expert = self.total_params.saturating_sub(self.active_params) as f64
            / (moe_layers * (routed - per_token));
        let attention = self.active_params as f64 - moe_layers * (per_token + shared) * expert;
        if expert <= 0.0 || attention <= 0.0 {
            return Err(config_err(
                "served_as.active_params",
                "leaves no parameters for attention beside the experts it implies; \
                 total_params must exceed it by the routed experts no token takes",
            ));
        }
        let hidden = round_128((attention / (4.0 * (layers + 2.0 * dense))).sqrt());
        Ok(Some((
            hidden,
            MoeDims {
                dense_layers: moe.dense_layers as usize,
                routed: moe.routed_experts as usize,
                per_token: moe.experts_per_token as usize,
                shared: moe.shared_experts as usize,
                expert_ffn: round_128(expert / (3.0 * hidden as f64)),
            },
        )))
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

    /// The dimensions of this shape, when `layers` is given (and the MoE
    /// layout, if any, is possible).
    pub fn dims(&self) -> Option<ShapeDims> {
        let layers = self.layers? as usize;
        let (hidden, moe) = match self.moe_dims().ok()? {
            Some((hidden, moe)) => (hidden, Some(moe)),
            None => {
                let per_layer = self.active_params as f64 / (12.0 * layers.max(1) as f64);
                (round_128(per_layer.sqrt()), None)
            }
        };
        Some(ShapeDims {
            layers,
            hidden,
            ffn: 4 * hidden,
            heads: hidden / HEAD_DIM,
            moe,
        })
    }

    /// Device time (µs) and energy (J, all devices) of one step of `step`'s
    /// size at this shape on `device`'s profile; `None` without `layers`.
    pub fn served_step_cost(&self, device: &Device, step: &StepShape) -> Option<(f64, f64)> {
        let dims = self.dims()?;
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
        let sum = |parts: &[(f64, f64)]| {
            parts
                .iter()
                .fold((0.0, 0.0), |(t, e), (dt, de)| (t + dt, e + de))
        };
        let attention_part = sum(&[
            linear(m, 3 * h / n, h),
            linear(m, h, h / n),
            (attention.device_us, attention.energy_j),
        ]);
        let dense_ffn = sum(&[linear(m, dims.ffn / n, h), linear(m, h, dims.ffn / n)]);
        let (dense_layers, moe_layers, moe_ffn) = match dims.moe {
            None => (dims.layers, 0, (0.0, 0.0)),
            Some(moe) => (
                moe.dense_layers,
                dims.layers - moe.dense_layers,
                moe_ffn_cost(device, &moe, m, h, n),
            ),
        };
        let layers = |count: usize, ffn: (f64, f64)| {
            (
                count as f64 * (attention_part.0 + ffn.0),
                count as f64 * (attention_part.1 + ffn.1),
            )
        };
        let head = linear(contexts.len(), SERVED_VOCAB / n, h);
        let all = sum(&[
            layers(dense_layers, dense_ffn),
            layers(moe_layers, moe_ffn),
            head,
        ]);
        let tp = self.tp_efficiency.clamp(f64::MIN_POSITIVE, 1.0);
        Some((all.0 / tp, all.1 * n as f64 / tp))
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

/// Distinct experts `tokens` tokens touch in expectation when each picks
/// `per_token` of `routed` uniformly.
pub fn expected_experts_touched(routed: usize, per_token: usize, tokens: usize) -> f64 {
    let miss = 1.0 - per_token as f64 / routed.max(1) as f64;
    routed as f64 * (1.0 - miss.powi(i32::try_from(tokens).unwrap_or(i32::MAX)))
}

/// One device's MoE FFN for a step of `m` tokens: the router, its slice of
/// the shared experts, and one grouped matmul pair over the routed experts
/// its rows landed on (see the module notes).
fn moe_ffn_cost(device: &Device, moe: &MoeDims, m: usize, h: usize, n: usize) -> (f64, f64) {
    let bf16 = WeightFormat::Bf16;
    let shape = |rows: usize, out: usize, inp: usize| {
        device.linear_shape_workload(
            rows,
            out,
            inp,
            bf16,
            (out * inp * bf16.bytes_per_element()) as u64,
        )
    };
    let cost = |w: Option<crate::npu::Workload>| {
        w.map_or((0.0, 0.0), |w| {
            let c = device.estimate(&w);
            (c.device_us, c.energy_j)
        })
    };
    let f = moe.expert_ffn;
    let router = cost(Some(shape(m, moe.routed, h)));
    let shared_width = moe.shared * f / n;
    let shared = if shared_width == 0 {
        (0.0, 0.0)
    } else {
        let up = cost(Some(shape(m, 2 * shared_width, h)));
        let down = cost(Some(shape(m, h, shared_width)));
        (up.0 + down.0, up.1 + down.1)
    };
    // This device's rows and the experts they land on.
    let rows = (m * moe.per_token).div_ceil(n);
    let on_device = moe.routed.div_ceil(n);
    let touched =
        (expected_experts_touched(moe.routed, moe.per_token, m) / n as f64).round() as usize;
    let touched = touched.clamp(1, on_device.min(rows));
    let group_rows: Vec<usize> = (0..touched)
        .map(|i| rows / touched + usize::from(i < rows % touched))
        .collect();
    let grouped = |out: usize, inp: usize| {
        cost(device.grouped_workload(group_rows.iter().map(|&r| shape(r, out, inp))))
    };
    let (up, down) = (grouped(2 * f, h), grouped(h, f));
    (
        router.0 + shared.0 + up.0 + down.0,
        router.1 + shared.1 + up.1 + down.1,
    )
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
            moe: None,
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
            moe: None,
        };
        let dims = shape.dims().unwrap();
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

    fn moe_175b() -> ServedAs {
        ServedAs {
            name: "moe".into(),
            total_params: 175_000_000_000,
            active_params: 10_000_000_000,
            devices: 8,
            tp_efficiency: 1.0,
            layers: Some(61),
            moe: Some(ServedMoe {
                routed_experts: 256,
                experts_per_token: 8,
                shared_experts: 1,
                dense_layers: 3,
            }),
        }
    }

    #[test]
    fn moe_dimensions_give_back_the_declared_parameter_counts() {
        let shape = moe_175b();
        shape.validate().unwrap();
        let dims = shape.dims().unwrap();
        let moe = dims.moe.unwrap();
        assert_eq!((dims.hidden, moe.expert_ffn), (3840, 1024));
        // Recount from the rounded dimensions: within the rounding.
        let (h, f) = (dims.hidden as f64, moe.expert_ffn as f64);
        let (l, d) = (61.0, 3.0);
        let expert = 3.0 * h * f;
        let base = l * 4.0 * h * h + d * 8.0 * h * h;
        let total = base + (l - d) * 257.0 * expert;
        let active = base + (l - d) * 9.0 * expert;
        assert!((total / 175e9 - 1.0).abs() < 0.05, "total {total}");
        assert!((active / 10e9 - 1.0).abs() < 0.1, "active {active}");
    }

    #[test]
    fn expected_experts_touched_on_known_inputs() {
        assert!((expected_experts_touched(256, 8, 1) - 8.0).abs() < 1e-9);
        assert!((expected_experts_touched(256, 8, 2) - (16.0 - 64.0 / 256.0)).abs() < 1e-9);
        assert!((expected_experts_touched(256, 8, 100_000) - 256.0).abs() < 1e-6);
        assert_eq!(expected_experts_touched(256, 8, 0), 0.0);
    }

    #[test]
    fn moe_decode_reads_the_chosen_experts_so_it_grows_with_the_batch() {
        let device = Device::new(DeviceProfile::builtin("ascend-910b").unwrap()).unwrap();
        let decode = |shape: &ServedAs, batch: usize| {
            let step = StepShape {
                tokens: batch,
                contexts: vec![512; batch],
            };
            shape.served_step_cost(&device, &step).unwrap().0
        };
        let moe = moe_175b();
        let dense = ServedAs {
            active_params: 175_000_000_000,
            layers: Some(96),
            moe: None,
            ..moe.clone()
        };
        // A dense decode step reads the same weights whatever the batch.
        assert!(decode(&dense, 32) < 1.3 * decode(&dense, 1));
        // An MoE step reads about 8 experts per layer at batch 1 and about
        // 163 at batch 32: several times the bytes.
        assert!(
            decode(&moe, 32) > 3.0 * decode(&moe, 1),
            "{} vs {}",
            decode(&moe, 32),
            decode(&moe, 1)
        );
        assert!(decode(&moe, 8) < decode(&dense, 8) / 2.0);
        // Bandwidth floor at batch 1: each device reads its 1/8 of the
        // attention and shared expert, and its one routed expert.
        let dims = moe.dims().unwrap();
        let (h, f) = (dims.hidden as f64, dims.moe.unwrap().expert_ffn as f64);
        let per_layer = (4.0 * h * h + 3.0 * h * f) / 8.0 + 3.0 * h * f;
        let floor_us = 58.0 * per_layer * 2.0 / 1600e9 * 1e6;
        assert!(
            decode(&moe, 1) > floor_us,
            "{} vs {floor_us}",
            decode(&moe, 1)
        );
    }

    #[test]
    fn impossible_moe_layouts_are_refused_naming_the_field() {
        let named = |shape: ServedAs, field: &str| {
            let e = shape.validate().unwrap_err().to_string();
            assert!(e.contains(field), "{e}");
        };
        named(
            ServedAs {
                layers: None,
                ..moe_175b()
            },
            "served_as.layers",
        );
        let mut too_many = moe_175b();
        too_many.moe.as_mut().unwrap().experts_per_token = 256;
        named(too_many, "served_as.moe.experts_per_token");
        let mut all_dense = moe_175b();
        all_dense.moe.as_mut().unwrap().dense_layers = 61;
        named(all_dense, "served_as.moe.dense_layers");
        named(
            // 1B active cannot hold the 9 of 257 experts that 174B of
            // routed experts implies.
            ServedAs {
                active_params: 1_000_000_000,
                ..moe_175b()
            },
            "served_as.active_params",
        );
    }
}
