#!/usr/bin/env bash
# One lent-GPU call that continues the shipped line with the recipe it was trained on, then
# returns the EMA and raw weights in $OUT (compact int8 latents, under 16 MiB each) with the
# run's log (step rate, losses).
#   here:    python scripts/pack_carry.py          # build/carry: the training photos + teachers
#   device:  run(command="scripts/device_train.sh 8", carry=["build/carry"], timeout_s=600)
# MINUTES is train_timed.py's budget, its own start-up included; a call may run 600 s and the
# install before it and the copies after it take about a minute, so 8 fits. Further flags go
# to scripts/train_timed.py after the recipe's and override them (e.g. --config bidiff-m2l-x2
# --correction-weight 1, or --device cpu --workers 0 for a dry run on this machine).
set -euo pipefail
minutes=${1:?usage: scripts/device_train.sh MINUTES [train_timed.py flags]}
shift
: "${OUT:?OUT must name the folder the weights go to}"
runs=${RUNS:-/tmp/runs}
pip install -q --no-deps --no-build-isolation -e .
python3 scripts/train_timed.py --name gpu --runs "$runs" --minutes "$minutes" \
    --config bidiff-m2-x2 --init checkpoints/bidiff-m2-x2.safetensors \
    --data build/carry/train --image-teacher build/carry/teachers --distil-weight 3 \
    --degradation mixed --loss l2 --loss-target split --loss-back-projection 2 --t-min 1600 \
    --batch 32 --patch 128 --lr 2e-4 --warmup-steps 1 --probe-steps 200 --precision bf16 --no-anneal \
    --device cuda --workers 12 "$@"
for w in ema raw; do
    python3 scripts/keep_weights.py "$runs/gpu/latest_$w.safetensors" "$OUT/gpu-$w.safetensors"
done
cp "$runs/gpu/log.jsonl" "$OUT/gpu-log.jsonl"
