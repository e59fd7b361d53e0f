"""``Classifier``: the object inspection-station code holds — image in, calibrated and possibly rejected label out.

>>> from runtime import Classifier
>>> clf = Classifier()                      # bundled model, ONNX Runtime (CUDA provider if present, else CPU)
>>> p = clf.predict("wafer_0412.png")       # or a numpy array: grey/BGR/BGRA, uint8/uint16/float in [0, 1]
>>> p.label, p.confidence, p.rejected, p.top_label

A bad input raises :class:`~runtime.errors.InputError` (a ``ValueError``) or ``OSError`` for an unreadable file;
the message names the input. ``predict_batch(..., on_error="keep")`` puts the exception in that item's slot instead,
so one bad image never costs the others. A frame with no usable content (blank, saturated, noise, defocused, out
of the training range) is not an error and not a class: it comes back as ``label="invalid"`` with a ``reason``
(:mod:`runtime.quality`), without running the network.

The hot path preprocesses straight into the backend's preallocated input buffer (pinned memory for TensorRT), runs
the backend, and post-processes the (N, classes) logits in numpy: no per-call allocations beyond the tiny results.
"""

from __future__ import annotations

import functools
import math
import os
import threading
import time
import warnings
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Any

import numpy as np

from runtime.artifacts import DEFAULT_INT8_MODEL, DEFAULT_MODEL  # the bundled models' names (public here too)
from runtime.backend import Backend, ClosingContext
from runtime.contract import INVALID_LABEL, REJECT_LABEL, ModelMetadata
from runtime.errors import BackendUnavailable, InputError
from runtime.preprocess import Preprocessor, decode_image, describe, load_grey, resize_grey
from runtime.quality import QualityGate
from runtime.scores import is_rejected, logit_score, softmax

BACKENDS = ("auto", "ort", "onnxruntime", "cpu", "cuda", "trt", "tensorrt")
_THRESHOLD_OFF = ("off", "none", "never")


@dataclass(slots=True, eq=False)
class Prediction:
    """One classified image.

    ``label``/``index`` are final (``"other"`` when rejected); ``top_label``/``top_index`` keep the network's own
    top class. ``confidence`` is the temperature-calibrated probability of the top class, ``probs`` all of them,
    ``score`` the rejection score (rejected when ``score < threshold``). ``timings`` are milliseconds per stage
    (``preprocess``, ``inference``, ``postprocess``, ``total``; in a batch, inference is the batch's time divided
    by its size).

    A frame the frame-quality gate refuses (:mod:`runtime.quality`) is not classified: ``label="invalid"``,
    ``index=-1``, ``rejected=True``, ``reason`` one of ``blank``, ``saturated``, ``noise``, ``defocus``,
    ``out_of_range``, ``top_label=""``, ``top_index=-1``, ``confidence=0.0``, ``score=nan``, ``probs`` zeros and
    ``logits`` NaN. ``reason`` is ``""`` for every classified frame.
    """

    label: str
    index: int
    top_label: str
    top_index: int
    confidence: float
    probs: np.ndarray
    logits: np.ndarray
    rejected: bool
    score: float
    timings: dict[str, float] = field(default_factory=dict)
    source: str = ""
    reason: str = ""

    @property
    def invalid(self) -> bool:
        """True for a frame the quality gate refused (``label == "invalid"``)."""
        return self.label == INVALID_LABEL

    def to_dict(self, probs: bool = False) -> dict[str, Any]:
        """JSON-ready summary (probabilities included on request)."""
        d: dict[str, Any] = {
            "source": self.source, "label": self.label, "index": self.index, "top_label": self.top_label,
            "top_index": self.top_index, "confidence": round(float(self.confidence), 6),
            "rejected": bool(self.rejected), "score": _finite_or_none(self.score), "reason": self.reason,
            "timings": {k: round(v, 3) for k, v in self.timings.items()},
        }
        if probs:
            d["probs"] = [round(float(v), 6) for v in self.probs]
        return d

    def __repr__(self) -> str:
        if self.reason:
            return f"Prediction(label={self.label!r}, reason={self.reason!r}, source={self.source!r})"
        extra = f", top_label={self.top_label!r}" if self.rejected else ""
        return (f"Prediction(label={self.label!r}, confidence={self.confidence:.3f}, rejected={self.rejected}, "
                f"score={self.score:.4g}{extra}, source={self.source!r})")


