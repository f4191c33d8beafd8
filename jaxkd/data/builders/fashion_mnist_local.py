"""Fashion-MNIST read from local IDX files (tfds name ``fashion_mnist_local``).

The tfds catalog's own ``fashion_mnist`` downloads the files; this builder never touches the
network. It reads the four original files

    train-images-idx3-ubyte  train-labels-idx1-ubyte  t10k-images-idx3-ubyte  t10k-labels-idx1-ubyte

each either raw or gzip-compressed (``.gz`` suffix), from ``idx_dir`` (default
``/usr/share/datasets/fashion-mnist``, where Debian's ``dataset-fashion-mnist`` package puts
them). ``train`` is the 60000-image training file, ``test`` the 10000-image t10k file, both in
file order (``id`` = position in the file).

Once prepared, the data set lives in ``data_dir/fashion_mnist_local/VERSION`` and the IDX files
are no longer read: pointing ``idx_dir`` elsewhere later does not re-prepare it (delete that
folder, or use another ``data_dir``, to rebuild from other files).
"""

from __future__ import annotations

import os
from typing import Any

import numpy as np
import tensorflow_datasets as tfds

from jaxkd.data.builders import _base
from jaxkd.data.builders.idx import read_idx
from jaxkd.data.errors import DatasetNotFoundError

DEFAULT_IDX_DIR = "/usr/share/datasets/fashion-mnist"
LABEL_NAMES = ("T-shirt/top", "Trouser", "Pullover", "Dress", "Coat",
               "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot")
SPLIT_FILES = {
    "train": ("train-images-idx3-ubyte", "train-labels-idx1-ubyte"),
    "test": ("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte"),
}


def find_idx_files(idx_dir: str | os.PathLike) -> dict[str, tuple[str, str]]:
    """Returns ``{split: (images_path, labels_path)}``; raises DatasetNotFoundError if any is missing."""
    idx_dir = os.path.expanduser(os.fspath(idx_dir))
    found, missing = {}, []
    for split, stems in SPLIT_FILES.items():
        paths = []
        for stem in stems:
            candidates = [os.path.join(idx_dir, stem), os.path.join(idx_dir, stem + ".gz")]
            path = next((c for c in candidates if os.path.isfile(c)), None)
            if path is None:
                missing.append(stem + "[.gz]")
            paths.append(path)
        found[split] = tuple(paths)
    if missing:
        where = f"folder {idx_dir!r}" if os.path.isdir(idx_dir) else f"{idx_dir!r} (no such folder)"
        raise DatasetNotFoundError(
            f"fashion_mnist_local: the Fashion-MNIST IDX files are missing; looked in {where} "
            f"for: {', '.join(missing)}.\nTo get them, either\n"
            f"  * install Debian's package:  apt-get install dataset-fashion-mnist  "
            f"(puts them in {DEFAULT_IDX_DIR}), or\n"
            "  * download the four *-ubyte.gz files and pass their folder, e.g. "
            "load_dataset('fashion_mnist_local', builder_kwargs={'idx_dir': '/path/to/dir'}), or\n"
            "  * with internet access, use the tfds catalog's 'fashion_mnist' instead "
            "(load_dataset('fashion_mnist', download=True)).")
    return found


def read_split(images_path: str, labels_path: str) -> tuple[np.ndarray, np.ndarray]:
    """Reads one split: ``(uint8 images (N, 28, 28, 1), int64 labels (N,))``."""
    images = read_idx(images_path)
    labels = read_idx(labels_path)
    if images.ndim != 3 or images.dtype != np.uint8:
        raise ValueError(f"{images_path}: expected uint8 images of shape (N, H, W), got "
                         f"{images.dtype} {images.shape}")
    if labels.ndim != 1 or len(labels) != len(images):
        raise ValueError(f"{labels_path}: expected {len(images)} labels, got shape {labels.shape}")
    if len(labels) and (labels.min() < 0 or labels.max() >= len(LABEL_NAMES)):
        raise ValueError(f"{labels_path}: labels outside 0..{len(LABEL_NAMES) - 1}")
    return images[..., None], labels.astype(np.int64)


class FashionMnistLocal(_base.ArrayRecordBuilder):
    """Fashion-MNIST (28x28 grey, 10 classes, 60000 train / 10000 test) from local IDX files."""

    VERSION = tfds.core.Version("1.0.0")
    RELEASE_NOTES = {"1.0.0": "Initial release."}

    def __init__(self, *, idx_dir: str | os.PathLike | None = None, **kwargs: Any):
        self.idx_dir = os.fspath(idx_dir) if idx_dir is not None else DEFAULT_IDX_DIR
        super().__init__(**kwargs)

    def _info(self) -> tfds.core.DatasetInfo:
        return self.dataset_info_from_configs(
            description=__doc__,
            features=_base.image_features((28, 28, 1), label_names=LABEL_NAMES),
            supervised_keys=("image", "label"),
            disable_shuffling=True,  # records in id order
            homepage="https://github.com/zalandoresearch/fashion-mnist",
        )

    def _split_generators(self, dl_manager):
        del dl_manager  # Local files only.
        files = find_idx_files(self.idx_dir)
        return {split: self._generate_examples(*files[split]) for split in SPLIT_FILES}

    def _generate_examples(self, images_path, labels_path):
        images, labels = read_split(images_path, labels_path)
        return _base.generate_split(images, labels)
