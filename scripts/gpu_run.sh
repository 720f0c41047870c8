#!/usr/bin/env bash
# One GPU run = many jobs, each with its own time limit and log, all results packed into ONE archive
# (easy to copy back from a remote GPU machine). Usage (on the GPU machine, from the repo root):
#   bash scripts/gpu_run.sh PLAN_FILE        (e.g. scripts/plans/moe.plan)
# PLAN_FILE lines: `name | timeout_seconds | shell command` (blank lines and # comments skipped). Each command
# runs with OUT=$WORK/<name> (create files there), its output goes to $WORK/<name>.log; a failing or timed-out
# job does not stop the others. After each job: $OUT/<name>.tar.gz (its folder and log), so a run cut short keeps
# what finished; $OUT/summary.txt grows as jobs end.
set -u
cd "$(dirname "$0")/.."
PLAN=${1:?plan file}
FINAL_OUT=${OUT:-./device_out}
WORK=$(mktemp -d /tmp/quick_gpu_run.XXXX)
mkdir -p "$FINAL_OUT"
export PYTHONUNBUFFERED=1
export QUICK_CACHE_DIR=${QUICK_CACHE_DIR:-/tmp/quick_cache}
SUMMARY="$FINAL_OUT/summary.txt"
{
  echo "GPU run $(date -u +%FT%TZ) commit $(git rev-parse --short HEAD 2>/dev/null || echo '?')"
  nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.max.sm --format=csv,noheader 2>/dev/null || true
  python3 -c "import torch, sys; print('python', sys.version.split()[0], 'torch', torch.__version__, 'cuda', torch.version.cuda)"
} | tee "$SUMMARY"
t_all=$(date +%s)
while IFS='|' read -r name limit cmd; do
  name=$(echo "$name" | xargs)
  [ -z "$name" ] && continue
  case "$name" in \#*) continue ;; esac
  limit=$(echo "$limit" | xargs)
  mkdir -p "$WORK/$name"
  t0=$(date +%s)
  echo "=== $name (limit ${limit}s): $cmd" | tee -a "$SUMMARY"
  OUT="$WORK/$name" timeout --kill-after=10 "$limit" bash -c "$cmd" > "$WORK/$name.log" 2>&1
  rc=$?
  echo "--- $name rc=$rc in $(( $(date +%s) - t0 )) s; last lines:" | tee -a "$SUMMARY"
  tail -n 15 "$WORK/$name.log" | tee -a "$SUMMARY"
  tar -czf "$FINAL_OUT/$name.tar.gz" -C "$WORK" "$name" "$name.log"
done < "$PLAN"
echo "=== all jobs done in $(( $(date +%s) - t_all )) s" | tee -a "$SUMMARY"
ls -la "$FINAL_OUT"
