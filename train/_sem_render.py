"""Rendering core of the synthetic SEM generator (private helper of :mod:`train.synthetic`).

Everything here is a pure function of a JSON-able parameter dict, so an image can be re-rendered from its sidecar JSON
and the same scene can be rendered with and without its defects.  Geometry is rasterised at ``SS`` times the output
size, turned into a secondary-electron (SE) signal (material contrast + edge effect + shadows), area-averaged down to
the output size and passed through an imaging chain modelled after NIST ARTIMAGEN: astigmatic Gaussian beam blur,
charging, scan-line jitter/drift, shot and read noise, detector lag, brightness/contrast.

What to draw (which classes get which scenes and defects, and the parameter ranges) is decided in train.synthetic.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

import cv2
import numpy as np

SS = 2  # geometry supersampling factor; 2x + INTER_AREA already removes the staircase look of 1x rasterisation
_SHIFT = 4  # fixed-point bits for cv2 polygon coordinates, so sub-pixel geometry survives rasterisation
_ONE = 1 << _SHIFT


# --------------------------------------------------------------------------------------------------------------------
# Edge roughness
# --------------------------------------------------------------------------------------------------------------------
def palasantzas_psd(q: np.ndarray, sigma: float, xi: float, alpha: float) -> np.ndarray:
    """Palasantzas power spectral density PSD(q) = 2 xi sigma^2 / (1 + q^2 xi^2)^(alpha + 1/2)."""
    return 2.0 * xi * sigma**2 / (1.0 + (q * xi) ** 2) ** (alpha + 0.5)


def palasantzas_profiles(
    rng: np.random.Generator, count: int, n: int, sigma: float, xi: float, alpha: float, dx: float = 1.0
) -> np.ndarray:
    """``count`` independent rough-edge profiles of ``n`` samples spaced ``dx`` apart (Thorsos method).

    Complex Gaussians with amplitude sqrt(PSD) on the rfft half-spectrum (real at DC and Nyquist, which makes the full
    spectrum Hermitian) are inverse-FFT'd.  The discrete PSD is normalised so that the expected variance is exactly
    ``sigma**2`` whatever ``n``/``xi``; the DC term is dropped because a mean offset of an edge is not roughness.
    Profiles are periodic with period ``n * dx``, which is harmless for edges longer than the field of view and exactly
    right for closed contours (contact holes, particles).
    """
    if n < 2:
        raise ValueError("profile needs at least 2 samples")
    q = 2.0 * np.pi * np.fft.rfftfreq(n, d=dx)
    psd = palasantzas_psd(q, 1.0, max(xi, 1e-6), alpha)
    psd[0] = 0.0
    weight = np.full(q.size, 2.0)  # interior bins appear twice in the full (Hermitian) spectrum
    weight[0] = 1.0
    if n % 2 == 0:
        weight[-1] = 1.0
    total = float((psd * weight).sum())
    amp = np.sqrt(psd * (sigma**2 * n**2 / total)) if total > 0 else np.zeros_like(psd)
    re = rng.standard_normal((count, q.size))
    im = rng.standard_normal((count, q.size))
    z = (re + 1j * im) / math.sqrt(2.0)
    z[:, 0] = re[:, 0]
    if n % 2 == 0:
        z[:, -1] = re[:, -1]
    return np.fft.irfft(z * amp, n=n, axis=-1)


# --------------------------------------------------------------------------------------------------------------------
# Small raster helpers
# --------------------------------------------------------------------------------------------------------------------
def _pts(x: np.ndarray, y: np.ndarray) -> np.ndarray:
    """Output-pixel coordinates (pixel p spans [p, p+1)) -> fixed-point supersampled cv2 points."""
    xy = np.stack([(np.asarray(x) * SS - 0.5) * _ONE, (np.asarray(y) * SS - 0.5) * _ONE], axis=-1)
    return np.round(xy).astype(np.int32).reshape(-1, 1, 2)


def _fill(mask: np.ndarray, polys: list[np.ndarray]) -> None:
    if polys:
        cv2.fillPoly(mask, polys, 1, lineType=cv2.LINE_8, shift=_SHIFT)


def _polyline(mask: np.ndarray, x: np.ndarray, y: np.ndarray, width_px: float) -> None:
    thickness = max(1, int(round(width_px * SS)))
    cv2.polylines(mask, [_pts(x, y)], False, 1, thickness=thickness, lineType=cv2.LINE_8, shift=_SHIFT)


def bbox_from_mask(mask: np.ndarray, size: int) -> list[int] | None:
    """Bounding box [x0, y0, x1, y1] (output pixels, x1/y1 exclusive) of the non-zero supersampled pixels."""
    x, y, w, h = cv2.boundingRect(mask)
    if w == 0 or h == 0:
        return None
    return [
        max(0, x // SS),
        max(0, y // SS),
        min(size, -(-(x + w) // SS)),
        min(size, -(-(y + h) // SS)),
    ]


def _smooth_noise(rng: np.random.Generator, shape: tuple[int, int], corr: float) -> np.ndarray:
    """Zero-mean, unit-std Gaussian-correlated noise (grain, mottling); ``corr`` is the correlation length in px."""
    f = int(corr // 2) if corr >= 4 else 1
    if f > 1:
        # Long correlation lengths: draw coarse and upsample, a large-kernel blur at full size costs 10x more.
        small = (max(2, -(-shape[0] // f)), max(2, -(-shape[1] // f)))
        z = cv2.GaussianBlur(rng.standard_normal(small, dtype=np.float32), (0, 0), corr / f,
                             borderType=cv2.BORDER_REFLECT)
        z = cv2.resize(z, (shape[1], shape[0]), interpolation=cv2.INTER_CUBIC)
    else:
        z = rng.standard_normal(shape, dtype=np.float32)
        if corr > 0.3:
            z = cv2.GaussianBlur(z, (0, 0), corr, borderType=cv2.BORDER_REFLECT)
    std = float(z.std())
    return z / std if std > 0 else z


def _grid(size: int) -> tuple[np.ndarray, np.ndarray]:
    """Supersampled pixel-centre coordinates in output-pixel units (row and column vectors)."""
    c = (np.arange(size * SS, dtype=np.float32) + 0.5) / SS
    return c[None, :], c[:, None]


def _up(img: np.ndarray) -> np.ndarray:
    return cv2.resize(img, (img.shape[1] * SS, img.shape[0] * SS), interpolation=cv2.INTER_LINEAR)


def grains(rng: np.random.Generator, size: int, grain_px: float) -> np.ndarray:
    """Voronoi grain map (unit-variance value per grain, darker boundaries): channelling contrast of polycrystalline
    metal, which is what makes a post-CMP copper/tungsten surface look like metal in an SEM."""
    n = max(4, int(size * size / grain_px**2))
    xy = rng.uniform(0, size, (n, 2)).astype(int)
    seeds = np.ones((size, size), np.uint8)
    seeds[xy[:, 1], xy[:, 0]] = 0
    _, labels = cv2.distanceTransformWithLabels(seeds, cv2.DIST_L2, 5, labelType=cv2.DIST_LABEL_CCOMP)
    vals = rng.standard_normal(int(labels.max()) + 1).astype(np.float32)
    g = vals[labels]
    edge = np.zeros_like(g)
    edge[:, 1:] += labels[:, 1:] != labels[:, :-1]
    edge[1:, :] += labels[1:, :] != labels[:-1, :]
    return g - 1.2 * np.minimum(edge, 1.0)


# --------------------------------------------------------------------------------------------------------------------
# Scene geometry
# --------------------------------------------------------------------------------------------------------------------
class LineSpace:
    """Line/space array in a rotated (u across lines, v along lines) frame centred on the image.

    Each line is described by per-sample arrays along v (centre offset, width scale, presence) plus its two rough
    edges, so defects such as gaps, wiggling or collapse are local edits of those arrays and every line is drawn as
    one polygon per continuous piece.
    """

    def __init__(self, scene: dict[str, Any], rough: dict[str, Any], size: int, seed: int) -> None:
        self.size = size
        self.pitch = float(scene["pitch"])
        self.w = float(scene["duty"]) * self.pitch
        a = math.radians(float(scene["angle_deg"]))
        self.t = (math.cos(a), math.sin(a))  # along lines
        self.n = (-math.sin(a), math.cos(a))  # across lines
        half = size / math.sqrt(2.0) + 2.0 * self.pitch
        n_v = 2 * int(math.ceil(half * SS)) + 2
        self.v = (np.arange(n_v) - n_v // 2) / SS
        nk = int(math.ceil(half / self.pitch)) + 1
        self.centers = (np.arange(-nk, nk + 1) + float(scene["phase"])) * self.pitch
        nl = self.centers.size
        rng = np.random.default_rng(seed)
        prof = palasantzas_profiles(rng, 2 * nl, n_v, rough["sigma"], rough["xi"], rough["alpha"], dx=1.0 / SS)
        # Soft clip (tanh) so that extreme LER never pinches a line shut or touches the neighbour: that would be an
        # unlabelled gap/bridge.  At normal sigma the clip is far out in the tails and changes nothing visible.
        lim = 0.42 * min(self.w, self.pitch - self.w)
        prof = lim * np.tanh(prof / lim)
        self.el, self.er = prof[:nl], prof[nl:]
        self.off = np.zeros((nl, n_v))
        self.wscale = np.ones((nl, n_v))
        self.m = np.ones((nl, n_v))

    def vi(self, v: float) -> int:
        return int(np.clip(round(v * SS) + self.v.size // 2, 0, self.v.size - 1))

    def nearest(self, u: float) -> int:
        return int(np.argmin(np.abs(self.centers - u)))

    def xy(self, u: np.ndarray | float, v: np.ndarray | float) -> tuple[Any, Any]:
        c = self.size / 2.0
        return c + u * self.n[0] + v * self.t[0], c + u * self.n[1] + v * self.t[1]

    def edges(self, i: int) -> tuple[np.ndarray, np.ndarray]:
        hw = 0.5 * self.w * self.wscale[i] * self.m[i]
        c = self.centers[i] + self.off[i]
        return c - hw + self.m[i] * self.el[i], c + hw + self.m[i] * self.er[i]

    def polygons(self, indices: range | list[int] | None = None) -> list[np.ndarray]:
        polys: list[np.ndarray] = []
        lim = self.size / math.sqrt(2.0) + self.pitch
        for i in range(self.centers.size) if indices is None else indices:
            if abs(self.centers[i]) > lim + float(np.abs(self.off[i]).max()):
                continue
            left, right = self.edges(i)
            valid = np.concatenate(([0], (right - left > 0.05).astype(np.int8), [0]))
            d = np.diff(valid)
            for s, e in zip(np.flatnonzero(d == 1), np.flatnonzero(d == -1)):
                if e - s < 2:
                    continue
                u = np.concatenate((left[s:e], right[s:e][::-1]))
                v = np.concatenate((self.v[s:e], self.v[s:e][::-1]))
                polys.append(_pts(*self.xy(u, v)))
        return polys

    def raster(self, indices: range | list[int] | None = None) -> np.ndarray:
        mask = np.zeros((self.size * SS, self.size * SS), np.uint8)
        _fill(mask, self.polygons(indices))
        return mask


class Contacts:
    """Contact-hole array: a (possibly staggered) lattice of slightly elliptical holes with rough rims."""

    def __init__(self, scene: dict[str, Any], rough: dict[str, Any], size: int, seed: int) -> None:
        self.size = size
        px = float(scene["pitch"])
        py = px * float(scene["pitch_ratio"])
        a = math.radians(float(scene["angle_deg"]))
        e1 = np.array([math.cos(a), math.sin(a)]) * px
        e2 = np.array([-math.sin(a), math.cos(a)]) * py
        r0 = 0.5 * float(scene["diameter"])
        n = int(math.ceil(0.75 * size / min(px, py))) + 2
        c = size / 2.0
        centers = []
        for j in range(-n, n + 1):
            shift = 0.5 if scene["stagger"] and j % 2 else 0.0
            for i in range(-n, n + 1):
                p = c + (i + scene["phase"][0] + shift) * e1 + (j + scene["phase"][1]) * e2
                if -2 * r0 < p[0] < size + 2 * r0 and -2 * r0 < p[1] < size + 2 * r0:
                    centers.append(p)
        self.centers = np.array(centers, dtype=np.float64).reshape(-1, 2)
        rng = np.random.default_rng(seed)
        nh = len(self.centers)
        self.n_theta = 96
        self.theta = np.arange(self.n_theta) * (2 * np.pi / self.n_theta)
        cd = 1.0 + float(scene["cd_sigma"]) * rng.standard_normal(nh)
        prof = palasantzas_profiles(
            rng, nh, self.n_theta, rough["sigma"], rough["xi"], rough["alpha"], dx=2 * np.pi * r0 / self.n_theta
        )
        ell = 1.0 + float(scene["ellipticity"]) * np.cos(2 * (self.theta - math.radians(scene["ellipse_angle_deg"])))
        self.radii = np.maximum(r0 * cd[:, None] * ell[None, :] + prof, 0.3 * r0)
        self.r0 = r0
        self.e1, self.e2 = e1, e2

    def polygon(self, i: int) -> np.ndarray:
        x = self.centers[i, 0] + self.radii[i] * np.cos(self.theta)
        y = self.centers[i, 1] + self.radii[i] * np.sin(self.theta)
        return _pts(x, y)

    def nearest(self, x: float, y: float, exclude: list[int] | None = None) -> int:
        order = np.argsort(np.hypot(self.centers[:, 0] - x, self.centers[:, 1] - y), kind="stable")
        return int(next(i for i in order if not exclude or i not in exclude))

    def nearest_distinct(self, points: list[list[float]]) -> list[int]:
        """Nearest hole to each point, never the same hole twice (small fields can snap two points to one)."""
        idx: list[int] = []
        for x, y in points:
            idx.append(self.nearest(x, y, idx))
        return idx

    def raster(self, skip: set[int] | None = None) -> np.ndarray:
        mask = np.zeros((self.size * SS, self.size * SS), np.uint8)
        _fill(mask, [self.polygon(i) for i in range(len(self.centers)) if not skip or i not in skip])
        return mask


def planar_metal(scene: dict[str, Any], size: int) -> np.ndarray | None:
    """Inlaid (damascene) metal mask of a planar post-CMP field, or None for a blanket film."""
    variant = scene["variant"]
    if variant == "blanket_dielectric":
        return None
    if variant == "blanket_metal":
        return np.ones((size * SS, size * SS), np.uint8)
    gx, gy = _grid(size)
    a = math.radians(float(scene["angle_deg"]))
    c = size / 2.0
    u = (gx - c) * -math.sin(a) + (gy - c) * math.cos(a)
    v = (gx - c) * math.cos(a) + (gy - c) * math.sin(a)
    p = float(scene["pitch"])
    fu = np.mod(u / p + scene["phase"], 1.0)
    if variant == "inlaid_lines":
        return (fu < scene["duty"]).astype(np.uint8)
    fv = np.mod(v / p + scene["phase"], 1.0)
    return ((fu < scene["duty"]) & (fv < scene["duty"])).astype(np.uint8)


# --------------------------------------------------------------------------------------------------------------------
# Canvas and composition
# --------------------------------------------------------------------------------------------------------------------
@dataclass
class Canvas:
    """Supersampled layers that the SE signal is composed from."""

    size: int
    feat: np.ndarray  # uint8: raised material (lines, film top); its edges get the SE edge effect
    base: np.ndarray  # float32: signal of the raised material above the substrate
    sub: np.ndarray  # float32: substrate signal
    part: np.ndarray = field(init=False)  # uint8: tall objects on top (particles) with their own strong rim
    part_level: np.ndarray = field(init=False)
    add: np.ndarray = field(init=False)  # float32: additive films (residue, haze, dishing rims)
    dark: np.ndarray = field(init=False)  # float32: multiplicative darkening (crack cores, shadows)

    def __post_init__(self) -> None:
        s = self.size * SS
        self.part = np.zeros((s, s), np.uint8)
        self.part_level = np.zeros((s, s), np.float32)
        self.add = np.zeros((s, s), np.float32)
        self.dark = np.ones((s, s), np.float32)


def _rim(mask: np.ndarray, width_ss: float) -> np.ndarray:
    d = cv2.distanceTransform(mask, cv2.DIST_L2, 3)
    return np.exp(-np.maximum(d - 0.5, 0.0) / width_ss) * mask


def compose(cv: Canvas, im: dict[str, Any]) -> np.ndarray:
    """SE signal at supersampled resolution: substrate + material + edge effect + particles, then films and shadows."""
    fp = cv.feat | cv.part
    ew = float(im["edge_width"]) * SS
    rim = _rim(fp, ew)
    sig = cv.sub + cv.feat * cv.base + float(im["edge_coef"]) * rim
    if im["foot"] > 0 and not fp.all():
        # Darker band at the foot of sidewalls: the SE detector sees less of the substrate next to a step.
        d_out = cv2.distanceTransform(1 - fp, cv2.DIST_L2, 3)
        sig -= float(im["foot"]) * np.exp(-np.maximum(d_out - 0.5, 0.0) / ew) * (1 - fp)
    if cv.part.any():
        rim_p = _rim(cv.part, ew)
        sig = np.where(cv.part > 0, cv.sub + cv.part_level + float(im["particle_edge_coef"]) * rim_p + 0.5 * rim, sig)
    sig += cv.add
    sig *= cv.dark
    return sig.astype(np.float32)


# --------------------------------------------------------------------------------------------------------------------
# Imaging chain
# --------------------------------------------------------------------------------------------------------------------
def _astig_kernel(sx: float, sy: float, angle_deg: float) -> np.ndarray:
    r = int(math.ceil(3.0 * max(sx, sy)))
    a = math.radians(angle_deg)
    yy, xx = np.mgrid[-r : r + 1, -r : r + 1].astype(np.float64)
    xr = xx * math.cos(a) + yy * math.sin(a)
    yr = -xx * math.sin(a) + yy * math.cos(a)
    k = np.exp(-0.5 * ((xr / sx) ** 2 + (yr / sy) ** 2))
    return (k / k.sum()).astype(np.float32)


def charging_field(d: dict[str, Any], size: int) -> tuple[np.ndarray, np.ndarray]:
    """Additive glow and multiplicative dark tail (along the fast scan direction, +x) of a local charging artefact."""
    p = d["params"]
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float32) + 0.5
    dx, dy = xx - p["x"], yy - p["y"]
    if d["variant"] == "scan_streak":
        # A burst of charging during a few scan lines: rows brighten abruptly and recover along the scan.
        band = np.exp(-0.5 * (dy / p["height"]) ** 4)
        streak = np.where(dx > 0, np.exp(-np.maximum(dx, 0) / p["length"]), 0.0) * band * p["amp"]
        return streak.astype(np.float32), np.zeros_like(streak, dtype=np.float32)
    rg = p["glow_radius"]
    glow = p["glow_amp"] * np.exp(-0.5 * (dx**2 + dy**2) / rg**2)
    tail = np.where(dx > 0, np.exp(-np.maximum(dx, 0) / p["tail_length"]), 0.0) * np.exp(
        -0.5 * dy**2 / (p["tail_height"] ** 2)
    )
    return glow.astype(np.float32), (p["tail_depth"] * tail).astype(np.float32)


def imaging(
    sig: np.ndarray, im: dict[str, Any], size: int, noise_seed: int, charges: list[dict[str, Any]]
) -> np.ndarray:
    """Output-resolution imaging chain; ``sig`` is the supersampled SE signal.  Returns uint8."""
    img = cv2.resize(sig, (size, size), interpolation=cv2.INTER_AREA)
    rng = np.random.default_rng(noise_seed)
    # Every random draw of the chain happens up front and in a fixed order, so the noise realisation does not depend on
    # the scene: the same params rendered with and without a defect differ only where the defect is.
    z_shot = rng.standard_normal((size, size), dtype=np.float32)
    z_read = rng.standard_normal((size, size), dtype=np.float32)
    z_jit = rng.standard_normal(size).astype(np.float32)

    img = cv2.filter2D(img, -1, _astig_kernel(im["blur_sigma_x"], im["blur_sigma_y"], im["blur_angle_deg"]),
                       borderType=cv2.BORDER_REFLECT)
    for d in charges:
        glow, tail = charging_field(d, size)
        img = img * (1.0 - tail) + glow

    yy, xx = np.mgrid[0:size, 0:size].astype(np.float32)
    g = im["gradient"]
    nx, ny = (xx - size / 2) / size, (yy - size / 2) / size
    field_ = 1.0 + g["amp"] * (nx * math.cos(g["angle"]) + ny * math.sin(g["angle"]))
    if g["blob_amp"]:
        r2 = (nx - g["blob_x"]) ** 2 + (ny - g["blob_y"]) ** 2
        field_ += g["blob_amp"] * np.exp(-0.5 * r2 / g["blob_r"] ** 2)
    img = img * field_

    # Raster-scan distortion: each scan line lands slightly off in x (vibration sines + per-line jitter + slow drift).
    rows = np.arange(size, dtype=np.float32)
    dx = im["jitter"] * z_jit + im["drift"] * (rows / size - 0.5)
    for amp, period, phase in im["vibration"]:
        dx += amp * np.sin(2 * np.pi * rows / period + phase)
    img = cv2.remap(img, xx + dx[:, None], yy, interpolation=cv2.INTER_LINEAR, borderMode=cv2.BORDER_REFLECT)

    # Shot noise: Poisson with `counts` electrons per unit signal, drawn through the Anscombe transform from a fixed
    # normal field (variance = mean, right skew at low counts) instead of rng.poisson, whose draw consumption depends
    # on the mean and would make the noise realisation scene-dependent.
    # `counts` is the mean number of detected electrons per pixel at the bright-phase level (which the gain maps to
    # `brightness`), so the noise level means the same thing whatever the scene's raw signal scale.
    lam = float(im["counts"]) * im["gain"] / im["brightness"]
    c = lam * np.maximum(img, 0.0)
    img = (np.square(np.sqrt(c + 0.375) + 0.5 * z_shot) - 0.375) / lam
    # Read (amplifier) noise is specified on the output 0-1 scale, i.e. after the brightness gain.
    img += (im["read_noise"] / im["gain"]) * z_read
    if im["lag"] > 0.05:
        # Detector/amplifier bandwidth smears along the fast scan axis: the streaky look of real SEM noise.
        img = cv2.GaussianBlur(img, (0, 0), sigmaX=im["lag"], sigmaY=1e-3, borderType=cv2.BORDER_REFLECT)
    img = np.maximum(img * im["gain"] + im["offset"], 0.0) ** im["gamma"]
    return np.clip(np.rint(img * 255.0), 0, 255).astype(np.uint8)


# --------------------------------------------------------------------------------------------------------------------
# Defects
# --------------------------------------------------------------------------------------------------------------------
def _gap(ls: LineSpace, d: dict[str, Any]) -> list[int] | None:
    p = d["params"]
    i = ls.nearest(p["u"])
    before = ls.raster([i])
    dv = np.abs(ls.v - p["v"])
    g = 0.5 * p["length"]
    if d["variant"] == "break":
        # Rounded (semicircular) line ends on both sides of the opening, as after an under-exposed or eroded cut.
        r = max(0.5 * ls.w, 0.5)
        m = np.ones_like(dv)
        m[dv < g] = 0.0
        cap = (dv >= g) & (dv < g + r)
        m[cap] = np.sqrt(1.0 - ((g + r - dv[cap]) / r) ** 2)
    else:
        # Pinch: the line necks down over a taper and is open at the waist.
        m = np.clip((dv - g) / p["taper"], 0.0, 1.0) ** 0.6
    ls.m[i] = np.minimum(ls.m[i], m)
    return bbox_from_mask(before ^ ls.raster([i]), ls.size)


def _raised_cosine(x: np.ndarray, half: float, ramp: float) -> np.ndarray:
    t = np.clip((half - np.abs(x)) / max(ramp, 1e-6), 0.0, 1.0)
    return 0.5 - 0.5 * np.cos(np.pi * t)


def _wiggle(ls: LineSpace, d: dict[str, Any]) -> list[int] | None:
    p = d["params"]
    i0 = ls.nearest(p["u"])
    idx = [i0 + k - p["n_lines"] // 2 for k in range(p["n_lines"])]
    before = ls.raster(idx)
    dv = ls.v - p["v"]
    env = _raised_cosine(dv, 0.5 * p["length"], 0.5 * p["length"])
    for k, i in enumerate(idx):
        # Outer lines of the buckled group move less, as they are held by their straight neighbours.
        a = p["amplitude"] * (1.0 if 0 < k < len(idx) - 1 or len(idx) < 3 else 0.6)
        ls.off[i] += a * env * np.sin(2 * np.pi * dv / p["wavelength"] + p["phase"] + 0.25 * k)
    return bbox_from_mask(before ^ ls.raster(idx), ls.size)


def _collapse(ls: LineSpace, d: dict[str, Any]) -> list[int] | None:
    p = d["params"]
    i = ls.nearest(p["u"])
    idx = [i - 1, i, i + 1]
    before = ls.raster(idx)
    env = _raised_cosine(ls.v - p["v"], 0.5 * p["length"], p["ramp"])
    ls.off[i] += p["direction"] * p["shift"] * env
    ls.wscale[i] *= 1.0 + p["widen"] * env
    return bbox_from_mask(before ^ ls.raster(idx), ls.size)


def _bridge(ls: LineSpace, cv: Canvas, d: dict[str, Any]) -> list[int] | None:
    p = d["params"]
    rng = np.random.default_rng(d["seed"])
    i = ls.nearest(p["u"])
    k = ls.vi(p["v"])
    r_i = ls.edges(i)[1][k]
    l_j = ls.edges(i + 1)[0][k]
    # Reach into both lines so the bridge stays attached despite the edge roughness around v.
    inset = min(0.35 * ls.w, 2.0)
    u0, u1 = r_i - inset, l_j + inset
    n = max(8, int((u1 - u0) * SS * 2))
    uu = np.linspace(u0, u1, n)
    t = (uu - 0.5 * (u0 + u1)) / (0.5 * (u1 - u0))
    hh = 0.5 * p["neck"] * (1.0 + (p["flare"] - 1.0) * t**2)  # narrow waist, flared feet like real resist bridges
    rough = palasantzas_profiles(rng, 2, n, p["edge_sigma"], 2.0, 0.7, dx=(u1 - u0) / n)
    top = p["v"] - hh + rough[0]
    bot = p["v"] + hh + rough[1]
    mask = np.zeros_like(cv.feat)
    _fill(mask, [_pts(*ls.xy(np.concatenate((uu, uu[::-1])), np.concatenate((top, bot[::-1]))))])
    bb = bbox_from_mask(mask & (1 - cv.feat), ls.size)
    cv.feat |= mask
    return bb


def _blob_polygon(
    rng: np.random.Generator, x: float, y: float, r: float, irregularity: float, n: int = 64
) -> np.ndarray:
    th = np.arange(n) * (2 * np.pi / n)
    prof = palasantzas_profiles(rng, 1, n, irregularity * r, 0.35 * r, 0.8, dx=2 * np.pi * r / n)[0]
    rr = np.maximum(r + prof, 0.35 * r)
    return _pts(x + rr * np.cos(th), y + rr * np.sin(th))


def _roi(mask: np.ndarray, pad: int) -> tuple[slice, slice, np.ndarray, np.ndarray]:
    x, y, w, h = cv2.boundingRect(mask)
    s = mask.shape[0]
    x0, y0, x1, y1 = max(0, x - pad), max(0, y - pad), min(s, x + w + pad), min(s, y + h + pad)
    gx = (np.arange(x0, x1, dtype=np.float32) + 0.5) / SS
    gy = (np.arange(y0, y1, dtype=np.float32) + 0.5) / SS
    return slice(y0, y1), slice(x0, x1), gx[None, :], gy[:, None]


def _particle(cv: Canvas, d: dict[str, Any]) -> list[int] | None:
    p = d["params"]
    rng = np.random.default_rng(d["seed"])
    mask = np.zeros_like(cv.feat)
    _fill(mask, [_blob_polygon(rng, x, y, r, p["irregularity"]) for x, y, r in p["blobs"]])
    cx, cy, big_r = p["x"], p["y"], p["radius"]
    ys, xs, gx, gy = _roi(mask, 2)
    phi = p["detector_angle"]
    shade = ((gx - cx) * math.cos(phi) + (gy - cy) * math.sin(phi)) / big_r
    tex = _smooth_noise(rng, (ys.stop - ys.start, xs.stop - xs.start), 1.5 * SS)
    level = p["level"] * (1.0 + p["shading"] * np.clip(shade, -1.5, 1.5) + p["texture"] * tex)
    m_roi = mask[ys, xs] > 0
    cv.part_level[ys, xs] = np.where(m_roi, level, cv.part_level[ys, xs])
    # Shadow on the side away from the detector: SEs emitted there are blocked by the particle.
    sl = p["shadow_length"] * SS
    blur = max(0.35 * sl, 1.0)
    ys, xs, _, _ = _roi(mask, int(sl + 3 * blur) + 2)  # shadow work only near the particle
    m = mask[ys, xs]
    tm = np.float32([[1, 0, -sl * math.cos(phi)], [0, 1, -sl * math.sin(phi)]])
    sh = cv2.warpAffine(m, tm, (m.shape[1], m.shape[0]), flags=cv2.INTER_NEAREST)
    sh = (sh & (1 - m)).astype(np.float32)
    soft = cv2.GaussianBlur(sh, (0, 0), blur) * (1 - m)
    cv.dark[ys, xs] *= 1.0 - p["shadow_depth"] * soft
    cv.part |= mask
    region = mask.copy()
    region[ys, xs] |= (soft > 0.05).astype(np.uint8)
    return bbox_from_mask(region, cv.size)


def _crack_paths(rng: np.random.Generator, p: dict[str, Any]) -> list[tuple[np.ndarray, np.ndarray, float]]:
    """Branching random walk with heading persistence: straight-ish fractures with kinks and side branches."""
    paths: list[tuple[np.ndarray, np.ndarray, float]] = []
    step = 1.0

    def walk(x: float, y: float, heading: float, length: float, width: float, depth: int) -> None:
        xs, ys = [x], [y]
        h = heading
        for _ in range(int(length / step)):
            h += rng.normal(0.0, p["wander"])
            if rng.random() < p["kink_prob"]:
                h += rng.normal(0.0, 0.7)
            h += 0.15 * (heading - h)  # brittle fractures keep their overall direction
            x += step * math.cos(h)
            y += step * math.sin(h)
            xs.append(x)
            ys.append(y)
            if depth < 2 and rng.random() < p["branch_prob"]:
                side = 1.0 if rng.random() < 0.5 else -1.0
                walk(x, y, h + side * rng.uniform(0.4, 1.1), length * rng.uniform(0.15, 0.45), width * 0.65, depth + 1)
        paths.append((np.array(xs), np.array(ys), width))

    walk(p["x"], p["y"], p["angle"], 0.5 * p["length"], p["width"], 0)
    walk(p["x"], p["y"], p["angle"] + math.pi, 0.5 * p["length"], p["width"], 0)
    return paths


def _draw_tapered(
    mask: np.ndarray, x: np.ndarray, y: np.ndarray, width: float, taper: float = 0.5, both_ends: bool = False
) -> None:
    """Polyline that thins toward its end (crack tips) or toward both ends (scratches)."""
    n = len(x)
    chunks = 6 if n > 18 else 1
    bounds = np.linspace(0, n - 1, chunks + 1).astype(int)
    for c in range(chunks):
        a, b = bounds[c], bounds[c + 1] + 1
        f = c / max(chunks - 1, 1)
        if both_ends:
            f = abs(2.0 * f - 1.0)
        _polyline(mask, x[a:b], y[a:b], max(0.5, width * (1.0 - taper * f)))


def _crack(cv: Canvas, d: dict[str, Any]) -> list[int] | None:
    p = d["params"]
    rng = np.random.default_rng(d["seed"])
    mask = np.zeros_like(cv.feat)
    for x, y, w in _crack_paths(rng, p):
        _draw_tapered(mask, x, y, w)
    _cut(cv, mask, p["core"], p["lip"], 0.6)
    return bbox_from_mask(mask, cv.size)


def _cut(cv: Canvas, mask: np.ndarray, core: float, lip: float, lip_width: float) -> None:
    """A groove/fracture: a deep dark core (few SEs escape) bordered by thin bright lips (edge effect of its walls).

    The raised-material mask is left alone on purpose: cutting it would give the groove the full edge rim of a line,
    which for a 1-2 px crack outshines the dark core and makes it look like a bright ridge.
    """
    r = max(1, int(round(lip_width * SS)))
    ring = cv2.dilate(mask, cv2.getStructuringElement(cv2.MORPH_ELLIPSE, (2 * r + 1, 2 * r + 1))) & (1 - mask)
    cv.add += np.float32(lip) * ring
    cv.dark[mask > 0] *= core


def _arc(x: float, y: float, angle: float, length: float, curvature: float, n: int) -> tuple[np.ndarray, np.ndarray]:
    s = np.linspace(-0.5 * length, 0.5 * length, n)
    h = angle + curvature * s
    ds = s[1] - s[0]
    xs = np.cumsum(np.cos(h)) * ds
    ys = np.cumsum(np.sin(h)) * ds
    mid = n // 2
    return x + xs - xs[mid], y + ys - ys[mid]


def _scratch(cv: Canvas, d: dict[str, Any]) -> list[int] | None:
    p = d["params"]
    mask = np.zeros_like(cv.feat)
    nx, ny = -math.sin(p["angle"]), math.cos(p["angle"])
    for off, w in zip(p["offsets"], p["widths"]):
        x, y = _arc(p["x"] + off * nx, p["y"] + off * ny, p["angle"], p["length"], p["curvature"], 200)
        _draw_tapered(mask, x, y, w, taper=0.7, both_ends=True)
    _cut(cv, mask, p["core"], p["lip"], 0.8)
    return bbox_from_mask(mask, cv.size)


def _chatter(cv: Canvas, d: dict[str, Any]) -> list[int] | None:
    p = d["params"]
    rng = np.random.default_rng(d["seed"])
    mask = np.zeros_like(cv.feat)
    tx, ty = math.cos(p["angle"]), math.sin(p["angle"])
    n = p["n_marks"]
    for j in range(n):
        s = (j - 0.5 * (n - 1)) * p["spacing"] * (1.0 + 0.08 * rng.standard_normal())
        ln = p["mark_length"] * rng.uniform(0.7, 1.2)
        # Each chatter mark is a short crescent across the track, bowed along the polishing direction.
        x, y = _arc(p["x"] + s * tx, p["y"] + s * ty, p["angle"] + math.pi / 2, ln, p["mark_curvature"], 24)
        _polyline(mask, x, y, p["width"])
    _cut(cv, mask, p["core"], p["lip"], 0.8)
    return bbox_from_mask(mask, cv.size)


def _blob_region(
    rng: np.random.Generator, cv: Canvas, x: float, y: float, rx: float, ry: float, angle: float = 0.0
) -> np.ndarray:
    """Irregular soft patch (0..1, supersampled): a rotated ellipse broken up by smooth noise."""
    gx, gy = _grid(cv.size)
    ca, sa = math.cos(angle), math.sin(angle)
    du, dv = (gx - x) * ca + (gy - y) * sa, -(gx - x) * sa + (gy - y) * ca
    r = np.sqrt((du / rx) ** 2 + (dv / ry) ** 2)
    noise = _up(_smooth_noise(rng, (cv.size, cv.size), 0.25 * min(rx, ry) + 1.0))
    return np.clip(1.6 * (1.0 - r) + 0.45 * noise, 0.0, 1.0).astype(np.float32) * (r < 1.3)


def _resist_residue(cv: Canvas, d: dict[str, Any]) -> list[int] | None:
    p = d["params"]
    rng = np.random.default_rng(d["seed"])
    patch = _blob_region(rng, cv, p["x"], p["y"], p["rx"], p["ry"])
    patch = np.where(patch > 0.15, patch, 0.0).astype(np.float32)
    speckle = 1.0 + 0.35 * _up(_smooth_noise(rng, (cv.size, cv.size), 0.8))
    # Scum fills the spaces; a thinner film of it also covers the line tops.
    cv.add += p["level"] * patch * speckle * np.where(cv.feat > 0, 0.35, 1.0).astype(np.float32)
    return bbox_from_mask((patch > 0).astype(np.uint8), cv.size)


def _slurry(cv: Canvas, d: dict[str, Any]) -> list[int] | None:
    p = d["params"]
    rng = np.random.default_rng(d["seed"])
    haze = _blob_region(rng, cv, p["x"], p["y"], p["radius"], p["radius"] * p["aspect"], p["angle"])
    haze = np.where(haze > 0.15, haze, 0.0).astype(np.float32)
    cv.add += p["haze"] * haze
    mask = np.zeros_like(cv.feat)
    polys = []
    ca, sa = math.cos(p["angle"]), math.sin(p["angle"])
    for _ in range(p["n_particles"]):
        # Abrasive particles scattered through the smear, which is drawn out along the polishing direction.
        du, dv = rng.normal(0.0, 0.4 * p["radius"]), rng.normal(0.0, 0.4 * p["radius"] * p["aspect"])
        px, py = p["x"] + du * ca - dv * sa, p["y"] + du * sa + dv * ca
        polys.append(_blob_polygon(rng, px, py, rng.uniform(*p["particle_radius"]), 0.2, 24))
    _fill(mask, polys)
    cv.part_level[mask > 0] = p["particle_level"]
    cv.part |= mask
    return bbox_from_mask(mask | (haze > 0).astype(np.uint8), cv.size)


def _dishing(cv: Canvas, metal: np.ndarray | None, d: dict[str, Any], edge_width: float) -> list[int] | None:
    if metal is None:
        return None
    p = d["params"]
    gx, gy = _grid(cv.size)
    r = np.sqrt(((gx - p["x"]) / p["rx"]) ** 2 + ((gy - p["y"]) / p["ry"]) ** 2)
    region = np.clip((1.2 - r) / 0.4, 0.0, 1.0) * metal  # soft-edged: dishing fades out, it has no sharp border
    dist = cv2.distanceTransform(metal, cv2.DIST_L2, 5) / SS
    # Recessed metal: darker toward the middle of each feature (bowl), bright where the surface slopes at its rim.
    depth = p["depth"] * (1.0 - np.exp(-dist / p["bowl"])) * region
    rim = p["rim"] * np.exp(-np.maximum(dist - 0.25, 0.0) / edge_width) * region
    cv.add += (rim - depth).astype(np.float32)
    return bbox_from_mask(((depth + rim) > 0.02 * (p["depth"] + p["rim"])).astype(np.uint8), cv.size)


def _charging_bbox(d: dict[str, Any], size: int) -> list[int] | None:
    glow, tail = charging_field(d, size)
    m = (glow > 0.05 * glow.max()) | (tail > 0.05 * max(float(tail.max()), 1e-6))
    ys, xs = np.nonzero(m)
    if xs.size == 0:
        return None
    return [int(xs.min()), int(ys.min()), int(xs.max()) + 1, int(ys.max()) + 1]


# --------------------------------------------------------------------------------------------------------------------
# Entry point
# --------------------------------------------------------------------------------------------------------------------
_LINE_EDITS = {"gap": _gap, "wiggle": _wiggle, "collapse": _collapse}


def render(params: dict[str, Any], draw_defects: bool = True) -> tuple[np.ndarray, list[dict[str, Any]]]:
    """Render ``params`` (see train.synthetic.sample_params) to a uint8 image; returns it and the drawn defects.

    The returned defect dicts are copies of ``params["defects"]`` with their measured ``bbox`` filled in; with
    ``draw_defects=False`` the same scene, textures and noise are rendered without any defect and the list is empty.
    """
    size = int(params["size"])
    im = params["imaging"]
    seeds = params["seeds"]
    scene = params["scene"]
    defects = [{**d, "params": dict(d["params"])} for d in params["defects"]] if draw_defects else []

    tex = np.random.default_rng(seeds["texture"])
    t_sub = _smooth_noise(tex, (size, size), im["texture_corr"])
    t_feat = _smooth_noise(tex, (size, size), im["texture_corr"])
    t_mottle = _smooth_noise(tex, (size, size), size / 10.0)
    sub = _up(im["background"] * (1.0 + im["substrate_texture"] * t_sub))
    base = _up(im["feature_level"] * (1.0 + im["feature_texture"] * (t_feat + 0.6 * t_mottle)))

    kind = scene["type"]
    metal = None
    if kind == "line_space":
        rough = params["roughness"]
        for d in defects:
            if d["type"] == "ler":
                rough = d["params"]
                d["bbox"] = [0, 0, size, size]
        ls = LineSpace(scene, rough, size, seeds["geometry"])
        for d in defects:
            if d["type"] in _LINE_EDITS:
                d["bbox"] = _LINE_EDITS[d["type"]](ls, d)
        cv = Canvas(size, ls.raster(), base, sub)
        for d in defects:
            if d["type"] == "bridge":
                d["bbox"] = _bridge(ls, cv, d)
    elif kind == "contact_holes":
        ch = Contacts(scene, params["roughness"], size, seeds["geometry"])
        missing: set[int] = set()
        for d in defects:
            if d["type"] == "missing_hole":
                idx = set(ch.nearest_distinct(d["params"]["holes"]))
                missing |= idx
                d["bbox"] = bbox_from_mask(ch.raster(set(range(len(ch.centers))) - idx), size)
        holes = ch.raster(missing)
        for d in defects:
            if d["type"] == "merged_holes":
                idx = ch.nearest_distinct(d["params"]["holes"])
                pts = np.concatenate([ch.polygon(i) for i in idx])
                hull = np.zeros_like(holes)
                cv2.fillPoly(hull, [cv2.convexHull(pts)], 1, lineType=cv2.LINE_8, shift=_SHIFT)
                d["bbox"] = bbox_from_mask(hull & (1 - holes), size)
                holes |= hull
        cv = Canvas(size, 1 - holes, base, sub)
    elif kind == "planar":
        # A polished field is flat: the film is "raised material" everywhere (no topographic edges); inlaid metal
        # shows as material contrast, grain contrast and only a faint edge.
        metal = planar_metal(scene, size)
        if metal is not None:
            g = _up(grains(np.random.default_rng([seeds["texture"], 1]), size, scene["grain_size"]))
            base = base + (scene["metal_contrast"] + scene["grain_contrast"] * g) * metal
        cv = Canvas(size, np.ones((size * SS, size * SS), np.uint8), base, sub)
        if metal is not None:
            cv.add += np.float32(scene["metal_edge"]) * _rim(metal, im["edge_width"] * SS)
    else:
        raise ValueError(f"unknown scene type {kind!r}")

    # Drawing order (dict order) matters physically: films and grooves first, particles sit on top of everything.
    overlays: dict[str, Any] = {
        "resist_residue": _resist_residue,
        "dishing": lambda c, d: _dishing(c, metal, d, im["edge_width"]),
        "crack": _crack,
        "scratch": _scratch,
        "chatter": _chatter,
        "slurry_residue": _slurry,
        "particle": _particle,
    }
    for kind_order, draw in overlays.items():
        for d in defects:
            if d["type"] == kind_order:
                d["bbox"] = draw(cv, d)
    charges = []
    for d in defects:
        if d["type"] == "charging":
            d["bbox"] = _charging_bbox(d, size)
            charges.append(d)

    sig = compose(cv, im)
    return imaging(sig, im, size, seeds["noise"], charges), defects
