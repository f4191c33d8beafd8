"""Teacher-output cache: the frozen teacher's logits computed once, keyed by example id.

``jaxkd.train.cache_build.build_teacher_cache(config, teacher_workdir, out_path)`` runs the teacher (inference mode)
once per stored view over the training split, on the input the student trains on (the
image, cropped/flipped as the view says when the run augments, normalised with the data set's
mean/std). It writes a folder::

    OUT/logits.npy      float32 (or float16) [N, V, C]: row i holds the logits of example ids[i]
    OUT/ids.npy         int64 [N], sorted ascending (the ``id`` of ``train_batches``)
    OUT/manifest.json   what the cache was made from (see :func:`jaxkd.train.cache_build.build_teacher_cache`)
                        and a SHA-256 checksum of every other file, checked when the cache is opened

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
import hashlib
import json
import os
import warnings
from typing import Any, Mapping

import jax
import numpy as np

from jaxkd.errors import CheckpointError, ConfigError

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

    Cheap (no arrays read): the newest step of ``best/`` (``which="best"``) or of
    ``checkpoints/`` (``"last"``), and a hash of Orbax's ``_CHECKPOINT_METADATA`` of that step, which
    holds its commit time, so a teacher retrained into the same work dir gets a new one.
    """
    workdir = os.path.abspath(workdir)
    for kind in (("best",) if which == "best" else ("checkpoints",)):
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
    raise CheckpointError(f"no {'best' if which == 'best' else 'run'} checkpoint of the teacher in {workdir!r}; "
                          "train the teacher first" + (" (or set teacher.checkpoint=last)" if which == "best" else ""))


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


def file_checksum(path: str, chunk: int = 1 << 24) -> str:
    """SHA-256 of a file's bytes, read in 16 MiB chunks (a large cache is never held in
    memory)."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def verify_cache_files(path: str, manifest: Mapping[str, Any]) -> None:
    """Compares every file listed in the manifest's ``checksums`` with its digest (streaming);
    raises :class:`~jaxkd.config.ConfigError` naming the first damaged file. Caches built before
    checksums were recorded are accepted with a warning."""
    sums = manifest.get("checksums")
    if sums is None:
        warnings.warn(f"teacher cache {path!r} records no checksums (built by an older jaxkd); its files are "
                      "used unverified. Rebuild it to have them checked.", RuntimeWarning, stacklevel=3)
        return
    for name, want in sorted(sums.items()):
        file = os.path.join(path, name)
        got = file_checksum(file) if os.path.exists(file) else "missing"
        if got != want:
            raise ConfigError(f"teacher cache file {file!r} is damaged (checksum {got}, the manifest records "
                              f"{want}); rebuild the cache (jaxkd cache-teacher)")


def open_teacher_cache(path: str, verify: bool = True) -> TeacherCache:
    """Opens the cache folder written by :func:`jaxkd.train.cache_build.build_teacher_cache` (memory-mapped).

    With ``verify`` (the default) every file is first checked against the checksums in the
    manifest (:func:`verify_cache_files`); a damaged cache is refused."""
    manifest_file = os.path.join(path, MANIFEST)
    if not os.path.exists(manifest_file):
        raise ConfigError(f"config.teacher.cache={path!r}: no {MANIFEST} there; build the cache with "
                                     "`jaxkd cache-teacher --config ... --workdir PATH`")
    with open(manifest_file) as f:
        manifest = json.load(f)
    if manifest.get("format") not in (CACHE_FORMAT, TOPK_FORMAT):
        raise ConfigError(f"config.teacher.cache={path!r} has format {manifest.get('format')!r}; "
                                     f"this jaxkd reads formats {CACHE_FORMAT} and {TOPK_FORMAT}: rebuild it")
    if verify:
        verify_cache_files(path, manifest)
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
        raise ConfigError(f"config.teacher.cache={path!r}: its .npy files do not match the manifest "
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
        raise ConfigError(
            f"config.teacher.cache is set but method(s) {needs_more} need the teacher's features or to run the "
            "teacher on other inputs; only logit methods (e.g. hinton_kd) can use a cache. Unset teacher.cache.")
    if any(getattr(r, "trains_teacher", False) for r in recipes):
        raise ConfigError("config.teacher.cache is set but the method trains the teacher jointly")
    if config.get("teachers") is not None or isinstance(config.teacher.workdir, (list, tuple)):
        raise ConfigError("config.teacher.cache holds one teacher's logits; unset config.teachers "
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
        raise ConfigError(f"config.teacher.cache={path!r} does not fit this run: " + "; ".join(diffs)
                                     + ". Rebuild it (jaxkd cache-teacher) with this config, or fix the config.")
    # ids without reading images (ArraySource keeps them, LazySource's ids are its record indices)
    train_ids = getattr(train_source, "ids", None)
    if train_ids is None:
        train_ids = getattr(train_source, "record_indices", None)
    if train_ids is not None and not np.array_equal(np.sort(np.asarray(train_ids)), cache.ids):
        raise ConfigError(f"config.teacher.cache={path!r}: the training split's example ids differ "
                                     "from the cache's; rebuild it with this config")
    return cache
