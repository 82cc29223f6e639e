//! `bench report`: the Ascend-against-H100 comparison anyone can rerun. One
//! workload (fixed output lengths, closed loop at batch 8 and 32) runs on
//! the `ascend-910b`, `ascend-910c` and `h100-sxm` profiles with
//! `pace = "device"` and the launch material's served-as shape (175B
//! parameters on 8 devices). Throughput, power and energy are computed from
//! the emulated device time and energy charged to the requests (what the
//! cost model says the hardware would do), not from this machine's wall
//! clock, which only follows the device when the CPU outruns it. Cost per
//! million tokens follows from stated assumptions. Printed next to the
//! launch material's figures, with a sentence per difference derived from
//! the profiles.
//!
//! Knows the runs, the arithmetic and the claims; serving and the cost
//! model are other modules'.

use serde::{Deserialize, Serialize};

use super::report::round;
use super::selfhost::{SelfHosted, connect};
use super::suite::{git_revision, machine};
use super::{
    Arrival, BenchError, LengthDistribution, ReportArgs, RunReport, Target, WorkloadSpec,
    equal_tenants, measured_run, write_results,
};
use crate::model::served_as::{ServedAs, ServedMoe, expected_experts_touched};
use crate::npu::DeviceProfile;
use crate::serving::{ModelSettings, Pace};

pub const DEVICES: [&str; 3] = ["ascend-910b", "ascend-910c", "h100-sxm"];

/// The launch material's figures (910B against H100).
pub mod claims {
    pub const THROUGHPUT_RATIO_BATCH_8: f64 = 0.68;
    pub const POWER_RATIO: f64 = 0.55;
    pub const STEP_MS_BATCH_32_910B: f64 = 9.8;
    pub const STEP_MS_BATCH_32_H100: f64 = 8.6;
    pub const USD_PER_MTOK_910B: f64 = 0.08;
    pub const USD_PER_MTOK_H100: f64 = 0.14;
}

/// How the launch material's "175B" is read: it names no architecture
/// beyond the parameter count.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum LaunchReading {
    /// A DeepSeek-style mixture of experts, as the product serves.
    Moe,
    /// A dense transformer of GPT-3's depth: every weight read every step.
    Dense,
}

/// The served-as shape of the launch material, in one reading.
pub fn launch_shape(reading: LaunchReading) -> ServedAs {
    let dense = ServedAs {
        name: "deepseek-v4-175b".to_owned(),
        total_params: 175_000_000_000,
        active_params: 175_000_000_000,
        devices: 8,
        tp_efficiency: 0.9,
        layers: Some(96),
        moe: None,
    };
    match reading {
        LaunchReading::Dense => dense,
        // DeepSeek-V3's layout (61 layers, the first 3 dense, 256 routed
        // experts with 8 per token and 1 shared) at 175B in all, with V3's
        // ratio of active to total parameters (37/671, about 5.5%).
        LaunchReading::Moe => ServedAs {
            active_params: 10_000_000_000,
            layers: Some(61),
            moe: Some(ServedMoe {
                routed_experts: 256,
                experts_per_token: 8,
                shared_experts: 1,
                dense_layers: 3,
            }),
            ..dense
        },
    }
}

/// One line on the shape, for the report.
pub fn describe_shape(shape: &ServedAs) -> String {
    let b = |p: u64| format!("{:.0} B", p as f64 / 1e9);
    let Some(dims) = shape.dims() else {
        return format!("{} parameters", b(shape.total_params));
    };
    match dims.moe {
        None => format!(
            "dense, {} parameters, {} layers, hidden {}",
            b(shape.total_params),
            dims.layers,
            dims.hidden
        ),
        Some(moe) => format!(
            "mixture of experts, {} parameters of which {} active per token, {} layers (the \
             first {} dense), {} routed experts with {} per token and {} shared; derived: \
             hidden {}, expert FFN {}",
            b(shape.total_params),
            b(shape.active_params),
            dims.layers,
            moe.dense_layers,
            moe.routed,
            moe.per_token,
            moe.shared,
            dims.hidden,
            moe.expert_ffn
        ),
    }
}

