//! The cost and energy model: turns what a launch does (flops per pipe, HBM bytes, tiles) into
//! emulated device time and energy on one [`DeviceProfile`].
//!
//! Owns the pipe-time formulas, the double-buffer overlap rule and the energy formula, all
//! described with a worked example in the `npu` module docs. It must not know numerics or how a
//! kernel computes its result; kernels describe themselves with a [`Workload`].

use serde::Serialize;

use super::profile::{CubePrecision, DeviceProfile};
use super::tiling::{MatmulTiling, VectorTiling};

/// Work a launch gives the cube pipe.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct CubeWork {
    /// Precision, which selects the peak rate.
    pub precision: CubePrecision,
    /// Flops the busiest cube core executes (padded to the fractal).
    pub flops_per_core: f64,
    /// Flops all cores execute (padded), for energy.
    pub flops_executed: f64,
    /// Cube cores with work.
    pub cores_used: usize,
    /// Blocks on the busiest core.
    pub tiles_per_core: usize,
    /// Blocks in total.
    pub total_tiles: usize,
    /// Bytes of the first, unoverlapped input stage.
    pub stage_bytes: usize,
}

impl CubeWork {
    /// Cube work of a matmul tiled by `t`.
    pub fn from_tiling(precision: CubePrecision, t: &MatmulTiling) -> Self {
        Self {
            precision,
            flops_per_core: t.flops_per_tile() * t.tiles_per_core as f64,
            flops_executed: t.flops_per_tile() * t.total_tiles as f64,
            cores_used: t.cores_used,
            tiles_per_core: t.tiles_per_core,
            total_tiles: t.total_tiles,
            stage_bytes: t.stage_bytes,
        }
    }
}

/// Work a launch gives the vector pipe.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct VectorWork {
    /// Element-ops in total.
    pub ops: f64,
    /// Tiles in total.
    pub total_tiles: usize,
    /// Vector cores with work.
    pub cores_used: usize,
    /// Tiles on the busiest core.
    pub tiles_per_core: usize,
    /// Bytes of the first, unoverlapped input stage.
    pub stage_bytes: usize,
}

impl VectorWork {
    /// Vector work of `ops` element-ops spread as `t` says.
    pub fn from_tiling(ops: f64, t: &VectorTiling) -> Self {
        Self {
            ops,
            total_tiles: t.total_tiles,
            cores_used: t.cores_used,
            tiles_per_core: t.tiles_per_core,
            stage_bytes: t.stage_bytes,
        }
    }
}

/// What one launch does, as the cost model needs it.
#[derive(Debug, Clone, PartialEq)]
pub struct Workload {
    /// Operator name (`matmul_f16`, `rms_norm`, ...).
    pub op: &'static str,
    /// Useful flops (unpadded; what a roofline would count).
    pub flops: f64,
    /// Cube pipe work, if any.
    pub cube: Option<CubeWork>,
    /// Vector pipe work, if any.
    pub vector: Option<VectorWork>,
    /// Bytes read from HBM.
    pub bytes_read: u64,
    /// Bytes written to HBM.
    pub bytes_written: u64,
    /// Device workspace the launch needs besides inputs and outputs, bytes.
    pub workspace_bytes: u64,
}

/// The cost of one launch on one device.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct LaunchCost {
    /// Operator name.
    pub op: &'static str,
    /// Useful flops.
    pub flops: f64,
    /// Cube flops executed, padding included.
    pub cube_flops: f64,
    /// Vector element-ops.
    pub vector_ops: f64,
    /// HBM bytes read.
    pub bytes_read: u64,
    /// HBM bytes written.
    pub bytes_written: u64,
    /// Tiles on the busiest core (cube if the launch uses the cube, else vector).
    pub tiles_per_core: usize,
    /// Cores with work (cube + vector).
    pub cores_used: usize,
    /// Data-movement (MTE) pipe busy time, µs.
    pub mte_us: f64,
    /// Cube pipe busy time on the busiest core, µs.
    pub cube_us: f64,
    /// Vector pipe busy time on the busiest core, µs.
    pub vector_us: f64,
    /// Pipeline fill: the first stage copy that nothing overlaps, µs.
    pub fill_us: f64,
    /// Busy time after overlap, µs.
    pub busy_us: f64,
    /// Emulated device time including launch overhead, µs.
    pub device_us: f64,
    /// Energy, J.
    pub energy_j: f64,
    /// Workspace, bytes.
    pub workspace_bytes: u64,
}

