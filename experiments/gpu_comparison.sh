#!/usr/bin/env bash
# Issue 17, part 3 on one GPU machine (16 cores, one GPU), in about 5 minutes: the digits
# sweep over seeds (seeds.py), then the conv/MLP comparison at one training budget per run
# (conv_vs_mlp.py); each writes its summary, and this script copies the few files that
# come back into $OUT:
#   seeds.json seeds.md conv_vs_mlp.json conv_vs_mlp.md logs.tar.gz (every run's log and
#   settings) timing.txt
#
#   OUT=/tmp/out bash experiments/gpu_comparison.sh                   # the GPU run
#   OUT=/tmp/out DEVICE=cpu JOBS=1 QUICK=1 bash experiments/gpu_comparison.sh   # a dry run
#
# Settings (environment): BUDGET training seconds per conv/MLP run (40); DIGITS_BUDGET
# training seconds per digits run at most, besides its 200 epochs (15); JOBS processes at a
# time (14); TOTAL seconds for everything (285): the digits sweep stops at DIGITS_DEADLINE
# (85), the comparison at TOTAL less what has passed; runs not finished by then are listed
# as failed in the .md and .json. FREE_BITS (0) floors each conv layer's KL in training.
# DATA_DIR (.gpu_data) holds binarized_mnist/ and fashion-mnist/; WORK
# (/tmp/pyro_ladder_gpu) the per-run files. QUICK=1 runs each script's --quick mode on 2
# depths and 1 seed, from files in DATA_DIR.
set -euo pipefail
ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
cd "$ROOT"
: "${OUT:?set OUT to the folder that receives the results}"
PYTHON=${PYTHON:-python3}
DEVICE=${DEVICE:-cuda}
JOBS=${JOBS:-14}
BUDGET=${BUDGET:-40}
DIGITS_BUDGET=${DIGITS_BUDGET:-15}
TOTAL=${TOTAL:-285}
DIGITS_DEADLINE=${DIGITS_DEADLINE:-85}
DATA_DIR=${DATA_DIR:-.gpu_data}
WORK=${WORK:-/tmp/pyro_ladder_gpu}
export PYTHONPATH="$ROOT${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1 OMP_NUM_THREADS=1

seeds_args=(--seeds 0,1,2 --budget-seconds "$DIGITS_BUDGET")
cvm_args=(--seeds 0,1,2 --budget-seconds "$BUDGET" --free-bits "${FREE_BITS:-0}")
if [[ "${QUICK:-0}" == 1 ]]; then
  seeds_args=(--quick --depths 1,2 --seeds 0)
  cvm_args=(--quick --seeds 0)
fi

for sub in binarized_mnist fashion-mnist; do # fail in seconds, not after the digits sweep
  if [[ ! -e "$DATA_DIR/$sub" ]]; then
    echo "gpu_comparison.sh: $DATA_DIR/$sub is missing; copy the data there or set DATA_DIR" >&2
    exit 2
  fi
done
mkdir -p "$OUT" "$WORK"
start=$SECONDS
status=0
"$PYTHON" experiments/seeds.py "${seeds_args[@]}" --device "$DEVICE" --jobs "$JOBS" \
  --deadline-seconds "$DIGITS_DEADLINE" --out "$WORK/seeds" || status=$?
digits_s=$((SECONDS - start))
left=$((TOTAL - digits_s - 15)) # 15 s to load and cache the data sets and to summarize
"$PYTHON" experiments/conv_vs_mlp.py "${cvm_args[@]}" --data-dir "$DATA_DIR" \
  --device "$DEVICE" --jobs "$JOBS" --deadline-seconds "$((left > 30 ? left : 30))" \
  --out "$WORK/conv_vs_mlp" || status=$?

for part in seeds conv_vs_mlp; do
  for ext in json md; do
    if [[ -f "$WORK/$part/results.$ext" ]]; then cp "$WORK/$part/results.$ext" "$OUT/$part.$ext"; fi
  done
done
tar czf "$OUT/logs.tar.gz" -C "$WORK" --exclude='*.pt' seeds conv_vs_mlp
{
  echo "device $DEVICE, jobs $JOBS, budget $BUDGET s, digits budget $DIGITS_BUDGET s"
  echo "digits sweep ${digits_s} s, total $((SECONDS - start)) s, exit status $status"
  nvidia-smi --query-gpu=name,memory.used,memory.total --format=csv 2>/dev/null || true
} >"$OUT/timing.txt"
cat "$OUT/timing.txt"
exit "$status"