class PreparedFrame(np.ndarray):
    """What :meth:`Classifier.prepare` returns: the resized grey frame, carrying the quality gate's verdict
    (``reason``, ``""`` for a usable frame) measured before resizing could hide it (an enlarged noise frame looks
    smooth)."""

    reason: str

    def __array_finalize__(self, obj: Any) -> None:
        self.reason = getattr(obj, "reason", "")


def _finite_or_none(v: float) -> float | None:
    v = float(v)
    return round(v, 6) if math.isfinite(v) else None


# ------------------------------------------------------------------------------------------------ model lookup
def _bundled_dirs() -> list[Path]:
    """Where the bundled model may be: the installed ``runtime.models`` package, else ``<repo>/models``."""
    dirs: list[Path] = []
    try:
        dirs.append(Path(str(resources.files("runtime.models"))))
    except (ModuleNotFoundError, TypeError):
        pass
    # Running from a source checkout: the repository's models/ folder sits next to the runtime package.
    dirs.append(Path(__file__).resolve().parent.parent / "models")
    return list(dict.fromkeys(dirs))


def bundled_model_path(int8: bool = False) -> Path:
    """Path of the bundled default model; ``FileNotFoundError`` saying what to pass instead when it is absent."""
    name = DEFAULT_INT8_MODEL if int8 else DEFAULT_MODEL
    dirs = _bundled_dirs()
    for d in dirs:
        if (d / name).is_file():
            return d / name
    raise FileNotFoundError(
        2, f"no bundled model {name} (looked in {', '.join(map(str, dirs))}); pass a model explicitly: "
           "Classifier(model='path/to/model.onnx') or --model path/to/model.onnx (train and export one with "
           "`python -m train` and `python -m export`)", name)


def resolve_model(model: str | os.PathLike[str] | None) -> Path:
    if model is None:
        return bundled_model_path()
    path = Path(model).expanduser()
    if not path.is_file():
        if path.is_dir():
            raise IsADirectoryError(21, "model path is a folder; pass the .onnx or .engine file", str(path))
        raise FileNotFoundError(2, "model file not found", str(path))
    return path


def parse_threshold(value: float | str | None) -> float | None:
    """A number, or ``"off"``/``"none"`` (never reject). ``None`` is handled by the caller (= from metadata)."""
    if value is None:
        return None
    if isinstance(value, str):
        if value.strip().lower() in _THRESHOLD_OFF:
            return None
        try:
            value = float(value)
        except ValueError:
            raise ValueError(f"threshold must be a number or 'off', got {value!r}") from None
    value = float(value)
    if math.isnan(value):
        raise ValueError("threshold must be a number or 'off', got NaN")
    return None if value == -math.inf else value


def open_backend(path: Path, backend: str = "auto", *, providers: Any = None, threads: int | None = None,
                 cuda_graphs: bool = False, max_batch: int | None = None, spin: bool = True) -> Backend:
    """The :class:`~runtime.backend.Backend` for ``path``: TensorRT for engines, ONNX Runtime for ONNX files (see
    :class:`Classifier` for ``backend``); an engine where TensorRT cannot run falls back to its ONNX, with a warning."""
    from runtime import trt_backend

    key = (backend or "auto").lower()
    if key not in BACKENDS:
        raise ValueError(f"unknown backend {backend!r}; choose one of {', '.join(BACKENDS)}")
    engine = trt_backend.is_engine(path)
    if key in ("trt", "tensorrt"):
        if not engine:
            raise ValueError(f"{path}: the TensorRT backend runs engines (.engine/.plan); build one with "
                             f"`python -m export.build_engine --onnx {path}`, or use backend='ort'")
        return trt_backend.TrtBackend(path, cuda_graphs=cuda_graphs, max_batch=max_batch)
    if engine and key == "auto":
        if trt_backend.tensorrt_available():
            return trt_backend.TrtBackend(path, cuda_graphs=cuda_graphs, max_batch=max_batch)
        onnx = trt_backend.fallback_onnx(path)
        if onnx is None:
            reason = "TensorRT or a CUDA GPU is missing here"
            raise BackendUnavailable(f"{path}: a TensorRT engine needs TensorRT and a GPU, and {reason}; pass the "
                                     "ONNX model instead (--model model.onnx)")
        warnings.warn(f"{path}: TensorRT/CUDA not available here; running {onnx} with ONNX Runtime instead",
                      RuntimeWarning, stacklevel=3)
        path = onnx
    elif engine:
        raise ValueError(f"{path}: a TensorRT engine cannot run on ONNX Runtime; pass the .onnx model or "
                         "backend='trt'")
    from runtime.ort_backend import OrtBackend

    if key in ("cpu", "cuda"):
        providers = key
    return OrtBackend(path, providers=providers, threads=threads, spin=spin)


