//! End-to-end tests of the model module on the `tiny` preset: init -> load -> step -> sample.
//!
//! Owns the cross-file properties (determinism, batch independence, paged decode vs full
//! recompute, checkpoint round trips and errors). It must not know serving or tenants.

use std::path::{Path, PathBuf};
use std::sync::OnceLock;

use super::checkpoint::{FloatDtype, OwnedTensor, write_dir};
use super::*;
use crate::npu::{Device, KvDtype, WeightFormat};

fn tiny_dir() -> &'static Path {
    static DIR: OnceLock<(tempfile::TempDir, PathBuf)> = OnceLock::new();
    &DIR.get_or_init(|| {
        let d = tempfile::tempdir().unwrap();
        let p = d.path().join("tiny");
        init_model_dir(Preset::Tiny, 42, &p).unwrap();
        (d, p)
    })
    .1
}

fn load() -> (Model, Tokenizer) {
    let dir = tiny_dir();
    (
        Model::load(dir, &LoadOptions::default()).unwrap(),
        Tokenizer::from_dir(dir).unwrap(),
    )
}

fn pool(m: &Model, blocks: usize) -> KvPool {
    KvPool::with_blocks(m.config(), blocks, 4, KvDtype::Bf16).unwrap()
}

fn dev() -> Device {
    Device::builtin("ascend-910b").unwrap()
}

fn prompt(tok: &Tokenizer, text: &str) -> Vec<u32> {
    tok.encode(text, true).unwrap()
}

fn requests(tok: &Tokenizer) -> Vec<GenerateRequest> {
    let texts = [
        "The gateway receives a request",
        "Once upon a time",
        "你好，世界 🤖",
        "fn main() {",
        "Question: what is the capital of France? Answer:",
    ];
    texts
        .iter()
        .enumerate()
        .map(|(i, t)| GenerateRequest {
            prompt: prompt(tok, t),
            params: SamplingParams {
                temperature: if i % 2 == 0 { 0.0 } else { 0.9 },
                top_k: if i == 3 { 20 } else { 0 },
                top_p: if i == 1 { 0.9 } else { 1.0 },
                seed: 1000 + i as u64,
                max_tokens: 12,
                ignore_eos: true,
                ..Default::default()
            },
        })
        .collect()
}

fn max_diff(a: &[f32], b: &[f32]) -> f32 {
    a.iter()
        .zip(b)
        .map(|(x, y)| (x - y).abs())
        .fold(0.0, f32::max)
}

#[test]
fn init_writes_a_loadable_directory_with_a_real_vocabulary() {
    let dir = tiny_dir();
    for f in [
        "config.json",
        "model.safetensors",
        "tokenizer.json",
        "tokenizer_config.json",
    ] {
        assert!(dir.join(f).exists(), "{f}");
    }
    let (m, tok) = load();
    assert_eq!(m.config().vocab_size, tok.vocab_size());
    assert_eq!(m.config().eos_token_id, tok.eos_id());
    let text = "The model returns the answer.";
    let ids = tok.encode(text, false).unwrap();
    assert!(ids.len() * 3 < text.len() * 2, "{ids:?}");
}

#[test]
fn generation_is_deterministic_for_a_fixed_seed() {
    let (m, tok) = load();
    let reqs = requests(&tok);
    let a = generate(&m, &mut dev(), &mut pool(&m, 256), &tok, &reqs).unwrap();
    let b = generate(&m, &mut dev(), &mut pool(&m, 256), &tok, &reqs).unwrap();
    assert_eq!(a, b);
    assert!(
        a.iter()
            .all(|r| r.tokens.len() == 12 && r.finish == FinishReason::Length)
    );
    // Different seeds give different samples for a sampled request.
    let mut other = reqs[1].clone();
    other.params.seed += 1;
    let c = generate(&m, &mut dev(), &mut pool(&m, 256), &tok, &[other]).unwrap();
    assert_ne!(c[0].tokens, a[1].tokens);
}

