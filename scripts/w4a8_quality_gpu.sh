#!/usr/bin/env bash
# W4A8 (QQQ) quantization on the GPU in one command: the GPU tests of tests/test_w4a8_quant.py, then the
# issue-7 real-model figure -- SmolLM2-135M W4A8 perplexity, per-channel and g128, QQQ and RTN, full calibration
# (128 x 512 tokens), 10k held-out wiki tokens at seqlen 512 like scripts/quality_report.py, save/reload checked,
# reference arithmetic (and, where the W4A8 kernel is available, the kernel's perplexity beside it).
#   OUT=/some/dir bash scripts/w4a8_quality_gpu.sh [tests|quality|variants|all]   (each part < 10 min)
# Results under $OUT: w4a8_quant_tests.txt, quality-w4a8-smollm2-cuda-<date>-*.json and their logs.
set -u
cd "$(dirname "$0")/.."
OUT=${OUT:-/tmp/w4a8_quality}
WHAT=${1:-all}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1
export QUICK_CACHE_DIR=${QUICK_CACHE_DIR:-/tmp/quick_cache}
python -c "import torch; print(torch.__version__, torch.cuda.get_device_name(0))" | tee "$OUT/gpu.txt"
quick setup --check > /dev/null 2>&1 || quick setup > "$OUT/setup.txt" 2>&1
if [[ $WHAT == tests || $WHAT == all ]]; then
  timeout 400 python -m pytest -m gpu -q -rfE -p no:cacheprovider tests/test_w4a8_quant.py \
    > "$OUT/w4a8_quant_tests.txt" 2>&1
  echo "w4a8 quant GPU tests rc=$?"; tail -3 "$OUT/w4a8_quant_tests.txt"
fi
if [[ $WHAT == quality || $WHAT == all ]]; then
  # QQQ per-channel and g128, dense baseline, save/reload
  timeout 560 python scripts/quality_w4a8.py smollm2 --out "$OUT" --methods qqq --reload --a8-baseline --tag qqq \
    > "$OUT/quality_qqq.log" 2>&1
  echo "quality rc=$?"; grep -E "perplexity|wrote|Error" "$OUT/quality_qqq.log" | tail -20
fi
if [[ $WHAT == variants || $WHAT == all ]]; then
  # W4A8 RTN, then QQQ without the GPTQ options that are on by default (clipping search, act-order)
  timeout 200 python scripts/quality_w4a8.py smollm2 --out "$OUT" --no-baseline --methods rtn --tag rtn \
    > "$OUT/quality_rtn.log" 2>&1
  echo "rtn rc=$?"; grep -E "perplexity|wrote|Error" "$OUT/quality_rtn.log" | tail -20
  timeout 380 python scripts/quality_w4a8.py smollm2 --out "$OUT" --no-baseline --methods qqq --no-clip --no-act-order \
    --tag plain > "$OUT/quality_plain.log" 2>&1
  echo "variants rc=$?"; grep -E "perplexity|wrote|Error" "$OUT/quality_plain.log" | tail -20
fi
