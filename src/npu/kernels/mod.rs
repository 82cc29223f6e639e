//! The kernels: pure functions that compute results on the CPU in the NPU's number formats.
//!
//! Owns numerics and CPU speed (SIMD with runtime detection, all cores through rayon). It must
//! not know costs, profiles or profilers: [`crate::npu::Device`] wraps each kernel with its cost.

pub mod attention;
pub mod elementwise;
pub mod kv_cache;
pub mod matmul;
pub mod moe;
pub mod rope;
pub mod simd;
