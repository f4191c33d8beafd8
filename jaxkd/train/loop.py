"""The one generic train loop: ``train_and_evaluate(config, workdir)``.

Every method runs through here; what differs is the recipe (``config.method`` or the stages').
The loop reads as its phases:

1. **build**: everything the config asks for (:func:`jaxkd.train.setup.build_run`);
2. **restore or initialise**: the newest usable checkpoint in the work dir, else a fresh state;
3. **train** stage by stage, with a bounded number of steps in flight; at each epoch end
   **evaluate and select** (the best checkpoint, :class:`~jaxkd.train.checkpoint.BestCheckpoint`)
   and **save** (every epoch and every ``train.checkpoint_every_steps``);
4. **summarise** into ``summary.json``.

Started again in the same work dir, a run resumes from the newest usable checkpoint (one that
restores and matches its checksums) and ends with the same params as a run that was never
interrupted: what had been written ahead of that step (best checkpoints, metrics, TensorBoard
events, summaries) is reconciled first (:meth:`Trainer._reconcile`).
"""

from __future__ import annotations

import collections
import contextlib
import fcntl
import json
import logging
import math
import os
import time

import jax
import ml_collections
import numpy as np

from jaxkd import config as config_lib
from jaxkd import data as data_lib
from jaxkd.core import recipe_options
from jaxkd.models import count_params
from jaxkd.errors import TrainingError, WorkdirBusy
from jaxkd.train import checkpoint as ckpt_lib
from jaxkd.train import joint_teacher as joint_lib
from jaxkd.train import setup as setup_lib
from jaxkd.train import step as step_lib
from jaxkd.train import wandb_writer as wandb_lib
from jaxkd.train.evaluation import evaluate, evaluate_for_selection  # noqa: F401  (re-exported)

log = logging.getLogger(__name__)

__all__ = ["MetricLogger", "StepMetrics", "Trainer", "TrainingError", "config_differences", "evaluate",
           "evaluate_for_selection", "train_and_evaluate", "workdir_lock"]

# Keys whose change between a kill and a resume makes the resumed run a different run.
RESUME_KEYS = ("seed", "data.name", "data.batch_size", "data.num_train_examples", "data.subset_seed",
               "data.val_fraction", "model.name", "model.kwargs", "method.name", "teacher.name", "optim.name",
               "train.num_epochs", "stages", "teachers", "teacher.cache")
# what a key added later means in checkpoints written before it existed
_RESUME_KEY_DEFAULTS = {"data.val_fraction": 0.0}


def train_and_evaluate(config: ml_collections.ConfigDict, workdir: str, *, allow_config_change: bool = False,
                       stop_after_steps: int | None = None, wait_for_lock: bool = False) -> dict:
    """Trains ``config.model`` with ``config.method`` (or ``config.stages``) in ``workdir``,
    resuming if possible.

    Returns the summary (also written to ``WORKDIR/summary.json``): best and last eval
    accuracy, the teacher's accuracy, steps, throughput. ``stop_after_steps`` ends the run
    early (after a checkpoint), as if it had been killed; used by tests. A work dir locked by
    another process raises :class:`~jaxkd.errors.WorkdirBusy`, or with ``wait_for_lock`` waits.
    """
    setup_lib.apply_cpu_defaults()  # before the mesh creates the backend (no effect afterwards)
    config = ml_collections.ConfigDict(config.to_dict())
    mesh = step_lib.make_mesh(config.train.num_devices)
    config_lib.validate(config, num_devices=mesh.size)
    workdir = os.path.abspath(workdir)
    with workdir_lock(workdir, wait=wait_for_lock):
        run = setup_lib.build_run(config, mesh)
        trainer = Trainer(run, workdir, stop_after_steps)
        try:
            trainer.restore_or_initialise(allow_config_change)
            for stage in run.stages:
                if not trainer.train_stage(stage):
                    break
            trainer.metrics.drain()
        finally:
            trainer.close()
        return trainer.summarise()


# --------------------------------------------------------------------------------------------
# The phases
# --------------------------------------------------------------------------------------------


