"""MNIST-1D generated offline with the ``mnist1d`` package (tfds name ``mnist1d``).

``mnist1d.data.make_dataset()`` with the package's default arguments
(``mnist1d.data.get_dataset_args()``: 5000 samples, 80/20 split, fixed seed 42), so every
prepare produces the same data: 4000 train / 1000 test signals of 40 float32 samples, stored
as shape (40, 1) (length x channels), 10 classes. ``id`` is the position in
``make_dataset``'s ``x`` / ``x_test`` arrays. The package normalises the whole data set to
mean 0 and standard deviation 1 before splitting.

``make_dataset`` seeds NumPy's and Python's global RNGs; this builder saves and restores them
around the call, so preparing it does not disturb the caller's random state.
"""

from __future__ import annotations

import contextlib
import random

import numpy as np
import tensorflow_datasets as tfds

from jaxkd.data.builders import _base

SIGNAL_LENGTH = 40


@contextlib.contextmanager
def _preserve_global_rng():
    np_state, py_state = np.random.get_state(), random.getstate()
    try:
        yield
    finally:
        np.random.set_state(np_state)
        random.setstate(py_state)


def make_mnist1d() -> dict[str, np.ndarray]:
    """Returns ``{"x", "y", "x_test", "y_test"}``: float32 (N, 40, 1) signals, int64 labels."""
    from mnist1d import data as mnist1d_data  # imports matplotlib: keep it lazy

    args = mnist1d_data.get_dataset_args()
    with _preserve_global_rng():
        raw = mnist1d_data.make_dataset(args)
    out = {}
    for key in ("x", "x_test"):
        x = np.asarray(raw[key], dtype=np.float32)
        if x.ndim != 2 or x.shape[1] != SIGNAL_LENGTH:
            raise ValueError(f"mnist1d returned {key} of shape {x.shape}, expected (N, {SIGNAL_LENGTH})")
        out[key] = x[..., None]
    for key in ("y", "y_test"):
        out[key] = np.asarray(raw[key], dtype=np.int64)
    return out


class Mnist1d(_base.ArrayRecordBuilder):
    """MNIST-1D (Greydanus 2020): 40-sample 1-D signals of 10 digit templates, 4000/1000."""

    VERSION = tfds.core.Version("1.0.0")
    RELEASE_NOTES = {"1.0.0": "Initial release: make_dataset() defaults (seed 42)."}

    def _info(self) -> tfds.core.DatasetInfo:
        return self.dataset_info_from_configs(
            description=__doc__,
            features=tfds.features.FeaturesDict({
                "image": tfds.features.Tensor(shape=(SIGNAL_LENGTH, 1), dtype=np.float32),
                "label": tfds.features.ClassLabel(num_classes=10),
                "id": tfds.features.Tensor(shape=(), dtype=np.int64),
            }),
            supervised_keys=("image", "label"),
            disable_shuffling=True,  # records in id order
            homepage="https://github.com/greydanus/mnist1d",
        )

    def _split_generators(self, dl_manager):
        del dl_manager  # Generated locally.
        data = make_mnist1d()
        return {
            "train": self._generate_examples(data["x"], data["y"]),
            "test": self._generate_examples(data["x_test"], data["y_test"]),
        }

    def _generate_examples(self, signals, labels):
        return _base.generate_split(signals, labels)
