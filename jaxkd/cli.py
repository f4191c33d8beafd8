"""Command line: ``jaxkd train | eval | compare``.

    jaxkd train   --config experiments/configs/digits.py --workdir runs/kd [key=value ...]
    jaxkd eval    --config experiments/configs/digits.py --workdir runs/kd [--checkpoint best|last]
    jaxkd compare --config experiments/configs/digits.py --workdir runs/digits [--seeds 0,1,2]
                  [--sweep method.temperature=1,4,8 --sweep method.alpha=0.5,0.9]
                  [--methods kd,bss]   (presets defined in the config's `presets`)
    jaxkd refine  --config experiments/configs/digits.py --workdir runs/refine --generations 3
                  [--refinery model|teacher]   (Label Refinery: W/gen0, W/gen1, ...)
    jaxkd cache-teacher --config experiments/configs/digits.py --workdir runs/digits_cache
                  teacher.workdir=runs/teacher   (then train with teacher.cache=runs/digits_cache)

Overrides are ``key=value`` pairs on the config (``optim.lr=0.1``, ``data.num_train_examples=500``).
Bad input (unknown key, bad value, missing data set or teacher) ends with one ``jaxkd: error:``
line instead of a traceback.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys

from jaxkd import config as config_lib


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="jaxkd", description="Knowledge distillation in JAX/Flax.")
    sub = p.add_subparsers(dest="command", required=True)

    def common(sp):
        sp.add_argument("--config", required=True, help="Python config file defining get_config()")
        sp.add_argument("--workdir", required=True, help="directory for checkpoints, metrics and summaries")
        sp.add_argument("overrides", nargs="*", help="config overrides key=value")

    t = sub.add_parser("train", help="train one student (resumes from --workdir)")
    common(t)
    t.add_argument("--allow-config-change", action="store_true",
                   help="resume even if key config values differ from the checkpointed run")
    t.add_argument("--coordinator", default=None,
                   help="multi-process run: host:port of process 0 (jax.distributed.initialize)")
    t.add_argument("--num-processes", type=int, default=None, help="multi-process run: number of processes")
    t.add_argument("--process-id", type=int, default=None, help="multi-process run: this process's index")
    e = sub.add_parser("eval", help="evaluate a trained student")
    common(e)
    e.add_argument("--checkpoint", default="best", choices=("best", "last"))
    c = sub.add_parser("compare", help="teacher -> baseline student -> distilled student, with a table")
    common(c)
    c.add_argument("--seeds", default="0", help="comma-separated seeds for the student runs")
    c.add_argument("--sweep", action="append", default=[],
                   help="key=v1,v2,... grid over a config value for the distilled runs (repeatable)")
    c.add_argument("--methods", default="",
                   help="comma-separated presets of config.presets to distill with (default: config.method)")
    c.add_argument("--no-progress", action="store_true")
    r = sub.add_parser("refine", help="Label Refinery: generations 0..g, each refined by its predecessor")
    common(r)
    r.add_argument("--generations", type=int, required=True, help="number of refined generations after gen 0")
    r.add_argument("--refinery", default="model", choices=("model", "teacher"),
                   help="generation 0 is config.model (refines itself) or config.teacher (another network)")
    r.add_argument("--no-progress", action="store_true")
    ct = sub.add_parser("cache-teacher", help="write config.teacher's logits on the training split, keyed by "
                                              "example id, into --workdir (use with teacher.cache=WORKDIR)")
    common(ct)
    ct.add_argument("--batch-size", type=int, default=None, help="default: config.data.eval_batch_size")
    ct.add_argument("--views", type=int, default=None,
                    help="augmented views stored per example (needed when the config augments, e.g. CIFAR's "
                         "default pad 4 + flip); each epoch the student trains on one of them")
    ct.add_argument("--view-seed", type=int, default=0, help="seed of the views' crops and flips")
    ct.add_argument("--dtype", default="float32", choices=("float32", "float16"),
                    help="storage of the logits (float16: half the size, ~3 significant digits)")
    ct.add_argument("--top-k", type=int, default=None,
                    help="store only the K largest logits per example and view, plus one logit for the other "
                         "classes (6K+4 bytes a row instead of 4C; float16: 4K+2 instead of 2C); serves only "
                         "methods that read the teacher's softmax at --temperature (hinton_kd; label_refinery "
                         "at 1)")
    ct.add_argument("--temperature", type=float, default=None,
                    help="with --top-k: the distillation temperature the cache is made for (default: the "
                         "config's hinton_kd temperature)")
    ct.add_argument("--no-progress", action="store_true")
    return p


def _parse_sweep(items: list[str]) -> dict:
    sweep = {}
    for item in items:
        if "=" not in item:
            raise config_lib.ConfigError(f"--sweep {item!r} is not of the form key=v1,v2,...")
        key, values = item.split("=", 1)
        sweep[key] = [config_lib._parse_value(v) for v in values.split(",")]
    return sweep


def run(argv: list[str] | None = None) -> int:
    from jaxkd import _xla_defaults

    _xla_defaults.apply()  # jaxkd's XLA:CPU defaults, before JAX creates its backend
    parser = _parser()
    # Overrides may come before or after options: collect stray key=value items too.
    args, extra = parser.parse_known_args(argv)
    stray = [e for e in extra if e.startswith("-") or "=" not in e]
    if stray:
        parser.error(f"unrecognized arguments: {' '.join(stray)}")
    args.overrides = list(args.overrides) + extra
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    logging.getLogger("absl").addFilter(_no_orbax_tracebacks)
    config = config_lib.load_config(args.config)
    config = config_lib.apply_overrides(config, args.overrides)
    if args.command == "train":
        from jaxkd.train.loop import train_and_evaluate
        if args.coordinator or args.num_processes or args.process_id is not None:
            initialize_distributed(args.coordinator, args.num_processes, args.process_id)
        summary = train_and_evaluate(config, args.workdir, allow_config_change=args.allow_config_change)
        print(json.dumps(summary, indent=2))
    elif args.command == "eval":
        result = evaluate_workdir(config, args.workdir, args.checkpoint)
        print(json.dumps(result, indent=2))
    elif args.command == "compare":
        from jaxkd.experiment import compare, format_table
        seeds = [int(s) for s in str(args.seeds).split(",") if s != ""]
        methods = [m for m in args.methods.split(",") if m] or None
        rows = compare(config, args.workdir, seeds=seeds, sweep=_parse_sweep(args.sweep),
                       progress=not args.no_progress, methods=methods)
        print()
        print(format_table(rows, config))
        written = [n for n in ("results.md", "results.json", "curves.png", "sweep.png")
                   if os.path.exists(os.path.join(args.workdir, n))]
        print(f"\nwritten to {args.workdir}: {', '.join(written)}")
    elif args.command == "refine":
        _refine(config, args)
    elif args.command == "cache-teacher":
        from jaxkd.train.cache_build import build_teacher_cache
        manifest = build_teacher_cache(config, None, args.workdir, batch_size=args.batch_size,
                                       progress=not args.no_progress, num_views=args.views,
                                       view_seed=args.view_seed, dtype=args.dtype, top_k=args.top_k,
                                       temperature=args.temperature)
        summary = {"cache": os.path.abspath(args.workdir), "logits_shape": manifest["logits"]["shape"],
                   "teacher_step": manifest["teacher"]["step"]}
        if args.top_k:
            summary.update({k: manifest["logits"][k] for k in ("top_k", "temperature", "top_k_mass")})
        print(json.dumps(summary, indent=2))
    return 0


def _no_orbax_tracebacks(record: logging.LogRecord) -> bool:
    """Drops Orbax's tracebacks of a failed background save: the run stops with one
    ``jaxkd: error:`` line naming the cause instead (:meth:`jaxkd.train.loop.Trainer.save`)."""
    return not (record.levelno >= logging.ERROR and "orbax" in record.pathname.replace("\\", "/"))


def _refine(config, args) -> None:
    """``jaxkd refine``: see :mod:`jaxkd.refinery`."""
    from jaxkd.refinery import format_refine_table, refine

    rows = refine(config, args.workdir, args.generations, refinery=args.refinery, progress=not args.no_progress)
    print()
    print(format_refine_table(rows))
    print(f"\nwritten to {args.workdir}: results.md, results.json")


def initialize_distributed(coordinator: str | None, num_processes: int | None, process_id: int | None) -> None:
    """``jax.distributed.initialize`` for a multi-process (multi-host) run.

    On TPU pods and SLURM/GPU clusters all three may be left out (JAX finds them). On CPU
    the processes exchange data through gloo, which is selected here.
    """
    import jax

    if coordinator and (num_processes is None or process_id is None):
        raise config_lib.ConfigError("--coordinator needs --num-processes and --process-id")
    if num_processes is not None and process_id is not None and not 0 <= process_id < num_processes:
        raise config_lib.ConfigError(f"--process-id {process_id} is not in [0, {num_processes})")
    jax.config.update("jax_cpu_collectives_implementation", "gloo")  # affects only the CPU backend
    jax.distributed.initialize(coordinator_address=coordinator, num_processes=num_processes,
                               process_id=process_id)


def evaluate_workdir(config, workdir: str, which: str = "best") -> dict:
    """Eval accuracy of the student stored in ``workdir`` on ``config.data``'s eval split."""
    import jax

    from jaxkd.train import setup as setup_lib
    from jaxkd.train import step as step_lib
    from jaxkd.train.evaluation import evaluate

    _, eval_src, model, pipeline, variables, meta = setup_lib.build_eval(config, workdir, which)
    mesh = step_lib.make_mesh(config.train.num_devices)
    result = evaluate(step_lib.make_eval_step(model, pipeline, mesh=mesh),
                      jax.device_put(variables, step_lib.replicated(mesh)), eval_src, config.data.eval_batch_size,
                      mesh)
    result["checkpoint"] = which
    result["epoch"] = (meta or {}).get("epoch")
    return result


def main(argv: list[str] | None = None) -> None:
    from jaxkd.data import DatasetNotFoundError
    from jaxkd.errors import CheckpointError, TrainingError

    try:
        sys.exit(run(argv))
    except (config_lib.ConfigError, DatasetNotFoundError, CheckpointError, TrainingError) as e:
        print(f"jaxkd: error: {e}", file=sys.stderr)
        sys.exit(2)
    except KeyboardInterrupt:
        print("jaxkd: interrupted; run the same command again to resume", file=sys.stderr)
        sys.exit(130)


if __name__ == "__main__":
    main()
