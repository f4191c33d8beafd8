"""scikit-learn's bundled ``load_digits`` as an offline tfds builder (name ``digits``).

1797 grey 8x8 images of hand-written digits, shipped inside scikit-learn (no download).
Pixel values 0..16 are stored as uint8 images of shape (8, 8, 1) rescaled to 0..255 with
``round(v * 255 / 16)``.

Split (deterministic, no RNG): the first 1500 examples of ``load_digits()`` are ``train``,
the last 297 are ``test``. scikit-learn keeps the examples in the original (roughly
per-writer) order, so the test split mostly holds writers not seen in training.
"""

from __future__ import annotations

import numpy as np
import tensorflow_datasets as tfds

from jaxkd.data.builders import _base

NUM_TRAIN = 1500
NUM_TEST = 297


def load_digits_uint8() -> tuple[np.ndarray, np.ndarray]:
    """Returns ``(images uint8 (1797, 8, 8, 1), labels int64 (1797,))`` in scikit-learn's order."""
    from sklearn.datasets import load_digits

    bunch = load_digits()
    images = np.round(bunch.images * (255.0 / 16.0)).astype(np.uint8)[..., None]
    return images, np.asarray(bunch.target, dtype=np.int64)


class Digits(_base.ArrayRecordBuilder):
    """scikit-learn's 8x8 hand-written digits: first 1500 examples train, last 297 test."""

    VERSION = tfds.core.Version("1.0.0")
    RELEASE_NOTES = {"1.0.0": "Initial release: first 1500 examples train, last 297 test."}

    def _info(self) -> tfds.core.DatasetInfo:
        return self.dataset_info_from_configs(
            description=__doc__,
            features=_base.image_features((8, 8, 1), num_classes=10),
            supervised_keys=("image", "label"),
            disable_shuffling=True,  # records in id order
            homepage="https://scikit-learn.org/stable/datasets/toy_dataset.html#digits-dataset",
        )

    def _split_generators(self, dl_manager):
        del dl_manager  # Everything ships with scikit-learn.
        images, labels = load_digits_uint8()
        return {
            "train": self._generate_examples(images[:NUM_TRAIN], labels[:NUM_TRAIN]),
            "test": self._generate_examples(images[NUM_TRAIN:], labels[NUM_TRAIN:]),
        }

    def _generate_examples(self, images, labels):
        return _base.generate_split(images, labels)
