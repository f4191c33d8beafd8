"""Tests of jaxkd.data: builders, load_dataset, batch iterators, augmentation.

Everything runs offline on tmp_path data dirs: Fashion-MNIST comes from tiny IDX files the
tests write, catalog data sets from ``tfds.testing.mock_data``.
"""

from __future__ import annotations

import gzip
import json
import os
import struct
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import tensorflow_datasets as tfds

from jaxkd.data import (
    ArraySource,
    DatasetNotFoundError,
    LazySource,
    augment,
    default_augmentation,
    eval_batches,
    load_dataset,
    steps_per_epoch,
    subset_indices,
    train_batches,
)
from jaxkd.data.builders import idx as idx_lib
from jaxkd.data.builders import fashion_mnist_local

# --------------------------------------------------------------------------------------------
# Builders
# --------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def digits(tmp_path_factory):
    data_dir = str(tmp_path_factory.mktemp("digits"))
    return data_dir, load_dataset("digits", data_dir=data_dir)


def test_digits(digits):
    from sklearn.datasets import load_digits

    data_dir, (info, train, test) = digits
    assert info.num_classes == 10
    assert info.input_shape == (8, 8, 1)
    assert (info.num_train, info.num_eval) == (1500, 297) == (len(train), len(test))
    assert info.image_dtype == "uint8"
    assert isinstance(train, ArraySource)
    bunch = load_digits()
    expected = np.round(bunch.images * 255 / 16).astype(np.uint8)[..., None]
    np.testing.assert_array_equal(train.images, expected[:1500])
    np.testing.assert_array_equal(test.images, expected[1500:])
    np.testing.assert_array_equal(train.labels, bunch.target[:1500])
    np.testing.assert_array_equal(test.ids, np.arange(297))
    example = train[7]
    assert example["image"].shape == (8, 8, 1) and example["id"] == 7
    assert example["label"] == bunch.target[7]
    # Per-channel stats are computed from the (small) train split, in [0, 1] units.
    np.testing.assert_allclose(info.mean, [expected[:1500].mean() / 255], rtol=1e-6)
    np.testing.assert_allclose(info.std, [(expected[:1500] / 255).std()], rtol=1e-6)


def test_builder_records_are_in_id_order(digits):
    data_dir, _ = digits
    ds = tfds.builder("digits", data_dir=data_dir).as_data_source("test")
    assert [int(ds[i]["id"]) for i in range(0, 297, 37)] == list(range(0, 297, 37))


def test_in_memory_cache_is_reused(digits):
    data_dir, (_, train, _) = digits
    cache_dir = os.path.join(data_dir, "digits", "1.0.0", "jaxkd_arrays")
    assert len(os.listdir(cache_dir)) == 4  # images + labels for 2 splits
    _, again, _ = load_dataset("digits", data_dir=data_dir)
    np.testing.assert_array_equal(again.images, train.images)
    _, fresh, _ = load_dataset("digits", data_dir=data_dir, cache=False)
    np.testing.assert_array_equal(fresh.images, train.images)


def _write_idx_by_hand(path, array, dtype_code, compress):
    """Independent IDX writer (not jaxkd's) so that the parser is checked against the spec."""
    header = struct.pack(">BBBB", 0, 0, dtype_code, array.ndim)
    header += b"".join(struct.pack(">I", d) for d in array.shape)
    data = header + array.astype(array.dtype.newbyteorder(">")).tobytes()
    with open(path, "wb") as f:
        f.write(gzip.compress(data) if compress else data)


def _fashion_fixture(folder, *, compress, num_train=50, num_test=20, seed=0):
    rng = np.random.default_rng(seed)
    os.makedirs(folder, exist_ok=True)
    out = {}
    for prefix, n in (("train", num_train), ("t10k", num_test)):
        images = rng.integers(0, 256, size=(n, 28, 28), dtype=np.uint8)
        labels = rng.integers(0, 10, size=n, dtype=np.uint8)
        suffix = ".gz" if compress else ""
        _write_idx_by_hand(os.path.join(folder, f"{prefix}-images-idx3-ubyte{suffix}"), images, 0x08,
                           compress)
        _write_idx_by_hand(os.path.join(folder, f"{prefix}-labels-idx1-ubyte{suffix}"), labels, 0x08,
                           compress)
        out[prefix] = (images, labels)
    return out


