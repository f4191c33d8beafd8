"""Shared pieces of jaxkd's offline tfds builders.

Every built-in builder writes ``array_record`` files so that it can be read back through
``builder.as_data_source(split)`` (random access, no TensorFlow needed).
"""

from __future__ import annotations

from typing import Any, Iterator, Sequence

import inspect

from etils import epath
import numpy as np
import tensorflow_datasets as tfds


def offline_download_config() -> tfds.download.DownloadConfig:
    """Prepare settings for offline builders: no GCS look-up (no network), no statistics (needs TF)."""
    return tfds.download.DownloadConfig(
        try_download_gcs=False, compute_stats=tfds.download.ComputeStatsMode.SKIP)


class ArrayRecordBuilder(tfds.core.GeneratorBasedBuilder, skip_registration=True):
    """A ``GeneratorBasedBuilder`` whose default file format is ``array_record``.

    Subclasses pass ``disable_shuffling=True`` to ``dataset_info_from_configs`` and use the
    example index as key, so record ``i`` of a split is the example whose ``id`` is ``i``.
    """

    def __init__(self, *, file_format: str | None = None, **kwargs: Any):
        super().__init__(file_format=file_format or "array_record", **kwargs)

    # tfds's own ``code_path`` probes ``importlib_resources`` (an optional package that is not
    # installed here) for builders defined inside a package; the plain file path is all that
    # tfds needs it for (looking up a ``checksums.tsv`` next to the builder, which we have none of).
    @tfds.core.utils.classproperty
    @classmethod
    def code_path(cls) -> epath.Path | None:
        try:
            return epath.Path(inspect.getfile(cls))
        except (TypeError, OSError):
            return None


def image_features(shape: tuple[int, int, int], *, num_classes: int | None = None,
                   label_names: Sequence[str] | None = None) -> tfds.features.FeaturesDict:
    """``{"image": uint8 (H, W, C), "label": ClassLabel, "id": int64 index within the split}``.

    The image is a plain ``Tensor`` feature (raw bytes), not ``tfds.features.Image``: the
    latter PNG-encodes with TensorFlow at prepare time, and raw bytes also read back faster.
    """
    if label_names is not None:
        label = tfds.features.ClassLabel(names=list(label_names))
    else:
        label = tfds.features.ClassLabel(num_classes=num_classes)
    return tfds.features.FeaturesDict({
        "image": tfds.features.Tensor(shape=shape, dtype=np.uint8),
        "label": label,
        "id": tfds.features.Tensor(shape=(), dtype=np.int64),
    })


def generate_split(images: np.ndarray, labels: np.ndarray) -> Iterator[tuple[int, dict]]:
    """Yields ``(key, example)`` pairs; ``id`` (and the key) is the index within the split."""
    if len(images) != len(labels):
        raise ValueError(f"{len(images)} images but {len(labels)} labels in the same split")
    for i in range(len(images)):
        yield i, {"image": images[i], "label": int(labels[i]), "id": i}
