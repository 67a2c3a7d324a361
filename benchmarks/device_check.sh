#!/usr/bin/env bash
# Issue 7's GPU numbers in one short run on a lent GPU machine (about 7 minutes on one H200),
# most important first, each step going on if an earlier one fails:
#   1. BEiT-L and BEiT-B training under DeepSpeed (`beitdist train`, 1 rank, bf16, 10 steps): ZeRO-3 for L,
#      ZeRO-0 and ZeRO-3 for B; img/s, per-rank GPU memory against `beitdist plan`
#      (benchmarks/zero_scaling.py --device cuda);
#   2. the backbone table, BEiT-S and B, batch 8, fp32 and bf16, train and inference, against
#      transformers and timm, with the matmul peak of the same GPU (backbone_throughput.py);
#   3. the same for BEiT-B at batch 64 in bf16, with torch.compile;
#   4. last, in whatever is left of the device's 600 s: BEiT-B's MIM pretraining step at batch 64
#      in bf16 against transformers (mim_pretrain_step.py); the JSON of the steps before it is
#      written by then, so a device timeout there loses nothing else.
# Results: JSON files and one log under $OUT (at most 8 files; default benchmarks/results/device).
#
# On the GPU machine, in the repository root, after `bash benchmarks/device_wheels.sh` here (its
# image has no DeepSpeed; the wheels in .whl/ are installed into /tmp/site when present):
#   OUT=$OUT bash benchmarks/device_check.sh
# SMOKE=1 runs the same steps at toy sizes on whatever device torch picks (a check of the script).
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-benchmarks/results/device}
mkdir -p "$OUT"
LOG="$OUT/device_check.log"
: > "$LOG"
PY=${PYTHON:-python3}
if compgen -G ".whl/*.whl" > /dev/null; then
    $PY -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
        && export PYTHONPATH=/tmp/site${PYTHONPATH:+:$PYTHONPATH}
fi
export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH} PYTHONUNBUFFERED=1
# run SECONDS COMMAND...: each step has its own limit, the first four together 580 s, inside the device's 600 s
# per command; a step that hangs costs its own budget only
run() {
    local limit=$1; shift
    echo "=== $(date +%T) (limit ${limit} s) $*" | tee -a "$LOG"
    timeout "$limit" "$@" 2>&1 | tee -a "$LOG"
    echo "=== exit ${PIPESTATUS[0]}" | tee -a "$LOG"
}

{ nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv 2>&1
  $PY -c "import torch, deepspeed, transformers; print('torch', torch.__version__, 'cuda', torch.version.cuda,
'deepspeed', deepspeed.__version__, 'transformers', transformers.__version__)" 2>&1; } | tee -a "$LOG"

if [[ "${SMOKE:-0}" == 1 ]]; then
    device=auto; L=(--variant tiny --image-size 32 --patch-size 8 --batch 2 --steps 3); B=("${L[@]}")
    S=(--variants tiny --image-size 32 --iters 2 --warmup 1); C=(--variants tiny --image-size 32 --batch 4 --iters 2)
    M=(--variant tiny --image-size 64 --batch 4 --iters 2)
else
    device=cuda; L=(--variant large --batch 32 --steps 10 --loader-workers 6); B=(--variant base --batch 64 --steps 10 --loader-workers 6)
    S=(--variants small base --iters 20 --warmup 3); C=(--variants base --batch 64 --iters 10 --warmup 2)
    M=(--variant base --batch 64 --iters 10 --warmup 2)
fi
run 170 $PY benchmarks/zero_scaling.py --device "$device" "${L[@]}" --workers 1 --stages 3 --precision bf16 \
    --out /tmp/device_check_large --json "$OUT/zero_large_bf16.json"
run 170 $PY benchmarks/zero_scaling.py --device "$device" "${B[@]}" --workers 1 --stages 0 3 --precision bf16 \
    --out /tmp/device_check_base --json "$OUT/zero_base_bf16.json"
run 150 $PY benchmarks/backbone_throughput.py --device "$device" "${S[@]}" --json "$OUT/backbone_batch8.json"
run 90 $PY benchmarks/backbone_throughput.py --device "$device" "${C[@]}" --modes train --dtypes bf16 --compile \
    --json "$OUT/backbone_compiled_bf16.json"
run 60 $PY benchmarks/mim_pretrain_step.py --device "$device" "${M[@]}" --dtype bf16 --json "$OUT/mim_step_bf16.json"
