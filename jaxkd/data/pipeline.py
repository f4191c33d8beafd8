"""Data sets as random-access sources, and grain-based batch iterators over them.

``load_dataset(name)`` returns ``(DatasetInfo, train Source, eval Source)``:

* ``name`` is a jaxkd built-in (``digits``, ``fashion_mnist_local``, ``mnist1d``, ``mnist1d_tokens``: prepared
  offline on first use) or any tfds catalog name (``cifar10``, ``cifar100``,
  ``fashion_mnist``, ...), read through ``tfds.data_source`` from ``array_record`` files.
* A ``Source`` has ``len``, ``source[i] -> {"image": ndarray, "label": int, "id": int}`` and a
  vectorised ``source.gather(indices)``. ``id`` is the example's index within its split (kept
  through ``num_train_examples`` subsetting), e.g. to key cached teacher outputs.
* Small data sets (fixed image shape, at most ``IN_MEMORY_MAX_BYTES`` of pixels) are decoded
  once into NumPy arrays (``ArraySource``), and cached as ``.npy`` next to the tfds files so
  later runs skip decoding; bigger ones stay lazy (``LazySource``).

``train_batches`` is an infinite, seeded, resumable (``get_state``/``set_state``) iterator;
``eval_batches`` is one fixed-order pass whose last batch is padded and masked.
"""

from __future__ import annotations

import abc
import dataclasses
import difflib
import hashlib
import json
import math
import os
import sys
import threading
from typing import Any, Iterator, Mapping, Sequence

import grain
import numpy as np
import tensorflow_datasets as tfds

from jaxkd.data import builders as builders_lib
from jaxkd.data.errors import DatasetNotFoundError

DATA_DIR_ENV = "JAXKD_DATA_DIR"
# Data sets whose pixels take at most this many bytes (both splits) are held in memory.
IN_MEMORY_MAX_BYTES = 2 * 1024**3
# Mean/std are computed from at most this many training examples (evenly spaced).
STATS_MAX_EXAMPLES = 10_000
_READ_CHUNK = 4096
_CACHE_DIRNAME = "jaxkd_arrays"
_CACHE_FORMAT = 1

# Per-channel mean/std of the training images scaled to [0, 1].
KNOWN_STATS: dict[str, tuple[tuple[float, ...], tuple[float, ...]]] = {
    "cifar10": ((0.4914, 0.4822, 0.4465), (0.2470, 0.2435, 0.2616)),
    "cifar100": ((0.5071, 0.4867, 0.4408), (0.2675, 0.2565, 0.2761)),
    "imagenet2012": ((0.485, 0.456, 0.406), (0.229, 0.224, 0.225)),
    "fashion_mnist": ((0.2860,), (0.3530,)),
    "mnist": ((0.1307,), (0.3081,)),
}


# --------------------------------------------------------------------------------------------
# Info and sources
# --------------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class DatasetInfo:
    """What a model and the input pipeline need to know about a loaded data set.

    ``mean``/``std`` are per channel, in units of the stored image scaled to [0, 1] for
    ``uint8`` images (raw units for ``float32``), i.e. what :func:`jaxkd.data.augment.normalize`
    expects. ``int32`` inputs are token ids (any integer feature other than ``uint8``): passed
    to the model unchanged, never normalised or augmented (``mean``/``std`` are ``(0,)``/``(1,)``).
    """

    name: str
    num_classes: int
    input_shape: tuple[int, ...]  # per example, e.g. (28, 28, 1)
    mean: tuple[float, ...]
    std: tuple[float, ...]
    num_train: int
    num_eval: int
    image_dtype: str  # "uint8" (pixels), "float32" (signals, float images) or "int32" (token ids)


class Source(abc.ABC):
    """A random-access split: ``len``, ``source[i]`` and vectorised ``gather``."""

    @abc.abstractmethod
    def __len__(self) -> int: ...

    @abc.abstractmethod
    def gather(self, indices: Sequence[int] | np.ndarray) -> dict[str, np.ndarray]:
        """Batch of the examples at ``indices``: image (B, ...), label int32 (B,), id int64 (B,)."""

    @abc.abstractmethod
    def subset(self, indices: Sequence[int] | np.ndarray) -> Source:
        """The examples at ``indices`` (positions in this source), ids unchanged."""

    def __getitem__(self, index: int) -> dict[str, Any]:
        n = len(self)
        if not -n <= index < n:
            raise IndexError(f"index {index} out of range for a source of {n} examples")
        batch = self.gather(np.asarray([index % n]))
        return {"image": batch["image"][0], "label": int(batch["label"][0]), "id": int(batch["id"][0])}

    def __iter__(self) -> Iterator[dict[str, Any]]:
        for i in range(len(self)):
            yield self[i]


