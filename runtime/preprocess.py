"""The one preprocessing path, shared by training and every runtime backend (no train/serve skew).

Stages, each a public function so training can put augmentation between them:

1. :func:`read_image` — bytes from a file → decoded array (refuses decompression bombs before decoding).
2. :func:`to_grey` — any accepted array (grey/BGR/BGRA, uint8/uint16/float in [0, 1]) → validated 2-D grey.
3. :func:`resize_grey` — to the model's input size with the metadata's resize method.
4. :class:`Intensity` — the metadata's intensity mode: ``full_scale`` passes the grey on (the normaliser divides
   by the dtype's maximum), ``bit_depth`` scales uint16 data by its real bit depth (:func:`full_scale`), so 10- to
   14-bit data in uint16 reaches the network as 8-bit data does, ``percentile`` stretches the frame's robust
   range to 0–1 (:func:`stretch`), so any bit depth, dim and low-contrast frames reach the network on one scale.
5. :class:`Normalizer` — grey → float32 ``(C, H, W)`` with the model's mean/std, written into a caller's buffer.

The frame-quality gate (:mod:`runtime.quality`) looks at the resized grey between 3 and 4.

:class:`Preprocessor` chains them with preallocated buffers for the per-frame hot path.
"""

from __future__ import annotations

import os
import struct
from pathlib import Path
from typing import Union

import numpy as np

# OpenCV reads this once at import; a bound on decoded pixels is the last line against decompression bombs.
os.environ.setdefault("OPENCV_IO_MAX_IMAGE_PIXELS", str(1 << 28))
import cv2  # noqa: E402

from runtime.contract import ModelMetadata  # noqa: E402
from runtime.errors import InputError  # noqa: E402

ImageLike = Union[str, os.PathLike, np.ndarray]

#: 100 megapixels: a 10k × 10k SEM stitch passes, a decompression bomb does not.
MAX_PIXELS = 100_000_000
MAX_FILE_BYTES = 1 << 30
MIN_SIDE = 4
MAX_ASPECT = 64.0
_ACCEPTED_DTYPES = "uint8, uint16, float32 or float64 (floats scaled to [0, 1])"


def describe(x: object) -> str:
    """A short name for an input in error messages: the path, or the array's shape and dtype."""
    if isinstance(x, np.ndarray):
        return f"array{tuple(x.shape)} {x.dtype}"
    if isinstance(x, (str, os.PathLike)):
        return str(x)
    return f"<{type(x).__name__}>"


def _png_size(head: bytes) -> tuple[int, int] | None:
    if head[:8] == b"\x89PNG\r\n\x1a\n" and len(head) >= 24 and head[12:16] == b"IHDR":
        w, h = struct.unpack(">II", head[16:24])
        return h, w
    return None


def _check_size(h: int, w: int, name: str) -> None:
    if h <= 0 or w <= 0:
        raise InputError(f"{name}: image is empty ({h}×{w} pixels)")
    if h < MIN_SIDE or w < MIN_SIDE:
        raise InputError(f"{name}: image is {h}×{w} pixels; at least {MIN_SIDE}×{MIN_SIDE} is needed")
    if h * w > MAX_PIXELS:
        raise InputError(f"{name}: image claims {h}×{w} = {h * w / 1e6:.0f} MP, over the {MAX_PIXELS / 1e6:.0f} MP "
                         "limit (decompression bomb or wrong file?)")
    if max(h, w) / min(h, w) > MAX_ASPECT:
        raise InputError(f"{name}: image is {h}×{w} pixels, an aspect ratio over {MAX_ASPECT:.0f}:1")


def decode_image(data: bytes, name: str = "<bytes>") -> np.ndarray:
    """Decode encoded image bytes (PNG, JPEG, TIFF incl. 16-bit, BMP, ...) keeping depth and channels."""
    if not data:
        raise InputError(f"{name}: file is empty (0 bytes)")
    size = _png_size(data[:24])
    if size is not None:
        _check_size(*size, name)
    img = cv2.imdecode(np.frombuffer(data, np.uint8), cv2.IMREAD_UNCHANGED)
    if img is None:
        raise InputError(f"{name}: cannot decode image ({len(data)} bytes; corrupt, truncated or not an image)")
    return img


