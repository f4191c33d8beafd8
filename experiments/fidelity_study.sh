#!/usr/bin/env bash
# Issue 19's reruns (docs/experiments.md): Fashion-MNIST, resnet20 -> resnet8, 3,000 training
# images, 3 seeds: two-stage FitNets with and without T^2, attention transfer in code / paper /
# earlier paper mode, MEAL V2 in the reference and GAN modes (+ CE fine-tuning control), and the
# relabelled data set of N teachers against uniform averaging (same epochs, same steps).
#   RUNS=/work/runs bash experiments/fidelity_study.sh   # needs the IDX files
# N = JAXKD_FIDELITY_TEACHERS teachers (default 2; the multi-teacher presets run N teacher forwards
# a step, ens_relabel_data and ens_avg_long N times the steps). METHODS=a,b runs a subset (the
# baseline always runs). docs/experiments.md §3d-§3g give each part's measured cost.
set -euo pipefail
export JAXKD_FIDELITY_DIR="${RUNS:-runs}/fashion_fidelity"
out="$JAXKD_FIDELITY_DIR"
jaxkd="${JAXKD:-jaxkd}"
cfg=experiments/configs/fashion_fidelity.py
export JAXKD_FIDELITY_TEACHERS="${JAXKD_FIDELITY_TEACHERS:-2}"
for k in $(seq 0 $((JAXKD_FIDELITY_TEACHERS - 1))); do  # resnet20 teachers: cross-entropy, 3 epochs on all 60k images
  if [ ! -f "$out/teachers/seed$k/summary.json" ]; then
    $jaxkd train --config $cfg --workdir "$out/teachers/seed$k" model.name=resnet20 "model.kwargs={}" \
      method.name=ce seed=$k train.num_epochs=3 train.progress=False > /dev/null
  fi
done
# single-teacher presets distil from teacher seed 0; the multi-teacher ones name all N
# (config.teachers); MEAL V2 and ft_ce fine-tune this comparison's baseline students, which
# compare trains first
all=kd,fitnets_two_stage,fitnets_two_stage_no_t2,at,at_paper,at_paper_unscaled
all=$all,meal_v2_ref,meal_v2_gan,ft_ce,ens_avg,ens_relabel_data,ens_avg_long,ce_long
JAXKD_FIDELITY_COMPARE_DIR="$out/n3000" $jaxkd compare --config $cfg --workdir "$out/n3000" --seeds 0,1,2 \
  --no-progress --methods "${METHODS:-$all}" teacher.workdir="$out/teachers/seed0" data.num_train_examples=3000
cat "$out/n3000/results.md"
