"""Label Refinery generations end to end: ``refine(config, workdir, generations)``.

::

    WORKDIR/gen0   generation 0: cross-entropy on the hard labels
    WORKDIR/gen1   config.model trained only on KL to gen0's predictions (label_refinery)
    WORKDIR/gen2   ... to gen1's, and so on
    WORKDIR/results.md, results.json   every generation's accuracy

Generation 0 is ``config.model`` (``refinery="model"``: the network refines itself) or
``config.teacher`` (``refinery="teacher"``: a different, e.g. bigger, network is the first
refinery; it is trained like ``jaxkd compare``'s teacher, or reused from
``config.teacher.workdir`` when that is set). Every later generation is ``config.model``
whose frozen teacher is its predecessor's checkpoint (``teacher.workdir`` = the previous
generation's work dir, ``teacher.checkpoint`` as configured). ``config.method`` is used for
generations >= 1 when it is ``label_refinery`` (e.g. with ``adversarial_eps``), else the
plain ``label_refinery`` method. A generation whose ``summary.json`` shows it finished is
skipped; an unfinished one resumes from its checkpoints, so a killed ``refine`` continues
where it stopped.
"""

from __future__ import annotations

import json
import os

import ml_collections

from jaxkd import config as config_lib
from jaxkd.experiment import baseline_config, teacher_config
from jaxkd.train.loop import train_and_evaluate

REFINERIES = ("model", "teacher")


def _num_epochs(cfg) -> int:
    stages = cfg.get("stages")
    return sum(int(s["num_epochs"]) for s in stages) if stages else int(cfg.train.num_epochs)


def _finished(workdir: str, cfg) -> dict | None:
    path = os.path.join(workdir, "summary.json")
    if not os.path.exists(path):
        return None
    with open(path) as f:
        summary = json.load(f)
    return summary if summary.get("epochs", 0) >= _num_epochs(cfg) else None


def generation_config(config: ml_collections.ConfigDict, generation: int, prev_model: dict | None,
                      prev_workdir: str | None, refinery: str = "model") -> ml_collections.ConfigDict:
    """The config of one generation (see the module docstring)."""
    if generation == 0:
        if refinery == "teacher":
            c = teacher_config(config)
            c.seed = config.seed
            return c
        return baseline_config(config, config.seed)
    c = ml_collections.ConfigDict(config.to_dict())
    method = config.method.to_dict()
    if method.get("name") != "label_refinery":
        method = {"name": "label_refinery"}
    c.method = ml_collections.ConfigDict(method)
    c.teacher.name = prev_model["name"]
    c.teacher.kwargs = dict(prev_model.get("kwargs") or {})
    c.teacher.workdir = prev_workdir
    return c


def refine(config: ml_collections.ConfigDict, workdir: str, generations: int, refinery: str = "model",
           progress: bool = True) -> list[dict]:
    """Runs generations ``0..generations`` (skipping finished ones); returns one row each."""
    if not isinstance(generations, int) or generations < 0:
        raise config_lib.ConfigError(f"--generations must be an int >= 0; got {generations!r}")
    if refinery not in REFINERIES:
        raise config_lib.ConfigError(f"--refinery must be one of {REFINERIES}; got {refinery!r}")
    workdir = os.path.abspath(workdir)
    config = ml_collections.ConfigDict(config.to_dict())
    config.train.progress = progress
    rows, prev_model, prev_dir = [], None, None
    for g in range(generations + 1):
        if g == 0 and refinery == "teacher" and config.teacher.workdir:
            gen_dir = os.path.abspath(config.teacher.workdir)  # a finished refinery, reused
            summary_path = os.path.join(gen_dir, "summary.json")
            if not os.path.exists(summary_path):
                raise config_lib.ConfigError(f"config.teacher.workdir={gen_dir!r} holds no finished run")
            with open(summary_path) as f:
                summary = json.load(f)
            cfg = teacher_config(config)
        else:
            gen_dir = os.path.join(workdir, f"gen{g}")
            cfg = generation_config(config, g, prev_model, prev_dir, refinery)
            summary = _finished(gen_dir, cfg)
            print(f"== generation {g}: {cfg.model.name} ({cfg.method.name})"
                  + (f", refinery {prev_dir}" if g else "") + (" [finished, skipped]" if summary else ""),
                  flush=True)
            if summary is None:
                summary = train_and_evaluate(cfg, gen_dir)
        rows.append({"generation": g, "model": cfg.model.name, "model_kwargs": cfg.model.kwargs.to_dict(),
                     "method": cfg.method.name, "workdir": gen_dir, "teacher_workdir": prev_dir if g else None,
                     "best_accuracy": summary.get("best_accuracy"), "last_accuracy": summary.get("last_accuracy"),
                     "teacher_accuracy": summary.get("teacher_accuracy") if g else None})
        prev_model = {"name": cfg.model.name, "kwargs": cfg.model.kwargs.to_dict()}
        prev_dir = gen_dir
    os.makedirs(workdir, exist_ok=True)
    with open(os.path.join(workdir, "results.json"), "w") as f:
        json.dump(rows, f, indent=2)
    with open(os.path.join(workdir, "results.md"), "w") as f:
        f.write(format_refine_table(rows) + "\n")
    return rows


def _pct(x) -> str:
    return "n/a" if x is None else f"{100 * x:.2f}"


def format_refine_table(rows: list[dict]) -> str:
    lines = ["| generation | model | method | refinery acc % | best acc % | last acc % |",
             "|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['generation']} | {r['model']} | {r['method']} | {_pct(r['teacher_accuracy'])} | "
                     f"{_pct(r['best_accuracy'])} | {_pct(r['last_accuracy'])} |")
    return "\n".join(lines)
