//! Device profiles: the published figures of one accelerator, as data.
//!
//! Owns the TOML schema of a profile, the builtin profiles shipped in `devices/`, loading a
//! user file, validation, and the derived per-pipe peak rates and energy coefficients the cost
//! model uses. It must not know about kernels, tiling decisions or callers; it reads at most one
//! file, when asked to.

use std::path::Path;

use serde::{Deserialize, Serialize};

use super::error::{NpuError, Result};
use super::format::WeightFormat;

const ASCEND_910B: &str = include_str!("../../devices/ascend-910b.toml");
const ASCEND_910C: &str = include_str!("../../devices/ascend-910c.toml");
const H100_SXM: &str = include_str!("../../devices/h100-sxm.toml");

/// Names of the profiles compiled into the binary.
pub const BUILTIN_DEVICES: [&str; 3] = ["ascend-910b", "ascend-910c", "h100-sxm"];

/// One accelerator, as published figures. Field meanings and sources are in the TOML files.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DeviceProfile {
    /// Short name, e.g. `ascend-910b`.
    pub name: String,
    /// One line for humans.
    pub description: String,
    /// Cores, clock and peak rates.
    pub compute: ComputeSpec,
    /// HBM and on-chip buffers.
    pub memory: MemorySpec,
    /// Rated and idle power, and the split of dynamic power between pipes.
    pub power: PowerSpec,
    /// Launch overhead and pipelining.
    pub launch: LaunchSpec,
}

/// Compute resources.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ComputeSpec {
    /// Core clock in GHz.
    pub clock_ghz: f64,
    /// Matrix ("cube", AIC) cores.
    pub cube_cores: u32,
    /// Vector (AIV) cores.
    pub vector_cores: u32,
    /// Cube fractal M (rows of A per cycle).
    pub fractal_m: u32,
    /// Cube fractal N.
    pub fractal_n: u32,
    /// Cube fractal K.
    pub fractal_k: u32,
    /// Dense fp16 peak, TFLOP/s.
    pub fp16_tflops: f64,
    /// Dense bf16 peak, TFLOP/s.
    pub bf16_tflops: f64,
    /// Dense int8 peak, TOP/s.
    pub int8_tops: f64,
    /// Dense FP8 peak, TFLOP/s; 0 means no FP8 in hardware (emulated via fp16).
    pub fp8_tflops: f64,
    /// f32 lanes per vector core per cycle.
    pub vector_lanes_f32: u32,
}

/// Memory system.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct MemorySpec {
    /// HBM capacity, GiB.
    pub hbm_gib: f64,
    /// HBM bandwidth, GB/s (10^9 bytes per second).
    pub hbm_gbps: f64,
    /// L2 capacity, MiB.
    pub l2_mib: f64,
    /// Per cube core L0A (left operand) buffer, KiB.
    pub l0a_kib: u32,
    /// Per cube core L0B (right operand) buffer, KiB.
    pub l0b_kib: u32,
    /// Per cube core L0C (accumulator) buffer, KiB.
    pub l0c_kib: u32,
    /// Per cube core L1 buffer, KiB.
    pub l1_kib: u32,
    /// Per vector core Unified Buffer, KiB.
    pub ub_kib: u32,
}

/// Power model inputs.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PowerSpec {
    /// Rated power with every pipe busy at its peak, W.
    pub tdp_watts: f64,
    /// Power when powered on and idle, W.
    pub idle_watts: f64,
    /// Share of `tdp - idle` drawn by the cube pipe at peak rate.
    pub cube_share: f64,
    /// Share of `tdp - idle` drawn by the vector pipe at peak rate.
    pub vector_share: f64,
    /// Share of `tdp - idle` drawn by HBM traffic at peak bandwidth.
    pub hbm_share: f64,
}

/// Launch behaviour.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct LaunchSpec {
    /// Fixed cost per kernel launch, µs.
    pub overhead_us: f64,
    /// Whether kernels double-buffer, overlapping data movement with compute.
    pub double_buffer: bool,
}

