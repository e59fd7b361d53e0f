"""Tiny networks with EfficientNet's structure (SiLU, depthwise conv, squeeze-excitation, residual add, global
pooling, linear head) that export in a second, for export/calibration tests."""

from __future__ import annotations

from pathlib import Path

import cv2
import numpy as np
import torch
from torch import nn

from runtime.contract import ModelMetadata


class TinyEffNet(nn.Module):
    def __init__(self, num_classes: int = 8, width: int = 8) -> None:
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(3, width, 3, 2, 1), nn.BatchNorm2d(width), nn.SiLU())
        self.dw = nn.Sequential(nn.Conv2d(width, width, 3, 1, 1, groups=width), nn.BatchNorm2d(width), nn.SiLU())
        self.se_fc1 = nn.Conv2d(width, 4, 1)
        self.se_fc2 = nn.Conv2d(4, width, 1)
        self.project = nn.Sequential(nn.Conv2d(width, width, 1), nn.BatchNorm2d(width))
        self.head = nn.Linear(width, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.stem(x)
        y = self.dw(x)
        s = torch.sigmoid(self.se_fc2(nn.functional.silu(self.se_fc1(nn.functional.adaptive_avg_pool2d(y, 1)))))
        y = self.project(y * s)
        x = x + y
        return self.head(torch.flatten(nn.functional.adaptive_avg_pool2d(x, 1), 1))


def tiny_meta(size: int = 32) -> ModelMetadata:
    return ModelMetadata(input_size=(size, size), arch="tiny_test_net")


def trained_tiny(seed: int = 0) -> nn.Module:
    """A TinyEffNet with non-trivial BN statistics (so quantisation has something to get wrong)."""
    torch.manual_seed(seed)
    m = TinyEffNet()
    m.train()
    with torch.no_grad():
        for _ in range(3):
            m(torch.randn(16, 3, 32, 32))
    return m.eval()


def write_dataset(root: Path, per_class: int, size: int = 40, classes: tuple[str, ...] = (), seed: int = 0) -> Path:
    """``root/{train,val}/<class>/*.png``: per class a distinct mean brightness + noise (learnable by a head)."""
    from runtime.contract import CLASSES

    rng = np.random.default_rng(seed)
    for split in ("train", "val"):
        for i, c in enumerate(classes or CLASSES):
            d = root / split / c
            d.mkdir(parents=True, exist_ok=True)
            for k in range(per_class):
                img = np.clip(rng.normal(20 + 28 * i, 10, (size, size)), 0, 255).astype(np.uint8)
                cv2.imwrite(str(d / f"{k:03d}.png"), img)
    return root
