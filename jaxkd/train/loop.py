"""The one generic train loop: ``train_and_evaluate(config, workdir)``.

Every method runs through here; what differs is the recipe (``config.method``). The loop
builds the data pipeline, the student (and frozen teacher), the jitted step, then runs
``num_epochs`` epochs with a bounded number of steps in flight, evaluates, logs (progress
bar, ``metrics.jsonl``, TensorBoard) and checkpoints. Started again in the same work dir,
it resumes from the newest usable checkpoint and ends with the same params as a run that
was never interrupted.
"""

from __future__ import annotations

import collections
import contextlib
import dataclasses
import fcntl
import json
import logging
import math
import os
import time

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from jaxkd import config as config_lib
from jaxkd import data as data_lib
from jaxkd import models as models_lib
from jaxkd.train import checkpoint as ckpt_lib
from jaxkd.train import joint_teacher as joint_lib
from jaxkd.train import param_groups
from jaxkd.train import recipes as recipes_lib
from jaxkd.train import step as step_lib

log = logging.getLogger(__name__)

# Keys whose change between a kill and a resume makes the resumed run a different run.
RESUME_KEYS = ("seed", "data.name", "data.batch_size", "data.num_train_examples", "data.subset_seed",
               "data.val_fraction", "model.name", "model.kwargs", "method.name", "teacher.name", "optim.name",
               "train.num_epochs", "stages", "teachers", "teacher.cache")
# what a key added later means in checkpoints written before it existed
_RESUME_KEY_DEFAULTS = {"data.val_fraction": 0.0}


class TrainingError(RuntimeError):
    """Training cannot continue (non-finite loss, locked work dir, config changed on resume)."""


