"""Label Refinery: the KL against numpy, adversarial jittering, `jaxkd refine` generations end to end."""

import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from orbax import checkpoint as ocp

from jaxkd import cli, models
from jaxkd.methods.label_refinery import adversarial_jitter, label_refinery_recipe, refinery_kl
from jaxkd.train import checkpoint as ckpt_lib
from jaxkd.train import step as step_lib

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DIGITS = os.path.join(ROOT, "experiments/configs/digits.py")


def _np_softmax(z):
    e = np.exp(z - z.max(-1, keepdims=True))
    return e / e.sum(-1, keepdims=True)


def test_refinery_kl_matches_numpy_and_ignores_labels():
    rng = np.random.default_rng(0)
    s, r = rng.normal(size=(4, 6)).astype(np.float32), 2 * rng.normal(size=(4, 6)).astype(np.float32)
    p_r, p_s = _np_softmax(r), _np_softmax(s)
    np.testing.assert_allclose(refinery_kl(jnp.asarray(s), jnp.asarray(r)),
                               (p_r * (np.log(p_r) - np.log(p_s))).sum(-1), rtol=1e-5, atol=1e-6)
    g = jax.grad(lambda r: refinery_kl(jnp.asarray(s), r).sum())(jnp.asarray(r))
    assert np.all(np.asarray(g) == 0)  # the refinery is a constant target


def test_adversarial_jitter_is_one_signed_step_on_the_refinery():
    w = jax.random.normal(jax.random.PRNGKey(0), (12, 5))
    apply = lambda x: (x.reshape(x.shape[0], -1) @ w, {})  # noqa: E731
    x = jax.random.normal(jax.random.PRNGKey(1), (8, 3, 4))
    np.testing.assert_array_equal(adversarial_jitter(apply, x, 0.0, jax.random.PRNGKey(2), 1.0), x)
    eps = 0.1
    x_all = adversarial_jitter(apply, x, eps, jax.random.PRNGKey(2), 1.0)
    np.testing.assert_allclose(np.abs(np.asarray(x_all - x)), eps, rtol=1e-5)
    own = jnp.argmax(apply(x)[0], -1)
    ce = lambda z: -jnp.take_along_axis(jax.nn.log_softmax(apply(z)[0]), own[:, None], 1)  # noqa: E731
    assert np.all(np.asarray(ce(x_all)) > np.asarray(ce(x)))  # moved away from its own prediction
    x_half = np.asarray(adversarial_jitter(apply, x, eps, jax.random.PRNGKey(3), 0.5))
    moved = np.any(x_half != np.asarray(x), axis=(1, 2))
    assert 0 < moved.sum() < 8
    np.testing.assert_allclose(x_half[moved], np.asarray(x_all)[moved], rtol=1e-6)


def test_refinery_step_with_jittering_trains_without_labels():
    student, refinery = models.create_model("mlp", 10, hidden=(8,)), models.create_model("mlp", 10, hidden=(16,))
    sample = jnp.zeros((1, 8, 8, 1))
    r_vars = refinery.init(jax.random.PRNGKey(1), sample)
    rng = np.random.default_rng(0)
    batch = {"image": rng.integers(0, 17, (16, 8, 8, 1)).astype(np.uint8), "label": rng.integers(0, 10, 16)}
    outs = []
    for eps in (0.0, 0.3):
        recipe = label_refinery_recipe(adversarial_eps=eps)
        tx = optax.sgd(0.1)
        state = step_lib.create_train_state(jax.random.PRNGKey(0), student, recipe, tx, sample)
        step = step_lib.make_train_step(student, recipe, tx, step_lib.InputPipeline((8.0,), (4.0,)),
                                        teacher=refinery, donate=False)
        new, m = step(state, r_vars, batch)
        # hard labels are not used: other labels give the same update
        new2, _ = step(state, r_vars, {**batch, "label": (batch["label"] + 3) % 10})
        jax.tree.map(np.testing.assert_array_equal, new.params, new2.params)
        outs.append(float(m["kd"]))
    assert np.isfinite(outs).all() and outs[0] != outs[1]


def _main(capsys, *argv):
    with pytest.raises(SystemExit) as exc:
        cli.main(list(argv))
    out = capsys.readouterr()
    return exc.value.code, out.out, out.err


def _meta_config(workdir):
    mgr = ckpt_lib.run_manager(workdir)
    r = mgr.restore(mgr.latest_step(), args=ocp.args.Composite(meta=ocp.args.JsonRestore()))
    return r.meta["config"]


def test_cli_refine_generations(capsys, tmp_path, data_dir):
    wd = str(tmp_path / "ref")
    common = ["train.num_epochs=1", "train.progress=False", "train.tensorboard=False",
              "data.num_train_examples=640", "model.kwargs={'hidden': (16,)}"]
    code, out, err = _main(capsys, "refine", "--config", DIGITS, "--workdir", wd, "--generations", "2", *common)
    assert code == 0, err
    rows = json.load(open(os.path.join(wd, "results.json")))
    assert [r["generation"] for r in rows] == [0, 1, 2]
    assert [r["method"] for r in rows] == ["ce", "label_refinery", "label_refinery"]
    table = open(os.path.join(wd, "results.md")).read()
    assert len([ln for ln in table.splitlines() if ln.startswith("| ") and ln[2].isdigit()]) == 3
    for g in (1, 2):
        prev = os.path.join(wd, f"gen{g - 1}")
        assert rows[g]["teacher_workdir"] == prev
        cfg = _meta_config(os.path.join(wd, f"gen{g}"))  # gen g's frozen teacher is gen g-1's checkpoint
        assert cfg["teacher"]["workdir"] == prev and cfg["teacher"]["name"] == "mlp"
        assert rows[g]["teacher_accuracy"] == pytest.approx(rows[g - 1]["best_accuracy"])
    # run again: every generation is finished and skipped
    code, out, _ = _main(capsys, "refine", "--config", DIGITS, "--workdir", wd, "--generations", "2", *common)
    assert code == 0 and out.count("[finished, skipped]") == 3
    assert json.load(open(os.path.join(wd, "results.json"))) == rows


@pytest.mark.slow
def test_refine_with_a_different_refinery(tmp_path, data_dir):
    from jaxkd import config as config_lib
    from jaxkd.refinery import refine
    c = config_lib.load_config(DIGITS)
    c.train.num_epochs, c.train.progress, c.train.tensorboard = 1, False, False
    c.teacher.kwargs = {"width": 8}
    c.method = {"name": "label_refinery", "adversarial_eps": 0.1}
    rows = refine(c, str(tmp_path / "r"), 1, refinery="teacher", progress=False)
    assert [r["model"] for r in rows] == ["cnn", "mlp"]
    assert _meta_config(str(tmp_path / "r" / "gen1"))["method"]["adversarial_eps"] == 0.1
