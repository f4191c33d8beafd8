"""The main job: teacher -> baseline student -> distilled student(s), and the comparison table.

``compare(config, workdir)`` trains (or resumes, or reuses when finished)

* ``WORKDIR/teacher``: ``config.teacher`` with cross-entropy (or the finished teacher in
  ``config.teacher.workdir`` when that is set),
* ``WORKDIR/baseline/seed<k>``: ``config.model`` with cross-entropy,
* ``WORKDIR/<method>[_<sweep point>]/seed<k>``: ``config.model`` distilled with ``config.method``,

for every seed and every point of an optional sweep grid (e.g. over ``method.temperature`` and
``method.alpha``), then writes ``results.json``, ``results.md`` and (with matplotlib)
``curves.png``, and returns the table rows. Every run is an ordinary ``train_and_evaluate``
run in its own work dir, so an interrupted comparison resumes where it stopped.

Several ``compare`` processes may share one work dir and split its runs: a run whose work dir
another process holds (it is training it) is put off, the others go first, and at the end the
comparison waits for the put-off runs and reads their results (``WorkdirBusy``).
"""

from __future__ import annotations

import itertools
import json
import os
import statistics
from typing import Iterable, Sequence

import ml_collections

from jaxkd import config as config_lib
from jaxkd.errors import WorkdirBusy
from jaxkd.train.loop import train_and_evaluate


