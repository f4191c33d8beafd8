"""Top-k teacher caches (FKD-style stored soft labels) against the full logits, on Fashion-MNIST.

    python experiments/cache_topk_study.py --workdir /work/runs/cache_topk [--seeds 0,1,2] [--top-k 1,2,3,5] \
        [--temperatures 1,4]

The teacher of ``experiments/cache_views_study.py`` (a CNN trained on the full training split with
random crops; trained here if ``W/teacher`` has no checkpoint: copy the views study's ``teacher/``
in to share it), then per seed an MLP student on a class-stratified subset of ``--num-train``
(default 2,000) images, no augmentation:

* ``ce``: the student alone (cross-entropy);
* ``kd_T{T}_all``: Hinton KD (alpha=0.9, gamma=0.1) at temperature T from a cache of all C logits;
* ``kd_T{T}_top{k}``: the same from a cache of the k largest logits and one logit for the other
  classes (``jaxkd cache-teacher --top-k k --temperature T``): at T, the teacher's softmax on its
  top k classes, the remaining probability spread evenly over the rest.

Every run resumes / is skipped when finished. Writes ``W/report.md``, ``W/report.json`` and
``W/cache_topk.png``: last-epoch test accuracy (no choice of epoch), mean ± std over seeds, and
how much probability the top k classes hold at T (mean over the training examples).
"""

from __future__ import annotations

import argparse
import os
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from cache_views_study import _fmt, _run, setup  # noqa: E402
from jaxkd import config as config_lib  # noqa: E402
from jaxkd.experiment import _mean_std as _ms, write_report  # noqa: E402
from jaxkd.train import teacher_cache as cache_lib  # noqa: E402
from jaxkd.train.cache_build import build_teacher_cache  # noqa: E402


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--workdir", required=True)
    p.add_argument("--seeds", default="0,1,2")
    p.add_argument("--top-k", default="1,2,3,5")
    p.add_argument("--temperatures", default="1,4")
    p.add_argument("--num-train", type=int, default=2000)
    p.add_argument("overrides", nargs="*")
    args = p.parse_args()
    seeds = [int(s) for s in args.seeds.split(",")]
    ks = [int(k) for k in args.top_k.split(",")]
    temps = [float(t) for t in args.temperatures.split(",")]
    base, w, teacher_dir, teacher = setup(args)  # the teacher is trained with crops, the students without
    base.data.augment = {}
    with_teacher = config_lib.apply_overrides(base, [f"teacher.workdir={teacher_dir!r}"])

    def cache(name, **kw):
        path = os.path.join(w, name)
        if not os.path.exists(os.path.join(path, cache_lib.MANIFEST)):
            t = time.perf_counter()
            build_teacher_cache(with_teacher, None, path, **kw)
            print(f"{name}: {time.perf_counter() - t:.1f} s", flush=True)
        return path, cache_lib.open_teacher_cache(path).manifest

    dense_path, dense_manifest = cache("cache_all")
    conditions = [("ce", None, None, {"method": {"name": "ce"}})]
    for temp in temps:
        conditions.append((f"kd_T{temp:g}_all", temp, None, {"teacher.cache": dense_path}))
        for k in ks:
            path, manifest = cache(f"cache_T{temp:g}_top{k}", top_k=k, temperature=temp)
            conditions.append((f"kd_T{temp:g}_top{k}", temp, manifest, {"teacher.cache": path}))

    rows = []
    for name, temp, manifest, over in conditions:
        summaries = []
        for seed in seeds:
            over_s = dict(over, seed=seed)
            if temp is not None:
                over_s.update({"teacher.workdir": teacher_dir, "method.temperature": temp})
            cfg = config_lib.apply_overrides(base, [f"{k}={v!r}" for k, v in over_s.items()])
            summaries.append(_run(cfg, os.path.join(w, name, f"seed{seed}")))
        last = _ms([s["last_accuracy"] for s in summaries])
        info = manifest["logits"] if manifest else {}
        size = (sum(os.path.getsize(os.path.join(over["teacher.cache"], f))
                    for f in os.listdir(over["teacher.cache"]) if f.endswith(".npy")) if "teacher.cache" in over else 0)
        rows.append({"run": name, "temperature": temp, "top_k": info.get("top_k"), "seeds": len(summaries),
                     "last_mean": last[0], "last_std": last[1], "last": [s["last_accuracy"] for s in summaries],
                     "top_k_mass_mean": (info.get("top_k_mass") or {}).get("mean"), "cache_bytes": size})

    lines = [f"Fashion-MNIST, {args.num_train} training images, no augmentation; teacher {base.teacher.name} "
             f"{dict(base.teacher.kwargs)} ({100 * teacher['last_accuracy']:.2f} % test accuracy), student "
             f"{base.model.name} {dict(base.model.kwargs)}, {base.train.num_epochs} epochs, seeds {seeds}; "
             f"alpha {base.method.alpha}, gamma {base.method.gamma}.", "",
             "| run | T | stored classes | top-k mass at T (mean) | cache size | last test acc % (mean ± std) |",
             "|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(_table_row(r))
    _plot(rows, ks, temps, os.path.join(w, "cache_topk.png"))
    write_report(w, lines, {"teacher": teacher, "dense_cache": dense_manifest["logits"], "rows": rows})


def _table_row(r) -> str:
    acc = _fmt(r["last_mean"], r["last_std"])
    if r["temperature"] is None:  # the student alone
        return f"| {r['run']} | | | | | {acc} |"
    if r["top_k"] is None:
        stored, mass = "all", "1"
    else:
        stored, mass = str(r["top_k"]), f"{r['top_k_mass_mean']:.3f}"
    return f"| {r['run']} | {r['temperature']:g} | {stored} | {mass} | {r['cache_bytes'] / 1024:.0f} KiB | {acc} |"


def _plot(rows, ks, temps, path):
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return
    by = {r["run"]: r for r in rows}
    fig, ax = plt.subplots(figsize=(6, 3.2))
    xs = list(range(len(ks) + 1))
    for temp, color in zip(temps, ("#4c72b0", "#dd8452", "#55a868", "#c44e52")):
        names = [f"kd_T{temp:g}_top{k}" for k in ks] + [f"kd_T{temp:g}_all"]
        ax.errorbar(xs, [100 * by[n]["last_mean"] for n in names], yerr=[100 * by[n]["last_std"] for n in names],
                    marker="o", capsize=3, color=color, label=f"KD, T={temp:g}")
    ce = by["ce"]
    ax.axhspan(100 * (ce["last_mean"] - ce["last_std"]), 100 * (ce["last_mean"] + ce["last_std"]), color="#999",
               alpha=0.3, label="student alone (± std)")
    ax.set_xticks(xs, [str(k) for k in ks] + ["all"])
    ax.set_xlabel("teacher classes stored per example (top k)")
    ax.set_ylabel("last-epoch test accuracy %")
    ax.set_title("KD from a top-k teacher cache (rest of the mass spread evenly)", fontsize=9)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


if __name__ == "__main__":
    main()
