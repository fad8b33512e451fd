#!/usr/bin/env bash
# GPU check, a few minutes on an H100/H200: the CUDA tests, the kernel benchmarks, then the whole-pipeline
# benchmark, SD 1.5, then SD 2.1 768-v, then SDXL base at 1024². Installs nothing (diffusers must be importable for
# the parity tests and bench/e2e.py). Results go to $OUT (default ./bench/out): gpu-tests.log, bench-pytest.json,
# kernels.json/.log, e2e.json/.log, e2e-sd21.json/.log, e2e-sdxl.json/.log.
set -uo pipefail
cd "$(dirname "$0")/.."
OUT="${OUT:-bench/out}"
mkdir -p "$OUT"
export PYTHONPATH=".${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1

nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.sm,clocks.max.sm --format=csv
status=0
timeout 240 python -m pytest -m gpu tests -q --maxfail=5 2>&1 | tee "$OUT/gpu-tests.log" || status=1
timeout 60 python -m pytest bench/test_bench_kernels.py -q --benchmark-json="$OUT/bench-pytest.json" 2>&1 | tail -5 || status=1
timeout 120 python bench/kernels.py --json "$OUT/kernels.json" 2>&1 | tee "$OUT/kernels.log" || status=1
timeout 420 python bench/e2e.py --json "$OUT/e2e.json" ${E2E_ARGS:-} 2>&1 | grep -v Warning > "$OUT/e2e.log" || status=1
timeout 420 python bench/e2e.py --model sd21 --skip profile,layouts,cold_start --json "$OUT/e2e-sd21.json" \
    2>&1 | grep -v Warning > "$OUT/e2e-sd21.log" || status=1
timeout 300 python bench/e2e.py --model sdxl --skip profile,layouts,cold_start,long_prompt --json "$OUT/e2e-sdxl.json" \
    2>&1 | grep -v Warning > "$OUT/e2e-sdxl.log" || status=1
python - "$OUT/e2e.json" "$OUT/e2e-sd21.json" "$OUT/e2e-sdxl.json" <<'PY' || status=1
import json, os, sys
for path in sys.argv[1:]:
    print(path)
    if not os.path.exists(path):  # its run failed or timed out before its first section
        continue
    for name, s in json.load(open(path))["sections"].items():
        print(name, {k: v for k, v in s.items() if k not in ("kernels", "memory_beyond_weights")})
PY
exit "$status"
