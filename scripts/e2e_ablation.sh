#!/usr/bin/env bash
# One device call: what pays end to end? Builds the fp16 kernel variants, checks the fast decode paths against
# eager (GPU tests), then times {graph, compile} x {unfused, fused} on one model shape, then profiles one decode
# step. Each part has its own time limit (a part that runs out leaves what it finished: per-case JSON lines).
# Everything lands under $OUT (default ./ablation_out).
#
#   bash scripts/e2e_ablation.sh                       # Llama-2-7B, batch 1 and 64, ~9 minutes at most
#   bash scripts/e2e_ablation.sh w2                    # window 2: graph+fused vs regions+fused, graphed prefill,
#                                                      # GQA check; ~3 minutes at most
#   MODELS="llama-3-8b" BATCHES="1 64" E2E_LIMIT=400 bash scripts/e2e_ablation.sh
set -uo pipefail
if [ "${1:-}" = "w2" ]; then
  : "${IMPLS:=quick_sm90 quick}" "${VARIANTS:=graph+fused regions+fused}" "${BUILD_LIMIT:=15}"
  : "${TEST_LIMIT:=40}" "${TESTS_K:=graphed_prefill}" "${E2E_LIMIT:=100}" "${PROFILE_LIMIT:=0}" "${GQA_LIMIT:=30}"
fi
cd "$(dirname "$0")/.."
OUT=${OUT:-./ablation_out}
mkdir -p "$OUT"
exec > >(tee -a "$OUT/ablation.log") 2>&1
export PYTHONUNBUFFERED=1
export QUICK_CACHE_DIR=${QUICK_CACHE_DIR:-/tmp/quick_cache}
PY=${PYTHON:-python3}
MODELS=${MODELS:-llama-2-7b}
BATCHES=${BATCHES:-1 64}
IMPLS=${IMPLS:-quick fp16 quick_sm90}
VARIANTS=${VARIANTS:-graph graph+fused regions+fused step+fused}
PROFILE_VARIANTS=${PROFILE_VARIANTS:-graph graph+fused regions+fused}
t0=$(date +%s)

echo "=== device: $(date -u +%FT%TZ)"
nvidia-smi --query-gpu=name,memory.total,clocks.sm,clocks.max.sm --format=csv || true
$PY -c "import torch, transformers; print('torch', torch.__version__, 'cuda', torch.version.cuda, 'transformers', transformers.__version__)"

echo "=== build the fp16 mma.sync kernel variants in parallel ($(nproc) cores; sm90 ones build on first use)"
timeout ${BUILD_LIMIT:-60} $PY - <<'PYEOF'
import time
from quick.kernels import jit, quick_mma
t = time.time()
fp16 = lambda d: d.get("QK_DTYPE", d.get("DTYPE", 0)) == 0  # noqa: E731
jobs = [(s, jit.arch_for_device(), d) for s, d, _ in quick_mma.VARIANTS if fp16(d)]
res = jit.compile_many(jobs)
print(f"built {len(res)} variants in {time.time() - t:.0f} s")
PYEOF

echo "=== GPU tests: fused + compiled + graphed decode vs eager ($(( $(date +%s) - t0 )) s so far)"
[ "${TEST_LIMIT:-90}" -gt 0 ] && timeout ${TEST_LIMIT:-90} $PY -m pytest -m gpu -q -p no:cacheprovider \
  tests/test_inference.py -k "${TESTS_K:-gpu_fast_decode and not unfused and not fp16}" 2>&1 | tail -n 25

echo "=== e2e ablation: $MODELS, batches $BATCHES, impls $IMPLS, variants $VARIANTS ($(( $(date +%s) - t0 )) s so far)"
timeout ${E2E_LIMIT:-310} $PY benchmarks/e2e.py --models $MODELS --batches $BATCHES --impls $IMPLS \
  --variants $VARIANTS --outdir "$OUT" --tag ablation
echo "--- per case (jsonl, also for a cut-off run):"
cat "$OUT"/e2e-cases-ablation.jsonl 2>/dev/null

echo "=== decode-step profile, batch 1 ($(( $(date +%s) - t0 )) s so far)"
[ "${PROFILE_LIMIT:-60}" -gt 0 ] && timeout ${PROFILE_LIMIT:-60} $PY scripts/profile_decode.py --model ${MODELS%% *} --impls quick --batch 1 \
  --variants $PROFILE_VARIANTS --out "$OUT" | grep '^{' || true
echo "=== GQA decode attention check: llama-3-8b fp16 graph (was 2840 / 4138 tok/s at b64 / b256 before) ($(( $(date +%s) - t0 )) s so far)"
timeout ${GQA_LIMIT:-50} $PY benchmarks/e2e.py --models llama-3-8b --batches 64 256 --impls fp16 --variants graph \
  --outdir "$OUT" --tag gqa | grep '^{' || true
echo "=== done in $(( $(date +%s) - t0 )) s"
