#!/usr/bin/env bash
# The transformer-distillation study (docs/experiments.md, "Transformers: TinyBERT and MiniLM"):
# ViT teacher (6 layers, D=256, 8 heads) -> ViT student (3 layers, D=128, 8 heads), baseline / logit
# KD / TinyBERT (two stages) / MiniLM (distil, then fine-tune) (MiniLM-v2 optional), 3 seeds, on
#   * Fashion-MNIST (7x7 patches, 17 tokens; experiments/configs/fashion_vit.py), all 60,000
#     training images and a 5,000-image subset;
#   * MNIST-1D as a sequence task (10 tokens of 4 samples; experiments/configs/mnist1d_transformer.py),
#     all 4,000 training signals and a 1,000-signal subset.
# Each teacher is trained once on all its training data. `jaxkd compare` writes each part's table
# (accuracy of every seed, the students' parameter counts and images/s) under $RUNS/transformer/.
#
#   bash experiments/transformer_study.sh                    # MNIST-1D full + limited, Fashion limited
#   PARTS="fashion_full" bash experiments/transformer_study.sh   # Fashion-MNIST on all 60k images (2 epochs)
#
# Budgets: MNIST-1D 30 epochs per student (teacher 30); Fashion 10 epochs on the 5,000-image subset,
# but only FASHION_FULL_EPOCHS=2 (FASHION_FULL_INTERMEDIATE=1 of them distillation for the two-stage
# methods) on all 60,000, and a FASHION_TEACHER_EPOCHS=4 teacher, so the Fashion parts fit a 2-core CPU.
# FASHION_FULL_EPOCHS=10 FASHION_FULL_INTERMEDIATE=3 gives the full part the limited part's budget.
#
# Cost, measured wall-clock on the 2-core CPU (docs/experiments.md §4 and §4b, 2026-11-30), evals
# and compilation included: the MNIST-1D teacher 25.5 min, both MNIST-1D parts ~1 h 55 min in all
# (cores shared with a second study); minilm_v2 adds ~20 % to a part. On idle cores: the Fashion
# teacher 34 min (4 epochs), fashion_limited 41 min (12 runs: baseline 2.3 min, KD 3.7, TinyBERT
# 3.9, MiniLM 2.8 each), fashion_full 70 min (12 runs of 2 epochs: baseline 3.4 min, KD 6.8, TinyBERT 7.2, MiniLM 5.1).
# At 10 epochs fashion_full would take ~5x that: an accelerator's job.
set -euo pipefail
out="${RUNS:-runs}/transformer"
jaxkd="${JAXKD:-jaxkd}"
parts="${PARTS:-mnist1d_full mnist1d_limited fashion_limited}"  # fashion_full: opt in
methods="${METHODS:-kd,tinybert,minilm}"  # add minilm_v2: METHODS=kd,tinybert,minilm,minilm_v2
seeds="${SEEDS:-0,1,2}"
fashion_teacher_epochs="${FASHION_TEACHER_EPOCHS:-4}"  # the Fashion ViT teacher's epochs on all 60k images
full_epochs="${FASHION_FULL_EPOCHS:-2}" full_intermediate="${FASHION_FULL_INTERMEDIATE:-1}"  # fashion_full's budget
fashion=experiments/configs/fashion_vit.py
mnist1d=experiments/configs/mnist1d_transformer.py

teacher() {  # config, work dir, epochs, patch: the teacher once, on all training images, cross-entropy
  if [ ! -f "$2/summary.json" ]; then
    $jaxkd train --config "$1" --workdir "$2" model.name=vit_teacher "model.kwargs={'patch_size': $4}" \
      method.name=ce train.num_epochs="$3" train.progress=False > /dev/null
  fi
}

for part in $parts; do
  case $part in
    mnist1d_full | mnist1d_limited)
      teacher $mnist1d "$out/mnist1d/teacher" 30 "(4, 1)"
      n=$([ $part = mnist1d_full ] && echo None || echo 1000)
      $jaxkd compare --config $mnist1d --workdir "$out/$part" --seeds "$seeds" --no-progress \
        --methods "$methods" teacher.workdir="$out/mnist1d/teacher" data.num_train_examples=$n ;;
    fashion_limited)
      teacher $fashion "$out/fashion/teacher" "$fashion_teacher_epochs" "(7, 7)"
      $jaxkd compare --config $fashion --workdir "$out/$part" --seeds "$seeds" --no-progress \
        --methods "$methods" teacher.workdir="$out/fashion/teacher" data.num_train_examples=5000 ;;
    fashion_full)
      teacher $fashion "$out/fashion/teacher" "$fashion_teacher_epochs" "(7, 7)"
      JAXKD_VIT_EPOCHS=$full_epochs JAXKD_VIT_INTERMEDIATE=$full_intermediate \
        $jaxkd compare --config $fashion --workdir "$out/$part" --seeds "$seeds" --no-progress \
        --methods "$methods" teacher.workdir="$out/fashion/teacher" ;;
    *) echo "unknown part $part (mnist1d_full, mnist1d_limited, fashion_limited, fashion_full)" >&2; exit 2 ;;
  esac
done
