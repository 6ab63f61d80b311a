#!/usr/bin/env bash
# The GPU check of issue 14, in one go (about 7 minutes on one H200, 11 with the compiled
# part, which has not run on a GPU yet), from the repository
# root of a copy of the working tree:
#
#   OUT=/some/folder bash benchmarks/gpu_check.sh              # on the GPU machine
#   OUT=/tmp/gpucheck_out DEVICE=cpu TINY=1 DATA_DIR=/work/shared/data \
#       bash benchmarks/gpu_check.sh                           # a dry run on a CPU
#
# Parts, each under its own timeout and all under one deadline (BUDGET seconds): env
# (versions, the GPU), tests (tests/test_device.py with PYRO_LADDER_TEST_DEVICE=$DEVICE),
# cli (`python3 -m pyro_ladder train --device $DEVICE`, one epoch of binarized MNIST, the
# test log-likelihood at K=5000 on 100 images), eval (K=5000 throughput, library against
# reference, several pass sizes), bench (the runner's library/reference step ratios,
# `python3 -m benchmarks --only train,eval --device $DEVICE`), fit (fit(device=) step
# times), compiled (`--only compiled`: compile=True against the eager and the compiled
# reference). A part that fails or runs out of time is recorded as such and the next runs.
# Writes $OUT/gpu_check.json (every part's result, exit code, seconds, and the log tail of
# a failed one), $OUT/gpu_check.log, $OUT/benchmark.json and $OUT/tests.xml.
#
# The GPU machine has python3 and torch but no pyro-ppl / pyro-api and no registry: carry
# their wheels in .whl/ (git-ignored), the data in .gpu_data/binarized_mnist/ (git-ignored).
set -u
cd "$(dirname "$0")/.."
START=$(date +%s)
OUT=${OUT:?set OUT to the folder for the results}
DEVICE=${DEVICE:-cuda}
TINY=${TINY:-0}
DATA_DIR=${DATA_DIR:-.gpu_data}
BUDGET=${BUDGET:-660}  # seconds for all parts; the last ones are skipped past it
PY=${PYTHON:-python3}
WORK=$(mktemp -d /tmp/gpu_check.XXXXXX)
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1 OMP_NUM_THREADS=${OMP_NUM_THREADS:-8} PYRO_LADDER_DATA="$DATA_DIR"
exec > >(tee "$OUT/gpu_check.log") 2>&1

if ls .whl/*.whl >/dev/null 2>&1 && ! $PY -c "import pyro" 2>/dev/null; then
    $PY -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
        --target /tmp/site .whl/*.whl || echo "wheel install failed"
    export PYTHONPATH=/tmp/site:$PWD
else
    export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH}
fi
tiny=(); [ "$TINY" = 1 ] && tiny=(--tiny)

# part NAME LIMIT COMMAND...: run it with a timeout of LIMIT or what is left of BUDGET
part() {
    local name=$1 limit=$2; shift 2
    local left=$((BUDGET - ($(date +%s) - START)))
    if [ "$left" -lt 20 ]; then
        echo "skipped: ${left}s of the ${BUDGET}s budget left" >"$WORK/$name.skipped"
        echo "=== $name skipped (budget)"; return
    fi
    [ "$left" -lt "$limit" ] && limit=$left
    echo "=== $name (at most ${limit}s) $(date -u +%T)"
    local t0=$(date +%s%N)
    timeout -k 5 "$limit" "$@" > >(tee "$WORK/$name.log") 2>&1
    local rc=$?
    echo "$rc $((($(date +%s%N) - t0) / 1000000))" >"$WORK/$name.status"  # ms
    echo "=== $name rc=$rc"
}

part env 60 $PY benchmarks/gpu_check.py env --device "$DEVICE" --out "$WORK/env.json"
part tests 120 env PYRO_LADDER_TEST_DEVICE="$DEVICE" $PY -m pytest -q -p no:cacheprovider \
    tests/test_device.py --junitxml="$OUT/tests.xml"
if [ "$TINY" = 1 ]; then cli_size=(--preset small --eval-samples 20 --eval-limit 10)
else cli_size=(--eval-samples 5000 --eval-limit 100); fi
# the CLI's --device comes with issue 14 part 3; without it only a CPU run can go ahead
if $PY -m pyro_ladder train --help 2>/dev/null | grep -q -- "--device "; then
    cli_size+=(--device "$DEVICE")
elif [ "$DEVICE" != cpu ]; then
    echo "skipped: this CLI has no --device option" >"$WORK/cli.skipped"
fi
[ -f "$WORK/cli.skipped" ] || part cli 90 $PY -m pyro_ladder train --dataset binarized-mnist \
    --data-dir "$DATA_DIR" --epochs 1 --seed 0 --no-progress "${cli_size[@]}" --out "$WORK/cli_run"
[ -f "$WORK/cli_run/metrics.json" ] && cp "$WORK/cli_run/metrics.json" "$WORK/cli.json"
part eval 90 $PY benchmarks/gpu_check.py eval --device "$DEVICE" --data-dir "$DATA_DIR" \
    ${tiny[@]+"${tiny[@]}"} --out "$WORK/eval.json"
if [ "$TINY" = 1 ]; then bench_size=(--tiny); else bench_size=(--repeats "${REPEATS:-20}"); fi
part bench 150 $PY -m benchmarks --only train,eval --threads "$OMP_NUM_THREADS" \
    --device "$DEVICE" --data-dir "$DATA_DIR" "${bench_size[@]}" --out "$OUT/benchmark.json"
[ -f "$OUT/benchmark.json" ] && cp "$OUT/benchmark.json" "$WORK/bench.json"
part fit 60 $PY benchmarks/gpu_check.py fit --device "$DEVICE" --data-dir "$DATA_DIR" \
    ${tiny[@]+"${tiny[@]}"} --out "$WORK/fit.json"
# the whole step compiled (compile=True) against the eager and the compiled reference
if [ "$TINY" = 1 ]; then comp_size=(--tiny --compile-backend eager); else comp_size=(--repeats 10); fi
part compiled 240 $PY -m benchmarks --only compiled --threads "$OMP_NUM_THREADS" \
    --device "$DEVICE" --data-dir "$DATA_DIR" "${comp_size[@]}" --out "$OUT/compiled.json"
[ -f "$OUT/compiled.json" ] && cp "$OUT/compiled.json" "$WORK/compiled.json"

$PY benchmarks/gpu_check.py summary --work "$WORK" --out "$OUT/gpu_check.json" >/dev/null \
    || echo "{\"summary_failed\": true, \"work\": \"$WORK\"}" >"$OUT/gpu_check.json"
echo "=== done in $(($(date +%s) - START))s: $OUT/gpu_check.json"
