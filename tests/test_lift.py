"""The comparison table's lift: per-seed paired differences against the baseline, and whether the
lift is resolved (checked against numbers worked out by hand)."""

import math

import pytest

from jaxkd.experiment import format_table, paired_lift


def _row(name, accs, seeds=None):
    seeds = seeds or list(range(len(accs)))
    return {"run": name, "model": "mlp", "seeds": len(accs), "best_mean": sum(accs) / len(accs), "best_std": 0.0,
            "last_mean": 0.0, "last_std": 0.0,
            "summaries": [{"seed": s, "best_accuracy": a} for s, a in zip(seeds, accs)]}


def test_paired_lift_by_hand():
    base = _row("baseline", [0.80, 0.82, 0.84])
    kd = _row("kd", [0.83, 0.83, 0.86])
    lift = paired_lift(base, kd)
    # differences 3, 1, 2 points: mean 2, sample std 1, s.e. 1/sqrt(3)
    assert lift["diffs"] == pytest.approx([3.0, 1.0, 2.0])
    assert lift["mean"] == pytest.approx(2.0) and lift["std"] == pytest.approx(1.0)
    assert lift["sem"] == pytest.approx(1 / math.sqrt(3)) and lift["improved"] == 3 and lift["n"] == 3


def test_paired_lift_pairs_by_seed_not_position():
    base = _row("baseline", [0.80, 0.90], seeds=[0, 1])
    kd = _row("kd", [0.91, 0.81, 0.99], seeds=[1, 0, 7])  # seed 7 has no baseline: left out
    lift = paired_lift(base, kd)
    assert lift["n"] == 2 and lift["diffs"] == pytest.approx([1.0, 1.0])
    assert paired_lift(base, _row("kd", [0.9], seeds=[5])) is None


def test_table_says_the_lift_and_whether_it_is_resolved():
    base = _row("baseline", [0.80, 0.82, 0.84])
    table = format_table([_row("teacher", [0.95]), base, _row("kd", [0.83, 0.83, 0.86]),
                          _row("weak", [0.81, 0.81, 0.84])])
    assert "| kd | 3 | +2.00 ± 1.00 | 0.58 | 3/3 |" in table
    # 2 ± 2*0.577: [+0.85, +3.15] excludes 0
    assert "kd: +2.00 points (mean ± 2 s.e.: [+0.85, +3.15]), 3 of 3 seeds improved; resolved" in table
    # weak: differences +1, -1, 0: mean 0, not resolved, 1 of 3 improved
    assert "| weak | 3 | +0.00 ± 1.00 | 0.58 | 1/3 |" in table
    assert "weak: +0.00 points" in table and "1 of 3 seeds improved; not resolved" in table


def test_table_reports_each_runs_cost():
    base = {**_row("baseline", [0.80, 0.82]), "num_params": 604938, "train_time_s": 150.0, "images_per_s": 1234.4}
    old = _row("kd", [0.83, 0.83])  # summaries from before num_params: dashes
    table = format_table([base, old])
    assert "| baseline | mlp | 604,938 | 2.5 | 1234 |" in table and "| kd | mlp | — | — | — |" in table
    assert "cost" not in format_table([_row("baseline", [0.8]), _row("kd", [0.9])])


def test_summary_counts_the_students_params(tmp_path, data_dir):
    from _configs import tiny_digits_config
    from jaxkd.train.loop import train_and_evaluate
    summary = train_and_evaluate(tiny_digits_config(**{"method": {"name": "ce"}}), str(tmp_path / "r"))
    # mlp 64 -> 16 -> 10: (64 * 16 + 16) + (16 * 10 + 10)
    assert summary["num_params"] == 64 * 16 + 16 + 16 * 10 + 10
