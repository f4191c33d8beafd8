"""Building a teacher-output cache: ``jaxkd cache-teacher`` (see :mod:`jaxkd.train.teacher_cache`
for the format and how training reads it).

:func:`build_teacher_cache` reads as its steps: check the options (:func:`_options`), build the
data, the teacher and its data-parallel forward from the run setup (:func:`_teacher_forward`), write
the manifest (:func:`_manifest`), compute and write every view's rows into memory-mapped files
that a killed build resumes (:func:`_write_rows`, :class:`_PartialBuild`), then finish (sort by
id, move into place, manifest last).
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import json
import os
import shutil
import sys
import time
from typing import Mapping

import jax
import jax.numpy as jnp
import numpy as np

from jaxkd import data as data_lib
from jaxkd._xla_defaults import _jaxlib_version, eval_compiler_options
from jaxkd.errors import ConfigError
from jaxkd.train import setup as setup_lib
from jaxkd.train import step as step_lib
from jaxkd.train.teacher_cache import (CACHE_FORMAT, IDS, INDICES, LOGITS, MANIFEST, MASS, PROGRESS, REST,
                                       TOPK_FORMAT, BUILDING, _index_dtype, checkpoint_identity, file_checksum, data_identity,
                                       teacher_temperatures, topk_compress, topk_mass, variables_hash, view_params)

__all__ = ["build_teacher_cache"]


@dataclasses.dataclass(frozen=True)
class _Options:
    num_views: int
    view_seed: int
    dtype: str
    top_k: int | None
    temperature: float | None
    teacher_workdir: str
    augmentation: dict


def build_teacher_cache(config, teacher_workdir: str | None, out_path: str, *, batch_size: int | None = None,
                        progress: bool = False, num_views: int | None = None, view_seed: int = 0,
                        dtype: str = "float32", top_k: int | None = None,
                        temperature: float | None = None, save_every_s: float = 30.0,
                        on_batch=None) -> dict:
    """Runs ``config.teacher`` once over ``config.data``'s training split; returns the manifest.

    ``teacher_workdir`` defaults to ``config.teacher.workdir`` (one teacher); the checkpoint
    is ``config.teacher.checkpoint``. Batches of ``batch_size`` (default
    ``config.data.eval_batch_size``); the last one padded and its padding dropped. Each batch is
    split over this host's devices (``config.train.num_devices``, default all) as in training,
    so ``batch_size`` must be divisible by their number; one process builds the cache.

    The manifest records: ``teacher`` (work dir, checkpoint kind/step/fingerprint, sha256 of
    the variables, model name and kwargs, its eval accuracy), ``data`` (name, split, subset:
    :func:`~jaxkd.train.teacher_cache.data_identity`, plus ``num_examples``), ``normalisation``
    (mean, std), ``augmentation`` (the run's ``{"pad", "flip"}``, from ``config.data.augment`` or
    the data set's default), ``num_views``, ``view_seed``, ``logits`` (dtype, shape) and the file
    names.

    ``num_views``: how many augmented views of each example to store when the config augments
    (required then: it multiplies the teacher's work and the cache's size); without
    augmentation only 1 is allowed (every view would be the same image). ``view_seed`` picks
    the views' crops and flips.

    ``dtype="float16"`` stores the logits in half the space (for large data sets with many
    views: ImageNet x 8 views x 1000 classes is 41 GB in float32). They are rounded to about 3
    significant digits; the manifest records the largest absolute rounding error, and a cache
    whose logits would overflow float16 is refused. Lookups return float32 either way.

    ``top_k=k`` stores only the ``k`` largest logits of each row and one logit for the other
    classes (:func:`~jaxkd.train.teacher_cache.topk_compress`): ``6k + 4`` bytes a row instead of
    ``4C``. The rest logit is computed at ``temperature`` (default: the temperature at which the
    config's method reads the teacher, ``Recipe.teacher_temperature``, i.e. Hinton KD's ``T``), and
    a run must distil at that temperature. The manifest records ``top_k``, ``temperature`` and how
    much probability the top ``k`` classes hold at that temperature (``top_k_mass`` min/mean).

    The rows are written to memory-mapped files under ``OUT/.building`` as they are computed,
    with a progress record every ``save_every_s`` seconds and after each view: a build that
    is interrupted (killed, out of time) and started again with the same arguments continues
    from that record, and gives the same cache as an uninterrupted one. ``on_batch(view, row)``
    is called after each batch's rows are written (a hook for fault-injection tests).
    """
    opts = _options(config, teacher_workdir, num_views, view_seed, dtype, top_k, temperature)
    if jax.process_count() > 1:
        raise ConfigError("a teacher cache is built by one process (over all of its host's devices); "
                          "run `jaxkd cache-teacher` once, without --coordinator/--num-processes")
    data = setup_lib.build_data(config)  # the examples the student trains on, and its pipeline
    mesh = step_lib.make_mesh(config.train.num_devices)
    batch_size = int(batch_size or config.data.eval_batch_size)
    if batch_size % mesh.size:
        raise ConfigError(f"the cache's batch size {batch_size} (--batch-size, default "
                          f"data.eval_batch_size) must be divisible by the number of devices ({mesh.size})")
    forward, variables, meta = _teacher_forward(config, opts, data, mesh)
    n, c = len(data.train), data.info.num_classes
    if opts.top_k is not None and opts.top_k >= c:
        raise ConfigError(f"top_k={opts.top_k} keeps every one of the {c} classes; store the full logits "
                          "(leave top_k unset) instead")
    manifest = _manifest(config, opts, data, variables, meta, checkpoint_identity(opts.teacher_workdir,
                                                                                  config.teacher.checkpoint))
    store_dtype = np.dtype(opts.dtype)
    shapes = {LOGITS: ((n, opts.num_views, opts.top_k or c), store_dtype), IDS: ((n,), np.int64)}
    if opts.top_k:
        shapes.update({INDICES: ((n, opts.num_views, opts.top_k), _index_dtype(c)),
                       REST: ((n, opts.num_views), store_dtype), MASS: ((n, opts.num_views), np.float64)})
    # An interrupted build started again with the same plan (everything in the manifest, the batch
    # size, the devices, the jax version and compiler settings) continues from its last record.
    plan = json.dumps({"manifest": manifest, "batch_size": batch_size, "devices": mesh.size,
                       "device_kind": [mesh.devices.flat[0].platform, mesh.devices.flat[0].device_kind],
                       "jax": [jax.__version__, _jaxlib_version()], "compiler_options": eval_compiler_options(),
                       "xla_flags": os.environ.get("XLA_FLAGS", "")}, sort_keys=True)
    work = _PartialBuild(os.path.join(out_path, BUILDING), hashlib.sha256(plan.encode()).hexdigest(), shapes)
    if work.view or work.row or work.finishing:
        where = "its last step" if work.finishing else f"view {work.view}, row {work.row} of {n}"
        print(f"jaxkd: resuming the unfinished cache build in {work.folder} at {where}", file=sys.stderr, flush=True)
    if not work.finishing:
        _write_rows(work, forward, variables, data, mesh, opts, batch_size, progress, save_every_s, on_batch)
        manifest = _final_manifest(manifest, work, opts, n)
    else:  # the rows were complete and sorted before: only the moves into OUT were left
        manifest = work.record["manifest"]
    return work.finish(out_path, [name for name in (LOGITS, INDICES, REST) if name in shapes] + [IDS], manifest)


def _options(config, teacher_workdir, num_views, view_seed, dtype, top_k, temperature) -> _Options:
    """The build's options, checked (each problem a one-line ConfigError)."""
    if dtype not in ("float32", "float16"):
        raise ConfigError(f"dtype must be 'float32' or 'float16'; got {dtype!r}")
    aug = setup_lib.augmentation(config, config.data.name)
    augmented = bool(aug["pad"] or aug["flip"])
    if augmented and num_views is None:
        raise ConfigError(
            f"the config augments ({aug}, from data.augment or the data set's default): pass num_views "
            "(`jaxkd cache-teacher --views K`) to store K augmented views of every example, or cache the "
            "un-augmented view for runs with data.augment={}")
    num_views = 1 if num_views is None else num_views
    if isinstance(num_views, bool) or not isinstance(num_views, int) or num_views < 1:
        raise ConfigError(f"num_views must be a positive int; got {num_views!r}")
    if num_views > 1 and not augmented:
        raise ConfigError(f"num_views={num_views} needs augmentation (data.augment with pad or flip); "
                          "without it every view is the same image")
    if isinstance(view_seed, bool) or not isinstance(view_seed, int):
        raise ConfigError(f"view_seed must be an int; got {view_seed!r}")
    if top_k is not None:
        if isinstance(top_k, bool) or not isinstance(top_k, int) or top_k < 1:
            raise ConfigError(f"top_k must be a positive int; got {top_k!r}")
        if temperature is None:
            temps = sorted({t for t in teacher_temperatures(setup_lib.config_recipes(config)) if t is not None})
            if len(temps) != 1:
                raise ConfigError(
                    "a top-k cache is made for one distillation temperature; the config's method(s) give "
                    f"{'none' if not temps else temps}: pass temperature (--temperature T)")
            temperature = temps[0]
        if isinstance(temperature, bool) or not isinstance(temperature, (int, float)) or not temperature > 0:
            raise ConfigError(f"temperature must be a number > 0; got {temperature!r}")
        temperature = float(temperature)
    elif temperature is not None:
        raise ConfigError("temperature only applies to a top-k cache (top_k / --top-k)")
    teacher_workdir = teacher_workdir or config.teacher.workdir
    if not isinstance(teacher_workdir, str) or not teacher_workdir:
        raise ConfigError("a teacher cache needs one teacher: set config.teacher.workdir "
                          "(a list of teachers or config.teachers is not supported)")
    if config.get("teachers") is not None:
        raise ConfigError("config.teachers is set; a teacher cache holds one teacher's logits")
    return _Options(num_views, view_seed, dtype, top_k, temperature, os.path.abspath(teacher_workdir), aug)


def _teacher_forward(config, opts: _Options, data, mesh):
    """``(forward, variables, meta)``: the teacher loaded as the train loop loads it (e.g. stored in
    bfloat16 for ``teacher.kwargs.dtype=bfloat16``, so the cached logits are the live teacher's),
    and its jitted forward on the student's training view, split over ``mesh``."""
    teacher = setup_lib.create_model(config.teacher, "teacher", data.info.num_classes)
    variables, meta = setup_lib.load_teacher(config, teacher, setup_lib.sample_input(data.info),
                                             workdir=opts.teacher_workdir)
    pipeline = data.pipeline

    @functools.partial(jax.jit, compiler_options=eval_compiler_options(),
                       in_shardings=(step_lib.replicated(mesh),) + (step_lib.data_sharding(mesh),) * 3,
                       out_shardings=step_lib.data_sharding(mesh))
    def forward(variables, images, offsets, flips):
        # the student's training view: the stored crop/flip (none without augmentation), normalised;
        # the teacher in eval mode
        x = pipeline(None, images, train=True, crop_flip=(offsets, flips))
        logits, _, _ = teacher.apply(variables, x, train=False)
        return logits.astype(jnp.float32)

    return forward, jax.device_put(variables, step_lib.replicated(mesh)), meta


def _manifest(config, opts: _Options, data, variables, meta, identity) -> dict:
    info, n = data.info, len(data.train)
    logits_info = {"dtype": opts.dtype}
    if opts.top_k:
        logits_info.update(top_k=opts.top_k, temperature=opts.temperature, num_classes=info.num_classes,
                           indices_file=INDICES, rest_file=REST)
    return {
        "format": TOPK_FORMAT if opts.top_k else CACHE_FORMAT,
        "teacher": {"workdir": opts.teacher_workdir, "checkpoint": config.teacher.checkpoint, **identity,
                    "variables_sha256": variables_hash(variables), "name": config.teacher.name,
                    "kwargs": json.loads(json.dumps(dict(config.teacher.kwargs))),
                    "accuracy": (meta or {}).get("accuracy")},
        "data": {**data_identity(config), "num_examples": n, "num_classes": info.num_classes,
                 "input_shape": list(info.input_shape)},
        "normalisation": {"mean": list(info.mean), "std": list(info.std)},
        "augmentation": dict(opts.augmentation),
        "num_views": opts.num_views,
        "view_seed": opts.view_seed,
        "logits": {**logits_info, "shape": [n, opts.num_views, opts.top_k or info.num_classes], "file": LOGITS,
                   "ids_file": IDS},
    }


def _write_rows(work, forward, variables, data, mesh, opts: _Options, batch_size: int, progress: bool,
                save_every_s: float, on_batch) -> None:
    """Computes the teacher's logits for every view and example still missing, into ``work``."""
    n, c, arrays = len(data.train), data.info.num_classes, work.arrays
    store_dtype = np.dtype(opts.dtype)
    bar = None
    if progress:
        from tqdm.auto import tqdm
        bar = tqdm(total=n * opts.num_views, initial=min(work.view * n + work.row, n * opts.num_views),
                   desc=f"teacher logits ({opts.num_views} view{'s' * (opts.num_views > 1)})", unit="img",
                   unit_scale=True, dynamic_ncols=True)
    last_save = time.monotonic()
    for view in range(work.view, opts.num_views):
        first = work.row // batch_size if view == work.view else 0
        row = first * batch_size
        for batch in data_lib.eval_batches(data.train, batch_size, start_batch=first):
            k = int(batch["mask"].sum())
            offsets, flips = view_params(batch["id"], view, seed=opts.view_seed, **opts.augmentation)
            inputs = step_lib.shard_batch({"image": batch["image"], "offsets": offsets, "flips": flips}, mesh)
            out = np.asarray(forward(variables, inputs["image"], inputs["offsets"], inputs["flips"]))[:k]
            rows = slice(row, row + k)
            with np.errstate(over="ignore"):  # float16 overflow is refused just below
                if opts.top_k:
                    vals, idx, rst = topk_compress(out, opts.top_k, opts.temperature)
                    arrays[LOGITS][rows, view], arrays[INDICES][rows, view], arrays[REST][rows, view] = vals, idx, rst
                    arrays[MASS][rows, view] = topk_mass(vals, rst, c, opts.temperature)
                    written = ((vals, arrays[LOGITS][rows, view]), (rst, arrays[REST][rows, view]))
                else:
                    arrays[LOGITS][rows, view] = out
                    written = ((out, arrays[LOGITS][rows, view]),)
            for exact, stored in written:
                if exact.size:
                    work.largest = max(work.largest, float(np.abs(exact).max()))
                    work.rounding = max(work.rounding, float(np.abs(np.asarray(stored, np.float64) - exact).max()))
            if store_dtype == np.float16 and not work.largest < float(np.finfo(np.float16).max):
                raise ValueError(f"the teacher's logits reach {work.largest:g}, beyond float16's range; "
                                 "keep dtype float32")
            arrays[IDS][rows] = batch["id"][:k]
            row += k
            if on_batch is not None:  # fault injection in tests: after the rows, before the progress record
                on_batch(view, row)
            if bar is not None:
                bar.update(k)
            if time.monotonic() - last_save >= save_every_s:
                work.save(view, row)
                last_save = time.monotonic()
        work.save(view + 1, 0)
    if bar is not None:
        bar.close()


def _final_manifest(manifest: dict, work, opts: _Options, n: int) -> dict:
    """The manifest with what only the finished rows tell: float16 rounding, top-k mass."""
    logits_info = {k: v for k, v in manifest["logits"].items() if k not in ("shape", "file", "ids_file")}
    if opts.dtype == "float16":
        logits_info["max_abs_rounding"] = work.rounding
    if opts.top_k:
        mass = work.arrays[MASS]
        logits_info["top_k_mass"] = {"min": float(mass.min()) if n else None,
                                     "mean": float(mass.mean()) if n else None}
        del mass
    return {**manifest, "logits": {**logits_info, "shape": manifest["logits"]["shape"], "file": LOGITS,
                                   "ids_file": IDS}}


class _PartialBuild:
    """The memory-mapped arrays of a cache being built, under ``OUT/.building``, and its progress
    record (``progress.json``: the plan's hash, the next view and row, the running float16
    statistics; once the rows are complete, ``finishing`` and the manifest). Opening resumes when
    the record's plan hash matches, else starts afresh.

    Finishing is two phases, each safe to interrupt: (1) inside ``.building``, the rows are
    sorted by id into ``sorted_*`` files when the split was not read in id order (the sources stay
    as they are until the record says ``finishing``), then the record is saved with the final
    manifest; (2) the files are moved into OUT (a move already done is skipped), the manifest is
    written, and ``.building`` is removed. A rerun after a crash in (1) redoes (1) from the
    rows; after a crash in (2), it only completes (2)."""

    def __init__(self, folder: str, plan_hash: str, shapes: Mapping[str, tuple]):
        self.folder, self.plan_hash = folder, plan_hash
        self.view = self.row = 0
        self.largest = self.rounding = 0.0
        self.finishing, self.record, self.arrays = False, {}, {}
        record = None
        try:
            with open(os.path.join(folder, PROGRESS)) as f:
                record = json.load(f)
        except (OSError, ValueError):
            pass
        if record is not None and record.get("plan") == plan_hash and record.get("finishing"):
            self.finishing, self.record = True, record
            return
        resume = record is not None and record.get("plan") == plan_hash
        if resume:
            try:
                self.arrays = {name: np.lib.format.open_memmap(os.path.join(folder, name), mode="r+")
                               for name in shapes}
                resume = all(a.shape == shape and a.dtype == np.dtype(dt)
                             for a, (shape, dt) in zip(self.arrays.values(), shapes.values()))
            except (OSError, ValueError):
                resume = False
        if resume:
            self.record = record
            self.view, self.row = int(record["view"]), int(record["row"])
            self.largest, self.rounding = float(record["largest"]), float(record["rounding"])
            return
        self.arrays = {}
        shutil.rmtree(folder, ignore_errors=True)
        os.makedirs(folder)
        self.arrays = {name: np.lib.format.open_memmap(os.path.join(folder, name), mode="w+", dtype=dt, shape=shape)
                       for name, (shape, dt) in shapes.items()}

    def _write_record(self, record: dict) -> None:
        tmp = os.path.join(self.folder, f"{PROGRESS}.tmp{os.getpid()}")
        with open(tmp, "w") as f:
            json.dump(record, f)
        os.replace(tmp, os.path.join(self.folder, PROGRESS))
        self.record = record

    def save(self, view: int, row: int) -> None:
        for a in self.arrays.values():
            a.flush()
        self._write_record({"plan": self.plan_hash, "view": view, "row": row, "largest": self.largest,
                            "rounding": self.rounding})
        self.view, self.row = view, row

    def finish(self, out_path: str, names: list[str], manifest: dict) -> dict:
        """Puts the rows, sorted by id, and then the manifest (with the files' checksums) into
        ``out_path``; returns the manifest."""
        if not self.finishing:
            ids = np.array(self.arrays[IDS])
            order = np.argsort(ids, kind="stable")
            if np.any(np.diff(ids[order]) == 0):
                raise ValueError("the training split has duplicate example ids; a cache keyed by id cannot serve it")
            in_order = bool(np.all(order == np.arange(len(ids))))
            for name in names:
                src = self.arrays[name]
                src.flush()
                if in_order:  # the usual case: the split is read in id order; the files are final
                    continue
                tmp = os.path.join(self.folder, f"sorted_{name}.tmp")
                dst = np.lib.format.open_memmap(tmp, mode="w+", dtype=src.dtype, shape=src.shape)
                for lo in range(0, len(order), 65536):
                    dst[lo:lo + 65536] = src[order[lo:lo + 65536]]
                dst.flush()
                del dst
                os.replace(tmp, os.path.join(self.folder, f"sorted_{name}"))
            src = None
            self.arrays = {}  # closes the memory maps (the caller holds none)
            prefix = "" if in_order else "sorted_"
            manifest = {**manifest, "checksums": {name: file_checksum(os.path.join(self.folder, prefix + name))
                                                  for name in names}}
            self._write_record({**self.record, "plan": self.plan_hash, "finishing": True, "sorted": not in_order,
                                "manifest": manifest})
        else:
            manifest = self.record["manifest"]
        prefix = "sorted_" if self.record.get("sorted") else ""
        final = os.path.join(out_path, MANIFEST)
        if os.path.exists(final):  # files of an older cache are about to be replaced: it is no longer whole
            os.remove(final)
        for stale in (INDICES, REST):  # a dense cache rebuilt over a top-k one (or back) leaves nothing behind
            if stale not in names and os.path.exists(os.path.join(out_path, stale)):
                os.remove(os.path.join(out_path, stale))
        for name in names:
            src = os.path.join(self.folder, prefix + name)
            if os.path.exists(src):  # else moved by an earlier, interrupted finish
                os.replace(src, os.path.join(out_path, name))
        tmp = os.path.join(out_path, f"{MANIFEST}.tmp{os.getpid()}")
        with open(tmp, "w") as f:
            json.dump(manifest, f, indent=2)
        os.replace(tmp, final)  # after the files: a cache without it is incomplete
        shutil.rmtree(self.folder, ignore_errors=True)  # a leftover .building is cleared by the next build
        return manifest