#[test]
fn batched_equals_unbatched_token_for_token() {
    let (m, tok) = load();
    // 15 requests: decode steps run 15 rows (the npu GEMM path) while solo runs use 1 row (GEMV).
    let mut reqs = requests(&tok);
    for k in 1..3u64 {
        for mut r in requests(&tok) {
            r.params.seed += 100 * k;
            reqs.push(r);
        }
    }
    let mut d = dev();
    let batched = generate(&m, &mut d, &mut pool(&m, 256), &tok, &reqs).unwrap();
    for (i, r) in reqs.iter().enumerate() {
        let solo = generate(
            &m,
            &mut d,
            &mut pool(&m, 256),
            &tok,
            std::slice::from_ref(r),
        )
        .unwrap();
        assert_eq!(solo[0].tokens, batched[i].tokens, "request {i}");
        assert_eq!(solo[0].text, batched[i].text, "request {i}");
    }
}

#[test]
fn paged_decode_and_chunked_prefill_equal_full_recompute() {
    let (m, tok) = load();
    let ids = prompt(
        &tok,
        "Every finished request becomes one usage record with tokens, time and energy.",
    );
    let n = ids.len();
    assert!(n >= 10);
    let mut d = dev();
    // Full recompute: the whole sequence in one prefill.
    let mut p = pool(&m, 64);
    let full = m
        .step(
            &mut d,
            &mut p,
            &[SeqChunk {
                seq: 1,
                tokens: &ids,
            }],
        )
        .unwrap();
    // Prefill a prefix, a second chunk through the paged path, then single-token decodes.
    let mut p = pool(&m, 64);
    m.step(
        &mut d,
        &mut p,
        &[SeqChunk {
            seq: 7,
            tokens: &ids[..n - 6],
        }],
    )
    .unwrap();
    m.step(
        &mut d,
        &mut p,
        &[SeqChunk {
            seq: 7,
            tokens: &ids[n - 6..n - 3],
        }],
    )
    .unwrap();
    let mut last = None;
    for i in n - 3..n {
        last = Some(
            m.step(
                &mut d,
                &mut p,
                &[SeqChunk {
                    seq: 7,
                    tokens: &ids[i..=i],
                }],
            )
            .unwrap(),
        );
    }
    let inc = last.unwrap();
    assert_eq!(p.seq_len(7), n);
    let diff = max_diff(&full.logits[0], &inc.logits[0]);
    eprintln!("paged vs full: max |Δlogit| = {diff}");
    // The comparison is not vacuous: one token less changes the logits a lot.
    assert!(max_diff(&full.logits[0], &logits_of(&m, &ids[..n - 1])) > 1e-2);
    // Bitwise: attention always reads the paged cache and matmuls use fixed row tiles.
    assert_eq!(diff, 0.0, "max |Δlogit| = {diff}");
    let argmax = |l: &[f32]| {
        l.iter()
            .enumerate()
            .max_by(|a, b| a.1.total_cmp(b.1))
            .unwrap()
            .0
    };
    assert_eq!(argmax(&full.logits[0]), argmax(&inc.logits[0]));
}

#[test]
fn step_costs_are_shared_in_proportion_to_tokens() {
    let (m, _) = load();
    let mut d = dev();
    let mut p = pool(&m, 64);
    let a = [5u32, 6, 7, 8, 9, 10];
    let b = [11u32, 12];
    let out = m
        .step(
            &mut d,
            &mut p,
            &[
                SeqChunk { seq: 1, tokens: &a },
                SeqChunk { seq: 2, tokens: &b },
            ],
        )
        .unwrap();
    assert_eq!(out.logits.len(), 2);
    assert!(out.device_us > 0.0 && out.energy_j > 0.0 && out.launches > 10);
    let s = &out.per_seq;
    assert!((s[0].device_us - 3.0 * s[1].device_us).abs() < 1e-9 * out.device_us);
    assert!((s[0].energy_j + s[1].energy_j - out.energy_j).abs() < 1e-12 + 1e-9 * out.energy_j);
    assert!(
        d.profiler().table().contains("decode_attention")
            || d.profiler().table().contains("prefill_attention")
    );
}