class Trainer:
    """The state of one run between the phases of :func:`train_and_evaluate`."""

    def __init__(self, run: setup_lib.RunSetup, workdir: str, stop_after_steps: int | None = None):
        self.run, self.workdir, self.stop_after_steps = run, workdir, stop_after_steps
        cfg, data = run.config, run.data
        self.batch_size = cfg.data.batch_size
        self.meta = {"history": [], "best_accuracy": None, "best_epoch": None, "epoch_sums": {}, "epoch_count": 0,
                     "config": run.cfg_dict, "train_time_s": 0.0, "images": 0,
                     "method_defaults": method_defaults(run.stages)}
        self.teacher_meta = run.teacher_meta
        self.run_mgr = ckpt_lib.run_manager(workdir, cfg.train.keep_checkpoints)
        self.best = ckpt_lib.BestCheckpoint(workdir)
        self.logger = MetricLogger(workdir, cfg.train.tensorboard,
                                   wandb_lib.from_config(cfg.train, workdir, run.cfg_dict))
        self.train_iter = data_lib.train_batches(data.train, cfg.data.batch_size, seed=cfg.seed,
                                                 shard_index=jax.process_index(), shard_count=jax.process_count())
        self.state, self.step, self.state_stage = run.initial_state, 0, 0
        self.eval_step = self.joint = self.progress = None
        self.metrics = StepMetrics(cfg.train, self._last_checkpoint, self._on_step_read)
        self.clock = (time.perf_counter(), 0)  # (start of the current timing period, images in it)

    # -- restore or initialise ----------------------------------------------------------------

    def restore_or_initialise(self, allow_config_change: bool) -> None:
        """Resumes from the newest usable checkpoint (refusing a changed config), else starts fresh
        (the student from ``model.init_from`` when set)."""
        run = self.run
        restored = ckpt_lib.restore_latest(self.run_mgr, run.state_template)
        if restored is None:
            state = setup_lib.init_aux_from(run.config, setup_lib.init_student_from(run.config, self.state))
            self.state = jax.device_put(state, run.state_sharding)
        else:
            self.step, self.state, data_state, self.meta = restored
            # a config stored by an earlier jaxkd, as this one reads it
            self.meta["config"] = config_lib.upgrade_config(self.meta["config"], _accepted_options)
            diffs = config_differences(self.meta["config"], run.cfg_dict)
            # a method option the config leaves at its default, whose default changed since the
            # checkpoints were made (a run from before this record was kept cannot be checked)
            current_defaults = method_defaults(run.stages)
            diffs += default_changes(self.meta.get("method_defaults"), current_defaults)
            self.meta["method_defaults"] = current_defaults
            if diffs and not allow_config_change:
                raise TrainingError("the config differs from the one the checkpoints in "
                                    f"{self.workdir!r} were made with: " + "; ".join(diffs) +
                                    ". Use another --workdir, or pass --allow-config-change to resume anyway.")
            # every process is at the same global batch; the saved state is process 0's
            self.train_iter.set_state({**data_state, "shard_index": jax.process_index()})
            self._reconcile()
            if jax.process_index() == 0 and self.step < run.total_steps:
                print(f"jaxkd: resuming from checkpoint step {self.step} in {self.workdir}", flush=True)
            self.state_stage = run.stage_of_checkpoint(self.step)
            self.metrics.restore(self.meta)
        if run.trains_teacher:  # report the jointly trained teacher, not its starting point
            self.teacher_meta = {"accuracy": self.meta.get(joint_lib.PREFIX + "best_accuracy")}
        if self.step < run.total_steps:
            self._start_training()

    def _start_training(self) -> None:
        run, data = self.run, self.run.data
        self.eval_step = step_lib.make_eval_step(run.student, data.pipeline, mesh=run.mesh)
        if run.trains_teacher:
            self.joint = joint_lib.JointTeacherEval(self.workdir, run.teacher, data.pipeline, run.mesh, data.eval,
                                                    run.config.data.eval_batch_size, run.cfg_dict, val_src=data.val)
        self.progress = _progress(run.config, run.steps_per_epoch * self.batch_size)
        self._progress_epoch()
        if self.progress is not None:
            self.progress.update((self.step % run.steps_per_epoch) * self.batch_size)

    def _reconcile(self) -> None:
        """Removes what was written ahead of the restored step, so that the resumed run writes it
        again exactly as an uninterrupted run would: best checkpoints (the student's and a joint
        teacher's) of later steps, metric records and TensorBoard events of later epochs
        (rewritten from the restored history), and the summaries of the finished run."""
        ckpt_lib.discard_steps_after(self.best.manager, self.step)
        joint_dir = os.path.join(self.workdir, joint_lib.SUBDIR)
        if os.path.isdir(os.path.join(joint_dir, "best")):
            ckpt_lib.discard_steps_after(ckpt_lib.best_manager(joint_dir), self.step)
        self.logger.rewind(self.meta["history"])
        if self.step < self.run.total_steps and jax.process_index() == 0:
            for path in (os.path.join(self.workdir, "summary.json"), os.path.join(joint_dir, "summary.json")):
                if os.path.exists(path):
                    os.remove(path)

    # -- train one stage ----------------------------------------------------------------------

    def train_stage(self, stage: setup_lib.Stage) -> bool:
        """Runs ``stage`` from the current step to its end; ``False`` if the run stopped early."""
        if self.step >= stage.end:
            return True
        run, cfg = self.run, self.run.config
        recipe, (tx, lr_schedule) = run.recipes[stage.index], run.optimizers[stage.index]
        if self.state_stage != stage.index:  # entering a new stage: fresh optimizer state
            self.state = self.state.replace(opt_state=jax.device_put(tx.init(self.state.params),
                                                                     step_lib.replicated(run.mesh)))
            self.state_stage = stage.index
        train_step = step_lib.make_train_step(
            run.student, recipe, tx, run.data.pipeline, teacher=run.teacher, mesh=run.mesh, lr_schedule=lr_schedule,
            steps_per_epoch=run.steps_per_epoch, stage_start=stage.start, num_epochs=stage.num_epochs,
            skip_nonfinite=self.metrics.skip_nonfinite, cached_teacher=run.logits_cache is not None,
            state_sharding=run.state_sharding)
        every = cfg.train.checkpoint_every_steps
        while self.step < stage.end:
            self.state, metrics = train_step(self.state, run.teacher_variables, self._next_batch())
            self.step += 1
            _fault_point("kill_at_step", self.step)
            self.clock = (self.clock[0], self.clock[1] + self.batch_size)
            self.metrics.add(self.step, metrics)
            epoch_end = self.step % run.steps_per_epoch == 0
            if epoch_end or (every and self.step % every == 0):
                self.metrics.drain()  # nothing non-finite goes into a checkpoint
                if epoch_end:
                    self.end_epoch(stage)
                self.save()
                if self.stop_after_steps is not None and self.step >= self.stop_after_steps:
                    return False
        return True

    def _next_batch(self):
        run = self.run
        batch = next(self.train_iter)
        _check_labels(batch["label"], run.data.info.num_classes, run.config.data.name)
        host = dict(batch)  # every per-example field reaches the recipe (LossInputs.batch)
        if run.logits_cache is not None:  # this epoch's stored view of each example, and its logits
            host.update(run.logits_cache.batch_views(batch["id"], self.step // run.steps_per_epoch))
        return step_lib.shard_batch(host, run.mesh)

    # -- evaluate and select ------------------------------------------------------------------

    def end_epoch(self, stage: setup_lib.Stage) -> dict:
        """Logs the epoch's means and, on eval epochs, the eval (and validation) results; picks the
        best checkpoint among the epochs of the final stage (earlier stages may train only part of
        the student, e.g. FitNets' hint stage)."""
        run, cfg = self.run, self.run.config
        epoch = self.step // run.steps_per_epoch
        record = {"epoch": epoch, "step": self.step, "stage": stage.name, **self.metrics.epoch_record()}
        if stage.evaluate and (epoch % cfg.train.eval_every_epochs == 0 or self.step == stage.end):
            ev, ev_val, key = evaluate_for_selection(self.eval_step, self.state.student_variables(), run.data.eval,
                                                     run.data.val, cfg.data.eval_batch_size, run.mesh)
            record.update({"eval/accuracy": ev["accuracy"], "eval/loss": ev["loss"]})
            if ev_val is not None:
                record.update({"val/accuracy": ev_val["accuracy"], "val/loss": ev_val["loss"]})
            if self.joint is not None:
                record.update(self.joint(self.state, self.step, epoch, self.meta))
            if stage.index == len(run.stages) - 1:
                self.best.consider(self.meta, self.step, epoch, key, ev["accuracy"], ev_val and ev_val["accuracy"],
                                   self.state.student_variables(), run.cfg_dict)
        record["time_s"] = self.meta["train_time_s"] + time.perf_counter() - self.clock[0]
        self.logger.write(record)
        self.meta["history"].append(record)
        if self.progress is not None:
            self.progress.write(_format_record(record))
            if self.step < run.total_steps:
                self._progress_epoch()
        return record

    # -- save ---------------------------------------------------------------------------------

    def save(self) -> None:
        """Checkpoints the whole train state, the data position and ``meta`` (asynchronously).

        A best checkpoint saved at this step is complete before the run checkpoint that records
        it is started. A save that fails (e.g. a full disk) stops the run with a
        :class:`~jaxkd.errors.CheckpointError`; the steps saved before stay usable."""
        self.metrics.store(self.meta)
        now = time.perf_counter()
        self.meta["train_time_s"] += now - self.clock[0]
        self.meta["images"] += self.clock[1]
        self.clock = (now, 0)
        with self._saving():
            self._wait_for_best()
            ckpt_lib.save_run(self.run_mgr, self.step, self.state, self.train_iter.get_state(), dict(self.meta))
        _fault_point("kill_during_save", self.step)  # the save is still being written
        if _fault_requested("kill_after_save", self.step):  # killed right after a step is finalised
            with self._saving():
                self.run_mgr.wait_until_finished()
            _fault_point("kill_after_save", self.step)

    def _wait_for_best(self) -> None:
        self.best.wait_until_finished()
        if self.joint is not None:
            self.joint.best.wait_until_finished()

    @contextlib.contextmanager
    def _saving(self):
        """Turns a failed (asynchronous) checkpoint write into one clear error."""
        try:
            yield
        except Exception as e:  # noqa: BLE001 - whatever the storage raised
            with contextlib.suppress(Exception):
                self.run_mgr.reload()
            newest = self.run_mgr.latest_step()
            raise ckpt_lib.CheckpointError(
                f"writing a checkpoint in {self.workdir} failed ({type(e).__name__}: {' '.join(str(e).split())[:300]}); "
                f"the checkpoints saved before are intact (newest: step {newest}). Fix the cause (disk space, "
                "permissions) and run the same command again to resume.") from e

    def close(self) -> None:
        if self.progress is not None:
            self.progress.close()
        try:
            with self._saving():
                self.run_mgr.wait_until_finished()
                self._wait_for_best()
        finally:
            self.logger.close()

    # -- summarise ----------------------------------------------------------------------------

    def summarise(self) -> dict:
        """The run's summary (written to ``summary.json`` once training ran)."""
        meta, run = self.meta, self.run
        if self.joint is not None:
            self.joint.finish(meta, meta["history"][-1].get("eval/teacher_accuracy") if meta["history"] else None)
            self.teacher_meta = {"accuracy": meta.get(joint_lib.PREFIX + "best_accuracy")}
        evals = [r for r in meta["history"] if "eval/accuracy" in r]
        staged = bool(run.config.get("stages"))
        summary = {
            # a staged run: its stages' methods in order ("fitnets_hint+hinton_kd"), each in "stages"
            "method": "+".join(st.method["name"] for st in run.stages) if staged else run.config.method.name,
            "model": run.config.model.name, "num_params": count_params(self.state.params["student"]),
            "dataset": run.config.data.name,
            "seed": run.config.seed, "steps": self.step,
            "epochs": meta["history"][-1]["epoch"] if meta["history"] else 0,
            # best_accuracy: eval-split accuracy of the checkpoint picked on `selected_on`
            "best_accuracy": meta["best_accuracy"], "best_epoch": meta["best_epoch"],
            "selected_on": "val" if run.config.data.get("val_fraction") else "eval_split",
            "best_val_accuracy": meta.get("best_val_accuracy"),
            "num_val": len(run.data.val) if run.data.val is not None else 0,
            "last_accuracy": evals[-1].get("eval/accuracy") if evals else None,
            "teacher_accuracy": (self.teacher_meta or {}).get("accuracy"),
            "train_time_s": meta["train_time_s"],
            "images_per_s": meta["images"] / meta["train_time_s"] if meta["train_time_s"] else None,
            "skipped_steps": self.metrics.skipped_total,
        }
        if staged:
            summary["stages"] = [{"name": st.name, "method": st.method["name"], "num_epochs": st.num_epochs}
                                 for st in run.stages]
        if self.eval_step is not None and jax.process_index() == 0:  # (a finished run's rerun writes nothing)
            with open(os.path.join(self.workdir, "summary.json"), "w") as f:
                json.dump(summary, f, indent=2)
        self.logger.finish(summary if self.eval_step is not None else None)
        return summary

    # -- helpers ------------------------------------------------------------------------------

    def _last_checkpoint(self):
        """The newest checkpoint that restores and matches its checksums (for error messages)."""
        try:
            step = ckpt_lib.newest_verified_step(self.run_mgr, self.run.state_template)
        except Exception:  # noqa: BLE001 - a failed save in flight: name none
            step = None
        return step, self.run_mgr.directory

    def _on_step_read(self, step: int, metrics: dict | None) -> None:
        if self.progress is None:
            return
        self.progress.update(self.batch_size)
        if metrics is not None and step % max(1, self.run.config.train.log_every_steps // 5) == 0:
            self.progress.set_postfix(loss=f"{float(metrics['loss']):.4f}", acc=f"{float(metrics['accuracy']):.3f}")

    def _progress_epoch(self) -> None:
        if self.progress is not None:
            self.progress.reset(total=self.run.steps_per_epoch * self.batch_size)
            self.progress.set_description(f"epoch {self.step // self.run.steps_per_epoch + 1}/{self.run.num_epochs}")


class StepMetrics:
    """Per-epoch means of the step metrics, read back from the devices a few steps behind.

    ``add`` queues a step's metrics (device arrays) and reads the oldest once more than
    ``train.max_inflight_steps`` are queued, so the host never waits on the step it just
    started (and XLA:CPU never has many multi-device steps queued). A non-finite loss or gradient
    stops the run naming the step and the last checkpoint, or, with ``train.on_nonfinite=skip``,
    is counted (the step changed nothing, :func:`~jaxkd.train.step.make_train_step`) until
    ``train.max_consecutive_skips`` come in a row.
    """

    def __init__(self, train_cfg, last_checkpoint, on_read=None):
        self.max_inflight = int(train_cfg.max_inflight_steps)
        self.skip_nonfinite = train_cfg.get("on_nonfinite", "stop") == "skip"
        self.max_skips = int(train_cfg.get("max_consecutive_skips", 20))
        self.last_checkpoint, self.on_read = last_checkpoint, on_read
        self.inflight: collections.deque = collections.deque()
        self.sums: collections.defaultdict = collections.defaultdict(float)
        self.count = self.consecutive_skips = self.skipped_total = 0

    def restore(self, meta: dict) -> None:
        self.sums = collections.defaultdict(float, meta.get("epoch_sums", {}))
        self.count = int(meta.get("epoch_count", 0))
        self.skipped_total = int(meta.get("skipped_steps", 0))

    def store(self, meta: dict) -> None:
        meta["epoch_sums"], meta["epoch_count"] = dict(self.sums), self.count
        if self.skipped_total:
            meta["skipped_steps"] = self.skipped_total

    def add(self, step: int, metrics) -> None:
        self.inflight.append((step, metrics))
        self.drain(self.max_inflight - 1)

    def drain(self, limit: int = 0) -> None:
        while len(self.inflight) > limit:
            step, m = self.inflight.popleft()
            self._read(step, jax.device_get(m))

    def _read(self, step: int, m: dict) -> None:
        finite = math.isfinite(float(m["loss"])) and math.isfinite(float(m["grad_norm"]))
        if not finite and self.skip_nonfinite and self.consecutive_skips + 1 < self.max_skips:
            self.consecutive_skips += 1
            self.skipped_total += 1
            self.sums["skipped"] += 1.0
            log.warning("step %d: non-finite loss or gradient (loss %s); batch skipped, no update "
                        "(%d skipped so far)", step, float(m["loss"]), self.skipped_total)
            if self.on_read is not None:
                self.on_read(step, None)
            return
        if not finite:
            why = (f"{self.max_skips} steps in a row were non-finite and skipped (train.max_consecutive_skips)"
                   if self.skip_nonfinite else "train.on_nonfinite='skip' would skip such batches instead")
            last, directory = self.last_checkpoint()
            where = (f"last good checkpoint: step {last} in {directory} (checksums verified)" if last is not None
                     else "no verified checkpoint")
            raise TrainingError(f"non-finite loss ({float(m['loss'])}) at step {step}; {where}. Lower optim.lr "
                                f"or check the data; {why}.")
        self.consecutive_skips = 0
        m.pop("skipped", None)
        for k, v in m.items():
            self.sums[k] += float(v)
        self.count += 1
        if self.on_read is not None:
            self.on_read(step, m)

    def epoch_record(self) -> dict:
        """``{"train/<metric>": epoch mean}`` (plus ``train/skipped_steps`` when skipping is on); resets."""
        skipped = self.sums.pop("skipped", 0.0)
        record = {f"train/{k}": v / max(self.count, 1) for k, v in self.sums.items()}
        if self.skip_nonfinite:
            record["train/skipped_steps"] = int(skipped)
        self.sums.clear()
        self.count = 0
        return record


# --------------------------------------------------------------------------------------------
# Around the phases: the work dir lock, config comparison, logs, faults
# --------------------------------------------------------------------------------------------


@contextlib.contextmanager
def workdir_lock(workdir: str, wait: bool = False):
    """Exclusive lock on a work dir, so that two runs never write into the same one.

    A held lock raises :class:`~jaxkd.errors.WorkdirBusy`, or with ``wait`` blocks until the
    other process lets it go."""
    os.makedirs(workdir, exist_ok=True)
    # one lock per process of a multi-process run (they share the work dir)
    path = os.path.join(workdir, ".lock" if jax.process_count() == 1 else f".lock.process{jax.process_index()}")
    fh = open(path, "w")
    try:
        fcntl.flock(fh, fcntl.LOCK_EX | (0 if wait else fcntl.LOCK_NB))
    except BlockingIOError:
        fh.close()
        raise WorkdirBusy(f"work dir {workdir!r} is in use by another jaxkd run (lock {path}); "
                            "wait for it to finish or use another --workdir") from None
    try:
        fh.write(str(os.getpid()))
        fh.flush()
        yield
    finally:
        fcntl.flock(fh, fcntl.LOCK_UN)
        fh.close()


def _accepted_options(name):
    try:
        return set(recipe_options(name))
    except config_lib.ConfigError:
        return None


def _plain(value):
    """A default as it reads back from the checkpoint's JSON metadata: tuples as lists; a function
    or class by its qualified name, anything else by its repr (no memory addresses)."""
    try:
        return json.loads(json.dumps(value))
    except (TypeError, ValueError):
        if hasattr(value, "__qualname__"):
            return f"{getattr(value, '__module__', '')}.{value.__qualname__}"
        return repr(value)


def method_defaults(stages) -> list[dict]:
    """Per stage, the default value of every option of its method that its config does not set."""
    out = []
    for st in stages:
        set_here = set(st.method) - {"name"}
        options = _accepted_options(st.method["name"]) and recipe_options(st.method["name"])
        out.append({k: _plain(v) for k, v in (options or {}).items() if k not in set_here})
    return out


def default_changes(old: list[dict] | None, new: list[dict]) -> list[str]:
    """What :func:`method_defaults` recorded in a checkpoint says differs from now."""
    if not old or len(old) != len(new):
        return []
    return [f"stage {i} method option {k!r} is not set in the config and its default changed since the "
            f"checkpoints were made ({o[k]!r} -> {n[k]!r}; set it to {o[k]!r} to keep the run as it was)"
            for i, (o, n) in enumerate(zip(old, new)) for k in sorted(o.keys() & n.keys()) if o[k] != n[k]]


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
    """Writes per-epoch metrics to ``metrics.jsonl``, TensorBoard event files and, when given, a
    wandb run (:mod:`jaxkd.train.wandb_writer`)."""

    def __init__(self, workdir: str, tensorboard: bool = True, wandb=None):
        self.path = os.path.join(workdir, "metrics.jsonl")
        self.wandb = wandb
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
            self._add_scalars(record)
            self.tb.flush()
        if self.wandb is not None:
            self.wandb.write(record)

    def _add_scalars(self, record: dict) -> None:
        for k, v in record.items():
            if k not in ("epoch", "step") and isinstance(v, (int, float)):
                self.tb.add_scalar(k, v, record["step"])

    def rewind(self, history: list[dict]) -> None:
        """Rewrites ``metrics.jsonl`` and the TensorBoard events from ``history`` (the records of
        the checkpoint a run resumes from): what an interrupted run logged after it is dropped."""
        if jax.process_index() != 0:
            return
        tmp = self.path + ".tmp"
        with open(tmp, "w") as f:
            f.writelines(json.dumps(r) + "\n" for r in history)
        os.replace(tmp, self.path)
        if self.tb is not None:
            logdir = self.tb.logdir
            self.tb.close()
            for name in os.listdir(logdir):
                if name.startswith("events.out.tfevents"):
                    os.remove(os.path.join(logdir, name))
            from tensorboardX import SummaryWriter
            self.tb = SummaryWriter(logdir)
            for record in history:
                self._add_scalars(record)
            self.tb.flush()
        # wandb keeps what it was sent: the redone steps are logged again with the same numbers

    def finish(self, summary: dict | None) -> None:
        """Ends the wandb run (with the run's summary when training ran)."""
        if self.wandb is not None:
            self.wandb.finish(summary)
            self.wandb = None

    def close(self):
        if self.tb is not None:
            self.tb.close()


def _check_labels(labels: np.ndarray, num_classes: int, dataset: str) -> None:
    """On the host, before the step: a label outside [0, C) would silently give a zero loss."""
    if labels.size and (labels.min() < 0 or labels.max() >= num_classes):
        raise TrainingError(f"data set {dataset!r} yielded label(s) outside [0, {num_classes}) "
                            f"(min {labels.min()}, max {labels.max()}); its num_classes does not fit its labels")


def _fault_requested(name: str, step: int) -> bool:
    return os.environ.get("JAXKD_FAULT") == f"{name}:{step}"


def _fault_point(name: str, step: int) -> None:
    """Fault injection for the crash tests: ``JAXKD_FAULT=kill_at_step:17`` (after the step),
    ``kill_during_save:20`` (a save still being written) or ``kill_after_save:20`` (once step
    20's checkpoint and best checkpoint are finalised) makes this process SIGKILL itself at that
    point; ``oserror_during_save:20`` makes step 20's save fail
    (:class:`jaxkd.train.checkpoint.ChecksumsHandler`)."""
    if _fault_requested(name, step):
        import signal
        os.kill(os.getpid(), signal.SIGKILL)


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
