"""PyTorch CIFAR ResNets for ``device_check.py``: resnet8x4 (student), resnet32x4 (teacher).

The same networks as the PyTorch peer (``../shared/bench/torch_ref/models.py``, which does not
travel to the device machine) and as ``jaxkd.models.resnet`` (RepDistiller CIFAR layout):

    stem   : 3x3 conv (3 -> w0, no bias) + BN + ReLU
    stages : 3 x n basic blocks (n = (depth - 2) / 6), widths w1, w2, w3, strides 1, 2, 2
    head   : global average pool -> Linear(w3 -> classes)

Basic block: ``relu(bn(conv3x3(relu(bn(conv3x3(x))))) + shortcut(x))``; shortcut = 1x1 conv
(stride s, no bias) + BN where the stride or the width changes, identity otherwise. Widths
(32, 64, 128, 256) for the "x4" models. Conv init Kaiming normal (fan_out, relu), BN 1 / 0,
Linear PyTorch's default. Parameters for 100 classes: resnet8x4 1,233,540, resnet32x4
7,433,860 (checked by ``python benchmarks/torch_peer_models.py``).
"""

from __future__ import annotations

import torch
from torch import nn

X4_WIDTHS = (32, 64, 128, 256)


def _conv_bn(cin: int, cout: int, k: int, stride: int) -> list[nn.Module]:
    return [nn.Conv2d(cin, cout, k, stride=stride, padding=k // 2, bias=False),
            nn.BatchNorm2d(cout)]


class Block(nn.Module):
    def __init__(self, cin: int, cout: int, stride: int):
        super().__init__()
        self.body = nn.Sequential(*_conv_bn(cin, cout, 3, stride), nn.ReLU(inplace=True),
                                  *_conv_bn(cout, cout, 3, 1))
        self.short = (nn.Sequential(*_conv_bn(cin, cout, 1, stride))
                      if stride != 1 or cin != cout else nn.Identity())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.relu(self.body(x) + self.short(x))


class ResNetCifar(nn.Module):
    def __init__(self, depth: int, num_classes: int = 100, widths=X4_WIDTHS):
        super().__init__()
        if depth < 8 or (depth - 2) % 6:
            raise ValueError(f"depth must be 6n + 2, got {depth}")
        n = (depth - 2) // 6
        layers: list[nn.Module] = [*_conv_bn(3, widths[0], 3, 1), nn.ReLU(inplace=True)]
        cin = widths[0]
        for cout, stride in zip(widths[1:], (1, 2, 2)):
            for i in range(n):
                layers.append(Block(cin, cout, stride if i == 0 else 1))
                cin = cout
        self.features = nn.Sequential(*layers)
        self.fc = nn.Linear(cin, num_classes)
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
            elif isinstance(m, nn.BatchNorm2d):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(self.features(x).mean(dim=(2, 3)))


def resnet8x4(num_classes: int = 100) -> ResNetCifar:
    return ResNetCifar(8, num_classes)


def resnet32x4(num_classes: int = 100) -> ResNetCifar:
    return ResNetCifar(32, num_classes)


def n_params(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


EXPECTED_PARAMS = {"resnet8x4": 1_233_540, "resnet32x4": 7_433_860}

if __name__ == "__main__":
    for name, fn in (("resnet8x4", resnet8x4), ("resnet32x4", resnet32x4)):
        m = fn(100)
        got = n_params(m)
        out = m(torch.zeros(2, 3, 32, 32))
        print(f"{name}: {got:,} params (expected {EXPECTED_PARAMS[name]:,}), out {tuple(out.shape)}")
        assert got == EXPECTED_PARAMS[name], name
