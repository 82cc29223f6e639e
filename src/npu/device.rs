//! The emulated device: owns a [`DeviceProfile`] and a [`Profiler`], launches kernels, and
//! records for each launch its cost (flops, HBM bytes, tiles, pipe times, device time, energy)
//! and the host CPU time it took.
//!
//! Owns the description of each kernel as a [`Workload`] for the cost model (which pipe does
//! what, how many bytes move, how the work is tiled). It must not know tenants, batching, async
//! or I/O; callers decide what a step is and read its totals with [`Device::take_step`].

use std::time::Instant;

use super::cost::{CubeWork, LaunchCost, VectorWork, Workload, estimate};
use super::error::{Result, check_len};
use super::format::WeightFormat;
use super::kernels::attention::{self, AttnShape, Values};
use super::kernels::elementwise;
use super::kernels::kv_cache::PagedKvCache;
use super::kernels::matmul;
use super::kernels::moe::{self, Dispatch, GateConfig, Routing};
use super::kernels::rope::{self, Rope};
use super::profile::{CubePrecision, DeviceProfile};
use super::profiler::{OpTotals, Profiler};
use super::tiling::{matmul_tiling, vector_tiling};
use super::weights::LinearWeight;

/// Bytes per activation element in device memory (activations live in fp16/bf16 on the NPU).
pub const ACT_BYTES: u64 = 2;

/// One emulated accelerator.
///
/// Each method runs one kernel and records one launch, named like the operator it stands for:
///
/// | method | op name | closest CANN / torch_npu fused operator |
/// |---|---|---|
/// | [`Device::linear`] | `matmul_{f32,f16,bf16,w8a8,fp8}` | `MatMulV2`, `npu_quant_matmul` |
/// | [`Device::grouped_linear`] | `grouped_matmul` | `npu_grouped_matmul` |
/// | [`Device::rms_norm`] | `rms_norm` | `npu_rms_norm` |
/// | [`Device::swiglu`] | `swiglu` | `npu_swiglu` |
/// | [`Device::rope`] | `rope` | `npu_rotary_mul` |
/// | [`Device::prefill_attention`] | `prefill_attention`, `rope_prefill_attention` | `npu_fused_infer_attention_score` |
/// | [`Device::decode_attention`] | `decode_attention` | paged `npu_fused_infer_attention_score` |
/// | [`Device::cache_kv`] | `cache_kv` | `reshape_and_cache` |
/// | [`Device::moe_gate`] | `moe_gate` | `npu_moe_gating_top_k` |
/// | [`Device::moe_dispatch`] / [`Device::moe_combine`] | `moe_dispatch` / `moe_combine` | `npu_moe_init_routing` / `npu_moe_finalize_routing` |
/// | [`Device::softmax`] / [`Device::log_softmax`] | `softmax` / `log_softmax` | `SoftmaxV2` / `LogSoftmaxV2` |
#[derive(Debug)]
pub struct Device {
    profile: DeviceProfile,
    profiler: Profiler,
}

fn elapsed_us(start: Instant) -> f64 {
    start.elapsed().as_secs_f64() * 1e6
}

impl Device {
    /// A device with this profile (validated) and a default profiler.
    pub fn new(profile: DeviceProfile) -> Result<Self> {
        profile.validate()?;
        Ok(Self {
            profile,
            profiler: Profiler::default(),
        })
    }

    /// A device with this profile and a caller-configured profiler (e.g. a different trace
    /// capacity).
    pub fn with_profiler(profile: DeviceProfile, profiler: Profiler) -> Result<Self> {
        profile.validate()?;
        Ok(Self { profile, profiler })
    }

    /// A device from a builtin profile name.
    pub fn builtin(name: &str) -> Result<Self> {
        Self::new(DeviceProfile::builtin(name)?)
    }

    /// The profile.
    pub fn profile(&self) -> &DeviceProfile {
        &self.profile
    }

