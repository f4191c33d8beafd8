#!/usr/bin/env bash
# The Hinton-KD study behind docs/experiments.md: T x alpha sweep, 3 seeds, full and limited data.
#   bash experiments/kd_study.sh digits          # ~10 min on 2 CPU cores
#   bash experiments/kd_study.sh fashion_mnist   # ~1-2 h on 2 CPU cores; needs the IDX files
set -euo pipefail
which="${1:-digits}"
out="${RUNS:-runs}/study_${which}"
jaxkd="${JAXKD:-jaxkd}"
seeds=0,1,2
sweep=(--sweep method.temperature=1,4,8 --sweep method.alpha=0.5,0.9)
case "$which" in
  digits)
    cfg=experiments/configs/digits.py
    $jaxkd compare --config $cfg --workdir "$out/full" --seeds $seeds "${sweep[@]}" --no-progress
    $jaxkd compare --config $cfg --workdir "$out/n300" --seeds $seeds "${sweep[@]}" --no-progress \
      teacher.workdir="$out/full/teacher" data.num_train_examples=300
    ;;
  fashion_mnist)
    cfg=experiments/configs/fashion_mnist.py
    # the teacher once, on all 60k images
    $jaxkd train --config $cfg --workdir "$out/teacher" model.name=cnn "model.kwargs={'width': 32}" \
      method.name=ce train.progress=False > /dev/null
    # limited data (1000 images), where KD's gain is known to be larger: the whole grid
    $jaxkd compare --config $cfg --workdir "$out/n1000" --seeds $seeds "${sweep[@]}" --no-progress \
      teacher.workdir="$out/teacher" data.num_train_examples=1000 train.num_epochs=40
    # full data: the published setting (T=4, alpha=0.9) and a softer alpha
    $jaxkd compare --config $cfg --workdir "$out/full" --seeds $seeds --sweep method.alpha=0.5,0.9 --no-progress \
      teacher.workdir="$out/teacher"
    ;;
  *) echo "usage: $0 digits|fashion_mnist" >&2; exit 2 ;;
esac
