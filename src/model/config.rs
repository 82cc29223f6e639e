//! The model configuration: a Hugging Face style `config.json` with DeepSeek-V3 field names,
//! its validation, and the `tiny` / `small` presets that `init_model_dir` writes.
//!
//! Owns the schema (unknown fields are accepted and ignored, as real configs carry many), the
//! checks that make every later shape computation safe, and derived sizes (KV bytes per token,
//! parameter counts). It must not know tensors, kernels, devices or tokenizers.

use std::path::Path;

use serde::{Deserialize, Serialize};

use super::error::{ModelError, Result, config_err, io_err};

fn default_rms_norm_eps() -> f32 {
    1e-6
}
fn default_rope_theta() -> f64 {
    10000.0
}
fn default_scaling() -> f32 {
    1.0
}
fn default_one() -> usize {
    1
}
fn default_true() -> bool {
    true
}
fn default_sigmoid() -> String {
    "sigmoid".to_string()
}
fn default_max_pos() -> usize {
    4096
}
fn default_act() -> String {
    "silu".to_string()
}
fn default_model_type() -> String {
    "deepseek_v3".to_string()
}

/// A DeepSeek-V3 style configuration (field names as in the published `config.json`).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ModelConfig {
    /// `deepseek_v3` (informational).
    #[serde(default = "default_model_type")]
    pub model_type: String,
    /// Vocabulary size (rows of the embedding and LM head).
    pub vocab_size: usize,
    /// Model width.
    pub hidden_size: usize,
    /// Transformer layers (multi-token-prediction layers are not counted, as in DeepSeek-V3).
    pub num_hidden_layers: usize,
    /// Attention heads.
    pub num_attention_heads: usize,
    /// KV heads; MLA has one shared latent, so this is informational and must equal the heads
    /// when present.
    #[serde(default)]
    pub num_key_value_heads: Option<usize>,
    /// Rank of the query down-projection; `null` means a direct `q_proj`.
    #[serde(default)]
    pub q_lora_rank: Option<usize>,
    /// Rank of the compressed KV latent (what the cache stores).
    pub kv_lora_rank: usize,
    /// Rotary (decoupled) part of each query/key head.
    pub qk_rope_head_dim: usize,
    /// Non-rotary part of each query/key head.
    pub qk_nope_head_dim: usize,
    /// Value head dim.
    pub v_head_dim: usize,
    /// Dense SwiGLU width (first `first_k_dense_replace` layers).
    pub intermediate_size: usize,
    /// Width of one routed or shared expert.
    #[serde(default)]
    pub moe_intermediate_size: usize,
    /// Routed experts per MoE layer (`null` or 0: every layer dense).
    #[serde(default)]
    pub n_routed_experts: Option<usize>,
    /// Shared experts per MoE layer (their MLP width is `n_shared_experts * moe_intermediate_size`).
    #[serde(default)]
    pub n_shared_experts: Option<usize>,
    /// Routed experts per token.
    #[serde(default)]
    pub num_experts_per_tok: Option<usize>,
    /// Expert groups.
    #[serde(default = "default_one")]
    pub n_group: usize,
    /// Groups kept per token.
    #[serde(default = "default_one")]
    pub topk_group: usize,
    /// Layers `0..first_k_dense_replace` are dense.
    #[serde(default)]
    pub first_k_dense_replace: usize,
    /// A layer `i >= first_k_dense_replace` is MoE when `i % moe_layer_freq == 0` (DeepSeek-V3: 1).
    #[serde(default = "default_one")]
    pub moe_layer_freq: usize,
    /// Multiplier of the routed weights.
    #[serde(default = "default_scaling")]
    pub routed_scaling_factor: f32,
    /// Routing method; only DeepSeek-V3's `noaux_tc` is implemented.
    #[serde(default)]
    pub topk_method: Option<String>,
    /// Normalise the top-k weights.
    #[serde(default = "default_true")]
    pub norm_topk_prob: bool,
    /// `sigmoid` (DeepSeek-V3) or `softmax`.
    #[serde(default = "default_sigmoid")]
    pub scoring_func: String,
    /// Rotary base.
    #[serde(default = "default_rope_theta")]
    pub rope_theta: f64,
    /// Rope scaling: `null` or DeepSeek-V3's YaRN object (see `model::rope`).
    #[serde(default)]
    pub rope_scaling: Option<serde_json::Value>,
    /// RMSNorm epsilon.
    #[serde(default = "default_rms_norm_eps")]
    pub rms_norm_eps: f32,
    /// Context window.
    #[serde(default = "default_max_pos")]
    pub max_position_embeddings: usize,
    /// Must be `silu`.
    #[serde(default = "default_act")]
    pub hidden_act: String,
    /// Tie LM head to the embedding (DeepSeek-V3: false).
    #[serde(default)]
    pub tie_word_embeddings: bool,
    /// Beginning-of-sequence token id.
    #[serde(default)]
    pub bos_token_id: Option<u32>,
    /// End-of-sequence token id.
    #[serde(default)]
    pub eos_token_id: Option<u32>,
    /// Std of the random init written by `init_model_dir`.
    #[serde(default)]
    pub initializer_range: Option<f32>,
    /// `bfloat16` / `float16` / `float32`: the dtype `init_model_dir` writes.
    #[serde(default)]
    pub torch_dtype: Option<String>,
}

