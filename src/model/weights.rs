//! The model's parameters under DeepSeek-V3 tensor names: loading them from a checkpoint,
//! generating seeded random ones, and turning them back into checkpoint tensors.
//!
//! Owns the name and shape of every tensor a config implies, and the MLA "absorbed" weights
//! derived at load time (`kv_b_proj` split per head into `W_UK` transposed, which maps a query's
//! non-rotary part into the latent space, and `W_UV`, which maps the attended latent to values).
//! It must not know how the forward pass uses them, devices, caches or tokenizers.

use std::collections::BTreeMap;

use rand_chacha::ChaCha8Rng;
use rand_chacha::rand_core::{RngCore, SeedableRng};

use super::checkpoint::{FloatDtype, OwnedTensor, TensorStore, push_linear};
use super::config::ModelConfig;
use super::error::Result;
use crate::npu::{LinearWeight, WeightFormat};

/// Query projection: low-rank (DeepSeek-V3) or direct.
#[derive(Debug, Clone)]
pub enum QProj {
    /// `q_a_proj` -> `q_a_layernorm` -> `q_b_proj`.
    LowRank {
        /// `[q_lora_rank, hidden]`.
        a: LinearWeight,
        /// `[q_lora_rank]`.
        norm: Vec<f32>,
        /// `[heads * qk_head_dim, q_lora_rank]`.
        b: LinearWeight,
    },
    /// `q_proj`, `[heads * qk_head_dim, hidden]`.
    Direct(LinearWeight),
}

/// Multi-head Latent Attention weights of one layer.
#[derive(Debug, Clone)]
pub struct MlaWeights {
    /// Query projection.
    pub q: QProj,
    /// `kv_a_proj_with_mqa`, `[kv_lora_rank + qk_rope_head_dim, hidden]`.
    pub kv_a: LinearWeight,
    /// `kv_a_layernorm`, `[kv_lora_rank]`.
    pub kv_norm: Vec<f32>,
    /// `kv_b_proj`, `[heads * (qk_nope_head_dim + v_head_dim), kv_lora_rank]` (kept for saving).
    pub kv_b: LinearWeight,
    /// Per head `W_UKᵀ`, `[kv_lora_rank, qk_nope_head_dim]` (absorbed into the query).
    pub w_uk_t: Vec<LinearWeight>,
    /// Per head `W_UV`, `[v_head_dim, kv_lora_rank]` (applied after attention).
    pub w_uv: Vec<LinearWeight>,
    /// `o_proj`, `[hidden, heads * v_head_dim]`.
    pub o: LinearWeight,
}

/// A SwiGLU MLP (dense layer, one expert, or the shared experts).
#[derive(Debug, Clone)]
pub struct Mlp {
    /// `gate_proj`, `[inter, hidden]`.
    pub gate: LinearWeight,
    /// `up_proj`, `[inter, hidden]`.
    pub up: LinearWeight,
    /// `down_proj`, `[hidden, inter]`.
    pub down: LinearWeight,
}

/// The DeepSeek-V3 MoE block of one layer.
#[derive(Debug, Clone)]
pub struct MoeWeights {
    /// Router `mlp.gate.weight`, `[n_routed_experts, hidden]`, kept in f32.
    pub router: LinearWeight,
    /// `mlp.gate.e_score_correction_bias`, `[n_routed_experts]` (zeros when absent).
    pub bias: Vec<f32>,
    /// Routed experts.
    pub experts: Vec<Mlp>,
    /// Shared experts fused into one MLP of width `n_shared_experts * moe_intermediate_size`.
    pub shared: Option<Mlp>,
}

/// Feed-forward block of one layer.
#[derive(Debug, Clone)]
pub enum Ffn {
    /// Dense SwiGLU.
    Dense(Mlp),
    /// Mixture of experts.
    Moe(MoeWeights),
}