    /// The profiler (tables, traces, per-op totals).
    pub fn profiler(&self) -> &Profiler {
        &self.profiler
    }

    /// The profiler, mutably (reset, custom records).
    pub fn profiler_mut(&mut self) -> &mut Profiler {
        &mut self.profiler
    }

    /// Totals since the previous call (device time, energy, ...): "this batch step".
    pub fn take_step(&mut self) -> OpTotals {
        self.profiler.take_step()
    }

    /// Cost of a workload on this device, without recording it.
    pub fn estimate(&self, w: &Workload) -> LaunchCost {
        estimate(&self.profile, w)
    }

    fn record(&mut self, w: &Workload, start: Instant) -> LaunchCost {
        let cpu_us = elapsed_us(start);
        let cost = estimate(&self.profile, w);
        self.profiler.record(cost.clone(), start, cpu_us);
        cost
    }

    fn vector_workload(
        &self,
        op: &'static str,
        elems: usize,
        row: usize,
        ops_per_elem: f64,
        read: u64,
        written: u64,
    ) -> Workload {
        let t = vector_tiling(&self.profile, elems, row, 3 * 4, ACT_BYTES as usize);
        Workload {
            op,
            flops: 0.0,
            cube: None,
            vector: Some(VectorWork::from_tiling(ops_per_elem * elems as f64, &t)),
            bytes_read: read,
            bytes_written: written,
            workspace_bytes: 0,
        }
    }

    /// Workload of `x[m, k] · Wᵀ` (exposed so callers can cost shapes without running them).
    pub fn linear_workload(&self, m: usize, w: &LinearWeight) -> Workload {
        let (n, k) = (w.out_features(), w.in_features());
        self.linear_shape_workload(m, n, k, w.format(), w.storage_bytes())
    }

    /// Workload of `x[m, k] · Wᵀ` for a weight of `n x k` in `format` taking
    /// `weight_bytes`, without the weight: for costing shapes too large to
    /// hold, such as a served-as model's layers.
    pub fn linear_shape_workload(
        &self,
        m: usize,
        n: usize,
        k: usize,
        format: WeightFormat,
        weight_bytes: u64,
    ) -> Workload {
        let precision = CubePrecision::for_weight(format);
        let in_bytes = match format {
            WeightFormat::Fp8E4m3 if !self.profile.has_native_fp8() => 2,
            f => f.bytes_per_element(),
        };
        let t = matmul_tiling(&self.profile, m, n, k, in_bytes);
        let op = match format {
            WeightFormat::F32 => "matmul_f32",
            WeightFormat::F16 => "matmul_f16",
            WeightFormat::Bf16 => "matmul_bf16",
            WeightFormat::Int8 => "matmul_w8a8",
            WeightFormat::Fp8E4m3 => "matmul_fp8",
        };
        // Vector work: quantising activations (int8/FP8: amax, scale, round: ~4 ops/element),
        // dequantising the int32/fp32 accumulators (~2 ops/output, FP8: per 128-deep block),
        // and on devices without FP8, decoding weight tiles to fp16 once per M block row.
        // The elements the vector cores sweep decide how many tiles (and cores) share the work.
        let mut vec_ops = 0.0;
        let mut vec_elems = m * k.max(n);
        match format {
            WeightFormat::Int8 => vec_ops += 4.0 * (m * k) as f64 + 2.0 * (m * n) as f64,
            WeightFormat::Fp8E4m3 => {
                vec_ops += 4.0 * (m * k) as f64 + 2.0 * (m * n * k.div_ceil(128)) as f64;
                if !self.profile.has_native_fp8() {
                    vec_ops += 2.0 * (n * k * t.tiles_m) as f64;
                    vec_elems = vec_elems.max(n * k * t.tiles_m);
                }
            }
            _ => {}
        }
        let vector = (vec_ops > 0.0).then(|| {
            let vt = vector_tiling(&self.profile, vec_elems, k, 12, 2);
            VectorWork::from_tiling(vec_ops, &vt)
        });
        Workload {
            op,
            flops: 2.0 * (m * n * k) as f64,
            cube: Some(CubeWork::from_tiling(precision, &t)),
            vector,
            bytes_read: ACT_BYTES * (m * k) as u64 + weight_bytes,
            bytes_written: ACT_BYTES * (m * n) as u64,
            workspace_bytes: matmul::activation_workspace_bytes(m, k, format),
        }
    }

