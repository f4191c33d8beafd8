"""Orbax checkpoints of a run, and loading a teacher from another run's work dir.

Layout of a work dir::

    WORKDIR/checkpoints/<step>/{state,data,meta,checksums}   keep-N latest (for resume)
    WORKDIR/best/<step>/{model,meta,checksums}                 the best eval accuracy (for teachers, export)

``state`` is the whole :class:`~jaxkd.train.step.TrainState` (params incl. auxiliary
modules, batch stats, optimizer state, step, RNG); ``data`` the input iterator's position;
``meta`` the epoch, the metric history and the config. Teachers are never written here.

Every step also holds ``checksums``: a SHA-256 digest of each saved array's bytes (with its
dtype and shape) and of each JSON item (:func:`tree_checksums`, :func:`json_checksum`),
computed from what was saved and compared with what a restore returns
(:func:`verify_checksums`). Restores go newest-to-oldest: Orbax ignores a leftover temporary
save, but a damaged finalised step is still listed, so a step that fails to restore or to
verify is reported and skipped. In a multi-process run every process verifies what it read
and the processes agree (:func:`agree`) before a step is used.
"""

from __future__ import annotations

import collections
import dataclasses
import errno
import hashlib
import json
import os
import shutil
import warnings
from typing import Any

import jax
import numpy as np
import orbax.checkpoint as ocp
from etils import epath

from jaxkd.errors import CheckpointError  # noqa: F401  (re-exported: jaxkd.train.checkpoint.CheckpointError)
from jaxkd.train import keys as keys_lib


def _barriers(directory: str) -> ocp.options.MultiprocessingOptions:
    # Several managers (run, best, a joint teacher's best) may save the same step number at
    # once; in a multi-process run their cross-process barriers need distinct names.
    # (named by the last two path components: the same on every host, unlike absolute paths)
    parts = os.path.normpath(os.path.abspath(directory)).split(os.sep)[-2:]
    return ocp.options.MultiprocessingOptions(barrier_sync_key_prefix="jaxkd." + ".".join(parts))


CHECKSUMS = "checksums"  # the item of a step that holds the digests of its other items
CHECKSUMS_FORMAT = 1


# --------------------------------------------------------------------------------------------
# Checksums
# --------------------------------------------------------------------------------------------


def _host_value(x) -> np.ndarray:
    """The whole value of an array leaf on this host (every process gets the same bytes)."""
    if isinstance(x, jax.Array):
        if jax.dtypes.issubdtype(x.dtype, jax.dtypes.prng_key):
            x = jax.random.key_data(x)  # a typed key is checksummed as its raw key data
        if x.is_fully_addressable:
            return np.asarray(x)
        if x.is_fully_replicated:
            return np.asarray(x.addressable_data(0))
        from jax.experimental import multihost_utils  # sharded over processes: every process joins
        return np.asarray(multihost_utils.process_allgather(x, tiled=True))
    return np.asarray(x)


def array_digest(value) -> str:
    """SHA-256 of an array's dtype, shape and bytes."""
    a = np.ascontiguousarray(_host_value(value))
    h = hashlib.sha256()
    h.update(f"{a.dtype.str}|{a.shape}|".encode())
    h.update(a.reshape(-1).view(np.uint8) if a.size else b"")
    return h.hexdigest()


def tree_checksums(tree) -> dict[str, str]:
    """``{"params/student/fc/kernel": digest, ...}``: :func:`array_digest` of every leaf, keyed by
    its path (attribute, dict and sequence keys alike, so that a tree restored as plain dicts
    gets the same keys as the dataclass it was saved from)."""
    flat, _ = jax.tree_util.tree_flatten_with_path(tree)
    return {jax.tree_util.keystr(p, simple=True, separator="/"): array_digest(v) for p, v in flat}


def json_checksum(obj) -> str:
    """SHA-256 of a JSON item as it reads back (canonical: sorted keys)."""
    text = json.dumps(json.loads(json.dumps(obj)), sort_keys=True)
    return hashlib.sha256(text.encode()).hexdigest()


def checksums_of(step: int, arrays: dict, jsons: dict) -> dict:
    """The ``checksums`` item of a step: ``{"format", "step", "arrays": {item: {path: digest}},
    "json": {item: digest}}``."""
    return {"format": CHECKSUMS_FORMAT, "step": int(step),
            "arrays": {k: tree_checksums(v) for k, v in arrays.items()},
            "json": {k: json_checksum(v) for k, v in jsons.items()}}


