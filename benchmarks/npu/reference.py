#!/usr/bin/env python3
"""CPU reference figures for the npu benchmarks: numpy (OpenBLAS) GEMM GFLOP/s at the
prefill shape, and a numpy streaming-read bandwidth figure.

Writes JSON (default target/npu-reference.json) that `cargo bench --bench npu` reads through
the NPU_REFERENCE_JSON environment variable, so the bench prints ratios from one run.

Run OpenBLAS with its own CPU detection: unset OPENBLAS_CORETYPE and OPENBLAS_L2_SIZE in
the command that runs this script (see run.sh), not globally.
"""
import json
import os
import sys
import time

import numpy as np


def best_of(fn, reps):
    best = float("inf")
    for _ in range(reps):
        t = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - t)
    return best


def gemm_gflops(m, n, k, dtype, reps=7):
    rng = np.random.default_rng(0)
    a = rng.standard_normal((m, k)).astype(dtype)
    w = rng.standard_normal((n, k)).astype(dtype)  # [out, in], as the Rust side stores it
    wt = np.ascontiguousarray(w.T)
    a @ wt  # warm up
    secs = best_of(lambda: a @ wt, reps)
    return 2.0 * m * n * k / secs / 1e9


def read_bandwidth_gbs(mib=512, reps=5):
    x = np.ones(mib * 1024 * 1024 // 4, dtype=np.float32)
    x.sum()
    secs = best_of(lambda: x.sum(), reps)
    return x.nbytes / secs / 1e9


def main():
    out = sys.argv[1] if len(sys.argv) > 1 else "target/npu-reference.json"
    res = {
        "numpy": np.__version__,
        "blas": str(np.show_config(mode="dicts").get("Build Dependencies", {}).get("blas", {}).get("version", "?")),
        "openblas_env": {k: v for k, v in os.environ.items() if k.startswith("OPENBLAS")},
        "gemm_256x4096x4096_f32_gflops": gemm_gflops(256, 4096, 4096, np.float32),
        "gemm_1x4096x4096_f32_gflops": gemm_gflops(1, 4096, 4096, np.float32, reps=50),
        "numpy_read_gbs_single_thread": read_bandwidth_gbs(),
    }
    os.makedirs(os.path.dirname(out) or ".", exist_ok=True)
    with open(out, "w") as f:
        json.dump(res, f, indent=2)
    print(json.dumps(res, indent=2))


if __name__ == "__main__":
    main()
