//! Reference figures the benches share: the numpy/OpenBLAS file `benchmarks/npu/reference.py`
//! writes (named by `NPU_REFERENCE_JSON`) and one streaming read over every core. Owns only
//! how a reference is taken; each bench decides which it prints.

use ascend_gateway::npu::kernels::simd;
use rayon::prelude::*;

/// The reference JSON named by `NPU_REFERENCE_JSON`, when set and readable.
pub fn reference_json() -> Option<serde_json::Value> {
    let path = std::env::var("NPU_REFERENCE_JSON").ok()?;
    let text = std::fs::read_to_string(&path).ok()?;
    serde_json::from_str(&text).ok()
}

/// Reads `buf` once, split evenly over rayon's threads (a dot product of each part with itself).
pub fn parallel_read(buf: &[f32]) -> f32 {
    let threads = rayon::current_num_threads().max(1);
    buf.par_chunks(buf.len().div_ceil(threads).max(1))
        .map(|c| simd::dot(c, c))
        .sum()
}
