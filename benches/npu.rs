//! Benchmarks of the emulated NPU's CPU kernels at LLM shapes, with a summary table that puts
//! each figure next to a CPU reference measured on the same machine in the same run: the `gemm`
//! crate's f32 GEMM (always), numpy/OpenBLAS (when `NPU_REFERENCE_JSON` names the file written
//! by `benchmarks/npu/reference.py`), and a streaming-read memory bandwidth.
//!
//! `NPU_BENCH_SUMMARY_ONLY=1` skips the criterion groups and prints only the summary.

#![allow(clippy::expect_used, clippy::unwrap_used)] // a benchmark fails loudly by design
#![allow(unsafe_code)] // the reference GEMM call into the gemm crate

#[path = "support/reference.rs"]
mod reference;
use reference::{parallel_read, reference_json};

use std::hint::black_box;
use std::time::{Duration, Instant};

use ascend_gateway::npu::kernels::{attention, matmul, moe, simd};
use ascend_gateway::npu::{
    AttnShape, Device, GateConfig, KvDtype, LinearWeight, PagedKvCache, ScoringFunc, ValueLayout,
    WeightFormat,
};
use criterion::{BenchmarkId, Criterion};

fn data(n: usize, seed: u64) -> Vec<f32> {
    let mut s = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
    (0..n)
        .map(|_| {
            s ^= s << 13;
            s ^= s >> 7;
            s ^= s << 17;
            ((s >> 40) as f32 / (1u64 << 24) as f32) * 2.0 - 1.0
        })
        .collect()
}

/// Best wall time of `reps` runs after one warm-up.
fn best(reps: usize, mut f: impl FnMut()) -> Duration {
    f();
    (0..reps)
        .map(|_| {
            let t = Instant::now();
            f();
            t.elapsed()
        })
        .min()
        .unwrap_or_default()
}

/// Streaming read bandwidth, GB/s, as `(512 MiB on all cores, 512 MiB on one core, 8 x 32 MiB
/// rotating on all cores)`; the last has the footprint of the cold GEMV below.
fn memory_bandwidth_gbs() -> (f64, f64, f64) {
    let buf = data(128 << 20, 1);
    let bytes = (buf.len() * 4) as f64;
    let all = best(7, || {
        black_box(parallel_read(&buf));
    });
    let one = best(3, || {
        black_box(simd::dot(&buf, &buf));
    });
    drop(buf);
    let bufs: Vec<Vec<f32>> = (0..8).map(|i| data(8 << 20, 40 + i)).collect();
    let mut i = 0;
    let rot = best(40, || {
        i = (i + 1) % bufs.len();
        black_box(parallel_read(&bufs[i]));
    });
    (
        bytes / all.as_secs_f64() / 1e9,
        bytes / one.as_secs_f64() / 1e9,
        (32 << 20) as f64 / rot.as_secs_f64() / 1e9,
    )
}

fn gemm_crate_f32_gflops(m: usize, n: usize, k: usize) -> f64 {
    let a = data(m * k, 2);
    let b = data(n * k, 3);
    let mut c = vec![0.0f32; m * n];
    let t = best(5, || {
        // SAFETY: a is [m, k], b is [n, k] read as [k, n] with column stride k, c is [m, n];
        // all strides stay inside the buffers.
        unsafe {
            gemm::gemm(
                m,
                n,
                k,
                c.as_mut_ptr(),
                1,
                n as isize,
                false,
                a.as_ptr(),
                1,
                k as isize,
                b.as_ptr(),
                k as isize,
                1,
                0.0,
                1.0,
                false,
                false,
                false,
                gemm::Parallelism::Rayon(rayon::current_num_threads()),
            )
        };
        black_box(&c);
    });
    2.0 * (m * n * k) as f64 / t.as_secs_f64() / 1e9
}

fn linear_secs(m: usize, w: &LinearWeight, reps: usize) -> f64 {
    let x = data(m * w.in_features(), 4);
    best(reps, || {
        black_box(matmul::linear(&x, m, w).ok());
    })
    .as_secs_f64()
}