/// Named sizes `init_model_dir` can write.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Preset {
    /// For tests: a step runs in milliseconds.
    Tiny,
    /// The default served model: tens of millions of parameters.
    Small,
    /// `small`'s layers on DeepSeek V4's own tokenizer (129,280 ids), with
    /// a narrower hidden size and the embedding tied to the output layer so
    /// the large vocabulary does not dominate every decode step.
    V4Small,
}

impl std::str::FromStr for Preset {
    type Err = ModelError;
    fn from_str(s: &str) -> Result<Self> {
        match s {
            "tiny" => Ok(Self::Tiny),
            "small" => Ok(Self::Small),
            "v4-small" => Ok(Self::V4Small),
            other => Err(config_err(
                "preset",
                format!("unknown preset `{other}` (expected tiny, small or v4-small)"),
            )),
        }
    }
}

impl Preset {
    /// Target vocabulary of the BPE trainer for this preset.
    pub fn vocab_target(self) -> usize {
        match self {
            Self::Tiny => 512,
            Self::Small | Self::V4Small => 4096,
        }
    }

    /// The tokenizer this preset is built on, when it is not trained.
    pub fn tokenizer(self) -> Option<crate::model::vendored::TokenizerSource> {
        use crate::model::vendored::{TokenizerSource, VendoredTokenizer};
        match self {
            Self::Tiny | Self::Small => None,
            Self::V4Small => Some(TokenizerSource::Vendored(VendoredTokenizer::DeepSeekV4)),
        }
    }

    /// The configuration of this preset with `vocab_size` from the trained tokenizer.
    pub fn config(self, vocab_size: usize) -> ModelConfig {
        let base = ModelConfig {
            model_type: default_model_type(),
            vocab_size,
            hidden_size: 64,
            num_hidden_layers: 2,
            num_attention_heads: 4,
            num_key_value_heads: Some(4),
            q_lora_rank: Some(48),
            kv_lora_rank: 32,
            qk_rope_head_dim: 8,
            qk_nope_head_dim: 16,
            v_head_dim: 16,
            intermediate_size: 128,
            moe_intermediate_size: 32,
            n_routed_experts: Some(8),
            n_shared_experts: Some(1),
            num_experts_per_tok: Some(2),
            n_group: 4,
            topk_group: 2,
            first_k_dense_replace: 1,
            moe_layer_freq: 1,
            routed_scaling_factor: 2.5,
            norm_topk_prob: true,
            topk_method: Some("noaux_tc".into()),
            scoring_func: default_sigmoid(),
            rope_theta: 10000.0,
            rope_scaling: None,
            rms_norm_eps: 1e-6,
            max_position_embeddings: 2048,
            hidden_act: default_act(),
            tie_word_embeddings: false,
            bos_token_id: None,
            eos_token_id: None,
            initializer_range: Some(0.02),
            torch_dtype: Some("bfloat16".into()),
        };
        let small = ModelConfig {
            hidden_size: 512,
            num_hidden_layers: 6,
            num_attention_heads: 8,
            num_key_value_heads: Some(8),
            q_lora_rank: Some(256),
            kv_lora_rank: 128,
            qk_rope_head_dim: 32,
            qk_nope_head_dim: 64,
            v_head_dim: 64,
            intermediate_size: 1408,
            moe_intermediate_size: 256,
            n_routed_experts: Some(16),
            n_shared_experts: Some(1),
            num_experts_per_tok: Some(4),
            n_group: 4,
            topk_group: 2,
            max_position_embeddings: 4096,
            ..base.clone()
        };
        match self {
            Self::Tiny => base,
            Self::Small => small,
            Self::V4Small => ModelConfig {
                hidden_size: 256,
                q_lora_rank: Some(128),
                tie_word_embeddings: true,
                ..small
            },
        }
    }
}

impl ModelConfig {
    /// Reads and validates `config.json`.
    pub fn from_file(path: &Path) -> Result<Self> {
        let text = std::fs::read_to_string(path).map_err(|e| io_err(path, e))?;
        Self::from_json_str(&text, &path.display().to_string())
    }

