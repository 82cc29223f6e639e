#!/usr/bin/env bash
# Runs the npu CPU references and the npu bench back to back, so the ratios in the bench's
# summary come from one run on one machine.
#
#   benchmarks/npu/run.sh            # criterion groups + summary
#   SUMMARY_ONLY=1 benchmarks/npu/run.sh
#
# numpy is installed with pip if missing. OpenBLAS gets its own CPU detection: the
# OPENBLAS_CORETYPE / OPENBLAS_L2_SIZE overrides some environments set are removed for the
# reference command only.
set -euo pipefail
cd "$(dirname "$0")/../.."
python3 -c 'import numpy' 2>/dev/null || python3 -m pip install --quiet numpy
mkdir -p target
env -u OPENBLAS_CORETYPE -u OPENBLAS_L2_SIZE python3 benchmarks/npu/reference.py target/npu-reference.json
lscpu | grep -E 'Model name|^CPU\(s\)|L3' || true
if [[ -n "${SUMMARY_ONLY:-}" ]]; then
  export NPU_BENCH_SUMMARY_ONLY=1
fi
NPU_REFERENCE_JSON="$PWD/target/npu-reference.json" cargo bench --bench npu
