#!/usr/bin/env bash
# W4A8 (layout w4a8, int8 mma.sync) device checks in one command: GPU tests, then the kernel benchmark rows
# quick_w4a8_channel / quick_w4a8_group beside cuBLAS fp16 and the W4A16 kernel, plus the W4A8 config sweep.
# Results under $OUT: w4a8_tests.txt (+ junit xml, max errors json), kernel-*.json/md/png, sweep-w4a8-*.json.
#   OUT=/some/dir bash scripts/w4a8_gpu.sh tests   (~3-6 min: compile + GPU tests)
#   OUT=/some/dir bash scripts/w4a8_gpu.sh bench   (~3-6 min: benchmark grid, all 7 shapes x 9 M)
#   OUT=/some/dir bash scripts/w4a8_gpu.sh sweep   (~3-6 min: W4A8 config x split-k sweep, tuning data)
#   OUT=/some/dir bash scripts/w4a8_gpu.sh tune    (~1-1.5 min: the sweep for M >= 256 only, K=N=8192 and 4096)
# Each part stays under 10 minutes; "all" runs tests, bench and sweep in a row.
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
  timeout 560 python benchmarks/kernel.py --impls cublas_fp16 quick quick_w4a8_channel quick_w4a8_group \
    --outdir "$OUT" 2>&1 | tail -40
fi
if [[ $WHAT == tune ]]; then
  # rows are appended to $OUT/sweep-w4a8-*.jsonl as they are measured; timings stop after ${W4A8_TUNE_S:-35} s
  timeout 150 python benchmarks/kernel.py --outdir "$OUT" --sweep-w4a8-large --no-grid --budget-s "${W4A8_TUNE_S:-35}" \
    2>&1 | grep --line-buffered "sweep-w4a8\|Error\|error"
fi
if [[ $WHAT == sweep || $WHAT == all ]]; then
  timeout 560 python benchmarks/kernel.py --outdir "$OUT" --sweep-w4a8 --no-grid 2>&1 | grep "sweep-w4a8\|Error\|error" | tail -70
fi
