#!/bin/bash
# CPU threads of grass-llm train and examples/grass_loop.py: 1 thread vs torch's default (one per core), without
# and with a second process busy on the machine (a Python busy loop). Prints one line per run.
#
#   bash benchmarks/threads.sh            # from the repository root, with the package importable
#
# The demo-shaped run is builtin:tiny (the demo model's shape, random weights), 100 steps, no eval / plots.
set -u
REPO=$(cd "$(dirname "$0")/.." && pwd)
WORK=$(mktemp -d)
cd "$WORK"
P=${PYTHON:-python}
run() { # $1 label, $2 threads=N
  local t0=$(date +%s.%N)
  $P -m grass_llm train model=builtin:tiny eval_heldout=0 plots=false tensorboard=false max_steps=100 out_dir=r \
    overwrite=true "$2" > out.txt 2>&1
  local t1=$(date +%s.%N)
  echo "$1 train $2 wall=$(echo "$t1 - $t0" | bc) $(grep -o 'done: .* s,' out.txt) load=$(cut -d' ' -f1 /proc/loadavg)"
}
loop() { # $1 label, $2 OMP_NUM_THREADS=N
  local t0=$(date +%s.%N)
  env "$2" $P "$REPO/examples/grass_loop.py" > out.txt 2>&1
  local t1=$(date +%s.%N)
  echo "$1 grass_loop $2 wall=$(echo "$t1 - $t0" | bc) load=$(cut -d' ' -f1 /proc/loadavg)"
}
for rep in 1 2; do run idle threads=1; run idle threads=2; done
$P -c "while True: pass" & BUSY=$!
for rep in 1 2; do run busy threads=1; run busy threads=2; done
loop busy OMP_NUM_THREADS=1; loop busy OMP_NUM_THREADS=2
kill $BUSY
loop idle OMP_NUM_THREADS=1; loop idle OMP_NUM_THREADS=2
rm -rf "$WORK"