/// Precision in which the cube pipe runs a matmul; selects the peak rate.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub enum CubePrecision {
    /// fp16 inputs, fp32 accumulation.
    F16,
    /// bf16 inputs, fp32 accumulation.
    Bf16,
    /// int8 inputs, int32 accumulation.
    Int8,
    /// FP8 E4M3 inputs (at the fp16 rate on devices without FP8).
    Fp8,
    /// fp32 inputs (modelled at a quarter of the fp16 rate; uncertain).
    F32,
}

impl CubePrecision {
    /// Cube precision used for a weight format.
    pub fn for_weight(format: WeightFormat) -> Self {
        match format {
            WeightFormat::F32 => Self::F32,
            WeightFormat::F16 => Self::F16,
            WeightFormat::Bf16 => Self::Bf16,
            WeightFormat::Int8 => Self::Int8,
            WeightFormat::Fp8E4m3 => Self::Fp8,
        }
    }
}

/// Where a profile comes from, as a setting names it: a builtin name, or a
/// path ending in `.toml`. Parsed once, wherever the name is given.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ProfileSource {
    Builtin(String),
    File(std::path::PathBuf),
}

impl ProfileSource {
    /// The one rule: a name ending in `.toml` is a file, anything else a
    /// builtin name.
    pub fn parse(name: &str) -> ProfileSource {
        if Path::new(name).extension().is_some_and(|e| e == "toml") {
            ProfileSource::File(name.into())
        } else {
            ProfileSource::Builtin(name.to_owned())
        }
    }

    /// Reads and validates the profile.
    pub fn load(&self) -> Result<DeviceProfile> {
        match self {
            ProfileSource::Builtin(name) => DeviceProfile::builtin(name),
            ProfileSource::File(path) => DeviceProfile::from_file(path),
        }
    }
}

impl std::fmt::Display for ProfileSource {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            ProfileSource::Builtin(name) => f.write_str(name),
            ProfileSource::File(path) => write!(f, "{}", path.display()),
        }
    }
}

impl Serialize for ProfileSource {
    fn serialize<S: serde::Serializer>(&self, s: S) -> std::result::Result<S::Ok, S::Error> {
        s.collect_str(self)
    }
}

impl<'de> Deserialize<'de> for ProfileSource {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> std::result::Result<Self, D::Error> {
        Ok(ProfileSource::parse(&String::deserialize(d)?))
    }
}

impl DeviceProfile {
    /// Loads a builtin profile by name (`ascend-910b`, `ascend-910c`, `h100-sxm`).
    pub fn builtin(name: &str) -> Result<Self> {
        let text = match name {
            "ascend-910b" => ASCEND_910B,
            "ascend-910c" => ASCEND_910C,
            "h100-sxm" => H100_SXM,
            _ => {
                return Err(NpuError::UnknownDevice {
                    name: name.to_string(),
                    known: BUILTIN_DEVICES.join(", "),
                });
            }
        };
        Self::from_toml_str(text, name)
    }

    /// Parses and validates a profile from TOML text; `source_name` names it in errors.
    pub fn from_toml_str(text: &str, source_name: &str) -> Result<Self> {
        let profile: Self = toml::from_str(text).map_err(|e| NpuError::ProfileParse {
            source_name: source_name.to_string(),
            message: e.to_string(),
        })?;
        profile.validate()?;
        Ok(profile)
    }

    /// Reads, parses and validates a user profile file.
    pub fn from_file(path: impl AsRef<Path>) -> Result<Self> {
        let path = path.as_ref();
        let text = std::fs::read_to_string(path).map_err(|source| NpuError::Io {
            path: path.display().to_string(),
            source,
        })?;
        Self::from_toml_str(&text, &path.display().to_string())
    }