    /// `y[m, out] = x[m, in] · Wᵀ` (see [`matmul::linear`] for numerics).
    pub fn linear(&mut self, x: &[f32], m: usize, w: &LinearWeight) -> Result<Vec<f32>> {
        let start = Instant::now();
        let y = matmul::linear(x, m, w)?;
        let wl = self.linear_workload(m, w);
        self.record(&wl, start);
        Ok(y)
    }

    /// The cost of one grouped-matmul launch: per-group linear workloads
    /// whose cube blocks queue on the same cores (waves = ceil(total blocks
    /// / cores)), with vector work and bytes added up. `None` when every
    /// group is empty.
    pub fn grouped_linear_workload(
        &self,
        offsets: &[usize],
        weights: &[&LinearWeight],
    ) -> Option<Workload> {
        self.grouped_workload(weights.iter().enumerate().filter_map(|(e, w)| {
            let rows = offsets[e + 1] - offsets[e];
            (rows > 0).then(|| self.linear_workload(rows, w))
        }))
    }

    /// One grouped-matmul launch made of the given per-group linear
    /// workloads (see [`Device::grouped_linear_workload`]); also for shapes
    /// too large to hold, such as a served-as model's experts.
    pub fn grouped_workload(&self, groups: impl IntoIterator<Item = Workload>) -> Option<Workload> {
        let cores = self.profile.compute.cube_cores as usize;
        let mut total: Option<Workload> = None;
        for wl in groups {
            let Some(mut acc) = total.take() else {
                total = Some(wl);
                continue;
            };
            acc.flops += wl.flops;
            acc.bytes_read += wl.bytes_read;
            acc.bytes_written += wl.bytes_written;
            acc.workspace_bytes = acc.workspace_bytes.max(wl.workspace_bytes);
            if let (Some(a), Some(b)) = (acc.cube.as_mut(), wl.cube) {
                a.flops_executed += b.flops_executed;
                a.total_tiles += b.total_tiles;
                a.tiles_per_core = a.total_tiles.div_ceil(cores);
                a.cores_used = a.total_tiles.min(cores);
                a.flops_per_core =
                    a.flops_executed / a.total_tiles as f64 * a.tiles_per_core as f64;
                a.stage_bytes = a.stage_bytes.max(b.stage_bytes);
            }
            if let Some(b) = wl.vector {
                match acc.vector.as_mut() {
                    Some(a) => {
                        a.ops += b.ops;
                        a.total_tiles += b.total_tiles;
                        a.tiles_per_core += b.tiles_per_core;
                    }
                    None => acc.vector = Some(b),
                }
            }
            total = Some(acc);
        }
        total.map(|mut wl| {
            wl.op = "grouped_matmul";
            wl
        })
    }

    /// Grouped matmul over experts (one launch; see [`matmul::grouped_linear`]).
    pub fn grouped_linear(
        &mut self,
        x: &[f32],
        offsets: &[usize],
        weights: &[&LinearWeight],
    ) -> Result<Vec<f32>> {
        let start = Instant::now();
        let y = matmul::grouped_linear(x, offsets, weights)?;
        if let Some(wl) = self.grouped_linear_workload(offsets, weights) {
            self.record(&wl, start);
        }
        Ok(y)
    }

    /// RMSNorm over rows of `x[rows, weight.len()]`.
    pub fn rms_norm(
        &mut self,
        x: &[f32],
        rows: usize,
        weight: &[f32],
        eps: f32,
    ) -> Result<Vec<f32>> {
        let start = Instant::now();
        let y = elementwise::rms_norm(x, rows, weight, eps)?;
        let n = x.len();
        let wl = self.vector_workload(
            "rms_norm",
            n,
            weight.len(),
            4.0,
            ACT_BYTES * (n + weight.len()) as u64,
            ACT_BYTES * n as u64,
        );
        self.record(&wl, start);
        Ok(y)
    }