/// What a decode step of `shape` at `batch` reads from HBM, in words.
fn step_reads(shape: &ServedAs, batch: usize) -> String {
    match shape.dims().and_then(|d| d.moe) {
        None => "every weight of its shard".to_owned(),
        Some(moe) => format!(
            "attention's and the shared experts' weights and those of the routed experts its \
             tokens chose (about {:.0} of {} per MoE layer at batch {batch})",
            expected_experts_touched(moe.routed, moe.per_token, batch),
            moe.routed
        ),
    }
}

/// One device at one batch size.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct DevicePoint {
    pub device: String,
    pub batch: usize,
    pub output_tokens: u64,
    /// Output tokens per second of emulated device time of the whole
    /// tensor-parallel group (its devices work in lockstep).
    pub tokens_per_device_s: f64,
    /// Emulated time of one batched step.
    pub step_ms: f64,
    /// Mean emulated power of one device.
    pub watts_per_device: f64,
    pub joules_per_output_token: f64,
    pub usd_per_million_tokens: f64,
    pub run: RunReport,
}

/// The assumptions of the cost column.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct CostAssumptions {
    pub electricity_usd_per_kwh: f64,
    pub amortisation_years: f64,
    pub utilisation: f64,
    /// Purchase price per device, USD, in `DEVICES` order.
    pub device_price_usd: [f64; 3],
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct DeviceReport {
    pub command: String,
    pub git_revision: String,
    pub machine: String,
    pub served_as: ServedAs,
    pub assumptions: CostAssumptions,
    pub points: Vec<DevicePoint>,
    /// 910B over H100, with the launch claim beside each.
    pub comparisons: Vec<Comparison>,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Comparison {
    pub what: String,
    pub measured: String,
    pub claimed: String,
    pub why: String,
}

/// USD per million output tokens: the devices' amortised price and their
/// electricity over the tokens they produce, at the assumed utilisation.
pub fn usd_per_million_tokens(
    tokens_per_s: f64,
    devices: u32,
    watts_per_device: f64,
    price_usd: f64,
    a: &CostAssumptions,
) -> f64 {
    let hours = a.amortisation_years * 365.0 * 24.0;
    let per_hour = f64::from(devices)
        * (price_usd / hours + watts_per_device / 1000.0 * a.electricity_usd_per_kwh);
    let tokens_per_hour = tokens_per_s * 3600.0 * a.utilisation;
    if tokens_per_hour <= 0.0 {
        return 0.0;
    }
    per_hour / tokens_per_hour * 1e6
}

fn point(
    device: &str,
    batch: usize,
    run: RunReport,
    shape: &ServedAs,
    price: f64,
    a: &CostAssumptions,
) -> DevicePoint {
    let device_s = run.device_time_us as f64 / 1e6;
    // Each request is charged its share of every step it was in, so the
    // shares add up to the steps' device time.
    let tokens_per_device_s = if device_s > 0.0 {
        run.output_tokens as f64 / device_s
    } else {
        0.0
    };
    // mJ per µs is kW; the energy covers all the shape's devices.
    let watts_all = if run.device_time_us > 0 {
        run.energy_mj as f64 / run.device_time_us as f64 * 1000.0
    } else {
        0.0
    };
    let watts_per_device = watts_all / f64::from(shape.devices);
    let steps = run.mean_batch_sequences.unwrap_or(0.0);
    let step_ms = if steps > 0.0 && tokens_per_device_s > 0.0 {
        // A decode step yields one token per sequence in it.
        steps / tokens_per_device_s * 1000.0
    } else {
        0.0
    };
    DevicePoint {
        device: device.to_owned(),
        batch,
        output_tokens: run.output_tokens,
        tokens_per_device_s: round(tokens_per_device_s, 1),
        step_ms: round(step_ms, 3),
        watts_per_device: round(watts_per_device, 1),
        joules_per_output_token: round(
            run.energy_mj as f64 / 1000.0 / run.output_tokens.max(1) as f64,
            4,
        ),
        usd_per_million_tokens: round(
            usd_per_million_tokens(
                tokens_per_device_s,
                shape.devices,
                watts_per_device,
                price,
                a,
            ),
            4,
        ),
        run,
    }
}

fn find<'a>(points: &'a [DevicePoint], device: &str, batch: usize) -> Option<&'a DevicePoint> {
    points
        .iter()
        .find(|p| p.device == device && p.batch == batch)
}

