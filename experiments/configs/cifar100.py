"""CIFAR-100, resnet32x4 -> resnet8x4 with RepDistiller's hyperparameters.

SGD lr 0.05, momentum 0.9, wd 5e-4, batch 64, 240 epochs, x0.1 at epochs 150/180/210,
random crop 32 pad 4 + flip, gamma=0.1 CE + alpha=0.9 KD at T=4. RepDistiller reports
teacher 79.42, student 72.50, KD 73.33 (last epoch). Needs the prepared tfds `cifar100`
(`data.download=True` with internet, or array_record files under data.data_dir).

    jaxkd train --config experiments/configs/cifar100.py --workdir runs/c100_teacher \
        model.name=resnet32x4 method.name=ce
    jaxkd train --config experiments/configs/cifar100.py --workdir runs/c100_kd \
        teacher.workdir=runs/c100_teacher
    # wrn_40_2 -> wrn_16_2 (RepDistiller: teacher 75.61, student 73.26, KD 74.92):
    #   ... teacher.name=wrn_40_2 model.name=wrn_16_2
"""

from jaxkd.config import base_config


def get_config():
    c = base_config()
    c.data.name = "cifar100"
    c.data.batch_size = 64
    c.data.eval_batch_size = 500
    c.data.augment = {"pad": 4, "flip": True}
    c.teacher.name = "resnet32x4"
    c.model.name = "resnet8x4"
    c.method.name = "hinton_kd"
    c.method.temperature = 4.0
    c.method.alpha = 0.9
    c.method.gamma = 0.1
    c.optim.lr = 0.05
    c.optim.momentum = 0.9
    c.optim.weight_decay = 5e-4
    c.optim.schedule = "step"
    c.optim.milestones = (150, 180, 210)
    c.optim.decay = 0.1
    c.train.num_epochs = 240
    c.train.checkpoint_every_steps = 2000
    # RepDistiller's feature methods (`jaxkd compare ... --methods kd,fitnets,at,fsp`): the
    # loss is gamma*CE + alpha*KD + beta*feature with gamma=1, alpha=0 and its beta per method.
    c.presets = {
        "kd": {"method": {"name": "hinton_kd", "temperature": 4.0, "alpha": 0.9, "gamma": 0.1}},
        "fitnets": {"method": {"name": "fitnets", "student_layer": "stage2", "teacher_layer": "stage2",
                               "beta": 100.0}},
        "fitnets_two_stage": {"stages": [
            {"name": "hint", "num_epochs": 40, "method": {"name": "fitnets_hint"}},
            {"name": "kd", "num_epochs": 240, "method": {
                "name": "hinton_kd", "temperature": 4.0, "gamma": 1.0,
                "alpha": {"type": "linear", "init": 4.0, "end": 1.0}}}]},
        "at": {"method": {"name": "at", "mode": "code", "beta": 1000.0}},
        # FSP: a 30-epoch initialisation stage on the FSP loss, then 240 epochs of CE
        "fsp": {"stages": [
            {"name": "fsp_init", "num_epochs": 30, "method": {"name": "fsp"}},
            {"name": "train", "num_epochs": 240, "method": {"name": "ce"}}]},
    }
    return c