# ------------------------------------------------------------------------------------------------ the classifier
class ClassifierBase(ClosingContext):
    """What the local :class:`Classifier` and the Triton client (:class:`runtime.remote.RemoteClassifier`) share:
    the model's contract and threshold, reading an input into an image, the arguments of ``predict_batch``, the call
    and ``with`` forms. Each defines ``prepare``, ``predict``, ``predict_batch``, ``describe`` and ``close``."""

    meta: ModelMetadata
    labels: tuple[str, ...]
    threshold: float | None
    color_order: str

    def _set_model(self, meta: ModelMetadata, threshold: float | str | None) -> None:
        """Adopt ``meta``; ``threshold`` ``None`` is the model's own, else :func:`parse_threshold`."""
        self.meta = meta
        self.labels = meta.labels
        self.reject_index = meta.reject_index
        self.threshold = meta.threshold if threshold is None else parse_threshold(threshold)

    @property
    def input_shape(self) -> tuple[int, int, int]:
        """(C, H, W) the model takes."""
        return (self.meta.channels, *self.meta.input_size)

    def _reject_rule(self) -> str:
        return "off" if self.threshold is None else f"{self.meta.score} < {self.threshold:.4g}"

    @staticmethod
    def _check_color_order(color_order: str) -> str:
        if color_order not in ("bgr", "rgb"):
            raise ValueError(f"color_order must be 'bgr' or 'rgb', got {color_order!r}")
        return color_order

    @staticmethod
    def _input_name(x: Any) -> str:
        return describe(x) if not isinstance(x, (bytes, bytearray, memoryview)) else f"<{len(x)} bytes>"

    def _load_grey(self, x: Any, name: str) -> np.ndarray:
        """``x`` (path, encoded bytes or array) decoded and validated as a grey image; errors name ``name``."""
        if isinstance(x, (bytes, bytearray, memoryview)):
            return load_grey(decode_image(bytes(x), name), self.color_order)
        if isinstance(x, (str, os.PathLike, np.ndarray)):
            return load_grey(x, self.color_order)
        raise InputError(f"{name}: expected an image path, encoded image bytes or a numpy array, got "
                         f"{type(x).__name__}")

    @staticmethod
    def _batch_items(items: Iterable[Any], on_error: str, sources: Sequence[str] | None) -> list[Any]:
        """``predict_batch``'s arguments checked: the items as a list."""
        if on_error not in ("raise", "keep"):
            raise ValueError(f"on_error must be 'raise' or 'keep', got {on_error!r}")
        items = list(items)
        if sources is not None and len(sources) != len(items):
            raise ValueError(f"sources has {len(sources)} names for {len(items)} items")
        return items

    def __call__(self, x: Any) -> Prediction:
        return self.predict(x)  # type: ignore[attr-defined]


