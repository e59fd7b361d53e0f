"""Tiny networks with EfficientNet's structure (SiLU, depthwise conv, squeeze-excitation, residual add, global
pooling, linear head) that export in a second, for export/calibration tests."""

from __future__ import annotations

import functools
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


def pattern_batch(n: int, seed: int = 0, size: int = 32) -> tuple[np.ndarray, np.ndarray]:
    """(images (n, 3, size, size) float32, labels): class k is a brightness level plus k-dependent stripes and noise,
    so a network that learned them gives logits that move with the input (numeric tests need that)."""
    rng = np.random.default_rng(seed)
    y = np.arange(n) % 8
    xs = np.linspace(0, 2 * np.pi, size, dtype=np.float32)
    base = -1.5 + 3.0 * y[:, None, None] / 7 + 0.4 * np.sin(xs[None, None, :] * (1 + y[:, None, None] % 4))
    img = base + rng.normal(0, 0.3, (n, size, size))
    return np.repeat(img[:, None], 3, axis=1).astype(np.float32), y


@functools.lru_cache(maxsize=2)
def learned_tiny(seed: int = 0, steps: int = 150) -> nn.Module:
    """A TinyEffNet trained on :func:`pattern_batch` (seconds on a CPU; cached, do not modify it): its logits span
    several units and depend on the input, unlike a freshly initialised network whose outputs are nearly constant."""
    torch.manual_seed(seed)
    m = TinyEffNet()
    opt = torch.optim.Adam(m.parameters(), lr=0.01)
    m.train()
    for step in range(steps):
        x, y = pattern_batch(64, seed=1000 + step)
        loss = nn.functional.cross_entropy(m(torch.from_numpy(x)), torch.from_numpy(y))
        opt.zero_grad()
        loss.backward()
        opt.step()
    return m.eval()
