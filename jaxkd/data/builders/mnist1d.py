"""MNIST-1D generated offline with the ``mnist1d`` package (tfds name ``mnist1d``).

``mnist1d.data.make_dataset()`` with the package's default arguments
(``mnist1d.data.get_dataset_args()``: 5000 samples, 80/20 split, fixed seed 42), so every
prepare produces the same data: 4000 train / 1000 test signals of 40 float32 samples, stored
as shape (40, 1) (length x channels), 10 classes. ``id`` is the position in
``make_dataset``'s ``x`` / ``x_test`` arrays. The package normalises the whole data set to
mean 0 and standard deviation 1 before splitting.

``make_dataset`` seeds NumPy's and Python's global RNGs; this builder saves and restores them
around the call, so preparing it does not disturb the caller's random state.

``mnist1d_tokens`` is the same data as a sequence of integer token ids, for token models
(``seq_*``, ``transformer`` with ``vocab_size``): each of the 40 samples is quantised to one of
``NUM_LEVELS`` = 16 equal-width levels over [-3, 3] (values outside are clipped into the end
levels), id = 1 + level, so ids are 1..16 and id 0 is free for padding (``vocab_size=17``,
``pad_id=0``; every sequence has all 40 tokens).
"""

from __future__ import annotations

import contextlib
import random

import numpy as np
import tensorflow_datasets as tfds

from jaxkd.data.builders import _base

SIGNAL_LENGTH = 40
NUM_LEVELS = 16
TOKEN_RANGE = (-3.0, 3.0)


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

    IMAGE_SHAPE, IMAGE_DTYPE = (SIGNAL_LENGTH, 1), np.float32

    def _info(self) -> tfds.core.DatasetInfo:
        return self.dataset_info_from_configs(
            description=__doc__,
            features=tfds.features.FeaturesDict({
                "image": tfds.features.Tensor(shape=self.IMAGE_SHAPE, dtype=self.IMAGE_DTYPE),
                "label": tfds.features.ClassLabel(num_classes=10),
                "id": tfds.features.Tensor(shape=(), dtype=np.int64),
            }),
            supervised_keys=("image", "label"),
            disable_shuffling=True,  # records in id order
            homepage="https://github.com/greydanus/mnist1d",
        )

    def _encode(self, signals: np.ndarray) -> np.ndarray:
        """The stored ``image`` of float32 ``(N, 40, 1)`` signals."""
        return signals

    def _split_generators(self, dl_manager):
        del dl_manager  # Generated locally.
        data = make_mnist1d()
        return {
            "train": self._generate_examples(self._encode(data["x"]), data["y"]),
            "test": self._generate_examples(self._encode(data["x_test"]), data["y_test"]),
        }

    def _generate_examples(self, signals, labels):
        return _base.generate_split(signals, labels)


def quantize_tokens(signals: np.ndarray, num_levels: int = NUM_LEVELS,
                    value_range: tuple[float, float] = TOKEN_RANGE) -> np.ndarray:
    """Float signals (any shape) -> int32 ids 1..num_levels: equal-width levels over
    ``value_range``, values outside it clipped into the first or last level; 0 stays free."""
    lo, hi = value_range
    edges = np.linspace(lo, hi, num_levels + 1)[1:-1]  # the num_levels - 1 inner boundaries
    return (1 + np.digitize(np.asarray(signals, np.float64), edges)).astype(np.int32)


class Mnist1dTokens(Mnist1d):
    """MNIST-1D as sequences of 40 token ids (16 quantisation levels, ids 1..16, 0 = padding)."""

    VERSION = tfds.core.Version("1.0.0")
    RELEASE_NOTES = {"1.0.0": "Initial release: 16 equal levels over [-3, 3], ids 1..16."}
    IMAGE_SHAPE, IMAGE_DTYPE = (SIGNAL_LENGTH,), np.int32

    def _encode(self, signals: np.ndarray) -> np.ndarray:
        return quantize_tokens(signals[..., 0])
