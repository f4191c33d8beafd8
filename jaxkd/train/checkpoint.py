"""Orbax checkpoints of a run, and loading a teacher from another run's work dir.

Layout of a work dir::

    WORKDIR/checkpoints/<step>/{state,data,meta}   keep-N latest (for resume)
    WORKDIR/best/<step>/{model,meta}                 the best eval accuracy (for teachers, export)

``state`` is the whole :class:`~jaxkd.train.step.TrainState` (params incl. auxiliary
modules, batch stats, optimizer state, step, RNG); ``data`` the input iterator's position;
``meta`` the epoch, the metric history and the config. Teachers are never written here.

Restores go newest-to-oldest: Orbax ignores a leftover temporary save, but a damaged
finalised step is still listed, so a step that fails to restore is reported and skipped.
"""

from __future__ import annotations

import os
import warnings
from typing import Any

import jax
import numpy as np
import orbax.checkpoint as ocp

from jaxkd.errors import CheckpointError  # noqa: F401  (re-exported: jaxkd.train.checkpoint.CheckpointError)
from jaxkd.train import keys as keys_lib


def _barriers(directory: str) -> ocp.options.MultiprocessingOptions:
    # Several managers (run, best, a joint teacher's best) may save the same step number at
    # once; in a multi-process run their cross-process barriers need distinct names.
    # (named by the last two path components: the same on every host, unlike absolute paths)
    parts = os.path.normpath(os.path.abspath(directory)).split(os.sep)[-2:]
    return ocp.options.MultiprocessingOptions(barrier_sync_key_prefix="jaxkd." + ".".join(parts))


def run_manager(workdir: str, keep: int = 3) -> ocp.CheckpointManager:
    return ocp.CheckpointManager(
        os.path.join(os.path.abspath(workdir), "checkpoints"),
        options=ocp.CheckpointManagerOptions(max_to_keep=keep, create=True,
                                             multiprocessing_options=_barriers(os.path.join(workdir, "checkpoints"))),
        item_handlers={"state": ocp.StandardCheckpointHandler(), "data": ocp.JsonCheckpointHandler(),
                       "meta": ocp.JsonCheckpointHandler()})


def best_manager(workdir: str) -> ocp.CheckpointManager:
    return ocp.CheckpointManager(
        os.path.join(os.path.abspath(workdir), "best"),
        options=ocp.CheckpointManagerOptions(max_to_keep=1, create=True, best_fn=lambda m: m["accuracy"],
                                             best_mode="max", multiprocessing_options=_barriers(os.path.join(workdir, "best"))),
        item_handlers={"model": ocp.StandardCheckpointHandler(), "meta": ocp.JsonCheckpointHandler()})


def save_run(manager: ocp.CheckpointManager, step: int, state, data_state: dict, meta: dict) -> None:
    state = keys_lib.to_key_data(state)  # typed PRNG keys are stored as their raw key data
    manager.save(step, args=ocp.args.Composite(
        state=ocp.args.StandardSave(state), data=ocp.args.JsonSave(data_state),
        meta=ocp.args.JsonSave(meta)), force=True)


def improves(key, best) -> bool:
    """Whether an epoch with selection ``key`` beats the best so far (``None``: none yet).

    Keys are tuples compared in order: ``(eval accuracy,)`` when "best" is picked on the eval
    split (a tie keeps the earlier epoch, the reference code's strict ``>``), or
    ``(validation accuracy, -validation loss)`` with a validation set, where a tie in accuracy
    (common on a small set that saturates) goes to the lower loss.
    """
    return best is None or tuple(key) > tuple(best)


def best_key_so_far(meta: dict, prefix: str = "") -> tuple | None:
    """The selection key of the best epoch recorded in a run's ``meta`` (``prefix``
    ``"joint_teacher_"`` for Apprentice's joint teacher); runs checkpointed before keys were
    stored have only the eval accuracy."""
    key = meta.get(f"{prefix}best_key")
    if key is not None:
        return tuple(key)
    accuracy = meta.get(f"{prefix}best_accuracy")
    return None if accuracy is None else (accuracy,)


def selection_score(key) -> float:
    """One number in the order of :func:`improves`' keys, for Orbax's ``best_fn``: the accuracy
    plus a term below 1e-8 that falls with the loss (accuracies of sets under 10 M examples
    differ by more than that)."""
    return float(key[0]) + (1e-8 / (1.0 - float(key[1])) if len(key) > 1 else 0.0)


def save_best(manager: ocp.CheckpointManager, step: int, model: dict, meta: dict, key) -> None:
    """Saves ``model`` as the best checkpoint; ``key`` is its selection key (:func:`improves`)."""
    manager.save(step, args=ocp.args.Composite(model=ocp.args.StandardSave(model),
                                               meta=ocp.args.JsonSave(meta)),
                 metrics={"accuracy": selection_score(key)}, force=True)