@contextlib.contextmanager
def workdir_lock(workdir: str):
    """Exclusive lock on a work dir, so that two runs never write into the same one."""
    os.makedirs(workdir, exist_ok=True)
    # one lock per process of a multi-process run (they share the work dir)
    path = os.path.join(workdir, ".lock" if jax.process_count() == 1 else f".lock.process{jax.process_index()}")
    fh = open(path, "w")
    try:
        fcntl.flock(fh, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        fh.close()
        raise TrainingError(f"work dir {workdir!r} is in use by another jaxkd run (lock {path}); "
                            "wait for it to finish or use another --workdir") from None
    try:
        fh.write(str(os.getpid()))
        fh.flush()
        yield
    finally:
        fcntl.flock(fh, fcntl.LOCK_UN)
        fh.close()


def _get(cfg: dict, dotted: str):
    node = cfg
    for part in dotted.split("."):
        node = node.get(part) if isinstance(node, dict) else None
    return node


def config_differences(old: dict, new: dict, keys=RESUME_KEYS) -> list[str]:
    def get(cfg, k):
        value = _get(cfg, k)
        return _RESUME_KEY_DEFAULTS.get(k) if value is None else value
    return [f"{k}: {get(old, k)!r} -> {get(new, k)!r}" for k in keys if get(old, k) != get(new, k)]


class MetricLogger:
    """Writes per-epoch metrics to ``metrics.jsonl`` and TensorBoard event files."""

    def __init__(self, workdir: str, tensorboard: bool = True):
        self.path = os.path.join(workdir, "metrics.jsonl")
        self.tb = None
        if tensorboard and jax.process_index() == 0:
            try:
                from tensorboardX import SummaryWriter
                self.tb = SummaryWriter(os.path.join(workdir, "tensorboard"))
            except ImportError:  # optional
                self.tb = None

    def write(self, record: dict) -> None:
        if jax.process_index() != 0:
            return
        with open(self.path, "a") as f:
            f.write(json.dumps(record) + "\n")
        if self.tb is not None:
            for k, v in record.items():
                if k not in ("epoch", "step") and isinstance(v, (int, float)):
                    self.tb.add_scalar(k, v, record["step"])
            self.tb.flush()

    def close(self):
        if self.tb is not None:
            self.tb.close()


def _truncate_jsonl(path: str, last_step: int) -> None:
    """Drops records written after the checkpoint we resume from (they will be redone)."""
    if not os.path.exists(path):
        return
    with open(path) as f:
        lines = [ln for ln in f if ln.strip() and json.loads(ln)["step"] <= last_step]
    with open(path, "w") as f:
        f.writelines(lines)


def _create(cfg_model, key: str, num_classes: int) -> models_lib.ModelFns:
    try:
        return models_lib.create_model(cfg_model.name, num_classes, **dict(cfg_model.kwargs))
    except (ValueError, TypeError) as e:
        raise config_lib.ConfigError(f"config.{key}: {e}") from None


def load_teacher(cfg, teacher: models_lib.ModelFns, sample_input):
    if not cfg.teacher.workdir:
        raise config_lib.ConfigError("config.teacher.workdir must name the work dir of a trained teacher "
                                     f"for method {cfg.method.name!r}")
    return _load_frozen(teacher, sample_input, cfg.teacher.workdir, cfg.teacher.checkpoint,
                        dict(cfg.teacher.kwargs).get("dtype"), "teacher")


def _load_frozen(model, sample_input, workdir, checkpoint, dtype, what):
    """A frozen teacher's ``(variables, meta)`` from ``workdir``, checked against ``model``."""
    template = jax.jit(model.init)(jax.random.PRNGKey(0), sample_input)  # (eager init is slow)
    variables, meta = ckpt_lib.load_model_variables(workdir, template, checkpoint, what=what)
    return _in_compute_dtype(variables, dtype), meta


def _in_compute_dtype(variables, dtype):
    """A frozen teacher computing in a half-precision ``dtype`` (``teacher.kwargs.dtype``) is also
    stored in it: half the memory, and the values its layers would cast to anyway."""
    if dtype is None or jnp.dtype(dtype).itemsize >= 4:
        return variables
    return jax.tree.map(lambda v: v.astype(dtype) if jnp.issubdtype(v.dtype, jnp.floating) else v, variables)


def load_teachers(cfg, teacher: models_lib.ModelFns, sample_input, recipes, num_classes: int):
    """``(teacher, variables, meta)``: :func:`load_teacher`'s one teacher, or several as one model.

    Several teachers (``config.teachers``, or a list in ``config.teacher.workdir``; see
    :func:`jaxkd.config.teacher_specs`) become an ensemble whose logits are ``[N, B, C]``
    (:mod:`jaxkd.models.ensemble`): stacked params and one vmapped forward when they share an
    architecture, else a tuple. Only multi-teacher recipes accept it.
    """
    from jaxkd.models import ensemble as ensemble_lib

    specs = config_lib.teacher_specs(cfg)
    if cfg.get("teachers") is None and len(specs) == 1:
        return (teacher, *load_teacher(cfg, teacher, sample_input))
    single = sorted({r.name for r in recipes if r.uses_teacher and not r.multi_teacher})
    if len(specs) > 1 and single:
        raise config_lib.ConfigError(
            f"the config names {len(specs)} teachers but method(s) {single} distil from one; use a multi-teacher "
            "method (ensemble_kd, random_teacher_kd, relabel_kd, meal_v2) or one teacher")
    models, variables, metas = [], [], []
    for i, spec in enumerate(specs):
        where = f"teachers[{i}]" if cfg.get("teachers") is not None else f"teacher.workdir[{i}]"
        model = _create(ml_collections.ConfigDict({"name": spec["name"], "kwargs": spec["kwargs"]}), where,
                        num_classes)
        v, meta = _load_frozen(model, sample_input, spec["workdir"], spec["checkpoint"],
                               dict(spec["kwargs"]).get("dtype"), f"teacher {i} ({where})")
        models.append(model)
        variables.append(v)
        metas.append(meta)
    if len(specs) == 1:
        return models[0], variables[0], metas[0]
    accuracies = [m.get("accuracy") for m in metas]
    meta = {"accuracy": (sum(accuracies) / len(accuracies) if None not in accuracies else None),
            "accuracies": accuracies, "workdirs": [s["workdir"] for s in specs]}
    if len({(s["name"], repr(sorted(s["kwargs"].items()))) for s in specs}) == 1:
        return ensemble_lib.stacked_ensemble(models[0], len(models)), ensemble_lib.stack_variables(variables), meta
    return ensemble_lib.tuple_ensemble(models), tuple(variables), meta


def init_student_from(cfg, state):
    """``state`` with the student's variables loaded from ``config.model.init_from`` (if set).

    The best checkpoint of that work dir (``"{seed}"`` in the path is replaced by
    ``config.seed``) must fit the student model; a mismatch is a :class:`ConfigError`.
    """
    src = cfg.model.get("init_from")
    if not src:
        return state
    src = src.replace("{seed}", str(cfg.seed))
    try:
        variables, _ = ckpt_lib.load_model_variables(src, jax.device_get(state.student_variables()), "best",
                                                     what="student")
    except ckpt_lib.CheckpointError as e:
        raise config_lib.ConfigError(f"config.model.init_from={src!r}: {e}") from None
    variables = dict(variables)
    params = variables.pop("params")
    return state.replace(params={**state.params, "student": params},
                         model_state={**state.model_state, "student": variables})


def evaluate(eval_step, variables, source, batch_size: int, mesh) -> dict:
    """Accuracy and mean CE over the whole eval source (padded last batch masked)."""
    sums = collections.defaultdict(float)
    shard_index, shard_count = jax.process_index(), jax.process_count()
    for batch in data_lib.eval_batches(source, batch_size, shard_index=shard_index, shard_count=shard_count):
        batch = {k: batch[k] for k in ("image", "label", "mask")}
        out = jax.device_get(eval_step(variables, step_lib.shard_batch(batch, mesh)))
        for k, v in out.items():
            sums[k] += float(v)
    n = max(sums["count"], 1.0)
    return {"accuracy": sums["correct"] / n, "loss": sums["loss_sum"] / n, "count": int(sums["count"])}


def evaluate_for_selection(eval_step, variables, eval_src, val_src, batch_size: int, mesh):
    """``(eval-split result, validation result or None, selection key)``. The key picks the best
    checkpoint (:func:`jaxkd.train.checkpoint.improves`): ``(validation accuracy, -validation
    loss)`` when there is a validation set, else ``(eval-split accuracy,)``."""
    ev = evaluate(eval_step, variables, eval_src, batch_size, mesh)
    if val_src is None:
        return ev, None, (ev["accuracy"],)
    ev_val = evaluate(eval_step, variables, val_src, batch_size, mesh)
    return ev, ev_val, (ev_val["accuracy"], -ev_val["loss"])



def train_and_evaluate(config: ml_collections.ConfigDict, workdir: str, *, allow_config_change: bool = False,
                       stop_after_steps: int | None = None) -> dict:
    """Trains ``config.model`` with ``config.method`` in ``workdir`` (resuming if possible).

    Returns the summary (also written to ``WORKDIR/summary.json``): best and last eval
    accuracy, the teacher's accuracy, steps, throughput. ``stop_after_steps`` ends the run
    early (after a checkpoint), as if it had been killed; used by tests.
    """
    config = ml_collections.ConfigDict(config.to_dict())
    mesh = step_lib.make_mesh(config.train.num_devices)
    config_lib.validate(config, num_devices=mesh.size)
    workdir = os.path.abspath(workdir)
    with workdir_lock(workdir):
        return _train(config, workdir, mesh, allow_config_change, stop_after_steps)


@dataclasses.dataclass(frozen=True)
class Stage:
    """One stage of a run: its method, optimizer and global step range ``[start, end)``."""

    index: int
    name: str
    method: dict
    optim: dict
    num_epochs: int
    start: int
    end: int


def resolve_stages(config, steps_per_epoch: int) -> list[Stage]:
    """``config.stages`` (or the single stage given by ``config.method``/``config.train``).

    Each entry of ``config.stages`` is a dict with ``num_epochs`` and optionally ``name``,
    ``method`` (replaces ``config.method``) and ``optim`` (overrides keys of ``config.optim``);
    with stages, the run lasts the sum of their epochs.
    """
    specs = list(config.get("stages") or ())
    if not specs:
        specs = [{"name": "main", "num_epochs": config.train.num_epochs}]
    stages, start = [], 0
    for i, spec in enumerate(specs):
        spec = dict(spec)
        unknown = set(spec) - {"name", "num_epochs", "method", "optim"}
        if unknown:
            raise config_lib.ConfigError(f"config.stages[{i}] has unknown key(s) {sorted(unknown)}; "
                                         "allowed: name, num_epochs, method, optim")
        n = spec.get("num_epochs")
        if not isinstance(n, int) or n <= 0:
            raise config_lib.ConfigError(f"config.stages[{i}].num_epochs must be a positive int; got {n!r}")
        method = dict(spec.get("method") or config.method.to_dict())
        optim = {**config.optim.to_dict(), **dict(spec.get("optim") or {})}
        end = start + n * steps_per_epoch
        stages.append(Stage(i, str(spec.get("name", f"stage{i}")), method, optim, n, start, end))
        start = end
    return stages


def _stage_of_checkpoint(stages: list[Stage], step: int) -> int:
    """The stage whose optimizer state a checkpoint at ``step`` holds (the one that ran step-1)."""
    for st in stages:
        if st.start < step <= st.end:
            return st.index
    return 0


def training_sources(config):
    """``(info, train, val, eval)`` for a run: ``config.data``'s splits, the training split cut to
    ``num_train_examples`` and then, when ``val_fraction`` > 0, split into train and a held-out
    validation set (``val`` is ``None`` otherwise). ``info.num_train`` counts what is trained on."""
    d = config.data
    info, train_src, eval_src = data_lib.load_dataset(
        d.name, data_dir=d.data_dir, train_split=d.train_split, eval_split=d.eval_split,
        num_train_examples=d.num_train_examples, subset_seed=d.subset_seed,
        builder_kwargs=dict(d.builder_kwargs), download=d.download)
    val_src = None
    if d.get("val_fraction"):
        try:
            train_src, val_src = data_lib.hold_out(train_src, d.val_fraction, seed=d.subset_seed)
        except ValueError as e:
            raise config_lib.ConfigError(f"config.data.val_fraction={d.val_fraction}: {e}") from None
        info = dataclasses.replace(info, num_train=len(train_src))
    return info, train_src, val_src, eval_src


def _train(config, workdir, mesh, allow_config_change, stop_after_steps):
    cfg_dict = json.loads(json.dumps(config.to_dict()))  # as stored in checkpoints (tuples -> lists)
    d = config.data
    info, train_src, val_src, eval_src = training_sources(config)
    aug = dict(data_lib.default_augmentation(info.name)) if d.augment is None else dict(d.augment)
    pipeline = step_lib.InputPipeline(mean=tuple(info.mean), std=tuple(info.std), pad=int(aug.get("pad", 0)),
                                      flip=bool(aug.get("flip", False)))
    steps_per_epoch = data_lib.steps_per_epoch(len(train_src), d.batch_size)
    if steps_per_epoch < 1:
        raise config_lib.ConfigError(f"config.data.batch_size={d.batch_size} is larger than the training set "
                                     f"({len(train_src)} examples)")
    stages = resolve_stages(config, steps_per_epoch)
    num_epochs = sum(st.num_epochs for st in stages)
    total_steps = stages[-1].end

    stage_recipes = []
    for st in stages:
        try:
            stage_recipes.append(recipes_lib.build_recipe(config_lib.method_options(st.method)))
        except ValueError as e:
            where = f"config.stages[{st.index}].method" if config.get("stages") else "config.method"
            raise config_lib.ConfigError(f"{where}: {e}") from None
    uses_teacher = any(r.uses_teacher for r in stage_recipes)
    trains_teacher = any(r.trains_teacher for r in stage_recipes)  # Apprentice: teacher in aux/teacher
    if uses_teacher and trains_teacher:
        raise config_lib.ConfigError("a run cannot mix a frozen teacher with a jointly trained one (stages)")
    student = _create(config.model, "model", info.num_classes)
    teacher = _create(config.teacher, "teacher", info.num_classes) if uses_teacher or trains_teacher else None
    sample = jnp.zeros((1, *info.input_shape), jnp.float32)
    teacher_vars, teacher_meta, joint_init, logits_cache = None, None, None, None
    if uses_teacher and config.teacher.get("cache"):  # logits by example id; the teacher is not loaded
        from jaxkd.train import teacher_cache as cache_lib
        logits_cache = cache_lib.open_for_training(config, info, {"pad": pipeline.pad, "flip": pipeline.flip},
                                                   stage_recipes, train_src)
        teacher_meta = {"accuracy": logits_cache.manifest["teacher"].get("accuracy")}
    elif uses_teacher:
        teacher, teacher_vars, teacher_meta = load_teachers(config, teacher, sample, stage_recipes, info.num_classes)
        teacher_vars = jax.device_put(teacher_vars, step_lib.replicated(mesh))
    if trains_teacher:
        joint_init, teacher_meta = joint_lib.initial_variables(
            config, teacher, sample, jax.random.fold_in(jax.random.PRNGKey(config.seed), 1))
    optimizers = [param_groups.make_optimizer(st.optim, getattr(r, "aux_optim", None), steps_per_epoch,
                                              st.num_epochs) for st, r in zip(stages, stage_recipes)]

    state = step_lib.create_train_state(jax.random.PRNGKey(config.seed), student, stage_recipes,
                                        optimizers[0][0], sample, teacher=teacher, teacher_variables=teacher_vars,
                                        trainable_teacher_variables=joint_init)

    stage_recipes = [step_lib.resolve_trainable(r, student, state.student_variables(), sample)
                     for r in stage_recipes]

    def state_template(step: int):
        tx = optimizers[_stage_of_checkpoint(stages, step)][0]
        return jax.device_put(state.replace(opt_state=tx.init(state.params)), step_lib.replicated(mesh))

    shard_index, shard_count = jax.process_index(), jax.process_count()
    train_iter = data_lib.train_batches(train_src, d.batch_size, seed=config.seed, shard_index=shard_index,
                                        shard_count=shard_count)
    run_mgr = ckpt_lib.run_manager(workdir, config.train.keep_checkpoints)
    best_mgr = ckpt_lib.best_manager(workdir)
    logger = MetricLogger(workdir, config.train.tensorboard)

    meta = {"history": [], "best_accuracy": None, "best_epoch": None, "epoch_sums": {}, "epoch_count": 0,
            "config": cfg_dict, "train_time_s": 0.0, "images": 0}
    restored = ckpt_lib.restore_latest(run_mgr, state_template)
    if restored is not None:
        start_step, state, data_state, meta = restored
        diffs = config_differences(meta["config"], cfg_dict)
        if diffs and not allow_config_change:
            raise TrainingError("the config differs from the one the checkpoints in "
                                f"{workdir!r} were made with: " + "; ".join(diffs) +
                                ". Use another --workdir, or pass --allow-config-change to resume anyway.")
        # every process is at the same global batch; the saved state is process 0's
        train_iter.set_state({**data_state, "shard_index": shard_index})
        _truncate_jsonl(logger.path, start_step)
        if jax.process_index() == 0 and start_step < total_steps:
            print(f"jaxkd: resuming from checkpoint step {start_step} in {workdir}", flush=True)
        state_stage = _stage_of_checkpoint(stages, start_step)
    else:
        start_step, state_stage = 0, 0
        state = init_student_from(config, state)
        state = jax.device_put(state, step_lib.replicated(mesh))
    if trains_teacher:  # report the jointly trained teacher, not its starting point
        teacher_meta = {"accuracy": meta.get("joint_teacher_best_accuracy")}
    if start_step >= total_steps:
        logger.close()
        return _summary(meta, config, teacher_meta, total_steps, val_src)

    eval_step = step_lib.make_eval_step(student, pipeline, mesh=mesh)
    joint_eval = (joint_lib.JointTeacherEval(workdir, teacher, pipeline, mesh, evaluate_for_selection, eval_src,
                                             d.eval_batch_size, cfg_dict, val_src=val_src)
                  if trains_teacher else None)
    progress = _progress(config, steps_per_epoch * d.batch_size)
    inflight: collections.deque = collections.deque()
    epoch_sums = collections.defaultdict(float, meta.get("epoch_sums", {}))
    epoch_count = int(meta.get("epoch_count", 0))
    t_start, images_done = time.perf_counter(), 0

    skip_nonfinite = config.train.get("on_nonfinite", "stop") == "skip"
    max_skips = int(config.train.get("max_consecutive_skips", 20))
    consecutive_skips = 0

    def drain(limit: int):
        nonlocal epoch_count, consecutive_skips
        while len(inflight) > limit:
            s, m = inflight.popleft()
            m = jax.device_get(m)
            finite = math.isfinite(float(m["loss"])) and math.isfinite(float(m["grad_norm"]))
            if not finite and skip_nonfinite and consecutive_skips + 1 < max_skips:
                # the step changed nothing (see make_train_step); count it, keep it out of the means
                consecutive_skips += 1
                meta["skipped_steps"] = meta.get("skipped_steps", 0) + 1
                epoch_sums["skipped"] += 1.0
                log.warning("step %d: non-finite loss or gradient (loss %s); batch skipped, no update "
                            "(%d skipped so far)", s, float(m["loss"]), meta["skipped_steps"])
                if progress is not None:
                    progress.update(d.batch_size)
                continue
            if not finite:
                why = (f"{max_skips} steps in a row were non-finite and skipped (train.max_consecutive_skips)"
                       if skip_nonfinite else "train.on_nonfinite='skip' would skip such batches instead")
                last = run_mgr.latest_step()
                where = (f"last good checkpoint: step {last} in {run_mgr.directory}" if last is not None
                         else "no checkpoint yet")
                raise TrainingError(f"non-finite loss ({float(m['loss'])}) at step {s}; {where}. Lower optim.lr "
                                    f"or check the data; {why}.")
            consecutive_skips = 0
            m.pop("skipped", None)
            for k, v in m.items():
                epoch_sums[k] += float(v)
            epoch_count += 1
            if progress is not None:
                progress.update(d.batch_size)
                if s % max(1, config.train.log_every_steps // 5) == 0:
                    progress.set_postfix(loss=f"{float(m['loss']):.4f}", acc=f"{float(m['accuracy']):.3f}")

    step = start_step
    stopped = False
    try:
        if progress is not None:
            progress.reset(total=steps_per_epoch * d.batch_size)
            progress.update((step % steps_per_epoch) * d.batch_size)
            progress.set_description(f"epoch {step // steps_per_epoch + 1}/{num_epochs}")
        for stage, recipe, (tx, lr_schedule) in zip(stages, stage_recipes, optimizers):
            if step >= stage.end or stopped:
                continue
            if state_stage != stage.index:  # entering a new stage: fresh optimizer state
                state = state.replace(opt_state=jax.device_put(tx.init(state.params), step_lib.replicated(mesh)))
                state_stage = stage.index
            train_step = step_lib.make_train_step(student, recipe, tx, pipeline, teacher=teacher, mesh=mesh,
                                                  lr_schedule=lr_schedule, steps_per_epoch=steps_per_epoch,
                                                  stage_start=stage.start, num_epochs=stage.num_epochs,
                                                  skip_nonfinite=skip_nonfinite,
                                                  cached_teacher=logits_cache is not None)
            final_stage = stage.index == len(stages) - 1
            while step < stage.end:
                batch = next(train_iter)
                _check_labels(batch["label"], info.num_classes, d.name)
                host = {"image": batch["image"], "label": batch["label"]}
                if logits_cache is not None:  # this epoch's stored view of each example, and its logits
                    host.update(logits_cache.batch_views(batch["id"], step // steps_per_epoch))
                batch = step_lib.shard_batch(host, mesh)
                state, metrics = train_step(state, teacher_vars, batch)
                step += 1
                _fault_point("kill_at_step", step)
                images_done += d.batch_size
                inflight.append((step, metrics))
                drain(config.train.max_inflight_steps - 1)
                epoch_end = step % steps_per_epoch == 0
                save_now = epoch_end or (config.train.checkpoint_every_steps
                                         and step % config.train.checkpoint_every_steps == 0)
                if save_now:
                    drain(0)  # nothing non-finite goes into a checkpoint
                if epoch_end:
                    epoch = step // steps_per_epoch
                    record = {"epoch": epoch, "step": step, "stage": stage.name}
                    skipped = epoch_sums.pop("skipped", 0.0)
                    record.update({f"train/{k}": v / max(epoch_count, 1) for k, v in epoch_sums.items()})
                    if skip_nonfinite:
                        record["train/skipped_steps"] = int(skipped)
                    epoch_sums.clear()
                    epoch_count = 0
                    do_eval = epoch % config.train.eval_every_epochs == 0 or step == stage.end
                    if do_eval:
                        ev, ev_val, key = evaluate_for_selection(
                            eval_step, state.student_variables(), eval_src, val_src, d.eval_batch_size, mesh)
                        record.update({"eval/accuracy": ev["accuracy"], "eval/loss": ev["loss"]})
                        if ev_val is not None:
                            record.update({"val/accuracy": ev_val["accuracy"], "val/loss": ev_val["loss"]})
                        if joint_eval is not None:
                            record.update(joint_eval(state, step, epoch, meta))
                    record["time_s"] = meta["train_time_s"] + time.perf_counter() - t_start
                    logger.write(record)
                    meta["history"].append(record)
                    # best among the epochs of the final stage (earlier stages may train only part
                    # of the student, e.g. FitNets' hint stage), on the validation set when there is
                    # one, else on the eval split; best_accuracy is always the eval split's accuracy
                    # at that epoch
                    if do_eval and final_stage and ckpt_lib.improves(key, ckpt_lib.best_key_so_far(meta)):
                        meta["best_accuracy"], meta["best_epoch"], meta["best_key"] = ev["accuracy"], epoch, list(key)
                        best_meta = {"epoch": epoch, "accuracy": ev["accuracy"], "config": cfg_dict}
                        if ev_val is not None:
                            meta["best_val_accuracy"] = best_meta["val_accuracy"] = ev_val["accuracy"]
                        ckpt_lib.save_best(best_mgr, step, {"params": state.params["student"],
                                                            "model_state": state.model_state["student"]},
                                           best_meta, key)
                    if progress is not None:
                        progress.write(_format_record(record))
                        if step < total_steps:
                            progress.reset(total=steps_per_epoch * d.batch_size)
                            progress.set_description(f"epoch {epoch + 1}/{num_epochs}")
                if save_now:
                    meta["epoch_sums"], meta["epoch_count"] = dict(epoch_sums), epoch_count
                    meta["train_time_s"] += time.perf_counter() - t_start
                    meta["images"] += images_done
                    t_start, images_done = time.perf_counter(), 0
                    ckpt_lib.save_run(run_mgr, step, state, train_iter.get_state(), dict(meta))
                    _fault_point("kill_during_save", step)  # the save is still being written
                    if stop_after_steps is not None and step >= stop_after_steps:
                        stopped = True
                        break
        drain(0)
    finally:
        if progress is not None:
            progress.close()
        run_mgr.wait_until_finished()
        best_mgr.wait_until_finished()
        logger.close()
    if joint_eval is not None:
        joint_eval.finish(meta, meta["history"][-1].get("eval/teacher_accuracy") if meta["history"] else None)
        teacher_meta = {"accuracy": meta.get("joint_teacher_best_accuracy")}
    summary = _summary(meta, config, teacher_meta, step, val_src)
    if jax.process_index() == 0:
        with open(os.path.join(workdir, "summary.json"), "w") as f:
            json.dump(summary, f, indent=2)
    return summary


def _check_labels(labels: np.ndarray, num_classes: int, dataset: str) -> None:
    """On the host, before the step: a label outside [0, C) would silently give a zero loss."""
    if labels.size and (labels.min() < 0 or labels.max() >= num_classes):
        raise TrainingError(f"data set {dataset!r} yielded label(s) outside [0, {num_classes}) "
                            f"(min {labels.min()}, max {labels.max()}); its num_classes does not fit its labels")


def _fault_point(name: str, step: int) -> None:
    """Fault injection for the crash tests: ``JAXKD_FAULT=kill_at_step:17`` (or
    ``kill_during_save:20``) makes this process SIGKILL itself at that point."""
    spec = os.environ.get("JAXKD_FAULT")
    if spec and spec == f"{name}:{step}":
        import signal
        os.kill(os.getpid(), signal.SIGKILL)


def _summary(meta: dict, config, teacher_meta, step: int, val_src=None) -> dict:
    evals = [r for r in meta["history"] if "eval/accuracy" in r]
    last = evals[-1] if evals else {}
    return {
        "method": config.method.name, "model": config.model.name, "dataset": config.data.name,
        "seed": config.seed, "steps": step, "epochs": (meta["history"][-1]["epoch"] if meta["history"] else 0),
        # best_accuracy: eval-split accuracy of the checkpoint picked on `selected_on`
        "best_accuracy": meta["best_accuracy"], "best_epoch": meta["best_epoch"],
        "selected_on": "val" if config.data.get("val_fraction") else "eval_split",
        "best_val_accuracy": meta.get("best_val_accuracy"),
        "num_val": len(val_src) if val_src is not None else 0,
        "last_accuracy": last.get("eval/accuracy"),
        "teacher_accuracy": (teacher_meta or {}).get("accuracy"),
        "train_time_s": meta["train_time_s"],
        "images_per_s": meta["images"] / meta["train_time_s"] if meta["train_time_s"] else None,
        "skipped_steps": meta.get("skipped_steps", 0),
    }


def _format_record(r: dict) -> str:
    parts = [f"epoch {r['epoch']:>3}"]
    for k in ("train/loss", "train/accuracy", "eval/loss", "eval/accuracy", "val/accuracy"):
        if k in r:
            parts.append(f"{k} {r[k]:.4f}")
    return "  ".join(parts)


def _progress(config, images_per_epoch: int):
    """Per-epoch progress bar counting images, so its rate is the training throughput."""
    if not config.train.progress or jax.process_index() != 0:
        return None
    from tqdm.auto import tqdm
    # disable=None: no bar when stderr is not a terminal (logs, CI)
    return tqdm(total=images_per_epoch, unit="img", unit_scale=True, dynamic_ncols=True, leave=False, disable=None)
