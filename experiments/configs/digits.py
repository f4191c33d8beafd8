"""Digits (scikit-learn's bundled 8x8 digits): CNN teacher -> small MLP student, Hinton KD.

The default data of `jaxkd compare`: runs in a few minutes on 2 CPU cores.

    jaxkd compare --config experiments/configs/digits.py --workdir runs/digits
"""

from jaxkd.config import base_config


def get_config():
    c = base_config()
    c.data.name = "digits"
    c.data.batch_size = 64
    c.data.eval_batch_size = 128
    c.teacher.name = "cnn"
    c.teacher.kwargs = {"width": 32}
    c.model.name = "mlp"
    c.model.kwargs = {"hidden": (32,)}
    c.method.name = "hinton_kd"
    c.method.temperature = 4.0
    c.method.alpha = 0.9
    c.method.gamma = 0.1
    c.optim.lr = 0.05
    c.optim.weight_decay = 5e-4
    c.optim.schedule = "cosine"
    c.train.num_epochs = 30
    c.train.log_every_steps = 10
    # `jaxkd compare --methods kd,bss`: BSS with the paper's T=3 and schedules over the run
    c.presets = {
        "kd": {"method": {"name": "hinton_kd", "temperature": 4.0, "alpha": 0.9, "gamma": 0.1}},
        # "bss": the options of the recorded runs (jaxkd's reading before issue 19); "bss_ref":
        # the reference's epoch count, adversarial forward and BN update (the recipe's defaults)
        "bss": {"method": {"name": "bss", "temperature": 3.0, "epoch_origin": 0, "adv_rows": "all",
                           "adv_bn_update": False}},
        "bss_ref": {"method": {"name": "bss", "temperature": 3.0}},
    }
    return c