def teacher_config(config: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
    c = ml_collections.ConfigDict(config.to_dict())
    c.model = ml_collections.ConfigDict(config.teacher.to_dict())
    del c.model["workdir"], c.model["checkpoint"]
    c.method = ml_collections.ConfigDict({"name": "ce"})
    if config.teacher_train.num_epochs:
        c.train.num_epochs = config.teacher_train.num_epochs
    if config.teacher_train.optim:
        c.optim.update(dict(config.teacher_train.optim))
    # The teacher is trained once, on the full training set, whatever the student sees.
    c.data.num_train_examples = None
    return c


def baseline_config(config: ml_collections.ConfigDict, seed: int) -> ml_collections.ConfigDict:
    c = ml_collections.ConfigDict(config.to_dict())
    c.method = ml_collections.ConfigDict({"name": "ce"})
    c.seed = seed
    return c


def preset_config(config: ml_collections.ConfigDict, name: str) -> ml_collections.ConfigDict:
    """``config`` with the named preset of ``config.presets`` applied.

    A preset is a dict of top-level config keys to values: it changes the method
    (``{"method": {...}}``, which replaces the whole method section: one method's options do not
    carry over to another), declares stages (``{"stages": [...]}``) or changes fields of any other
    section, e.g. ``{"model": {"name": "cnn", "kwargs": {}}}`` for another student or
    ``{"data": {"copies": 3}}``: a dict given for a section sets only the fields it names (a
    changed ``name`` first, which drops the old name's ``kwargs``), so everything else, such as a
    command line's ``data.num_train_examples=3000``, stays as it was.
    """
    presets = config.presets.to_dict() if hasattr(config.presets, "to_dict") else dict(config.presets or {})
    if name not in presets:
        raise config_lib.ConfigError(f"unknown method preset {name!r}; config.presets has {sorted(presets)}")
    c = ml_collections.ConfigDict(config.to_dict())
    pairs = []
    for key, value in presets[name].items():
        if key != "method" and isinstance(value, dict) and isinstance(c.get(key), ml_collections.ConfigDict):
            pairs += [(f"{key}.{field}", v) for field, v in value.items()]
        else:
            pairs.append((key, value))
    for key, value in config_lib.names_first(pairs):  # as on the command line: a changed name resets kwargs
        config_lib.set_path(c, key, value)
    return c


def distill_config(config, seed: int, teacher_workdir: str, point: dict,
                   preset: str | None = None) -> ml_collections.ConfigDict:
    if preset is not None:
        config = preset_config(config, preset)
    c = config_lib.apply_overrides(config, [f"{k}={v!r}" for k, v in point.items()])
    c.seed = seed
    c.teacher.workdir = teacher_workdir
    return c


def sweep_points(sweep: dict[str, Sequence]) -> list[dict]:
    """The grid of a sweep ``{"method.temperature": [1, 4], "method.alpha": [0.5, 0.9]}``."""
    if not sweep:
        return [{}]
    keys = list(sweep)
    return [dict(zip(keys, values)) for values in itertools.product(*(sweep[k] for k in keys))]


def _point_name(method: str, point: dict) -> str:
    if not point:
        return method
    return method + "_" + "_".join(f"{k.split('.')[-1]}{v}" for k, v in point.items())


def _mean_std(xs: list[float]) -> tuple[float, float]:
    xs = [x for x in xs if x is not None]
    if not xs:
        return float("nan"), float("nan")
    return statistics.fmean(xs), (statistics.stdev(xs) if len(xs) > 1 else 0.0)


def write_report(workdir: str, lines: Sequence[str], data) -> str:
    """A study's ``report.md`` (``lines``, a Markdown table and its caption) and ``report.json``
    (``data``) in ``workdir``; prints and returns the Markdown."""
    report = "\n".join(lines) + "\n"
    with open(os.path.join(workdir, "report.md"), "w") as f:
        f.write(report)
    with open(os.path.join(workdir, "report.json"), "w") as f:
        json.dump(data, f, indent=2)
    print(report, flush=True)
    return report


def compare(config: ml_collections.ConfigDict, workdir: str, seeds: Iterable[int] = (0,),
            sweep: dict[str, Sequence] | None = None, progress: bool = True,
            methods: Sequence[str] | None = None) -> list[dict]:
    """Runs teacher, baseline and distilled students; returns one row per configuration.

    ``methods`` names presets of ``config.presets`` to run instead of ``config.method``
    (each combined with every sweep point).
    """
    seeds = list(seeds)
    workdir = os.path.abspath(workdir)
    config = ml_collections.ConfigDict(config.to_dict())
    config.train.progress = progress
    runs: dict[str, list[dict]] = {}

    if config.teacher.workdir:  # reuse a teacher trained elsewhere (e.g. by another comparison)
        several = isinstance(config.teacher.workdir, (list, tuple))  # several teachers: one row, mean ± std
        teacher_dir = ([os.path.abspath(w) for w in config.teacher.workdir] if several
                       else os.path.abspath(config.teacher.workdir))
        runs["teacher"] = []
        for one_dir in (teacher_dir if several else [teacher_dir]):
            _announce(f"teacher (reused from {one_dir})", config.teacher.name)
            summary_path = os.path.join(one_dir, "summary.json")
            if not os.path.exists(summary_path):
                raise config_lib.ConfigError(f"config.teacher.workdir={one_dir!r} holds no finished run "
                                             "(no summary.json); train the teacher first or unset it")
            with open(summary_path) as f:
                runs["teacher"].append(json.load(f))
    else:
        teacher_dir = os.path.join(workdir, "teacher")
        _announce("teacher", config.teacher.name)
        runs["teacher"] = [train_and_evaluate(teacher_config(config), teacher_dir, wait_for_lock=True)]
    # the baselines are waited for, not put off: presets may start from them (model.init_from)
    for seed in seeds:
        _announce(f"baseline seed {seed}", config.model.name)
        runs.setdefault("baseline", []).append(train_and_evaluate(
            baseline_config(config, seed), os.path.join(workdir, "baseline", f"seed{seed}"), wait_for_lock=True))
    jobs = []
    for preset in (list(methods) if methods else [None]):
        for point in sweep_points(sweep or {}):
            name = _point_name(preset or config.method.name, point)
            for seed in seeds:
                cfg = distill_config(config, seed, teacher_dir, point, preset)
                jobs.append((name, f"{name} seed {seed}", cfg, os.path.join(workdir, name, f"seed{seed}")))
    runs.update(_run_jobs(jobs))
    rows = []
    for name, summaries in runs.items():
        best_m, best_s = _mean_std([s["best_accuracy"] for s in summaries])
        last_m, last_s = _mean_std([s["last_accuracy"] for s in summaries])
        rows.append({"run": name, "model": summaries[0]["model"], "seeds": len(summaries),
                     "best_mean": best_m, "best_std": best_s, "last_mean": last_m, "last_std": last_s,
                     "num_params": summaries[0].get("num_params"),
                     "train_time_s": _mean_or_none([s.get("train_time_s") for s in summaries]),
                     "images_per_s": _mean_or_none([s.get("images_per_s") for s in summaries]),
                     "summaries": summaries})
    with open(os.path.join(workdir, "results.json"), "w") as f:
        json.dump(rows, f, indent=2)
    table = format_table(rows, config)
    with open(os.path.join(workdir, "results.md"), "w") as f:
        f.write(table + "\n")
    plot_curves(workdir, list(runs), teacher_dir if isinstance(teacher_dir, str) else None)
    if sweep and len(sweep) == 2 and not methods:
        plot_sweep(workdir, rows, sweep, config.method.name)
    return rows


def _mean_or_none(xs: list) -> float | None:
    xs = [x for x in xs if x is not None]
    return sum(xs) / len(xs) if xs else None


def cost_table(rows: list[dict]) -> list[str]:
    """Markdown lines: each run's student parameter count, training time per run and throughput
    (means over its seeds; wall-clock on whatever else shared the machine), "—" where unknown."""
    lines = ["| run | model | student params | train time per run, min | images/s |", "|---|---|---|---|---|"]
    for r in rows:
        params = f"{r['num_params']:,}" if r.get("num_params") is not None else "—"
        minutes = f"{r['train_time_s'] / 60:.1f}" if r.get("train_time_s") is not None else "—"
        ips = f"{r['images_per_s']:.0f}" if r.get("images_per_s") is not None else "—"
        lines.append(f"| {r['run']} | {r['model']} | {params} | {minutes} | {ips} |")
    return lines


def format_table(rows: list[dict], config=None) -> str:
    head = ""
    if config is not None:
        n = config.data.num_train_examples or "all"
        vf = config.data.get("val_fraction")
        picked = (f"on a validation set held out from the training examples (data.val_fraction={vf})" if vf
                  else f"on the {config.data.eval_split} split itself, as the reference code does "
                       "(set data.val_fraction to pick on a held-out validation set)")
        head = (f"data: {config.data.name} (train examples: {n}), teacher {config.teacher.name}, "
                f"student {config.model.name}, {config.train.num_epochs} epochs\n"
                f"best: {config.data.eval_split} accuracy of the epoch picked {picked}; "
                f"last: {config.data.eval_split} accuracy after the last epoch\n\n")
    lines = ["| run | model | seeds | best acc % (mean ± std) | last acc % (mean ± std) |",
             "|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['run']} | {r['model']} | {r['seeds']} | {100 * r['best_mean']:.2f} ± "
                     f"{100 * r['best_std']:.2f} | {100 * r['last_mean']:.2f} ± {100 * r['last_std']:.2f} |")
    lifts = [(r["run"], paired_lift(base, r)) for base in rows if base["run"] == "baseline"
             for r in rows if r["run"] not in ("teacher", "baseline")]
    lifts = [(name, lift) for name, lift in lifts if lift is not None]
    if lifts:
        lines += ["", "lift over the baseline, paired by seed (same seed: same init and data order), best acc:", "",
                  "| run | seeds | lift, points (mean ± std of per-seed differences) | ± s.e. | seeds improved |",
                  "|---|---|---|---|---|"]
        for name, lift in lifts:
            lines.append(f"| {name} | {lift['n']} | {lift['mean']:+.2f} ± {lift['std']:.2f} | {lift['sem']:.2f} | "
                         f"{lift['improved']}/{lift['n']} |")
        lines.append("")
        lines += [_lift_sentence(name, lift) for name, lift in lifts]
    if any(r.get("num_params") is not None or r.get("train_time_s") is not None for r in rows):
        lines += ["", "cost (the training loop's wall-clock per run, its per-epoch evals and compilation included; "
                  "the teacher's row is its own training run):", ""]
        lines += cost_table(rows)
    return head + "\n".join(lines)


def paired_lift(baseline: dict, row: dict, key: str = "best_accuracy") -> dict | None:
    """Per-seed differences ``row - baseline`` in accuracy points, over the seeds both rows ran:
    ``{"n", "mean", "std", "sem", "improved", "diffs"}`` (``std`` of the differences, ``sem`` =
    std / sqrt(n), ``improved`` = seeds with a positive difference); ``None`` without common seeds."""
    base = {s["seed"]: s[key] for s in baseline["summaries"] if s.get(key) is not None}
    diffs = [100 * (s[key] - base[s["seed"]]) for s in row["summaries"]
             if s.get(key) is not None and s["seed"] in base]
    if not diffs:
        return None
    mean, std = _mean_std(diffs)
    return {"n": len(diffs), "mean": mean, "std": std, "sem": std / len(diffs) ** 0.5,
            "improved": sum(d > 0 for d in diffs), "diffs": diffs}


def _lift_sentence(name: str, lift: dict) -> str:
    """One line saying whether the lift is resolved: the mean difference against twice its standard
    error (about a 95% interval for normal per-seed noise) and the count of seeds improved."""
    if lift["n"] < 2:
        return f"{name}: one seed only, the lift's uncertainty is unknown (run more seeds: --seeds 0,1,2)."
    lo, hi = lift["mean"] - 2 * lift["sem"], lift["mean"] + 2 * lift["sem"]
    verdict = ("resolved: the interval excludes 0" if lo > 0 or hi < 0
               else "not resolved: the interval includes 0 (more seeds, or a setting where the teacher knows more)")
    return (f"{name}: {lift['mean']:+.2f} points (mean ± 2 s.e.: [{lo:+.2f}, {hi:+.2f}]), "
            f"{lift['improved']} of {lift['n']} seeds improved; {verdict}.")


def plot_curves(workdir: str, names: list[str], teacher_dir: str | None = None) -> str | None:
    """Eval-accuracy learning curves of every run (mean over seeds) into ``curves.png``."""
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    fig, ax = plt.subplots(figsize=(7, 4.5))
    for name in names:
        base = teacher_dir if (name == "teacher" and teacher_dir) else os.path.join(workdir, name)
        if not os.path.isdir(base):
            continue
        dirs = [base] if name == "teacher" else [os.path.join(base, d) for d in sorted(os.listdir(base))]
        curves, val_curves = [], []
        for d in dirs:
            path = os.path.join(d, "metrics.jsonl")
            if os.path.exists(path):
                with open(path) as f:
                    recs = [json.loads(ln) for ln in f if ln.strip()]
                curves.append([(r["epoch"], r["eval/accuracy"]) for r in recs if "eval/accuracy" in r])
                val_curves.append([(r["epoch"], r["val/accuracy"]) for r in recs if "val/accuracy" in r])
        if not curves:
            continue
        line = _plot_mean(ax, curves, f"{name} (n={len(curves)})", "--" if name == "teacher" else "-")
        if val_curves and all(val_curves):  # runs with data.val_fraction: the accuracy that picked "best", dotted
            _plot_mean(ax, val_curves, f"{name} validation", ":", color=line.get_color())
    ax.set_xlabel("epoch")
    ax.set_ylabel("accuracy % (eval split; dotted: validation)")
    ax.grid(alpha=0.3)
    ax.legend()
    out = os.path.join(workdir, "curves.png")
    fig.tight_layout()
    fig.savefig(out, dpi=110)
    plt.close(fig)
    return out


def mean_curve(curves: list[list[tuple[int, float]]]) -> tuple[list[int], list[float]]:
    """``(epochs, mean accuracy)`` over seeds of ``(epoch, accuracy)`` curves, cut to the shortest."""
    n = min(len(c) for c in curves)
    return [curves[0][i][0] for i in range(n)], [statistics.fmean(c[i][1] for c in curves) for i in range(n)]


def _plot_mean(ax, curves, label: str, linestyle: str, **kw):
    epochs, mean = mean_curve(curves)
    return ax.plot(epochs, [100 * m for m in mean], label=label, linestyle=linestyle, **kw)[0]


def plot_sweep(workdir: str, rows: list[dict], sweep: dict[str, Sequence], method: str) -> str | None:
    """Heat map of the distilled students' gain over the baseline (best accuracy, mean over
    seeds) across a two-key sweep, e.g. temperature x alpha, into ``sweep.png``."""
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    (k1, v1), (k2, v2) = list(sweep.items())
    by_name = {r["run"]: r for r in rows}
    base = by_name["baseline"]["best_mean"]
    grid = [[100 * (by_name[_point_name(method, {k1: a, k2: b})]["best_mean"] - base) for b in v2] for a in v1]
    fig, ax = plt.subplots(figsize=(1.6 + 1.3 * len(v2), 1.2 + 0.9 * len(v1)))
    lim = max(0.5, max(abs(x) for row in grid for x in row))
    im = ax.imshow(grid, cmap="RdBu", vmin=-lim, vmax=lim)
    for i, row in enumerate(grid):
        for j, val in enumerate(row):
            ax.text(j, i, f"{val:+.2f}", ha="center", va="center", fontsize=9,
                    color="white" if abs(val) > 0.6 * lim else "black")
    ax.set_xticks(range(len(v2)), [str(b) for b in v2])
    ax.set_yticks(range(len(v1)), [str(a) for a in v1])
    ax.set_xlabel(k2)
    ax.set_ylabel(k1)
    ax.set_title(f"best acc. gain over baseline ({100 * base:.2f} %), points")
    fig.colorbar(im, ax=ax, shrink=0.8)
    fig.tight_layout()
    out = os.path.join(workdir, "sweep.png")
    fig.savefig(out, dpi=110)
    plt.close(fig)
    return out


def _run_jobs(jobs: list[tuple]) -> dict[str, list[dict]]:
    """Runs ``(name, label, config, workdir)`` jobs; returns each name's summaries in job order.

    A job whose work dir another process holds is put off until the others are done, then
    waited for: comparisons started together on one work dir share its runs instead of failing.
    (The teacher and the baselines, which other runs may start from, are waited for at once.)"""
    done: dict[int, dict] = {}
    later = []
    for i, (_, label, cfg, wd) in enumerate(jobs):
        _announce(label, cfg.model.name)
        try:
            done[i] = train_and_evaluate(cfg, wd)
        except WorkdirBusy:
            print(f"   {wd} is in use by another process; coming back to it at the end", flush=True)
            later.append(i)
    for i in later:
        _, label, cfg, wd = jobs[i]
        _announce(f"{label} (waiting for the other process)", cfg.model.name)
        done[i] = train_and_evaluate(cfg, wd, wait_for_lock=True)
    runs: dict[str, list[dict]] = {}
    for i, (name, *_) in enumerate(jobs):
        runs.setdefault(name, []).append(done[i])
    return runs


def _announce(what: str, model: str) -> None:
    print(f"== {what}: {model}", flush=True)