@pytest.mark.parametrize("compress", [True, False], ids=["gz", "raw"])
def test_fashion_mnist_local_round_trip(tmp_path, compress):
    fixture = _fashion_fixture(str(tmp_path / "idx"), compress=compress)
    info, train, test = load_dataset("fashion_mnist_local", data_dir=str(tmp_path / "data"),
                                     builder_kwargs={"idx_dir": str(tmp_path / "idx")})
    assert (info.num_classes, info.input_shape, info.image_dtype) == (10, (28, 28, 1), "uint8")
    assert (info.num_train, info.num_eval) == (50, 20)
    for source, (images, labels) in ((train, fixture["train"]), (test, fixture["t10k"])):
        np.testing.assert_array_equal(source.images, images[..., None])
        np.testing.assert_array_equal(source.labels, labels)
        np.testing.assert_array_equal(source.ids, np.arange(len(labels)))
    # Not the real 60000-image files, so the stats are computed, not Fashion-MNIST's constants.
    np.testing.assert_allclose(info.mean, [fixture["train"][0].mean() / 255], rtol=1e-6)
    builder = tfds.builder("fashion_mnist_local", data_dir=str(tmp_path / "data"))
    assert builder.info.features["label"].names[9] == "Ankle boot"


def test_fashion_mnist_local_missing_files(tmp_path):
    missing = str(tmp_path / "nowhere")
    with pytest.raises(DatasetNotFoundError) as err:
        load_dataset("fashion_mnist_local", data_dir=str(tmp_path / "data"),
                     builder_kwargs={"idx_dir": missing})
    message = str(err.value)
    for needle in (missing, "apt-get install dataset-fashion-mnist", "idx_dir", "'fashion_mnist'",
                   "train-images-idx3-ubyte"):
        assert needle in message
    # Only the test files missing: the message names just those.
    folder = tmp_path / "half"
    _fashion_fixture(str(folder), compress=True)
    for name in os.listdir(folder):
        if name.startswith("t10k-images"):
            os.remove(folder / name)
    with pytest.raises(DatasetNotFoundError, match="t10k-images-idx3-ubyte") as err:
        fashion_mnist_local.find_idx_files(folder)
    assert "train-images" not in str(err.value).split("for:")[1].split(".\n")[0]
    assert fashion_mnist_local.DEFAULT_IDX_DIR == "/usr/share/datasets/fashion-mnist"


def test_idx_parser():
    array = np.arange(24, dtype=np.int32).reshape(2, 3, 4) - 5
    header = struct.pack(">BBBB", 0, 0, 0x0C, 3) + struct.pack(">III", 2, 3, 4)
    data = header + array.astype(">i4").tobytes()
    parsed = idx_lib.parse_idx(data)
    np.testing.assert_array_equal(parsed, array)
    assert parsed.dtype.isnative
    with pytest.raises(ValueError, match="not an IDX file"):
        idx_lib.parse_idx(b"\x01\x02\x08\x01" + data[4:])
    with pytest.raises(ValueError, match="data bytes"):
        idx_lib.parse_idx(data[:-1])


def test_idx_writer_round_trip(tmp_path):
    array = np.random.default_rng(1).normal(size=(3, 5)).astype(np.float32)
    for name in ("a.idx", "a.idx.gz"):
        idx_lib.write_idx(tmp_path / name, array)
        np.testing.assert_array_equal(idx_lib.read_idx(tmp_path / name), array)


