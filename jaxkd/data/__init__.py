"""Data: offline tfds builders, random-access sources, grain batch iterators, augmentation."""

from jaxkd.data import augment
from jaxkd.data.augment import default_augmentation, normalize, random_crop_flip
from jaxkd.data.errors import DatasetNotFoundError
# The pipeline needs tensorflow-datasets and grain; it is imported on first use so that the
# on-device augmentation (used inside every train step) works without them.
_PIPELINE_EXPORTS = ("ArraySource", "DatasetInfo", "EvalBatches", "LazySource", "RepeatedSource", "Source",
                     "TrainIterator", "default_data_dir", "eval_batches", "hold_out", "load_dataset", "steps_per_epoch",
                     "subset_indices", "train_batches")


def __getattr__(name: str):
    if name in _PIPELINE_EXPORTS:
        from jaxkd.data import pipeline

        return getattr(pipeline, name)
    if name == "pipeline":
        import importlib

        return importlib.import_module("jaxkd.data.pipeline")
    raise AttributeError(f"module 'jaxkd.data' has no attribute {name!r}")


__all__ = [
    "ArraySource", "DatasetInfo", "DatasetNotFoundError", "EvalBatches", "LazySource", "RepeatedSource", "Source",
    "TrainIterator", "augment", "default_augmentation", "default_data_dir", "eval_batches",
    "hold_out", "load_dataset", "normalize", "random_crop_flip", "steps_per_epoch", "subset_indices",
    "train_batches",
]
