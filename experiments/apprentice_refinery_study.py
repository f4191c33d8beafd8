"""Apprentice (full / 4-bit / 2-bit students) and Label Refinery (generations 0-3) on digits.

    python experiments/apprentice_refinery_study.py --workdir /work/runs/apprentice_refinery [--seeds 0,1,2]

Runs, per seed k (every run resumes / is skipped when finished, so the script can be rerun):

* ``W/<preset>/seed<k>`` for the presets ``ce``, ``ce_w4a4``, ``ce_w2a2``, ``apprentice``,
  ``apprentice_w4a4``, ``apprentice_w2a2`` of ``experiments/configs/digits_apprentice.py``;
* ``W/refine_self/seed<k>/gen0..3``: ``jaxkd refine --generations 3`` (the MLP refines itself);
* ``W/refine_cnn/seed<k>/gen0..3``: ``jaxkd refine --generations 3 --refinery teacher`` (gen 0 is
  the CNN, gens 1-3 the MLP);
* ``W/kd*/seed<k>``, ``W/apprentice_w2a2_pretrained/seed<k>``: the presets that start from a
  pretrained CNN, here refine_cnn's generation 0 of the same seed;
* ``W/refine_cnn_adv/seed<k>/gen1``: generation 1 refined by that CNN with adversarial
  jittering (``adversarial_eps=0.1``, half of each batch);

then writes ``W/report.md`` / ``W/report.json``: best and last eval accuracy, mean ± std over
the seeds (and the joint teachers' accuracy for Apprentice).
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from jaxkd import config as config_lib  # noqa: E402
from jaxkd.experiment import preset_config, write_report  # noqa: E402
from jaxkd.refinery import refine  # noqa: E402
from jaxkd.train.loop import train_and_evaluate  # noqa: E402

CONFIG = os.path.join(ROOT, "experiments/configs/digits_apprentice.py")
PRESETS = ("ce", "apprentice", "ce_w4a4", "apprentice_w4a4", "ce_w2a2", "apprentice_w2a2")
PRETRAINED = ("kd", "kd_w4a4", "kd_w2a2", "apprentice_w2a2_pretrained")  # teacher: refine_cnn's gen0 CNN


def _ms(xs):
    xs = [x for x in xs if x is not None]
    if not xs:
        return "n/a"
    sd = statistics.stdev(xs) if len(xs) > 1 else 0.0
    return f"{100 * statistics.fmean(xs):.2f} ± {100 * sd:.2f}"


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--workdir", required=True)
    p.add_argument("--seeds", default="0,1,2")
    p.add_argument("--only", default="", help="comma-separated subset: presets, refine_self, refine_cnn")
    p.add_argument("overrides", nargs="*")
    args = p.parse_args()
    seeds = [int(s) for s in args.seeds.split(",")]
    only = set(filter(None, args.only.split(",")))
    base = config_lib.apply_overrides(config_lib.load_config(CONFIG), args.overrides)
    base.train.progress = False
    base.train.tensorboard = False
    wd = os.path.abspath(args.workdir)
    results: dict[str, list[dict]] = {}

    def run_preset(name, teacher_dir=None):
        for seed in seeds:
            cfg = preset_config(base, name)
            cfg.seed = seed
            if teacher_dir is not None:
                cfg.teacher.workdir = teacher_dir(seed)
            print(f"== {name} seed {seed}", flush=True)
            s = train_and_evaluate(cfg, os.path.join(wd, name, f"seed{seed}"))
            results.setdefault(name, []).append(s)

    def run_refine(kind):
        for seed in seeds:
            cfg = config_lib.apply_overrides(base, [f"seed={seed}"])
            rows = refine(cfg, os.path.join(wd, kind, f"seed{seed}"), 3,
                          refinery="teacher" if kind == "refine_cnn" else "model", progress=False)
            for r in rows:
                results.setdefault(f"{kind}/gen{r['generation']}", []).append(
                    {"best_accuracy": r["best_accuracy"], "last_accuracy": r["last_accuracy"], "model": r["model"],
                     "teacher_accuracy": r["teacher_accuracy"]})

    order = [("refine_self", lambda: run_refine("refine_self"))]
    order += [(n, (lambda n=n: run_preset(n))) for n in PRESETS]
    order += [("refine_cnn", lambda: run_refine("refine_cnn"))]

    def pretrained(seed):  # the CNN of refine_cnn (generation 0), trained with CE for this seed
        return os.path.join(wd, "refine_cnn", f"seed{seed}", "gen0")

    order += [(n, (lambda n=n: run_preset(n, pretrained))) for n in PRETRAINED]

    def run_refine_adv():
        for seed in seeds:
            cfg = config_lib.apply_overrides(base, [f"seed={seed}", f"teacher.workdir={pretrained(seed)!r}",
                                                    "method.adversarial_eps=0.1"])
            rows = refine(cfg, os.path.join(wd, "refine_cnn_adv", f"seed{seed}"), 1, refinery="teacher",
                          progress=False)
            r = rows[1]
            results.setdefault("refine_cnn_adv/gen1", []).append(
                {"best_accuracy": r["best_accuracy"], "last_accuracy": r["last_accuracy"], "model": r["model"],
                 "teacher_accuracy": r["teacher_accuracy"]})

    order += [("refine_cnn_adv", run_refine_adv)]
    for name, fn in order:
        if only and name not in only and not (name in PRESETS + PRETRAINED and "presets" in only):
            continue
        fn()
        report(wd, results, seeds)


def report(wd, results, seeds):
    lines = [f"digits, MLP(32) student, CNN teacher, 30 epochs; mean ± std over seeds {seeds} (eval accuracy %)",
             "", "| run | model | seeds | best acc | last acc | teacher / refinery acc |", "|---|---|---|---|---|---|"]
    for name, runs in results.items():
        lines.append(f"| {name} | {runs[0].get('model')} | {len(runs)} | {_ms([r['best_accuracy'] for r in runs])} | "
                     f"{_ms([r['last_accuracy'] for r in runs])} | {_ms([r.get('teacher_accuracy') for r in runs])} |")
    write_report(wd, lines, results)


if __name__ == "__main__":
    main()
