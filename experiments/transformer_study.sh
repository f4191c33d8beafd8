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
#   PARTS="fashion_full" bash experiments/transformer_study.sh   # Fashion-MNIST on all 60k images
#
# Cost. Measured on the shared 2-core CPU under load (load average ~10, i.e. ~1/4.5 of the machine),
# MNIST-1D, batch 128, from the difference of 2- and 6-epoch runs on 2,000 signals (compilation
# and start-up cancel): a student CE step 0.39 s, a TinyBERT step (teacher forward inside) 2.0 s.
# benchmarks/bench_transformer_kd.py (Fashion, 17 tokens) puts KD at ~0.7x and MiniLM at ~1.2x a
# TinyBERT step, and the Fashion steps at ~1.6x the MNIST-1D ones. Divided by 4.5 for a quiet
# machine, the estimates are:
#   mnist1d_full ~50 min, mnist1d_limited ~12 min, the MNIST-1D teacher (30 epochs) ~10 min;
#   fashion_limited ~32 min, the Fashion teacher (5 epochs on 60k images) ~45 min;
#   fashion_full ~7 h (10 epochs on 60k images x 12 students); minilm_v2 adds ~20 % to a part.
# The default parts (the first three, with both teachers) take ~2.5 h on a quiet machine, 4-5x that
# while other jobs share the CPU; fashion_full needs an accelerator or a night. Factor-2 estimates.
# Measured (docs/experiments.md §4, 2026-11-30): the MNIST-1D teacher 25.5 min and both MNIST-1D
# parts ~1 h 55 min of wall-clock in all, on the 2 cores shared with a second study.
# FASHION_TEACHER_EPOCHS=3 trains a cheaper Fashion teacher. FASHION_FULL_EPOCHS / FASHION_FULL_INTERMEDIATE
# (default 10 / 3, as the limited part) shorten the full-data part; §4 ran it at 2 / 1 (938 steps).
set -euo pipefail
out="${RUNS:-runs}/transformer"
jaxkd="${JAXKD:-jaxkd}"
parts="${PARTS:-mnist1d_full mnist1d_limited fashion_limited}"  # fashion_full: opt in
methods="${METHODS:-kd,tinybert,minilm}"  # add minilm_v2: METHODS=kd,tinybert,minilm,minilm_v2
seeds="${SEEDS:-0,1,2}"
fashion_teacher_epochs="${FASHION_TEACHER_EPOCHS:-5}"  # the Fashion ViT teacher's epochs on all 60k images
full_epochs="${FASHION_FULL_EPOCHS:-10}" full_intermediate="${FASHION_FULL_INTERMEDIATE:-3}"
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