class Classifier(ClassifierBase):
    """Classify SEM images with a model and its metadata (labels, preprocessing, temperature, rejection rule).

    Args:
        model: ``None`` for the bundled default model, or a path to an ONNX file (FP32 or Q/DQ INT8) or a
            TensorRT engine (with its ``.engine.json`` sidecar).
        backend: ``"auto"`` (TensorRT for an engine when TensorRT and a GPU are present, else ONNX Runtime with
            its CUDA provider if available, else CPU), ``"ort"``, ``"cpu"``, ``"cuda"`` or ``"trt"``.
        threshold: ``None`` uses the model's calibrated threshold; a number overrides it; ``"off"`` never rejects.
            Rule: rejected when ``score < threshold``.
        batch_size: default chunk size for :meth:`predict_batch`.
        color_order: how 3/4-channel arrays are ordered, ``"bgr"`` (OpenCV, cameras) or ``"rgb"`` (PIL).
        threads: ONNX Runtime intra-op threads (default: physical cores).
        cuda_graphs: TensorRT only: replay a captured CUDA graph per batch size.
        warmup: run one dummy batch at load so the first real image is not slow.
        spin: let idle ONNX Runtime threads busy-wait between calls (lowest latency on a dedicated machine);
            ``False`` when other threads (a decode thread, other processes) need the cores.
        quality_gate: refuse frames with no usable content (blank, saturated, noise, defocused, out of the
            training range) as ``label="invalid"`` with a ``reason`` instead of classifying them
            (:mod:`runtime.quality`); ``False`` classifies every frame.
        self_check: run the artifact's golden references on this backend before the first frame
            (:mod:`runtime.check`): ``None`` for INT8 models and TensorRT engines, ``True`` always, ``False`` never.
            A FAIL raises :class:`~runtime.errors.SelfCheckError`; the report is ``self_check_report``.
    """

    def __new__(cls, model: Any = None, *args: Any, **kwargs: Any) -> Any:
        # "grpc://host:port/name": the same API answered by a Triton server (runtime.serve), see runtime.remote.
        if isinstance(model, str) and model.lower().startswith("grpc://"):
            from runtime.remote import RemoteClassifier

            return RemoteClassifier.from_classifier_args(model, *args, **kwargs)
        return super().__new__(cls)

    def __init__(self, model: str | os.PathLike[str] | None = None, backend: str = "auto",
                 threshold: float | str | None = None, *, batch_size: int = 8, color_order: str = "bgr",
                 providers: Any = None, threads: int | None = None, cuda_graphs: bool = False,
                 warmup: bool = True, spin: bool = True, self_check: bool | None = None,
                 quality_gate: bool = True) -> None:
        self._check_color_order(color_order)
        self.model_path = resolve_model(model)
        self.backend = open_backend(self.model_path, backend, providers=providers, threads=threads,
                                    cuda_graphs=cuda_graphs, spin=spin)
        self._set_model(self.backend.meta, threshold)
        self.batch_size = max(1, int(batch_size))
        self.color_order = color_order
        self._pre = Preprocessor(self.meta, color_order)
        self.quality_gate = QualityGate.for_model(self.meta, str(self.model_path)) if quality_gate else None
        self._lock = threading.RLock()
        self._rows = np.arange(1024)
        # On-target self-check (runtime.check) before the first frame: raises SelfCheckError on FAIL.
        from runtime.check import classifier_self_check

        try:
            self.self_check_report = classifier_self_check(self, self_check)
        except BaseException:
            self.backend.close()
            raise
        if warmup:
            self.infer(np.zeros((1, *self.input_shape), np.float32))

    # ---------------------------------------------------------------------------------------------------- info
    def describe(self) -> str:
        return (f"{self.model_path.name} ({self.meta.arch}, {self.meta.precision}, input "
                f"{self.meta.input_size[0]}x{self.meta.input_size[1]}, {len(self.labels)} classes, reject: "
                f"{self._reject_rule()}) on {self.backend.describe()}")

    def __repr__(self) -> str:
        return f"Classifier({self.describe()})"

    def close(self) -> None:
        self.backend.close()

    # ---------------------------------------------------------------------------------------------------- input
    def prepare(self, x: Any) -> PreparedFrame:
        """Decode, validate, convert to grey, resize to the model input and run the frame-quality gate: the part of
        preprocessing that can fail and that costs most. Thread-safe (no shared buffers), so pipelines call it in a
        decode thread and pass the result to :meth:`predict` (which then only normalises). The result is a
        :class:`PreparedFrame` whose ``reason`` is the gate's verdict. Raises ``InputError``/``OSError`` naming
        ``x``."""
        if isinstance(x, PreparedFrame):
            return x
        name = self._input_name(x)
        try:
            grey = self._load_grey(x, name)
            resized = resize_grey(grey, self.meta.input_size, self.meta.resize)
            out = np.asarray(resized).view(PreparedFrame)
            if self.quality_gate is not None:
                out.reason = self.quality_gate.judge(grey, resized)
            return out
        except (InputError, OSError):
            raise
        except MemoryError:
            raise InputError(f"{name}: image too large to process (out of memory)") from None
        except Exception as e:  # noqa: BLE001 - OpenCV/numpy errors on hostile input become InputError naming it
            raise InputError(f"{name}: cannot preprocess image: {type(e).__name__}: {e}") from e

    def _fill(self, x: Any, out: np.ndarray) -> str:
        """Preprocess ``x`` into ``out``; returns the quality gate's reason (and leaves ``out`` alone) for a frame
        it refuses, ``""`` otherwise."""
        grey = self.prepare(x)
        if grey.reason:
            return grey.reason
        try:
            self._pre.finish(np.asarray(grey), out)
        except Exception as e:  # noqa: BLE001
            raise InputError(f"{describe(x)}: cannot normalise image: {type(e).__name__}: {e}") from e
        return ""

    def _invalid(self, reason: str, timings: dict[str, float], source: str) -> Prediction:
        n = len(self.labels)
        return Prediction(label=INVALID_LABEL, index=-1, top_label="", top_index=-1, confidence=0.0,
                          probs=np.zeros(n, np.float32), logits=np.full(n, np.nan, np.float32), rejected=True,
                          score=math.nan, timings=timings, source=source, reason=reason)

    # ---------------------------------------------------------------------------------------------------- core
    def infer(self, batch: np.ndarray) -> dict[str, np.ndarray]:
        """Raw backend outputs ``{name: array}`` for a preprocessed ``(N, C, H, W)`` float32 batch."""
        batch = np.asarray(batch)
        if batch.ndim != 4 or tuple(batch.shape[1:]) != self.input_shape:
            raise InputError(f"batch: expected shape (N, {', '.join(map(str, self.input_shape))}), "
                             f"got {tuple(batch.shape)}")
        if batch.dtype != np.float32:
            batch = batch.astype(np.float32)
        if len(batch) == 0:
            raise InputError("batch: empty (N = 0)")
        with self._lock:
            return self.backend.infer(batch)

    def _decide(self, outs: dict[str, np.ndarray], n: int) -> tuple[np.ndarray, ...]:
        """(logits, probs, top, score, rejected) for the first ``n`` rows of the raw outputs."""
        meta = self.meta
        logits = np.asarray(outs[meta.output_name], np.float32).reshape(n, -1)
        probs = softmax(logits, meta.temperature)
        top = probs.argmax(axis=1)
        if meta.score_output:
            score = np.asarray(outs[meta.score_output], np.float32).reshape(n, -1)[:, 0]
        elif meta.score == "msp":
            score = probs[self._row_index(n), top]  # MSP is the calibrated top probability: no second softmax
        else:
            score = logit_score(meta.score, logits, meta.temperature)
        return logits, probs, top, score, is_rejected(score, self.threshold)

    def _row_index(self, n: int) -> np.ndarray:
        if n > len(self._rows):
            self._rows = np.arange(n)
        return self._rows[:n]

    def _prediction(self, i: int, logits: np.ndarray, probs: np.ndarray, top: np.ndarray, score: np.ndarray,
                    rejected: np.ndarray, timings: dict[str, float], source: str) -> Prediction:
        t = int(top[i])
        rej = bool(rejected[i])
        return Prediction(
            label=REJECT_LABEL if rej else self.labels[t], index=self.reject_index if rej else t,
            top_label=self.labels[t], top_index=t, confidence=float(probs[i, t]), probs=probs[i],
            logits=logits[i], rejected=rej, score=float(score[i]), timings=timings, source=source)

    def predict(self, x: Any, source: str | None = None) -> Prediction:
        """Classify one image: a path, encoded bytes, or an array (grey/BGR/BGRA; uint8, uint16 or float 0–1)."""
        t0 = time.perf_counter()
        with self._lock:
            buf = self.backend.input_buffer(1)
            reason = self._fill(x, buf[0])
            t1 = time.perf_counter()
            if reason:
                ms = (t1 - t0) * 1e3
                return self._invalid(reason, {"preprocess": ms, "inference": 0.0, "postprocess": 0.0, "total": ms},
                                     source if source is not None else describe(x))
            outs = self.backend.infer(buf)
        t2 = time.perf_counter()
        decided = self._decide(outs, 1)
        t3 = time.perf_counter()
        timings = {"preprocess": (t1 - t0) * 1e3, "inference": (t2 - t1) * 1e3, "postprocess": (t3 - t2) * 1e3,
                   "total": (t3 - t0) * 1e3}
        return self._prediction(0, *decided, timings, source if source is not None else describe(x))

    def predict_batch(self, items: Iterable[Any], batch_size: int | None = None, on_error: str = "raise",
                      sources: Sequence[str] | None = None) -> list[Prediction | Exception]:
        """Classify many images, ``batch_size`` at a time; results are in input order.

        ``on_error="raise"`` raises the first bad item's error; ``"keep"`` puts the exception in that item's slot
        (indices stay aligned) and classifies the rest. Frames the quality gate refuses get their ``invalid``
        prediction in their own slot and take no place in the network's batch.
        """
        items = self._batch_items(items, on_error, sources)
        size = max(1, int(batch_size or self.batch_size))
        max_b = self.backend.max_batch
        if max_b:
            size = min(size, max_b)
        results: list[Prediction | Exception] = [None] * len(items)  # type: ignore[list-item]
        for start in range(0, len(items), size):
            chunk = items[start:start + size]
            with self._lock:
                buf = self.backend.input_buffer(len(chunk))
                ok: list[int] = []
                pre_ms: list[float] = []
                for j, x in enumerate(chunk):
                    t0 = time.perf_counter()
                    try:
                        reason = self._fill(x, buf[len(ok)])
                    except (InputError, OSError) as e:
                        if on_error == "raise":
                            raise
                        results[start + j] = e
                        continue
                    if reason:
                        ms = (time.perf_counter() - t0) * 1e3
                        src = sources[start + j] if sources is not None else describe(x)
                        results[start + j] = self._invalid(
                            reason, {"preprocess": ms, "inference": 0.0, "postprocess": 0.0, "total": ms}, src)
                        continue
                    ok.append(j)
                    pre_ms.append((time.perf_counter() - t0) * 1e3)
                if not ok:
                    continue
                t1 = time.perf_counter()
                outs = self.backend.infer(buf[:len(ok)])
                t2 = time.perf_counter()
            n = len(ok)
            decided = self._decide(outs, n)
            t3 = time.perf_counter()
            infer_ms, post_ms = (t2 - t1) * 1e3 / n, (t3 - t2) * 1e3 / n
            for k, j in enumerate(ok):
                x = chunk[j]
                timings = {"preprocess": pre_ms[k], "inference": infer_ms, "postprocess": post_ms,
                           "total": pre_ms[k] + infer_ms + post_ms}
                src = sources[start + j] if sources is not None else describe(x)
                results[start + j] = self._prediction(k, *decided, timings, src)
        return results


# ------------------------------------------------------------------------------------------------ convenience
@functools.lru_cache(maxsize=4)
def _cached_classifier(model: str | None, backend: str) -> Classifier:
    return Classifier(model, backend)


def infer_image(path: str | os.PathLike[str] | np.ndarray, model: str | os.PathLike[str] | None = None,
                backend: str = "auto") -> Prediction:
    """One line: ``infer_image("x.png").label``. Keeps the classifier for the next call with the same model."""
    return _cached_classifier(None if model is None else str(model), backend).predict(path)