def _as_index_array(indices, n: int) -> np.ndarray:
    idx = np.asarray(indices, dtype=np.int64).reshape(-1)
    if idx.size and (idx.min() < 0 or idx.max() >= n):
        raise IndexError(f"indices out of range [0, {n}) for a source of {n} examples")
    return idx


# Field names a batch already uses: a data set's own feature of that name is not passed on.
RESERVED_FIELDS = ("image", "label", "id", "index", "mask")


class ArraySource(Source):
    """A split held in memory as NumPy arrays (gathers are one fancy-index per field).

    ``fields`` are further per-example arrays (boxes, token ids, masks, ...), gathered with the
    images and passed through the pipeline to the recipe (``LossInputs.batch``)."""

    def __init__(self, images: np.ndarray, labels: np.ndarray, ids: np.ndarray | None = None,
                 fields: Mapping[str, np.ndarray] | None = None):
        images, labels = np.asarray(images), np.asarray(labels, dtype=np.int32)
        ids = np.arange(len(images), dtype=np.int64) if ids is None else np.asarray(ids, dtype=np.int64)
        fields = {k: np.asarray(v) for k, v in (fields or {}).items()}
        lengths = {"images": len(images), "labels": len(labels), "ids": len(ids), **{k: len(v) for k, v in fields.items()}}
        if len(set(lengths.values())) > 1:
            raise ValueError(f"images, labels, ids and fields differ in length: {lengths}")
        clash = sorted(set(fields) & set(RESERVED_FIELDS))
        if clash:
            raise ValueError(f"fields {clash} clash with the batch's own fields {RESERVED_FIELDS}")
        self.images, self.labels, self.ids, self.fields = images, labels, ids, fields

    def __len__(self) -> int:
        return len(self.images)

    def gather(self, indices) -> dict[str, np.ndarray]:
        idx = _as_index_array(indices, len(self))
        return {"image": self.images[idx], "label": self.labels[idx], "id": self.ids[idx],
                **{k: v[idx] for k, v in self.fields.items()}}

    def subset(self, indices) -> ArraySource:
        idx = _as_index_array(indices, len(self))
        return ArraySource(self.images[idx], self.labels[idx], self.ids[idx], {k: v[idx] for k, v in self.fields.items()})


class LazySource(Source):
    """A split read record by record from a tfds data source (for data sets too big for memory)."""

    def __init__(self, data_source, *, image_key: str = "image", label_key: str = "label",
                 record_indices: np.ndarray | None = None, image_dtype: str | None = None,
                 field_keys: Mapping[str, Any] | None = None):
        self.data_source = data_source
        self.image_key, self.label_key = image_key, label_key
        self.field_keys = dict(field_keys or {})  # name -> dtype
        n = len(data_source)
        self.record_indices = (np.arange(n, dtype=np.int64) if record_indices is None
                               else np.asarray(record_indices, dtype=np.int64))
        self.image_dtype = image_dtype

    def __len__(self) -> int:
        return len(self.record_indices)

    def gather(self, indices) -> dict[str, np.ndarray]:
        rec_idx = self.record_indices[_as_index_array(indices, len(self))]
        records = _get_records(self.data_source, rec_idx)
        images = _stack_images([r[self.image_key] for r in records], self.data_source)
        if self.image_dtype is not None:
            images = images.astype(self.image_dtype, copy=False)
        labels = np.asarray([r[self.label_key] for r in records], dtype=np.int32)
        return {"image": images, "label": labels, "id": rec_idx.copy(),
                **{k: np.stack([np.asarray(r[k]) for r in records]).astype(dt, copy=False)
                   for k, dt in self.field_keys.items()}}

    def subset(self, indices) -> LazySource:
        return LazySource(self.data_source, image_key=self.image_key, label_key=self.label_key,
                          record_indices=self.record_indices[_as_index_array(indices, len(self))],
                          image_dtype=self.image_dtype, field_keys=self.field_keys)


