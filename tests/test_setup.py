"""The run setup and the method registry: runs recorded before the rewrite are reproduced, a user's
config file registers its own method for `jaxkd train`, configs stored by older versions load,
and a changed method or model name drops the old name's options."""

import json
import os
import textwrap

import jax
import ml_collections
import numpy as np
import pytest

from jaxkd import config as config_lib
from jaxkd.core import build_recipe, recipe_options
from jaxkd.errors import ConfigError
from jaxkd.experiment import preset_config, teacher_config
from jaxkd.train import checkpoint as ckpt_lib
from jaxkd.train.loop import train_and_evaluate

from _configs import tiny_digits_config

REFERENCE = os.path.join(os.path.dirname(os.path.abspath(__file__)), "data", "run_reference.json")


def _leaves(workdir):
    _, state = ckpt_lib.load_run_state(workdir)
    flat = jax.tree_util.tree_flatten_with_path({"params": state["params"], "model_state": state["model_state"]})[0]
    return {jax.tree_util.keystr(k): np.asarray(v).ravel() for k, v in flat}


def test_configs_of_the_recorded_runs_train_as_they_did(tmp_path, data_dir):
    """tests/data/run_reference.json: a teacher (CE, SGD), a KD student of it (SGD), and CE students
    with Adam and AdamW, recorded at 7209601 before the setup, registry and optimizer rewrite.
    Their stored configs (old format: Hinton KD keys in every method) train again to the same
    parameters: float32 round-off at most (we see equality; rtol 1e-6 tolerates another CPU's
    vectorisation)."""
    ref = json.load(open(REFERENCE))["runs"]
    teacher = str(tmp_path / "teacher")
    for name, run in ref.items():
        cfg = config_lib.upgrade_config(run["config"], lambda n: set(recipe_options(n)))
        if name == "teacher_ce_sgd":
            wd = teacher
        else:
            wd = str(tmp_path / name)
            if cfg["teacher"]["workdir"]:
                cfg["teacher"]["workdir"] = teacher
        import ml_collections
        train_and_evaluate(ml_collections.ConfigDict(cfg), wd)
        got = _leaves(wd)
        assert set(got) == set(run["leaves"]), name
        for key, want in run["leaves"].items():
            np.testing.assert_allclose(got[key], np.asarray(want, np.float32), rtol=1e-6, atol=1e-7,
                                       err_msg=f"{name} {key}")


USER_CONFIG = textwrap.dedent('''
    """A config file that brings its own method: CE on the labels plus 0.5 * the student's
    output entropy (a made-up recipe; it only has to differ from the built-ins)."""
    import os, sys
    import jax, jax.numpy as jnp
    from jaxkd.config import load_config
    from jaxkd.core import Recipe, register_recipe
    from jaxkd import losses

    def entropy_bonus_recipe(weight: float = 0.5):
        def loss(inp):
            ce = losses.cross_entropy(inp.student_logits, inp.labels)
            p = jax.nn.softmax(inp.student_logits)
            ent = -jnp.sum(p * jax.nn.log_softmax(inp.student_logits), -1)
            return ce + weight * ent, {"ce": ce, "entropy": ent}
        return Recipe(name="entropy_bonus", loss=loss)

    register_recipe("entropy_bonus", entropy_bonus_recipe)

    def get_config():
        c = load_config(os.path.join(DIGITS_DIR, "digits.py"))
        c.method = {"name": "entropy_bonus", "weight": 0.25}
        c.data.num_train_examples = 128
        c.model.kwargs = {"hidden": (16,)}
        c.train.num_epochs, c.train.progress, c.train.tensorboard = 1, False, False
        return c
''')


def test_a_users_config_file_registers_its_method_for_jaxkd_train(tmp_path, data_dir, capsys):
    from jaxkd import cli

    path = tmp_path / "my_config.py"
    digits_dir = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "experiments", "configs")
    path.write_text(f"DIGITS_DIR = {digits_dir!r}\n" + USER_CONFIG)
    wd = str(tmp_path / "run")
    with pytest.raises(SystemExit) as exc:
        cli.main(["train", "--config", str(path), "--workdir", wd])
    assert exc.value.code == 0, capsys.readouterr().err
    rec = json.loads(open(os.path.join(wd, "metrics.jsonl")).readline())
    assert rec["train/loss"] == pytest.approx(rec["train/ce"] + 0.25 * rec["train/entropy"], rel=1e-5)
    # its options come from the factory's signature, like a built-in's
    with pytest.raises(SystemExit):
        cli.main(["train", "--config", str(path), "--workdir", str(tmp_path / "bad"), "method.wieght=1"])
    assert "method 'entropy_bonus' has no option 'wieght'; did you mean 'weight'?" in capsys.readouterr().err