/// One decoder layer.
#[derive(Debug, Clone)]
pub struct LayerWeights {
    /// `input_layernorm`.
    pub input_norm: Vec<f32>,
    /// Attention.
    pub attn: MlaWeights,
    /// `post_attention_layernorm`.
    pub post_norm: Vec<f32>,
    /// Feed-forward.
    pub ffn: Ffn,
}

/// All parameters.
#[derive(Debug, Clone)]
pub struct ModelWeights {
    /// `model.embed_tokens.weight`, `[vocab, hidden]`, f32 on the host.
    pub embed: Vec<f32>,
    /// Layers.
    pub layers: Vec<LayerWeights>,
    /// `model.norm.weight`.
    pub norm: Vec<f32>,
    /// `lm_head.weight`, `[vocab, hidden]`.
    pub lm_head: LinearWeight,
}

/// What a tensor is, for init and loading.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TensorKind {
    /// A `Linear` weight (stored in the checkpoint's weight format).
    Linear,
    /// The router (kept in f32 on the device).
    Router,
    /// A norm weight (initialised to ones).
    Norm,
    /// The router's correction bias (initialised to zeros).
    Bias,
    /// The embedding table.
    Embedding,
}

/// Name, shape and kind of one checkpoint tensor.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TensorSpec {
    /// DeepSeek-V3 name.
    pub name: String,
    /// Shape (`[out, in]` for linear weights).
    pub shape: Vec<usize>,
    /// Kind.
    pub kind: TensorKind,
}

fn spec(name: String, shape: Vec<usize>, kind: TensorKind) -> TensorSpec {
    TensorSpec { name, shape, kind }
}

fn mlp_specs(prefix: &str, h: usize, inter: usize, out: &mut Vec<TensorSpec>) {
    use TensorKind::Linear;
    out.push(spec(
        format!("{prefix}.gate_proj.weight"),
        vec![inter, h],
        Linear,
    ));
    out.push(spec(
        format!("{prefix}.up_proj.weight"),
        vec![inter, h],
        Linear,
    ));
    out.push(spec(
        format!("{prefix}.down_proj.weight"),
        vec![h, inter],
        Linear,
    ));
}

/// Every tensor the config implies, in a stable order.
pub fn tensor_specs(c: &ModelConfig) -> Vec<TensorSpec> {
    use TensorKind::*;
    let h = c.hidden_size;
    let heads = c.num_attention_heads;
    let mut v = vec![spec(
        "model.embed_tokens.weight".into(),
        vec![c.vocab_size, h],
        Embedding,
    )];
    for i in 0..c.num_hidden_layers {
        let p = format!("model.layers.{i}");
        let a = format!("{p}.self_attn");
        v.push(spec(format!("{p}.input_layernorm.weight"), vec![h], Norm));
        match c.q_lora_rank {
            Some(r) => {
                v.push(spec(format!("{a}.q_a_proj.weight"), vec![r, h], Linear));
                v.push(spec(format!("{a}.q_a_layernorm.weight"), vec![r], Norm));
                v.push(spec(
                    format!("{a}.q_b_proj.weight"),
                    vec![heads * c.qk_head_dim(), r],
                    Linear,
                ));
            }
            None => v.push(spec(
                format!("{a}.q_proj.weight"),
                vec![heads * c.qk_head_dim(), h],
                Linear,
            )),
        }
        v.push(spec(
            format!("{a}.kv_a_proj_with_mqa.weight"),
            vec![c.kv_dim(), h],
            Linear,
        ));
        v.push(spec(
            format!("{a}.kv_a_layernorm.weight"),
            vec![c.kv_lora_rank],
            Norm,
        ));
        v.push(spec(
            format!("{a}.kv_b_proj.weight"),
            vec![heads * (c.qk_nope_head_dim + c.v_head_dim), c.kv_lora_rank],
            Linear,
        ));
        v.push(spec(
            format!("{a}.o_proj.weight"),
            vec![h, heads * c.v_head_dim],
            Linear,
        ));
        v.push(spec(
            format!("{p}.post_attention_layernorm.weight"),
            vec![h],
            Norm,
        ));
        if c.is_moe_layer(i) {
            let e = c.n_routed();
            v.push(spec(format!("{p}.mlp.gate.weight"), vec![e, h], Router));
            v.push(spec(
                format!("{p}.mlp.gate.e_score_correction_bias"),
                vec![e],
                Bias,
            ));
            for x in 0..e {
                mlp_specs(
                    &format!("{p}.mlp.experts.{x}"),
                    h,
                    c.moe_intermediate_size,
                    &mut v,
                );
            }
            if let Some(s) = c.n_shared_experts.filter(|&s| s > 0) {
                mlp_specs(
                    &format!("{p}.mlp.shared_experts"),
                    h,
                    s * c.moe_intermediate_size,
                    &mut v,
                );
            }
        } else {
            mlp_specs(&format!("{p}.mlp"), h, c.intermediate_size, &mut v);
        }
    }
    v.push(spec("model.norm.weight".into(), vec![h], Norm));
    if !c.tie_word_embeddings {
        v.push(spec("lm_head.weight".into(), vec![c.vocab_size, h], Linear));
    }
    v
}