/// The 910B-over-H100 comparisons, each explained from the profiles.
pub fn compare(points: &[DevicePoint], shape: &ServedAs) -> Result<Vec<Comparison>, BenchError> {
    let profile =
        |name: &str| DeviceProfile::builtin(name).map_err(|e| BenchError::Gateway(e.to_string()));
    let (b, h) = (profile("ascend-910b")?, profile("h100-sxm")?);
    let bandwidth = b.memory.hbm_gbps / h.memory.hbm_gbps;
    let compute = b.compute.fp16_tflops / h.compute.fp16_tflops;
    let missing = || BenchError::Gateway("a device run is missing".to_owned());
    let b8 = find(points, "ascend-910b", 8).ok_or_else(missing)?;
    let h8 = find(points, "h100-sxm", 8).ok_or_else(missing)?;
    let b32 = find(points, "ascend-910b", 32).ok_or_else(missing)?;
    let h32 = find(points, "h100-sxm", 32).ok_or_else(missing)?;
    let throughput = b8.tokens_per_device_s / h8.tokens_per_device_s.max(f64::MIN_POSITIVE);
    // Step times that are a bandwidth part plus a part alike on both
    // devices: t = bytes / bandwidth + fixed, solved from the two.
    let fixed_ms = {
        let h_bytes_ms = (b8.step_ms - h8.step_ms) / (1.0 / bandwidth - 1.0);
        h8.step_ms - h_bytes_ms
    };
    let bound = if (throughput - bandwidth).abs() > 0.05
        && (throughput - bandwidth).abs() <= (throughput - compute).abs()
        && fixed_ms > 0.0
    {
        format!(
            "a decode step at batch 8 reads {} once, so HBM bandwidth alone would give {:.0}% \
             ({:.1} against {:.1} TB/s); the two step times fit that plus about {:.1} ms alike on \
             both devices ({:.0}% of the 910B's step: kernel launches and the fixed latency of many \
             small per-expert matmuls), which pulls the ratio up toward 100%",
            step_reads(shape, 8),
            bandwidth * 100.0,
            b.memory.hbm_gbps / 1000.0,
            h.memory.hbm_gbps / 1000.0,
            fixed_ms,
            fixed_ms / b8.step_ms.max(f64::MIN_POSITIVE) * 100.0
        )
    } else if (throughput - bandwidth).abs() <= (throughput - compute).abs() {
        format!(
            "a decode step at batch 8 reads {} once, so it is bound by HBM bandwidth: \
             {:.1} against {:.1} TB/s is {:.0}%; peak fp16 compute ({:.0}%) would matter only for \
             large batches or long prefills",
            step_reads(shape, 8),
            b.memory.hbm_gbps / 1000.0,
            h.memory.hbm_gbps / 1000.0,
            bandwidth * 100.0,
            compute * 100.0
        )
    } else {
        format!(
            "the step is bound by compute here: peak fp16 {:.0} against {:.0} TFLOP/s is {:.0}% \
             (HBM bandwidth would give {:.0}%)",
            b.compute.fp16_tflops,
            h.compute.fp16_tflops,
            compute * 100.0,
            bandwidth * 100.0
        )
    };
    let power = b8.watts_per_device / h8.watts_per_device.max(f64::MIN_POSITIVE);
    let cost_b = b8.usd_per_million_tokens;
    let cost_h = h8.usd_per_million_tokens;
    Ok(vec![
        Comparison {
            what: "910B throughput / H100, batch 8".to_owned(),
            measured: format!("{:.0}%", throughput * 100.0),
            claimed: format!("{:.0}%", claims::THROUGHPUT_RATIO_BATCH_8 * 100.0),
            why: bound,
        },
        Comparison {
            what: "910B power / H100, batch 8".to_owned(),
            measured: format!(
                "{:.0}% ({:.0} W vs {:.0} W per device)",
                power * 100.0,
                b8.watts_per_device,
                h8.watts_per_device
            ),
            claimed: format!("{:.0}%", claims::POWER_RATIO * 100.0),
            why: format!(
                "mean power is idle power plus each pipe's share of the dynamic budget while it \
                 runs; rated {:.0} W against {:.0} W bounds the ratio at {:.0}%, and a \
                 bandwidth-bound step keeps both far below rated",
                b.power.tdp_watts,
                h.power.tdp_watts,
                b.power.tdp_watts / h.power.tdp_watts * 100.0
            ),
        },
        Comparison {
            what: "step time at batch 32, 910B vs H100".to_owned(),
            measured: format!("{:.1} ms vs {:.1} ms", b32.step_ms, h32.step_ms),
            claimed: format!(
                "{} ms vs {} ms",
                claims::STEP_MS_BATCH_32_910B,
                claims::STEP_MS_BATCH_32_H100
            ),
            why: format!(
                "a step at batch 32 on {} devices reads {} through HBM once, so its time \
                 follows the inverse of bandwidth ({:.0}% here), plus launch and fixed kernel \
                 costs alike on both devices; a ratio as close as the claim's ({:.0}%) needs \
                 the 910B's bandwidth within 15% of the H100's",
                shape.devices,
                step_reads(shape, 32),
                bandwidth * 100.0,
                claims::STEP_MS_BATCH_32_H100 / claims::STEP_MS_BATCH_32_910B * 100.0
            ),
        },
        Comparison {
            what: "USD per million output tokens, batch 8, 910B vs H100".to_owned(),
            measured: format!("{cost_b:.3} vs {cost_h:.3}"),
            claimed: format!(
                "{} vs {}",
                claims::USD_PER_MTOK_910B,
                claims::USD_PER_MTOK_H100
            ),
            why: "hardware amortisation dominates at these prices, so cost follows price over \
                  throughput; the absolute figures depend on the stated assumptions, the \
                  ratio much less"
                .to_owned(),
        },
    ])
}

