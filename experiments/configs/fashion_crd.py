"""Fashion-MNIST, resnet20 -> resnet8 on 3,000 training images: baseline, KD, CRD, CRD + KD.

The same data, models, optimizer and 10-epoch schedule as ``fashion_features.py`` (so the
baseline and KD rows are comparable with that study), plus the CRD presets:

    bash experiments/crd_study.sh            # ~1 h on 2 CPU cores; needs the IDX files

CRD follows RepDistiller's defaults: embedding dimension 128, NCE temperature 0.07, bank momentum
0.5, beta 0.8; "crd" is CE + CRD (alpha 0), "crd_kd" adds KD at T=4 with alpha 1. With 3,000
training images the smallest other-class pool holds about 2,700 examples, so ``max_nce_k="pool"``
caps K (16,384 on CIFAR) there and negatives are drawn without replacement.
"""

import os

from jaxkd.config import load_config

HERE = os.path.dirname(os.path.abspath(__file__))


def crd_presets() -> dict:
    """KD as in the feature study; CRD alone and CRD + KD as in RepDistiller."""
    return {
        "kd": {"method": {"name": "hinton_kd", "temperature": 4.0, "alpha": 0.9, "gamma": 0.1}},
        "crd": {"method": {"name": "crd", "beta": 0.8, "gamma": 1.0, "alpha": 0.0}},
        "crd_kd": {"method": {"name": "crd", "beta": 0.8, "gamma": 1.0, "alpha": 1.0, "temperature": 4.0}},
    }


def get_config():
    c = load_config(os.path.join(HERE, "fashion_features.py"))
    c.presets = crd_presets()
    return c
