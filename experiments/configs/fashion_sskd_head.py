"""SSKD's teacher head alone, trained once on all training images and then loaded, frozen, by the
SSKD presets of ``fashion_sskd.py`` (``JAXKD_SSKD_HEAD=<this run's work dir>``):

    JAXKD_SSKD_HEAD_EPOCHS=6 jaxkd train --config experiments/configs/fashion_sskd_head.py \\
        --workdir runs/fashion_sskd/teacher_head teacher.workdir=runs/fashion_modern/teacher

The method is ``sskd_teacher_head`` (only ``aux/sskd_head_t`` trains), for ``JAXKD_SSKD_HEAD_EPOCHS``
epochs (default 6) with ``fashion_sskd.head_optim``: the optimizer of the in-run pre-stage
(SGD 0.05, x0.1 at half and three quarters of the epochs). Set the epochs through the variable,
not ``train.num_epochs``: the milestones follow them. ``sskd_study.sh`` runs this.
"""

import importlib.util
import os

HERE = os.path.dirname(os.path.abspath(__file__))
HEAD_EPOCHS = int(os.environ.get("JAXKD_SSKD_HEAD_EPOCHS") or 6)


def get_config():
    spec = importlib.util.spec_from_file_location("_fashion_sskd", os.path.join(HERE, "fashion_sskd.py"))
    fashion_sskd = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(fashion_sskd)
    c = fashion_sskd.get_config()
    c.method = {"name": "sskd_teacher_head"}
    c.train.num_epochs = HEAD_EPOCHS
    c.optim.update(fashion_sskd.head_optim(HEAD_EPOCHS))
    c.presets = {}
    return c
