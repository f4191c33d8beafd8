"""Digits, resnet20 -> resnet8 (same widths 16/16/32/64, so FSP applies): feature methods.

    jaxkd compare --config experiments/configs/digits_features.py --workdir runs/digits_feat \
        --seeds 0,1,2 --methods kd,fitnets,fitnets_two_stage,at,fsp

Totals are 30 epochs for every method; two-stage methods split them (5 + 25).
"""

import os

from jaxkd.config import load_config


def feature_presets(first_stage_epochs: int, total_epochs: int) -> dict:
    """KD, FitNets (one and two stages, the second with and without T^2), AT (code and paper
    modes), FSP and BSS (the recorded options and the reference's); two-stage methods spend
    ``first_stage_epochs`` of ``total_epochs`` in their first stage."""
    rest = total_epochs - first_stage_epochs
    return {
        "kd": {"method": {"name": "hinton_kd", "temperature": 4.0, "alpha": 0.9, "gamma": 0.1}},
        # RepDistiller: CE + 100 * hint(stage2), one stage
        "fitnets": {"method": {"name": "fitnets", "beta": 100.0}},
        # the paper: hint stage (layers up to stage2 + regressor), then KD with a decaying weight
        "fitnets_two_stage": {"stages": [
            {"name": "hint", "num_epochs": first_stage_epochs, "method": {"name": "fitnets_hint"}},
            {"name": "kd", "num_epochs": rest, "method": {
                "name": "hinton_kd", "temperature": 4.0, "gamma": 1.0,
                "alpha": {"type": "linear", "init": 4.0, "end": 1.0}}}]},
        # the same without KD's T^2 factor: the paper's stage 2 (lambda 4 -> 1 on the unscaled soft
        # cross-entropy, as the authors' KDCost.py); the preset above weighs it 16 times as much
        "fitnets_two_stage_no_t2": {"stages": [
            {"name": "hint", "num_epochs": first_stage_epochs, "method": {"name": "fitnets_hint"}},
            {"name": "kd", "num_epochs": rest, "method": {
                "name": "hinton_kd", "temperature": 4.0, "gamma": 1.0, "t2": False,
                "alpha": {"type": "linear", "init": 4.0, "end": 1.0}}}]},
        # attention transfer, code mode, beta 1000, on the three stage outputs
        "at": {"method": {"name": "at", "mode": "code"}},
        # the paper's form: per-layer weight beta / (H_j W_j) on the non-squared distance
        "at_paper": {"method": {"name": "at", "mode": "paper"}},
        # RepDistiller FSP: an FSP-only initialisation stage, then CE
        "fsp": {"stages": [
            {"name": "fsp_init", "num_epochs": first_stage_epochs, "method": {"name": "fsp"}},
            {"name": "train", "num_epochs": rest, "method": {"name": "ce"}}]},
        # "bss": the options of the recorded runs (jaxkd's reading before issue 19); "bss_ref":
        # the reference's epoch count, adversarial forward and BN update (the recipe's defaults)
        "bss": {"method": {"name": "bss", "temperature": 3.0, "epoch_origin": 0, "adv_rows": "all",
                           "adv_bn_update": False}},
        "bss_ref": {"method": {"name": "bss", "temperature": 3.0}},
    }


def get_config():
    # data, optimizer and schedule as in digits.py; other models
    c = load_config(os.path.join(os.path.dirname(os.path.abspath(__file__)), "digits.py"))
    c.teacher.name, c.teacher.kwargs = "resnet20", {}
    c.model.name, c.model.kwargs = "resnet8", {}
    c.presets = feature_presets(first_stage_epochs=5, total_epochs=30)
    return c