    /// Checks every number is in a usable range.
    pub fn validate(&self) -> Result<()> {
        let bad = |field: &str, detail: String| NpuError::Profile {
            profile: self.name.clone(),
            field: field.to_string(),
            detail,
        };
        let positive = [
            ("compute.clock_ghz", self.compute.clock_ghz),
            ("compute.fp16_tflops", self.compute.fp16_tflops),
            ("compute.bf16_tflops", self.compute.bf16_tflops),
            ("compute.int8_tops", self.compute.int8_tops),
            ("memory.hbm_gib", self.memory.hbm_gib),
            ("memory.hbm_gbps", self.memory.hbm_gbps),
            ("power.tdp_watts", self.power.tdp_watts),
        ];
        for (field, v) in positive {
            if !(v.is_finite() && v > 0.0) {
                return Err(bad(field, format!("must be a positive number, got {v}")));
            }
        }
        let non_negative = [
            ("compute.fp8_tflops", self.compute.fp8_tflops),
            ("memory.l2_mib", self.memory.l2_mib),
            ("power.idle_watts", self.power.idle_watts),
            ("power.cube_share", self.power.cube_share),
            ("power.vector_share", self.power.vector_share),
            ("power.hbm_share", self.power.hbm_share),
            ("launch.overhead_us", self.launch.overhead_us),
        ];
        for (field, v) in non_negative {
            if !(v.is_finite() && v >= 0.0) {
                return Err(bad(
                    field,
                    format!("must be a non-negative number, got {v}"),
                ));
            }
        }
        let counts = [
            ("compute.cube_cores", self.compute.cube_cores),
            ("compute.vector_cores", self.compute.vector_cores),
            ("compute.fractal_m", self.compute.fractal_m),
            ("compute.fractal_n", self.compute.fractal_n),
            ("compute.fractal_k", self.compute.fractal_k),
            ("compute.vector_lanes_f32", self.compute.vector_lanes_f32),
            ("memory.l0a_kib", self.memory.l0a_kib),
            ("memory.l0b_kib", self.memory.l0b_kib),
            ("memory.l0c_kib", self.memory.l0c_kib),
            ("memory.l1_kib", self.memory.l1_kib),
            ("memory.ub_kib", self.memory.ub_kib),
        ];
        for (field, v) in counts {
            if v == 0 {
                return Err(bad(field, "must be at least 1".to_string()));
            }
        }
        if self.power.idle_watts >= self.power.tdp_watts {
            return Err(bad(
                "power.idle_watts",
                format!(
                    "{} W must be below tdp_watts {} W",
                    self.power.idle_watts, self.power.tdp_watts
                ),
            ));
        }
        let shares = self.power.cube_share + self.power.vector_share + self.power.hbm_share;
        if (shares - 1.0).abs() > 1e-6 {
            return Err(bad(
                "power.cube_share",
                format!("cube_share + vector_share + hbm_share must be 1, got {shares}"),
            ));
        }
        Ok(())
    }

    /// Whole-device peak of the cube pipe in the given precision, flop/s.
    pub fn cube_peak_flops(&self, precision: CubePrecision) -> f64 {
        let c = &self.compute;
        let tflops = match precision {
            CubePrecision::F16 => c.fp16_tflops,
            CubePrecision::Bf16 => c.bf16_tflops,
            CubePrecision::Int8 => c.int8_tops,
            CubePrecision::Fp8 if c.fp8_tflops > 0.0 => c.fp8_tflops,
            CubePrecision::Fp8 => c.fp16_tflops,
            CubePrecision::F32 => c.fp16_tflops / 4.0,
        };
        tflops * 1e12
    }

    /// Whether FP8 matmuls run natively (otherwise weights are dequantised to fp16 first).
    pub fn has_native_fp8(&self) -> bool {
        self.compute.fp8_tflops > 0.0
    }

    /// Peak of one cube core, flop/s.
    pub fn cube_core_flops(&self, precision: CubePrecision) -> f64 {
        self.cube_peak_flops(precision) / f64::from(self.compute.cube_cores)
    }

