"""Fashion-MNIST, resnet20 -> resnet8 (both widths 16/16/32/64, so FSP applies): feature methods.

The teacher is trained once on all 60,000 images; the students see a 3,000-image subset
(the limited-data regime, and what two CPU cores can afford for 5 methods x 3 seeds):

    bash experiments/feature_study.sh            # ~1.5 h on 2 CPU cores; needs the IDX files

Every method trains for the same total number of epochs; two-stage methods split them (2 + 8).
"""

import importlib.util
import os

from jaxkd.config import load_config

HERE = os.path.dirname(os.path.abspath(__file__))


def get_config():
    # data, optimizer and schedule as in fashion_mnist.py; models and presets as in digits_features.py
    c = load_config(os.path.join(HERE, "fashion_mnist.py"))
    c.teacher.name, c.teacher.kwargs = "resnet20", {}
    c.model.name, c.model.kwargs = "resnet8", {}
    c.train.num_epochs = 10
    spec = importlib.util.spec_from_file_location("_digits_features", os.path.join(HERE, "digits_features.py"))
    digits_features = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(digits_features)
    c.presets = digits_features.feature_presets(first_stage_epochs=2, total_epochs=10)
    return c