class BestCheckpoint:
    """The best epoch of a run, chosen by :func:`improves` and saved with Orbax: the student in
    ``WORKDIR/best`` and Apprentice's joint teacher in ``WORKDIR/joint_teacher/best`` alike.

    The choice is recorded in the run's ``meta`` (checkpointed with it, so a resumed run goes on
    comparing with the same best): ``{prefix}best_accuracy``, ``best_epoch``, ``best_key`` and
    ``best_val_accuracy`` (``prefix`` ``""`` for the student, ``"joint_teacher_"`` for the teacher).
    """

    def __init__(self, workdir: str, prefix: str = ""):
        self.manager = best_manager(workdir)
        self.prefix = prefix

    def consider(self, meta: dict, step: int, epoch: int, key, accuracy: float, val_accuracy: float | None,
                 variables: dict, cfg_dict: dict) -> bool:
        """Saves ``variables`` (``{"params", **state}``) as the best checkpoint if ``key`` beats the
        best in ``meta``; returns whether it did."""
        p = self.prefix
        if not improves(key, best_key_so_far(meta, p)):
            return False
        meta[f"{p}best_accuracy"], meta[f"{p}best_epoch"], meta[f"{p}best_key"] = accuracy, epoch, list(key)
        best_meta = {"epoch": epoch, "accuracy": accuracy, "config": cfg_dict}
        if val_accuracy is not None:
            meta[f"{p}best_val_accuracy"] = best_meta["val_accuracy"] = val_accuracy
        model = {"params": variables["params"], "model_state": {k: v for k, v in variables.items() if k != "params"}}
        save_best(self.manager, step, model, best_meta, key)
        return True

    def wait_until_finished(self) -> None:
        self.manager.wait_until_finished()


def restore_latest(manager: ocp.CheckpointManager, state_template) -> tuple[int, Any, dict, dict] | None:
    """Restores the newest usable checkpoint: ``(step, state, data_state, meta)`` or ``None``.

    ``state_template`` is the state to restore into, or a function ``step -> template`` (the
    optimizer state's structure may depend on the stage the step belongs to).

    A damaged step is reported (warning naming the step) and the next older one is tried;
    if steps exist but none restores, raises :class:`CheckpointError`.
    """
    manager.reload()
    steps = sorted(manager.all_steps(), reverse=True)
    failures = []
    for step in steps:
        try:
            template = state_template(step) if callable(state_template) else state_template
            restored = _restore_run_step(manager, step, keys_lib.to_key_data(template))
        except Exception as e:  # noqa: BLE001 - any failure means "this step is unusable"
            msg = (f"checkpoint step {step} in {manager.directory} is unusable ({type(e).__name__}: "
                   f"{str(e)[:300]}); ")
            msg += "trying an older one" if step != steps[-1] else "no older checkpoint left"
            warnings.warn(msg, RuntimeWarning, stacklevel=2)
            failures.append((step, e))
            continue
        # The run goes on from `step` and will save the newer steps again: keep the damaged
        # ones under another name (only now that a good checkpoint was found).
        for bad, _ in failures:
            moved = _set_aside(manager, bad)
            warnings.warn(f"damaged checkpoint step {bad} moved to {moved}; resuming from step {step}",
                          RuntimeWarning, stacklevel=2)
        manager.reload()
        return step, keys_lib.wrap_like(restored.state, template), restored.data, restored.meta
    if failures:
        raise CheckpointError(
            f"none of the checkpoints in {manager.directory} could be restored "
            f"(steps {[s for s, _ in failures]}); first error: {failures[0][1]}. "
            "Move the directory away to start from scratch.")
    return None


def _restore_run_step(manager: ocp.CheckpointManager, step: int, template):
    """Restores a run checkpoint into ``template``. Checkpoints written before train states had
    ``recipe_state`` restore into a run without recipe state (the field then stays ``{}``)."""
    def restore(item):
        return manager.restore(step, args=ocp.args.Composite(state=ocp.args.StandardRestore(item),
                                                             data=ocp.args.JsonRestore(), meta=ocp.args.JsonRestore()))
    try:
        return restore(template)
    except ValueError as e:
        if getattr(template, "recipe_state", None) != {} or "recipe_state" not in str(e):
            raise
    older = {k: getattr(template, k) for k in ("step", "params", "model_state", "opt_state", "rng")}
    restored = restore(older)
    state = template.replace(**restored.state, recipe_state={})
    return type("Restored", (), {"state": state, "data": restored.data, "meta": restored.meta})


def _set_aside(manager: ocp.CheckpointManager, step: int) -> str:
    """Renames a damaged step's folder so that the run can save that step again (the damaged
    files are kept, under a name Orbax does not list)."""
    src = os.path.join(str(manager.directory), str(step))
    dst = f"{src}.unusable"
    n = 1
    while os.path.exists(dst):
        n += 1
        dst = f"{src}.unusable{n}"
    if jax.process_index() == 0 and os.path.isdir(src):
        os.rename(src, dst)
    return dst