    /// Parses and validates a config from JSON text (`source` names it in errors).
    pub fn from_json_str(text: &str, source: &str) -> Result<Self> {
        let c: Self = serde_json::from_str(text).map_err(|e| ModelError::ConfigParse {
            path: source.to_string(),
            message: e.to_string(),
        })?;
        c.validate()?;
        Ok(c)
    }

    /// Whether layer `i` uses the MoE block (DeepSeek-V3 rule).
    pub fn is_moe_layer(&self, i: usize) -> bool {
        self.n_routed() > 0
            && i >= self.first_k_dense_replace
            && i.is_multiple_of(self.moe_layer_freq.max(1))
    }

    /// Routed experts (0 when the model is dense).
    pub fn n_routed(&self) -> usize {
        self.n_routed_experts.unwrap_or(0)
    }

    /// Query/key head dim (`qk_nope_head_dim + qk_rope_head_dim`).
    pub fn qk_head_dim(&self) -> usize {
        self.qk_nope_head_dim + self.qk_rope_head_dim
    }

    /// Elements one token occupies in the MLA cache per layer: the latent plus the rope key.
    pub fn kv_dim(&self) -> usize {
        self.kv_lora_rank + self.qk_rope_head_dim
    }

    /// Checks every field later code relies on; the error names the field.
    pub fn validate(&self) -> Result<()> {
        let positive = [
            ("vocab_size", self.vocab_size),
            ("hidden_size", self.hidden_size),
            ("num_hidden_layers", self.num_hidden_layers),
            ("num_attention_heads", self.num_attention_heads),
            ("kv_lora_rank", self.kv_lora_rank),
            ("qk_rope_head_dim", self.qk_rope_head_dim),
            ("qk_nope_head_dim", self.qk_nope_head_dim),
            ("v_head_dim", self.v_head_dim),
            ("intermediate_size", self.intermediate_size),
            ("max_position_embeddings", self.max_position_embeddings),
            ("n_group", self.n_group),
            ("topk_group", self.topk_group),
            ("moe_layer_freq", self.moe_layer_freq),
        ];
        for (field, v) in positive {
            if v == 0 {
                return Err(config_err(field, "must be > 0"));
            }
        }
        if self.vocab_size > u32::MAX as usize {
            return Err(config_err("vocab_size", "must fit in u32 token ids"));
        }
        if !self.qk_rope_head_dim.is_multiple_of(2) {
            return Err(config_err(
                "qk_rope_head_dim",
                format!("must be even, got {}", self.qk_rope_head_dim),
            ));
        }
        if let Some(r) = self.q_lora_rank
            && r == 0
        {
            return Err(config_err("q_lora_rank", "must be > 0 or null"));
        }
        if let Some(kv) = self.num_key_value_heads
            && kv != self.num_attention_heads
        {
            return Err(config_err(
                "num_key_value_heads",
                format!(
                    "MLA shares one latent across heads: must equal num_attention_heads ({}), got {kv}",
                    self.num_attention_heads
                ),
            ));
        }
        if self.hidden_act != "silu" {
            return Err(config_err(
                "hidden_act",
                format!("only `silu` is supported, got `{}`", self.hidden_act),
            ));
        }
        if !(self.rope_theta.is_finite() && self.rope_theta > 1.0) {
            return Err(config_err("rope_theta", "must be finite and > 1"));
        }
        super::rope::parse_scaling(self)?;
        if let Some(m) = &self.topk_method
            && m != "noaux_tc"
        {
            return Err(config_err(
                "topk_method",
                format!("only `noaux_tc` (DeepSeek-V3 routing) is supported, got `{m}`"),
            ));
        }
        if !(self.rms_norm_eps.is_finite() && self.rms_norm_eps > 0.0) {
            return Err(config_err("rms_norm_eps", "must be finite and > 0"));
        }
        for (field, id) in [
            ("bos_token_id", self.bos_token_id),
            ("eos_token_id", self.eos_token_id),
        ] {
            if let Some(id) = id
                && id as usize >= self.vocab_size
            {
                return Err(config_err(
                    field,
                    format!("{id} >= vocab_size {}", self.vocab_size),
                ));
            }
        }
        if let Some(t) = &self.torch_dtype
            && !matches!(t.as_str(), "bfloat16" | "float16" | "float32")
        {
            return Err(config_err(
                "torch_dtype",
                format!("expected bfloat16, float16 or float32, got `{t}`"),
            ));
        }
        if self.first_k_dense_replace > self.num_hidden_layers {
            return Err(config_err(
                "first_k_dense_replace",
                format!(
                    "{} exceeds num_hidden_layers {}",
                    self.first_k_dense_replace, self.num_hidden_layers
                ),
            ));
        }
        let e = self.n_routed();
        if e > 0 {
            if self.moe_intermediate_size == 0 {
                return Err(config_err(
                    "moe_intermediate_size",
                    "must be > 0 with experts",
                ));
            }
            if !e.is_multiple_of(self.n_group) {
                return Err(config_err(
                    "n_group",
                    format!("{} must divide n_routed_experts {e}", self.n_group),
                ));
            }
            if self.topk_group > self.n_group {
                return Err(config_err(
                    "topk_group",
                    format!("{} exceeds n_group {}", self.topk_group, self.n_group),
                ));
            }
            let k = self.num_experts_per_tok.unwrap_or(0);
            let reachable = self.topk_group * (e / self.n_group);
            if k == 0 || k > reachable {
                return Err(config_err(
                    "num_experts_per_tok",
                    format!("{k} must be in 1..={reachable} (topk_group x experts per group)"),
                ));
            }
            if !matches!(self.scoring_func.as_str(), "sigmoid" | "softmax") {
                return Err(config_err(
                    "scoring_func",
                    format!("expected sigmoid or softmax, got `{}`", self.scoring_func),
                ));
            }
            if !(self.routed_scaling_factor.is_finite() && self.routed_scaling_factor > 0.0) {
                return Err(config_err(
                    "routed_scaling_factor",
                    "must be finite and > 0",
                ));
            }
        }
        Ok(())
    }