def test_mnist1d_is_deterministic(tmp_path):
    np.random.seed(123)
    expected = np.random.random()
    np.random.seed(123)
    info, train, test = load_dataset("mnist1d", data_dir=str(tmp_path / "a"))
    # make_dataset seeds NumPy's global RNG; the builder leaves the caller's state alone.
    # (Python's `random` is restored around make_dataset too, but tfds itself draws from it.)
    assert np.random.random() == expected
    assert info.input_shape == (40, 1) and info.image_dtype == "float32"
    assert (info.num_classes, info.num_train, info.num_eval) == (10, 4000, 1000)
    assert train.images.shape == (4000, 40, 1) and train.images.dtype == np.float32
    assert set(np.unique(train.labels)) == set(range(10))
    _, train2, test2 = load_dataset("mnist1d", data_dir=str(tmp_path / "b"), cache=False)
    np.testing.assert_array_equal(train.images, train2.images)
    np.testing.assert_array_equal(test.labels, test2.labels)


# --------------------------------------------------------------------------------------------
# Catalog data sets (offline: mocked / missing)
# --------------------------------------------------------------------------------------------


def test_catalog_cifar100_mocked(tmp_path):
    # tfds.testing.mock_data patches DatasetBuilder.as_data_source, so tfds.data_source returns
    # deterministic random cifar100-shaped examples (train and test are the same examples).
    with tfds.testing.mock_data(num_examples=40):
        info, train, test = load_dataset("cifar100", data_dir=str(tmp_path))
        _, lazy_train, _ = load_dataset("cifar100", data_dir=str(tmp_path), in_memory=False)
        _, small, _ = load_dataset("cifar100", data_dir=str(tmp_path), num_train_examples=10)
    assert info.num_classes == 100 and info.input_shape == (32, 32, 3)
    assert info.mean == (0.5071, 0.4867, 0.4408) and info.std == (0.2675, 0.2565, 0.2761)
    assert (info.num_train, info.num_eval, info.image_dtype) == (40, 40, "uint8")
    assert isinstance(train, ArraySource) and isinstance(lazy_train, LazySource)
    assert train.images.shape == (40, 32, 32, 3) and train.labels.max() < 100
    lazy = lazy_train.gather([3, 0, 39])
    np.testing.assert_array_equal(lazy["image"], train.images[[3, 0, 39]])
    np.testing.assert_array_equal(lazy["label"], train.labels[[3, 0, 39]])
    np.testing.assert_array_equal(lazy["id"], [3, 0, 39])
    assert lazy_train[5]["label"] == train[5]["label"]
    assert len(small) == 10 and set(small.ids) <= set(range(40))
    batch = next(train_batches(lazy_train, 8, seed=0))
    assert batch["image"].shape == (8, 32, 32, 3) and batch["label"].dtype == np.int32


def test_catalog_missing_dataset(tmp_path):
    with pytest.raises(DatasetNotFoundError) as err:
        load_dataset("cifar10", data_dir=str(tmp_path))
    message = str(err.value)
    for needle in ("'cifar10'", str(tmp_path), "download=True", "tfds build cifar10",
                   "array_record"):
        assert needle in message
    with pytest.raises(DatasetNotFoundError, match="manual download"):
        load_dataset("imagenet2012", data_dir=str(tmp_path))


def test_catalog_path_reads_prepared_array_record_and_explains_bad_splits(digits):
    # The catalog code path on real (not mocked) prepared array_record files: our digits copy.
    from jaxkd.data import pipeline

    data_dir, (_, train, _) = digits
    train_ds, _ = pipeline._catalog_sources("digits", data_dir, ("train", "test"), None, False)
    assert len(train_ds) == 1500
    np.testing.assert_array_equal(train_ds[3]["image"], train.images[3])
    with pytest.raises(DatasetNotFoundError, match=r"splits \['test', 'train'\].*eval_split="):
        pipeline._catalog_sources("digits", data_dir, ("train", "validation"), None, False)


def test_unknown_dataset_suggests(tmp_path):
    with pytest.raises(DatasetNotFoundError, match="Did you mean 'cifar100'"):
        load_dataset("cifar1000", data_dir=str(tmp_path))
    with pytest.raises(DatasetNotFoundError, match="fashion_mnist"):
        load_dataset("fashoin_mnist", data_dir=str(tmp_path))
    assert issubclass(DatasetNotFoundError, ValueError)


