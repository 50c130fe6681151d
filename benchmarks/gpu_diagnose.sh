#!/usr/bin/env bash
# Why the memory estimate misses on the GPU (issue 17.2): benchmarks/memory_diagnose.py on the rows that were off,
# each in a fresh process with its own timeout, JSON into $OUT (default ./diagnose-out), all output in
# $OUT/diagnose.log. From the repository root:
#
#   PYTHONPATH=src:benchmarks bash benchmarks/gpu_diagnose.sh              # on the GPU (about 1 minute on an H200)
#   PYTHONPATH=src:benchmarks bash benchmarks/gpu_diagnose.sh --dry-run    # CPU, tiny models: checks the script
#
# Stages: 1. cublas.json: one bf16 matmul forward + backward in a fresh process (cuBLAS workspaces per handle and
# stream); then, in parallel (one process each; PARALLEL=1 runs them one by one), the 512-wide model of
# tests/test_memory.py (rank 8, seq 256) with FFT and GRASS, and Gemma-2B b1 x 1024 with FFT, LoRA r128, LISA and
# GRASS + activation_checkpointing=frozen. STAGES="small-fft gemma-lisa" runs only those (cublas is a stage too).
# Exit status: 0 when every stage wrote its JSON, 1 otherwise (the log says which and why).
set -u
cd "$(dirname "$0")/.."
DRY=""
if [ "${1:-}" = "--dry-run" ]; then DRY="--dry-run"; fi
OUT="${OUT:-$PWD/diagnose-out}"
mkdir -p "$OUT"
LOG="$OUT/diagnose.log"
P="${PYTHON:-python}"
export PYTHONUNBUFFERED=1 OMP_NUM_THREADS="${OMP_NUM_THREADS:-2}" HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1
export TORCH_SYMBOLIZE_MODE="${TORCH_SYMBOLIZE_MODE:-dladdr}"  # C++ frames of --stacks all: names, fast
export PYTHONPATH="${PYTHONPATH:-src:benchmarks}"
TMP=$(mktemp -d)
trap 'rm -rf "$TMP"' EXIT
SCRIPT=benchmarks/memory_diagnose.py
# name | timeout (s) | arguments
ROWS=(
  "small-fft|90|--model small --method fft --rank 8 --seq-len 256"
  "small-grass|90|--model small --method grass --rank 8 --seq-len 256"
  "gemma-fft|120|--model gemma-2b --method fft"
  "gemma-lora|120|--model gemma-2b --method lora --rank 128"
  "gemma-lisa|120|--model gemma-2b --method lisa"
  "gemma-grass-acfrozen|120|--model gemma-2b --method grass --activation-checkpointing frozen"
)
want() { [ -z "${STAGES:-}" ] || [[ " $STAGES " == *" $1 "* ]]; }
{
  echo "# gpu_diagnose $(date -u '+%Y-%m-%d %H:%M UTC') ${DRY:-on the GPU}; git $(git rev-parse --short HEAD 2>/dev/null || echo '?')"
  $P -c "import torch; print('torch', torch.__version__, 'cuda', torch.version.cuda, torch.cuda.get_device_name() if torch.cuda.is_available() else 'no GPU')" 2>&1
  [ -n "$DRY" ] || nvidia-smi --query-gpu=name,memory.used,memory.total --format=csv 2>&1 | head -3
} > "$LOG"
STATUS=0
T0=$(date +%s)
if [ -z "$DRY" ] && want cublas; then
  echo "== cublas (timeout 60 s)" >> "$LOG"
  timeout 60 "$P" "$SCRIPT" --cublas-probe --stacks all --out "$OUT/cublas.json" >> "$LOG" 2>&1
  rc=$?
  echo "== cublas rc=$rc" >> "$LOG"
  [ $rc -eq 0 ] || STATUS=1
fi
run_row() { # name timeout args...
  local name=$1 limit=$2
  shift 2
  local t=$(date +%s)
  # shellcheck disable=SC2086
  timeout "$limit" "$P" "$SCRIPT" $DRY "$@" --out "$OUT/$name.json" > "$TMP/$name.log" 2>&1
  echo "$? $(( $(date +%s) - t ))" > "$TMP/$name.rc"
}
PIDS=()
NAMES=()
for row in "${ROWS[@]}"; do
  IFS='|' read -r name limit args <<< "$row"
  want "$name" || continue
  NAMES+=("$name")
  # shellcheck disable=SC2086
  if [ "${PARALLEL:-6}" = "1" ]; then run_row "$name" "$limit" $args; else run_row "$name" "$limit" $args & PIDS+=($!); fi
done
for pid in "${PIDS[@]}"; do wait "$pid"; done
for name in "${NAMES[@]}"; do
  read -r rc secs < "$TMP/$name.rc" || { rc=99; secs=?; }
  { echo "== $name rc=$rc (${secs} s)"; cat "$TMP/$name.log"; } >> "$LOG"
  [ "$rc" -eq 0 ] && [ -s "$OUT/$name.json" ] || STATUS=1
done
echo "== done in $(( $(date +%s) - T0 )) s, status $STATUS" >> "$LOG"
grep -E "^== |summary:|measured max_memory|recorded step:|SDPA call|not tensors|not a tensor|^ +[-+][0-9.]+ MiB|Error|error" "$LOG" | cut -c1-300
exit $STATUS
