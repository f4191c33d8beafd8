#!/usr/bin/env bash
# The study behind docs/experiments.md ("CRD, DKD, DIST and logit standardisation"): Fashion-MNIST,
# resnet20 -> resnet8, baseline / KD / CRD / CRD + KD / DKD / DIST / KD + LS, 3 seeds, 3,000 images.
#   bash experiments/modern_study.sh     # ~2 h on 2 CPU cores; needs the Fashion-MNIST IDX files
set -euo pipefail
cfg=experiments/configs/fashion_modern.py
out="${RUNS:-runs}/fashion_modern"
jaxkd="${JAXKD:-jaxkd}"
# the teacher once, on all 60k images (the same teacher as the feature study)
if [ ! -f "$out/teacher/summary.json" ]; then
  $jaxkd train --config $cfg --workdir "$out/teacher" model.name=resnet20 "model.kwargs={}" \
    method.name=ce train.num_epochs=3 train.progress=False > /dev/null
fi
$jaxkd compare --config $cfg --workdir "$out/n3000" --seeds 0,1,2 --no-progress \
  --methods crd,crd_kd,kd,dkd,dist,kd_ls teacher.workdir="$out/teacher" data.num_train_examples=3000