# --------------------------------------------------------------------------------------------
# Iterators
# --------------------------------------------------------------------------------------------


def _toy_source(n=100, num_classes=10):
    images = (np.arange(n, dtype=np.int64)[:, None, None, None] % 256).astype(np.uint8)
    images = np.broadcast_to(images, (n, 4, 4, 1)).copy()
    return ArraySource(images, np.arange(n) % num_classes)


def _take(it, k):
    return [next(it) for _ in range(k)]


def _ids(batches):
    return np.concatenate([b["id"] for b in batches])


def test_train_batches_fields_and_determinism():
    source = _toy_source()
    a = _take(train_batches(source, 8, seed=3), 30)
    b = _take(train_batches(source, 8, seed=3, num_threads=0), 30)
    c = _take(train_batches(source, 8, seed=4), 30)
    np.testing.assert_array_equal(_ids(a), _ids(b))
    assert not np.array_equal(_ids(a), _ids(c))
    first = a[0]
    assert first["image"].shape == (8, 4, 4, 1) and first["image"].dtype == np.uint8
    assert first["label"].dtype == np.int32 and first["id"].dtype == np.int64
    np.testing.assert_array_equal(first["image"][:, 0, 0, 0], first["id"] % 256)
    np.testing.assert_array_equal(first["label"], first["id"] % 10)


def test_every_example_once_per_epoch():
    source = _toy_source(100)
    ids = _ids(_take(train_batches(source, 8, seed=0), 50))  # 400 ids = 4 epochs
    epochs = ids.reshape(4, 100)
    for epoch in epochs:
        assert sorted(epoch) == list(range(100))
    assert not np.array_equal(epochs[0], epochs[1])  # reshuffled every epoch
    assert steps_per_epoch(100, 8) == 12 and steps_per_epoch(5, 8) == 0
    # Batch bigger than the data set: batches span epochs, still every example once per epoch.
    ids = _ids(_take(train_batches(_toy_source(5), 8, seed=0), 5)).reshape(8, 5)
    assert all(sorted(epoch) == list(range(5)) for epoch in ids)


def test_set_state_resumes_exactly():
    source = _toy_source(100)
    it = train_batches(source, 8, seed=7)
    _take(it, 5)
    state = json.loads(json.dumps(it.get_state()))  # JSON round trip, as in a checkpoint
    expected = _take(it, 20)  # batches 5..24 cross the epoch boundaries at 100 and 200
    restored = train_batches(source, 8, seed=7)
    restored.set_state(state)
    got = _take(restored, 20)
    for e, g in zip(expected, got):
        for key in ("image", "label", "id"):
            np.testing.assert_array_equal(e[key], g[key])
    it.set_state(state)  # rewinding the same iterator works too
    np.testing.assert_array_equal(_ids(_take(it, 20)), _ids(expected))
    with pytest.raises(ValueError, match="seed"):
        train_batches(source, 8, seed=8).set_state(state)


def test_shards_cover_the_global_batch():
    source = _toy_source(100)
    whole = _take(train_batches(source, 8, seed=1), 15)
    shards = [_take(train_batches(source, 8, seed=1, shard_index=i, shard_count=2), 15)
              for i in range(2)]
    for k in range(15):
        assert shards[0][k]["image"].shape[0] == 4
        np.testing.assert_array_equal(np.concatenate([s[k]["id"] for s in shards]), whole[k]["id"])
    with pytest.raises(ValueError, match="divisible"):
        train_batches(source, 9, seed=0, shard_count=2)


