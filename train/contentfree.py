"""Content-free frames: what a camera or review tool sends when there is nothing to classify.

Training adds them to ``other`` (so the network never learns that "nothing" means ``clean``), and
``benchmarks.quality`` builds its corpus from them to check that the frame-quality gate refuses every one.

Kinds (:data:`KINDS`):

* ``blank`` — one level, at most a trace of noise (lens cap, beam off, a dropped frame filled with a constant).
* ``noise`` — structureless noise around a level: Gaussian, Poisson-like, uniform or salt-and-pepper.
* ``gradient`` — a smooth linear or radial ramp, maybe with a little noise (vignetting, charging haze).
* ``saturated`` — most of the frame clipped to black or white (gain or offset far off).
* ``defocus`` — a real scene blurred far beyond what imaging does (beam out of focus), maybe with noise.

Every frame is float32 in [0, 1]; :func:`quantise` turns it into uint8 or uint16 data of a given bit depth.
:func:`station_frame` renders one as a station sends it (another size, 8 to 16 bits) and resizes it to the model
input as the runtime does; with a frame-quality gate it can insist on a frame the gate lets through, the only
content-free frames the deployed network ever sees.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import cv2
import numpy as np

from runtime.preprocess import resize_grey

KINDS = ("blank", "noise", "gradient", "saturated", "defocus")
#: The kinds the frame-quality gate can let through (mildly blurred scenes, gradients, partly clipped scenes).
GATE_PASSING_KINDS = ("gradient", "saturated", "defocus")
#: Source sides of :func:`station_frame`, as multiples of the model input's side: smaller frames are enlarged,
#: larger ones area-shrunk, which changes what is left of blur, noise and quantisation.
STATION_SCALES = (0.5, 0.75, 1.0, 2.0, 4.0)
STATION_BITS = (8, 8, 10, 12, 16)
#: Largest side at which scenes are drawn and blurred before enlarging to the frame size.
SMOOTH_SIDE = 512


def _noise(rng: np.random.Generator, shape: tuple[int, int], level: float, sigma: float) -> np.ndarray:
    kind = rng.choice(("gauss", "poisson", "uniform", "saltpepper"))
    if kind == "gauss":
        img = level + rng.normal(0.0, sigma, shape)
    elif kind == "poisson":
        electrons = max(1.0, (level / max(sigma, 1e-3)) ** 2)  # SNR = sqrt(electrons)
        img = rng.poisson(electrons, shape) * (level / electrons)
    elif kind == "uniform":
        img = level + rng.uniform(-sigma * math.sqrt(3), sigma * math.sqrt(3), shape)
    else:
        img = np.full(shape, level)
        u = rng.random(shape)
        p = rng.uniform(0.05, 0.5)
        img[u < p / 2] = 0.0
        img[u > 1 - p / 2] = 1.0
    return img


def _ramp(rng: np.random.Generator, shape: tuple[int, int]) -> np.ndarray:
    h, w = shape
    y, x = np.mgrid[0:h, 0:w].astype(np.float32)
    y, x = y / max(h - 1, 1) - 0.5, x / max(w - 1, 1) - 0.5
    if rng.random() < 0.6:
        a = rng.uniform(0, 2 * math.pi)
        t = x * math.cos(a) + y * math.sin(a)
    else:
        cy, cx = rng.uniform(-0.5, 0.5, 2)
        t = np.sqrt((x - cx) ** 2 + (y - cy) ** 2)
    t = (t - t.min()) / max(float(t.max() - t.min()), 1e-6)
    if rng.random() < 0.3:
        t = t ** rng.uniform(0.4, 2.5)
    a, b = sorted(rng.uniform(0.0, 1.0, 2))
    b = max(b, a + 0.1)
    return a + (b - a) * t


def frame(kind: str, rng: np.random.Generator, size: tuple[int, int],
          scene: Callable[[np.random.Generator, tuple[int, int]], np.ndarray] | None = None) -> np.ndarray:
    """One content-free frame of ``kind`` at ``size`` (h, w), float32 in [0, 1].

    ``scene(rng, size)`` supplies a real scene (float 0–1) for ``defocus`` and ``saturated``; without it a random
    smooth texture stands in.
    """
    h, w = size
    shape = (h, w)
    if kind == "blank":
        img = np.full(shape, rng.uniform(0.0, 1.0))
        if rng.random() < 0.7:
            img = img + rng.normal(0.0, rng.uniform(0.0, 0.004), shape)
    elif kind == "noise":
        img = _noise(rng, shape, rng.uniform(0.1, 0.9), rng.uniform(0.03, 0.3))
    elif kind == "gradient":
        img = _ramp(rng, shape)
        if rng.random() < 0.6:
            img = img + rng.normal(0.0, rng.uniform(0.0, 0.02), shape)
    elif kind in ("saturated", "defocus"):
        # Scenes and blur at most SMOOTH_SIDE a side, then enlarged: the same picture, and cheap at 4096².
        k = max(1.0, max(h, w) / SMOOTH_SIDE)
        small = (max(4, int(round(h / k))), max(4, int(round(w / k))))
        base = scene(rng, small) if scene is not None else _texture(rng, small)
        if kind == "defocus":
            sigma = rng.uniform(0.04, 0.15) * min(small)
            img = cv2.GaussianBlur(base.astype(np.float32), (0, 0), sigma)
            img = cv2.resize(img, (w, h), interpolation=cv2.INTER_LINEAR) if small != shape else img
            if rng.random() < 0.6:
                img = img + rng.normal(0.0, rng.uniform(0.0, 0.02), shape)
        else:
            # Gain/offset so that 70-98% of the pixels fall outside [0, 1] on one side.
            frac = rng.uniform(0.7, 0.98)
            base = cv2.resize(base.astype(np.float32), (w, h), interpolation=cv2.INTER_LINEAR) if small != shape \
                else base
            if rng.random() < 0.5:
                cut = float(np.quantile(base, 1 - frac))
                img = 1.0 + (base - cut) * rng.uniform(2.0, 20.0)
            else:
                cut = float(np.quantile(base, frac))
                img = (base - cut) * rng.uniform(2.0, 20.0)
    else:
        raise ValueError(f"unknown content-free kind {kind!r}; choose one of {', '.join(KINDS)}")
    return np.clip(img, 0.0, 1.0).astype(np.float32)


def _texture(rng: np.random.Generator, shape: tuple[int, int]) -> np.ndarray:
    """A random smooth texture in [0, 1] (a stand-in scene)."""
    h, w = shape
    small = rng.random((max(2, h // 8), max(2, w // 8))).astype(np.float32)
    img = cv2.resize(small, (w, h), interpolation=cv2.INTER_CUBIC)
    img -= img.min()
    return img / max(float(img.max()), 1e-6)


def quantise(img: np.ndarray, bits: int) -> np.ndarray:
    """Float [0, 1] → uint8 (``bits`` 8) or uint16 holding ``bits``-bit data (10, 12, 14, 16)."""
    if bits == 8:
        return np.round(img * 255.0).astype(np.uint8)
    if bits not in (10, 12, 14, 16):
        raise ValueError(f"bits must be 8, 10, 12, 14 or 16, got {bits}")
    return np.round(img * float((1 << bits) - 1)).astype(np.uint16)


def station_frame(rng: np.random.Generator, input_size: tuple[int, int],
                  scene: Callable[[np.random.Generator, tuple[int, int]], np.ndarray] | None = None,
                  gate: Callable[[np.ndarray, np.ndarray], str] | None = None, tries: int = 30,
                  resize: str = "area") -> np.ndarray:
    """A content-free frame as the network would receive it: drawn at a source size of :data:`STATION_SCALES` × the
    input and a bit depth of :data:`STATION_BITS`, then resized to ``input_size`` (h, w) as the runtime resizes it.

    With ``gate`` (``gate(native, resized) -> reason``, e.g. a model's ``runtime.quality.QualityGate.judge``, which
    the runtime calls on every frame) it draws :data:`GATE_PASSING_KINDS` until the gate lets a frame through (at most
    ``tries`` draws; the last one otherwise): those are the content-free frames the network must send to ``other``
    itself. Without it any kind. Returns the resized frame (uint8, or uint16 holding 10- to 16-bit data).
    """
    h, w = input_size
    out = np.zeros(input_size, np.uint8)
    for _ in range(max(1, tries) if gate is not None else 1):
        kinds = GATE_PASSING_KINDS if gate is not None else KINDS
        kind = kinds[int(rng.integers(0, len(kinds)))]
        k = float(STATION_SCALES[int(rng.integers(0, len(STATION_SCALES)))])
        bits = int(STATION_BITS[int(rng.integers(0, len(STATION_BITS)))])
        native = quantise(frame(kind, rng, (max(8, int(round(h * k))), max(8, int(round(w * k)))), scene), bits)
        out = resize_grey(native, input_size, resize)
        if gate is None or not gate(native, out):
            break
    return out