impl LaunchCost {
    /// Average power over the launch, W.
    pub fn avg_watts(&self) -> f64 {
        if self.device_us > 0.0 {
            self.energy_j / (self.device_us * 1e-6)
        } else {
            0.0
        }
    }
}

/// Applies the model (see the module docs of `npu` for the formulas and a worked example).
pub fn estimate(p: &DeviceProfile, w: &Workload) -> LaunchCost {
    let bytes = (w.bytes_read + w.bytes_written) as f64;
    let hbm = p.hbm_bytes_per_s();
    let mte_s = bytes / hbm;
    let (cube_s, cube_fill_s, cube_flops, cube_tiles, cube_cores, cube_energy) = match &w.cube {
        Some(c) => {
            let per_core_bw = hbm / f64::from(p.compute.cube_cores);
            (
                c.flops_per_core / p.cube_core_flops(c.precision),
                c.stage_bytes as f64 / per_core_bw,
                c.flops_executed,
                c.tiles_per_core,
                c.cores_used,
                c.flops_executed * p.joules_per_cube_flop(c.precision),
            )
        }
        None => (0.0, 0.0, 0.0, 0, 0, 0.0),
    };
    let (vec_s, vec_fill_s, vec_ops, vec_tiles, vec_cores, vec_energy) = match &w.vector {
        Some(v) => {
            let per_tile = v.ops / v.total_tiles.max(1) as f64;
            let per_core_bw = hbm / f64::from(p.compute.vector_cores);
            (
                per_tile * v.tiles_per_core as f64 / p.vector_core_ops(),
                v.stage_bytes as f64 / per_core_bw,
                v.ops,
                v.tiles_per_core,
                v.cores_used,
                v.ops * p.joules_per_vector_op(),
            )
        }
        None => (0.0, 0.0, 0.0, 0, 0, 0.0),
    };
    let (fill_s, busy_s) = if p.launch.double_buffer {
        // Copies of stage i+1 overlap compute on stage i; only the first copy is exposed.
        let fill = if w.cube.is_some() {
            cube_fill_s
        } else {
            vec_fill_s
        };
        let fill = fill.min(mte_s);
        (fill, mte_s.max(cube_s).max(vec_s) + fill)
    } else {
        (0.0, mte_s + cube_s + vec_s)
    };
    let device_s = p.launch.overhead_us * 1e-6 + busy_s;
    let energy =
        p.power.idle_watts * device_s + cube_energy + vec_energy + bytes * p.joules_per_hbm_byte();
    LaunchCost {
        op: w.op,
        flops: w.flops,
        cube_flops,
        vector_ops: vec_ops,
        bytes_read: w.bytes_read,
        bytes_written: w.bytes_written,
        tiles_per_core: if w.cube.is_some() {
            cube_tiles
        } else {
            vec_tiles
        },
        cores_used: cube_cores + vec_cores,
        mte_us: mte_s * 1e6,
        cube_us: cube_s * 1e6,
        vector_us: vec_s * 1e6,
        fill_us: fill_s * 1e6,
        busy_us: busy_s * 1e6,
        device_us: device_s * 1e6,
        energy_j: energy,
        workspace_bytes: w.workspace_bytes,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::npu::tiling::{matmul_tiling, vector_tiling};

    fn matmul_workload(p: &DeviceProfile, m: usize, n: usize, k: usize) -> Workload {
        let t = matmul_tiling(p, m, n, k, 2);
        Workload {
            op: "matmul_f16",
            flops: 2.0 * (m * n * k) as f64,
            cube: Some(CubeWork::from_tiling(CubePrecision::F16, &t)),
            vector: None,
            bytes_read: 2 * (m * k + n * k) as u64,
            bytes_written: 2 * (m * n) as u64,
            workspace_bytes: 0,
        }
    }

    /// The worked example of the module docs, computed by hand.
    #[test]
    fn worked_example_matches_hand_calculation() {
        let p = DeviceProfile::builtin("ascend-910b").unwrap();
        let c = estimate(&p, &matmul_workload(&p, 256, 4096, 4096));
        // Cube: 2 blocks of 128x256x4096 on the busiest core at 353.894/24 TFLOP/s.
        let tile_flops = 2.0 * 128.0 * 256.0 * 4096.0;
        let cube_us = 2.0 * tile_flops / (353.894e12 / 24.0) * 1e6;
        assert!((c.cube_us - cube_us).abs() < 1e-9);
        assert!((c.cube_us - 36.4089).abs() < 1e-3, "{}", c.cube_us);
        // MTE: 2 MiB A + 32 MiB W + 2 MiB out = 37,748,736 B at 1.6 TB/s.
        assert_eq!(c.bytes_read + c.bytes_written, 37_748_736);
        assert!((c.mte_us - 23.5930).abs() < 1e-3, "{}", c.mte_us);
        // Fill: one stage (128+256)x64x2 B = 49,152 B at 1.6 TB/s / 24 cores.
        assert!((c.fill_us - 0.73728).abs() < 1e-4, "{}", c.fill_us);
        // Device: 3 µs launch + max(36.41, 23.59) + 0.74 = 40.15 µs.
        assert!((c.device_us - 40.1462).abs() < 1e-3, "{}", c.device_us);
        // Energy: 90 W x 40.15 µs + 0.6 x 310 W / 353.894 TFLOP/s x 8.59 GFLOP
        //       + 0.3 x 310 W / 1.6 TB/s x 37.75 MB.
        let e = 90.0 * c.device_us * 1e-6
            + 0.6 * 310.0 / 353.894e12 * 8_589_934_592.0
            + 0.3 * 310.0 / 1.6e12 * 37_748_736.0;
        assert!((c.energy_j - e).abs() < 1e-6, "{} vs {e}", c.energy_j);
        assert!((c.energy_j - 0.010322).abs() < 1e-5, "{}", c.energy_j);
        assert!(c.avg_watts() < p.power.tdp_watts);
    }

    #[test]
    fn saturated_device_draws_rated_power() {
        let p = DeviceProfile::builtin("ascend-910b").unwrap();
        let peak = p.cube_peak_flops(CubePrecision::F16);
        let hbm = p.hbm_bytes_per_s();
        let vec = p.vector_peak_ops();
        let secs = 1.0;
        let dynamic = peak * secs * p.joules_per_cube_flop(CubePrecision::F16)
            + vec * secs * p.joules_per_vector_op()
            + hbm * secs * p.joules_per_hbm_byte();
        let watts = p.power.idle_watts + dynamic / secs;
        assert!((watts - p.power.tdp_watts).abs() < 1e-6, "{watts}");
    }

    #[test]
    fn cost_grows_with_every_dimension() {
        let p = DeviceProfile::builtin("ascend-910b").unwrap();
        let base = estimate(&p, &matmul_workload(&p, 64, 1024, 1024));
        for (m, n, k) in [(128, 1024, 1024), (64, 2048, 1024), (64, 1024, 2048)] {
            let c = estimate(&p, &matmul_workload(&p, m, n, k));
            assert!(c.device_us >= base.device_us && c.energy_j > base.energy_j);
        }
        let mut prev = 0.0;
        for m in [1, 8, 16, 17, 100, 256, 1024, 4096] {
            let c = estimate(&p, &matmul_workload(&p, m, 4096, 4096));
            assert!(c.device_us >= prev, "m={m}");
            prev = c.device_us;
        }
        let mut prev = 0.0;
        for n in [16, 1000, 100_000, 1_000_000] {
            let t = vector_tiling(&p, n, n, 8, 2);
            let w = Workload {
                op: "v",
                flops: 0.0,
                cube: None,
                vector: Some(VectorWork::from_tiling(4.0 * n as f64, &t)),
                bytes_read: 2 * n as u64,
                bytes_written: 2 * n as u64,
                workspace_bytes: 0,
            };
            let c = estimate(&p, &w);
            assert!(c.device_us > prev);
            prev = c.device_us;
        }
    }

    #[test]
    fn no_double_buffer_serialises_pipes() {
        let mut p = DeviceProfile::builtin("ascend-910b").unwrap();
        let over = estimate(&p, &matmul_workload(&p, 256, 4096, 4096));
        p.launch.double_buffer = false;
        let serial = estimate(&p, &matmul_workload(&p, 256, 4096, 4096));
        assert!((serial.busy_us - (serial.mte_us + serial.cube_us)).abs() < 1e-9);
        assert!(serial.device_us > over.device_us);
    }
}
