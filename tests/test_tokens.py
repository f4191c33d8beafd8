"""Integer token ids through the data pipeline and `jaxkd train`: a data set whose ``image``
feature is an integer sequence reaches token models unchanged (never scaled, normalised or
augmented), padded positions are masked, and distillation between token models runs."""

import json
import os

import jax.numpy as jnp
import numpy as np
import pytest

from jaxkd import data as data_lib
from jaxkd.data import augment
from jaxkd.data.builders.mnist1d import quantize_tokens
from jaxkd.errors import ConfigError
from jaxkd.train.loop import train_and_evaluate

import _datasets
from _configs import tiny_digits_config


def test_normalize_passes_token_ids_through_and_still_scales_pixels():
    ids = np.array([[0, 3, 11, 2**20]], np.int64)
    out = augment.normalize(ids, (0.5,), (0.25,))
    assert out.dtype == jnp.int32
    np.testing.assert_array_equal(np.asarray(out), ids)
    pixels = np.array([[[[0], [51], [255]]]], np.uint8)
    np.testing.assert_allclose(np.asarray(augment.normalize(pixels, (0.5,), (0.25,))),
                               (pixels / 255.0 - 0.5) / 0.25, rtol=1e-6)


def test_quantize_tokens_matches_the_level_formula():
    # 16 levels of width 6/16 = 0.375 over [-3, 3]; outside values clip into the end levels
    x = np.array([-7.0, -3.0, -2.7, -2.5, -0.1, 0.1, 2.9, 3.0, 9.0])
    np.testing.assert_array_equal(quantize_tokens(x), [1, 1, 1, 2, 8, 9, 16, 16, 16])
    y = np.random.default_rng(0).normal(0, 2, (50, 40))
    expected = 1 + np.clip(np.floor((y + 3.0) / 0.375), 0, 15)
    np.testing.assert_array_equal(quantize_tokens(y), expected)
    assert quantize_tokens(y).dtype == np.int32


def test_mnist1d_tokens_are_the_quantised_signals(data_dir):
    info, train, test = data_lib.load_dataset("mnist1d_tokens")
    assert info.image_dtype == "int32" and info.input_shape == (40,) and (len(train), len(test)) == (4000, 1000)
    _, ftrain, _ = data_lib.load_dataset("mnist1d")
    idx = np.arange(0, 4000, 97)
    tok, sig = train.gather(idx), ftrain.gather(idx)
    assert tok["image"].dtype == np.int32
    np.testing.assert_array_equal(tok["image"], quantize_tokens(sig["image"][..., 0]))
    np.testing.assert_array_equal(tok["label"], sig["label"])


STUDENT = {"num_layers": 1, "dim": 16, "num_heads": 4, "vocab_size": _datasets.TOKEN_VOCAB,
           "max_len": _datasets.TOKEN_MAX_LEN, "pool": "mean"}
TEACHER = {**STUDENT, "num_layers": 2, "dim": 32}


def token_config(**over):
    cfg = {"data.name": "padded_tokens", "data.num_train_examples": None, "data.batch_size": 32,
           "model.name": "transformer", "model.kwargs": STUDENT, "teacher.name": "transformer",
           "teacher.kwargs": TEACHER, "method": {"name": "ce"},
           "optim.name": "adamw", "optim.lr": 3e-3, "optim.weight_decay": 0.0, "optim.schedule": "constant",
           "train.num_epochs": 6}
    cfg.update(over)
    return tiny_digits_config(**cfg)


@pytest.fixture(scope="module")
def token_teacher(tmp_path_factory, data_dir):
    _datasets.prepare_tokens(data_dir)
    wd = str(tmp_path_factory.mktemp("tokens") / "teacher")
    summary = train_and_evaluate(token_config(**{"model.kwargs": TEACHER}), wd)
    return wd, summary


def test_padded_token_data_trains_a_token_model(token_teacher):
    info, train, _ = data_lib.load_dataset("padded_tokens")
    assert info.image_dtype == "int32" and info.input_shape == (_datasets.TOKEN_MAX_LEN,)
    assert info.mean == (0.0,) and info.std == (1.0,)
    ids = train.gather(np.arange(len(train)))["image"]
    assert ids.dtype == np.int32 and (ids == 0).any()  # padded sequences, ids as stored
    np.testing.assert_array_equal(ids, _datasets.padded_token_examples(256, 0)[0])
    # "id 5 among the real tokens": learnable from the ids (a scaled or float input would not
    # even reach the embedding: the token model refuses non-integer input)
    _, summary = token_teacher
    assert summary["best_accuracy"] >= 0.9, summary


def test_distillation_between_token_models_with_padding(tmp_path, token_teacher):
    teacher_wd, teacher_summary = token_teacher
    cfg = token_config(**{"teacher.workdir": teacher_wd, "train.num_epochs": 2, "stages": [
        {"name": "minilm", "num_epochs": 1, "method": {"name": "minilm"}},
        {"name": "kd", "num_epochs": 1, "method": {"name": "hinton_kd", "temperature": 2.0, "alpha": 0.5}}]})
    summary = train_and_evaluate(cfg, str(tmp_path / "s"))
    assert summary["teacher_accuracy"] == pytest.approx(teacher_summary["last_accuracy"])
    assert summary["steps"] == 16 and np.isfinite(summary["last_accuracy"])
    assert summary["method"] == "minilm+hinton_kd"  # the stages' methods, not config.method
    assert summary["stages"] == [{"name": "minilm", "method": "minilm", "num_epochs": 1},
                                 {"name": "kd", "method": "hinton_kd", "num_epochs": 1}]
    assert teacher_summary["method"] == "ce" and "stages" not in teacher_summary
    with open(os.path.join(str(tmp_path / "s"), "metrics.jsonl")) as f:
        recs = [json.loads(ln) for ln in f]
    assert any(r.get("train/minilm_at", 0) > 0 for r in recs)


def test_token_data_refuses_image_augmentation(tmp_path, data_dir):
    _datasets.prepare_tokens(data_dir)
    with pytest.raises(ConfigError, match="token ids"):
        train_and_evaluate(token_config(**{"data.augment": {"pad": 2, "flip": False}}), str(tmp_path / "a"))
