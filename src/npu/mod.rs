//! The emulated NPU: device profiles, kernels with real numerics, a cost and energy model, and
//! a profiler.
//!
//! Owns everything about "running on an Ascend-like accelerator": kernels compute real results
//! on the CPU in the device's number formats, and each launch on a [`Device`] is priced by the
//! cost model in emulated device time and energy. It is plain synchronous compute: it must not
//! know tenants, requests, batching policy, async runtimes or networks, and it does no I/O except
//! reading a user profile file when asked ([`DeviceProfile::from_file`]).
//!
//! # Layout
//!
//! - [`profile`]: published figures per device (`devices/*.toml`, builtin or user file).
//! - [`format`](mod@format), [`weights`]: number formats (fp16, bf16, int8, FP8 E4M3) and weights stored
//!   like Hugging Face `Linear` (`[out_features, in_features]`).
//! - [`kernels`]: matmul (all formats, grouped over experts), RMSNorm, SwiGLU, residual add,
//!   softmax/log-softmax, rope, prefill and paged decode attention, MoE gating/dispatch/combine.
//! - [`tiling`]: Ascend C style work split (cube blocks sized to L0A/L0B/L0C, vector tiles to UB).
//! - [`cost`]: tiles and bytes to pipe times, device time and energy.
//! - [`profiler`]: per-op and per-step totals, a table, a Chrome trace.
//! - [`device`]: a profile + a profiler; every kernel launch goes through it.
//!
//! # The cost model
//!
//! A kernel describes its launch as a [`cost::Workload`]: useful flops, cube work (precision,
//! flops on the busiest cube core, padded to the 16x16x16 fractal), vector work (element-ops on
//! the busiest vector core), and HBM bytes read and written. Then, with `P` the profile:
//!
//! - **MTE (data movement)**: `t_mte = (bytes_read + bytes_written) / hbm_bandwidth`. Reuse
//!   within a launch is assumed to hit L2 (each operand crosses HBM once).
//! - **Cube**: `t_cube = tiles_per_core x flops_per_tile / (peak[precision] / cube_cores)`, so
//!   wave quantisation shows: 32 blocks on 24 cores take two waves.
//! - **Vector**: `t_vec = tiles_per_core x ops_per_tile / (lanes x clock)`.
//! - **Overlap**: with double buffering (Ascend C `BUFFER_NUM = 2`) the copy of stage `i+1`
//!   overlaps compute on stage `i`, so `busy = max(t_mte, t_cube, t_vec) + t_fill`, where
//!   `t_fill` is the first stage's copy at one core's share of HBM bandwidth. Without it,
//!   `busy = t_mte + t_cube + t_vec`.
//! - **Device time**: `launch_overhead + busy`.
//! - **Energy**: `idle_W x device_time + e_cube[precision] x cube_flops + e_vec x vector_ops +
//!   e_byte x bytes`, with `e_cube = cube_share x (tdp - idle) / peak[precision]`,
//!   `e_vec = vector_share x (tdp - idle) / vector_peak`, `e_byte = hbm_share x (tdp - idle) /
//!   hbm_bandwidth` and the three shares summing to 1: a device with every pipe saturated draws
//!   exactly its rated power, and never more.
//! - FP8 on a device without FP8 (910B/910C) runs at the fp16 cube rate after the vector cores
//!   decode the weight tiles; HBM still moves 1 byte per weight.
//!
//! ## Worked example: one fp16 matmul on `ascend-910b`
//!
//! `x[256, 4096] · W[4096, 4096]ᵀ`, fp16 in, fp32 accumulation, fp16 out (the test
//! `cost::tests::worked_example_matches_hand_calculation` checks every number):
//!
//! 1. Tiling: base block 128 x 256 x 64. L0A holds 2 x 128 x 64 x 2 B = 32 KiB <= 64 KiB, L0B
//!    2 x 64 x 256 x 2 B = 64 KiB <= 64 KiB, L0C 128 x 256 x 4 B = 128 KiB <= 128 KiB.
//!    Blocks: 2 (m) x 16 (n) = 32 on 24 cube cores: 2 waves on the busiest core.
//! 2. Cube: one block is 2 x 128 x 256 x 4096 = 268,435,456 flop; one core peaks at
//!    353.894 / 24 = 14.746 TFLOP/s; two blocks take **36.41 µs**. (A perfectly balanced
//!    device would need 8.59 GFLOP / 353.9 TFLOP/s = 24.3 µs: the rest is wave quantisation.)
//! 3. MTE: 2 MiB (x) + 32 MiB (W) + 2 MiB (y) = 37,748,736 B at 1.6 TB/s = **23.59 µs**.
//! 4. Fill: one stage (128 + 256) x 64 x 2 B = 49,152 B at 1.6 TB/s / 24 = **0.74 µs**.
//! 5. Device time: 3 µs launch + max(36.409, 23.593) + 0.737 = **40.15 µs** (40.146).
//! 6. Energy: 90 W x 40.15 µs = 3.61 mJ idle; cube 0.6 x 310 W / 353.894 TFLOP/s x 8.59 GFLOP
//!    = 4.51 mJ; HBM 0.3 x 310 W / 1.6 TB/s x 37.75 MB = 2.19 mJ; total **10.32 mJ**
//!    (257 W average, below the 400 W rating because HBM is not saturated).
//!
//! # Numerics
//!
//! Activations are f32 in host memory. A matmul rounds them to the weight's input format
//! (fp16/bf16 round-to-nearest-even; int8 per-token symmetric; FP8 E4M3 per 1x128 tile) and
//! accumulates in fp32 (int8: exact int32; FP8: fp32 partial per 128-deep block, then scaled by
//! the activation and weight block scales and added in fp32). Vector kernels work in f32.

pub mod cost;
pub mod device;
pub mod error;
pub mod format;
pub mod kernels;
pub mod profile;
pub mod profiler;
pub mod tiling;
pub mod weights;

pub use cost::{LaunchCost, Workload};
pub use device::Device;
pub use error::{NpuError, Result};
pub use format::WeightFormat;
pub use kernels::attention::{AttnShape, Values};
pub use kernels::kv_cache::{KvDtype, PagedKvCache, ValueLayout};
pub use kernels::moe::{Dispatch, GateConfig, Routing, ScoringFunc};
pub use kernels::rope::{Rope, RopeMode};
pub use profile::{BUILTIN_DEVICES, CubePrecision, DeviceProfile, ProfileSource};
pub use profiler::{OpTotals, Profiler};
pub use weights::{LinearWeight, WeightData};
