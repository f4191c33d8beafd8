#!/usr/bin/env bash
# Multi-teacher ensembles and MEAL V2 on digits (docs/experiments.md): three cnn teachers,
# KD from the best one vs the three-teacher ensembles (a) average, (a') confidence-weighted,
# (b) random teacher per example, (c) relabelling, and MEAL V2 (+ its controls), 3 seeds.
#   RUNS=/work/runs bash experiments/ensemble_study.sh     # ~45 min on 2 busy CPU cores
set -euo pipefail
export JAXKD_ENSEMBLE_DIR="${RUNS:-runs}/digits_ensemble"
out="$JAXKD_ENSEMBLE_DIR"
jaxkd="${JAXKD:-jaxkd}"
python="${PYTHON:-python}"
cfg=experiments/configs/digits_ensemble.py
for k in 0 1 2; do  # the teachers: cnn width 32, seeds 0-2, cross-entropy on all 1,500 images
  $jaxkd train --config $cfg --workdir "$out/teachers/seed$k" model.name=cnn "model.kwargs={'width': 32}" \
    method.name=ce seed=$k train.progress=False > /dev/null
done
best=$($python - "$out" <<'PY'
import json, sys
accs = {k: json.load(open(f"{sys.argv[1]}/teachers/seed{k}/summary.json"))["best_accuracy"] for k in range(3)}
print(f"{sys.argv[1]}/teachers/seed{max(accs, key=lambda k: (accs[k], -k))}")
PY
)
echo "best single teacher: $best"
$python experiments/ensemble_accuracy.py --config $cfg "$out"/teachers/seed{0,1,2} | tee "$out/teacher_accuracy.json"
methods=kd,ens_avg,ens_conf,ens_random,ens_relabel,meal_v2,meal_v2_noadv,ft_ce
# all 1,500 training images, then 300 (the teachers stay the full-data ones); MEAL V2 starts
# from the baseline of the same comparison ($JAXKD_ENSEMBLE_COMPARE_DIR)
JAXKD_ENSEMBLE_COMPARE_DIR="$out/full" $jaxkd compare --config $cfg --workdir "$out/full" --seeds 0,1,2 \
  --methods $methods --no-progress teacher.workdir="$best"
JAXKD_ENSEMBLE_COMPARE_DIR="$out/n300" $jaxkd compare --config $cfg --workdir "$out/n300" --seeds 0,1,2 \
  --methods $methods --no-progress teacher.workdir="$best" data.num_train_examples=300
cat "$out/full/results.md" "$out/n300/results.md"