    /// Peak of one vector core, element-ops/s.
    pub fn vector_core_ops(&self) -> f64 {
        f64::from(self.compute.vector_lanes_f32) * self.compute.clock_ghz * 1e9
    }

    /// Whole-device vector peak, element-ops/s.
    pub fn vector_peak_ops(&self) -> f64 {
        self.vector_core_ops() * f64::from(self.compute.vector_cores)
    }

    /// HBM bandwidth, bytes/s.
    pub fn hbm_bytes_per_s(&self) -> f64 {
        self.memory.hbm_gbps * 1e9
    }

    /// Dynamic power budget `tdp - idle`, W.
    pub fn dynamic_watts(&self) -> f64 {
        self.power.tdp_watts - self.power.idle_watts
    }

    /// Energy per cube flop in `precision`, J: the cube share of the dynamic budget at peak rate.
    pub fn joules_per_cube_flop(&self, precision: CubePrecision) -> f64 {
        self.power.cube_share * self.dynamic_watts() / self.cube_peak_flops(precision)
    }

    /// Energy per vector element-op, J.
    pub fn joules_per_vector_op(&self) -> f64 {
        self.power.vector_share * self.dynamic_watts() / self.vector_peak_ops()
    }

    /// Energy per byte moved to or from HBM, J.
    pub fn joules_per_hbm_byte(&self) -> f64 {
        self.power.hbm_share * self.dynamic_watts() / self.hbm_bytes_per_s()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn builtins_load_and_validate() {
        for name in BUILTIN_DEVICES {
            let p = DeviceProfile::builtin(name).unwrap();
            assert_eq!(p.name, name);
        }
    }

    #[test]
    fn ascend_910b_peak_matches_core_arithmetic() {
        let p = DeviceProfile::builtin("ascend-910b").unwrap();
        let c = &p.compute;
        let derived = f64::from(c.cube_cores)
            * f64::from(c.fractal_m * c.fractal_n * c.fractal_k)
            * 2.0
            * c.clock_ghz
            * 1e9;
        let rel = (derived - p.cube_peak_flops(CubePrecision::F16)).abs() / derived;
        assert!(rel < 1e-5, "derived {derived} vs profile");
        assert!(!p.has_native_fp8());
        assert!(DeviceProfile::builtin("h100-sxm").unwrap().has_native_fp8());
    }

    #[test]
    fn unknown_builtin_names_the_known_ones() {
        let e = DeviceProfile::builtin("tpu").unwrap_err().to_string();
        assert!(e.contains("ascend-910b") && e.contains("tpu"), "{e}");
    }

    #[test]
    fn bad_field_is_named() {
        let text = ASCEND_910B.replace("hbm_gbps = 1600.0", "hbm_gbps = -1.0");
        let e = DeviceProfile::from_toml_str(&text, "x")
            .unwrap_err()
            .to_string();
        assert!(e.contains("memory.hbm_gbps"), "{e}");
        let text = ASCEND_910B.replace("cube_share = 0.6", "cube_share = 0.7");
        let e = DeviceProfile::from_toml_str(&text, "x")
            .unwrap_err()
            .to_string();
        assert!(e.contains("cube_share"), "{e}");
        let text = ASCEND_910B.replace("ub_kib = 192", "ub_kib = 192\nbogus = 1");
        let e = DeviceProfile::from_toml_str(&text, "x")
            .unwrap_err()
            .to_string();
        assert!(e.contains("bogus"), "{e}");
    }

    #[test]
    fn user_file_loads() {
        let dir = std::env::temp_dir().join(format!("npu-profile-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("custom.toml");
        std::fs::write(&path, ASCEND_910B.replace("\"ascend-910b\"", "\"custom\"")).unwrap();
        let p = DeviceProfile::from_file(&path).unwrap();
        assert_eq!(p.name, "custom");
        std::fs::remove_dir_all(&dir).unwrap();
        assert!(DeviceProfile::from_file(dir.join("missing.toml")).is_err());
    }
}