struct Moe {
    cfg: GateConfig,
    hidden: usize,
    inter: usize,
    gate_w: LinearWeight,
    up: Vec<LinearWeight>,
    down: Vec<LinearWeight>,
}

/// A DeepSeek-V3-shaped MoE layer, shrunk to fit a laptop: 64 routed experts in 8 groups,
/// top-6 of topk_group 4, hidden 2048, expert intermediate 512, bf16 weights.
fn moe_layer() -> Moe {
    let (hidden, inter, e) = (2048, 512, 64);
    let cfg = GateConfig {
        n_routed_experts: e,
        top_k: 6,
        n_group: 8,
        topk_group: 4,
        norm_topk_prob: true,
        routed_scaling_factor: 2.5,
        scoring: ScoringFunc::Sigmoid,
    };
    let mk = |o: usize, i: usize, s: u64, f: WeightFormat| {
        LinearWeight::from_f32(
            o,
            i,
            &data(o * i, s).iter().map(|v| v * 0.02).collect::<Vec<_>>(),
            f,
        )
        .expect("bench weights have consistent shapes")
    };
    Moe {
        gate_w: mk(e, hidden, 5, WeightFormat::F32),
        up: (0..e)
            .map(|i| mk(2 * inter, hidden, 10 + i as u64, WeightFormat::Bf16))
            .collect(),
        down: (0..e)
            .map(|i| mk(hidden, inter, 100 + i as u64, WeightFormat::Bf16))
            .collect(),
        cfg,
        hidden,
        inter,
    }
}

/// Runs one MoE layer for `x[tokens, hidden]` on `dev`.
fn run_moe(dev: &mut Device, l: &Moe, x: &[f32], tokens: usize) -> Vec<f32> {
    let e = l.cfg.n_routed_experts;
    let logits = dev.linear(x, tokens, &l.gate_w).expect("gate");
    let r = dev
        .moe_gate(&logits, tokens, &vec![0.0; e], &l.cfg)
        .expect("route");
    let d = dev.moe_dispatch(x, l.hidden, &r, e).expect("dispatch");
    let ups: Vec<&LinearWeight> = l.up.iter().collect();
    let gu = dev.grouped_linear(&d.rows, &d.offsets, &ups).expect("up");
    let rows = d.source.len();
    let (mut g, mut u) = (
        Vec::with_capacity(rows * l.inter),
        Vec::with_capacity(rows * l.inter),
    );
    for row in gu.chunks(2 * l.inter) {
        g.extend_from_slice(&row[..l.inter]);
        u.extend_from_slice(&row[l.inter..]);
    }
    let h = dev.swiglu(&g, &u).expect("swiglu");
    let downs: Vec<&LinearWeight> = l.down.iter().collect();
    let y = dev.grouped_linear(&h, &d.offsets, &downs).expect("down");
    dev.moe_combine(&y, l.hidden, &d, &r).expect("combine")
}

/// DeepSeek-V3 MLA decode in absorbed form: 128 heads, latent 512 + rope 64, one shared KV head.
struct Mla {
    cache: PagedKvCache,
    tables: Vec<Vec<u32>>,
    ctx: usize,
}

const MLA_HEADS: usize = 128;
const MLA_DK: usize = 576;
const MLA_DV: usize = 512;

fn mla_cache(batch: usize, ctx: usize) -> Mla {
    let bs = 128;
    let per = ctx.div_ceil(bs);
    let mut cache = PagedKvCache::new(
        batch * per,
        bs,
        1,
        MLA_DK,
        ValueLayout::PrefixOfK(MLA_DV),
        KvDtype::Bf16,
    )
    .expect("bench cache shape is valid");
    let tables: Vec<Vec<u32>> = (0..batch)
        .map(|b| (0..per).map(|i| (i * batch + b) as u32).collect())
        .collect();
    let k = data(MLA_DK, 7);
    for t in &tables {
        for p in 0..ctx {
            cache
                .write(t, p, &k, None)
                .expect("bench positions fit the tables");
        }
    }
    Mla { cache, tables, ctx }
}

