"""The frame-quality gate: frames with no usable content get an outcome of their own, never a class.

It runs in :class:`~runtime.classifier.Classifier` on every frame, after decoding and resizing and before the
intensity stretch and inference. A refused frame comes out as ``label="invalid"`` with a ``reason``
(:data:`REASONS`); inference is skipped for it.

What it measures (:func:`frame_stats`), on the resized grey shrunk further to at most :data:`ANALYSIS_SIDE` pixels a
side (cheap, and small source frames that were enlarged look as they did before):

* ``spread`` — robust range (0.5th to 99.5th percentile) as a share of the full scale. The full scale is 255 for
  uint8, 1 for floats, and for uint16 the smallest of 8/10/12/14/16 bits that holds the frame's maximum (10- to
  14-bit data stored in uint16 is measured on its own scale).
* ``clipped`` — share of pixels at the bottom or the top of the full scale (whichever is larger), counted on a
  strided sample of the frame as it came (before any resizing blends clipped pixels with their neighbours).
* ``signal`` — share of the stretched frame's variance that is not white noise (white noise of any distribution
  has a 3×3 Laplacian variance of 36 times its own), at half resolution where the frame is large enough.
* ``detail`` — share of the variance in fine and mid-scale structure (what a difference of the frame and its
  Gaussian blur holds beyond the noise, noise estimated from the finest scale as in Immerkær 1996 and never taken
  below the quantisation noise of integer data): near 0 for a defocused scene or a smooth gradient.
* ``band`` — share of the structure (the variance beyond white noise) in a mid-scale band (difference of Gaussian
  blurs σ 1 and σ 3, which passes little white noise), beyond the noise's share: low for a noisy frame whose only
  structure is a smooth blur, where ``detail`` drowns in the noise. Measured only for noisy frames
  (``signal`` < :data:`DEFOCUS_MIN_SIGNAL`), the only ones its rule applies to; NaN for the others.
* ``edge`` — blur σ, in pixels of the measured frame, of its strongest edges, from how much their gradient drops
  between two Gaussian scales (:data:`EDGE_SIGMAS`; for a step blurred by σ the ratio is √(σ²+b²)/√(σ²+a²)):
  independent of how many edges a frame has and of their contrast, so a mildly defocused pattern, whose soft edges
  still carry some ``detail``, is told from a sharp scene with few edges. Measured for frames with ``signal`` ≥
  :data:`DEFOCUS_MIN_SIGNAL` (noise sharpens it); NaN for the others.
* ``level`` — mean of the stretched frame; ``mean`` — mean as a share of the full scale; ``raw_spread`` and
  ``raw_mean`` — robust range and mean as shares of the dtype's maximum (255, 65535, 1: what a ``full_scale``
  model divides by).

Reasons, checked in this order: ``blank`` (spread below its limit), ``saturated`` (clipped above its limit),
``noise`` (signal below its limit), ``defocus`` (detail below its limit while most of the variance is structure,
not noise: out of focus, or only a smooth gradient; or edges blurred beyond ``defocus_edge`` pixels of the model
input while the detail is under :data:`EDGE_DETAIL_MARGIN` times its limit; or, in a noisy frame, band below its
limit),
``out_of_range`` (a statistic outside the range the training images had, widened by a margin).

A frame smaller than the model input is measured at its own size, before it is enlarged (enlarging smooths noise),
so its pixels are coarser than the input's: the same scene measures several times the detail at half the size, and
so does a defocused one. The detail and band limits grow with the enlargement (:data:`DEFOCUS_ZOOM_POWER`,
:data:`BAND_ZOOM_POWER`, up to :data:`ZOOM_CAP` times), so a small frame needs more visible structure to be classified.

The limits are fitted on the training split when a model is trained (:func:`fit_limits`, called by ``python -m
train``) and travel in the model metadata (``ModelMetadata.quality``). Models made before the gate get
:func:`default_limits` and one warning.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any

import cv2
import numpy as np

from runtime.contract import ModelMetadata
from runtime.preprocess import full_scale, percentiles

#: Possible ``Prediction.reason`` values of refused frames.
REASONS = ("blank", "saturated", "noise", "defocus", "out_of_range")
ANALYSIS_SIDE = 128
PERCENTILES = (0.5, 99.5)
SIGNAL_HALVE_MIN = 96
STATS = ("spread", "clipped", "signal", "detail", "band", "edge", "level", "mean", "raw_spread", "raw_mean")
#: The statistics ``out_of_range`` bounds, per intensity mode: what the network's input depends on.
RANGED = {"percentile": ("level",), "bit_depth": ("level", "spread", "mean"),
          "full_scale": ("level", "raw_spread", "raw_mean")}
QUALITY_VERSION = 1
_BLUR_SIGMA = 2.0
#: Share of white-noise variance that passes ``x - GaussianBlur(x, sigma)``: 1 - 2 g0 + sum(g^2) of the 2-D kernel.
_k1 = cv2.getGaussianKernel(int(2 * math.ceil(3 * _BLUR_SIGMA) + 1), _BLUR_SIGMA).ravel().astype(np.float64)
_NOISE_PASS = float(1.0 - 2.0 * _k1[len(_k1) // 2] ** 2 + (_k1 ** 2).sum() ** 2)
_LAPLACE = np.array([[1, -2, 1], [-2, 4, -2], [1, -2, 1]], np.float32)
#: The mid-scale band of ``band``: Gaussian blur σ 1 minus σ 3, and the share of white-noise variance it passes.
_BAND_SIGMAS = (1.0, 3.0)


def _gauss_kernel_2d(sigma: float, size: int) -> np.ndarray:
    k = cv2.getGaussianKernel(size, sigma).ravel().astype(np.float64)
    return np.outer(k, k)


_BAND_KSIZE = tuple(int(2 * math.ceil(3 * s) + 1) for s in _BAND_SIGMAS)
_BAND_NOISE_PASS = float(np.square(
    np.pad(_gauss_kernel_2d(_BAND_SIGMAS[0], _BAND_KSIZE[0]), (_BAND_KSIZE[1] - _BAND_KSIZE[0]) // 2)
    - _gauss_kernel_2d(_BAND_SIGMAS[1], _BAND_KSIZE[1])).sum())

#: Limits for models without fitted ones. Chosen so that the 8- to 16-bit renderings of content-free frames are
#: refused and real SEM frames are not (docs/frame-quality.md); ``range`` is filled per intensity mode.
DEFAULT_LIMITS: dict[str, Any] = {
    "blank_spread": 0.01,
    "saturated_clipped": 0.5,
    "noise_signal": 0.15,
    "defocus_detail": 0.01,
    "defocus_band": 0.05,
    "defocus_edge": 2.75,
}
#: Models that divide by the dtype's maximum (``intensity="full_scale"``) were trained on frames that use a good
#: part of the scale; a frame using less (10- to 14-bit data in uint16, a very dim frame) is out of their range.
DEFAULT_FULL_SCALE_RANGE = {"raw_spread": (0.08, 1.0)}
DEFAULT_BIT_DEPTH_RANGE = {"spread": (0.08, 1.0)}
#: ``defocus`` by ``detail`` needs a frame that is mostly smooth structure; a frame with little detail that is mostly
#: noise (faint structure in heavy shot noise) is judged by ``band`` instead, whose band passes little noise.
DEFOCUS_MIN_SIGNAL = 0.6
#: A frame enlarged ``z`` times for the model (smaller than its input) is measured on pixels ``z`` times coarser:
#: its detail limit is multiplied by ``min(z, ZOOM_CAP) ** DEFOCUS_ZOOM_POWER`` and its band limit by
#: ``min(z, ZOOM_CAP) ** BAND_ZOOM_POWER`` (chosen on half-size copies of real frames and content-free frames,
#: docs/frame-quality.md).
DEFOCUS_ZOOM_POWER = 2.5
BAND_ZOOM_POWER = 0.5
ZOOM_CAP = 4.0
#: Scales (Gaussian σ, pixels) of the two gradients whose ratio at the strongest edges (the top :data:`EDGE_TOP` of
#: the coarser one) gives ``edge``; an estimate beyond :data:`EDGE_MAX` (no drop at all) is reported as that.
EDGE_SIGMAS = (0.7, 2.0)
EDGE_TOP = 0.01
EDGE_MAX = 50.0
#: The edge-blur rule refuses only frames whose detail is under this many times the detail limit: plenty of fine
#: structure means the frame is usable whatever its strongest edges look like.
EDGE_DETAIL_MARGIN = 4.0
#: ``defocus_edge`` fitted on training images moves above its default to this many times their 99.9th percentile of
#: edge (among those the rule applies to), so that no training image is refused.
EDGE_FIT_MARGIN = 1.1
#: ``defocus_band`` fitted on training images moves below its default to this share of the noisy training frames'
#: 0.1th percentile of band (the band of real noisy frames varies little, so the margin is small).
BAND_FIT_SHARE = 0.8
#: Statistics whose range also ends at half the training images' 0.1th percentile: a frame with half the contrast
#: or brightness of the faintest training frame is out of range for a model that sees absolute intensities.
DIM_STATS = ("spread", "raw_spread", "mean", "raw_mean")
#: Widening of the training range for ``out_of_range``, as a share of the 0.1–99.9 percentile span.
RANGE_MARGIN = 0.5


def _analysis_view(grey: np.ndarray, side: int = ANALYSIS_SIDE) -> np.ndarray:
    h, w = grey.shape[:2]
    k = max(h, w) / side
    if k <= 1:
        return grey.astype(np.float32)  # a copy, which the caller scales in place
    size = (max(4, int(round(w / k))), max(4, int(round(h / k))))
    return cv2.resize(grey.astype(np.float32), size, interpolation=cv2.INTER_AREA)


def _clipped(native: np.ndarray, fs: float, side: int = ANALYSIS_SIDE) -> float:
    """Share of pixels at the bottom or top of the full scale, on a strided sample of the frame as it came (an area
    average would blend clipped pixels with their neighbours)."""
    k = max(1, int(math.ceil(max(native.shape[:2]) / side)))
    v = native[::k, ::k]
    tol = fs / 255.0
    return max(np.count_nonzero(v <= tol), np.count_nonzero(v >= fs - tol)) / v.size


def frame_stats(grey: np.ndarray, native: np.ndarray | None = None,
                edge_below: float = math.inf) -> dict[str, float]:
    """The gate's statistics of one 2-D grey frame (uint8, uint16 or float 0–1), as described in the module doc.

    ``native`` is the frame before it was shrunk to ``grey`` (the model input), if it was: clipping is counted
    on it. ``edge`` is measured only when ``detail`` is below ``edge_below`` (the gate passes the detail above which
    the edge rule cannot refuse, which spares most sharp frames its cost); NaN otherwise."""
    fs = full_scale(grey)
    to_dtype = fs / (float(np.iinfo(grey.dtype).max) if grey.dtype.kind == "u" else 1.0)
    g = _analysis_view(grey)
    # On the integers where nothing was shrunk (a histogram for uint8): the same numbers, cheaper.
    lo, hi = (v / fs for v in percentiles(grey if g.shape == grey.shape else g, PERCENTILES))
    g *= np.float32(1.0 / fs)
    spread = float(hi - lo)
    clipped = _clipped(native if native is not None else grey, fs)
    mean = float(g.mean())
    raw = {"mean": mean, "raw_spread": spread * to_dtype, "raw_mean": mean * to_dtype}
    if spread <= 0:
        return {"spread": 0.0, "clipped": float(clipped), "signal": 0.0, "detail": 0.0, "band": 0.0,
                "edge": math.nan, "level": 0.0, **raw}
    s = np.clip((g - np.float32(lo)) * np.float32(1.0 / spread), 0.0, 1.0)
    var = float(s.var())
    if var <= 1e-12:
        return {"spread": spread, "clipped": float(clipped), "signal": 0.0, "detail": 0.0, "band": 0.0,
                "edge": math.nan, "level": float(s.mean()), **raw}
    signal = _signal(s, var)
    lap = cv2.filter2D(s, cv2.CV_32F, _LAPLACE, borderType=cv2.BORDER_REFLECT)[1:-1, 1:-1]
    # For the detail, the noise level from the absolute deviation (Immerkær), which edges inflate less.
    noise_var = (math.sqrt(math.pi / 2) * float(np.abs(lap).mean()) / 6.0) ** 2
    if grey.dtype.kind == "u":
        # Never below the quantisation noise (LSB^2 / 12, in stretched units): a noise-free frame of few grey levels
        # has contour steps that would otherwise count as detail.
        noise_var = max(noise_var, 1.0 / (12.0 * (spread * fs) ** 2))
    fine = s - cv2.GaussianBlur(s, (0, 0), _BLUR_SIGMA, borderType=cv2.BORDER_REFLECT)
    detail = max(0.0, float(fine.var()) - _NOISE_PASS * noise_var) / var
    return {"spread": spread, "clipped": float(clipped), "signal": signal, "detail": detail,
            # band is read only for noisy frames (the defocus rule and its fit), so only they pay for its blurs
            "band": _band(s, var, float(np.square(lap).mean()) / 36.0) if signal < DEFOCUS_MIN_SIGNAL else math.nan,
            "edge": _edge_blur(s) if signal >= DEFOCUS_MIN_SIGNAL and detail < edge_below else math.nan,
            "level": float(s.mean()), **raw}


def _band(s: np.ndarray, var: float, noise_var: float) -> float:
    """Share of the structure variance (``var`` minus the white-noise variance ``noise_var``) in the σ 1 − σ 3 band,
    beyond what the noise puts there."""
    structure = var - noise_var
    if structure <= 1e-6 * var:
        return 0.0
    a, b = (cv2.GaussianBlur(s, (k, k), sg, borderType=cv2.BORDER_REFLECT) for k, sg in zip(_BAND_KSIZE, _BAND_SIGMAS))
    return max(0.0, float((a - b).var()) - _BAND_NOISE_PASS * noise_var) / structure


def _gradient2(s: np.ndarray, sigma: float) -> np.ndarray:
    """Squared gradient magnitude of ``s`` after a Gaussian blur of ``sigma``."""
    b = cv2.GaussianBlur(s, (0, 0), sigma, borderType=cv2.BORDER_REFLECT)
    gx = cv2.Sobel(b, cv2.CV_32F, 1, 0, ksize=3)
    gy = cv2.Sobel(b, cv2.CV_32F, 0, 1, ksize=3)
    return gx * gx + gy * gy


def _edge_blur(s: np.ndarray) -> float:
    """Blur σ (pixels) of the strongest edges of ``s``: the median ratio of the gradient at the finer to the coarser
    of :data:`EDGE_SIGMAS` where the coarser is in its top :data:`EDGE_TOP`, solved for the σ of a blurred step."""
    fine, coarse = (_gradient2(s, sg) for sg in EDGE_SIGMAS)
    c = coarse.ravel()
    top = max(1, int(round(EDGE_TOP * c.size)))
    thr = float(np.partition(c, c.size - top)[c.size - top])
    sel = coarse >= max(thr, 1e-12)
    if not sel.any():
        return EDGE_MAX
    r2 = float(np.median(np.sqrt(fine[sel] / coarse[sel]))) ** 2
    a, b = EDGE_SIGMAS
    if r2 <= 1.0 + 1e-6:
        return EDGE_MAX
    return min(EDGE_MAX, math.sqrt(max(0.0, (b * b - r2 * a * a) / (r2 - 1.0))))


def _signal(s: np.ndarray, var: float) -> float:
    """Share of the variance that is not white noise (white noise of any distribution has a 3×3 Laplacian variance of
    36 times its own), measured after halving the resolution when the frame allows it (at least
    :data:`SIGNAL_HALVE_MIN` a side): white noise stays white, while a faint structure in heavy shot noise gains
    four times on it."""
    if min(s.shape) >= SIGNAL_HALVE_MIN:
        s = cv2.resize(s, (s.shape[1] // 2, s.shape[0] // 2), interpolation=cv2.INTER_AREA)
        var = float(s.var())
        if var <= 1e-12:
            return 0.0
    lap = cv2.filter2D(s, cv2.CV_32F, _LAPLACE, borderType=cv2.BORDER_REFLECT)[1:-1, 1:-1]
    return max(0.0, 1.0 - float(np.square(lap).mean()) / 36.0 / var)


def default_limits(intensity: str = "full_scale") -> dict[str, Any]:
    """Limits for a model without fitted ones (see :data:`DEFAULT_LIMITS`)."""
    limits = dict(DEFAULT_LIMITS)
    ranges = {"full_scale": DEFAULT_FULL_SCALE_RANGE, "bit_depth": DEFAULT_BIT_DEPTH_RANGE}.get(intensity, {})
    limits["range"] = {k: list(v) for k, v in ranges.items()}
    return limits


def fit_limits(stats: Iterable[Mapping[str, float]], intensity: str = "percentile",
               source: str = "<training images>") -> dict[str, Any]:
    """Fit the gate on the training split's :func:`frame_stats`: the metadata's ``quality`` object.

    Each one-sided limit is the default moved towards the training images where they need it (so no training
    image is refused), never further than that image's value allows: ``blank_spread`` = min(default, 0.25 ×
    the 0.1th percentile of spread), ``saturated_clipped`` = max(default, 99.9th percentile of clipped + 0.1),
    ``noise_signal`` and ``defocus_detail`` = min(default, half the 0.1th percentile; for the detail, among the
    images the detail rule applies to, signal >= :data:`DEFOCUS_MIN_SIGNAL`), ``defocus_band`` = min(default,
    :data:`BAND_FIT_SHARE` × the 0.1th percentile of band among the others), ``defocus_edge`` = max(default,
    :data:`EDGE_FIT_MARGIN` × the 99.9th percentile of edge among the images the edge rule applies to; training images
    are taken at the model input's scale). ``range`` holds, for
    the statistics :data:`RANGED` names for the model's intensity mode, the training images' 0.1–99.9 percentile
    range widened by :data:`RANGE_MARGIN` of its span on each side (for :data:`DIM_STATS`, no lower than half its
    0.1th percentile).
    """
    rows = [dict(s) for s in stats]
    if len(rows) < 20:
        raise ValueError(f"{source}: {len(rows)} images are too few to fit the frame-quality gate (need 20)")
    arr = {k: np.array([r[k] for r in rows], np.float64) for k in STATS}
    measured = {k: v[np.isfinite(v)] for k, v in arr.items()}  # band: only the noisy frames have one
    q = {k: {p: float(np.percentile(v, p)) for p in (0.1, 1, 50, 99, 99.9)} for k, v in measured.items() if v.size}
    limits: dict[str, Any] = {
        "blank_spread": min(DEFAULT_LIMITS["blank_spread"], 0.25 * q["spread"][0.1]),
        "saturated_clipped": min(0.95, max(DEFAULT_LIMITS["saturated_clipped"], q["clipped"][99.9] + 0.1)),
        "noise_signal": min(DEFAULT_LIMITS["noise_signal"], 0.5 * q["signal"][0.1]),
        "defocus_detail": min(DEFAULT_LIMITS["defocus_detail"], 0.5 * _smooth_detail_q(arr)),
        "defocus_band": min(DEFAULT_LIMITS["defocus_band"], BAND_FIT_SHARE * _noisy_band_q(arr)),
    }
    limits["defocus_edge"] = max(DEFAULT_LIMITS["defocus_edge"],
                                 EDGE_FIT_MARGIN * _edge_q(arr, limits["defocus_detail"]))
    ranged = RANGED[intensity]
    rng: dict[str, list[float]] = {}
    for k in ranged:
        lo, hi = q[k][0.1], q[k][99.9]
        m = RANGE_MARGIN * (hi - lo)
        low = max(0.0, lo - m)
        if k in DIM_STATS:
            low = max(low, 0.5 * lo)  # under half the dimmest/flattest training frame: far outside, whatever the span
        rng[k] = [low, min(1.0, hi + m)]
    limits["range"] = rng
    return {"version": QUALITY_VERSION, "analysis_side": ANALYSIS_SIDE, "n_images": len(rows), "limits": limits,
            "train_percentiles": {k: {str(p): round(v, 6) for p, v in qk.items()} for k, qk in q.items()}}


def _smooth_detail_q(arr: Mapping[str, np.ndarray], p: float = 0.1) -> float:
    """The ``p`` percentile of detail among frames with signal >= DEFOCUS_MIN_SIGNAL (all frames if under 20)."""
    sel = arr["signal"] >= DEFOCUS_MIN_SIGNAL
    d = arr["detail"][sel] if sel.sum() >= 20 else arr["detail"]
    return float(np.percentile(d, p))


def _edge_q(arr: Mapping[str, np.ndarray], detail_limit: float, p: float = 99.9) -> float:
    """The ``p`` percentile of edge among the frames the edge rule applies to (signal >= DEFOCUS_MIN_SIGNAL, detail
    under EDGE_DETAIL_MARGIN times ``detail_limit``); 0 if none."""
    sel = (arr["signal"] >= DEFOCUS_MIN_SIGNAL) & (arr["detail"] < EDGE_DETAIL_MARGIN * detail_limit) \
        & np.isfinite(arr["edge"])
    return float(np.percentile(arr["edge"][sel], p)) if sel.any() else 0.0


def _noisy_band_q(arr: Mapping[str, np.ndarray], p: float = 0.1) -> float:
    """The ``p`` percentile of band among frames with signal < DEFOCUS_MIN_SIGNAL (their minimum if under 20; the
    default limit's worth if none)."""
    b = arr["band"][arr["signal"] < DEFOCUS_MIN_SIGNAL]
    if b.size == 0:
        return math.inf
    return float(np.percentile(b, p)) if b.size >= 20 else float(b.min())


_WARNED: set[str] = set()


@dataclass(frozen=True)
class QualityGate:
    """``gate(grey) -> reason or ""`` with a model's limits. ``input_size`` (h, w) is the model input: a frame
    smaller than it is enlarged for the model, which the defocus limit takes into account."""

    limits: Mapping[str, Any]
    fitted: bool = True
    input_size: tuple[int, int] | None = None

    @classmethod
    def for_model(cls, meta: ModelMetadata, source: str = "<model>") -> QualityGate | None:
        """The gate of a model: its fitted limits, or the defaults and one warning per model file; ``None`` when
        the model's metadata turns the gate off (``quality: {"gate": "off"}``, for models whose inputs are
        legitimately flat, such as test models that classify by brightness)."""
        q = meta.quality
        if q and q.get("gate") == "off":
            return None
        if q and isinstance(q.get("limits"), Mapping):
            limits = default_limits(meta.intensity)
            limits.update(q["limits"])
            return cls(limits, fitted=True, input_size=tuple(meta.input_size))
        if source not in _WARNED:
            _WARNED.add(source)
            warnings.warn(f"{source}: the model has no frame-quality statistics (made before the gate); using the "
                          "default limits. Retrain with `python -m train` to fit them on its training images.",
                          RuntimeWarning, stacklevel=3)
        return cls(default_limits(meta.intensity), fitted=False, input_size=tuple(meta.input_size))

    def zoom(self, shape: tuple[int, ...]) -> float:
        """How many times a frame of ``shape`` is enlarged (linear, by area) to the model input; 1 when it is not."""
        if not self.input_size:
            return 1.0
        h, w = shape[:2]
        return max(1.0, math.sqrt(self.input_size[0] * self.input_size[1] / max(1, h * w)))

    def reason(self, stats: Mapping[str, float], zoom: float = 1.0) -> str:
        """The reason a frame with these statistics is refused, or ``""`` when it is usable. ``zoom``: how many
        times the frame the statistics were measured on is enlarged for the model (:meth:`zoom`)."""
        lim = self.limits
        if not stats["spread"] >= lim["blank_spread"]:
            return "blank"
        if stats["clipped"] > lim["saturated_clipped"]:
            return "saturated"
        if not stats["signal"] >= lim["noise_signal"]:
            return "noise"
        z = min(max(zoom, 1.0), ZOOM_CAP)
        if stats["signal"] >= DEFOCUS_MIN_SIGNAL:
            floor = lim["defocus_detail"] * z ** DEFOCUS_ZOOM_POWER
            if not stats["detail"] >= floor:
                return "defocus"
            # edge is in pixels of the measured frame, z times coarser than the model input's when enlarged
            if stats.get("edge", math.nan) * z > lim.get("defocus_edge", math.inf) \
                    and stats["detail"] < EDGE_DETAIL_MARGIN * floor:
                return "defocus"
        elif "band" in stats and not stats["band"] >= lim.get("defocus_band", 0.0) * z ** BAND_ZOOM_POWER:
            return "defocus"
        for k, (lo, hi) in (lim.get("range") or {}).items():
            if k in stats and not lo <= stats[k] <= hi:
                return "out_of_range"
        return ""

    def __call__(self, grey: np.ndarray, native: np.ndarray | None = None) -> str:
        zoom = self.zoom(grey.shape)
        edge_below = 0.0
        if "defocus_edge" in self.limits:  # the detail above which the edge rule cannot refuse (see reason)
            edge_below = EDGE_DETAIL_MARGIN * (self.limits["defocus_detail"]
                                               * min(max(zoom, 1.0), ZOOM_CAP) ** DEFOCUS_ZOOM_POWER)
        return self.reason(frame_stats(grey, native, edge_below), zoom)

    def judge(self, native: np.ndarray, resized: np.ndarray) -> str:
        """The verdict on a frame as it came (``native``) and as resized for the model (``resized``), measured
        where :func:`measured_view` says."""
        return self(*measured_view(native, resized))


def measured_view(native: np.ndarray, resized: np.ndarray) -> tuple[np.ndarray, np.ndarray | None]:
    """What the gate measures of a frame and of its copy resized to the model input, as ``(grey, native)`` for
    :func:`frame_stats`: a frame no larger than the input as it came, before enlarging smooths its noise; a larger
    one after shrinking (cheap), with clipping counted on the frame as it came."""
    if native.shape[0] <= resized.shape[0] and native.shape[1] <= resized.shape[1]:
        return native, None
    return resized, native