    /// `silu(gate) * up`.
    pub fn swiglu(&mut self, gate: &[f32], up: &[f32]) -> Result<Vec<f32>> {
        let start = Instant::now();
        let y = elementwise::swiglu(gate, up)?;
        let n = gate.len();
        let wl = self.vector_workload(
            "swiglu",
            n,
            n,
            5.0,
            2 * ACT_BYTES * n as u64,
            ACT_BYTES * n as u64,
        );
        self.record(&wl, start);
        Ok(y)
    }

    /// `x += residual`.
    pub fn residual_add(&mut self, x: &mut [f32], residual: &[f32]) -> Result<()> {
        let start = Instant::now();
        elementwise::residual_add(x, residual)?;
        let n = x.len();
        let wl = self.vector_workload(
            "residual_add",
            n,
            n,
            1.0,
            2 * ACT_BYTES * n as u64,
            ACT_BYTES * n as u64,
        );
        self.record(&wl, start);
        Ok(())
    }

    /// Softmax over rows (logits are fp32 on the device).
    pub fn softmax(&mut self, x: &[f32], rows: usize) -> Result<Vec<f32>> {
        let start = Instant::now();
        let y = elementwise::softmax(x, rows)?;
        let n = x.len();
        let wl = self.vector_workload(
            "softmax",
            n,
            n / rows.max(1),
            5.0,
            4 * n as u64,
            4 * n as u64,
        );
        self.record(&wl, start);
        Ok(y)
    }

    /// Log-softmax over rows.
    pub fn log_softmax(&mut self, x: &[f32], rows: usize) -> Result<Vec<f32>> {
        let start = Instant::now();
        let y = elementwise::log_softmax(x, rows)?;
        let n = x.len();
        let wl = self.vector_workload(
            "log_softmax",
            n,
            n / rows.max(1),
            5.0,
            4 * n as u64,
            4 * n as u64,
        );
        self.record(&wl, start);
        Ok(y)
    }

    /// Rotary embedding in place on `x[tokens, heads, head_dim]` (last `rope_dim` dims).
    pub fn rope(
        &mut self,
        x: &mut [f32],
        heads: usize,
        head_dim: usize,
        positions: &[usize],
        r: &Rope,
    ) -> Result<()> {
        let start = Instant::now();
        rope::apply_rope(x, heads, head_dim, positions, r)?;
        let n = positions.len() * heads * r.rope_dim();
        let wl = self.vector_workload(
            "rope",
            n,
            r.rope_dim(),
            6.0,
            ACT_BYTES * n as u64,
            ACT_BYTES * n as u64,
        );
        self.record(&wl, start);
        Ok(())
    }

    /// The cost of a flash attention launch over `pairs` (query, key)
    /// scores split in `tasks` cube tasks: cube `Q·Kᵀ` and `P·V` in fp16,
    /// online softmax on the vector cores, with the given HBM traffic.
    pub fn attention_workload(
        &self,
        op: &'static str,
        pairs: f64,
        tasks: usize,
        shape: AttnShape,
        read: u64,
        written: u64,
    ) -> Workload {
        let hq = shape.num_q_heads as f64;
        let flops = 2.0 * pairs * hq * (shape.qk_dim + shape.v_dim) as f64;
        let cores = self.profile.compute.cube_cores as usize;
        let tiles_per_core = tasks.div_ceil(cores).max(1);
        let per_task = flops / tasks.max(1) as f64;
        // Fractal padding: scores blocks are at least 16 rows (one fractal).
        let cube = CubeWork {
            precision: CubePrecision::F16,
            flops_per_core: per_task * tiles_per_core as f64,
            flops_executed: flops,
            cores_used: tasks.min(cores),
            tiles_per_core,
            total_tiles: tasks,
            stage_bytes: (128 * (shape.qk_dim + shape.v_dim)) * ACT_BYTES as usize,
        };
        // Online softmax on the vector cores: scale, max, exp, sum, rescale: ~6 ops per score.
        let scores = pairs * hq;
        let vt = vector_tiling(
            &self.profile,
            scores.max(1.0) as usize,
            attention::KEY_BLOCK,
            12,
            4,
        );
        Workload {
            op,
            flops,
            cube: Some(cube),
            vector: Some(VectorWork::from_tiling(6.0 * scores, &vt)),
            bytes_read: read,
            bytes_written: written,
            workspace_bytes: (tasks * 128 * shape.v_dim * 4) as u64,
        }
    }

