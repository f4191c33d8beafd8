"""Teacher cache with K stored augmented views against the live teacher, on Fashion-MNIST.

    python experiments/cache_views_study.py --workdir /work/runs/cache_views [--seeds 0,1,2] [--views 1,4,16]

A CNN teacher (``experiments/configs/fashion_mnist.py``) trained on a class-stratified subset of
``--num-train`` (default 2,000) training images with random crops (zero-pad 2, no flip), then an
MLP student per seed under each condition:

* ``ce`` / ``ce_aug``: the student alone (cross-entropy), without / with the random crops;
* ``kd_live`` / ``kd_aug_live``: Hinton KD (T=4, alpha=0.9) with the live teacher, without / with
  random crops (the teacher sees each step's crop);
* ``kd_aug_cache_K``: Hinton KD from a teacher cache of K stored crops per example
  (``jaxkd cache-teacher --views K``): each epoch the student trains on one of them.

Every run resumes / is skipped when finished, so the script can be rerun. Writes
``W/report.md``, ``W/report.json`` and ``W/cache_views.png`` (last-epoch test accuracy, mean ±
std over seeds). "last" is the headline number: it involves no choice of epoch; "best" is
picked on the test split (jaxkd's default, as in the reference code) and is shown for reference.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from jaxkd import config as config_lib  # noqa: E402
from jaxkd.experiment import _mean_std as _ms, teacher_config, write_report  # noqa: E402
from jaxkd.train import teacher_cache as cache_lib  # noqa: E402
from jaxkd.train.cache_build import build_teacher_cache  # noqa: E402
from jaxkd.train.loop import train_and_evaluate  # noqa: E402

CONFIG = os.path.join(ROOT, "experiments/configs/fashion_mnist.py")
CROPS = {"pad": 2, "flip": False}


def _fmt(m, s):
    return "n/a" if m != m else f"{100 * m:.2f} ± {100 * s:.2f}"  # nan: no value


def _run(cfg, workdir):
    summary_path = os.path.join(workdir, "summary.json")
    if os.path.exists(summary_path):
        with open(summary_path) as f:
            return json.load(f)
    t = time.perf_counter()
    summary = train_and_evaluate(cfg, workdir)
    print(f"  {workdir}: last {summary['last_accuracy']:.4f} ({time.perf_counter() - t:.0f} s)", flush=True)
    return summary


def setup(args):
    """The study's base config (``--num-train`` images, ``overrides``, no progress bars) and its
    teacher, trained with the crops into ``W/teacher`` unless it is there already:
    ``(base, W, teacher_dir, teacher summary)``."""
    base = config_lib.apply_overrides(config_lib.load_config(CONFIG), args.overrides)
    base.data.num_train_examples = args.num_train
    base.train.progress = False
    w = os.path.abspath(args.workdir)
    t_cfg = teacher_config(base)
    t_cfg.data.augment = dict(CROPS)
    teacher_dir = os.path.join(w, "teacher")
    print(f"teacher {t_cfg.model.name} -> {teacher_dir}", flush=True)
    return base, w, teacher_dir, _run(t_cfg, teacher_dir)


def conditions(views):
    out = [("ce", {"method": {"name": "ce"}, "data.augment": {}}),
           ("ce_aug", {"method": {"name": "ce"}, "data.augment": CROPS}),
           ("kd_live", {"data.augment": {}}),
           ("kd_aug_live", {"data.augment": CROPS})]
    out += [(f"kd_aug_cache_{k}", {"data.augment": CROPS, "teacher.cache": k}) for k in views]
    return out


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--workdir", required=True)
    p.add_argument("--seeds", default="0,1,2")
    p.add_argument("--views", default="1,4,16")
    p.add_argument("--num-train", type=int, default=2000)
    p.add_argument("overrides", nargs="*")
    args = p.parse_args()
    seeds = [int(s) for s in args.seeds.split(",")]
    views = [int(v) for v in args.views.split(",")]
    base, w, teacher_dir, teacher = setup(args)

    caches = {}
    for k in views:
        path = os.path.join(w, f"cache_{k}")
        if not os.path.exists(os.path.join(path, cache_lib.MANIFEST)):
            cfg = config_lib.apply_overrides(base, [f"teacher.workdir={teacher_dir!r}", f"data.augment={CROPS!r}"])
            t = time.perf_counter()
            build_teacher_cache(cfg, None, path, num_views=k)
            print(f"cache with {k} views: {time.perf_counter() - t:.0f} s", flush=True)
        caches[k] = path

    rows = []
    for name, over in conditions(views):
        summaries = []
        for seed in seeds:
            over_s = dict(over, seed=seed)
            if "teacher.cache" in over_s:
                over_s["teacher.cache"] = caches[over_s["teacher.cache"]]
            if over_s.get("method", {}).get("name") != "ce":
                over_s["teacher.workdir"] = teacher_dir
            cfg = config_lib.apply_overrides(base, [f"{k}={v!r}" for k, v in over_s.items()])
            summaries.append(_run(cfg, os.path.join(w, name, f"seed{seed}")))
        last = _ms([s["last_accuracy"] for s in summaries])
        best = _ms([s["best_accuracy"] for s in summaries])
        ips = _ms([s["images_per_s"] for s in summaries])
        rows.append({"run": name, "seeds": len(summaries), "last_mean": last[0], "last_std": last[1],
                     "best_mean": best[0], "best_std": best[1], "images_per_s": ips[0],
                     "last": [s["last_accuracy"] for s in summaries]})

    lines = [f"Fashion-MNIST, {args.num_train} training images, teacher {base.teacher.name} "
             f"{dict(base.teacher.kwargs)} (test accuracy {100 * teacher['last_accuracy']:.2f} % last), student "
             f"{base.model.name} {dict(base.model.kwargs)}, {base.train.num_epochs} epochs, seeds {seeds}; "
             f"crops: zero-pad {CROPS['pad']}, random offset, no flip.", "",
             "| run | seeds | last test acc % (mean ± std) | best (picked on test) % | train img/s |",
             "|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['run']} | {r['seeds']} | {_fmt(r['last_mean'], r['last_std'])} | "
                     f"{_fmt(r['best_mean'], r['best_std'])} | {r['images_per_s']:.0f} |")
    _plot(rows, os.path.join(w, "cache_views.png"))
    write_report(w, lines, {"teacher": teacher, "rows": rows})


def _plot(rows, path):
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return
    fig, ax = plt.subplots(figsize=(7, 3.2))
    names = [r["run"] for r in rows]
    ax.bar(range(len(rows)), [100 * r["last_mean"] for r in rows], yerr=[100 * r["last_std"] for r in rows],
           color=["#999" if n.startswith("ce") else "#4c72b0" if "live" in n else "#dd8452" for n in names],
           capsize=3)
    lo = min(100 * r["last_mean"] for r in rows)
    ax.set_ylim(lo - 3, max(100 * r["last_mean"] for r in rows) + 2)
    ax.set_xticks(range(len(rows)), names, rotation=25, ha="right", fontsize=8)
    ax.set_ylabel("last-epoch test accuracy %")
    ax.set_title("live teacher vs teacher cache with K stored crops", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


if __name__ == "__main__":
    main()