#[test]
fn out_of_blocks_is_reported_and_changes_nothing() {
    let (m, _) = load();
    let mut d = dev();
    let mut p = pool(&m, 3); // 12 token slots
    let a: Vec<u32> = (1..=8).collect();
    m.step(&mut d, &mut p, &[SeqChunk { seq: 1, tokens: &a }])
        .unwrap();
    assert_eq!(p.free_blocks(), 1);
    let b: Vec<u32> = (1..=6).collect();
    let e = m
        .step(
            &mut d,
            &mut p,
            &[
                SeqChunk {
                    seq: 1,
                    tokens: &[3],
                },
                SeqChunk { seq: 2, tokens: &b },
            ],
        )
        .unwrap_err();
    assert!(matches!(e, ModelError::OutOfBlocks { .. }), "{e}");
    assert_eq!(p.free_blocks(), 1);
    assert_eq!(p.seq_len(1), 8);
    assert!(!p.contains(2));
    assert_eq!(p.free(1), 2);
    assert_eq!(p.free_blocks(), 3);
}

#[test]
fn bad_step_inputs_are_errors() {
    let (m, _) = load();
    let mut d = dev();
    let mut p = pool(&m, 8);
    let v = m.config().vocab_size as u32;
    assert!(matches!(
        m.step(
            &mut d,
            &mut p,
            &[SeqChunk {
                seq: 1,
                tokens: &[v]
            }]
        ),
        Err(ModelError::TokenOutOfRange { .. })
    ));
    assert!(
        m.step(
            &mut d,
            &mut p,
            &[SeqChunk {
                seq: 1,
                tokens: &[]
            }]
        )
        .is_err()
    );
    assert!(m.step(&mut d, &mut p, &[]).is_err());
    let twice = [
        SeqChunk {
            seq: 1,
            tokens: &[1],
        },
        SeqChunk {
            seq: 1,
            tokens: &[2],
        },
    ];
    assert!(m.step(&mut d, &mut p, &twice).is_err());
    assert_eq!(p.free_blocks(), 8);
}

fn logits_of(m: &Model, ids: &[u32]) -> Vec<f32> {
    let mut p = pool(m, 64);
    m.step(
        &mut dev(),
        &mut p,
        &[SeqChunk {
            seq: 1,
            tokens: ids,
        }],
    )
    .unwrap()
    .logits
    .remove(0)
}

#[test]
fn save_load_round_trip_is_exact_also_sharded() {
    let (m, tok) = load();
    let ids = prompt(&tok, "Prices are set per million tokens.");
    let d = tempfile::tempdir().unwrap();
    m.save(d.path(), 3).unwrap();
    assert!(d.path().join("model.safetensors.index.json").exists());
    let m2 = Model::load(d.path(), &LoadOptions::default()).unwrap();
    assert_eq!(logits_of(&m, &ids), logits_of(&m2, &ids));
}

fn write_variant(
    edit: impl FnOnce(&mut std::collections::BTreeMap<String, OwnedTensor>),
) -> tempfile::TempDir {
    let (m, _) = load();
    let d = tempfile::tempdir().unwrap();
    std::fs::copy(tiny_dir().join("config.json"), d.path().join("config.json")).unwrap();
    let mut t = m.weights().to_tensors(m.config());
    edit(&mut t);
    write_dir(d.path(), &t, 1).unwrap();
    d
}

#[test]
fn missing_or_misshaped_tensor_fails_naming_it() {
    let name = "model.layers.1.mlp.experts.3.up_proj.weight";
    let d = write_variant(|t| {
        t.remove(name);
    });
    let e = Model::load(d.path(), &LoadOptions::default()).unwrap_err();
    assert!(
        matches!(e, ModelError::MissingTensor { .. }) && e.to_string().contains(name),
        "{e}"
    );

    let name = "model.layers.0.self_attn.o_proj.weight";
    let d = write_variant(|t| {
        t.insert(
            name.into(),
            OwnedTensor::float(&[0.0; 64 * 63], vec![64, 63], FloatDtype::Bf16),
        );
    });
    let e = Model::load(d.path(), &LoadOptions::default()).unwrap_err();
    assert!(
        e.to_string().contains(name) && e.to_string().contains("[64, 63]"),
        "{e}"
    );

    let d = tempfile::tempdir().unwrap();
    std::fs::copy(tiny_dir().join("config.json"), d.path().join("config.json")).unwrap();
    std::fs::write(d.path().join("model.safetensors"), b"not a checkpoint").unwrap();
    let e = Model::load(d.path(), &LoadOptions::default()).unwrap_err();
    assert!(e.to_string().contains("model.safetensors"), "{e}");
}

