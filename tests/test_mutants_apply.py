"""Every deliberate bug in tests/mutants/check_mutants.py still applies to today's code.

A mutant whose text no longer occurs exactly once in its file tests nothing; this fast check
fails as soon as a refactor moves the code a mutant targets (the mutants themselves run in
``python tests/mutants/check_mutants.py``, ~20 minutes, outside the default suite)."""

import importlib.util
import os

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _mutants():
    spec = importlib.util.spec_from_file_location("check_mutants", os.path.join(ROOT, "tests", "mutants",
                                                                                "check_mutants.py"))
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod.MUTANTS


def test_every_mutant_text_occurs_once_and_its_tests_exist():
    stale = []
    for name, rel, old, new, tests in _mutants():
        with open(os.path.join(ROOT, "jaxkd", rel)) as f:
            count = f.read().count(old)
        if count != 1 or old == new:
            stale.append(f"{name} ({rel}: {count} occurrences)")
        for t in tests:
            assert os.path.exists(os.path.join(ROOT, "tests", t)), f"mutant {name!r} names a missing test file {t}"
    assert not stale, "mutants that no longer apply: " + "; ".join(stale)