fn criterion_benches(c: &mut Criterion) {
    let mut g = c.benchmark_group("linear");
    g.sample_size(10)
        .measurement_time(Duration::from_secs(4))
        .warm_up_time(Duration::from_secs(1));
    for (m, n, k) in [
        (256, 4096, 4096),
        (1, 4096, 4096),
        (8, 4096, 4096),
        (32, 4096, 4096),
    ] {
        for f in [
            WeightFormat::F16,
            WeightFormat::Bf16,
            WeightFormat::Int8,
            WeightFormat::Fp8E4m3,
        ] {
            if m == 256
                && f != WeightFormat::F16
                && f != WeightFormat::Bf16
                && f != WeightFormat::Int8
                && f != WeightFormat::Fp8E4m3
            {
                continue;
            }
            let w = LinearWeight::from_f32(n, k, &data(n * k, 9), f).expect("shape");
            let x = data(m * k, 4);
            g.bench_with_input(
                BenchmarkId::new(format!("{}x{}x{}", m, n, k), f.name()),
                &(),
                |b, _| b.iter(|| black_box(matmul::linear(&x, m, &w).ok())),
            );
        }
    }
    g.finish();

    let mut g = c.benchmark_group("decode_attention_mla");
    g.sample_size(10)
        .measurement_time(Duration::from_secs(3))
        .warm_up_time(Duration::from_secs(1));
    for batch in [1, 8, 32] {
        let m = mla_cache(batch, 1024);
        let q = data(batch * MLA_HEADS * MLA_DK, 8);
        let tables: Vec<&[u32]> = m.tables.iter().map(|t| t.as_slice()).collect();
        let lens = vec![m.ctx; batch];
        g.bench_function(BenchmarkId::from_parameter(batch), |b| {
            b.iter(|| {
                black_box(
                    attention::decode_attention(&q, &m.cache, &tables, &lens, MLA_HEADS, 0.07).ok(),
                )
            })
        });
    }
    g.finish();

    let layer = moe_layer();
    let mut g = c.benchmark_group("moe_layer");
    g.sample_size(10)
        .measurement_time(Duration::from_secs(3))
        .warm_up_time(Duration::from_secs(1));
    for tokens in [1, 8, 32] {
        let x = data(tokens * layer.hidden, 11);
        let mut dev = Device::builtin("ascend-910b").expect("builtin");
        g.bench_function(BenchmarkId::from_parameter(tokens), |b| {
            b.iter(|| black_box(run_moe(&mut dev, &layer, &x, tokens)))
        });
    }
    g.finish();

    let mut g = c.benchmark_group("moe_gate");
    g.sample_size(20);
    let cfg = GateConfig {
        n_routed_experts: 256,
        top_k: 8,
        n_group: 8,
        topk_group: 4,
        norm_topk_prob: true,
        routed_scaling_factor: 2.5,
        scoring: ScoringFunc::Sigmoid,
    };
    for tokens in [1, 8, 32] {
        let logits = data(tokens * 256, 12);
        let bias = vec![0.0; 256];
        g.bench_function(BenchmarkId::from_parameter(tokens), |b| {
            b.iter(|| black_box(moe::moe_gate(&logits, tokens, &bias, &cfg).ok()))
        });
    }
    g.finish();
}

