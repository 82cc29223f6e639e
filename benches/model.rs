//! Prefill and decode throughput of the `small` preset (trained 4,096-entry vocabulary) and of
//! `v4-small` (DeepSeek V4's 129,280-entry tokenizer, hidden 256, tied embedding) at batch 1, 8
//! and 32 on this CPU, in one run, with the emulated device time per step printed next to them
//! and per-operator profiles of one prefill step (batch 8) and one decode step (batch 32).
//!
//! After them, per preset, a table of each step's bytes and FLOPs (from the profiler) over its
//! median host time, as ratios against this machine's streaming-read bandwidth (measured here)
//! and numpy's sgemm (when `NPU_REFERENCE_JSON` names the file `benchmarks/npu/reference.py`
//! writes): the #20 targets, from one run.
//!
//! Owns only measurement; it must not assert timings. Run: `cargo bench --bench model`
//! (`cargo bench --bench model -- roofline-only` skips the criterion groups).

#![allow(clippy::expect_used, clippy::unwrap_used)] // a benchmark fails loudly by design

use std::hint::black_box;
use std::time::Instant;

use ascend_gateway::model::{KvPool, LoadOptions, Model, Preset, SeqChunk, init_model_dir};
use ascend_gateway::npu::{Device, KvDtype};
use criterion::{Criterion, Throughput, criterion_group, criterion_main};
#[path = "support/reference.rs"]
mod reference;
use reference::{parallel_read, reference_json};

const PROMPT: usize = 64;

fn setup(preset: Preset, name: &str) -> Model {
    let dir = std::env::temp_dir().join(format!("model-bench-{name}-{}", std::process::id()));
    init_model_dir(preset, 1, &dir).expect("init");
    let m = Model::load(&dir, &LoadOptions::default()).expect("load");
    let _ = std::fs::remove_dir_all(&dir);
    m
}

fn prompt(seq: u64, vocab: usize) -> Vec<u32> {
    (0..PROMPT as u64)
        .map(|i| ((seq * 7919 + i * 104_729) % vocab as u64) as u32)
        .collect()
}

/// One chunk per sequence, sequence ids in order.
fn chunks<T: AsRef<[u32]>>(seqs: &[T]) -> Vec<SeqChunk<'_>> {
    seqs.iter()
        .enumerate()
        .map(|(i, t)| SeqChunk {
            seq: i as u64,
            tokens: t.as_ref(),
        })
        .collect()
}

fn bench(c: &mut Criterion) {
    let refs = References::measure();
    for (preset, name) in [(Preset::Small, "small"), (Preset::V4Small, "v4-small")] {
        let m = setup(preset, name);
        bench_preset(c, &m, name);
        roofline(&m, name, &refs);
    }
}

/// The machine's limits, measured in the same run: streaming-read bandwidth over both cores
/// (a 128 MiB dot product, best of 7) and, when `NPU_REFERENCE_JSON` names the file written by
/// `benchmarks/npu/reference.py`, numpy (OpenBLAS) sgemm GFLOP/s at 256 x 4096 x 4096.
struct References {
    read_gbs: f64,
    sgemm_gflops: Option<f64>,
}

impl References {
    fn measure() -> Self {
        let buf: Vec<f32> = (0..(32usize << 20))
            .map(|i| (i % 251) as f32 * 1e-3)
            .collect();
        let mut best = f64::INFINITY;
        for _ in 0..7 {
            let t = Instant::now();
            black_box(parallel_read(&buf));
            best = best.min(t.elapsed().as_secs_f64());
        }
        let sgemm_gflops =
            reference_json().and_then(|v| v["gemm_256x4096x4096_f32_gflops"].as_f64());
        let refs = Self {
            read_gbs: (buf.len() * 4) as f64 / best / 1e9,
            sgemm_gflops,
        };
        eprintln!(
            "references: streaming read {:.1} GB/s ({} threads), numpy sgemm {}",
            refs.read_gbs,
            rayon::current_num_threads(),
            refs.sgemm_gflops
                .map_or("not given (set NPU_REFERENCE_JSON)".into(), |g| format!(
                    "{g:.1} GFLOP/s"
                ))
        );
        refs
    }
}

/// Median host time of `reps` runs of `f`, ms.
fn median_ms(reps: usize, mut f: impl FnMut()) -> f64 {
    let mut t: Vec<f64> = (0..reps)
        .map(|_| {
            let s = Instant::now();
            f();
            s.elapsed().as_secs_f64() * 1e3
        })
        .collect();
    t.sort_by(f64::total_cmp);
    t[reps / 2]
}

