"""Teacher-output cache: the frozen teacher's logits computed once, keyed by example id.

``build_teacher_cache(config, teacher_workdir, out_path)`` runs the teacher (inference mode)
once per stored view over the training split, on the input the student trains on (the
image, cropped/flipped as the view says when the run augments, normalised with the data set's
mean/std). It writes a folder::

    OUT/logits.npy      float32 (or float16) [N, V, C]: row i holds the logits of example ids[i]
    OUT/ids.npy         int64 [N], sorted ascending (the ``id`` of ``train_batches``)
    OUT/manifest.json   what the cache was made from (see :func:`build_teacher_cache`)

With ``top_k=k`` (``jaxkd cache-teacher --top-k k``) the cache keeps, per example and view,
only the ``k`` largest logits and one "rest" logit shared by the other ``C - k`` classes (see
:func:`topk_compress`)::

    OUT/logits.npy      float32/float16 [N, V, k]: the k largest logits, largest first
    OUT/indices.npy     int16 (int32 if C > 32767) [N, V, k]: their classes
    OUT/rest.npy        float32/float16 [N, V]: the logit every other class gets back

Lookups expand a row back to ``C`` logits (:func:`topk_expand`) whose softmax at the cache's
temperature ``T`` is the teacher's on the ``k`` classes, with the remaining probability spread
evenly over the rest: FKD's "marginal smoothing" soft labels (Shen & Xing, ECCV 2022), written
as logits so that the unchanged Hinton loss reads them. A top-k cache only serves recipes that
read the teacher's softmax at that ``T`` (``Recipe.teacher_temperature``).

``V`` is the number of views per example. Without augmentation (``data.augment={}``, the
default for everything but CIFAR) there is one view, the un-augmented image. For a run that
augments (random crop with padding, flip), ``num_views=K`` stores K augmented views of every
example: view ``v`` of example ``id`` is a fixed crop offset and flip drawn from a counter-based
hash of ``(view_seed, id, v)`` (:func:`view_params`), so the teacher's logits for it can be
looked up later without storing the crop. Training reads the cache with ``teacher.cache=OUT``:
for each batch the loop picks, per example and epoch, one of its K views (:func:`choose_views`,
a hash of ``(view_seed, id, epoch)``: deterministic, so a resumed run sees the same views),
looks up those rows by ``batch["id"]`` on the host (:meth:`TeacherCache.lookup`) and passes the
view's crop offset and flip with the batch (``aug_offsets``, ``aug_flips``). The step then
augments the student's input with exactly that crop and flip instead of random ones, and uses
the rows as ``teacher_logits``; the teacher is never loaded. Over E epochs an example is seen in
at most K different crops instead of E random ones: this is the trade the cache makes (the
same one as FKD-style stored soft labels), and K sets it.

Why keyed by id: the old peterliht/knowledge-distillation-pytorch cache was a list indexed
by batch number, so once batches were shuffled (or augmented) each batch met another
batch's outputs. Here the row is found from the example's own id, whatever the order, and
the cache refuses (:class:`~jaxkd.config.ConfigError` naming the difference) to serve a
different teacher checkpoint or model, data set, split, subset, normalisation, or
augmentation (a run that augments needs a cache of augmented views with the same pad/flip).

Format: plain ``.npy`` + JSON rather than array_record/tfds. The logits are one dense
float array; a batch lookup is one vectorised fancy index into a memory-mapped ``.npy``
(no per-record decoding, no TensorFlow), and the ids are a sorted array searched with
``np.searchsorted``. An array_record file would need one serialised record per example and
a separate id index to give the same random access.
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import json
import os
import shutil
import time
from typing import Any, Mapping

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from jaxkd import config as config_lib
from jaxkd._xla_defaults import _jaxlib_version, eval_compiler_options
from jaxkd import data as data_lib
from jaxkd import models as models_lib
from jaxkd.train import checkpoint as ckpt_lib
from jaxkd.train import step as step_lib

CACHE_FORMAT = 1        # dense logits
TOPK_FORMAT = 2         # top-k logits + rest (older jaxkd versions refuse it instead of misreading it)
MANIFEST, LOGITS, IDS = "manifest.json", "logits.npy", "ids.npy"
INDICES, REST = "indices.npy", "rest.npy"
BUILDING, PROGRESS, MASS = ".building", "progress.json", "top_k_mass.npy"  # an unfinished build


# --------------------------------------------------------------------------------------------
# Top-k storage
# --------------------------------------------------------------------------------------------


def topk_compress(logits, k: int, temperature: float) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """``logits [..., C]`` -> ``(values [..., k], indices [..., k], rest [...])``, float64/int64.

    ``values``/``indices`` are the ``k`` largest logits and their classes, largest first (ties
    broken by the lower class). ``rest`` is the one logit that, given to each of the other
    ``C - k`` classes, leaves the softmax's normaliser at temperature ``T`` unchanged::

        rest = T * (logsumexp(z_rest / T) - log(C - k))

    so that ``softmax(topk_expand(...) / T)`` equals ``softmax(z / T)`` on the top ``k`` classes
    exactly and spreads the remaining mass evenly over the others. At any other temperature the
    top-k probabilities are only approximate. ``k`` must be in ``[1, C)``.
    """
    z = np.asarray(logits, np.float64)
    c = z.shape[-1]
    if isinstance(k, bool) or not isinstance(k, (int, np.integer)) or not 1 <= k < c:
        raise ValueError(f"top_k must be an int in [1, {c}) for {c} classes; got {k!r} (store all logits instead)")
    if not temperature > 0:
        raise ValueError(f"temperature must be > 0; got {temperature!r}")
    order = np.argsort(-z, axis=-1, kind="stable")
    indices = order[..., :k]
    values = np.take_along_axis(z, indices, axis=-1)
    others = np.take_along_axis(z, order[..., k:], axis=-1) / temperature
    top = others.max(axis=-1, keepdims=True)
    lse = top[..., 0] + np.log(np.exp(others - top).sum(axis=-1))
    rest = temperature * (lse - np.log(c - k))
    return values, indices.astype(np.int64), rest


def topk_expand(values, indices, rest, num_classes: int) -> np.ndarray:
    """The dense logits ``[..., C]`` (float32) of a top-k row: ``rest`` everywhere, ``values``
    at ``indices`` (the inverse of :func:`topk_compress` on the top ``k`` classes)."""
    values = np.asarray(values, np.float32)
    out = np.repeat(np.asarray(rest, np.float32)[..., None], num_classes, axis=-1)
    np.put_along_axis(out, np.asarray(indices, np.int64), values, axis=-1)
    return out


def topk_mass(values, rest, num_classes: int, temperature: float) -> np.ndarray:
    """How much probability the stored top ``k`` classes hold at ``temperature`` (per row)."""
    values, rest = np.asarray(values, np.float64) / temperature, np.asarray(rest, np.float64) / temperature
    top = values.max(axis=-1)
    log_top = top + np.log(np.exp(values - top[..., None]).sum(axis=-1))
    log_rest = rest + np.log(num_classes - values.shape[-1])
    return 1.0 / (1.0 + np.exp(log_rest - log_top))


def _index_dtype(num_classes: int):
    return np.int16 if num_classes <= np.iinfo(np.int16).max else np.int32


def teacher_temperatures(recipes) -> list[float | None]:
    """``Recipe.teacher_temperature`` of each recipe that uses the teacher (``None``: undeclared)."""
    return [r.teacher_temperature for r in recipes if r.uses_teacher]


def config_recipes(config) -> list:
    """The recipes of the config's stages (``config.stages``, else ``config.method``)."""
    from jaxkd.train.loop import resolve_stages
    from jaxkd.train.recipes import build_recipe

    return [build_recipe(config_lib.method_options(st.method)) for st in resolve_stages(config, 1)]