    /// Prefill attention; optionally applies `rope` to copies of q and k first, fused into the
    /// same launch (positions restart at 0 for every sequence).
    #[allow(clippy::too_many_arguments)]
    pub fn prefill_attention(
        &mut self,
        q: &[f32],
        k: &[f32],
        v: Values<'_>,
        shape: AttnShape,
        seq_lens: &[usize],
        scale: f32,
        causal: bool,
        fused_rope: Option<&Rope>,
    ) -> Result<Vec<f32>> {
        let start = Instant::now();
        let y = match fused_rope {
            Some(r) => {
                let positions: Vec<usize> = seq_lens.iter().flat_map(|&l| 0..l).collect();
                let (mut q2, mut k2) = (q.to_vec(), k.to_vec());
                rope::apply_rope(&mut q2, shape.num_q_heads, shape.qk_dim, &positions, r)?;
                rope::apply_rope(&mut k2, shape.num_kv_heads, shape.qk_dim, &positions, r)?;
                attention::prefill_attention(&q2, &k2, v, shape, seq_lens, scale, causal)?
            }
            None => attention::prefill_attention(q, k, v, shape, seq_lens, scale, causal)?,
        };
        let op = if fused_rope.is_some() {
            "rope_prefill_attention"
        } else {
            "prefill_attention"
        };
        let mut wl = self.prefill_workload(op, v, shape, seq_lens, seq_lens, causal);
        let tokens: usize = seq_lens.iter().sum();
        if let (Some(r), Some(vw)) = (fused_rope, wl.vector.as_mut()) {
            vw.ops +=
                6.0 * (tokens * (shape.num_q_heads + shape.num_kv_heads) * r.rope_dim()) as f64;
        }
        self.record(&wl, start);
        Ok(y)
    }

    /// Prefill over a cached prefix (chunked prefill); see
    /// [`attention::prefill_attention_with_prefix`]. Rope, if any, is the caller's (prefix keys
    /// were roped when they were cached).
    #[allow(clippy::too_many_arguments)]
    pub fn prefill_attention_with_prefix(
        &mut self,
        q: &[f32],
        k: &[f32],
        v: Values<'_>,
        shape: AttnShape,
        q_lens: &[usize],
        kv_lens: &[usize],
        scale: f32,
        causal: bool,
    ) -> Result<Vec<f32>> {
        let start = Instant::now();
        let y = attention::prefill_attention_with_prefix(
            q, k, v, shape, q_lens, kv_lens, scale, causal,
        )?;
        let wl = self.prefill_workload("prefill_attention", v, shape, q_lens, kv_lens, causal);
        self.record(&wl, start);
        Ok(y)
    }