class RepeatedSource(Source):
    """Every example of ``source`` ``copies`` times: position ``p`` is example ``p % M`` (``M =
    len(source)``) in copy ``p // M``.

    Its batches carry two more fields: ``copy`` (int32, ``[b]``) and ``copy_onehot`` (bool,
    ``[b, copies]``, whose static width tells a recipe how many copies there are). Iterated by
    :func:`train_batches`, an epoch is a permutation of all ``copies * M`` (example, copy) pairs:
    every example ``copies`` times per epoch, the epoch ``copies`` times as long, shuffled, and
    resumed exactly like any source. ``index`` is then the position in the repeated set
    (``0 .. copies * M - 1``); ``id`` stays the example's id in its split. The relabelled-data
    view of several teachers (``config.data.copies``, method ``relabel_data_kd``): copy ``n`` of
    an example carries teacher ``n``'s soft labels.
    """

    def __init__(self, source: Source, copies: int):
        if isinstance(copies, bool) or not isinstance(copies, (int, np.integer)) or copies < 1:
            raise ValueError(f"copies must be an int >= 1; got {copies!r}")
        if len(source) == 0:
            raise ValueError("cannot repeat an empty source")
        self.source, self.copies = source, int(copies)
        labels = getattr(source, "labels", None)
        if labels is not None:
            self.labels = np.tile(np.asarray(labels), self.copies)

    def __len__(self) -> int:
        return self.copies * len(self.source)

    def gather(self, indices) -> dict[str, np.ndarray]:
        idx = _as_index_array(indices, len(self))
        copy, example = np.divmod(idx, len(self.source))
        out = self.source.gather(example)
        clash = sorted({"copy", "copy_onehot"} & set(out))
        if clash:
            raise ValueError(f"the data set's fields {clash} clash with RepeatedSource's own")
        return {**out, "copy": copy.astype(np.int32), "copy_onehot": np.eye(self.copies, dtype=bool)[copy]}

    def subset(self, indices) -> Source:
        raise NotImplementedError("subset the underlying source, then repeat it")


def _get_records(data_source, record_indices: np.ndarray) -> list[Mapping[str, Any]]:
    keys = [int(i) for i in record_indices]
    getitems = getattr(data_source, "__getitems__", None)
    if getitems is not None:
        try:
            return list(getitems(keys))
        except TypeError:
            # tfds.testing.mock_data's stand-in does not support batched reads.
            pass
    return [data_source[k] for k in keys]


def _stack_images(images: list, data_source=None) -> np.ndarray:
    shapes = {np.shape(im) for im in images}
    if len(shapes) > 1:
        name = getattr(getattr(data_source, "dataset_info", None), "name", "this data set")
        raise NotImplementedError(_varying_size_message(name, sorted(shapes)[:3]))
    return np.stack([np.asarray(im) for im in images]) if images else np.zeros((0,))


def _varying_size_message(name: str, shapes) -> str:
    return (f"{name} has images of varying size ({shapes}); jaxkd's input pipeline batches "
            "fixed-size images only and does not resize yet. Use a resized variant of the data set "
            "(e.g. tfds 'imagenet_resized/64x64' or 'downsampled_imagenet/64x64') or resize the "
            "images when preparing your own builder.")


# --------------------------------------------------------------------------------------------
# load_dataset
# --------------------------------------------------------------------------------------------


def default_data_dir() -> str:
    """``$JAXKD_DATA_DIR``, else ``$TFDS_DATA_DIR``, else ``~/tensorflow_datasets``."""
    path = os.environ.get(DATA_DIR_ENV) or os.environ.get("TFDS_DATA_DIR") or "~/tensorflow_datasets"
    return os.path.expanduser(path)


def _base_name(name: str) -> str:
    return name.split("/")[0].split(":")[0]