def test_register_recipe_rules():
    from jaxkd.core import register_recipe

    with pytest.raises(ValueError, match="already registered"):
        register_recipe("hinton_kd", lambda temperature=1.0: None)
    with pytest.raises(TypeError, match="by keyword with defaults"):
        register_recipe("needs_positional", lambda x: None)
    with pytest.raises(ConfigError, match="returned NoneType, not a Recipe"):
        register_recipe("returns_none", lambda: None)
        build_recipe({"name": "returns_none"})


def test_configs_stored_by_earlier_versions_load():
    stored = {"method": {"name": "ce", "temperature": 4.0, "alpha": 0.9, "gamma": 0.1, "mode": "kl"},
              "stages": [{"num_epochs": 1, "method": {"name": "apprentice", "kd_temperature": 2.0,
                                                      "temperature": 4.0, "alpha": 0.9, "gamma": 0.1, "mode": "kl"}},
                         {"num_epochs": 1, "method": {"name": "hinton_kd", "temperature": 4.0, "alpha": 0.9,
                                                      "gamma": 0.1, "mode": "kl"}}],
              "optim": {"name": "sgd", "lr": 0.1}, "data": {"name": "digits"}}
    new = config_lib.upgrade_config(stored, lambda n: set(recipe_options(n)))
    assert new["data"] == {"name": "digits", "copies": 1} and stored["data"] == {"name": "digits"}
    assert new["method"] == {"name": "ce"}
    assert new["stages"][0]["method"] == {"name": "apprentice", "temperature": 2.0}  # the renamed option
    assert new["stages"][1]["method"] == stored["stages"][1]["method"]  # hinton_kd takes them all
    assert new["optim"] == {"name": "sgd", "lr": 0.1, "kwargs": {}, "clip_grad_norm": None, "weight_decay_mask": None,
                            "reset_momentum_at_milestones": False}
    assert stored["method"]["temperature"] == 4.0  # the input is not changed
    for m in (new["method"], *(s["method"] for s in new["stages"])):
        build_recipe(m)  # every upgraded method builds


def test_a_changed_name_drops_the_old_names_options():
    c = tiny_digits_config()
    assert c.method.to_dict() == {"name": "hinton_kd", "temperature": 4.0, "alpha": 0.9, "gamma": 0.1}
    ce = config_lib.apply_overrides(c, ["method.name=ce"])
    assert ce.method.to_dict() == {"name": "ce"}
    # options given with the new name stay, whatever their order on the command line
    kd = config_lib.apply_overrides(ce, ["method.temperature=2.0", "method.name=hinton_kd"])
    assert kd.method.to_dict() == {"name": "hinton_kd", "temperature": 2.0}
    cnn = config_lib.apply_overrides(c, ["model.kwargs={'width': 8}", "model.name=cnn"])
    assert cnn.model.name == "cnn" and cnn.model.kwargs.to_dict() == {"width": 8}
    same = config_lib.apply_overrides(c, ["model.name=mlp"])  # unchanged name: options kept
    assert same.model.kwargs.to_dict() == {"hidden": (16,)}
    assert teacher_config(c).method.to_dict() == {"name": "ce"}


def test_a_preset_sets_the_fields_it_names_and_replaces_the_method():
    c = config_lib.apply_overrides(tiny_digits_config(), ["data.num_train_examples=300", "optim.lr=0.2"])
    c.presets = {
        "dkd": {"method": {"name": "dkd", "beta": 2.0}},  # whole method: no KD temperature carried over
        "cnn": {"model": {"kwargs": {"width": 8}, "name": "cnn"}, "data": {"copies": 2}, "optim": {"lr": 0.01}},
        "stages": {"stages": [{"name": "a", "num_epochs": 1, "method": {"name": "ce"}}]},
    }
    dkd = preset_config(c, "dkd")
    assert dkd.method.to_dict() == {"name": "dkd", "beta": 2.0}
    cnn = preset_config(c, "cnn")  # name applied first, so the kwargs given with it stay
    assert cnn.model.name == "cnn" and cnn.model.kwargs.to_dict() == {"width": 8}
    assert cnn.data.copies == 2 and cnn.data.num_train_examples == 300 and cnn.data.name == c.data.name
    assert cnn.optim.lr == 0.01 and cnn.optim.name == c.optim.name and cnn.method == c.method
    assert preset_config(c, "stages").stages[0]["method"] == {"name": "ce"}
    with pytest.raises(ConfigError, match="unknown config key 'data.copys'; did you mean 'data.copies'"):
        preset_config(ml_collections.ConfigDict({**c.to_dict(), "presets": {"bad": {"data": {"copys": 2}}}}), "bad")
