"""Deliberate bugs that the default test suite must catch: ``python tests/mutants/check_mutants.py``.

Each mutant is one textual change to a copy of ``jaxkd/`` (a sign, a constant, a reduction, a
``stop_gradient`` added or removed) in a loss, in the BSS step rule or in MEAL V2's gradient
routing. For each, the test files that cover that code run against the mutated copy (default
selection, i.e. without ``slow`` tests); the mutant must make at least one test fail ("killed").
A surviving mutant is printed and makes the script exit 1: either a test is missing or the
change does not alter behaviour (then say why next to it and drop it).

Options: ``-k TEXT`` runs only mutants whose name contains TEXT; ``--list`` prints them.
Takes about 20 minutes on 2 cores (the copies share the suite's XLA compilation cache).
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

# (name, file under jaxkd/, exact text, replacement, test files)
MUTANTS = [
    # -- logit losses
    ("cross_entropy halved", "losses/logits.py", "    return soft_cross_entropy(logits, targets, axis=axis)\n",
     "    return 0.5 * soft_cross_entropy(logits, targets, axis=axis)\n", ["test_losses.py"]),
    ("cross_entropy label smoothing sign", "losses/logits.py",
     "targets * (1.0 - label_smoothing) + label_smoothing / num_classes",
     "targets * (1.0 + label_smoothing) - label_smoothing / num_classes", ["test_losses.py"]),
    ("soft_cross_entropy mean over classes", "losses/logits.py",
     "return -jnp.sum(target_probs.astype(jnp.float32) * log_p, axis=axis)",
     "return -jnp.mean(target_probs.astype(jnp.float32) * log_p, axis=axis)", ["test_losses.py"]),
    ("hinton_kd T instead of T^2", "losses/logits.py", "    return per_example * (temperature ** 2)",
     "    return per_example * temperature", ["test_losses.py"]),
    ("hinton_kd teacher not stopped", "losses/logits.py",
     "t = jax.lax.stop_gradient(teacher_logits).astype(jnp.float32) / temperature",
     "t = teacher_logits.astype(jnp.float32) / temperature", ["test_losses.py"]),
    ("hinton_kd student not tempered", "losses/logits.py",
     "    s = student_logits.astype(jnp.float32) / temperature\n    log_p_t",
     "    s = student_logits.astype(jnp.float32)\n    log_p_t", ["test_losses.py"]),
    ("hinton_kd legacy_mean divisor", "losses/logits.py", "per_example = per_example / student_logits.shape[axis]",
     "per_example = per_example / 2", ["test_losses.py"]),
    ("hinton_kd soft_ce sign", "losses/logits.py", "per_example = -jnp.sum(p_t * log_p_s, axis=axis)",
     "per_example = jnp.sum(p_t * log_p_s, axis=axis)", ["test_losses.py"]),
    # -- feature losses
    ("fitnets_hint sum", "losses/features.py",
     "return jnp.mean(jnp.square(diff), axis=tuple(range(1, diff.ndim)))",
     "return jnp.sum(jnp.square(diff), axis=tuple(range(1, diff.ndim)))", ["test_feature_losses.py"]),
    ("at code: sum over space", "losses/features.py", "term = jnp.mean(jnp.square(diff), axis=-1)",
     "term = jnp.sum(jnp.square(diff), axis=-1)", ["test_feature_losses.py"]),
    ("at paper: beta not halved", "losses/features.py", "scale = beta if mode == \"code\" else beta / 2.0",
     "scale = beta", ["test_feature_losses.py"]),
    ("at map: no normalisation", "losses/features.py", "    return _l2_normalize(q.reshape(q.shape[0], -1))\n\n\ndef attention_transfer",
     "    return q.reshape(q.shape[0], -1)\n\n\ndef attention_transfer", ["test_feature_losses.py"]),
    ("at teacher not pooled/stopped", "losses/features.py",
     "s_name, jax.lax.stop_gradient(_as_nhwc(ft, layout)), t_name)",
     "s_name, _as_nhwc(ft, layout), t_name)", ["test_feature_losses.py"]),
    ("fitnets teacher not stopped", "losses/features.py",
     "student_regressed.astype(dtype) - jax.lax.stop_gradient(teacher_feature).astype(dtype)",
     "student_regressed.astype(dtype) - teacher_feature.astype(dtype)", ["test_feature_losses.py"]),
    ("fsp teacher not stopped", "losses/features.py",
     "g_t = fsp_matrix(jax.lax.stop_gradient(t_a), jax.lax.stop_gradient(t_b))", "g_t = fsp_matrix(t_a, t_b)",
     ["test_feature_losses.py"]),
    ("gradient AT teacher not stopped", "losses/features.py", "jax.lax.stop_gradient(teacher_grad), \"teacher_grad\")",
     "teacher_grad, \"teacher_grad\")", ["test_feature_losses.py"]),
    ("fsp without /HW", "losses/features.py", "    return jnp.einsum(\"bhwc,bhwd->bcd\", a, b) / hw",
     "    return jnp.einsum(\"bhwc,bhwd->bcd\", a, b)", ["test_feature_losses.py"]),
    ("fsp sum over matrix", "losses/features.py", "term = jnp.mean(jnp.square(g_s - g_t), axis=(1, 2))",
     "term = jnp.sum(jnp.square(g_s - g_t), axis=(1, 2))", ["test_feature_losses.py"]),
    ("gradient AT mean", "losses/features.py", "    return jnp.sum(jnp.square(diff), axis=-1)\n\n\n# ------",
     "    return jnp.mean(jnp.square(diff), axis=-1)\n\n\n# ------", ["test_feature_losses.py"]),
    ("gradient AT map p ignored", "losses/features.py", "    q = jnp.sum(jnp.abs(g) ** p, axis=-1)",
     "    q = jnp.sum(jnp.abs(g), axis=-1)", ["test_feature_losses.py"]),
    # -- multi-teacher losses
    ("ensemble_kd no T^2", "losses/ensemble.py", "return jnp.sum(pbar * (log_pbar - log_q), axis=-1) * temperature ** 2",
     "return jnp.sum(pbar * (log_pbar - log_q), axis=-1)", ["test_ensemble.py"]),
    ("ensemble weights not normalised", "losses/ensemble.py", "    return w / jnp.sum(w, axis=0, keepdims=True)",
     "    return w", ["test_ensemble.py"]),
    ("relabel_kd sum over teachers", "losses/ensemble.py",
     "return jnp.mean(_per_teacher_kl(student_logits, t, temperature), axis=0)",
     "return jnp.sum(_per_teacher_kl(student_logits, t, temperature), axis=0)", ["test_ensemble.py"]),
    ("meal_v2_kd sign", "losses/ensemble.py",
     "return -jnp.sum(pbar * jax.nn.log_softmax(student_logits.astype(jnp.float32), axis=-1), axis=-1)",
     "return jnp.sum(pbar * jax.nn.log_softmax(student_logits.astype(jnp.float32), axis=-1), axis=-1)",
     ["test_ensemble.py", "test_meal.py"]),
    ("confidence weights over examples", "losses/ensemble.py",
     "    return jax.nn.softmax(conf / weight_temperature, axis=0)",
     "    return jax.nn.softmax(conf / weight_temperature, axis=1)", ["test_ensemble.py"]),
    # -- BSS step rule and loss
    ("bss eps 1e-2", "methods/bss.py", "    eps: float = 1e-4", "    eps: float = 1e-2", ["test_bss.py"]),
    ("bss step sign", "methods/bss.py", "scale = opts.step_size * (f_b - f_t + opts.eps)",
     "scale = opts.step_size * (f_t - f_b + opts.eps)", ["test_bss.py"]),
    ("bss unnormalised step", "methods/bss.py", "/ jnp.where(norm > 0, norm, 1.0)",
     "/ jnp.where(norm > 0, norm * norm, 1.0)", ["test_bss.py"]),
    ("bss no clamp", "methods/bss.py", "opts.clip_min, opts.clip_max).astype(xs.dtype)",
     "-1e9, 1e9).astype(xs.dtype)", ["test_bss.py"]),
    ("bss student need not agree", "methods/bss.py",
     "qualifies = qualifies & (jnp.argmax(student_logits, -1) == labels)",
     "qualifies = qualifies", ["test_bss.py", "test_fidelity.py"]),
    ("bss r_adv schedule", "losses/bss.py", "r_adv = jnp.maximum(2.0 * (1.0 - 4.0 * e / (3.0 * total)), 0.0)",
     "r_adv = jnp.maximum(2.0 * (1.0 - e / total), 0.0)", ["test_bss.py"]),
    ("bss soft CE at T=1", "losses/bss.py",
     "    t = jax.lax.stop_gradient(teacher_logits).astype(jnp.float32) / temperature\n    s = student_logits.astype(jnp.float32) / temperature",
     "    t = jax.lax.stop_gradient(teacher_logits).astype(jnp.float32)\n    s = student_logits.astype(jnp.float32)",
     ["test_bss.py"]),
    # -- MEAL V2's gradient routing
    ("meal: student gets no adversarial gradient", "methods/meal.py",
     "fooled = disc.apply({\"params\": jax.lax.stop_gradient(d_params)}, p_student)",
     "fooled = disc.apply({\"params\": jax.lax.stop_gradient(d_params)}, jax.lax.stop_gradient(p_student))",
     ["test_meal.py"]),
    ("meal: discriminator trained by the fooling term", "methods/meal.py",
     "fooled = disc.apply({\"params\": jax.lax.stop_gradient(d_params)}, p_student)",
     "fooled = disc.apply({\"params\": d_params}, p_student)", ["test_meal.py"]),
    ("meal: student trained by the discriminator's loss", "methods/meal.py",
     "fake = disc.apply({\"params\": d_params}, jax.lax.stop_gradient(p_student))",
     "fake = disc.apply({\"params\": d_params}, p_student)", ["test_meal.py"]),
    # -- issue 19's modes
    ("hinton_kd t2 ignored", "losses/logits.py",
     "    return per_example * (temperature ** 2) if t2 else per_example",
     "    return per_example * (temperature ** 2)", ["test_fidelity.py"]),
    ("at paper: no per-layer 1/(H W)", "losses/features.py", "term = _safe_norm(diff) / diff.shape[-1]",
     "term = _safe_norm(diff)", ["test_feature_losses.py"]),
    ("meal reference: student detached from D", "methods/meal.py",
     "out_s = disc.apply({\"params\": d_params}, s)",
     "out_s = disc.apply({\"params\": d_params}, jax.lax.stop_gradient(s))", ["test_meal.py"]),
    ("meal reference: D sees the teachers' softmax", "methods/meal.py",
     "t_mean = jax.lax.stop_gradient(jnp.mean(t.astype(jnp.float32), axis=0))",
     "t_mean = jax.lax.stop_gradient(jnp.mean(jax.nn.softmax(t.astype(jnp.float32)), axis=0))", ["test_meal.py"]),
    ("bss epoch origin ignored", "methods/bss.py", "inp.epoch + epoch_origin", "inp.epoch", ["test_fidelity.py"]),
    ("bss attacked rows not repeated", "methods/bss.py",
     "return jnp.where(n > 0, positions[slot % jnp.maximum(n, 1)], slot)", "return slot", ["test_fidelity.py"]),
    ("bss adversarial statistics always kept", "methods/bss.py",
     "ran = (jnp.sum(valid) > 0) & (terms.r_adv > 0)", "ran = True", ["test_fidelity.py"]),
    ("relabel_data_kd averages the teachers", "losses/ensemble.py",
     "return jnp.sum(select * _per_teacher_kl(student_logits, t, temperature), axis=0)",
     "return jnp.mean(_per_teacher_kl(student_logits, t, temperature), axis=0)", ["test_fidelity.py"]),
    ("momentum never reset", "train/optim.py",
     "reset = jnp.any(state.count == jnp.asarray(steps, jnp.int32))", "reset = jnp.zeros((), bool)",
     ["test_fidelity.py"]),
    # -- Apprentice and Label Refinery
    ("apprentice kd T instead of T^2", "losses/logits.py", "target) * temperature ** 2",
     "target) * temperature", ["test_apprentice.py"]),
    ("apprentice kd reaches the teacher", "losses/logits.py",
     "t = teacher_logits if teacher_grad else jax.lax.stop_gradient(teacher_logits)",
     "t = teacher_logits", ["test_apprentice.py"]),
    ("refinery KL at T=4", "losses/logits.py",
     "return hinton_kd(student_logits, refinery_logits, 1.0, \"kl\")",
     "return hinton_kd(student_logits, refinery_logits, 4.0, \"kl\")", ["test_refinery.py"]),
    # -- reliability (issue 20)
    ("reliab: checksum mismatch ignored", "train/checkpoint.py", "            if got[path] != want[path]:\n",
     "            if False:\n", ["test_reliability.py"]),
    ("reliab: best steps ahead kept on fallback", "train/loop.py",
     "        ckpt_lib.discard_steps_after(self.best.manager, self.step)\n", "        pass\n", ["test_reliability.py"]),
    ("reliab: metrics not rewound on resume", "train/loop.py", "        self.logger.rewind(self.meta[\"history\"])\n",
     "        pass\n", ["test_reliability.py"]),
    ("reliab: teacher cache not verified", "train/teacher_cache.py",
     "    if verify:\n        verify_cache_files(path, manifest)\n", "    pass\n", ["test_reliability.py"]),
]


def _copy_package(dst: str) -> None:
    shutil.copytree(os.path.join(ROOT, "jaxkd"), os.path.join(dst, "jaxkd"),
                    ignore=shutil.ignore_patterns("__pycache__"))


def run(mutant, tmp: str) -> tuple[bool, float, str]:
    name, rel, old, new, tests = mutant
    work = tempfile.mkdtemp(dir=tmp)
    _copy_package(work)
    path = os.path.join(work, "jaxkd", rel)
    text = open(path).read()
    if text.count(old) != 1:
        raise SystemExit(f"mutant {name!r}: the text to change occurs {text.count(old)} times in jaxkd/{rel}; "
                         "update the mutant")
    with open(path, "w") as f:
        f.write(text.replace(old, new))
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([work, os.path.join(ROOT, "tests")]))
    start = time.time()
    proc = subprocess.run([sys.executable, "-m", "pytest", "-q", "-x", "-p", "no:cacheprovider",
                           *[os.path.join(ROOT, "tests", t) for t in tests]],
                          cwd=work, env=env, capture_output=True, text=True, timeout=1800)
    shutil.rmtree(work, ignore_errors=True)
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("FAILED")]
    # killed only if a test failed; a collection error or no tests collected is not a kill
    last = proc.stdout.strip().splitlines()[-1] if proc.stdout.strip() else proc.stderr[-500:]
    failed = " failed" in last and proc.returncode != 0
    if proc.returncode != 0 and not failed:
        raise SystemExit(f"mutant {name!r}: pytest exited {proc.returncode} without a test failure: {last}")
    return failed, time.time() - start, (lines[0] if lines else last)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("-k", default="", help="only mutants whose name contains this")
    parser.add_argument("--list", action="store_true")
    args = parser.parse_args(argv)
    chosen = [m for m in MUTANTS if args.k in m[0]]
    if args.list:
        for m in chosen:
            print(f"{m[0]:50s} jaxkd/{m[1]}  ({', '.join(m[4])})")
        return 0
    survivors = []
    with tempfile.TemporaryDirectory() as tmp:
        for m in chosen:
            killed, seconds, detail = run(m, tmp)
            print(f"{'killed ' if killed else 'SURVIVED'} {seconds:6.1f} s  {m[0]}: {detail}", flush=True)
            if not killed:
                survivors.append(m[0])
    print(f"\n{len(chosen) - len(survivors)} of {len(chosen)} mutants killed")
    if survivors:
        print("survivors: " + "; ".join(survivors))
    return 1 if survivors else 0


if __name__ == "__main__":
    sys.exit(main())