def load_dataset(name: str, *, data_dir: str | None = None, train_split: str = "train",
                 eval_split: str = "test", num_train_examples: int | None = None,
                 subset_seed: int = 0, builder_kwargs: dict | None = None,
                 download: bool = False, in_memory: bool | None = None,
                 cache: bool = True) -> tuple[DatasetInfo, Source, Source]:
    """Loads ``(info, train_source, eval_source)``.

    Args:
      name: a built-in (``digits``, ``fashion_mnist_local``, ``mnist1d``, ``mnist1d_tokens``; prepared into
        ``data_dir`` on first use, offline) or a tfds catalog name, optionally with
        ``/config`` and ``:version`` (read from prepared ``array_record`` files).
      data_dir: where prepared data sets live; default :func:`default_data_dir`.
      train_split, eval_split: tfds split strings (slices such as ``"train[:90%]"`` work).
      num_train_examples: keep only this many training examples (limited-data regime): a
        seeded, class-stratified subset for in-memory data sets, a seeded uniform one otherwise.
      subset_seed: seed of that subset.
      builder_kwargs: passed to the tfds builder, e.g. ``{"idx_dir": ...}`` for
        ``fashion_mnist_local``.
      download: for catalog data sets, let tfds download and prepare them (needs network;
        built-ins never download and ignore it).
      in_memory: force (True) or forbid (False) holding the splits in memory; default: by size.
      cache: keep decoded in-memory arrays as ``.npy`` files in the prepared data set's folder.

    Raises:
      DatasetNotFoundError: unknown name (with close matches), or a data set that is not
        prepared / whose files are missing (with how to get it).
    """
    data_dir = os.path.expanduser(data_dir) if data_dir else default_data_dir()
    base = _base_name(name)
    if base in builders_lib.BUILTIN_BUILDERS:
        train_ds, eval_ds = _builtin_sources(name, data_dir, (train_split, eval_split), builder_kwargs)
    else:
        train_ds, eval_ds = _catalog_sources(name, data_dir, (train_split, eval_split),
                                             builder_kwargs, download)
    tfds_info = train_ds.dataset_info
    image_key, label_key = _supervised_keys(tfds_info)
    features = tfds_info.features
    image_feature = features[image_key]
    feature_shape = tuple(image_feature.shape)
    if any(d is None for d in feature_shape):
        raise NotImplementedError(_varying_size_message(name, feature_shape))
    image_dtype = _image_dtype(image_feature.np_dtype)
    label_feature = features[label_key]
    num_classes = getattr(label_feature, "num_classes", None)
    if num_classes is None:
        raise ValueError(f"{name}: feature {label_key!r} is not a ClassLabel; cannot infer num_classes")

    if in_memory is None:
        num_pixels = (len(train_ds) + len(eval_ds)) * math.prod(feature_shape)
        in_memory = num_pixels * np.dtype(image_dtype).itemsize <= IN_MEMORY_MAX_BYTES
    field_keys = _field_keys(features, image_key, label_key)
    sources = []
    for split, ds in ((train_split, train_ds), (eval_split, eval_ds)):
        if in_memory:
            images, labels = _read_arrays(ds, split, image_key, label_key, image_dtype, cache)
            sources.append(ArraySource(images, labels, fields=_read_fields(ds, field_keys)))
        else:
            sources.append(LazySource(ds, image_key=image_key, label_key=label_key,
                                      image_dtype=image_dtype, field_keys=field_keys))
    train, evals = sources

    mean, std = _normalisation_stats(base, train, image_dtype)
    if num_train_examples is not None:
        train = train.subset(subset_indices(train, num_train_examples, seed=subset_seed))
    info = DatasetInfo(name=name, num_classes=int(num_classes), input_shape=feature_shape,
                       mean=mean, std=std, num_train=len(train), num_eval=len(evals),
                       image_dtype=image_dtype)
    return info, train, evals


def _field_keys(features, image_key: str, label_key: str) -> dict[str, np.dtype]:
    """The data set's further per-example features a batch carries: numeric, of a fixed shape, and
    not named like a field the batch already has (:data:`RESERVED_FIELDS`); strings and
    variable-length features are left out."""
    keys = {}
    for key in sorted(getattr(features, "keys", lambda: ())()):
        if key in (image_key, label_key) or key in RESERVED_FIELDS:
            continue
        feature = features[key]
        shape, dtype = getattr(feature, "shape", None), getattr(feature, "np_dtype", None)
        if shape is None or dtype is None or any(d is None for d in shape):
            continue
        if np.issubdtype(np.dtype(dtype), np.number) or np.dtype(dtype) == np.bool_:
            keys[key] = np.dtype(dtype)
    return keys


def _read_fields(ds, keys: Mapping[str, np.dtype]) -> dict[str, np.ndarray]:
    if not keys:
        return {}
    out = {k: [] for k in keys}
    for start in range(0, len(ds), _READ_CHUNK):
        for r in _get_records(ds, np.arange(start, min(len(ds), start + _READ_CHUNK))):
            for k in keys:
                out[k].append(np.asarray(r[k]))
    return {k: np.stack(v).astype(keys[k], copy=False) for k, v in out.items()}


def _supervised_keys(tfds_info) -> tuple[str, str]:
    keys = getattr(tfds_info, "supervised_keys", None)
    if (isinstance(keys, (tuple, list)) and len(keys) == 2
            and all(isinstance(k, str) for k in keys)):
        return keys[0], keys[1]
    return "image", "label"


def _builtin_sources(name, data_dir, splits, builder_kwargs):
    builder = tfds.builder(name, data_dir=data_dir, **(builder_kwargs or {}))
    if not builder.is_prepared():
        builder.download_and_prepare(download_config=builders_lib.offline_download_config())
    return [builder.as_data_source(split) for split in splits]


def _catalog_sources(name, data_dir, splits, builder_kwargs, download):
    base = _base_name(name)
    try:
        builder_cls = tfds.builder_cls(base)
    except tfds.core.registered.DatasetNotFoundError:
        raise DatasetNotFoundError(_unknown_message(name)) from None
    kwargs = {"file_format": "array_record", **(builder_kwargs or {})}
    try:
        return tfds.data_source(name, split=list(splits), data_dir=data_dir, download=download,
                                builder_kwargs=kwargs, try_gcs=False)
    except DatasetNotFoundError:
        raise
    except Exception as e:  # tfds raises a variety of types here; explain them once.
        raise DatasetNotFoundError(
            _not_available_message(name, builder_cls, data_dir, download, e, kwargs, splits)) from e


