#!/usr/bin/env bash
# THE device script for the QUICK mma.sync kernels: one call = GPU facts, compile + ptxas table + SASS check,
# the GPU tests, the benchmark. Everything lands under $OUT (default ./device_out):
#   device.log (all output), sass.txt, errors.json (max rel error per dtype/kernel), kernel-<gpu>-<date>.{json,md,png},
#   bench-log.txt, sweep-<gpu>-<date>.json (with --sweep).
#
# usage: scripts/device_check.sh [--tests-only | --bench-only] [--sweep] [--tests "PATHS"] [--bench-args "ARGS"]
#   --tests-only   compile + tests, no benchmark          --bench-only  compile + benchmark, no tests
#   --sweep        also time every config x split-k       --tests       pytest paths (default: tests/, all gpu tests)
# e.g. on the H100 via the run tool:  bash scripts/device_check.sh --tests tests/test_kernels_gpu.py --sweep
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-./device_out}
mkdir -p "$OUT"
exec > >(tee -a "$OUT/device.log") 2>&1
export PYTHONUNBUFFERED=1
export QUICK_CACHE_DIR=${QUICK_CACHE_DIR:-/tmp/quick_cache}
PY=${PYTHON:-python3}

RUN_TESTS=1 RUN_BENCH=1 SWEEP="" TESTS="tests/" BENCH_ARGS=""
while [ $# -gt 0 ]; do
  case "$1" in
    --tests-only) RUN_BENCH=0 ;;
    --bench-only) RUN_TESTS=0 ;;
    --sweep) SWEEP="--sweep" ;;
    --tests) TESTS="$2"; shift ;;
    --bench-args) BENCH_ARGS="$2"; shift ;;
    *) echo "unknown option $1"; exit 2 ;;
  esac
  shift
done

t0=$(date +%s)
echo "=== device: $(date -u +%FT%TZ) $(pwd)"
nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.sm,clocks.max.sm,temperature.gpu,power.draw \
  --format=csv || true
$PY -c "import torch, sys; print('python', sys.version.split()[0], 'torch', torch.__version__, 'cuda', torch.version.cuda, \
'sms', torch.cuda.get_device_properties(0).multi_processor_count)"
nvcc --version | tail -2

echo "=== compile check (sm_80 + sm_90a, ptxas -v) and device-arch build"
# COMPILE_MODULES: the launcher modules whose variants are built (all of them on CPU: tests/test_compile.py)
$PY -m quick.kernels.compile_check --workers "$(nproc)" --modules ${COMPILE_MODULES:-quick.kernels.quick_mma}; cc_rc=$?
$PY - <<'PYEOF'
from quick.kernels import jit, quick_mma
arch = jit.arch_for_device()
jit.compile_many([(s, arch, d) for s, d, _ in quick_mma.VARIANTS])
print("built", len(quick_mma.VARIANTS), "variants for", arch)
PYEOF
$PY -m quick.kernels.compile_check --sass --modules quick.kernels.quick_mma > "$OUT/sass.txt" 2>&1
tail -n 30 "$OUT/sass.txt"

rc=0
if [ "$RUN_TESTS" = 1 ]; then
  echo "=== GPU tests: $TESTS"
  QUICK_ERR_REPORT="$OUT/errors.json" timeout ${TEST_TIMEOUT:-300} $PY -m pytest -m gpu -q -p no:cacheprovider $TESTS; rc=$?
  [ -f "$OUT/errors.json" ] && cat "$OUT/errors.json"
fi
if [ "$RUN_BENCH" = 1 ]; then
  echo "=== benchmark"
  timeout ${BENCH_TIMEOUT:-300} $PY benchmarks/kernel.py --outdir "$OUT" $SWEEP $BENCH_ARGS || rc=$((rc ? rc : 3))
fi
echo "=== done in $(( $(date +%s) - t0 )) s: compile_check rc=$cc_rc, tests/bench rc=$rc"
exit $(( cc_rc ? cc_rc : rc ))
