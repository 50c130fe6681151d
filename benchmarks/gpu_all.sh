#!/usr/bin/env bash
# The one prepared GPU command: the CUDA tests, then benchmarks/gpu_check.py (whole-run memory estimates against
# max_memory_allocated, then the throughput rows), then benchmarks/fit_check.py (the plan for a memory budget,
# run: no out-of-memory error and a measured peak within the budget), each stage with its own time limit,
# everything under $OUT: gpu_all.log (the stages and the short table), cuda-tests.log, gpu_check.md,
# gpu_check.json, fit/fit_check.md and .json. From the repository root:
#
#   OUT=/path COMMIT=abc1234 PYTHONPATH=src:benchmarks bash benchmarks/gpu_all.sh    # on the GPU (~8 minutes)
#   OUT=/tmp/x PYTHONPATH=src:benchmarks bash benchmarks/gpu_all.sh --dry-run       # CPU, tiny model: checks it
#
# BUDGET_S (default 460): the whole command's wall-clock limit; TESTS_S (default 75): the CUDA tests' share;
# RESERVE_S (default 170): seconds of gpu_check kept for the throughput rows; COMMIT names the tree's commit
# (a copy without .git cannot); GPU_CHECK_ARGS: more gpu_check.py arguments; FIT_S (default 100): the fit
# stage's limit (0 skips it), FIT_MODEL (default LLaMA2-7B) and FIT_BUDGET (default 24GiB) its plan. A stage that runs out of time is
# stopped and the next one starts; gpu_check rewrites its report after every row, so whatever ran is reported.
# Exit status: 0 when the tests and every check passed, 1 otherwise.
set -u
cd "$(dirname "$0")/.."
DRY=""
if [ "${1:-}" = "--dry-run" ]; then DRY="--dry-run"; fi
OUT="${OUT:-$PWD/gpu-all-out}"
mkdir -p "$OUT"
LOG="$OUT/gpu_all.log"
P="${PYTHON:-python}"
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1
export PYTHONPATH="${PYTHONPATH:-src:benchmarks}"
BUDGET="${BUDGET_S:-460}"
TESTS="${TESTS_S:-75}"
RESERVE="${RESERVE_S:-170}"
FIT="${FIT_S:-100}"
T0=$(date +%s)
elapsed() { echo $(( $(date +%s) - T0 )); }
{
  echo "# gpu_all $(date -u '+%Y-%m-%d %H:%M UTC') ${DRY:-on the GPU}; commit ${COMMIT:-unknown}; budget ${BUDGET} s"
  "$P" -c "import torch; print('torch', torch.__version__, 'cuda', torch.version.cuda, torch.cuda.get_device_name() if torch.cuda.is_available() else 'no GPU')" 2>&1
  [ -n "$DRY" ] || nvidia-smi --query-gpu=name,memory.used,memory.total --format=csv 2>&1 | head -3
} > "$LOG"

# 1. the CUDA tests (without CUDA they skip)
echo "== cuda tests (timeout ${TESTS} s)" >> "$LOG"
timeout -k 5 "$TESTS" "$P" -m pytest -q -m gpu tests -p no:cacheprovider > "$OUT/cuda-tests.log" 2>&1
TESTS_RC=$?
echo "== cuda tests rc=$TESTS_RC after $(elapsed) s: $(tail -n 1 "$OUT/cuda-tests.log")" >> "$LOG"

# 2. gpu_check: memory rows (in parallel), then throughput rows (one at a time), within what is left
LEFT=$(( BUDGET - $(elapsed) - 5 - FIT ))
if [ "$LEFT" -lt 30 ]; then
  echo "== gpu_check not run: ${LEFT} s left" >> "$LOG"
  CHECK_RC=1
else
  COMMIT_ARG=()
  if [ -n "${COMMIT:-}" ]; then COMMIT_ARG=(--commit "$COMMIT"); fi
  echo "== gpu_check (timeout ${LEFT} s)" >> "$LOG"
  # shellcheck disable=SC2086
  timeout -k 5 "$LEFT" "$P" benchmarks/gpu_check.py $DRY --out "$OUT" --budget-s $(( LEFT - 15 )) \
    --throughput-reserve-s "$RESERVE" "${COMMIT_ARG[@]}" ${GPU_CHECK_ARGS:-} >> "$LOG" 2>&1
  CHECK_RC=$?
  echo "== gpu_check rc=$CHECK_RC after $(elapsed) s" >> "$LOG"
fi

# 3. fit_check: the plan for FIT_BUDGET, run on the GPU (its peak measured against the budget)
FIT_RC=0
if [ "$FIT" -gt 0 ]; then
  LEFT=$(( BUDGET - $(elapsed) - 2 ))
  [ "$LEFT" -lt "$FIT" ] || LEFT="$FIT"
  if [ "$LEFT" -lt 20 ]; then
    echo "== fit_check not run: ${LEFT} s left" >> "$LOG"
    FIT_RC=1
  else
    mkdir -p "$OUT/fit"
    FIT_ARGS=(--budget "${FIT_BUDGET:-24GiB}" --out "$OUT/fit")
    if [ -n "$DRY" ]; then FIT_ARGS+=(--dry-run); else FIT_ARGS+=(--model "${FIT_MODEL:-LLaMA2-7B}"); fi
    echo "== fit_check (timeout ${LEFT} s)" >> "$LOG"
    timeout -k 5 "$LEFT" "$P" benchmarks/fit_check.py "${FIT_ARGS[@]}" >> "$LOG" 2>&1
    FIT_RC=$?
    echo "== fit_check rc=$FIT_RC after $(elapsed) s" >> "$LOG"
  fi
fi
echo "== done in $(elapsed) s: tests rc=$TESTS_RC, gpu_check rc=$CHECK_RC, fit_check rc=$FIT_RC" >> "$LOG"
grep -E "^== " "$LOG"
grep -E "^gpu_check on|^  (mem|tput) " "$LOG"  # the short table, last
[ "$TESTS_RC" -eq 0 ] && [ "$CHECK_RC" -eq 0 ] && [ "$FIT_RC" -eq 0 ]