def _unknown_message(name: str) -> str:
    base = _base_name(name)
    candidates = list(builders_lib.BUILTIN_BUILDERS)
    try:
        candidates += tfds.list_builders(with_community_datasets=False)
    except Exception:  # pylint: disable=broad-except
        pass
    close = difflib.get_close_matches(base, sorted(set(candidates)), n=3, cutoff=0.6)
    hint = f" Did you mean {' or '.join(repr(c) for c in close)}?" if close else ""
    return (f"Unknown data set {name!r}: it is neither a jaxkd built-in "
            f"({', '.join(sorted(builders_lib.BUILTIN_BUILDERS))}) nor in the tfds catalog.{hint}")


def _not_available_message(name, builder_cls, data_dir, download, error, kwargs, splits) -> str:
    base = _base_name(name)
    diagnosis, prepared_splits = _diagnose(name, data_dir, kwargs)
    if prepared_splits is not None:  # a readable copy exists: the split names must be wrong
        return (f"Data set {name!r} is prepared under data_dir {data_dir!r} with splits "
                f"{prepared_splits}, but reading splits {list(splits)} failed "
                f"({type(error).__name__}: {' '.join(str(error).split())[:300]}). Pass "
                "train_split=/eval_split= accordingly (e.g. eval_split='validation').")
    lines = [f"Data set {name!r} is not available as array_record files under data_dir "
             f"{data_dir!r}."]
    if diagnosis:
        lines.append(diagnosis)
    if download:
        lines.append(f"Downloading/preparing it failed ({type(error).__name__}: {error}).")
    lines.append("To get it:")
    manual = getattr(builder_cls, "MANUAL_DOWNLOAD_INSTRUCTIONS", None)
    if manual:
        lines.append(f"  * {base} needs a manual download first: put the files in "
                     f"{os.path.join(data_dir, 'downloads', 'manual')} "
                     f"(tfds's instructions: {' '.join(str(manual).split())}); then prepare it:")
    lines.append(f"  * with internet access: load_dataset({name!r}, download=True), or "
                 f"`tfds build {name} --file_format=array_record --data_dir={data_dir}`;")
    lines.append(f"  * or copy a prepared array_record copy (the layout `tfds build` writes: "
                 f"{os.path.join(data_dir, base, '<version>')}/...) into data_dir.")
    if not download and diagnosis is None:
        lines.append(f"(tfds said: {type(error).__name__}: {' '.join(str(error).split())[:300]})")
    return "\n".join(lines)


def _diagnose(name, data_dir, kwargs) -> tuple[str | None, list[str] | None]:
    """``(explanation, None)`` for a missing or unreadable copy (e.g. prepared as tfrecord);
    ``(None, split names)`` when a readable copy exists; ``(None, None)`` when unsure."""
    try:
        builder = tfds.builder(name, data_dir=data_dir, **kwargs)
        if not builder.is_prepared():
            return f"No prepared copy was found at {builder.data_dir}.", None
        formats = {str(getattr(f, "value", f)) for f in builder.info.available_file_formats()}
        if "array_record" not in formats:
            return (f"A copy exists at {builder.data_dir} but in {sorted(formats)} format, which "
                    "cannot be read with random access without TensorFlow; rebuild it with "
                    "--file_format=array_record (or use another data_dir)."), None
        return None, sorted(builder.info.splits)
    except Exception:  # pylint: disable=broad-except
        return None, None


# --------------------------------------------------------------------------------------------
# Reading whole splits into memory (with an on-disk .npy cache)
# --------------------------------------------------------------------------------------------


def _read_arrays(ds, split: str, image_key: str, label_key: str, image_dtype: str,
                 cache: bool) -> tuple[np.ndarray, np.ndarray]:
    n = len(ds)
    cache_paths = _cache_paths(ds, split, image_key, label_key, n) if cache else None
    if cache_paths is not None:
        try:
            images = np.load(cache_paths[0], allow_pickle=False)
            labels = np.load(cache_paths[1], allow_pickle=False)
            if len(images) == n and len(labels) == n and images.dtype == np.dtype(image_dtype):
                return images, labels
        except (OSError, ValueError):
            pass
    images = labels = None
    progress = None
    if n > 20_000:
        from tqdm.auto import tqdm

        progress = tqdm(total=n, desc=f"Reading {split} into memory", unit=" examples", leave=False)
    for start in range(0, n, _READ_CHUNK):
        stop = min(n, start + _READ_CHUNK)
        records = _get_records(ds, np.arange(start, stop))
        block = _stack_images([r[image_key] for r in records], ds).astype(image_dtype, copy=False)
        if images is None:
            images = np.empty((n,) + block.shape[1:], dtype=image_dtype)
            labels = np.empty((n,), dtype=np.int32)
        images[start:stop] = block
        labels[start:stop] = [int(r[label_key]) for r in records]
        if progress is not None:
            progress.update(stop - start)
    if progress is not None:
        progress.close()
    if images is None:
        raise ValueError(f"split {split!r} is empty")
    if cache_paths is not None:
        _write_cache(cache_paths, images, labels)
    return images, labels