def verify_checksums(recorded: dict, arrays: dict, jsons: dict) -> str | None:
    """What differs between the recorded ``checksums`` item and the restored items (``None``:
    everything verified). Only the items passed are checked; every recorded array of them must
    be there and match."""
    for item, tree in arrays.items():
        want = recorded.get("arrays", {}).get(item)
        if want is None:
            return f"no checksums recorded for item {item!r}"
        got = tree_checksums(tree)
        for path in sorted(set(want) | set(got)):
            if path not in got:
                return f"{item}/{path} is recorded but was not restored"
            if path not in want:
                return f"{item}/{path} was restored but has no recorded checksum"
            if got[path] != want[path]:
                return f"{item}/{path} does not match its checksum (saved {want[path]}, read {got[path]})"
    for item, obj in jsons.items():
        want = recorded.get("json", {}).get(item)
        if want is None:
            return f"no checksum recorded for item {item!r}"
        if json_checksum(obj) != want:
            return f"item {item!r} does not match its checksum"
    return None


def agree(problem: str | None) -> str | None:
    """In a multi-process run, whether every process found the step good: the local problem, or
    one naming the other processes that found one (``None`` only if none did). A single process
    returns ``problem`` unchanged."""
    if jax.process_count() == 1:
        return problem
    from jax.experimental import multihost_utils
    bad = np.asarray(multihost_utils.process_allgather(np.asarray([problem is not None], np.int32))).reshape(-1)
    if problem is None and bad.any():
        return f"failed to restore or verify on process(es) {np.flatnonzero(bad).tolist()}"
    return problem


def _sync(name: str) -> None:
    if jax.process_count() > 1:
        from jax.experimental import multihost_utils
        multihost_utils.sync_global_devices(name)


def has_checksums(manager: ocp.CheckpointManager, step: int) -> bool:
    return (epath.Path(manager.directory) / str(step) / CHECKSUMS).exists()


def step_path(manager: ocp.CheckpointManager, step: int) -> str:
    return os.path.join(str(manager.directory), str(step))


def _fault_step(name: str) -> int | None:
    spec = os.environ.get("JAXKD_FAULT", "")
    if spec.startswith(name + ":"):
        return int(spec.split(":", 1)[1])
    return None


class ChecksumsHandler(ocp.JsonCheckpointHandler):
    """Writes a step's ``checksums`` item (JSON). ``JAXKD_FAULT=oserror_during_save:N`` makes the
    write of step ``N`` fail with ``OSError(ENOSPC)`` while the step's arrays are being written
    (a full disk in the middle of an asynchronous save; used by the fault tests)."""

    async def _save_fn(self, x, directory):
        if _fault_step("oserror_during_save") == x.get("step"):
            raise OSError(errno.ENOSPC, f"No space left on device (JAXKD_FAULT) writing {directory}")
        await super()._save_fn(x, directory)


@ocp.args.register_with_handler(ChecksumsHandler, for_save=True)
@dataclasses.dataclass
class ChecksumsSave(ocp.args.JsonSave):
    """Save args of the ``checksums`` item."""


@ocp.args.register_with_handler(ChecksumsHandler, for_restore=True)
@dataclasses.dataclass
class ChecksumsRestore(ocp.args.JsonRestore):
    """Restore args of the ``checksums`` item."""


def run_manager(workdir: str, keep: int = 3) -> ocp.CheckpointManager:
    return ocp.CheckpointManager(
        os.path.join(os.path.abspath(workdir), "checkpoints"),
        options=ocp.CheckpointManagerOptions(max_to_keep=keep, create=True,
                                             multiprocessing_options=_barriers(os.path.join(workdir, "checkpoints"))),
        item_handlers={"state": ocp.StandardCheckpointHandler(), "data": ocp.JsonCheckpointHandler(),
                       "meta": ocp.JsonCheckpointHandler(), CHECKSUMS: ChecksumsHandler()})


def best_manager(workdir: str) -> ocp.CheckpointManager:
    return ocp.CheckpointManager(
        os.path.join(os.path.abspath(workdir), "best"),
        options=ocp.CheckpointManagerOptions(max_to_keep=1, create=True, best_fn=lambda m: m["accuracy"],
                                             best_mode="max", multiprocessing_options=_barriers(os.path.join(workdir, "best"))),
        item_handlers={"model": ocp.StandardCheckpointHandler(), "meta": ocp.JsonCheckpointHandler(),
                       CHECKSUMS: ChecksumsHandler()})


