"""Synthetic SEM wafer-image generator for the 8-class defect classifier (numpy + OpenCV only).

Renders line/space arrays, contact-hole arrays and planar post-CMP fields the way SEM metrology simulators do (NIST
ARTIMAGEN-style imaging: SE edge effect, material contrast, astigmatic beam blur, scan jitter/drift, charging gradient,
shot + read noise; Palasantzas-spectrum edge roughness), and draws the defect of each class on the scene types where it
occurs physically.  Every image gets a sidecar JSON with everything that was drawn (scene, imaging, roughness, defects
with bounding boxes, seed), from which it can be re-rendered bit-exactly.  A defect on texture that would not stand out
from the clutter around it is drawn again, or deepened (the visibility floor, :func:`defect_visibility`), so that
labels do not rest on changes nobody could see.

Each image's RNG derives only from (seed, class, index), so outputs do not depend on ordering or worker count.

CLI::

    python -m train.synthetic --out data/synth --per-class 500 --size 256 --seed 0 --workers 2 --montage

Library::

    img, meta = render_sample("bridges", np.random.default_rng(0), 256)
    clean_img, _ = render_params(meta, defects=False)   # same scene, noise and imaging, without the defect
"""

from __future__ import annotations

import argparse
import json
import math
import multiprocessing as mp
import sys
import time
import zlib
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import cv2
import numpy as np

from runtime.contract import CLASSES
from runtime.files import atomic_write_bytes, atomic_write_text
from sem_extras import cli
from train import _sem_render as sr

SCENE_TYPES: tuple[str, ...] = ("line_space", "contact_holes", "planar")
SPLITS: tuple[str, ...] = ("train", "val", "test")
DEFAULT_SPLIT: tuple[float, float, float] = (0.7, 0.15, 0.15)
# 2: a labelled defect must stand out from the scene around it (see defect_visibility); with min_visibility=0 the
# images are exactly version 1's.
GENERATOR_VERSION = 2
# Contrast to clutter below which a defect is redrawn.  Version 1 drew ~1/3 of CMP chatter/dishing and ~1/6 of cracks
# below 1, where a person comparing with the defect-free twin could hardly see them and trained models often erred
# (docs/synthetic.md): labels a model cannot learn, and a test set that cannot reach its goal.
DEFAULT_MIN_VISIBILITY = 1.0
# Edits of a regular pattern (and LER, which roughens every edge) are exempt: the score counts the pattern around
# them as clutter, yet a missing hole or a bridged line is plain to see because the pattern predicts what should be
# there.  The score is meant for defects on texture: planar films, grains, cracks, particles, residues, charging.
_PATTERN_EDITS: frozenset[str] = frozenset({"ler", "gap", "bridge", "wiggle", "collapse", "missing_hole",
                                            "merged_holes"})

# Scene mix per class.  Clean and foreign_materials use all three scenes so that the scene type alone does not give
# the class away; the others follow where the defect physically occurs.
_SCENE_MIX: dict[str, dict[str, float]] = {
    "clean": {"line_space": 0.45, "contact_holes": 0.3, "planar": 0.25},
    "bridges": {"line_space": 1.0},
    "gaps": {"line_space": 1.0},
    "cracks": {"line_space": 0.5, "planar": 0.5},
    "foreign_materials": {"line_space": 0.45, "contact_holes": 0.3, "planar": 0.25},
    "cmp": {"planar": 1.0},
    "ler": {"line_space": 1.0},
    "other": {"line_space": 0.5, "contact_holes": 0.5},
}


# --------------------------------------------------------------------------------------------------------------------
# Seeds and small sampling helpers
# --------------------------------------------------------------------------------------------------------------------
def class_key(cls: str) -> int:
    """Stable integer key of a class name (CRC32), so seeds survive a reordering of CLASSES."""
    return zlib.crc32(cls.encode("utf-8"))


def image_seed_sequence(seed: int, cls: str, index: int) -> np.random.SeedSequence:
    """SeedSequence of image ``index`` of class ``cls``: depends on nothing else (not order, not worker count)."""
    return np.random.SeedSequence(entropy=int(seed), spawn_key=(class_key(cls), int(index)))


def image_rng(seed: int, cls: str, index: int) -> np.random.Generator:
    return np.random.default_rng(image_seed_sequence(seed, cls, index))


def palasantzas_profile(
    n: int, sigma: float, xi: float, alpha: float, rng: np.random.Generator, dx: float = 1.0
) -> np.ndarray:
    """One rough-edge displacement profile of ``n`` samples (spacing ``dx``) with a Palasantzas PSD.

    PSD(q) = 2 xi sigma^2 / (1 + q^2 xi^2)^(alpha + 1/2); Thorsos method (Hermitian complex Gaussians, inverse FFT).
    """
    return sr.palasantzas_profiles(rng, 1, n, sigma, xi, alpha, dx)[0]


def _u(rng: np.random.Generator, a: float, b: float) -> float:
    return float(rng.uniform(a, b))


def _logu(rng: np.random.Generator, a: float, b: float) -> float:
    return float(math.exp(rng.uniform(math.log(a), math.log(b))))


def _pick(rng: np.random.Generator, weights: dict[str, float]) -> str:
    keys = list(weights)
    p = np.array([weights[k] for k in keys], dtype=np.float64)
    return keys[int(rng.choice(len(keys), p=p / p.sum()))]