def restore_on_this_process(manager: ocp.CheckpointManager, step: int, item: str) -> tuple[Any, Any]:
    """Restores ``item`` (arrays) and ``meta`` of ``step`` onto this process's first device.

    Works whatever device layout the checkpoint was saved from (8 devices, several
    processes), which a restore without a target refuses; used to load models (teachers,
    exported students), not to resume.
    """
    arrays = manager.item_metadata(step)[item]
    device = jax.sharding.SingleDeviceSharding(jax.local_devices()[0])
    target = jax.tree.map(lambda m: jax.ShapeDtypeStruct(m.shape, m.dtype, sharding=device), arrays)
    r = manager.restore(step, args=ocp.args.Composite(**{item: ocp.args.StandardRestore(target),
                                                         "meta": ocp.args.JsonRestore()}))
    return r[item], r.meta


def load_run_state(workdir: str, step: int | None = None) -> tuple[int, Any]:
    """``(step, state)`` of a run checkpoint (the newest by default) as NumPy arrays.

    The whole train state (student and auxiliary params, batch stats, optimizer state, step,
    RNG), for inspection and comparisons, from any device layout.
    """
    mgr = run_manager(workdir)
    step = mgr.latest_step() if step is None else step
    if step is None:
        raise CheckpointError(f"no run checkpoint in {workdir!r}")
    state, _ = restore_on_this_process(mgr, step, "state")
    return step, jax.tree.map(np.asarray, state)


def _paths(tree) -> dict[str, Any]:
    flat, _ = jax.tree_util.tree_flatten_with_path(tree)
    return {jax.tree_util.keystr(p): v for p, v in flat}


def check_tree_fits(expected, loaded, what: str) -> None:
    """Raises :class:`CheckpointError` naming the first path whose presence or shape differs."""
    exp, got = _paths(expected), _paths(loaded)
    for path in sorted(set(exp) | set(got)):
        if path not in got:
            raise CheckpointError(f"{what}: checkpoint lacks {path} (expected shape {np.shape(exp[path])})")
        if path not in exp:
            raise CheckpointError(f"{what}: checkpoint has {path} that the model does not have")
        if np.shape(exp[path]) != np.shape(got[path]):
            raise CheckpointError(f"{what}: {path} has shape {np.shape(got[path])} in the checkpoint, "
                                  f"the model expects {np.shape(exp[path])}")


def load_model_variables(workdir: str, template_variables: dict, which: str = "best",
                         what: str = "teacher") -> tuple[dict, dict]:
    """Loads ``{"params": ..., **model_state}`` of the student trained in ``workdir``.

    ``which`` is ``"best"`` (the checkpoint the run picked: best validation accuracy with
    ``data.val_fraction``, else best eval-split accuracy) or ``"last"`` (latest run checkpoint).
    The loaded tree is checked against ``template_variables`` (from the model's init); a
    mismatch raises :class:`CheckpointError` naming the first differing path.
    Returns ``(variables, meta)``.
    """
    if which not in ("best", "last"):
        raise ValueError(f"checkpoint choice must be 'best' or 'last'; got {which!r}")
    if not os.path.isdir(workdir):
        raise CheckpointError(f"{what} work dir {workdir!r} does not exist; train the {what} first "
                              f"(jaxkd train --config ... --workdir {workdir})")
    loaded = None
    if which == "best" and os.path.isdir(os.path.join(workdir, "best")):
        mgr = best_manager(workdir)
        for step in sorted(mgr.all_steps(), reverse=True):
            try:
                loaded, meta = restore_on_this_process(mgr, step, "model")
                break
            except Exception as e:  # noqa: BLE001
                warnings.warn(f"best checkpoint step {step} of {what} is unusable: {e}", RuntimeWarning)
    if loaded is None and os.path.isdir(os.path.join(workdir, "checkpoints")):
        mgr = run_manager(workdir)
        for step in sorted(mgr.all_steps(), reverse=True):
            try:
                state, meta = restore_on_this_process(mgr, step, "state")
                loaded = {"params": state["params"]["student"], "model_state": state["model_state"]["student"]}
                break
            except Exception as e:  # noqa: BLE001
                warnings.warn(f"checkpoint step {step} of {what} is unusable: {e}", RuntimeWarning)
    if loaded is None:
        raise CheckpointError(f"no usable checkpoint of the {what} in {workdir!r}")
    variables = {"params": loaded["params"], **(loaded.get("model_state") or {})}
    check_tree_fits(template_variables, variables, f"{what} checkpoint {workdir!r} does not fit the {what} model")
    variables = jax.tree.map(lambda t, v: np.asarray(v, dtype=np.asarray(t).dtype), template_variables, variables)
    return variables, meta
