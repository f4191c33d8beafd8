"""Digits: three cnn teachers -> mlp(32) student; one teacher vs ensembles vs MEAL V2.

The setting of experiments/configs/digits.py (the same student, data, optimizer and 30
epochs). `experiments/ensemble_study.sh` trains the three teachers (cnn width 32, seeds 0-2)
into $JAXKD_ENSEMBLE_DIR/teachers/seed<k> (default runs/digits_ensemble) and then runs

    jaxkd compare --config experiments/configs/digits_ensemble.py \\
        --workdir $JAXKD_ENSEMBLE_DIR/full --seeds 0,1,2 \\
        --methods kd,ens_avg,ens_conf,ens_random,ens_relabel,meal_v2,meal_v2_noadv,ft_ce \\
        teacher.workdir=<the best of the three>

`kd` distils from the single teacher in teacher.workdir; the ens_* presets and MEAL V2 from
all three (config.teachers). MEAL V2 starts each seed's student from that seed's baseline
(compare's baseline/seed<k> in $JAXKD_ENSEMBLE_COMPARE_DIR, default $JAXKD_ENSEMBLE_DIR/full)
and fine-tunes it at lr 0.01; `ft_ce` is the control: the same fine-tuning with plain CE.
"""

import os

from jaxkd.config import load_config

ROOT = os.environ.get("JAXKD_ENSEMBLE_DIR", "runs/digits_ensemble")
COMPARE_DIR = os.environ.get("JAXKD_ENSEMBLE_COMPARE_DIR", os.path.join(ROOT, "full"))
TEACHERS = [{"name": "cnn", "kwargs": {"width": 32}, "workdir": os.path.join(ROOT, "teachers", f"seed{k}")}
            for k in range(3)]
KD = {"temperature": 4.0, "alpha": 0.9, "gamma": 0.1}


def get_config():
    # data, models, KD, optimizer and schedule as in digits.py; its presets are replaced below
    c = load_config(os.path.join(os.path.dirname(os.path.abspath(__file__)), "digits.py"))
    # MEAL V2 and its CE control fine-tune seed k's baseline student at lr 0.01
    finetune = {"model": {"init_from": os.path.join(COMPARE_DIR, "baseline", "seed{seed}")}, "optim": {"lr": 0.01}}
    c.presets = {
        "kd": {"method": {"name": "hinton_kd", **KD}},
        "ens_avg": {"method": {"name": "ensemble_kd", **KD}, "teachers": TEACHERS},
        "ens_conf": {"method": {"name": "ensemble_kd", "confidence": "neg_entropy", **KD}, "teachers": TEACHERS},
        "ens_random": {"method": {"name": "random_teacher_kd", "per": "example", **KD}, "teachers": TEACHERS},
        "ens_relabel": {"method": {"name": "relabel_kd", **KD}, "teachers": TEACHERS},
        # mode "gan": the mode of the recorded numbers (docs/experiments.md), jaxkd's default before
        # the reference mode (issue 19)
        "meal_v2": {"method": {"name": "meal_v2", "mode": "gan"}, "teachers": TEACHERS, **finetune},
        "meal_v2_noadv": {"method": {"name": "meal_v2", "mode": "gan", "adv_weight": 0.0}, "teachers": TEACHERS,
                          **finetune},
        "ft_ce": {"method": {"name": "ce"}, **finetune},
    }
    return c