#[test]
fn int8_and_fp8_checkpoints_load_and_track_bf16() {
    let (m, tok) = load();
    let ids = prompt(&tok, "The meeting has been moved to Thursday.");
    let reference = logits_of(&m, &ids);
    let scale = reference.iter().fold(0.0f32, |a, b| a.max(b.abs()));
    for (fmt, tol) in [(WeightFormat::Int8, 0.15), (WeightFormat::Fp8E4m3, 0.35)] {
        let d = tempfile::tempdir().unwrap();
        init_model_dir_with(
            Preset::Tiny,
            42,
            d.path(),
            &InitOptions {
                weight_format: fmt,
                shards: 2,
                ..InitOptions::default()
            },
        )
        .unwrap();
        let q = Model::load(d.path(), &LoadOptions::default()).unwrap();
        let l = logits_of(&q, &ids);
        let diff = max_diff(&reference, &l);
        eprintln!("{fmt:?}: max |Δlogit| = {diff}, max |logit| = {scale}");
        assert!(diff < tol * scale, "{fmt:?}: {diff} vs scale {scale}");
        // Re-quantising a bf16 checkpoint at load time gives the same device format.
        let r = Model::load(
            tiny_dir(),
            &LoadOptions {
                weight_format: Some(fmt),
            },
        )
        .unwrap();
        assert_eq!(r.weights().lm_head.format(), fmt);
    }
}

#[test]
fn stop_sequences_end_generation_without_leaking_text() {
    let (m, tok) = load();
    let mut r = requests(&tok)[1].clone();
    r.params.max_tokens = 24;
    let free = generate(
        &m,
        &mut dev(),
        &mut pool(&m, 256),
        &tok,
        std::slice::from_ref(&r),
    )
    .unwrap();
    let text = &free[0].text;
    // Pick a stop string from the middle of the free-running text.
    let chars: Vec<char> = text.chars().collect();
    assert!(chars.len() >= 6, "{text:?}");
    let stop: String = chars[chars.len() / 2..chars.len() / 2 + 2].iter().collect();
    r.params.stop = vec![stop.clone()];
    let mut g = Generation::new(r.params.clone(), tok.eos_id()).unwrap();
    let mut kv = pool(&m, 256);
    let mut d = dev();
    let mut next = r.prompt.clone();
    let mut streamed = String::new();
    loop {
        let out = m
            .step(
                &mut d,
                &mut kv,
                &[SeqChunk {
                    seq: 0,
                    tokens: &next,
                }],
            )
            .unwrap();
        let ev = g.push_logits(&tok, &out.logits[0]).unwrap();
        streamed.push_str(&ev.delta);
        if ev.finish.is_some() {
            break;
        }
        next = vec![ev.token];
    }
    assert_eq!(g.finish_reason(), Some(FinishReason::Stop));
    assert_eq!(streamed, g.text());
    assert!(!streamed.contains(&stop));
    assert!(text.starts_with(&streamed));
}