    fn prefill_workload(
        &self,
        op: &'static str,
        v: Values<'_>,
        shape: AttnShape,
        q_lens: &[usize],
        kv_lens: &[usize],
        causal: bool,
    ) -> Workload {
        // Query i of a sequence sits at position kv_len - q_len + i.
        let pairs: f64 = q_lens
            .iter()
            .zip(kv_lens)
            .map(|(&ql, &kl)| {
                if causal {
                    (ql * (kl - ql.min(kl)) + ql * (ql + 1) / 2) as f64
                } else {
                    (ql * kl) as f64
                }
            })
            .sum();
        let q_tokens: usize = q_lens.iter().sum();
        let kv_tokens: usize = kv_lens.iter().sum();
        let tasks: usize =
            q_lens.iter().map(|&l| l.div_ceil(128)).sum::<usize>() * shape.num_q_heads;
        let v_read = match v {
            Values::Separate(_) => kv_tokens * shape.num_kv_heads * shape.v_dim,
            Values::PrefixOfK => 0,
        };
        let read = ACT_BYTES
            * (q_tokens * shape.num_q_heads * shape.qk_dim
                + kv_tokens * shape.num_kv_heads * shape.qk_dim
                + v_read) as u64;
        let written = ACT_BYTES * (q_tokens * shape.num_q_heads * shape.v_dim) as u64;
        self.attention_workload(op, pairs, tasks, shape, read, written)
    }

    /// Decode attention over the paged cache (one query per sequence).
    pub fn decode_attention(
        &mut self,
        q: &[f32],
        cache: &PagedKvCache,
        block_tables: &[&[u32]],
        context_lens: &[usize],
        num_q_heads: usize,
        scale: f32,
    ) -> Result<Vec<f32>> {
        let start = Instant::now();
        let y =
            attention::decode_attention(q, cache, block_tables, context_lens, num_q_heads, scale)?;
        let shape = AttnShape {
            num_q_heads,
            num_kv_heads: cache.num_kv_heads(),
            qk_dim: cache.k_dim(),
            v_dim: cache.v_dim(),
        };
        let ctx: usize = context_lens.iter().sum();
        // Flash-decoding split: each (sequence, kv head) is cut into 512-token chunks.
        let tasks: usize = context_lens
            .iter()
            .map(|&l| l.div_ceil(512).max(1))
            .sum::<usize>()
            * shape.num_kv_heads;
        let b = context_lens.len();
        let read = (ctx * cache.bytes_per_token()) as u64
            + ACT_BYTES * (b * num_q_heads * shape.qk_dim) as u64;
        let written = ACT_BYTES * (b * num_q_heads * shape.v_dim) as u64;
        let wl =
            self.attention_workload("decode_attention", ctx as f64, tasks, shape, read, written);
        self.record(&wl, start);
        Ok(y)
    }

    /// Writes the K/V of `tokens.len()` tokens into the paged cache in one launch
    /// (`reshape_and_cache`): token `i` goes to position `tokens[i].1` of the sequence whose
    /// block table is `tokens[i].0`; `k` is `[tokens, num_kv_heads * k_dim]`, `v` likewise with
    /// `v_dim` (or `None` when V is a prefix of K).
    pub fn cache_kv(
        &mut self,
        cache: &mut PagedKvCache,
        tokens: &[(&[u32], usize)],
        k: &[f32],
        v: Option<&[f32]>,
    ) -> Result<()> {
        const OP: &str = "cache_kv";
        let start = Instant::now();
        let kw = cache.num_kv_heads() * cache.k_dim();
        let vw = cache.num_kv_heads() * cache.v_dim();
        let n = tokens.len();
        check_len(OP, "k", k.len(), n * kw, "tokens x num_kv_heads x k_dim")?;
        if let Some(v) = v {
            check_len(OP, "v", v.len(), n * vw, "tokens x num_kv_heads x v_dim")?;
        }
        for (i, &(table, pos)) in tokens.iter().enumerate() {
            cache.write(
                table,
                pos,
                &k[i * kw..(i + 1) * kw],
                v.map(|v| &v[i * vw..(i + 1) * vw]),
            )?;
        }
        let elems = k.len() + v.map_or(0, <[f32]>::len);
        let wl = self.vector_workload(
            OP,
            elems,
            kw,
            1.0,
            ACT_BYTES * elems as u64,
            (n * cache.bytes_per_token()) as u64,
        );
        self.record(&wl, start);
        Ok(())
    }