/// Seeded standard normal samples (Box-Muller on a ChaCha8 stream).
pub(crate) struct Normal {
    rng: ChaCha8Rng,
    spare: Option<f64>,
}

impl Normal {
    pub(crate) fn new(seed: u64) -> Self {
        Self {
            rng: ChaCha8Rng::seed_from_u64(seed),
            spare: None,
        }
    }

    fn uniform(&mut self) -> f64 {
        // 53 random bits in (0, 1].
        ((self.rng.next_u64() >> 11) as f64 + 1.0) / (1u64 << 53) as f64
    }

    pub(crate) fn sample(&mut self) -> f64 {
        if let Some(s) = self.spare.take() {
            return s;
        }
        let (u1, u2) = (self.uniform(), self.uniform());
        let r = (-2.0 * u1.ln()).sqrt();
        let t = std::f64::consts::TAU * u2;
        self.spare = Some(r * t.sin());
        r * t.cos()
    }
}

/// Seeded random tensors for every spec: linear weights `N(0, std)` (std = `initializer_range`,
/// and `1/sqrt(in)` when that is larger, so tiny models are not flat), norms ones, biases zeros.
pub fn random_tensors(
    c: &ModelConfig,
    seed: u64,
    weight_format: WeightFormat,
) -> Result<BTreeMap<String, OwnedTensor>> {
    let float = match c.torch_dtype.as_deref() {
        Some("float32") => FloatDtype::F32,
        Some("float16") => FloatDtype::F16,
        _ => FloatDtype::Bf16,
    };
    let base_std = f64::from(c.initializer_range.unwrap_or(0.02));
    let mut out = BTreeMap::new();
    for (i, s) in tensor_specs(c).into_iter().enumerate() {
        // One independent stream per tensor: adding a tensor does not change the others.
        let mut rng = Normal::new(seed ^ (i as u64).wrapping_mul(0x9E37_79B9_7F4A_7C15));
        let n: usize = s.shape.iter().product();
        let std = match s.kind {
            TensorKind::Linear | TensorKind::Router => {
                base_std.max(1.0 / (s.shape[1] as f64).sqrt())
            }
            TensorKind::Embedding => 1.0,
            _ => 0.0,
        };
        let values: Vec<f32> = match s.kind {
            TensorKind::Norm => vec![1.0; n],
            TensorKind::Bias => vec![0.0; n],
            _ => (0..n).map(|_| (rng.sample() * std) as f32).collect(),
        };
        match s.kind {
            TensorKind::Linear => {
                let w = LinearWeight::from_f32(s.shape[0], s.shape[1], &values, weight_format)?;
                push_linear(&mut out, &s.name, &w);
            }
            TensorKind::Router | TensorKind::Bias => {
                out.insert(
                    s.name,
                    OwnedTensor::float(&values, s.shape, FloatDtype::F32),
                );
            }
            TensorKind::Norm | TensorKind::Embedding => {
                out.insert(s.name, OwnedTensor::float(&values, s.shape, float));
            }
        }
    }
    Ok(out)
}