def _cache_paths(ds, split, image_key, label_key, n) -> tuple[str, str] | None:
    folder = getattr(getattr(ds, "dataset_info", None), "data_dir", None)
    if not folder or not os.path.isdir(folder):
        return None
    key = json.dumps([_CACHE_FORMAT, split, image_key, label_key, n])
    stem = hashlib.sha1(key.encode()).hexdigest()[:16]
    cache_dir = os.path.join(folder, _CACHE_DIRNAME)
    return (os.path.join(cache_dir, f"{stem}.images.npy"),
            os.path.join(cache_dir, f"{stem}.labels.npy"))


def _write_cache(paths, images, labels) -> None:
    try:
        os.makedirs(os.path.dirname(paths[0]), exist_ok=True)
        for path, array in zip(paths, (images, labels)):
            tmp = f"{path}.tmp{os.getpid()}"
            with open(tmp, "wb") as f:
                np.save(f, array, allow_pickle=False)
            os.replace(tmp, path)
    except OSError:
        pass  # read-only data_dir: no cache, no problem


# --------------------------------------------------------------------------------------------
# Normalisation and subsets
# --------------------------------------------------------------------------------------------


def _image_dtype(feature_dtype) -> str:
    """How the pipeline stores and reads a data set's ``image`` feature: ``uint8`` pixels,
    ``int32`` token ids (any other integer feature), or ``float32`` (floats)."""
    dtype = np.dtype(feature_dtype)
    if dtype == np.uint8:
        return "uint8"
    return "int32" if np.issubdtype(dtype, np.integer) else "float32"


def _normalisation_stats(base: str, train: Source, image_dtype: str):
    if image_dtype == "int32":  # token ids are not normalised
        return (0.0,), (1.0,)
    known = KNOWN_STATS.get(base)
    if known is None and base.startswith("imagenet"):
        known = KNOWN_STATS["imagenet2012"]
    if base == "fashion_mnist_local" and len(train) == 60_000:
        known = KNOWN_STATS["fashion_mnist"]  # the real files; test fixtures are computed
    if known is not None:
        return known
    return compute_stats(train, image_dtype=image_dtype)


def compute_stats(source: Source, *, image_dtype: str = "uint8",
                  max_examples: int = STATS_MAX_EXAMPLES) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """Per-channel (last axis) mean and std of up to ``max_examples`` evenly spaced examples."""
    n = len(source)
    if n == 0:
        raise ValueError("cannot compute normalisation statistics of an empty split")
    idx = np.unique(np.linspace(0, n - 1, num=min(n, max_examples)).astype(np.int64))
    x = source.gather(idx)["image"].astype(np.float64)
    if image_dtype == "uint8":
        x /= 255.0
    x = x.reshape(-1, x.shape[-1])
    mean, std = x.mean(axis=0), x.std(axis=0)
    std = np.where(std > 0, std, 1.0)
    return tuple(float(m) for m in mean), tuple(float(s) for s in std)


def subset_indices(source: Source, num_examples: int, *, seed: int = 0) -> np.ndarray:
    """Sorted positions of a seeded subset of ``num_examples`` examples.

    Class-stratified (each class keeps its share, largest remainders rounded up) when the
    labels are in memory (``ArraySource``); a seeded uniform sample otherwise.
    """
    n = len(source)
    if not 0 < num_examples <= n:
        raise ValueError(f"num_train_examples must be in [1, {n}], got {num_examples}")
    rng = np.random.default_rng(seed)
    if num_examples == n:
        return np.arange(n, dtype=np.int64)
    labels = getattr(source, "labels", None)
    if labels is None:
        return np.sort(rng.choice(n, size=num_examples, replace=False)).astype(np.int64)
    classes, counts = np.unique(labels, return_counts=True)
    quota = counts * num_examples / n
    take = np.floor(quota).astype(np.int64)
    remainder = num_examples - take.sum()
    order = np.lexsort((classes, -(quota - take)))  # largest fractional part first, ties by class
    take[order[:remainder]] += 1
    chosen = [rng.choice(np.flatnonzero(labels == c), size=k, replace=False)
              for c, k in zip(classes, take) if k]
    return np.sort(np.concatenate(chosen)).astype(np.int64)


