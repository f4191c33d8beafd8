"""Data: offline tfds builders, random-access sources, grain batch iterators, augmentation."""

from jaxkd.data import augment
from jaxkd.data.augment import default_augmentation, normalize, random_crop_flip
from jaxkd.data.errors import DatasetNotFoundError
from jaxkd.data.pipeline import (
    ArraySource,
    DatasetInfo,
    EvalBatches,
    LazySource,
    Source,
    TrainIterator,
    default_data_dir,
    eval_batches,
    load_dataset,
    steps_per_epoch,
    subset_indices,
    train_batches,
)

__all__ = [
    "ArraySource", "DatasetInfo", "DatasetNotFoundError", "EvalBatches", "LazySource", "Source",
    "TrainIterator", "augment", "default_augmentation", "default_data_dir", "eval_batches",
    "load_dataset", "normalize", "random_crop_flip", "steps_per_epoch", "subset_indices",
    "train_batches",
]