fn load_mlp(st: &TensorStore, prefix: &str, h: usize, inter: usize) -> Result<Mlp> {
    Ok(Mlp {
        gate: st.linear(&format!("{prefix}.gate_proj.weight"), inter, h)?,
        up: st.linear(&format!("{prefix}.up_proj.weight"), inter, h)?,
        down: st.linear(&format!("{prefix}.down_proj.weight"), h, inter)?,
    })
}

/// Absorbed per-head weights from `kv_b_proj` (see the module docs). They keep the stored float
/// format; int8/FP8 sources are re-stored as bf16 (their per-head slices do not align with the
/// quantisation blocks).
fn absorb(c: &ModelConfig, kv_b: &LinearWeight) -> Result<(Vec<LinearWeight>, Vec<LinearWeight>)> {
    let (nope, vd, r) = (c.qk_nope_head_dim, c.v_head_dim, c.kv_lora_rank);
    let fmt = match kv_b.format() {
        f @ (WeightFormat::F32 | WeightFormat::F16 | WeightFormat::Bf16) => f,
        _ => WeightFormat::Bf16,
    };
    let w = kv_b.dequantize();
    let mut uk_t = Vec::with_capacity(c.num_attention_heads);
    let mut uv = Vec::with_capacity(c.num_attention_heads);
    for h in 0..c.num_attention_heads {
        let base = h * (nope + vd);
        // W_UK rows base..base+nope are [nope, r]; store the transpose [r, nope].
        let mut t = vec![0.0f32; r * nope];
        for d in 0..nope {
            for j in 0..r {
                t[j * nope + d] = w[(base + d) * r + j];
            }
        }
        uk_t.push(LinearWeight::from_f32(r, nope, &t, fmt)?);
        let v = &w[(base + nope) * r..(base + nope + vd) * r];
        uv.push(LinearWeight::from_f32(vd, r, v, fmt)?);
    }
    Ok((uk_t, uv))
}