#[test]
fn mixed_batch_of_prefill_and_decode_equals_separate_steps() {
    let (m, tok) = load();
    let a = prompt(&tok, "Once upon a time there was a small village");
    let b = prompt(&tok, "SELECT tenant_id FROM usage;");
    let mut d = dev();
    // Separately: A prefills then decodes one token; B prefills alone.
    let mut p = pool(&m, 64);
    m.step(&mut d, &mut p, &[SeqChunk { seq: 1, tokens: &a }])
        .unwrap();
    let a_dec = m
        .step(
            &mut d,
            &mut p,
            &[SeqChunk {
                seq: 1,
                tokens: &[42],
            }],
        )
        .unwrap();
    let b_pre = m
        .step(&mut d, &mut p, &[SeqChunk { seq: 2, tokens: &b }])
        .unwrap();
    // Together: A's decode and B's prefill in one step, plus a continued chunk of C.
    let mut p = pool(&m, 64);
    m.step(
        &mut d,
        &mut p,
        &[
            SeqChunk { seq: 1, tokens: &a },
            SeqChunk {
                seq: 3,
                tokens: &b[..4],
            },
        ],
    )
    .unwrap();
    let mixed = m
        .step(
            &mut d,
            &mut p,
            &[
                SeqChunk {
                    seq: 1,
                    tokens: &[42],
                },
                SeqChunk { seq: 2, tokens: &b },
                SeqChunk {
                    seq: 3,
                    tokens: &b[4..],
                },
            ],
        )
        .unwrap();
    assert_eq!(a_dec.logits[0], mixed.logits[0]);
    assert_eq!(b_pre.logits[0], mixed.logits[1]);
    assert_eq!(b_pre.logits[0], mixed.logits[2]);
    assert_eq!(
        mixed.per_seq.iter().map(|s| s.tokens).collect::<Vec<_>>(),
        vec![1, b.len(), b.len() - 4]
    );
}

#[test]
fn model_and_tokenizer_can_be_shared_across_worker_threads() {
    fn shared<T: Send + Sync>() {}
    fn owned<T: Send>() {}
    shared::<Model>();
    shared::<Tokenizer>();
    owned::<KvPool>();
    owned::<Generation>();
}

#[test]
fn yarn_config_runs() {
    let (m, tok) = load();
    let mut c = m.config().clone();
    c.rope_scaling = Some(serde_json::json!({
        "type": "yarn", "factor": 4.0, "original_max_position_embeddings": 512,
        "mscale": 1.0, "mscale_all_dim": 0.707
    }));
    let y = Model::from_parts(c, m.weights().clone()).unwrap();
    let ids = prompt(&tok, "Good morning!");
    let l = logits_of(&y, &ids);
    assert!(l.iter().all(|x| x.is_finite()));
    assert!(max_diff(&l, &logits_of(&m, &ids)) > 0.0);
}

#[test]
fn preemption_by_recompute_reproduces_the_continuation() {
    let (m, tok) = load();
    let r = requests(&tok)[1].clone(); // sampled, temperature 0.9
    let reference = generate(
        &m,
        &mut dev(),
        &mut pool(&m, 256),
        &tok,
        std::slice::from_ref(&r),
    )
    .unwrap();
    let mut d = dev();
    let mut kv = pool(&m, 256);
    let mut g = Generation::new(r.params.clone(), tok.eos_id()).unwrap();
    let mut next = r.prompt.clone();
    for step in 0.. {
        if step == 5 {
            // Preempt: drop the cache, recompute prompt + generated tokens in one prefill.
            kv.free(0);
            next = r.prompt.iter().chain(g.tokens()).copied().collect();
            next.pop();
            m.step(
                &mut d,
                &mut kv,
                &[SeqChunk {
                    seq: 0,
                    tokens: &next,
                }],
            )
            .unwrap();
            next = vec![*g.tokens().last().unwrap()];
        }
        let out = m
            .step(
                &mut d,
                &mut kv,
                &[SeqChunk {
                    seq: 0,
                    tokens: &next,
                }],
            )
            .unwrap();
        let ev = g.push_logits(&tok, &out.logits[0]).unwrap();
        if ev.finish.is_some() {
            break;
        }
        next = vec![ev.token];
    }
    assert_eq!(g.tokens(), reference[0].tokens.as_slice());
}