    /// DeepSeek-V3 routing of `logits[tokens, n_routed_experts]`.
    pub fn moe_gate(
        &mut self,
        logits: &[f32],
        tokens: usize,
        bias: &[f32],
        cfg: &GateConfig,
    ) -> Result<Routing> {
        let start = Instant::now();
        let r = moe::moe_gate(logits, tokens, bias, cfg)?;
        let n = logits.len();
        // sigmoid + bias + group top-2 + group top-k + expert top-k + normalise: ~12 ops/score.
        let wl = self.vector_workload(
            "moe_gate",
            n,
            cfg.n_routed_experts,
            12.0,
            4 * (n + bias.len()) as u64,
            8 * (tokens * cfg.top_k) as u64,
        );
        self.record(&wl, start);
        Ok(r)
    }

    /// Groups token copies by expert.
    pub fn moe_dispatch(
        &mut self,
        x: &[f32],
        hidden: usize,
        routing: &Routing,
        n_experts: usize,
    ) -> Result<Dispatch> {
        let start = Instant::now();
        let d = moe::moe_dispatch(x, hidden, routing, n_experts)?;
        let n = d.rows.len();
        let wl = self.vector_workload(
            "moe_dispatch",
            n,
            hidden,
            1.0,
            ACT_BYTES * n as u64,
            ACT_BYTES * n as u64,
        );
        self.record(&wl, start);
        Ok(d)
    }