def _seed(rng: np.random.Generator) -> int:
    return int(rng.integers(0, 2**63 - 1))


def _tidy(x: Any) -> Any:
    """Plain JSON types with floats rounded: the rounded values are what gets rendered, so JSON re-renders exactly."""
    if isinstance(x, dict):
        return {k: _tidy(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_tidy(v) for v in x]
    if isinstance(x, (bool, np.bool_)):
        return bool(x)
    if isinstance(x, (int, np.integer)):
        return int(x)
    if isinstance(x, (float, np.floating)):
        return round(float(x), 5)
    return x


# --------------------------------------------------------------------------------------------------------------------
# Scene, roughness and imaging parameters.  Ranges are for 256 px and scale with size (same field of view); beam blur,
# noise and minimum defect widths are in output pixels because they are about what the detector resolves.
# --------------------------------------------------------------------------------------------------------------------
def _sample_scene(kind: str, rng: np.random.Generator, s: float) -> dict[str, Any]:
    if kind == "line_space":
        return {
            "type": kind,
            "pitch": max(10.0, _logu(rng, 16, 48) * s),  # below ~10 px the beam blur washes the pattern out
            "duty": _u(rng, 0.35, 0.6),
            "angle_deg": float(rng.choice([0.0, 90.0])) + _u(rng, -4, 4),
            "phase": _u(rng, 0, 1),
        }
    if kind == "contact_holes":
        pitch = max(10.0, _logu(rng, 18, 44) * s)
        return {
            "type": kind,
            "pitch": pitch,
            "pitch_ratio": 1.0 if rng.random() < 0.6 else _u(rng, 1.0, 1.3),
            "stagger": bool(rng.random() < 0.35),
            "diameter": _u(rng, 0.42, 0.62) * pitch,
            "ellipticity": _u(rng, 0.0, 0.08),
            "ellipse_angle_deg": _u(rng, 0, 180),
            "angle_deg": _u(rng, -4, 4),
            "phase": [_u(rng, 0, 1), _u(rng, 0, 1)],
            "cd_sigma": _u(rng, 0.01, 0.04),
        }
    if kind == "planar":
        variant = _pick(rng, {"blanket_dielectric": 0.2, "blanket_metal": 0.2, "inlaid_lines": 0.3, "inlaid_pads": 0.3})
        lines = variant == "inlaid_lines"
        return {
            "type": kind,
            "variant": variant,
            "pitch": _logu(rng, 36, 100 if lines else 90) * s,
            "duty": _u(rng, 0.3, 0.6) if lines else _u(rng, 0.4, 0.7),
            "angle_deg": float(rng.choice([0.0, 90.0])) + _u(rng, -3, 3),
            "phase": _u(rng, 0, 1),
            # Inlaid metal may be brighter or darker than the dielectric; a blanket film is one material.
            "metal_contrast": (float(rng.choice([-1.0, 1.0])) * _u(rng, 0.06, 0.2) if variant.startswith("inlaid")
                               else _u(rng, 0.0, 0.08) if variant == "blanket_metal" else 0.0),
            "metal_edge": _u(rng, 0.03, 0.1),
            "grain_size": _u(rng, 4, 14) * s,
            "grain_contrast": _u(rng, 0.02, 0.06),
        }
    raise ValueError(f"unknown scene type {kind!r}")


def _sample_roughness(rng: np.random.Generator, s: float) -> dict[str, float]:
    return {"sigma": _u(rng, 0.3, 0.8) * s, "xi": _u(rng, 6, 25) * s, "alpha": _u(rng, 0.4, 1.0)}


def _sample_imaging(rng: np.random.Generator, s: float, scene: dict[str, Any]) -> dict[str, Any]:
    sx = _u(rng, 0.5, 1.5)
    blob = rng.random() < 0.35
    im = {
        "background": _u(rng, 0.08, 0.16),
        "feature_level": _u(rng, 0.1, 0.22),
        "edge_coef": _u(rng, 0.3, 0.7),
        "edge_width": max(0.8, _u(rng, 0.7, 1.6) * s),
        "foot": _u(rng, 0.0, 0.04),
        "particle_edge_coef": _u(rng, 0.3, 0.6),
        "substrate_texture": _u(rng, 0.05, 0.2),
        "feature_texture": _u(rng, 0.03, 0.1),
        "texture_corr": _u(rng, 0.7, 2.0),
        "blur_sigma_x": sx,
        "blur_sigma_y": float(np.clip(sx * _u(rng, 0.8, 1.25), 0.4, 1.8)),
        "blur_angle_deg": _u(rng, 0, 180),
        "gradient": {
            "amp": _u(rng, 0.0, 0.25),
            "angle": _u(rng, 0, 2 * math.pi),
            "blob_amp": _u(rng, -0.1, 0.15) if blob else 0.0,
            "blob_x": _u(rng, -0.4, 0.4),
            "blob_y": _u(rng, -0.4, 0.4),
            "blob_r": _u(rng, 0.2, 0.5),
        },
        "jitter": _u(rng, 0.0, 0.15),
        "drift": _u(rng, -1.5, 1.5) * s,
        "vibration": [
            [_u(rng, 0.03, 0.25), _u(rng, 3, 80), _u(rng, 0, 2 * math.pi)] for _ in range(int(rng.integers(1, 4)))
        ],
        "counts": _logu(rng, 15, 200),  # Poisson level: electrons/pixel at the bright phase, lower = noisier
        "read_noise": _u(rng, 0.005, 0.03),  # on the output 0-1 grey scale
        "lag": _u(rng, 0.0, 0.9),
        "brightness": _u(rng, 0.4, 0.7),
        "offset": _u(rng, -0.03, 0.03),
        "gamma": _u(rng, 0.85, 1.15),
    }
    # Operators (or auto brightness/contrast) set the gain so the bright phase sits at a chosen grey level.  It is
    # computed from the parameters rather than the pixels so that a defect cannot shift the whole image's grey scale.
    bright = im["background"] + im["feature_level"]
    if scene["type"] == "planar":
        bright += max(0.0, scene["metal_contrast"])
    else:
        bright += 0.5 * im["edge_coef"]
    im["gain"] = im["brightness"] / bright
    return im


# --------------------------------------------------------------------------------------------------------------------
# Defects.  Placement keeps defects in the central part of the field so they are fully visible.
# --------------------------------------------------------------------------------------------------------------------
_P = dict[str, Any]  # a JSON-able parameter dict


def _defect(kind: str, variant: str, rng: np.random.Generator, **params: Any) -> dict[str, Any]:
    return {"type": kind, "variant": variant, "seed": _seed(rng), "params": params}


def _central_lines(scene: dict[str, Any], size: int, offset: float = 0.0) -> list[float]:
    """Across-line coordinates u of line centres (plus ``offset``) within the central 44% of the field."""
    p = scene["pitch"]
    k = np.arange(-int(size / p) - 2, int(size / p) + 3)
    u = (k + scene["phase"]) * p
    return [float(x) for x in u if abs(x + offset) <= 0.22 * size]


def _spread_spots(
    rng: np.random.Generator, n: int, cands: list[float], size: int, min_dist: float
) -> list[tuple[float, float]]:
    """``n`` (u, v) spots on candidate lines, pairwise ``min_dist`` apart (best effort)."""
    spots: list[tuple[float, float]] = []
    for _ in range(50 * n):
        if len(spots) == n:
            break
        u = cands[int(rng.integers(len(cands)))]
        v = _u(rng, -0.22, 0.22) * size
        if all(math.hypot(u - a, v - b) >= min_dist for a, b in spots):
            spots.append((u, v))
    return spots


def _blur(im: dict[str, Any]) -> float:
    return max(im["blur_sigma_x"], im["blur_sigma_y"])


def _defects_bridges(rng: np.random.Generator, scene: _P, rough: _P, im: _P, size: int, s: float) -> list[_P]:
    w = scene["duty"] * scene["pitch"]
    floor = max(1.6, 1.5 * _blur(im))  # thinner than the beam blur and a bridge would be invisible
    n = 1 if rng.random() < 0.75 else 2
    out = []
    for u, v in _spread_spots(rng, n, _central_lines(scene, size, 0.5 * scene["pitch"]), size, 3 * scene["pitch"]):
        if rng.random() < 0.5:
            out.append(_defect("bridge", "micro", rng, u=u, v=v, neck=max(floor, _u(rng, 0.12, 0.4) * w),
                               flare=_u(rng, 1.5, 3.0), edge_sigma=0.25 * s))
        else:
            out.append(_defect("bridge", "full", rng, u=u, v=v, neck=max(floor + 0.5, _u(rng, 0.6, 2.0) * w),
                               flare=_u(rng, 1.1, 1.8), edge_sigma=0.4 * s))
    return out


def _defects_gaps(rng: np.random.Generator, scene: _P, rough: _P, im: _P, size: int, s: float) -> list[_P]:
    w = scene["duty"] * scene["pitch"]
    blur = _blur(im)  # an opening narrower than ~3 sigma of beam blur would be smeared shut
    n = 1 if rng.random() < 0.75 else 2
    out = []
    for u, v in _spread_spots(rng, n, _central_lines(scene, size), size, 3 * scene["pitch"]):
        if rng.random() < 0.55:
            out.append(_defect("gap", "break", rng, u=u, v=v, length=max(3.5, 3.5 * blur, _u(rng, 0.4, 1.8) * w)))
        else:
            out.append(_defect("gap", "pinch", rng, u=u, v=v, length=max(3.0, 3.0 * blur, _u(rng, 0.15, 0.5) * w),
                               taper=_u(rng, 0.6, 2.0) * w))
    return out


def _defects_ler(rng: np.random.Generator, scene: _P, rough: _P, im: _P, size: int, s: float) -> list[_P]:
    # Clearly above the clean range (0.3-0.8 px at 256) yet capped by the pitch so lines neither touch nor break.
    sigma = min(_u(rng, 1.5, 3.0) * s, max(0.1 * scene["pitch"], 1.3 * s))
    return [_defect("ler", "high_roughness", rng, sigma=sigma, xi=_u(rng, 3, 10) * s, alpha=_u(rng, 0.3, 0.9))]


def _defects_cracks(rng: np.random.Generator, scene: _P, rough: _P, im: _P, size: int, s: float) -> list[_P]:
    out = []
    for k in range(1 if rng.random() < 0.8 else 2):
        spread = (0.3, 0.7) if k == 0 else (0.15, 0.85)
        out.append(_defect(
            "crack", "branching", rng,
            x=_u(rng, *spread) * size, y=_u(rng, *spread) * size, angle=_u(rng, 0, math.pi),
            length=_u(rng, 0.45, 1.0) * size, width=max(1.5, _u(rng, 1.6, 3.2) * s),
            wander=_u(rng, 0.05, 0.15), kink_prob=_u(rng, 0.01, 0.05), branch_prob=_u(rng, 0.004, 0.02),
            core=_u(rng, 0.05, 0.3), lip=_u(rng, 0.02, 0.08),
        ))
    return out


def _defects_particles(rng: np.random.Generator, scene: _P, rough: _P, im: _P, size: int, s: float) -> list[_P]:
    n = _pick(rng, {"1": 0.6, "2": 0.25, "3": 0.15})
    detector = _u(rng, 0, 2 * math.pi)  # one detector per image: all shadows point the same way
    out = []
    for k in range(int(n)):
        spread = (0.25, 0.75) if k == 0 else (0.1, 0.9)
        x, y = _u(rng, *spread) * size, _u(rng, *spread) * size
        r = max(2.0, _logu(rng, 3, 22) * s)
        if rng.random() < 0.6:
            variant, blobs = "single", [[x, y, r]]
        else:
            variant = "agglomerate"
            blobs = [[x, y, 0.8 * r]]
            for _ in range(int(rng.integers(1, 4))):
                a, d = _u(rng, 0, 2 * math.pi), _u(rng, 0.3, 0.8) * r
                blobs.append([x + d * math.cos(a), y + d * math.sin(a), max(1.5, _u(rng, 0.4, 0.75) * r)])
        out.append(_defect(
            "particle", variant, rng, x=x, y=y, radius=r, blobs=blobs, irregularity=_u(rng, 0.08, 0.25),
            level=_u(rng, 0.3, 0.6), shading=_u(rng, 0.2, 0.6), texture=_u(rng, 0.05, 0.15),
            detector_angle=detector, shadow_length=_u(rng, 0.4, 1.0) * r + 0.5, shadow_depth=_u(rng, 0.4, 0.75),
        ))
    return out


def _defects_cmp(rng: np.random.Generator, scene: _P, rough: _P, im: _P, size: int, s: float) -> list[_P]:
    weights = {"scratch": 0.4, "chatter": 0.2, "slurry_residue": 0.2, "dishing": 0.2}
    if scene["variant"].startswith("blanket"):
        del weights["dishing"]  # dishing/erosion needs inlaid metal
    kind = _pick(rng, weights)
    x, y = _u(rng, 0.3, 0.7) * size, _u(rng, 0.3, 0.7) * size
    angle = _u(rng, 0, math.pi)
    if kind == "scratch":
        n = int(_pick(rng, {"1": 0.6, "2": 0.25, "3": 0.15}))
        offsets = [0.0] + [float(rng.choice([-1, 1])) * _u(rng, 3, 20) * s for _ in range(n - 1)]
        widths = [max(1.2, _u(rng, 1.5, 4.5) * s) for _ in range(n)]
        return [_defect("scratch", "micro" if max(widths) < 2.5 else "macro", rng, x=x, y=y, angle=angle,
                        length=_u(rng, 0.5, 1.3) * size, curvature=_u(rng, -1.5, 1.5) / size,
                        offsets=offsets, widths=widths, core=_u(rng, 0.1, 0.4), lip=_u(rng, 0.15, 0.4))]
    if kind == "chatter":
        return [_defect("chatter", "chatter_marks", rng, x=x, y=y, angle=angle, n_marks=int(rng.integers(5, 15)),
                        spacing=max(3.0, _u(rng, 6, 14) * s), mark_length=max(4.0, _u(rng, 8, 22) * s),
                        mark_curvature=float(rng.choice([-1, 1])) * _u(rng, 0.03, 0.1) / s,
                        width=max(0.8, _u(rng, 1.0, 2.2) * s), core=_u(rng, 0.3, 0.6), lip=_u(rng, 0.08, 0.25))]
    if kind == "slurry_residue":
        return [_defect("slurry_residue", "smear", rng, x=x, y=y, radius=_u(rng, 14, 40) * s, angle=angle,
                        aspect=_u(rng, 0.3, 0.8), haze=_u(rng, 0.08, 0.2), n_particles=int(rng.integers(6, 30)),
                        particle_radius=[max(0.6, 0.6 * s), max(1.0, _u(rng, 1.0, 2.2) * s)],
                        particle_level=_u(rng, 0.15, 0.35))]
    return [_defect("dishing", "dishing_erosion", rng, x=x, y=y, rx=_u(rng, 0.18, 0.4) * size,
                    ry=_u(rng, 0.18, 0.4) * size, depth=_u(rng, 0.05, 0.12), bowl=_u(rng, 4, 12) * s,
                    rim=_u(rng, 0.04, 0.1))]


def _charging(rng: np.random.Generator, size: int, s: float) -> dict[str, Any]:
    x, y = _u(rng, 0.2, 0.6) * size, _u(rng, 0.25, 0.75) * size
    if rng.random() < 0.35:
        return _defect("charging", "scan_streak", rng, x=x, y=y, height=max(1.5, _u(rng, 2, 10) * s),
                       length=_u(rng, 40, 200) * s, amp=_u(rng, 0.15, 0.4))
    rg = _u(rng, 5, 16) * s
    return _defect("charging", "glow_and_tail", rng, x=x, y=y, glow_radius=rg, glow_amp=_u(rng, 0.4, 0.9),
                   tail_length=_u(rng, 25, 110) * s, tail_height=_u(rng, 0.8, 1.4) * rg,
                   tail_depth=_u(rng, 0.4, 0.75))


def _defects_other(rng: np.random.Generator, scene: _P, rough: _P, im: _P, size: int, s: float) -> list[_P]:
    if scene["type"] == "contact_holes":
        kind = _pick(rng, {"missing_hole": 0.35, "merged_holes": 0.35, "charging": 0.3})
        if kind == "charging":
            return [_charging(rng, size, s)]
        x, y = _u(rng, 0.3, 0.7) * size, _u(rng, 0.3, 0.7) * size
        a = math.radians(scene["angle_deg"])
        if rng.random() < 0.5:
            step = (scene["pitch"] * math.cos(a), scene["pitch"] * math.sin(a))
        else:
            py = scene["pitch"] * scene["pitch_ratio"]
            step = (-py * math.sin(a), py * math.cos(a))
        if kind == "missing_hole":
            n = int(_pick(rng, {"1": 0.6, "2": 0.3, "3": 0.1}))
        else:
            n = 2 if rng.random() < 0.8 else 3
        holes = [[x + k * step[0], y + k * step[1]] for k in range(n)]
        return [_defect(kind, f"{n}_holes", rng, holes=holes)]
    kind = _pick(rng, {"wiggle": 0.3, "collapse": 0.25, "resist_residue": 0.2, "charging": 0.25})
    if kind == "charging":
        return [_charging(rng, size, s)]
    p, w = scene["pitch"], scene["duty"] * scene["pitch"]
    u = _central_lines(scene, size)
    u = u[int(rng.integers(len(u)))]
    v = _u(rng, -0.15, 0.15) * size
    if kind == "wiggle":
        return [_defect("wiggle", "wiggling_lines", rng, u=u, v=v, n_lines=int(rng.integers(2, 6)),
                        length=_u(rng, 0.3, 0.6) * size, amplitude=_u(rng, 0.2, 0.4) * p,
                        wavelength=_u(rng, 1.5, 4.0) * p, phase=_u(rng, 0, 2 * math.pi))]
    if kind == "collapse":
        return [_defect("collapse", "collapsed_line", rng, u=u, v=v, length=_u(rng, 0.25, 0.6) * size,
                        ramp=_u(rng, 0.5, 1.5) * p, direction=float(rng.choice([-1.0, 1.0])),
                        shift=(p - w) * _u(rng, 0.9, 1.1), widen=_u(rng, 0.1, 0.4))]
    x, y = _u(rng, 0.3, 0.7) * size, _u(rng, 0.3, 0.7) * size
    return [_defect("resist_residue", "scum", rng, x=x, y=y, rx=_u(rng, 12, 35) * s, ry=_u(rng, 12, 35) * s,
                    level=_u(rng, 0.8, 1.4) * im["feature_level"])]


_DEFECT_SAMPLERS = {
    "clean": lambda *_: [],
    "bridges": _defects_bridges,
    "gaps": _defects_gaps,
    "cracks": _defects_cracks,
    "foreign_materials": _defects_particles,
    "cmp": _defects_cmp,
    "ler": _defects_ler,
    "other": _defects_other,
}


# --------------------------------------------------------------------------------------------------------------------
# Public rendering API
# --------------------------------------------------------------------------------------------------------------------
def sample_params(cls: str, rng: np.random.Generator, size: int = 256) -> dict[str, Any]:
    """Draw everything needed to render one image of class ``cls`` (JSON-able; see :func:`render_params`).

    Keys: ``scene`` (type and geometry: pitch, duty, angle, ...), ``roughness`` (the ordinary Palasantzas edge
    roughness sigma/xi/alpha in px; the ``ler`` class carries its elevated roughness in its defect entry, so rendering
    without defects gives the same lines with ordinary roughness), ``imaging`` (levels, edge effect, blur, scan
    distortion, noise, gain), ``seeds`` (geometry/texture/noise sub-seeds) and ``defects`` (type, variant, params,
    seed).
    All lengths are in output pixels.
    """
    if cls not in CLASSES:
        raise ValueError(f"unknown class {cls!r}; expected one of {CLASSES}")
    if size < 32:
        raise ValueError("size must be at least 32 px")
    s = size / 256.0
    scene = _sample_scene(_pick(rng, _SCENE_MIX[cls]), rng, s)
    rough = _sample_roughness(rng, s)
    im = _sample_imaging(rng, s, scene)
    seeds = {"geometry": _seed(rng), "texture": _seed(rng), "noise": _seed(rng)}
    defects = _DEFECT_SAMPLERS[cls](rng, scene, rough, im, size, s)
    return _tidy({
        "class": cls,
        "class_index": CLASSES.index(cls),
        "size": size,
        "generator_version": GENERATOR_VERSION,
        "supersample": sr.SS,
        "scene": scene,
        "roughness": rough,
        "imaging": im,
        "seeds": seeds,
        "defects": defects,
    })


def render_params(params: dict[str, Any], defects: bool = True) -> tuple[np.ndarray, dict[str, Any]]:
    """Render sampled (or JSON-loaded) params; ``defects=False`` renders the identical scene without its defects.

    Returns the uint8 HxW image and its metadata: ``params`` with each defect's ``bbox`` [x0, y0, x1, y1] (output
    pixels, x1/y1 exclusive) filled in, and ``defects_drawn``.
    """
    img, drawn = sr.render(params, draw_defects=defects)
    meta = dict(params)
    meta["defects"] = drawn
    meta["defects_drawn"] = bool(defects)
    return img, meta


def defect_visibility(with_defects: np.ndarray, without: np.ndarray) -> float:
    """Contrast to clutter of what the defects changed, from an image and its defect-free twin (same scene and noise).

    The difference is smoothed a little (sigma 1 px, about the beam blur) and its changed pixels are those above half
    its peak; the score is their mean |difference| over the standard deviation of the twin in a neighbourhood around
    them (15 px at 128 px, scaling with size): the clutter a defect has to be told apart from.  0 when nothing changed.
    """
    a = with_defects.astype(np.float32)
    b = without.astype(np.float32)
    m = np.abs(cv2.GaussianBlur(a - b, (0, 0), 1.0))
    peak = float(m.max())
    if peak <= 0:
        return 0.0
    mask = m > 0.5 * peak
    k = max(3, int(round(15 * a.shape[0] / 128)) | 1)
    ring = cv2.dilate(mask.astype(np.uint8), np.ones((k, k), np.uint8)).astype(bool)
    return float(m[mask].mean() / (b[ring].std() + 1e-6))


def _redraw_defects(params: dict[str, Any], rng: np.random.Generator) -> dict[str, Any]:
    """The same scene, imaging and noise with the class's defects drawn again, of the same types where possible.

    Keeping the types keeps the class's mix of defects (dishing, chatter, scratches, ...): redrawing freely would
    replace the faint kinds by the bold ones instead of drawing the faint kinds visibly.
    """
    size = params["size"]
    kinds = sorted(d["type"] for d in params["defects"])
    fresh: list[dict[str, Any]] = []
    for _ in range(100):  # sampling parameters costs microseconds; rendering is what is expensive
        fresh = _DEFECT_SAMPLERS[params["class"]](rng, params["scene"], params["roughness"], params["imaging"], size,
                                                  size / 256.0)
        if sorted(d["type"] for d in fresh) == kinds:
            break
    return {**params, "defects": _tidy(fresh)}


def _deepen_cut(p: dict[str, Any], k: float) -> dict[str, Any]:
    # core multiplies the signal inside the groove (0 = black): its contrast is 1 - core.
    return {**p, "core": max(0.02, 1.0 - (1.0 - p["core"]) * k), "lip": p["lip"] * k}


# Defects whose contrast may be raised to reach the visibility floor, and how.
_DEEPEN: dict[str, Callable[[dict[str, Any], float], dict[str, Any]]] = {
    "dishing": lambda p, k: {**p, "depth": p["depth"] * k, "rim": p["rim"] * k},
    "chatter": _deepen_cut,
}


def render_sample(
    cls: str,
    rng: np.random.Generator,
    size: int = 256,
    defects: bool = True,
    min_visibility: float = DEFAULT_MIN_VISIBILITY,
    max_redraws: int = 12,
) -> tuple[np.ndarray, dict[str, Any]]:
    """Sample and render one image of class ``cls``: (uint8 HxW image, metadata dict).

    With ``min_visibility`` > 0, a defect whose :func:`defect_visibility` falls below it is drawn again on the same
    scene (so scenes stay distributed as for ``clean``), up to ``max_redraws`` times, keeping the most visible try;
    dishing and chatter marks still below it are then deepened.  ``meta["visibility"]`` records the score, the floor,
    the number of redraws and any deepening.  0 samples exactly as generator version 1 did.
    """
    params = sample_params(cls, rng, size)
    if not defects or min_visibility <= 0 or all(d["type"] in _PATTERN_EDITS for d in params["defects"]):
        return render_params(params, defects=defects)
    twin, _ = render_params(params, defects=False)

    def attempt(p: dict[str, Any]) -> tuple[float, np.ndarray, dict[str, Any]]:
        img, meta = render_params(p)
        return defect_visibility(img, twin), img, meta

    best: tuple[float, np.ndarray, dict[str, Any]] | None = None
    redraws = 0
    while True:
        score, img, meta = attempt(params)
        if best is None or score > best[0]:
            best = (score, img, meta)
        if score >= min_visibility or redraws == max_redraws:
            break
        params = _redraw_defects(params, rng)
        redraws += 1
    score, img, meta = best
    record: dict[str, Any] = {"contrast_to_clutter": round(score, 3), "floor": float(min_visibility),
                              "redraws": redraws}
    total = 1.0
    for _ in range(3):
        if score >= min_visibility or not any(d["type"] in _DEEPEN for d in meta["defects"]):
            break
        # No redraw within the sampled ranges was visible (shallow dishing or light chatter on busy metal): deepen it
        # instead, by about what the score is short (it grows a little slower than the contrast), at most 3x a step.
        factor = round(min(3.0, 1.15 * min_visibility / max(score, 1e-3)), 3)
        deeper = {**meta, "defects": [{**d, "params": _tidy(_DEEPEN[d["type"]](d["params"], factor))}
                                      if d["type"] in _DEEPEN else d for d in meta["defects"]]}
        score, img, meta = attempt(deeper)
        total *= factor
        record.update(contrast_to_clutter=round(score, 3), deepened=round(total, 3))
    meta["visibility"] = record
    return img, meta


# --------------------------------------------------------------------------------------------------------------------
# Dataset writing
# --------------------------------------------------------------------------------------------------------------------
def split_counts(n: int, fractions: Sequence[float]) -> list[int]:
    """Largest-remainder split of ``n`` into len(fractions) integer counts that sum to ``n``."""
    f = np.asarray(fractions, dtype=np.float64)
    if f.ndim != 1 or (f < 0).any() or f.sum() <= 0:
        raise ValueError(f"bad split fractions {fractions!r}")
    f = f / f.sum()
    raw = n * f
    counts = np.floor(raw).astype(int)
    for i in np.argsort(-(raw - counts), kind="stable")[: n - counts.sum()]:
        counts[i] += 1
    return [int(c) for c in counts]


def _split_of(index: int, counts: Sequence[int]) -> str:
    edge = 0
    for name, c in zip(SPLITS, counts):
        edge += c
        if index < edge:
            return name
    raise IndexError(index)


def _encode_png(img: np.ndarray) -> bytes:
    ok, buf = cv2.imencode(".png", img)
    if not ok:
        raise RuntimeError("PNG encoding failed")
    return buf.tobytes()


def _make_one(task: tuple[str, str, int, str, int, int, float]) -> tuple[str, str, int]:
    out, cls, index, split, size, seed, min_visibility = task
    img, meta = render_sample(cls, image_rng(seed, cls, index), size, min_visibility=min_visibility)
    meta["seed"] = {"seed": seed, "class_key": class_key(cls), "index": index,
                    "derivation": "np.random.SeedSequence(entropy=seed, spawn_key=(class_key, index))"}
    meta["split"] = split
    folder = Path(out) / split / cls
    stem = f"{cls}_{index:06d}"
    meta["file"] = f"{split}/{cls}/{stem}.png"
    atomic_write_bytes(folder / f"{stem}.png", _encode_png(img))
    atomic_write_text(folder / f"{stem}.json", json.dumps(meta, indent=1) + "\n")
    return cls, split, index


def _worker_init() -> None:
    cv2.setNumThreads(1)  # one process per core already; OpenCV's own threads would only oversubscribe


def generate_dataset(
    out: str | Path,
    per_class: int,
    size: int = 256,
    seed: int = 0,
    split: Sequence[float] = DEFAULT_SPLIT,
    workers: int = 1,
    montage: bool = False,
    progress: bool = True,
    classes: Sequence[str] = CLASSES,
    min_visibility: float = DEFAULT_MIN_VISIBILITY,
) -> dict[str, Any]:
    """Write ``out/{train,val,test}/<class>/<class>_NNNNNN.{png,json}`` and ``out/summary.json``.

    Defects less visible than ``min_visibility`` are redrawn (see :func:`render_sample`); 0 writes version 1's images.

    ``per_class`` images per class over all splits; index ranges of each class go to train, val, test in that order
    (counts from :func:`split_counts`).  Returns the summary (plus timing, which is kept out of summary.json so that
    the folder is byte-identical for a given seed).
    """
    if per_class < 1:
        raise ValueError("per_class must be >= 1")
    if len(split) != 3:
        raise ValueError("split needs three fractions: train, val, test")
    out = Path(out)
    counts = split_counts(per_class, split)
    for sp, n_split in zip(SPLITS, counts):
        if n_split == 0:
            continue  # no empty test/ for a 0.9,0.1,0 split: trainers would treat it as a test split to evaluate
        for cls in classes:
            (out / sp / cls).mkdir(parents=True, exist_ok=True)
    tasks = [(str(out), cls, i, _split_of(i, counts), size, seed, float(min_visibility))
             for cls in classes for i in range(per_class)]
    t0 = time.perf_counter()
    from tqdm import tqdm  # the train extra: imported when images are made, so --help works without it

    bar = tqdm(total=len(tasks), desc="synth", unit="img", disable=not progress)
    if workers <= 1:
        for t in tasks:
            _make_one(t)
            bar.update()
    else:
        # spawn: forking a process that already ran OpenCV's thread pool can deadlock.
        with mp.get_context("spawn").Pool(workers, initializer=_worker_init) as pool:
            for _ in pool.imap_unordered(_make_one, tasks, chunksize=max(1, min(16, len(tasks) // (4 * workers)))):
                bar.update()
    bar.close()
    elapsed = time.perf_counter() - t0
    summary: dict[str, Any] = {
        "generator_version": GENERATOR_VERSION,
        "size": size,
        "seed": seed,
        "min_visibility": float(min_visibility),
        "per_class": per_class,
        "split_fractions": [float(x) for x in split],
        "counts": {sp: {cls: c for cls in classes} for sp, c in zip(SPLITS, counts)},
        "classes": list(classes),
        "n_images": len(tasks),
    }
    atomic_write_text(out / "summary.json", json.dumps(summary, indent=1) + "\n")
    if montage:
        summary["montages"] = [str(p) for p in write_montages(out, classes)]
    summary["seconds"] = elapsed
    summary["images_per_second"] = len(tasks) / elapsed if elapsed > 0 else float("inf")
    return summary


def write_montages(
    out: str | Path, classes: Sequence[str] = CLASSES, n: int = 16, boxes: bool = False
) -> list[Path]:
    """One grid PNG per class (``out/montage/<class>.png``) of its first ``n`` images, for a person to look at.

    ``boxes=True`` draws each defect's bbox in red (the image is then BGR), to check that boxes are honest.
    """
    out = Path(out)
    (out / "montage").mkdir(parents=True, exist_ok=True)
    written = []
    for cls in classes:
        files = sorted((p for sp in SPLITS for p in (out / sp / cls).glob("*.png")), key=lambda p: p.name)[:n]
        if not files:
            continue
        tiles = []
        for f in files:
            img = cv2.imread(str(f), cv2.IMREAD_GRAYSCALE)
            if boxes:
                img = cv2.cvtColor(img, cv2.COLOR_GRAY2BGR)
                meta = json.loads(f.with_suffix(".json").read_text())
                for d in meta["defects"]:
                    if d.get("bbox") and d["type"] != "ler":
                        x0, y0, x1, y1 = d["bbox"]
                        cv2.rectangle(img, (x0, y0), (x1 - 1, y1 - 1), (0, 0, 255), 1)
            tiles.append(img)
        h, w = tiles[0].shape[:2]
        cols = math.ceil(math.sqrt(len(tiles)))
        rows = math.ceil(len(tiles) / cols)
        gap, head = 4, 28
        shape = (head + rows * (h + gap), cols * (w + gap) - gap) + tiles[0].shape[2:]
        grid = np.full(shape, 255, np.uint8)
        for k, t in enumerate(tiles):
            r, c = divmod(k, cols)
            y, x = head + r * (h + gap), c * (w + gap)
            grid[y : y + h, x : x + w] = t
        cv2.putText(grid, f"{cls} ({len(tiles)})", (6, 20), cv2.FONT_HERSHEY_SIMPLEX, 0.6, 0, 1, cv2.LINE_AA)
        path = out / "montage" / f"{cls}.png"
        atomic_write_bytes(path, _encode_png(grid))
        written.append(path)
    return written


# --------------------------------------------------------------------------------------------------------------------
# CLI
# --------------------------------------------------------------------------------------------------------------------
def _parse_split(text: str) -> tuple[float, float, float]:
    try:
        parts = tuple(float(x) for x in text.split(","))
    except ValueError as e:
        raise argparse.ArgumentTypeError(f"not numbers: {text!r}") from e
    if len(parts) != 3 or min(parts) < 0 or abs(sum(parts) - 1.0) > 1e-6:
        raise argparse.ArgumentTypeError("expected three non-negative fractions summing to 1, e.g. 0.7,0.15,0.15")
    return parts  # type: ignore[return-value]


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(
        prog="python -m train.synthetic",
        description="Generate a synthetic SEM wafer-defect dataset (8-bit grey PNG + per-image JSON) for: "
        + ", ".join(CLASSES) + ".",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="""examples:
  # 500 images per class at 256x256, 70/15/15 split, 2 worker processes, plus one montage PNG per class
  python -m train.synthetic --out data/synth --per-class 500 --size 256 --seed 0 --workers 2 --montage

  # small smoke set with a custom split
  python -m train.synthetic --out /tmp/synth --per-class 12 --size 128 --seed 1 --split 0.5,0.25,0.25

  # generator version 1's images (faint defects kept), e.g. to reproduce numbers measured on them
  python -m train.synthetic --out data/synth_v1 --per-class 300 --size 128 --seed 0 --min-visibility 0

layout: OUT/{train,val,test}/<class>/<class>_NNNNNN.png + .json (what was drawn: scene, imaging, roughness,
defects with bbox [x0,y0,x1,y1], seed), OUT/summary.json, OUT/montage/<class>.png with --montage.
Same --seed gives byte-identical files, whatever --workers.""",
    )
    ap.add_argument("--out", required=True, type=Path, help="output folder")
    ap.add_argument("--per-class", type=int, default=100, help="images per class over all splits (default 100)")
    ap.add_argument("--size", type=int, default=256, help="image side in pixels (default 256)")
    ap.add_argument("--seed", type=int, default=0, help="base seed (default 0)")
    ap.add_argument("--split", type=_parse_split, default=DEFAULT_SPLIT,
                    help="train,val,test fractions (default 0.7,0.15,0.15)")
    ap.add_argument("--workers", type=int, default=1, help="worker processes (default 1)")
    ap.add_argument("--min-visibility", type=float, default=DEFAULT_MIN_VISIBILITY,
                    help="redraw a defect whose contrast to the clutter around it is below this (default "
                    f"{DEFAULT_MIN_VISIBILITY}; 0 reproduces generator version 1)")
    ap.add_argument("--montage", action="store_true", help="also write OUT/montage/<class>.png grids")
    ap.add_argument("--montage-count", type=int, default=16, help="images per montage (default 16)")
    ap.add_argument("--quiet", action="store_true", help="no progress bar")
    return ap


@cli("python -m train.synthetic")
def main(argv: Sequence[str] | None = None) -> int:
    ap = build_parser()
    args = ap.parse_args(argv)
    if args.size < 32:
        ap.error("--size must be at least 32")
    if args.per_class < 1 or args.workers < 1 or args.montage_count < 1:
        ap.error("--per-class, --workers and --montage-count must be at least 1")
    if args.min_visibility < 0:
        ap.error("--min-visibility must be >= 0")
    summary = generate_dataset(args.out, args.per_class, args.size, args.seed, args.split, args.workers,
                               montage=False, progress=not args.quiet, min_visibility=args.min_visibility)
    if args.montage:
        write_montages(args.out, n=args.montage_count)
    print(f"wrote {summary['n_images']} images to {args.out} in {summary['seconds']:.1f} s "
          f"({summary['images_per_second']:.1f} img/s)", file=sys.stderr)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