def test_eval_batches_pad_and_mask():
    source = _toy_source(10)
    batches = list(eval_batches(source, 4))
    assert len(batches) == 3 == len(eval_batches(source, 4))
    assert all(b["image"].shape == (4, 4, 4, 1) for b in batches)
    np.testing.assert_array_equal(batches[-1]["mask"], [True, True, False, False])
    assert all(b["mask"].all() for b in batches[:-1])
    ids = _ids(batches)
    np.testing.assert_array_equal(ids[:10], np.arange(10))
    np.testing.assert_array_equal(ids[10:], [-1, -1])
    # A resumed pass starts at a batch and yields the same batches from there on.
    later = list(eval_batches(source, 4, start_batch=1))
    assert len(later) == 2 == len(eval_batches(source, 4, start_batch=1))
    np.testing.assert_array_equal(_ids(later), ids[4:])
    assert len(eval_batches(source, 4, start_batch=3)) == 0 == len(list(eval_batches(source, 4, start_batch=3)))
    # Sharded: each process gets its half of every global batch; together all examples once.
    shards = [list(eval_batches(source, 4, shard_index=i, shard_count=2)) for i in range(2)]
    real = np.concatenate([b["id"][b["mask"]] for s in shards for b in s])
    assert sorted(real) == list(range(10))
    assert all(b["image"].shape[0] == 2 for s in shards for b in s)


def test_subset_indices_stratified():
    source = _toy_source(100)  # 10 classes x 10
    idx = subset_indices(source, 30, seed=0)
    assert len(idx) == 30 == len(set(idx))
    np.testing.assert_array_equal(np.bincount(source.labels[idx]), [3] * 10)
    np.testing.assert_array_equal(idx, subset_indices(source, 30, seed=0))
    assert not np.array_equal(idx, subset_indices(source, 30, seed=1))
    odd = subset_indices(source, 15, seed=0)
    assert sorted(np.bincount(source.labels[odd], minlength=10)) == [1] * 5 + [2] * 5
    with pytest.raises(ValueError):
        subset_indices(source, 101)


def test_hold_out_is_a_seeded_stratified_disjoint_split():
    from jaxkd.data import hold_out
    source = _toy_source(100)  # 10 classes x 10, ids 0..99
    rest, held = hold_out(source, 0.2, seed=3)
    assert (len(rest), len(held)) == (80, 20)
    np.testing.assert_array_equal(np.bincount(held.labels, minlength=10), [2] * 10)
    assert set(rest.ids).isdisjoint(held.ids) and set(rest.ids) | set(held.ids) == set(range(100))
    # every example keeps its image and label under its id
    np.testing.assert_array_equal(held.labels, source.labels[held.ids])
    np.testing.assert_array_equal(rest.images, source.images[rest.ids])
    np.testing.assert_array_equal(held.ids, hold_out(source, 0.2, seed=3)[1].ids)
    assert not np.array_equal(held.ids, hold_out(source, 0.2, seed=4)[1].ids)
    assert len(hold_out(source, 0.126)[1]) == 13  # round(12.6)
    for bad in (0.001, 0.999):  # nothing held out / nothing left to train on
        with pytest.raises(ValueError, match="both must be at least 1"):
            hold_out(source, bad)


def test_load_dataset_num_train_examples(digits):
    data_dir, (_, full, _) = digits
    info, train, test = load_dataset("digits", data_dir=data_dir, num_train_examples=100,
                                     subset_seed=5)
    assert info.num_train == len(train) == 100 and len(test) == 297
    np.testing.assert_array_equal(train.images, full.images[train.ids])
    assert np.bincount(train.labels, minlength=10).min() >= 9


# --------------------------------------------------------------------------------------------
# Augmentation
# --------------------------------------------------------------------------------------------


_crop_flip = jax.jit(augment.random_crop_flip, static_argnames=("pad", "flip"))
_params = jax.jit(augment.crop_flip_params, static_argnums=1, static_argnames=("pad", "flip"))


def _numpy_crop_flip(images, offsets, flips, pad):
    padded = np.pad(images, ((0, 0), (pad, pad), (pad, pad), (0, 0)))
    h, w = images.shape[1:3]
    out = np.stack([p[r:r + h, c:c + w] for p, (r, c) in zip(padded, offsets)])
    return np.where(flips[:, None, None, None], out[:, :, ::-1], out)


