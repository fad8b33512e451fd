#!/usr/bin/env bash
# GPU check: the CUDA test suite, then the kernel benchmarks. Installs nothing; results go to $OUT
# (default ./bench/out): gpu-tests.xml and gpu-tests.log, kernels.json and kernels.log.
set -uo pipefail
cd "$(dirname "$0")/.."
OUT="${OUT:-bench/out}"
mkdir -p "$OUT"
export PYTHONPATH=".${PYTHONPATH:+:$PYTHONPATH}"

status=0
python -m pytest -m gpu tests -q --junitxml="$OUT/gpu-tests.xml" 2>&1 | tee "$OUT/gpu-tests.log" || status=1
python bench/kernels.py --json "$OUT/kernels.json" 2>&1 | tee "$OUT/kernels.log" || status=1
exit "$status"
