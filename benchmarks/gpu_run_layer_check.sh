#!/bin/bash
# The run layer and CLI on a GPU, in one go (about 3 minutes on one GPU): train on cuda,
# evaluate there (must equal metrics.json) and on the CPU, report, sample, resume on the same
# GPU (must equal the uninterrupted run bitwise) and on the CPU, a one-GPU Lightning run.
# Writes $OUT/gpu_run_layer.json (each step: ok, seconds, last lines) and prints it.
set -u
OUT=${OUT:-/tmp/gpu_check}
mkdir -p "$OUT"
W=$(mktemp -d)
PY=${PYTHON:-python3}
export OMP_NUM_THREADS=4 PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH}
T="$PY -m pyro_ladder train --preset small --eval-samples 20 --eval-limit 100 --no-progress --seed 3"
steps=(
  "train_cuda|$T --epochs 2 --checkpoint-every 3 --device cuda --out $W/whole"
  "evaluate_cuda|$PY -m pyro_ladder evaluate $W/whole/checkpoint.pt --num-samples 20 --eval-limit 100 --device cuda --no-progress > $W/eval_cuda.json"
  "evaluate_equals_metrics|$PY -c \"import json; a=json.load(open('$W/eval_cuda.json')); b=json.load(open('$W/whole/metrics.json')); print(a['test_log_likelihood'], b['test_log_likelihood']); assert a['test_log_likelihood']==b['test_log_likelihood']\""
  "evaluate_cpu|$PY -m pyro_ladder evaluate $W/whole/checkpoint.pt --num-samples 20 --eval-limit 100 --device cpu --no-progress | grep test_log_likelihood"
  "report_cuda|$PY -m pyro_ladder report $W/whole/checkpoint.pt --out $W/rep --num-samples 20 --eval-limit 100 --device cuda --no-progress"
  "sample_cuda|$PY -m pyro_ladder sample $W/whole/checkpoint.pt --out $W/s.png --device cuda"
  "train_cuda_1_epoch|$T --epochs 1 --checkpoint-every 3 --device cuda --out $W/part"
  "resume_same_gpu|$PY -m pyro_ladder train --resume $W/part --epochs 2 --device cuda --no-progress"
  "resume_bitwise|$PY -c \"import json,torch; f=lambda n: {k:v for k,v in json.load(open('$W/'+n+'/metrics.json')).items() if k!='train_seconds'}; a,b=f('part'),f('whole'); print(a['test_log_likelihood'], b['test_log_likelihood']); assert a==b; s=lambda n: torch.load('$W/'+n+'/checkpoint.pt', weights_only=True, map_location='cpu')['state_dict']; x,y=s('part'),s('whole'); assert all(torch.equal(x[k],y[k]) for k in x)\""
  "train_cuda_1_epoch_b|$T --epochs 1 --device cuda --out $W/tocpu"
  "resume_on_cpu|$PY -m pyro_ladder train --resume $W/tocpu --epochs 2 --device cpu --no-progress"
  "train_conditional_cuda|$T --epochs 1 --condition label --device cuda --out $W/cond"
  "sample_classes_cuda|$PY -m pyro_ladder sample $W/cond/checkpoint.pt --classes 3,0,7 --out $W/c.png --device cuda"
  "lightning_one_gpu|$T --epochs 2 --devices 1 --accelerator gpu --checkpoint-every 3 --out $W/light"
  "lightning_resume|$PY -m pyro_ladder train --resume $W/light --epochs 3 --devices 1 --accelerator gpu --no-progress"
)
echo "{" > "$OUT/gpu_run_layer.json"
first=1
for entry in "${steps[@]}"; do
  name=${entry%%|*}; cmd=${entry#*|}
  start=$(date +%s.%N)
  bash -c "$cmd" > "$W/$name.log" 2>&1; rc=$?
  secs=$($PY -c "print(round($(date +%s.%N) - $start, 1))")
  tail=$(tail -c 600 "$W/$name.log" | $PY -c "import json,sys; print(json.dumps(sys.stdin.read()))")
  [ $first -eq 1 ] || echo "," >> "$OUT/gpu_run_layer.json"; first=0
  echo "\"$name\": {\"ok\": $([ $rc -eq 0 ] && echo true || echo false), \"seconds\": $secs, \"tail\": $tail}" >> "$OUT/gpu_run_layer.json"
  echo "$name rc=$rc ${secs}s"
done
echo "}" >> "$OUT/gpu_run_layer.json"
nvidia-smi --query-gpu=name --format=csv,noheader
