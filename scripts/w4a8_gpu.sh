#!/usr/bin/env bash
# W4A8 (layout w4a8, int8 mma.sync) device checks in one command: GPU tests, then the kernel benchmark rows
# quick_w4a8_channel / quick_w4a8_group beside cuBLAS fp16 and the W4A16 kernel, plus the W4A8 config sweep.
# Results under $OUT: w4a8_tests.txt (+ junit xml, max errors json), kernel-*.json/md/png, sweep-w4a8-*.json.
#   OUT=/some/dir bash scripts/w4a8_gpu.sh [tests|bench|all]
set -u
OUT=${OUT:-/tmp/w4a8_out}
WHAT=${1:-all}
mkdir -p "$OUT"
nvidia-smi --query-gpu=name,clocks.sm,clocks.max.sm --format=csv > "$OUT/gpu.txt" 2>&1
if [[ $WHAT == tests || $WHAT == all ]]; then
  QUICK_ERR_REPORT_W4A8="$OUT/w4a8_err.json" timeout 400 python -m pytest -m gpu -q -rfE -p no:cacheprovider \
    --junitxml="$OUT/w4a8_tests.xml" tests/test_kernels_w4a8_gpu.py > "$OUT/w4a8_tests.txt" 2>&1
  echo "w4a8 tests rc=$?"
  grep -E "passed|failed|error" "$OUT/w4a8_tests.txt" | tail -3
  grep -E "^(FAILED|ERROR)" "$OUT/w4a8_tests.txt" | head -40
fi
if [[ $WHAT == bench || $WHAT == all ]]; then
  timeout 500 python benchmarks/kernel.py --impls cublas_fp16 quick quick_w4a8_channel quick_w4a8_group \
    --outdir "$OUT" --sweep-w4a8 2>&1 | grep -v "^\[sweep-w4a8\]" | tail -40
  grep -h "^\[sweep-w4a8\]" "$OUT/bench-log.txt" | tail -60
fi