    /// Weighted sum of expert outputs back per token.
    pub fn moe_combine(
        &mut self,
        expert_out: &[f32],
        out_dim: usize,
        dispatch: &Dispatch,
        routing: &Routing,
    ) -> Result<Vec<f32>> {
        let start = Instant::now();
        let y = moe::moe_combine(expert_out, out_dim, dispatch, routing)?;
        let n = expert_out.len();
        let wl = self.vector_workload(
            "moe_combine",
            n,
            out_dim,
            2.0,
            ACT_BYTES * n as u64,
            ACT_BYTES * y.len() as u64,
        );
        self.record(&wl, start);
        Ok(y)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn launches_are_recorded_and_steps_taken() {
        let mut d = Device::builtin("ascend-910b").unwrap();
        let w = LinearWeight::from_f32(64, 32, &vec![0.01; 64 * 32], WeightFormat::F16).unwrap();
        let x = vec![1.0; 4 * 32];
        let y = d.linear(&x, 4, &w).unwrap();
        assert_eq!(y.len(), 4 * 64);
        d.rms_norm(&y, 4, &vec![1.0; 64], 1e-6).unwrap();
        let step = d.take_step();
        assert_eq!(step.launches, 2);
        assert!(step.device_us > 2.0 * d.profile().launch.overhead_us);
        assert!(step.energy_j > 0.0);
        assert_eq!(d.take_step().launches, 0);
        assert_eq!(d.profiler().per_op()["matmul_f16"].launches, 1);
        assert!(d.profiler().table().contains("rms_norm"));
    }

    #[test]
    fn fused_rope_attention_equals_rope_then_attention() {
        let shape = AttnShape {
            num_q_heads: 4,
            num_kv_heads: 2,
            qk_dim: 16,
            v_dim: 8,
        };
        let lens = [5usize, 3];
        let t = 8;
        let q: Vec<f32> = (0..t * 4 * 16).map(|i| (i as f32 * 0.11).sin()).collect();
        let k: Vec<f32> = (0..t * 2 * 16).map(|i| (i as f32 * 0.07).cos()).collect();
        let v: Vec<f32> = (0..t * 2 * 8).map(|i| (i as f32 * 0.05).sin()).collect();
        let r = Rope::new(8, 10000.0, crate::npu::RopeMode::Interleave).unwrap();
        let mut d = Device::builtin("ascend-910b").unwrap();
        let fused = d
            .prefill_attention(
                &q,
                &k,
                Values::Separate(&v),
                shape,
                &lens,
                0.25,
                true,
                Some(&r),
            )
            .unwrap();
        let positions = [0, 1, 2, 3, 4, 0, 1, 2];
        let (mut q2, mut k2) = (q.clone(), k.clone());
        d.rope(&mut q2, 4, 16, &positions, &r).unwrap();
        d.rope(&mut k2, 2, 16, &positions, &r).unwrap();
        let split = d
            .prefill_attention(
                &q2,
                &k2,
                Values::Separate(&v),
                shape,
                &lens,
                0.25,
                true,
                None,
            )
            .unwrap();
        assert_eq!(fused, split);
        assert_eq!(d.profiler().per_op()["rope_prefill_attention"].launches, 1);
    }

    #[test]
    fn cache_kv_writes_a_batch_in_one_launch() {
        use crate::npu::{KvDtype, ValueLayout};
        let mut d = Device::builtin("ascend-910b").unwrap();
        let mut c = PagedKvCache::new(4, 2, 1, 4, ValueLayout::Separate(2), KvDtype::F16).unwrap();
        let (t0, t1): (&[u32], &[u32]) = (&[3, 1], &[0]);
        let k: Vec<f32> = (0..12).map(|i| i as f32 + 0.1).collect();
        let v: Vec<f32> = (0..6).map(|i| -(i as f32)).collect();
        d.cache_kv(&mut c, &[(t0, 0), (t0, 3), (t1, 1)], &k, Some(&v))
            .unwrap();
        assert_eq!(d.profiler().per_op()["cache_kv"].launches, 1);
        // Position 3 of sequence 0 is slot 1 of block 1; fp16 rounding applied.
        let slot = c.slot(t0, 3).unwrap();
        assert_eq!(slot, 3);
        let q = [1.0f32, 0.0, 0.0, 0.0];
        let y =
            crate::npu::kernels::attention::decode_attention(&q, &c, &[t1], &[2], 1, 1.0).unwrap();
        assert_eq!(y.len(), 2);
        assert!(
            d.cache_kv(&mut c, &[(t1, 5)], &k[..4], Some(&v[..2]))
                .is_err()
        );
    }

    #[test]
    fn fp8_on_910b_costs_vector_dequant_but_not_on_h100() {
        let w = LinearWeight::from_f32(256, 256, &vec![0.01; 256 * 256], WeightFormat::Fp8E4m3)
            .unwrap();
        let a = Device::builtin("ascend-910b").unwrap();
        let h = Device::builtin("h100-sxm").unwrap();
        let ca = a.estimate(&a.linear_workload(64, &w));
        let ch = h.estimate(&h.linear_workload(64, &w));
        assert!(ca.vector_ops > ch.vector_ops);
        // Decode: the weight dequantisation is spread over all vector cores, so FP8 stays
        // memory-bound and cheaper than fp16 (half the HBM bytes).
        let big8 = LinearWeight::from_f32(4096, 4096, &vec![0.01; 1 << 24], WeightFormat::Fp8E4m3)
            .unwrap();
        let big16 =
            LinearWeight::from_f32(4096, 4096, &vec![0.01; 1 << 24], WeightFormat::F16).unwrap();
        let c8 = a.estimate(&a.linear_workload(1, &big8));
        let c16 = a.estimate(&a.linear_workload(1, &big16));
        assert!(
            c8.device_us < c16.device_us,
            "{} vs {}",
            c8.device_us,
            c16.device_us
        );
    }

    #[test]
    fn h100_is_faster_than_910b_on_big_matmul() {
        let a = Device::builtin("ascend-910b").unwrap();
        let h = Device::builtin("h100-sxm").unwrap();
        let big =
            LinearWeight::from_f32(1024, 1024, &vec![0.0; 1 << 20], WeightFormat::Bf16).unwrap();
        let ta = a.estimate(&a.linear_workload(4096, &big)).device_us;
        let th = h.estimate(&h.linear_workload(4096, &big)).device_us;
        assert!(th < ta);
    }
}