/// Runs every device at every batch size; writes results.json,
/// results.md and the plots.
pub async fn device_report(
    args: &ReportArgs,
    command: &str,
) -> Result<(DeviceReport, String), BenchError> {
    let shape = launch_shape(args.shape);
    let assumptions = CostAssumptions {
        electricity_usd_per_kwh: args.electricity_usd_per_kwh,
        amortisation_years: args.amortisation_years,
        utilisation: args.utilisation,
        device_price_usd: [
            args.price_910b_usd,
            args.price_910c_usd,
            args.price_h100_usd,
        ],
    };
    let mut points = Vec::new();
    for (index, device) in DEVICES.iter().enumerate() {
        for &batch in &args.batches {
            let model = ModelSettings {
                id: "report".to_owned(),
                dir: Some(args.model_dir.clone()),
                init_preset: Some(crate::model::Preset::Small),
                device_profile: crate::npu::ProfileSource::parse(device),
                pace: Pace::Device,
                max_batch_size: batch,
                served_as: Some(shape.clone()),
                ..ModelSettings::default()
            };
            let hosted = SelfHosted::start(vec![model]).await?;
            let keys = hosted.provision(&equal_tenants(1)).await?;
            let target = Target::grpc(connect(&hosted.endpoint(), 1).await?, keys);
            let workload = WorkloadSpec {
                model: "report".to_owned(),
                prompt_words: (16, 32),
                output_tokens: (args.output_tokens, args.output_tokens),
                output_distribution: LengthDistribution::Uniform,
                temperature: 0.8,
                seed: 11,
            };
            let label = format!("{device}, batch {batch}");
            let run = measured_run(
                &label,
                &target,
                Some(hosted.metrics_addr),
                &workload,
                Arrival::Closed { clients: batch },
                args.warmup,
                args.duration,
            )
            .await;
            hosted.stop().await?;
            let run = run?;
            eprintln!("{}", run.markdown_row());
            points.push(point(
                device,
                batch,
                run,
                &shape,
                assumptions.device_price_usd[index],
                &assumptions,
            ));
        }
    }
    let comparisons = compare(&points, &shape)?;
    let report = DeviceReport {
        command: command.to_owned(),
        git_revision: git_revision(),
        machine: machine(),
        served_as: shape,
        assumptions,
        points,
        comparisons,
    };
    super::plot::device_plots(&report, &args.out_dir)?;
    let markdown = markdown(&report);
    write_results(&args.out_dir, &report, &markdown)?;
    Ok((report, markdown))
}