impl ModelWeights {
    /// Loads every tensor the config implies; a missing or mis-shaped tensor is an error naming
    /// it. With `format`, weights are re-quantised to it after loading (e.g. bf16 -> int8).
    pub fn load(c: &ModelConfig, st: &TensorStore, format: Option<WeightFormat>) -> Result<Self> {
        let h = c.hidden_size;
        let heads = c.num_attention_heads;
        let conv = |w: LinearWeight| -> Result<LinearWeight> {
            match format {
                Some(f) if f != w.format() => Ok(LinearWeight::from_f32(
                    w.out_features(),
                    w.in_features(),
                    &w.dequantize(),
                    f,
                )?),
                _ => Ok(w),
            }
        };
        let lin = |name: String, o: usize, i: usize| -> Result<LinearWeight> {
            conv(st.linear(&name, o, i)?)
        };
        let embed = st.f32_tensor("model.embed_tokens.weight", &[c.vocab_size, h])?;
        let mut layers = Vec::with_capacity(c.num_hidden_layers);
        for i in 0..c.num_hidden_layers {
            let p = format!("model.layers.{i}");
            let a = format!("{p}.self_attn");
            let q = match c.q_lora_rank {
                Some(r) => QProj::LowRank {
                    a: lin(format!("{a}.q_a_proj.weight"), r, h)?,
                    norm: st.f32_tensor(&format!("{a}.q_a_layernorm.weight"), &[r])?,
                    b: lin(format!("{a}.q_b_proj.weight"), heads * c.qk_head_dim(), r)?,
                },
                None => QProj::Direct(lin(
                    format!("{a}.q_proj.weight"),
                    heads * c.qk_head_dim(),
                    h,
                )?),
            };
            let kv_b = lin(
                format!("{a}.kv_b_proj.weight"),
                heads * (c.qk_nope_head_dim + c.v_head_dim),
                c.kv_lora_rank,
            )?;
            let (w_uk_t, w_uv) = absorb(c, &kv_b)?;
            let attn = MlaWeights {
                q,
                kv_a: lin(format!("{a}.kv_a_proj_with_mqa.weight"), c.kv_dim(), h)?,
                kv_norm: st.f32_tensor(&format!("{a}.kv_a_layernorm.weight"), &[c.kv_lora_rank])?,
                kv_b,
                w_uk_t,
                w_uv,
                o: lin(format!("{a}.o_proj.weight"), h, heads * c.v_head_dim)?,
            };
            let ffn = if c.is_moe_layer(i) {
                let e = c.n_routed();
                let router_name = format!("{p}.mlp.gate.weight");
                let router = st.f32_tensor(&router_name, &[e, h])?;
                let router = LinearWeight::from_f32(e, h, &router, WeightFormat::F32)?;
                let bias_name = format!("{p}.mlp.gate.e_score_correction_bias");
                let bias = if st.contains(&bias_name) {
                    st.f32_tensor(&bias_name, &[e])?
                } else {
                    vec![0.0; e]
                };
                let mut experts = Vec::with_capacity(e);
                for x in 0..e {
                    let m = load_mlp(
                        st,
                        &format!("{p}.mlp.experts.{x}"),
                        h,
                        c.moe_intermediate_size,
                    )?;
                    experts.push(Mlp {
                        gate: conv(m.gate)?,
                        up: conv(m.up)?,
                        down: conv(m.down)?,
                    });
                }
                let shared = match c.n_shared_experts.filter(|&s| s > 0) {
                    Some(s) => {
                        let m = load_mlp(
                            st,
                            &format!("{p}.mlp.shared_experts"),
                            h,
                            s * c.moe_intermediate_size,
                        )?;
                        Some(Mlp {
                            gate: conv(m.gate)?,
                            up: conv(m.up)?,
                            down: conv(m.down)?,
                        })
                    }
                    None => None,
                };
                Ffn::Moe(MoeWeights {
                    router,
                    bias,
                    experts,
                    shared,
                })
            } else {
                let m = load_mlp(st, &format!("{p}.mlp"), h, c.intermediate_size)?;
                Ffn::Dense(Mlp {
                    gate: conv(m.gate)?,
                    up: conv(m.up)?,
                    down: conv(m.down)?,
                })
            };
            layers.push(LayerWeights {
                input_norm: st.f32_tensor(&format!("{p}.input_layernorm.weight"), &[h])?,
                attn,
                post_norm: st.f32_tensor(&format!("{p}.post_attention_layernorm.weight"), &[h])?,
                ffn,
            });
        }
        let norm = st.f32_tensor("model.norm.weight", &[h])?;
        let lm_head = if c.tie_word_embeddings {
            conv(LinearWeight::from_f32(
                c.vocab_size,
                h,
                &embed,
                WeightFormat::Bf16,
            )?)?
        } else {
            lin("lm_head.weight".into(), c.vocab_size, h)?
        };
        Ok(Self {
            embed,
            layers,
            norm,
            lm_head,
        })
    }

