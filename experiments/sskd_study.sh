#!/usr/bin/env bash
# The SSKD study behind docs/experiments.md: Fashion-MNIST with limited labels (1,000 and 3,000
# training images), 3 seeds, best and last epoch:
#   resnet20 -> resnet8: baseline, KD, CRD, SSKD (both sizes), SSKD without labels (1,000);
#   resnet20 -> cnn (the heterogeneous pair, 1,000): CE, KD, SSKD;
#   augmentation control (1,000): baseline and KD with the crop + flip that SSKD's views carry;
# then the teacher head's rotation-retrieval accuracy after the pre-stage of every SSKD run.
#   bash experiments/sskd_study.sh     # needs the Fashion-MNIST IDX files; cost: see below
# SIZES="1000" runs one subset size; TEACHER=runs/fashion_features/teacher reuses the feature
# study's teacher (the same config: resnet20, CE, 3 epochs on all 60k images).
# SEEDS="0" runs one seed. Cost, estimated from one short timing (1,000 images, 2 epochs of
# baseline and KD, 1 + 2 epochs of SSKD) on 2 CPU cores shared with other jobs (load ~9): an
# epoch took ~39 s for baseline/KD, ~80 s for the SSKD student stage, ~40 s for the teacher-head
# stage (most of the last was the eval of the unchanged student, which the stage now skips:
# "evaluate": False), so one SSKD run (8 + 10 epochs)
# ~20 min and a KD run ~7 min at 1,000 images; the study then takes ~5.5 h at 1,000 images and
# ~5.3 h at 3,000 (11 h in all, plus ~25 min for the teacher unless reused) at that load; expect
# roughly half on a quiet machine.
set -euo pipefail
cfg=experiments/configs/fashion_sskd.py
out="${RUNS:-runs}/fashion_sskd"
jaxkd="${JAXKD:-jaxkd}"
python="${PYTHON:-python}"
teacher="${TEACHER:-$out/teacher}"
seeds="${SEEDS:-0,1,2}"
if [ ! -f "$teacher/summary.json" ]; then
  $jaxkd train --config $cfg --workdir "$teacher" model.name=resnet20 "model.kwargs={}" \
    method.name=ce train.num_epochs=3 train.progress=False > /dev/null
fi
# the teacher head, trained once on all training images (HEAD_EPOCHS epochs, SGD 0.05, x0.1 at half and
# three quarters) and loaded, frozen, by every SSKD run (JAXKD_SSKD_HEAD; see fashion_sskd.py);
# SSKD_HEAD=in_run: each SSKD run trains its own head first, on its subset (fashion_sskd.py's PRE_EPOCHS)
if [ "${SSKD_HEAD:-shared}" = shared ]; then
  head_epochs="${HEAD_EPOCHS:-6}"
  if [ ! -f "$out/teacher_head/summary.json" ]; then
    $jaxkd train --config $cfg --workdir "$out/teacher_head" teacher.workdir="$teacher" \
      method.name=sskd_teacher_head train.num_epochs=$head_epochs optim.schedule=step \
      "optim.milestones=($((head_epochs / 2)),$((3 * head_epochs / 4)))" train.progress=False > /dev/null
  fi
  export JAXKD_SSKD_HEAD="$out/teacher_head"
fi
# 1,000 images: everything; 3,000 images: the resnet8 rows (baseline, KD, CRD, SSKD)
for n in ${SIZES:-1000 3000}; do
  if [ "$n" = 1000 ]; then methods="${METHODS_1000:-kd,crd,sskd,sskd_unlabelled,ce_cnn,kd_cnn,sskd_cnn}"
  else methods="${METHODS_OTHER:-kd,crd,sskd}"; fi
  $jaxkd compare --config $cfg --workdir "$out/n$n" --seeds "$seeds" --no-progress --methods "$methods" \
    teacher.workdir="$teacher" data.num_train_examples=$n
done
if [ "${AUGMENT_CONTROL:-1}" = 1 ]; then
  $jaxkd compare --config $cfg --workdir "$out/n1000_augment" --seeds "$seeds" --no-progress --methods kd \
    teacher.workdir="$teacher" data.num_train_examples=1000 "data.augment={'pad': 4, 'flip': True}"
fi
# the teacher head: its rotation-retrieval accuracy (train/ss_acc_t) in the first and last epoch of its
# training on the training views, and on the test split (jaxkd.train.sskd_eval.evaluate_teacher_head: the four
# rotations of each test image, retrieved among the batch's originals, batch = the training batch); then, for
# every SSKD run, the heads' retrieval and the fraction of rows kept in its last epoch (means over seeds)
$python - "$out" <<'EOF'
import glob, json, os, statistics, sys
from jaxkd.train.sskd_eval import evaluate_teacher_head
out = sys.argv[1]
def records(workdir):
    return [json.loads(line) for line in open(os.path.join(workdir, "metrics.jsonl"))]
heads, runs = [], {}
for path in [os.path.join(out, "teacher_head", "metrics.jsonl")] + sorted(
        glob.glob(os.path.join(out, "n*", "sskd*", "seed*", "metrics.jsonl"))):
    if not os.path.exists(path):
        continue
    workdir, recs = os.path.dirname(path), records(os.path.dirname(path))
    head = [r for r in recs if r.get("stage") == "teacher_head" or "train/ss_head_loss" in r]
    if head:  # this run trained the head (the shared head run, or an in-run pre-stage)
        heads.append((os.path.relpath(workdir, out), len(head), head[0]["train/ss_acc_t"], head[-1]["train/ss_acc_t"],
                      evaluate_teacher_head(workdir)["accuracy"]))
    student = [r for r in recs if "train/ss_acc_s" in r]
    if student:
        run = os.path.relpath(os.path.dirname(workdir), out)
        runs.setdefault(run, []).append([student[-1][f"train/{k}"] for k in ("ss_acc_t", "ss_acc_s", "ss_kept", "tf_kept")])
lines = ["| teacher head trained in | epochs | ss_acc_t, first epoch | last epoch | on the test split |",
         "|---|---|---|---|---|"]
lines += [f"| {h[0]} | {h[1]} | " + " | ".join(f"{100 * v:.1f} %" for v in h[2:]) + " |" for h in heads]
lines += ["", "| SSKD run | seeds | teacher head ss_acc (training views, last epoch) | student head ss_acc"
          " | similarity rows kept | rotated views kept |", "|---|---|---|---|---|---|"]
for run, vals in runs.items():
    cols = [statistics.fmean(v[i] for v in vals) for i in range(4)]
    lines.append(f"| {run} | {len(vals)} | " + " | ".join(f"{100 * c:.1f} %" for c in cols) + " |")
report = "\n".join(lines) + "\n"
open(os.path.join(out, "retrieval.md"), "w").write(report)
print(report)
EOF