fn markdown(r: &DeviceReport) -> String {
    let a = &r.assumptions;
    let mut out = format!(
        "# Ascend 910B / 910C against H100 (emulated)\n\n\
         Command: `{}`  \nRevision: `{}`  \nMachine: {}  \n\
         Served-as shape: {} ({}; {} devices, tensor-parallel efficiency {}), \
         executed by the `small` model with `pace = \"device\"`; closed loop with as many \
         clients as the batch size, fixed output lengths. Throughput, power and energy come \
         from the emulated device time and energy charged to the requests (the cost model in \
         `src/npu`), not from this machine's clock.\n\n\
         Cost assumptions (not measurements): electricity {} USD/kWh, hardware amortised over \
         {} years at {:.0}% utilisation, device prices {} / {} / {} USD (910B / 910C / H100).\n\n\
         | device | batch | output tok/s (emulated, whole group) | step ms | W per device | J per output token | USD per M tokens |\n\
         |---|---:|---:|---:|---:|---:|---:|\n",
        r.command,
        r.git_revision,
        r.machine,
        r.served_as.name,
        describe_shape(&r.served_as),
        r.served_as.devices,
        r.served_as.tp_efficiency,
        a.electricity_usd_per_kwh,
        a.amortisation_years,
        a.utilisation * 100.0,
        a.device_price_usd[0],
        a.device_price_usd[1],
        a.device_price_usd[2],
    );
    for p in &r.points {
        out.push_str(&format!(
            "| {} | {} | {:.1} | {:.2} | {:.0} | {:.3} | {:.4} |\n",
            p.device,
            p.batch,
            p.tokens_per_device_s,
            p.step_ms,
            p.watts_per_device,
            p.joules_per_output_token,
            p.usd_per_million_tokens
        ));
    }
    out.push_str(
        "\n## Against the launch material\n\n| | measured | claimed | why |\n|---|---|---|---|\n",
    );
    for c in &r.comparisons {
        out.push_str(&format!(
            "| {} | {} | {} | {} |\n",
            c.what, c.measured, c.claimed, c.why
        ));
    }
    out.push_str("\n![throughput](throughput.svg) ![power](power.svg)\n");
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cost_per_million_tokens_on_known_inputs() {
        let a = CostAssumptions {
            electricity_usd_per_kwh: 0.10,
            amortisation_years: 1.0,
            utilisation: 1.0,
            device_price_usd: [0.0; 3],
        };
        // One device priced at one year of hours: 1 USD/h, plus 1 kW at
        // 0.10 USD/kWh; 1,000 tokens/s is 3.6 M tokens/h.
        let usd = usd_per_million_tokens(1000.0, 1, 1000.0, 8760.0, &a);
        assert!((usd - 1.1 / 3.6).abs() < 1e-12, "{usd}");
        let half_busy = CostAssumptions {
            utilisation: 0.5,
            ..a.clone()
        };
        let doubled = usd_per_million_tokens(1000.0, 1, 1000.0, 8760.0, &half_busy);
        assert!((doubled - 2.0 * usd).abs() < 1e-12);
        assert_eq!(usd_per_million_tokens(0.0, 8, 300.0, 1.0, &a), 0.0);
    }
}
