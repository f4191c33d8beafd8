#!/usr/bin/env bash
# The transformer-distillation study (docs/experiments.md, "Transformers: TinyBERT and MiniLM"):
# ViT teacher (6 layers, D=256, 8 heads) -> ViT student (3 layers, D=128, 8 heads), baseline / logit
# KD / TinyBERT (two stages) / MiniLM (distil, then fine-tune) / MiniLM-v2, 3 seeds, on
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
# Cost on 2 quiet CPU cores, extrapolated from one loaded run of benchmarks/bench_transformer_kd.py
# (batch 128, 17 tokens; steps scaled by 1/6.4, the share of the CPU that run had; MNIST-1D's 11
# tokens taken as 0.6x): per batch of 128 about 0.16 s for a student CE step, 0.33 s KD, 0.5 s
# TinyBERT, 0.6 s MiniLM, ~1 s a teacher train step. Then
#   mnist1d_full ~45 min, mnist1d_limited ~11 min, their teacher ~9 min;
#   fashion_limited ~30 min, the Fashion teacher (10 epochs on 60k images) ~75 min;
#   fashion_full ~6 h (10 epochs on 60k images x 15 students).
# The default parts (the first three, with both teachers) take about 3 h; fashion_full needs an accelerator
# or a night. These are estimates with a factor-2 uncertainty (the timing ran under load).
set -euo pipefail
out="${RUNS:-runs}/transformer"
jaxkd="${JAXKD:-jaxkd}"
parts="${PARTS:-mnist1d_full mnist1d_limited fashion_limited}"  # fashion_full: opt in
methods="${METHODS:-kd,tinybert,minilm,minilm_v2}"
seeds="${SEEDS:-0,1,2}"
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
      teacher $fashion "$out/fashion/teacher" 10 "(7, 7)"
      $jaxkd compare --config $fashion --workdir "$out/$part" --seeds "$seeds" --no-progress \
        --methods "$methods" teacher.workdir="$out/fashion/teacher" data.num_train_examples=5000 ;;
    fashion_full)
      teacher $fashion "$out/fashion/teacher" 10 "(7, 7)"
      $jaxkd compare --config $fashion --workdir "$out/$part" --seeds "$seeds" --no-progress \
        --methods "$methods" teacher.workdir="$out/fashion/teacher" ;;
    *) echo "unknown part $part (mnist1d_full, mnist1d_limited, fashion_limited, fashion_full)" >&2; exit 2 ;;
  esac
done