# --------------------------------------------------------------------------------------------
# Stored views
# --------------------------------------------------------------------------------------------


def _mix64(x: np.ndarray) -> np.ndarray:
    """splitmix64's finaliser on uint64 arrays (wrapping arithmetic): a counter-based hash."""
    x = np.asarray(x, np.uint64) + np.uint64(0x9E3779B97F4A7C15)
    x = (x ^ (x >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
    x = (x ^ (x >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
    return x ^ (x >> np.uint64(31))


def _hash3(a: int, b, c) -> np.ndarray:
    with np.errstate(over="ignore"):
        h = _mix64(np.uint64(a & 0xFFFFFFFFFFFFFFFF))
        h = _mix64(h ^ np.asarray(b, np.int64).astype(np.uint64))
        return _mix64(h ^ np.asarray(c, np.int64).astype(np.uint64))


def view_params(ids, views, *, seed: int, pad: int, flip: bool) -> tuple[np.ndarray, np.ndarray]:
    """The crop and flip of stored view ``views[i]`` of example ``ids[i]``.

    Returns ``(offsets int32 (B, 2), flips bool (B,))`` in the convention of
    :func:`jaxkd.data.augment.apply_crop_flip`: each offset in ``[0, 2 * pad]``, uniform; each
    flip a fair coin when ``flip`` (else False). A pure function of ``(seed, id, view)``.
    """
    ids = np.asarray(ids, np.int64).reshape(-1)
    h = _hash3(seed, ids, np.broadcast_to(np.asarray(views, np.int64), ids.shape))
    span = np.uint64(2 * pad + 1)
    offsets = np.stack([h % span, (h >> np.uint64(21)) % span], axis=-1).astype(np.int32)
    flips = ((h >> np.uint64(42)) & np.uint64(1)).astype(bool) if flip else np.zeros(ids.shape, bool)
    return offsets, flips


def choose_views(ids, epoch: int, num_views: int, *, seed: int) -> np.ndarray:
    """Which of its ``num_views`` stored views example ``ids[i]`` is trained on in ``epoch``."""
    ids = np.asarray(ids, np.int64).reshape(-1)
    if num_views == 1:
        return np.zeros(ids.shape, np.int64)
    # a different stream from view_params' (seed ^ constant), so view choice and crop are unrelated
    return (_hash3(seed ^ 0x5EED5EED, ids, epoch) % np.uint64(num_views)).astype(np.int64)


# --------------------------------------------------------------------------------------------
# Identity of the things a cache depends on
# --------------------------------------------------------------------------------------------


def variables_hash(variables) -> str:
    """sha256 over the teacher's variables (paths, dtypes, shapes and bytes, in path order)."""
    h = hashlib.sha256()
    flat, _ = jax.tree_util.tree_flatten_with_path(variables)
    for path, leaf in sorted(flat, key=lambda pl: jax.tree_util.keystr(pl[0])):
        a = np.ascontiguousarray(np.asarray(leaf))
        h.update(f"{jax.tree_util.keystr(path)}|{a.dtype.str}|{a.shape}".encode())
        h.update(a.tobytes())
    return h.hexdigest()


def _numeric_dirs(folder: str) -> list[int]:
    if not os.path.isdir(folder):
        return []
    return sorted(int(n) for n in os.listdir(folder) if n.isdigit())


def checkpoint_identity(workdir: str, which: str = "best") -> dict:
    """``{"kind", "step", "fingerprint"}`` of the checkpoint ``load_model_variables`` reads.

    Cheap (no arrays read): the newest step of ``best/`` (``which="best"``, when present) else
    of ``checkpoints/``, and a hash of Orbax's ``_CHECKPOINT_METADATA`` of that step, which
    holds its commit time, so a teacher retrained into the same work dir gets a new one.
    """
    workdir = os.path.abspath(workdir)
    for kind in (("best", "checkpoints") if which == "best" else ("checkpoints",)):
        steps = _numeric_dirs(os.path.join(workdir, kind))
        if steps:
            step_dir = os.path.join(workdir, kind, str(steps[-1]))
            meta_file = os.path.join(step_dir, "_CHECKPOINT_METADATA")
            if os.path.exists(meta_file):
                with open(meta_file, "rb") as f:
                    blob = f.read()
            else:
                blob = str(sorted(os.listdir(step_dir))).encode()
            return {"kind": kind, "step": steps[-1], "fingerprint": hashlib.sha256(blob).hexdigest()[:16]}
    raise ckpt_lib.CheckpointError(f"no checkpoint of the teacher in {workdir!r}; train the teacher first")


def data_identity(config) -> dict:
    """The config values that decide which examples (and ids) the training split holds."""
    d = config.data
    out = {"name": d.name, "train_split": d.train_split, "num_train_examples": d.num_train_examples,
           "subset_seed": d.subset_seed if d.num_train_examples is not None or d.get("val_fraction") else None,
           "builder_kwargs": json.loads(json.dumps(dict(d.builder_kwargs)))}
    if d.get("val_fraction"):  # only when set, so that caches made before the option still match
        out["val_fraction"] = float(d.val_fraction)
    return out


def _pad_flip(aug: Mapping[str, Any]) -> dict:
    return {"pad": int(aug.get("pad", 0)), "flip": bool(aug.get("flip", False))}


def resolved_augmentation(config, dataset_name: str) -> dict:
    aug = data_lib.default_augmentation(dataset_name) if config.data.augment is None else dict(config.data.augment)
    return _pad_flip(aug)


# --------------------------------------------------------------------------------------------
# Building
# --------------------------------------------------------------------------------------------


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
    :func:`data_identity`, plus ``num_examples``), ``normalisation`` (mean, std),
    ``augmentation`` (the run's ``{"pad", "flip"}``, from ``config.data.augment`` or the data
    set's default), ``num_views``, ``view_seed``, ``logits`` (dtype, shape) and the file names.

    ``num_views``: how many augmented views of each example to store when the config augments
    (required then: it multiplies the teacher's work and the cache's size); without
    augmentation only 1 is allowed (every view would be the same image). ``view_seed`` picks
    the views' crops and flips.

    ``dtype="float16"`` stores the logits in half the space (for large data sets with many
    views: ImageNet x 8 views x 1000 classes is 41 GB in float32). They are rounded to about 3
    significant digits; the manifest records the largest absolute rounding error, and a cache
    whose logits would overflow float16 is refused. Lookups return float32 either way.

    ``top_k=k`` stores only the ``k`` largest logits of each row and one logit for the other
    classes (:func:`topk_compress`): ``6k + 4`` bytes a row instead of ``4C`` (float16: ``4k +
    2`` instead of ``2C``; ImageNet with ``k=10``: 42 bytes instead of 2 000). The rest logit is
    computed at ``temperature`` (default: the temperature at which the config's method reads
    the teacher, ``Recipe.teacher_temperature``, i.e. Hinton KD's ``T``), and a run must distil
    at that temperature. The manifest records ``top_k``, ``temperature`` and how much
    probability the top ``k`` classes hold at that temperature (``top_k_mass`` min/mean).

    The rows are written to memory-mapped files under ``OUT/.building`` as they are computed,
    with a progress record every ``save_every_s`` seconds and after each view: a build that
    is interrupted (killed, out of time) and started again with the same arguments continues
    from that record, and gives the same cache as an uninterrupted one. ``on_batch(view, row)``
    is called after each batch's rows are written (a hook for fault-injection tests).
    """
    if dtype not in ("float32", "float16"):
        raise config_lib.ConfigError(f"dtype must be 'float32' or 'float16'; got {dtype!r}")
    aug = resolved_augmentation(config, config.data.name)
    augmented = bool(aug["pad"] or aug["flip"])
    if augmented and num_views is None:
        raise config_lib.ConfigError(
            f"the config augments ({aug}, from data.augment or the data set's default): pass num_views "
            "(`jaxkd cache-teacher --views K`) to store K augmented views of every example, or cache the "
            "un-augmented view for runs with data.augment={}")
    num_views = 1 if num_views is None else num_views
    if isinstance(num_views, bool) or not isinstance(num_views, int) or num_views < 1:
        raise config_lib.ConfigError(f"num_views must be a positive int; got {num_views!r}")
    if num_views > 1 and not augmented:
        raise config_lib.ConfigError(f"num_views={num_views} needs augmentation (data.augment with pad or flip); "
                                     "without it every view is the same image")
    if isinstance(view_seed, bool) or not isinstance(view_seed, int):
        raise config_lib.ConfigError(f"view_seed must be an int; got {view_seed!r}")
    if top_k is not None:
        if isinstance(top_k, bool) or not isinstance(top_k, int) or top_k < 1:
            raise config_lib.ConfigError(f"top_k must be a positive int; got {top_k!r}")
        if temperature is None:
            temps = sorted({t for t in teacher_temperatures(config_recipes(config)) if t is not None})
            if len(temps) != 1:
                raise config_lib.ConfigError(
                    "a top-k cache is made for one distillation temperature; the config's method(s) give "
                    f"{'none' if not temps else temps}: pass temperature (--temperature T)")
            temperature = temps[0]
        if isinstance(temperature, bool) or not isinstance(temperature, (int, float)) or not temperature > 0:
            raise config_lib.ConfigError(f"temperature must be a number > 0; got {temperature!r}")
        temperature = float(temperature)
    elif temperature is not None:
        raise config_lib.ConfigError("temperature only applies to a top-k cache (top_k / --top-k)")
    teacher_workdir = teacher_workdir or config.teacher.workdir
    if not isinstance(teacher_workdir, str) or not teacher_workdir:
        raise config_lib.ConfigError("a teacher cache needs one teacher: set config.teacher.workdir "
                                     "(a list of teachers or config.teachers is not supported)")
    if config.get("teachers") is not None:
        raise config_lib.ConfigError("config.teachers is set; a teacher cache holds one teacher's logits")
    teacher_workdir = os.path.abspath(teacher_workdir)
    from jaxkd.train.loop import load_teacher, training_sources
    d = config.data
    info, train_src, _, _ = training_sources(config)  # the examples the student trains on
    teacher = models_lib.create_model(config.teacher.name, info.num_classes, **dict(config.teacher.kwargs))
    sample = jnp.zeros((1, *info.input_shape), jnp.float32)
    identity = checkpoint_identity(teacher_workdir, config.teacher.checkpoint)
    # loaded as the training loop loads it (e.g. stored in bfloat16 for teacher.kwargs.dtype=bfloat16),
    # so the cached logits are the ones the live teacher would give
    with_workdir = ml_collections.ConfigDict(config.to_dict())
    with_workdir.teacher.workdir = teacher_workdir
    variables, meta = load_teacher(with_workdir, teacher, sample)
    pipeline = step_lib.InputPipeline(mean=tuple(info.mean), std=tuple(info.std), **aug)
    # data-parallel over this host's devices (config.train.num_devices, default all), as training is
    if jax.process_count() > 1:
        raise config_lib.ConfigError("a teacher cache is built by one process (over all of its host's devices); "
                                     "run `jaxkd cache-teacher` once, without --coordinator/--num-processes")
    mesh = step_lib.make_mesh(config.train.num_devices)
    batch_size = int(batch_size or d.eval_batch_size)
    if batch_size % mesh.size:
        raise config_lib.ConfigError(f"the cache's batch size {batch_size} (--batch-size, default "
                                     f"data.eval_batch_size) must be divisible by the number of devices ({mesh.size})")

    @functools.partial(jax.jit, compiler_options=eval_compiler_options(),
                       in_shardings=(step_lib.replicated(mesh),) + (step_lib.data_sharding(mesh),) * 3,
                       out_shardings=step_lib.data_sharding(mesh))
    def forward(variables, images, offsets, flips):
        # the student's training view: the stored crop/flip (none without augmentation), normalised;
        # the teacher in eval mode
        x = pipeline(None, images, train=True, crop_flip=(offsets, flips))
        logits, _, _ = teacher.apply(variables, x, train=False)
        return logits.astype(jnp.float32)

    variables = jax.device_put(variables, step_lib.replicated(mesh))
    n = len(train_src)
    c = info.num_classes
    if top_k is not None and top_k >= c:
        raise config_lib.ConfigError(f"top_k={top_k} keeps every one of the {c} classes; store the full logits "
                                     "(leave top_k unset) instead")
    store_dtype = np.dtype(dtype)
    logits_info = {"dtype": dtype}
    if top_k:
        logits_info.update(top_k=top_k, temperature=temperature, num_classes=c, indices_file=INDICES, rest_file=REST)
    manifest = {
        "format": TOPK_FORMAT if top_k else CACHE_FORMAT,
        "teacher": {"workdir": teacher_workdir, "checkpoint": config.teacher.checkpoint, **identity,
                    "variables_sha256": variables_hash(variables), "name": config.teacher.name,
                    "kwargs": json.loads(json.dumps(dict(config.teacher.kwargs))),
                    "accuracy": (meta or {}).get("accuracy")},
        "data": {**data_identity(config), "num_examples": n, "num_classes": c, "input_shape": list(info.input_shape)},
        "normalisation": {"mean": list(info.mean), "std": list(info.std)},
        "augmentation": {"pad": aug["pad"], "flip": aug["flip"]},
        "num_views": num_views,
        "view_seed": view_seed,
        "logits": {**logits_info, "shape": [n, num_views, top_k or c], "file": LOGITS, "ids_file": IDS},
    }
    # The rows go straight into memory-mapped files under OUT/.building (an ImageNet-size cache is
    # never held in memory), with a progress record saved every ``save_every_s`` seconds and after
    # each view. An interrupted build that is started again with the same plan (everything in the
    # manifest, the batch size, the devices, the jax version and compiler settings) continues
    # from the last record, and the rows it recomputes are the ones the first attempt would have
    # written.
    shapes = {LOGITS: ((n, num_views, top_k or c), store_dtype), IDS: ((n,), np.int64)}
    if top_k:
        shapes.update({INDICES: ((n, num_views, top_k), _index_dtype(c)), REST: ((n, num_views), store_dtype),
                       MASS: ((n, num_views), np.float64)})
    plan = json.dumps({"manifest": manifest, "batch_size": batch_size, "devices": mesh.size,
                       "device_kind": [mesh.devices.flat[0].platform, mesh.devices.flat[0].device_kind],
                       "jax": [jax.__version__, _jaxlib_version()], "compiler_options": eval_compiler_options(),
                       "xla_flags": os.environ.get("XLA_FLAGS", "")}, sort_keys=True)
    work = _PartialBuild(os.path.join(out_path, BUILDING), hashlib.sha256(plan.encode()).hexdigest(), shapes)
    arrays = work.arrays
    if work.view or work.row or work.finishing:
        import sys
        where = "its last step" if work.finishing else f"view {work.view}, row {work.row} of {n}"
        print(f"jaxkd: resuming the unfinished cache build in {work.folder} at {where}", file=sys.stderr, flush=True)
    bar = None
    if progress and not work.finishing:
        from tqdm.auto import tqdm
        bar = tqdm(total=n * num_views, initial=min(work.view * n + work.row, n * num_views),
                   desc=f"teacher logits ({num_views} view{'s' * (num_views > 1)})", unit="img", unit_scale=True,
                   dynamic_ncols=True)
    last_save = time.monotonic()
    for view in range(work.view, num_views) if not work.finishing else ():
        first = work.row // batch_size if view == work.view else 0
        row = first * batch_size
        for batch in data_lib.eval_batches(train_src, batch_size, start_batch=first):
            k = int(batch["mask"].sum())
            offsets, flips = view_params(batch["id"], view, seed=view_seed, **aug)
            inputs = step_lib.shard_batch({"image": batch["image"], "offsets": offsets, "flips": flips}, mesh)
            out = np.asarray(forward(variables, inputs["image"], inputs["offsets"], inputs["flips"]))[:k]
            rows = slice(row, row + k)
            with np.errstate(over="ignore"):  # float16 overflow is refused just below
                if top_k:
                    vals, idx, rst = topk_compress(out, top_k, temperature)
                    arrays[LOGITS][rows, view], arrays[INDICES][rows, view], arrays[REST][rows, view] = vals, idx, rst
                    arrays[MASS][rows, view] = topk_mass(vals, rst, c, temperature)
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

    arrays = written = stored = None  # views of the build's memory maps; finish() closes them
    if work.finishing:  # the rows were complete and sorted before: only the moves into OUT were left
        manifest = work.record["manifest"]
    else:
        if store_dtype == np.float16:
            logits_info["max_abs_rounding"] = work.rounding
        if top_k:
            mass = work.arrays[MASS]
            logits_info["top_k_mass"] = {"min": float(mass.min()) if n else None,
                                         "mean": float(mass.mean()) if n else None}
            del mass
        manifest["logits"] = {**logits_info, "shape": manifest["logits"]["shape"], "file": LOGITS, "ids_file": IDS}
    work.finish(out_path, [name for name in (LOGITS, INDICES, REST) if name in shapes] + [IDS], manifest)
    return manifest


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

    def finish(self, out_path: str, names: list[str], manifest: dict) -> None:
        """Puts the rows, sorted by id, and then the manifest into ``out_path``."""
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
            self._write_record({**self.record, "plan": self.plan_hash, "finishing": True, "sorted": not in_order,
                                "manifest": manifest})
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


# --------------------------------------------------------------------------------------------
# Reading and checking
# --------------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class TeacherCache:
    """An opened cache: ``lookup(ids, views) -> logits [B, C]`` (float32).

    A top-k cache (``indices`` and ``rest`` set) holds ``logits [N, V, k]``; lookups expand
    its rows to ``C`` logits (:func:`topk_expand`)."""

    path: str
    manifest: Mapping[str, Any]
    ids: np.ndarray      # sorted int64 [N]
    logits: np.ndarray   # [N, V, C] (or [N, V, k] for a top-k cache), memory-mapped
    indices: np.ndarray | None = None  # [N, V, k] classes of a top-k cache
    rest: np.ndarray | None = None     # [N, V] the other classes' logit

    @property
    def top_k(self) -> int | None:
        return None if self.indices is None else int(self.indices.shape[-1])

    @property
    def num_classes(self) -> int:
        return int(self.manifest["logits"]["num_classes"]) if self.indices is not None else int(self.logits.shape[-1])

    @property
    def num_views(self) -> int:
        return int(self.logits.shape[1])

    @property
    def augmentation(self) -> dict:
        return _pad_flip(self.manifest.get("augmentation", {}))

    def batch_views(self, ids, epoch: int) -> dict[str, np.ndarray]:
        """What the loop adds to a host batch of examples ``ids`` in ``epoch``: their teacher
        logits and, for an augmented cache, the crop offsets and flips of the chosen views."""
        seed = int(self.manifest.get("view_seed", 0))
        views = choose_views(ids, epoch, self.num_views, seed=seed)
        out = {"teacher_logits": self.lookup(ids, views)}
        aug = self.augmentation
        if aug["pad"] or aug["flip"]:
            out["aug_offsets"], out["aug_flips"] = view_params(ids, views, seed=seed, **aug)
        return out

    def lookup(self, ids, views=0) -> np.ndarray:
        """The cached logits of the examples ``ids`` (any order, repeats allowed), view ``views``
        (one per example, or one for all)."""
        ids = np.asarray(ids, np.int64).reshape(-1)
        views = np.broadcast_to(np.asarray(views, np.int64), ids.shape)
        if views.size and (views.min() < 0 or views.max() >= self.num_views):
            raise IndexError(f"view index out of range [0, {self.num_views}) for the teacher cache {self.path!r}")
        rows = np.searchsorted(self.ids, ids)
        rows = np.minimum(rows, len(self.ids) - 1)
        missing = self.ids[rows] != ids
        if np.any(missing):
            raise KeyError(f"example id(s) {ids[missing][:5].tolist()} are not in the teacher cache {self.path!r}; "
                           "it was made for another data set or subset")
        if self.indices is None:
            return np.asarray(self.logits[rows, views], dtype=np.float32)
        return topk_expand(self.logits[rows, views], self.indices[rows, views], self.rest[rows, views],
                           self.num_classes)


def open_teacher_cache(path: str) -> TeacherCache:
    """Opens the cache folder written by :func:`build_teacher_cache` (logits memory-mapped)."""
    manifest_file = os.path.join(path, MANIFEST)
    if not os.path.exists(manifest_file):
        raise config_lib.ConfigError(f"config.teacher.cache={path!r}: no {MANIFEST} there; build the cache with "
                                     "`jaxkd cache-teacher --config ... --workdir PATH`")
    with open(manifest_file) as f:
        manifest = json.load(f)
    if manifest.get("format") not in (CACHE_FORMAT, TOPK_FORMAT):
        raise config_lib.ConfigError(f"config.teacher.cache={path!r} has format {manifest.get('format')!r}; "
                                     f"this jaxkd reads formats {CACHE_FORMAT} and {TOPK_FORMAT}: rebuild it")
    spec = manifest["logits"]
    ids = np.load(os.path.join(path, spec["ids_file"]), allow_pickle=False)
    logits = np.load(os.path.join(path, spec["file"]), mmap_mode="r", allow_pickle=False)
    indices = rest = None
    if manifest["format"] == TOPK_FORMAT:
        indices = np.load(os.path.join(path, spec["indices_file"]), mmap_mode="r", allow_pickle=False)
        rest = np.load(os.path.join(path, spec["rest_file"]), mmap_mode="r", allow_pickle=False)
    if (list(logits.shape) != list(spec["shape"]) or len(ids) != logits.shape[0]
            or logits.dtype != np.dtype(spec.get("dtype", "float32"))
            or (indices is not None and (indices.shape != logits.shape or rest.shape != logits.shape[:2]
                                         or rest.dtype != logits.dtype))):
        raise config_lib.ConfigError(f"config.teacher.cache={path!r}: its .npy files do not match the manifest "
                                     f"(shape {list(logits.shape)} {logits.dtype}, {len(ids)} ids); rebuild it")
    return TeacherCache(path=path, manifest=manifest, ids=ids, logits=logits, indices=indices, rest=rest)


def cache_mismatches(manifest: Mapping[str, Any], config, info, augmentation: Mapping[str, Any]) -> list[str]:
    """What differs between a cache and a training run (empty: the cache serves the run).

    ``info`` is the run's :class:`~jaxkd.data.DatasetInfo`; ``augmentation`` its resolved
    ``{"pad", "flip"}``. The teacher is compared by model name/kwargs and, when
    ``config.teacher.workdir`` is set, by work dir and checkpoint identity (no arrays read).
    """
    out = []
    t = manifest["teacher"]
    if config.teacher.name != t["name"] or json.loads(json.dumps(dict(config.teacher.kwargs))) != t["kwargs"]:
        out.append(f"teacher model: cache {t['name']} {t['kwargs']}, config.teacher {config.teacher.name} "
                   f"{dict(config.teacher.kwargs)}")
    workdir = config.teacher.workdir
    if workdir is not None:
        if not isinstance(workdir, str) or os.path.abspath(workdir) != t["workdir"]:
            out.append(f"teacher work dir: cache {t['workdir']!r}, config.teacher.workdir {workdir!r}")
        elif config.teacher.checkpoint != t["checkpoint"]:
            out.append(f"teacher checkpoint: cache {t['checkpoint']!r}, config.teacher.checkpoint "
                       f"{config.teacher.checkpoint!r}")
        else:
            now = checkpoint_identity(workdir, config.teacher.checkpoint)
            if (now["kind"], now["step"], now["fingerprint"]) != (t["kind"], t["step"], t["fingerprint"]):
                out.append(f"teacher checkpoint: the cache was made from {t['kind']} step {t['step']} "
                           f"({t['fingerprint']}), {workdir!r} now holds {now['kind']} step {now['step']} "
                           f"({now['fingerprint']}): the teacher was retrained")
    want = data_identity(config)
    have = manifest["data"]
    for key, value in want.items():
        if have.get(key) != value:
            out.append(f"data.{key}: cache {have.get(key)!r}, config {value!r}")
    if info.num_train != have["num_examples"] or info.num_classes != have["num_classes"]:
        out.append(f"training split: cache {have['num_examples']} examples / {have['num_classes']} classes, "
                   f"run {info.num_train} / {info.num_classes}")
    norm = manifest["normalisation"]
    if not (np.allclose(norm["mean"], info.mean, rtol=0, atol=1e-7)
            and np.allclose(norm["std"], info.std, rtol=0, atol=1e-7)):
        out.append(f"input normalisation: cache mean {norm['mean']} std {norm['std']}, run mean {list(info.mean)} "
                   f"std {list(info.std)}")
    have_aug, want_aug = _pad_flip(manifest["augmentation"]), _pad_flip(augmentation)
    if have_aug != want_aug:
        if not (have_aug["pad"] or have_aug["flip"]):
            out.append(f"augmentation: the run augments ({want_aug}, from data.augment or the data set's default) "
                       "but the cache holds the un-augmented view only; train with data.augment={}, rebuild the "
                       "cache with augmented views (`jaxkd cache-teacher --views K`), or use the live teacher")
        else:
            out.append(f"augmentation: cache views {have_aug}, run {want_aug} (data.augment or the data set's "
                       "default); rebuild the cache with the run's augmentation")
    return out


def open_for_training(config, info, augmentation: Mapping[str, Any], recipes, train_source) -> TeacherCache:
    """Opens ``config.teacher.cache`` and checks it serves this run; raises ``ConfigError`` if not.

    Every recipe that uses the teacher must read only ``teacher_logits``
    (``Recipe.teacher_logits_only``); feature methods and BSS (``teacher_apply``) are refused.
    A top-k cache serves only recipes that read the teacher through a softmax at the
    temperature it was made for (``Recipe.teacher_temperature``).
    """
    path = config.teacher.cache
    needs_more = sorted({r.name for r in recipes if r.uses_teacher and not getattr(r, "teacher_logits_only", False)})
    if needs_more:
        raise config_lib.ConfigError(
            f"config.teacher.cache is set but method(s) {needs_more} need the teacher's features or to run the "
            "teacher on other inputs; only logit methods (e.g. hinton_kd) can use a cache. Unset teacher.cache.")
    if any(getattr(r, "trains_teacher", False) for r in recipes):
        raise config_lib.ConfigError("config.teacher.cache is set but the method trains the teacher jointly")
    if config.get("teachers") is not None or isinstance(config.teacher.workdir, (list, tuple)):
        raise config_lib.ConfigError("config.teacher.cache holds one teacher's logits; unset config.teachers "
                                     "or the list in config.teacher.workdir")
    cache = open_teacher_cache(path)
    diffs = cache_mismatches(cache.manifest, config, info, augmentation)
    if cache.top_k is not None:
        t_cache = float(cache.manifest["logits"]["temperature"])
        temps = teacher_temperatures(recipes)
        undeclared = sorted({r.name for r in recipes if r.uses_teacher and r.teacher_temperature is None})
        if undeclared:
            diffs.append(f"method(s) {undeclared} do not read the teacher through a softmax at a known temperature, "
                         f"which a top-k cache (top_k={cache.top_k}) needs; use a full-logit cache")
        other = sorted({t for t in temps if t is not None and not np.isclose(t, t_cache, rtol=1e-6, atol=0)})
        if other:
            diffs.append(f"temperature: the top-k cache (top_k={cache.top_k}) spreads the other classes' probability "
                         f"at T={t_cache:g}, the run distils at T={', '.join(f'{t:g}' for t in other)}; rebuild it "
                         "with --temperature for this run, or use a full-logit cache")
    if diffs:
        raise config_lib.ConfigError(f"config.teacher.cache={path!r} does not fit this run: " + "; ".join(diffs)
                                     + ". Rebuild it (jaxkd cache-teacher) with this config, or fix the config.")
    # ids without reading images (ArraySource keeps them, LazySource's ids are its record indices)
    train_ids = getattr(train_source, "ids", None)
    if train_ids is None:
        train_ids = getattr(train_source, "record_indices", None)
    if train_ids is not None and not np.array_equal(np.sort(np.asarray(train_ids)), cache.ids):
        raise config_lib.ConfigError(f"config.teacher.cache={path!r}: the training split's example ids differ "
                                     "from the cache's; rebuild it with this config")
    return cache