    /// Parameters of the executable model (embeddings and LM head included).
    pub fn param_count(&self) -> u64 {
        self.params(false)
    }

    /// Parameters one token activates (routed experts counted `num_experts_per_tok` times).
    pub fn active_param_count(&self) -> u64 {
        self.params(true)
    }

    fn params(&self, active: bool) -> u64 {
        let h = self.hidden_size as u64;
        let heads = self.num_attention_heads as u64;
        let qk = self.qk_head_dim() as u64;
        let q = match self.q_lora_rank {
            Some(r) => h * r as u64 + r as u64 + r as u64 * heads * qk,
            None => h * heads * qk,
        };
        let kvl = self.kv_lora_rank as u64;
        let attn = q
            + h * (kvl + self.qk_rope_head_dim as u64)
            + kvl
            + kvl * heads * (self.qk_nope_head_dim + self.v_head_dim) as u64
            + heads * self.v_head_dim as u64 * h;
        let mut total = 0u64;
        for i in 0..self.num_hidden_layers {
            total += attn + 2 * h;
            if self.is_moe_layer(i) {
                let mi = self.moe_intermediate_size as u64;
                let expert = 3 * h * mi;
                let shared = self.n_shared_experts.unwrap_or(0) as u64 * expert;
                let e = self.n_routed() as u64;
                let routed = if active {
                    self.num_experts_per_tok.unwrap_or(0) as u64
                } else {
                    e
                };
                total += routed * expert + shared + e * h + e;
            } else {
                total += 3 * h * self.intermediate_size as u64;
            }
        }
        let emb = self.vocab_size as u64 * h;
        total
            + h
            + if self.tie_word_embeddings {
                emb
            } else {
                2 * emb
            }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn tiny_json() -> serde_json::Value {
        serde_json::to_value(Preset::Tiny.config(512)).unwrap()
    }

    #[test]
    fn presets_validate_and_small_is_tens_of_millions() {
        Preset::Tiny.config(512).validate().unwrap();
        let s = Preset::Small.config(4096);
        s.validate().unwrap();
        let p = s.param_count();
        assert!((10_000_000..100_000_000).contains(&p), "{p}");
        assert!(s.active_param_count() < p);
    }

    #[test]
    fn validation_names_the_field() {
        let cases = [
            ("hidden_size", serde_json::json!(0)),
            ("n_group", serde_json::json!(3)),
            ("num_experts_per_tok", serde_json::json!(7)),
            ("qk_rope_head_dim", serde_json::json!(7)),
            ("hidden_act", serde_json::json!("gelu")),
            ("rope_scaling", serde_json::json!({"type": "yarn"})),
            ("topk_method", serde_json::json!("greedy")),
            ("num_key_value_heads", serde_json::json!(2)),
            ("eos_token_id", serde_json::json!(100000)),
        ];
        for (field, value) in cases {
            let mut v = tiny_json();
            v[field] = value;
            let e = ModelConfig::from_json_str(&v.to_string(), "test").unwrap_err();
            assert!(e.to_string().contains(field), "{field}: {e}");
        }
    }

    #[test]
    fn missing_required_field_is_named_and_unknown_fields_ignored() {
        let mut v = tiny_json();
        v.as_object_mut().unwrap().remove("kv_lora_rank");
        let e = ModelConfig::from_json_str(&v.to_string(), "test").unwrap_err();
        assert!(e.to_string().contains("kv_lora_rank"), "{e}");
        let mut v = tiny_json();
        v["architectures"] = serde_json::json!(["DeepseekV3ForCausalLM"]);
        ModelConfig::from_json_str(&v.to_string(), "test").unwrap();
    }
}