def save_run(manager: ocp.CheckpointManager, step: int, state, data_state: dict, meta: dict) -> None:
    """Saves a run checkpoint (asynchronously) with the checksums of all its items."""
    state = keys_lib.to_key_data(state)  # typed PRNG keys are stored as their raw key data
    sums = checksums_of(step, {"state": state}, {"data": data_state, "meta": meta})
    manager.save(step, args=ocp.args.Composite(
        state=ocp.args.StandardSave(state), data=ocp.args.JsonSave(data_state),
        meta=ocp.args.JsonSave(meta), **{CHECKSUMS: ChecksumsSave(sums)}), force=True)


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
    sums = checksums_of(step, {"model": model}, {"meta": meta})
    manager.save(step, args=ocp.args.Composite(model=ocp.args.StandardSave(model), meta=ocp.args.JsonSave(meta),
                                               **{CHECKSUMS: ChecksumsSave(sums)}),
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

    A step is usable if it restores and everything read matches its recorded checksums (on
    every process). A damaged step is reported (warning naming the step and what failed) and
    the next older one is tried; once a usable one is found the damaged ones are set aside
    (``<step>.unusable``). If steps exist but none is usable, raises :class:`CheckpointError`.
    """
    manager.reload()
    steps = sorted(manager.all_steps(), reverse=True)
    failures = []
    for step in steps:
        template = state_template(step) if callable(state_template) else state_template
        restored, problem = _restore_verified_run_step(manager, step, keys_lib.to_key_data(template))
        if problem is not None:
            msg = f"checkpoint step {step} in {manager.directory} is unusable ({problem}); "
            msg += "trying an older one" if step != steps[-1] else "no older checkpoint left"
            warnings.warn(msg, RuntimeWarning, stacklevel=2)
            failures.append((step, problem))
            continue
        # The run goes on from `step` and will save the newer steps again: keep the damaged
        # ones under another name (only now that a good checkpoint was found).
        for bad, _ in failures:
            moved = _set_aside(manager, bad)
            warnings.warn(f"damaged checkpoint step {bad} moved to {moved}; resuming from step {step}",
                          RuntimeWarning, stacklevel=2)
        _sync("jaxkd.restore_latest.set_aside")
        manager.reload()
        return step, keys_lib.wrap_like(restored.state, template), restored.data, restored.meta
    if failures:
        raise CheckpointError(
            f"none of the checkpoints in {manager.directory} could be restored "
            f"(steps {[s for s, _ in failures]}); first error: {failures[0][1]}. "
            "Move the directory away to start from scratch.")
    return None


def _one_line(e: BaseException, limit: int = 300) -> str:
    return " ".join(str(e).split())[:limit]


def _read_checksums(manager: ocp.CheckpointManager, step: int) -> tuple[dict | None, str | None]:
    """``(recorded checksums or None, problem)``; a step written before checksums existed has
    none (restored unverified, with a warning)."""
    if not has_checksums(manager, step):
        warnings.warn(f"checkpoint {step_path(manager, step)} has no checksums (written by an older jaxkd); "
                      "it is used without verification", RuntimeWarning, stacklevel=3)
        return None, None
    try:
        recorded = manager.restore(step, args=ocp.args.Composite(**{CHECKSUMS: ChecksumsRestore()}))[CHECKSUMS]
    except Exception as e:  # noqa: BLE001
        return None, f"its checksums cannot be read ({type(e).__name__}: {_one_line(e)})"
    if not isinstance(recorded, dict) or recorded.get("step") != step:
        return None, f"its checksums item is not this step's ({str(recorded)[:100]})"
    return recorded, None


def _verified(manager: ocp.CheckpointManager, step: int, restore) -> tuple[Any, str | None]:
    """Runs ``restore() -> (result, arrays, jsons)`` for ``step`` and checks what it read against
    the step's checksums; every process must succeed (:func:`agree`). ``(result, None)`` or
    ``(None, problem)``."""
    try:
        result, arrays, jsons = restore()
        problem = None
    except Exception as e:  # noqa: BLE001 - any failure means "this step is unusable"
        result, problem = None, f"{type(e).__name__}: {_one_line(e)}"
    problem = agree(problem)
    if problem is None:
        recorded, problem = _read_checksums(manager, step)
        problem = agree(problem)
        if problem is None and recorded is not None:
            problem = agree(verify_checksums(recorded, arrays, jsons))
    return (result, None) if problem is None else (None, problem)


def _restore_verified_run_step(manager: ocp.CheckpointManager, step: int, template) -> tuple[Any, str | None]:
    def restore():
        r = _restore_run_step(manager, step, template)
        return r, {"state": r.state}, {"data": r.data, "meta": r.meta}
    return _verified(manager, step, restore)


def newest_verified_step(manager: ocp.CheckpointManager, state_template) -> int | None:
    """The newest step of ``manager`` that restores and verifies (``None`` if none): the
    checkpoint a message may call "the last good checkpoint". Waits for saves in flight."""
    manager.wait_until_finished()
    manager.reload()
    for step in sorted(manager.all_steps(), reverse=True):
        template = state_template(step) if callable(state_template) else state_template
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", RuntimeWarning)
            _, problem = _restore_verified_run_step(manager, step, keys_lib.to_key_data(template))
        if problem is None:
            return step
    return None


def discard_steps_after(manager: ocp.CheckpointManager, step: int) -> list[int]:
    """Deletes the steps of ``manager`` newer than ``step`` (a resumed run saves them again);
    returns them. Each is first renamed (atomically), so a kill leaves no half-deleted step
    that Orbax would list."""
    manager.wait_until_finished()
    manager.reload()
    newer = sorted(s for s in manager.all_steps() if s > step)
    if newer and jax.process_index() == 0:
        for s in newer:
            src = step_path(manager, s)
            dst = f"{src}.discarded"
            if os.path.exists(dst):
                shutil.rmtree(dst)
            os.rename(src, dst)
            shutil.rmtree(dst, ignore_errors=True)
    _sync(f"jaxkd.discard.{os.path.basename(str(manager.directory))}")
    manager.reload()
    return newer


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
    """Restores ``item`` (arrays) and ``meta`` of ``step`` onto this process's first device and
    verifies them against the step's checksums.

    Works whatever device layout the checkpoint was saved from (8 devices, several
    processes), which a restore without a target refuses; used to load models (teachers,
    exported students), not to resume. A step that fails to restore or to verify raises
    :class:`CheckpointError` naming its folder.
    """
    def restore():
        arrays = manager.item_metadata(step)[item]
        device = jax.sharding.SingleDeviceSharding(jax.local_devices()[0])
        target = jax.tree.map(lambda m: jax.ShapeDtypeStruct(m.shape, m.dtype, sharding=device), arrays)
        r = manager.restore(step, args=ocp.args.Composite(**{item: ocp.args.StandardRestore(target),
                                                             "meta": ocp.args.JsonRestore()}))
        return (r[item], r.meta), {item: r[item]}, {"meta": r.meta}
    result, problem = _verified(manager, step, restore)
    if problem is not None:
        raise CheckpointError(f"checkpoint {step_path(manager, step)} is damaged: {problem}")
    return result


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


_LAST_HINT = collections.defaultdict(
    lambda: "load the latest run checkpoint with checkpoint 'last' instead",
    teacher="set teacher.checkpoint=last to distil from the latest run checkpoint instead",
    student="pass --checkpoint last to use the latest run checkpoint instead")


def load_model_variables(workdir: str, template_variables: dict, which: str = "best",
                         what: str = "teacher") -> tuple[dict, dict]:
    """Loads ``{"params": ..., **model_state}`` of the student trained in ``workdir``.

    ``which`` is ``"best"`` (the checkpoint the run picked: best validation accuracy with
    ``data.val_fraction``, else best eval-split accuracy; a missing or damaged one is an error,
    never replaced by another checkpoint) or ``"last"`` (the newest run checkpoint that
    verifies).
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
    if which == "best":
        # The best checkpoint or an error: never another checkpoint in its place (a run asked to
        # distil from the best teacher must not distil from a different one).
        best_dir = os.path.join(workdir, "best")
        mgr = best_manager(workdir) if os.path.isdir(best_dir) else None
        steps = sorted(mgr.all_steps()) if mgr is not None else []
        if not steps:
            raise CheckpointError(f"no best checkpoint of the {what} in {best_dir!r} (the run has not finished an "
                                  f"eval epoch); {_LAST_HINT[what]}")
        try:
            loaded, meta = restore_on_this_process(mgr, steps[-1], "model")
        except CheckpointError as e:
            raise CheckpointError(f"the best checkpoint of the {what} is unusable: {e}; retrain it, or "
                                  f"{_LAST_HINT[what]}") from None
    elif os.path.isdir(os.path.join(workdir, "checkpoints")):
        mgr = run_manager(workdir)
        for step in sorted(mgr.all_steps(), reverse=True):
            try:
                state, meta = restore_on_this_process(mgr, step, "state")
                loaded = {"params": state["params"]["student"], "model_state": state["model_state"]["student"]}
                break
            except CheckpointError as e:
                warnings.warn(f"checkpoint step {step} of {what} is unusable: {e}; trying an older one",
                              RuntimeWarning)
    if loaded is None:
        raise CheckpointError(f"no usable checkpoint of the {what} in {workdir!r}")
    variables = {"params": loaded["params"], **(loaded.get("model_state") or {})}
    check_tree_fits(template_variables, variables, f"{what} checkpoint {workdir!r} does not fit the {what} model")
    variables = jax.tree.map(lambda t, v: np.asarray(v, dtype=np.asarray(t).dtype), template_variables, variables)
    return variables, meta
