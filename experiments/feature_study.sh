#!/usr/bin/env bash
# The feature-method study behind docs/experiments.md section 3b: Fashion-MNIST, resnet20 ->
# resnet8, baseline / KD / FitNets (one and two stages) / AT / FSP, 3 seeds, 3,000 training images.
#   bash experiments/feature_study.sh     # ~1.5 h on 2 CPU cores; needs the Fashion-MNIST IDX files
set -euo pipefail
cfg=experiments/configs/fashion_features.py
out="${RUNS:-runs}/fashion_features"
jaxkd="${JAXKD:-jaxkd}"
# the teacher once, on all 60k images
if [ ! -f "$out/teacher/summary.json" ]; then
  $jaxkd train --config $cfg --workdir "$out/teacher" model.name=resnet20 "model.kwargs={}" \
    method.name=ce train.num_epochs=3 train.progress=False > /dev/null
fi
$jaxkd compare --config $cfg --workdir "$out/n3000" --seeds 0,1,2 --no-progress \
  --methods kd,fitnets,fitnets_two_stage,at,fsp \
  teacher.workdir="$out/teacher" data.num_train_examples=3000