/// Plain f64 DeepSeek-V3 forward for one sequence in the unabsorbed form (keys and values
/// expanded per head through `kv_b_proj`), straight from the config's definitions.
fn reference_logits(m: &Model, ids: &[u32]) -> Vec<f64> {
    use super::weights::{Ffn, QProj};
    let c = m.config();
    let w = m.weights();
    let (h, heads) = (c.hidden_size, c.num_attention_heads);
    let (nope, rd, kvl, vd) = (
        c.qk_nope_head_dim,
        c.qk_rope_head_dim,
        c.kv_lora_rank,
        c.v_head_dim,
    );
    let qk = nope + rd;
    let eps = f64::from(c.rms_norm_eps);
    let lin = |wt: &crate::npu::LinearWeight, x: &[f64]| -> Vec<f64> {
        let d = wt.dequantize();
        let k = wt.in_features();
        (0..wt.out_features())
            .map(|o| (0..k).map(|i| f64::from(d[o * k + i]) * x[i]).sum())
            .collect()
    };
    let norm = |x: &[f64], g: &[f32]| -> Vec<f64> {
        let ms = x.iter().map(|v| v * v).sum::<f64>() / x.len() as f64;
        let inv = 1.0 / (ms + eps).sqrt();
        x.iter()
            .zip(g)
            .map(|(v, g)| v * inv * f64::from(*g))
            .collect()
    };
    let rope = |v: &mut [f64], pos: usize| {
        for i in 0..rd / 2 {
            let a = pos as f64 * c.rope_theta.powf(-2.0 * i as f64 / rd as f64);
            let (x0, x1) = (v[2 * i], v[2 * i + 1]);
            v[2 * i] = x0 * a.cos() - x1 * a.sin();
            v[2 * i + 1] = x0 * a.sin() + x1 * a.cos();
        }
    };
    let silu = |x: f64| x / (1.0 + (-x).exp());
    let mlp = |mw: &super::weights::Mlp, x: &[f64]| -> Vec<f64> {
        let g = lin(&mw.gate, x);
        let u = lin(&mw.up, x);
        let a: Vec<f64> = g.iter().zip(&u).map(|(g, u)| silu(*g) * u).collect();
        lin(&mw.down, &a)
    };
    let n = ids.len();
    let mut xs: Vec<Vec<f64>> = ids
        .iter()
        .map(|&id| {
            w.embed[id as usize * h..(id as usize + 1) * h]
                .iter()
                .map(|&v| f64::from(v))
                .collect()
        })
        .collect();
    for l in &w.layers {
        let a = &l.attn;
        let hs: Vec<Vec<f64>> = xs.iter().map(|x| norm(x, &l.input_norm)).collect();
        let mut qs = Vec::new();
        let mut ks = Vec::new();
        let mut vs = Vec::new();
        for (pos, hx) in hs.iter().enumerate() {
            let mut q = match &a.q {
                QProj::LowRank { a: qa, norm: g, b } => lin(b, &norm(&lin(qa, hx), g)),
                QProj::Direct(p) => lin(p, hx),
            };
            for hh in 0..heads {
                rope(&mut q[hh * qk + nope..(hh + 1) * qk], pos);
            }
            let kv = lin(&a.kv_a, hx);
            let c_kv = norm(&kv[..kvl], &a.kv_norm);
            let mut k_pe = kv[kvl..].to_vec();
            rope(&mut k_pe, pos);
            let up = lin(&a.kv_b, &c_kv);
            let mut k = vec![0.0; heads * qk];
            let mut v = vec![0.0; heads * vd];
            for hh in 0..heads {
                let b = hh * (nope + vd);
                k[hh * qk..hh * qk + nope].copy_from_slice(&up[b..b + nope]);
                k[hh * qk + nope..(hh + 1) * qk].copy_from_slice(&k_pe);
                v[hh * vd..(hh + 1) * vd].copy_from_slice(&up[b + nope..b + nope + vd]);
            }
            qs.push(q);
            ks.push(k);
            vs.push(v);
        }
        let scale = 1.0 / (qk as f64).sqrt();
        for i in 0..n {
            let mut o = vec![0.0; heads * vd];
            for hh in 0..heads {
                let s: Vec<f64> = (0..=i)
                    .map(|j| {
                        (0..qk)
                            .map(|d| qs[i][hh * qk + d] * ks[j][hh * qk + d])
                            .sum::<f64>()
                            * scale
                    })
                    .collect();
                let mx = s.iter().cloned().fold(f64::NEG_INFINITY, f64::max);
                let z: f64 = s.iter().map(|x| (x - mx).exp()).sum();
                for (j, sj) in s.iter().enumerate() {
                    let p = (sj - mx).exp() / z;
                    for d in 0..vd {
                        o[hh * vd + d] += p * vs[j][hh * vd + d];
                    }
                }
            }
            let y = lin(&a.o, &o);
            xs[i].iter_mut().zip(&y).for_each(|(x, y)| *x += y);
        }
        for x in xs.iter_mut() {
            let h2 = norm(x, &l.post_norm);
            let y = match &l.ffn {
                Ffn::Dense(mw) => mlp(mw, &h2),
                Ffn::Moe(mo) => {
                    let e = mo.experts.len();
                    let scores: Vec<f64> = lin(&mo.router, &h2)
                        .iter()
                        .map(|v| 1.0 / (1.0 + (-v).exp()))
                        .collect();
                    let biased: Vec<f64> = scores
                        .iter()
                        .zip(&mo.bias)
                        .map(|(s, b)| s + f64::from(*b))
                        .collect();
                    let per = e / c.n_group;
                    let mut groups: Vec<(f64, usize)> = (0..c.n_group)
                        .map(|g| {
                            let mut v = biased[g * per..(g + 1) * per].to_vec();
                            v.sort_by(|a, b| b.total_cmp(a));
                            (v.iter().take(2).sum(), g)
                        })
                        .collect();
                    groups.sort_by(|a, b| b.0.total_cmp(&a.0).then(a.1.cmp(&b.1)));
                    let mut cand: Vec<usize> = groups[..c.topk_group]
                        .iter()
                        .flat_map(|&(_, g)| g * per..(g + 1) * per)
                        .collect();
                    cand.sort_by(|&a, &b| biased[b].total_cmp(&biased[a]).then(a.cmp(&b)));
                    let chosen = &cand[..c.num_experts_per_tok.unwrap()];
                    let z: f64 = chosen.iter().map(|&i| scores[i]).sum();
                    let mut y = vec![0.0; h];
                    for &ex in chosen {
                        let wgt = scores[ex] / z * f64::from(c.routed_scaling_factor);
                        let ye = mlp(&mo.experts[ex], &h2);
                        y.iter_mut().zip(&ye).for_each(|(a, b)| *a += wgt * b);
                    }
                    if let Some(s) = &mo.shared {
                        let ys = mlp(s, &h2);
                        y.iter_mut().zip(&ys).for_each(|(a, b)| *a += b);
                    }
                    y
                }
            };
            x.iter_mut().zip(&y).for_each(|(x, y)| *x += y);
        }
    }
    lin(&w.lm_head, &norm(&xs[n - 1], &w.norm))
}