def hold_out(source: Source, fraction: float, *, seed: int = 0) -> tuple[Source, Source]:
    """``(rest, held_out)``: a seeded ``fraction`` of ``source`` set aside, e.g. as a validation set.

    The held-out examples are chosen like :func:`subset_indices` (class-stratified when the
    labels are in memory), ``round(fraction * len(source))`` of them; ids are unchanged, so the
    two parts never share an example. Raises ``ValueError`` if either part would be empty.
    """
    n = len(source)
    k = int(round(fraction * n))
    if not 0 < k < n:
        raise ValueError(f"holding out a fraction {fraction} of {n} examples leaves "
                         f"{k} held out and {n - k} to train on; both must be at least 1")
    held = subset_indices(source, k, seed=seed)
    rest = np.setdiff1d(np.arange(n, dtype=np.int64), held, assume_unique=True)
    return source.subset(rest), source.subset(held)


# --------------------------------------------------------------------------------------------
# Batching
# --------------------------------------------------------------------------------------------


def steps_per_epoch(num_train: int, batch_size: int) -> int:
    """Optimizer steps per pass over ``num_train`` examples at global ``batch_size``.

    ``num_train // batch_size`` (0 when the batch is bigger than the data set). ``train_batches``
    cuts batches from the endless stream of per-epoch permutations, so no example is ever
    dropped: these steps make one epoch up to less than one batch.
    """
    if batch_size <= 0:
        raise ValueError(f"batch_size must be positive, got {batch_size}")
    return num_train // batch_size


def _local_batch(batch_size: int, shard_index: int, shard_count: int) -> int:
    if batch_size <= 0:
        raise ValueError(f"batch_size must be positive, got {batch_size}")
    if shard_count <= 0 or not 0 <= shard_index < shard_count:
        raise ValueError(f"need 0 <= shard_index < shard_count, got {shard_index}, {shard_count}")
    if batch_size % shard_count:
        raise ValueError(f"global batch_size {batch_size} is not divisible by shard_count "
                         f"{shard_count}")
    return batch_size // shard_count


class _BatchPositions:
    """Random-access "data source" for grain: item ``k`` = positions of global batch ``k``.

    The stream of positions is the concatenation of per-epoch permutations of ``range(n)``,
    epoch ``e`` permuted by ``np.random.default_rng([seed, e])``; batch ``k`` is stream items
    ``[k * B, (k + 1) * B)``, so an epoch boundary may fall inside a batch. Computed with one
    vectorised gather per batch (the permutation of an epoch is computed once and cached).
    """

    def __init__(self, n: int, batch_size: int, seed: int):
        self.n, self.batch_size, self.seed = n, batch_size, seed
        self._lock = threading.Lock()
        self._cache: dict[int, np.ndarray] = {}

    def __len__(self) -> int:
        return sys.maxsize

    def __getstate__(self):
        return {"n": self.n, "batch_size": self.batch_size, "seed": self.seed}

    def __setstate__(self, state):
        self.__init__(state["n"], state["batch_size"], state["seed"])

    def permutation(self, epoch: int) -> np.ndarray:
        with self._lock:
            perm = self._cache.get(epoch)
        if perm is None:
            perm = np.random.default_rng([self.seed, epoch]).permutation(self.n)
            with self._lock:
                if len(self._cache) >= 4:
                    self._cache.pop(min(self._cache))
                self._cache[epoch] = perm
        return perm

    def __getitem__(self, k: int) -> np.ndarray:
        stream = np.arange(k * self.batch_size, (k + 1) * self.batch_size, dtype=np.int64)
        epochs, offsets = np.divmod(stream, self.n)
        out = np.empty_like(stream)
        for epoch in range(int(epochs[0]), int(epochs[-1]) + 1):
            sel = epochs == epoch
            out[sel] = self.permutation(epoch)[offsets[sel]]
        return out


class _ShardGather:
    """Picklable map: global batch of positions -> this shard's slice, gathered."""

    def __init__(self, source: Source, start: int, size: int):
        self.source, self.start, self.size = source, start, size

    def __call__(self, positions: np.ndarray) -> dict[str, np.ndarray]:
        mine = np.asarray(positions)[self.start:self.start + self.size]
        # "index": the example's position in the training source (the row of a memory bank)
        return {**self.source.gather(mine), "index": mine.astype(np.int64)}