def test_random_crop_flip_matches_numpy():
    images = np.random.default_rng(0).integers(1, 256, (16, 6, 5, 3), dtype=np.uint8)
    rng = jax.random.PRNGKey(42)
    out = _crop_flip(rng, jnp.asarray(images), pad=2, flip=True)
    assert out.shape == images.shape and out.dtype == jnp.uint8
    offsets, flips = _params(rng, 16, pad=2, flip=True)
    offsets, flips = np.asarray(offsets), np.asarray(flips)
    assert offsets.min() >= 0 and offsets.max() <= 4
    assert 0 < flips.sum() < 16 and len({tuple(o) for o in offsets}) > 1
    np.testing.assert_array_equal(np.asarray(out), _numpy_crop_flip(images, offsets, flips, 2))


def test_random_crop_flip_outputs_are_possible_crops():
    images = np.random.default_rng(1).integers(1, 256, (8, 5, 5, 2), dtype=np.uint8)
    out = np.asarray(_crop_flip(jax.random.PRNGKey(0), jnp.asarray(images), pad=1, flip=True))
    padded = np.pad(images, ((0, 0), (1, 1), (1, 1), (0, 0)))
    for i in range(8):
        candidates = [padded[i, r:r + 5, c:c + 5] for r in range(3) for c in range(3)]
        candidates += [cand[:, ::-1] for cand in candidates]
        assert any(np.array_equal(out[i], cand) for cand in candidates)


def test_flip_only_and_identity():
    images = jnp.asarray(np.random.default_rng(2).integers(0, 256, (32, 4, 4, 1), dtype=np.uint8))
    out = np.asarray(_crop_flip(jax.random.PRNGKey(3), images, pad=0, flip=True))
    x = np.asarray(images)
    same = [np.array_equal(o, i) for o, i in zip(out, x)]
    mirrored = [np.array_equal(o, i[:, ::-1]) for o, i in zip(out, x)]
    assert all(s or m for s, m in zip(same, mirrored))
    assert any(s and not m for s, m in zip(same, mirrored))
    assert any(m and not s for s, m in zip(same, mirrored))
    assert augment.random_crop_flip(jax.random.PRNGKey(3), images, pad=0, flip=False) is images


def test_augment_deterministic_and_jittable():
    images = jnp.asarray(np.random.default_rng(3).integers(0, 256, (8, 8, 8, 3), dtype=np.uint8))
    rng = jax.random.PRNGKey(9)
    eager = augment.random_crop_flip(rng, images, pad=4, flip=True)
    np.testing.assert_array_equal(eager, augment.random_crop_flip(rng, images, pad=4, flip=True))
    np.testing.assert_array_equal(_crop_flip(rng, images, pad=4, flip=True), eager)
    other = _crop_flip(jax.random.PRNGKey(10), images, pad=4, flip=True)
    assert not np.array_equal(other, eager)
    with pytest.raises(ValueError, match="B, H, W, C"):
        augment.random_crop_flip(rng, images[0], pad=4, flip=True)


def test_normalize():
    x = np.array([[[[0, 255]]]], dtype=np.uint8).reshape(1, 1, 1, 2)
    out = jax.jit(augment.normalize)(x, (0.5, 0.0), (0.5, 2.0))
    assert out.dtype == jnp.float32
    np.testing.assert_allclose(out, [[[[-1.0, 0.5]]]])
    f = np.full((2, 40, 1), 3.0, dtype=np.float32)  # float input: no /255
    np.testing.assert_allclose(augment.normalize(f, (1.0,), (2.0,)), np.ones_like(f))


def test_default_augmentation():
    assert default_augmentation("cifar10") == {"pad": 4, "flip": True}
    assert default_augmentation("cifar100:3.0.2") == {"pad": 4, "flip": True}
    for name in ("fashion_mnist", "fashion_mnist_local", "digits", "mnist1d"):
        assert default_augmentation(name) == {"pad": 0, "flip": False}


def test_tensorflow_never_imported():
    assert "tensorflow" not in sys.modules