def read_image_bytes(path: str | os.PathLike[str]) -> bytes:
    """An image file's bytes, size-checked before reading. Missing/unreadable files raise ``OSError`` naming them."""
    p = Path(path)
    try:
        n = p.stat().st_size
    except OSError as e:
        raise type(e)(e.errno, f"cannot read image: {e.strerror}", str(p)) from None
    if p.is_dir():
        raise IsADirectoryError(21, "cannot read image: is a directory", str(p))
    if n > MAX_FILE_BYTES:
        raise InputError(f"{p}: file is {n / 2**20:.0f} MiB, over the {MAX_FILE_BYTES / 2**20:.0f} MiB limit")
    try:
        return p.read_bytes()
    except OSError as e:
        raise type(e)(e.errno, f"cannot read image: {e.strerror}", str(p)) from None


def read_image(path: str | os.PathLike[str]) -> np.ndarray:
    """Read and decode an image file. Missing/unreadable files raise ``OSError``; bad content ``InputError``."""
    return decode_image(read_image_bytes(path), str(path))


def to_grey(img: np.ndarray, name: str | None = None, color_order: str = "bgr") -> np.ndarray:
    """Validate an image array and return it as 2-D grey, keeping uint8/uint16 and turning floats to float32.

    Accepted: ``(H, W)``, ``(H, W, 1)``, ``(H, W, 2)`` (grey + alpha), ``(H, W, 3)`` colour, ``(H, W, 4)`` colour
    + alpha, in uint8, uint16 or float (0–1). Colour goes to grey by BT.601 luma; ``color_order`` says whether
    three-channel arrays are BGR (OpenCV, cameras) or RGB (PIL, matplotlib). Alpha is dropped.
    """
    name = name or describe(img)
    if not isinstance(img, np.ndarray):
        raise InputError(f"{name}: expected an image path or a numpy array, got {type(img).__name__}")
    if img.dtype == np.bool_ or img.dtype.kind not in "uf" or (img.dtype.kind == "u" and img.itemsize > 2):
        raise InputError(f"{name}: unsupported pixel type {img.dtype}; use {_ACCEPTED_DTYPES}")
    if img.ndim == 3 and img.shape[2] in (1, 2):
        img = img[:, :, 0]
    if img.ndim not in (2, 3) or (img.ndim == 3 and img.shape[2] not in (3, 4)):
        raise InputError(f"{name}: expected a grey (H, W) or colour (H, W, 3|4) image, got shape {tuple(img.shape)}")
    _check_size(img.shape[0], img.shape[1], name)
    if img.dtype.kind == "f":
        if img.dtype != np.float32:
            img = img.astype(np.float32)
        finite = np.isfinite(img)
        if not finite.all():
            bad = int(img.size - np.count_nonzero(finite))
            raise InputError(f"{name}: {bad} of {img.size} values are NaN or infinite")
        lo, hi = float(img.min()), float(img.max())
        if lo < -1e-3 or hi > 1 + 1e-3:
            raise InputError(f"{name}: float images must be scaled to [0, 1], got values in [{lo:.4g}, {hi:.4g}]")
    if img.ndim == 3:
        if img.shape[2] == 4:
            code = cv2.COLOR_BGRA2GRAY if color_order == "bgr" else cv2.COLOR_RGBA2GRAY
        else:
            code = cv2.COLOR_BGR2GRAY if color_order == "bgr" else cv2.COLOR_RGB2GRAY
        img = cv2.cvtColor(np.ascontiguousarray(img), code)
    return img


def load_grey(x: ImageLike, color_order: str = "bgr") -> np.ndarray:
    """A path or an array → validated 2-D grey (uint8, uint16 or float32)."""
    if isinstance(x, (str, os.PathLike)):
        return to_grey(read_image(x), str(x))
    return to_grey(x, describe(x), color_order)


