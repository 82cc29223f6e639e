//! Prefill and decode throughput of the `small` preset (trained 4,096-entry vocabulary) and of
//! `v4-small` (DeepSeek V4's 129,280-entry tokenizer, hidden 256, tied embedding) at batch 1, 8
//! and 32 on this CPU, in one run, with the emulated device time per step printed next to them
//! and per-operator profiles of one prefill step (batch 8) and one decode step (batch 32).
//!
//! Owns only measurement; it must not assert timings. Run: `cargo bench --bench model`.

#![allow(clippy::expect_used, clippy::unwrap_used)] // a benchmark fails loudly by design

use std::hint::black_box;

use ascend_gateway::model::{KvPool, LoadOptions, Model, Preset, SeqChunk, init_model_dir};
use ascend_gateway::npu::{Device, KvDtype};
use criterion::{Criterion, Throughput, criterion_group, criterion_main};

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

fn bench(c: &mut Criterion) {
    for (preset, name) in [(Preset::Small, "small"), (Preset::V4Small, "v4-small")] {
        bench_preset(c, preset, name);
    }
}

fn bench_preset(c: &mut Criterion, preset: Preset, name: &str) {
    let m = setup(preset, name);
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
        let batch: Vec<SeqChunk<'_>> = prompts
            .iter()
            .enumerate()
            .map(|(i, p)| SeqChunk {
                seq: i as u64,
                tokens: p,
            })
            .collect();
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
        let dec: Vec<SeqChunk<'_>> = toks
            .iter()
            .enumerate()
            .map(|(i, t)| SeqChunk {
                seq: i as u64,
                tokens: t,
            })
            .collect();
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
