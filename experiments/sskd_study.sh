#!/usr/bin/env bash
# The SSKD study behind docs/experiments.md §5: Fashion-MNIST with limited labels (1,000 and 3,000
# training images), 3 seeds, best and last epoch:
#   the teacher head, trained once on all 60,000 images (HEAD_EPOCHS, default 6) and loaded, frozen,
#   by every SSKD run (SSKD_HEAD=in_run: each run trains its own head on its subset first);
#   resnet20 -> resnet8: baseline, KD, CRD, SSKD (both sizes), SSKD without labels and two SSKD
#   ablations (without the similarity term; without both auxiliary terms) (1,000);
#   resnet20 -> cnn (the heterogeneous pair, 1,000): CE, KD, SSKD;
#   augmentation control (1,000): baseline and KD with the crop + flip that SSKD's views carry;
#   longer training (1,000, seed 0 only): baseline, KD, SSKD for 30 epochs (LONG_CONTROL=0 skips it);
# then the teacher head's rotation-retrieval accuracy (retrieval.md).
#   bash experiments/sskd_study.sh     # needs the Fashion-MNIST IDX files
# SIZES="1000" runs one subset size, SEEDS="0" one seed; TEACHER=runs/fashion_modern/teacher reuses
# §3c's teacher (otherwise one is trained: resnet20, CE, 3 epochs on all 60k images).
# Cost on the shared 2 CPU cores (wall-clock per run, other runs alongside): the head 61 min;
# at 1,000 images baseline/KD 1-2 min, CRD 2.5, SSKD 2.5, cnn runs about 1; at 3,000 images SSKD
# ~6 min (§3c's baseline/KD/CRD, 5-22 min, were reused); the whole study about 2 h 45 min with them reused.
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
  if [ ! -f "$out/teacher_head/summary.json" ]; then
    JAXKD_SSKD_HEAD_EPOCHS="${HEAD_EPOCHS:-6}" $jaxkd train --config experiments/configs/fashion_sskd_head.py \
      --workdir "$out/teacher_head" teacher.workdir="$teacher" train.progress=False > /dev/null
  fi
  export JAXKD_SSKD_HEAD="$out/teacher_head"
fi
# 1,000 images: everything; 3,000 images: the resnet8 rows (baseline, KD, CRD, SSKD)
for n in ${SIZES:-1000 3000}; do
  if [ "$n" = 1000 ]; then
    methods="${METHODS_1000:-kd,crd,sskd,sskd_unlabelled,sskd_no_ss,sskd_views_only,ce_cnn,kd_cnn,sskd_cnn}"
  else methods="${METHODS_OTHER:-kd,crd,sskd}"; fi
  $jaxkd compare --config $cfg --workdir "$out/n$n" --seeds "$seeds" --no-progress --methods "$methods" \
    teacher.workdir="$teacher" data.num_train_examples=$n
done
if [ "${AUGMENT_CONTROL:-1}" = 1 ]; then
  $jaxkd compare --config $cfg --workdir "$out/n1000_augment" --seeds "$seeds" --no-progress --methods kd \
    teacher.workdir="$teacher" data.num_train_examples=1000 "data.augment={'pad': 4, 'flip': True}"
fi
if [ "${LONG_CONTROL:-1}" = 1 ] && [ "${SSKD_HEAD:-shared}" = shared ]; then  # (in-run stages fix 10 student epochs)
  $jaxkd compare --config $cfg --workdir "$out/n1000_e30" --seeds 0 --no-progress --methods kd,sskd \
    teacher.workdir="$teacher" data.num_train_examples=1000 train.num_epochs=30
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