def resize_grey(grey: np.ndarray, size: tuple[int, int], method: str = "area") -> np.ndarray:
    """Resize to ``size`` = (height, width). ``area`` averages when shrinking and interpolates when enlarging."""
    h, w = size
    if grey.shape[:2] == (h, w):
        return grey
    if method == "area":
        shrinking = grey.shape[0] >= h and grey.shape[1] >= w
        if shrinking:
            return _area_shrink(grey, h, w)
        interp = cv2.INTER_LINEAR
    elif method == "linear":
        interp = cv2.INTER_LINEAR
    elif method == "nearest":
        interp = cv2.INTER_NEAREST
    else:
        raise ValueError(f"unknown resize method {method!r}")
    return cv2.resize(grey, (w, h), interpolation=interp)


def _area_shrink(grey: np.ndarray, h: int, w: int) -> np.ndarray:
    """Area averaging in two steps: an integer-factor block average (OpenCV's fast path), then the small rest.

    A single non-integer INTER_AREA is several times slower than the two steps, and it sits on the per-frame
    path; the result is still an area average. Rows/columns that do not fill a block (fewer than
    the factor) are cropped evenly from both sides.
    """
    H, W = grey.shape[:2]
    k = min(H // h, W // w)
    if k >= 2:
        H2, W2 = H - H % k, W - W % k
        if (H2, W2) != (H, W):
            y0, x0 = (H % k) // 2, (W % k) // 2
            grey = grey[y0:y0 + H2, x0:x0 + W2]
        grey = cv2.resize(grey, (W2 // k, H2 // k), interpolation=cv2.INTER_AREA)
        if grey.shape[:2] == (h, w):
            return grey
    return cv2.resize(grey, (w, h), interpolation=cv2.INTER_AREA)


def percentiles(x: np.ndarray, q: tuple[float, ...]) -> list[float]:
    """``np.percentile(x, q)`` (linear method), several times faster on frame-sized arrays: a histogram for uint8,
    a partial sort otherwise."""
    flat = x.reshape(-1)
    n = flat.size
    ranks = [p / 100.0 * (n - 1) for p in q]
    lo_hi = [(int(np.floor(r)), min(int(np.floor(r)) + 1, n - 1)) for r in ranks]
    if x.dtype == np.uint8:
        cum = np.cumsum(np.bincount(flat, minlength=256))
        at = {k: float(np.searchsorted(cum, k, side="right")) for pair in lo_hi for k in pair}
    else:
        ks = sorted({k for pair in lo_hi for k in pair})
        part = np.partition(flat, ks)
        at = {k: float(part[k]) for k in ks}
    return [at[a] + (r - a) * (at[b] - at[a]) for r, (a, b) in zip(ranks, lo_hi)]


def stretch(grey: np.ndarray, percentiles: tuple[float, float] = (0.5, 99.5),
            out: np.ndarray | None = None) -> np.ndarray:
    """Robust per-frame stretch: the ``percentiles`` (low, high) of ``grey`` map to 0 and 1, clipped; float32.

    Bit depth, gain and offset drop out (a 12-bit frame in uint16, a frame at a tenth of the brightness and the
    original give the same result up to quantisation). A frame with no spread at all maps to 0.
    """
    lo, hi = _percentiles(grey, percentiles)
    g = grey if grey.dtype == np.float32 else grey.astype(np.float32)
    span = float(hi - lo)
    if out is None:
        out = np.empty(g.shape, np.float32)
    np.subtract(g, np.float32(lo), out=out)
    if span > 0:
        out *= np.float32(1.0 / span)
    np.clip(out, 0.0, 1.0, out=out)
    return out


_percentiles = percentiles


def full_scale(grey: np.ndarray) -> float:
    """The frame's full-scale value: 255 (uint8), 1.0 (float), or 2**b - 1 for the smallest b in 8, 10, 12, 14, 16
    that holds a uint16 frame's maximum (10- to 14-bit data is stored in uint16 with the high bits zero)."""
    if grey.dtype == np.uint8:
        return 255.0
    if grey.dtype == np.uint16:
        m = int(grey.max())
        for b in (8, 10, 12, 14):
            if m < (1 << b):
                return float((1 << b) - 1)
        return 65535.0
    return 1.0


class Intensity:
    """The metadata's intensity mode as one call: grey → what :class:`Normalizer` takes.

    ``full_scale`` returns the grey unchanged (uint8/uint16 are scaled by 255/65535 in the normaliser, as for every
    model made before the mode existed); ``bit_depth`` returns uint16 frames as float32 divided by their
    :func:`full_scale` (everything else unchanged); ``percentile`` returns :func:`stretch` of it.
    """

    def __init__(self, mode: str = "full_scale", percentiles: tuple[float, float] = (0.5, 99.5)) -> None:
        if mode not in ("full_scale", "bit_depth", "percentile"):
            raise ValueError(f"unknown intensity mode {mode!r}")
        self.mode = mode
        self.percentiles = (float(percentiles[0]), float(percentiles[1]))

    @classmethod
    def of(cls, meta: ModelMetadata) -> Intensity:
        return cls(meta.intensity, meta.intensity_percentiles)

    def __call__(self, grey: np.ndarray) -> np.ndarray:
        if self.mode == "full_scale":
            return grey
        if self.mode == "bit_depth":
            if grey.dtype != np.uint16:
                return grey
            return grey.astype(np.float32) * np.float32(1.0 / full_scale(grey))
        return stretch(grey, self.percentiles)


class Normalizer:
    """Grey → normalised float32 ``(C, H, W)``: ``(v / full_scale - mean[c]) / std[c]`` for each channel ``c``.

    Integer images go through lookup tables built once, which is the fastest exact path in numpy.
    """

    def __init__(self, mean: tuple[float, ...], std: tuple[float, ...]) -> None:
        self.mean = np.asarray(mean, np.float32)
        self.std = np.asarray(std, np.float32)
        self._luts: dict[np.dtype, np.ndarray] = {}

    def _lut(self, dtype: np.dtype) -> np.ndarray:
        lut = self._luts.get(dtype)
        if lut is None:
            levels = np.arange(np.iinfo(dtype).max + 1, dtype=np.float32) / np.float32(np.iinfo(dtype).max)
            lut = ((levels[None, :] - self.mean[:, None]) / self.std[:, None]).astype(np.float32)
            self._luts[dtype] = lut
        return lut

    def __call__(self, grey: np.ndarray, out: np.ndarray | None = None) -> np.ndarray:
        c = len(self.mean)
        if out is None:
            out = np.empty((c, *grey.shape[:2]), np.float32)
        if grey.dtype.kind == "u":
            lut = self._lut(grey.dtype)
            for i in range(c):
                np.take(lut[i], grey, out=out[i])
        else:
            for i in range(c):
                np.subtract(grey, self.mean[i], out=out[i])
                out[i] /= self.std[i]
        return out


class Preprocessor:
    """Path or array → model input ``(C, H, W)`` float32, exactly as the model's metadata says."""

    def __init__(self, meta: ModelMetadata, color_order: str = "bgr") -> None:
        self.meta = meta
        self.color_order = color_order
        self.size = meta.input_size
        self.intensity = Intensity.of(meta)
        self.normalize = Normalizer(meta.mean, meta.std)

    def grey(self, x: ImageLike) -> np.ndarray:
        """Decode/validate/convert and resize; the part that can fail on bad input."""
        return resize_grey(load_grey(x, self.color_order), self.size, self.meta.resize)

    def finish(self, grey: np.ndarray, out: np.ndarray | None = None) -> np.ndarray:
        """Resized grey → model input: intensity mode, then normalisation."""
        return self.normalize(self.intensity(grey), out)

    def __call__(self, x: ImageLike, out: np.ndarray | None = None) -> np.ndarray:
        return self.finish(self.grey(x), out)


def preprocess(x: ImageLike, meta: ModelMetadata, color_order: str = "bgr") -> np.ndarray:
    """One-off convenience: a path or array → ``(C, H, W)`` float32 model input."""
    return Preprocessor(meta, color_order)(x)