fn summary() {
    let threads = rayon::current_num_threads();
    println!(
        "\n== npu summary (threads = {threads}, simd = {}) ==",
        simd::simd_level()
    );
    let (bw_all, bw_one, bw_rot) = memory_bandwidth_gbs();
    // The ratio uses the best of the three, so it can only understate the kernels.
    let bw = bw_all.max(bw_one).max(bw_rot);
    let gemm_ref = gemm_crate_f32_gflops(256, 4096, 4096);
    let numpy = reference_json();
    let numpy_gemm = numpy
        .as_ref()
        .and_then(|v| v["gemm_256x4096x4096_f32_gflops"].as_f64());

    let (m, n, k) = (256, 4096, 4096);
    println!(
        "{:<44} {:>10} {:>12} {:>10}",
        "benchmark", "time", "rate", "ratio"
    );
    for (label, v) in [
        ("memory read 512 MiB, all cores", bw_all),
        ("memory read 512 MiB, one core", bw_one),
        ("memory read 8 x 32 MiB rotating, all cores", bw_rot),
    ] {
        println!("{:<44} {:>10} {:>9.1} GB/s {:>10}", label, "", v, "");
    }
    println!(
        "{:<44} {:>10} {:>9.1} GF/s {:>10}",
        "ref: gemm crate f32 256x4096x4096", "", gemm_ref, ""
    );
    if let Some(g) = numpy_gemm {
        println!(
            "{:<44} {:>10} {:>9.1} GF/s {:>10}",
            "ref: numpy/OpenBLAS f32 256x4096x4096", "", g, ""
        );
    }
    let best_ref = numpy_gemm.map_or(gemm_ref, |g| g.max(gemm_ref));
    for f in [
        WeightFormat::F16,
        WeightFormat::Bf16,
        WeightFormat::Int8,
        WeightFormat::Fp8E4m3,
    ] {
        let w = LinearWeight::from_f32(n, k, &data(n * k, 9), f).expect("shape");
        let s = linear_secs(m, &w, 5);
        let gf = 2.0 * (m * n * k) as f64 / s / 1e9;
        println!(
            "{:<44} {:>8.2}ms {:>9.1} GF/s {:>9.0}%",
            format!("prefill linear {m}x{n}x{k} {}", f.name()),
            s * 1e3,
            gf,
            100.0 * gf / best_ref
        );
    }
    // Decode GEMV: "hot" reuses one weight (it may sit in L3); "cold" rotates over 8 weights
    // (256 MiB in all) so every call streams from DRAM.
    let ws: Vec<LinearWeight> = (0..8)
        .map(|i| {
            LinearWeight::from_f32(4096, 4096, &data(4096 * 4096, 20 + i), WeightFormat::F16)
                .expect("shape")
        })
        .collect();
    let x = data(4096, 5);
    let hot = best(50, || {
        black_box(matmul::linear(&x, 1, &ws[0]).ok());
    });
    let mut i = 0;
    let cold = best(50, || {
        i = (i + 1) % ws.len();
        black_box(matmul::linear(&x, 1, &ws[i]).ok());
    });
    for (label, t) in [("hot", hot), ("cold", cold)] {
        let gbs = ws[0].storage_bytes() as f64 / t.as_secs_f64() / 1e9;
        println!(
            "{:<44} {:>8.3}ms {:>9.1} GB/s {:>9.0}%",
            format!("decode gemv 1x4096x4096 f16 ({label})"),
            t.as_secs_f64() * 1e3,
            gbs,
            100.0 * gbs / bw
        );
    }
    for f in [
        WeightFormat::Bf16,
        WeightFormat::Int8,
        WeightFormat::Fp8E4m3,
    ] {
        let w = LinearWeight::from_f32(4096, 4096, &data(4096 * 4096, 30), f).expect("shape");
        let t = best(30, || {
            black_box(matmul::linear(&x, 1, &w).ok());
        });
        let gbs = w.storage_bytes() as f64 / t.as_secs_f64() / 1e9;
        println!(
            "{:<44} {:>8.3}ms {:>9.1} GB/s {:>9.0}%",
            format!("decode gemv 1x4096x4096 {} (hot)", f.name()),
            t.as_secs_f64() * 1e3,
            gbs,
            100.0 * gbs / bw
        );
    }

    // Layers at batch 1, 8, 32: CPU time next to the emulated 910B and H100 device times.
    println!(
        "\n{:<44} {:>10} {:>10} {:>10} {:>10} {:>8} {:>8}",
        "layer (cpu: this machine; dev: emulated)",
        "cpu",
        "910b dev",
        "h100 dev",
        "910b mJ",
        "910b W",
        "h100 W"
    );
    let layer = moe_layer();
    for tokens in [1, 8, 32] {
        let x = data(tokens * layer.hidden, 11);
        let mut d910 = Device::builtin("ascend-910b").expect("builtin");
        let mut dh = Device::builtin("h100-sxm").expect("builtin");
        let t = best(5, || {
            black_box(run_moe(&mut d910, &layer, &x, tokens));
        });
        let _ = d910.take_step();
        run_moe(&mut d910, &layer, &x, tokens);
        run_moe(&mut dh, &layer, &x, tokens);
        let (a, h) = (d910.take_step(), dh.take_step());
        layer_line(
            &format!("moe layer (64 experts, top-6) b={tokens}"),
            t,
            &a,
            &h,
        );
        if tokens == 8 {
            println!("{}", d910.profiler().table());
            let path = std::path::Path::new("target").join("npu-trace-moe-b8.json");
            if std::fs::write(&path, d910.profiler().chrome_trace_json()).is_ok() {
                println!(
                    "chrome trace of the 910b MoE layer runs: {}",
                    path.display()
                );
            }
        }
    }
    for batch in [1, 8, 32] {
        let m = mla_cache(batch, 1024);
        let q = data(batch * MLA_HEADS * MLA_DK, 8);
        let tables: Vec<&[u32]> = m.tables.iter().map(|t| t.as_slice()).collect();
        let lens = vec![m.ctx; batch];
        let t = best(5, || {
            black_box(
                attention::decode_attention(&q, &m.cache, &tables, &lens, MLA_HEADS, 0.07).ok(),
            );
        });
        let mut d910 = Device::builtin("ascend-910b").expect("builtin");
        let mut dh = Device::builtin("h100-sxm").expect("builtin");
        d910.decode_attention(&q, &m.cache, &tables, &lens, MLA_HEADS, 0.07)
            .expect("attn");
        dh.decode_attention(&q, &m.cache, &tables, &lens, MLA_HEADS, 0.07)
            .expect("attn");
        let (a, h) = (d910.take_step(), dh.take_step());
        layer_line(&format!("mla decode attn ctx=1024 b={batch}"), t, &a, &h);
    }
    for batch in [1, 8, 32] {
        let shape = AttnShape {
            num_q_heads: 32,
            num_kv_heads: 8,
            qk_dim: 128,
            v_dim: 128,
        };
        let len = 512;
        let lens = vec![len; batch];
        let tok = batch * len;
        let q = data(tok * 32 * 128, 13);
        let k = data(tok * 8 * 128, 14);
        let v = data(tok * 8 * 128, 15);
        let t = best(2, || {
            black_box(
                attention::prefill_attention(
                    &q,
                    &k,
                    attention::Values::Separate(&v),
                    shape,
                    &lens,
                    0.088,
                    true,
                )
                .ok(),
            );
        });
        let mut d910 = Device::builtin("ascend-910b").expect("builtin");
        let mut dh = Device::builtin("h100-sxm").expect("builtin");
        for d in [&mut d910, &mut dh] {
            d.prefill_attention(
                &q,
                &k,
                attention::Values::Separate(&v),
                shape,
                &lens,
                0.088,
                true,
                None,
            )
            .expect("attn");
        }
        let (a, h) = (d910.take_step(), dh.take_step());
        layer_line(
            &format!("gqa prefill attn 32q/8kv x128 len=512 b={batch}"),
            t,
            &a,
            &h,
        );
    }
}

fn layer_line(
    name: &str,
    cpu: Duration,
    a: &ascend_gateway::npu::OpTotals,
    h: &ascend_gateway::npu::OpTotals,
) {
    let watts = |o: &ascend_gateway::npu::OpTotals| {
        if o.device_us > 0.0 {
            o.energy_j / (o.device_us * 1e-6)
        } else {
            0.0
        }
    };
    println!(
        "{:<44} {:>8.2}ms {:>8.1}us {:>8.1}us {:>10.3} {:>8.0} {:>8.0}",
        name,
        cpu.as_secs_f64() * 1e3,
        a.device_us,
        h.device_us,
        a.energy_j * 1e3,
        watts(a),
        watts(h)
    );
}

fn main() {
    if std::env::var_os("NPU_BENCH_SUMMARY_ONLY").is_none() {
        let mut c = Criterion::default().configure_from_args();
        criterion_benches(&mut c);
        c.final_summary();
    }
    summary();
}
