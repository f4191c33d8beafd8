"""How optimistic is a "best" accuracy picked on the test split? Digits, baseline and Hinton KD.

    python experiments/selection_study.py --workdir /work/runs/selection [--seeds 0,1,2,3,4] [--val-fraction 0.2]

jaxkd's default (``data.val_fraction=0``) reports as "best" the test accuracy of the epoch with
the highest test accuracy, as the reference code does. That number is picked on the data it
reports, so it is biased upwards. This study trains with ``data.val_fraction`` > 0 (a seeded,
class-stratified share of the training examples held out) and, for every student run, reads
three numbers off the same training curve (``metrics.jsonl``):

* **picked on test**: the maximum of the per-epoch test accuracy (the default's "best");
* **picked on validation**: the test accuracy of the epoch with the best validation accuracy
  (ties to the lower validation loss), the run's ``best_accuracy``;
* **last**: the test accuracy after the last epoch (no choice at all).

Their difference within the same runs isolates the selection bias. Both regimes of
``experiments/kd_study.sh`` are run: all 1,500 training images and a 300-image subset (the
held-out share is taken from those). Writes ``W/report.md`` and ``W/report.json``.
"""

from __future__ import annotations

import argparse
import json
import os
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from jaxkd import config as config_lib  # noqa: E402
from jaxkd.experiment import _mean_std, compare, write_report  # noqa: E402

CONFIG = os.path.join(ROOT, "experiments/configs/digits.py")


def curve_numbers(run_dir: str) -> dict:
    """Test accuracy picked on test, picked on validation (the summary's), and last."""
    with open(os.path.join(run_dir, "summary.json")) as f:
        summary = json.load(f)
    with open(os.path.join(run_dir, "metrics.jsonl")) as f:
        evals = [r for r in map(json.loads, f) if "eval/accuracy" in r]
    return {"test_picked": max(r["eval/accuracy"] for r in evals), "val_picked": summary["best_accuracy"],
            "last": summary["last_accuracy"], "selected_on": summary["selected_on"], "num_val": summary["num_val"]}


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--workdir", required=True)
    p.add_argument("--seeds", default="0,1,2,3,4")
    p.add_argument("--val-fraction", type=float, default=0.2)
    p.add_argument("overrides", nargs="*")
    args = p.parse_args()
    seeds = [int(s) for s in args.seeds.split(",")]
    w = os.path.abspath(args.workdir)
    rows = []
    for regime, num_train in (("all 1,500 images", None), ("300 images", 300)):
        cfg = config_lib.apply_overrides(config_lib.load_config(CONFIG), args.overrides)
        cfg.data.val_fraction = args.val_fraction
        cfg.data.num_train_examples = num_train
        sub = os.path.join(w, "all" if num_train is None else f"n{num_train}")
        compare(cfg, sub, seeds=seeds, progress=False)
        for run in ("baseline", "hinton_kd"):
            numbers = [curve_numbers(os.path.join(sub, run, f"seed{s}")) for s in seeds]
            assert all(n["selected_on"] == "val" for n in numbers), numbers
            row = {"regime": regime, "run": run, "num_val": numbers[0]["num_val"], "seeds": len(seeds)}
            for key in ("test_picked", "val_picked", "last"):
                row[key] = _mean_std([n[key] for n in numbers])
            row["optimism"] = _mean_std([n["test_picked"] - n["val_picked"] for n in numbers])
            row["per_seed"] = numbers
            rows.append(row)

    pct = lambda ms: f"{100 * ms[0]:.2f} ± {100 * ms[1]:.2f}"  # noqa: E731
    lines = [f"digits, teacher cnn, student mlp, Hinton KD T=4 alpha=0.9 gamma=0.1, seeds {seeds}; "
             f"{args.val_fraction:g} of the training examples held out for validation.", "",
             "| regime | run | validation images | picked on test % | picked on validation % | last % | "
             "test-picked minus validation-picked (points) |",
             "|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['regime']} | {r['run']} | {r['num_val']} | {pct(r['test_picked'])} | "
                     f"{pct(r['val_picked'])} | {pct(r['last'])} | {pct(r['optimism'])} |")
    write_report(w, lines, rows)


if __name__ == "__main__":
    main()