class TrainIterator:
    """Endless iterator of training batches; ``get_state``/``set_state`` resume exactly.

    A grain pipeline, ``MapDataset.source(batch positions).map(gather).to_iter_dataset()``: item
    ``k`` is global batch ``k`` of the stream of per-epoch permutations (a fresh permutation each
    epoch, a deterministic function of ``seed``; every example appears once per epoch, and no
    example is dropped at the end of an epoch), and each shard gathers its contiguous
    ``B // shard_count`` slice of it. grain's iterator supplies background prefetch and the
    state (the index of the next batch). Orders use NumPy's ``default_rng`` permutation, so a
    state is meant to be restored with the same NumPy major version.
    """

    def __init__(self, source: Source, batch_size: int, *, seed: int, shard_index: int = 0,
                 shard_count: int = 1, num_threads: int = 1, prefetch: int = 4):
        n = len(source)
        if n == 0:
            raise ValueError("cannot iterate over an empty source")
        if not 0 <= seed < 2**63:
            raise ValueError(f"seed must be a non-negative 64-bit integer, got {seed}")
        local = _local_batch(batch_size, shard_index, shard_count)
        self.source, self.batch_size, self.seed = source, batch_size, int(seed)
        self.shard_index, self.shard_count, self.local_batch_size = shard_index, shard_count, local
        self.positions = _BatchPositions(n, batch_size, self.seed)
        dataset = (grain.MapDataset.source(self.positions)
                   .map(_ShardGather(source, shard_index * local, local)))
        read_options = grain.ReadOptions(num_threads=num_threads, prefetch_buffer_size=prefetch)
        self._iter = iter(dataset.to_iter_dataset(read_options))

    def __iter__(self) -> TrainIterator:
        return self

    def __next__(self) -> dict[str, np.ndarray]:
        return next(self._iter)

    def _config(self) -> dict[str, int]:
        return {"seed": self.seed, "batch_size": self.batch_size, "shard_index": self.shard_index,
                "shard_count": self.shard_count, "num_examples": len(self.source)}

    def get_state(self) -> dict[str, Any]:
        """JSON-serialisable position (plus the config it is valid for)."""
        return {"grain": json.loads(json.dumps(self._iter.get_state())), **self._config()}

    def set_state(self, state: Mapping[str, Any]) -> None:
        """Continues from ``state`` (from ``get_state`` of an identically configured iterator)."""
        mismatched = {k: (state.get(k), v) for k, v in self._config().items()
                      if k in state and state[k] != v}
        if mismatched:
            raise ValueError(f"iterator state does not match this iterator (saved, current): "
                             f"{mismatched}")
        self._iter.set_state(dict(state["grain"]))


def train_batches(source: Source, batch_size: int, *, seed: int, shard_index: int = 0,
                  shard_count: int = 1, num_threads: int = 1, prefetch: int = 4) -> TrainIterator:
    """Infinite shuffled batches ``{"image": (b, ...), "label": int32 (b,), "id": int64 (b,),
    "index": int64 (b,), **fields}`` (``index``: the position in ``source``).

    ``batch_size`` is global; this process gets ``b = batch_size // shard_count`` examples, the
    ``shard_index``-th slice of each global batch. The order depends only on ``seed`` (and the
    source). ``num_threads``/``prefetch`` set grain's background reading.
    """
    return TrainIterator(source, batch_size, seed=seed, shard_index=shard_index,
                         shard_count=shard_count, num_threads=num_threads, prefetch=prefetch)


class EvalBatches:
    """One fixed-order pass; re-iterable; every batch full size with a boolean ``mask``.

    Padding rows copy the last real example of the split, have ``mask`` False and ``id`` -1.
    """

    def __init__(self, source: Source, batch_size: int, *, shard_index: int = 0,
                 shard_count: int = 1, start_batch: int = 0):
        self.local_batch_size = _local_batch(batch_size, shard_index, shard_count)
        self.source, self.batch_size = source, batch_size
        self.shard_index, self.shard_count = shard_index, shard_count
        self.start_batch = start_batch

    def __len__(self) -> int:
        """The number of batches this pass yields (after ``start_batch``)."""
        return max(self._num_batches() - self.start_batch, 0)

    def _num_batches(self) -> int:
        return math.ceil(len(self.source) / self.batch_size)

    def __iter__(self) -> Iterator[dict[str, np.ndarray]]:
        n, b, local = len(self.source), self.batch_size, self.local_batch_size
        lo = self.shard_index * local
        for k in range(self.start_batch, self._num_batches()):
            positions = np.arange(k * b + lo, k * b + lo + local, dtype=np.int64)
            mask = positions < n
            batch = self.source.gather(np.minimum(positions, n - 1))
            batch["id"] = np.where(mask, batch["id"], -1)
            batch["mask"] = mask
            yield batch


def eval_batches(source: Source, batch_size: int, *, shard_index: int = 0,
                 shard_count: int = 1, start_batch: int = 0) -> EvalBatches:
    """Fixed-order batches over ``source``, the last one padded, with a boolean ``"mask"``;
    ``start_batch`` skips the first batches without reading them (a resumed pass)."""
    return EvalBatches(source, batch_size, shard_index=shard_index, shard_count=shard_count,
                       start_batch=start_batch)
