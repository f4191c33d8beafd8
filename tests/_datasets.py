"""A tiny data set with more per-example fields than image and label, prepared offline (tfds)."""

import numpy as np
import tensorflow_datasets as tfds

from jaxkd.data.builders import _base

NUM_TRAIN, NUM_TEST = 128, 64


def weighted_examples(n: int, offset: int = 0):
    """Deterministic images, labels, a float ``weight`` and an int ``box`` [4] per example."""
    rng = np.random.default_rng(offset)
    images = rng.integers(0, 256, (n, 8, 8, 1), dtype=np.uint8)
    labels = rng.integers(0, 10, n)
    weights = ((np.arange(n) + offset) % 5 / 4.0).astype(np.float32)
    boxes = np.stack([np.arange(n) + offset + k for k in range(4)], axis=1).astype(np.int32)
    return images, labels, weights, boxes


class WeightedDigits(_base.ArrayRecordBuilder):
    """8x8 random images with a per-example weight and box (tests only)."""

    VERSION = tfds.core.Version("1.0.0")
    pkg_dir_path = __import__("etils").epath.Path(__file__).parent  # (tfds looks for metadata next to the module)

    def _info(self):
        return self.dataset_info_from_configs(
            features=tfds.features.FeaturesDict({
                "image": tfds.features.Tensor(shape=(8, 8, 1), dtype=np.uint8),
                "label": tfds.features.ClassLabel(num_classes=10),
                "id": tfds.features.Tensor(shape=(), dtype=np.int64),
                "weight": tfds.features.Tensor(shape=(), dtype=np.float32),
                "box": tfds.features.Tensor(shape=(4,), dtype=np.int32),
                "caption": tfds.features.Text(),  # strings do not reach the step
            }),
            supervised_keys=("image", "label"), disable_shuffling=True)

    def _split_generators(self, dl_manager):
        return {"train": self._generate_examples(NUM_TRAIN, 0), "test": self._generate_examples(NUM_TEST, 1000)}

    def _generate_examples(self, n, offset):
        images, labels, weights, boxes = weighted_examples(n, offset)
        for i in range(n):
            yield i, {"image": images[i], "label": int(labels[i]), "id": i, "weight": weights[i], "box": boxes[i],
                      "caption": f"example {i}"}


def prepare(data_dir: str) -> str:
    builder = tfds.builder("weighted_digits", data_dir=data_dir)
    if not builder.is_prepared():
        builder.download_and_prepare(download_config=_base.offline_download_config())
    return "weighted_digits"


TOKEN_VOCAB, TOKEN_MAX_LEN, TOKEN_MARK = 12, 12, 5


def padded_token_examples(n: int, offset: int = 0):
    """Variable-length id sequences (ids 1..11, padded with 0 to 12 tokens; lengths 3..12) and
    the label "id 5 is among the real tokens" (about half of each split)."""
    rng = np.random.default_rng(offset)
    lengths = rng.integers(3, TOKEN_MAX_LEN + 1, n)
    ids = rng.choice([i for i in range(1, TOKEN_VOCAB) if i != TOKEN_MARK], size=(n, TOKEN_MAX_LEN)).astype(np.int32)
    labels = rng.integers(0, 2, n)
    for i in np.flatnonzero(labels):
        ids[i, rng.integers(0, lengths[i])] = TOKEN_MARK
    ids[np.arange(TOKEN_MAX_LEN)[None, :] >= lengths[:, None]] = 0
    return ids, labels


class PaddedTokens(_base.ArrayRecordBuilder):
    """Padded integer token sequences (tests of the token-id path only)."""

    VERSION = tfds.core.Version("1.0.0")
    pkg_dir_path = __import__("etils").epath.Path(__file__).parent

    def _info(self):
        return self.dataset_info_from_configs(
            features=tfds.features.FeaturesDict({
                "image": tfds.features.Tensor(shape=(TOKEN_MAX_LEN,), dtype=np.int32),
                "label": tfds.features.ClassLabel(num_classes=2),
                "id": tfds.features.Tensor(shape=(), dtype=np.int64),
            }),
            supervised_keys=("image", "label"), disable_shuffling=True)

    def _split_generators(self, dl_manager):
        return {"train": self._generate_examples(256, 0), "test": self._generate_examples(128, 1000)}

    def _generate_examples(self, n, offset):
        ids, labels = padded_token_examples(n, offset)
        return _base.generate_split(ids, labels)


def prepare_tokens(data_dir: str) -> str:
    builder = tfds.builder("padded_tokens", data_dir=data_dir)
    if not builder.is_prepared():
        builder.download_and_prepare(download_config=_base.offline_download_config())
    return "padded_tokens"