/// The issue #20 ratios for one preset: each step's model bytes (weights and KV the cost model
/// charges) and FLOPs from the profiler, over its median host time, against the references.
fn roofline(m: &Model, name: &str, refs: &References) {
    let vocab = m.config().vocab_size;
    println!("\n== {name}: steps against this machine's limits ==");
    println!("| step | host ms | GB read | GB/s | of read bw | GFLOP | GFLOP/s | of sgemm |");
    println!("|---|---:|---:|---:|---:|---:|---:|---:|");
    let mut decode_ms = Vec::new();
    for &b in &[1usize, 8, 32] {
        let prompts: Vec<Vec<u32>> = (0..b as u64).map(|s| prompt(s, vocab)).collect();
        let mut dev = Device::builtin("ascend-910b").expect("device");
        let mut kv = KvPool::with_blocks(m.config(), 1024, 16, KvDtype::Bf16).expect("pool");
        let batch = chunks(&prompts);
        let toks: Vec<[u32; 1]> = (0..b).map(|i| [(i % vocab) as u32]).collect();
        let dec = chunks(&toks);
        let free = |kv: &mut KvPool| {
            (0..b as u64).for_each(|s| {
                kv.free(s);
            })
        };
        let totals = |dev: &Device| {
            let t = dev.profiler().grand_total();
            (t.bytes as f64 / 1e9, t.flops / 1e9)
        };
        dev.profiler_mut().reset();
        m.step(&mut dev, &mut kv, &batch).expect("prefill");
        let (p_gb, p_gflop) = totals(&dev);
        free(&mut kv);
        let p_ms = median_ms(if b == 32 { 3 } else { 5 }, || {
            m.step(&mut dev, &mut kv, &batch).expect("prefill");
            free(&mut kv);
        });
        m.step(&mut dev, &mut kv, &batch).expect("prefill");
        dev.profiler_mut().reset();
        m.step(&mut dev, &mut kv, &dec).expect("decode");
        let (d_gb, d_gflop) = totals(&dev);
        (0..b as u64).for_each(|s| kv.truncate(s, PROMPT).expect("truncate"));
        let d_ms = median_ms(21, || {
            m.step(&mut dev, &mut kv, &dec).expect("decode");
            (0..b as u64).for_each(|s| kv.truncate(s, PROMPT).expect("truncate"));
        });
        decode_ms.push(d_ms);
        for (step, ms, gb, gflop) in [
            (format!("prefill {b} x {PROMPT}"), p_ms, p_gb, p_gflop),
            (format!("decode batch {b}"), d_ms, d_gb, d_gflop),
        ] {
            let gbs = gb / (ms / 1e3);
            let gflops = gflop / (ms / 1e3);
            println!(
                "| {step} | {ms:.2} | {gb:.4} | {gbs:.1} | {:.0}% | {gflop:.3} | {gflops:.1} | {} |",
                100.0 * gbs / refs.read_gbs,
                refs.sgemm_gflops
                    .map_or("-".into(), |s| format!("{:.0}%", 100.0 * gflops / s))
            );
        }
        free(&mut kv);
    }
    println!(
        "decode batch 32 / batch 1 step time: {:.2}x (target <= 3x); batch 8 / batch 1: {:.2}x",
        decode_ms[2] / decode_ms[0],
        decode_ms[1] / decode_ms[0]
    );
}

fn bench_preset(c: &mut Criterion, m: &Model, name: &str) {
    let vocab = m.config().vocab_size;
    eprintln!(
        "{name}: vocab_size {vocab}, hidden_size {}",
        m.config().hidden_size
    );
    let mut g = c.benchmark_group(name);
    g.sample_size(10);
    g.measurement_time(std::time::Duration::from_secs(4));
    g.warm_up_time(std::time::Duration::from_millis(500));
    for &b in &[1usize, 8, 32] {
        let prompts: Vec<Vec<u32>> = (0..b as u64).map(|s| prompt(s, vocab)).collect();
        let mut dev = Device::builtin("ascend-910b").expect("device");
        let mut kv = KvPool::with_blocks(m.config(), 1024, 16, KvDtype::Bf16).expect("pool");

        // Prefill: b fresh prompts of PROMPT tokens in one step.
        let batch = chunks(&prompts);
        dev.profiler_mut().reset();
        let out = m.step(&mut dev, &mut kv, &batch).expect("prefill");
        eprintln!(
            "prefill batch {b:>2} x {PROMPT} tokens: emulated {:.1} us/step ({:.0} tokens/s on the device), cpu {:.1} ms",
            out.device_us,
            (b * PROMPT) as f64 / (out.device_us * 1e-6),
            out.cpu_us / 1e3
        );
        if b == 8 {
            eprintln!(
                "profile of one prefill step at batch 8:\n{}",
                dev.profiler().table()
            );
        }
        (0..b as u64).for_each(|s| {
            kv.free(s);
        });
        g.throughput(Throughput::Elements((b * PROMPT) as u64));
        g.bench_function(format!("prefill/batch{b}"), |bn| {
            bn.iter(|| {
                let out = m.step(&mut dev, &mut kv, &batch).expect("prefill");
                (0..b as u64).for_each(|s| {
                    kv.free(s);
                });
                black_box(out.logits.len())
            })
        });

        // Decode: b sequences with PROMPT cached tokens each decode one token per step.
        m.step(&mut dev, &mut kv, &batch).expect("prefill");
        let toks: Vec<[u32; 1]> = (0..b).map(|i| [(i % vocab) as u32]).collect();
        let dec = chunks(&toks);
        dev.profiler_mut().reset();
        let out = m.step(&mut dev, &mut kv, &dec).expect("decode");
        eprintln!(
            "decode  batch {b:>2}: emulated {:.1} us/step ({:.0} tokens/s on the device), cpu {:.1} ms",
            out.device_us,
            b as f64 / (out.device_us * 1e-6),
            out.cpu_us / 1e3
        );
        if b == 32 {
            eprintln!(
                "profile of one decode step at batch 32:\n{}",
                dev.profiler().table()
            );
        }
        (0..b as u64).for_each(|s| kv.truncate(s, PROMPT).expect("truncate"));
        g.throughput(Throughput::Elements(b as u64));
        g.bench_function(format!("decode/batch{b}"), |bn| {
            bn.iter(|| {
                let out = m.step(&mut dev, &mut kv, &dec).expect("decode");
                (0..b as u64).for_each(|s| kv.truncate(s, PROMPT).expect("truncate"));
                black_box(out.logits.len())
            })
        });
        (0..b as u64).for_each(|s| {
            kv.free(s);
        });
    }
    g.finish();
}

criterion_group!(benches, bench);
criterion_main!(benches);