#[test]
fn absorbed_mla_and_moe_match_a_plain_f64_reference() {
    let dir = tiny_dir();
    let tok = Tokenizer::from_dir(dir).unwrap();
    // f32 weights and an f32 cache, so only accumulation order differs from the reference.
    let m = Model::load(
        dir,
        &LoadOptions {
            weight_format: Some(WeightFormat::F32),
        },
    )
    .unwrap();
    let ids = prompt(&tok, "Question: how many days are there in a week?");
    let mut p = KvPool::with_blocks(m.config(), 64, 4, KvDtype::F32).unwrap();
    // Prefill all but the last two tokens, then a chunk and a decode through the paged path.
    let n = ids.len();
    let mut d = dev();
    m.step(
        &mut d,
        &mut p,
        &[SeqChunk {
            seq: 1,
            tokens: &ids[..n - 3],
        }],
    )
    .unwrap();
    m.step(
        &mut d,
        &mut p,
        &[SeqChunk {
            seq: 1,
            tokens: &ids[n - 3..n - 1],
        }],
    )
    .unwrap();
    let got = m
        .step(
            &mut d,
            &mut p,
            &[SeqChunk {
                seq: 1,
                tokens: &ids[n - 1..],
            }],
        )
        .unwrap();
    let want = reference_logits(&m, &ids);
    let err = got.logits[0]
        .iter()
        .zip(&want)
        .map(|(a, b)| (f64::from(*a) - b).abs())
        .fold(0.0, f64::max);
    let scale = want.iter().fold(0.0f64, |a, b| a.max(b.abs()));
    eprintln!("max |logit - reference| = {err:e} (max |logit| {scale})");
    assert!(err < 1e-4 * scale.max(1.0), "{err}");
}