    /// Checkpoint tensors of these weights (floats as f32, so a save-load round trip is exact).
    pub fn to_tensors(&self, c: &ModelConfig) -> BTreeMap<String, OwnedTensor> {
        let h = c.hidden_size;
        let mut out = BTreeMap::new();
        let vec_t = |out: &mut BTreeMap<String, OwnedTensor>, name: String, v: &[f32]| {
            out.insert(name, OwnedTensor::float(v, vec![v.len()], FloatDtype::F32));
        };
        out.insert(
            "model.embed_tokens.weight".into(),
            OwnedTensor::float(&self.embed, vec![c.vocab_size, h], FloatDtype::F32),
        );
        let mlp = |out: &mut BTreeMap<String, OwnedTensor>, p: &str, m: &Mlp| {
            push_linear(out, &format!("{p}.gate_proj.weight"), &m.gate);
            push_linear(out, &format!("{p}.up_proj.weight"), &m.up);
            push_linear(out, &format!("{p}.down_proj.weight"), &m.down);
        };
        for (i, l) in self.layers.iter().enumerate() {
            let p = format!("model.layers.{i}");
            let a = format!("{p}.self_attn");
            vec_t(
                &mut out,
                format!("{p}.input_layernorm.weight"),
                &l.input_norm,
            );
            vec_t(
                &mut out,
                format!("{p}.post_attention_layernorm.weight"),
                &l.post_norm,
            );
            match &l.attn.q {
                QProj::LowRank { a: qa, norm, b } => {
                    push_linear(&mut out, &format!("{a}.q_a_proj.weight"), qa);
                    vec_t(&mut out, format!("{a}.q_a_layernorm.weight"), norm);
                    push_linear(&mut out, &format!("{a}.q_b_proj.weight"), b);
                }
                QProj::Direct(q) => push_linear(&mut out, &format!("{a}.q_proj.weight"), q),
            }
            push_linear(
                &mut out,
                &format!("{a}.kv_a_proj_with_mqa.weight"),
                &l.attn.kv_a,
            );
            vec_t(
                &mut out,
                format!("{a}.kv_a_layernorm.weight"),
                &l.attn.kv_norm,
            );
            push_linear(&mut out, &format!("{a}.kv_b_proj.weight"), &l.attn.kv_b);
            push_linear(&mut out, &format!("{a}.o_proj.weight"), &l.attn.o);
            match &l.ffn {
                Ffn::Dense(m) => mlp(&mut out, &format!("{p}.mlp"), m),
                Ffn::Moe(m) => {
                    out.insert(
                        format!("{p}.mlp.gate.weight"),
                        OwnedTensor::float(
                            &m.router.dequantize(),
                            vec![m.router.out_features(), h],
                            FloatDtype::F32,
                        ),
                    );
                    vec_t(
                        &mut out,
                        format!("{p}.mlp.gate.e_score_correction_bias"),
                        &m.bias,
                    );
                    for (x, e) in m.experts.iter().enumerate() {
                        mlp(&mut out, &format!("{p}.mlp.experts.{x}"), e);
                    }
                    if let Some(s) = &m.shared {
                        mlp(&mut out, &format!("{p}.mlp.shared_experts"), s);
                    }
                }
            }
        }
        vec_t(&mut out, "model.norm.weight".into(), &self.norm);
        if !c.tie_word_embeddings {
            push_linear(&mut out, "lm_head.weight", &self.lm_head);
        }
        out
    }

    /// Device bytes the weights occupy (what the KV pool must leave free in HBM).
    pub fn device_bytes(&self) -> u64 {
        let mlp = |m: &Mlp| m.gate.storage_bytes() + m.up.storage_bytes() + m.down.storage_bytes();
        let mut b = 2 * self.embed.len() as u64 + self.lm_head.storage_bytes();
        for l in &self.layers {
            let a = &l.attn;
            b += match &a.q {
                QProj::LowRank { a, b: qb, norm } => {
                    a.storage_bytes() + qb.storage_bytes() + 2 * norm.len() as u64
                }
                QProj::Direct(q) => q.storage_bytes(),
            };
            b += a.kv_a.storage_bytes() + a.kv_b.storage_bytes() + a.o.storage_bytes();
            b += match &l.ffn {
                Ffn::Dense(m) => mlp(m),
                Ffn::Moe(m) => {
                    m.router.storage_bytes()
                        + m.experts.iter().map(mlp).sum::<u64>()
                        + m.shared.as_ref().map_or(0, mlp)
                }
            };
        }
        b
    }
}
