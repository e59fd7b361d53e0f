"""Latency benchmark: per-stage and end-to-end timing of every backend × precision × batch this machine can run.

``python -m benchmarks.latency`` measures, in one process and interleaved over several rounds (see
:mod:`benchmarks.timing`):

* ``torch eager`` — the PyTorch model at its best settings (channels_last, inference_mode), the baseline every row
  is compared with. Weights come from ``--checkpoint``; without one it is a randomly initialised network of the same
  architecture, which is fine for latency (the table says so).
* ``onnxruntime bare`` — ``session.run`` on a ready input tensor: the floor for the ONNX Runtime path.
* ``onnxruntime`` / ``tensorrt`` — the deployed path, ``runtime.Classifier`` from a camera-sized grey frame to a
  prediction (preprocess, inference, postprocess/rejection; decode too with ``--source png``; host↔device copies on
  GPU), per stage and end to end.

Precisions map to artifacts next to the model by the artifact table (:mod:`runtime.artifacts`): fp32 = ``X.onnx``,
int8 = ``X.int8.onnx`` (else ``X.int8.cpu.onnx``, ``X.int8.qdq.onnx``), fp16 = ``X.fp16.onnx``; TensorRT:
``X.engine``/``X.fp16.engine``/``X.int8.engine``. Configurations that cannot run here are listed
as skipped with the reason. Output: a Markdown table on stdout, and ``latency.json`` + ``latency.md`` under ``--out``.
``--pipeline`` also measures the ``runtime.run`` loop on a generated video and ``Classifier.predict`` on one frame
against bare ``session.run``.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from benchmarks import envinfo
from benchmarks.compute_floor import count_macs, floor_ms, measure_gemm_gflops
from benchmarks.timing import STAGES, TOTAL, Samples, Stopwatch, paired_ratio, run_interleaved, spread, summarize
from runtime import artifacts
from runtime.artifacts import DEFAULT_MODEL as BUNDLED_NAME
from runtime.artifacts import read_onnx_metadata
from runtime.classifier import bundled_model_path
from runtime.contract import ModelMetadata
from runtime.files import atomic_write_text
from sem_extras import cli

SCHEMA = "sem-bench-latency/1"
REPO = Path(__file__).resolve().parent.parent
BACKENDS = ("onnxruntime", "tensorrt", "torch")
PRECISIONS = ("fp32", "fp16", "int8")
#: Per-round medians that disagree by more than this (relative) make a row "noisy": do not conclude from it.
DEFAULT_MAX_SPREAD = 0.25


# ------------------------------------------------------------------------------------------------ artifacts
def artifact_candidates(model: Path, precision: str, backend: str = "onnxruntime") -> list[Path]:
    """Files that hold ``precision`` of ``model`` for ``backend``, in order of preference: the rows of the artifact
    table (:func:`runtime.artifacts.candidates`). ``model`` may itself be a precision variant."""
    return artifacts.candidates(model, precision, backend)


def artifact_for(model: Path, precision: str, backend: str = "onnxruntime") -> Path:
    """The first existing candidate (see :func:`artifact_candidates`), else the preferred name (for messages)."""
    cands = artifact_candidates(model, precision, backend)
    return next((c for c in cands if c.is_file()), cands[0])


def cpu_artifacts(model: Path, precisions: Sequence[str]) -> list[tuple[str, Path]]:
    """(precision, ONNX file) pairs the CPU pipeline measurements can run: existing files, FP16 left out (ONNX
    Runtime's CPU provider has no FP16 kernels worth timing)."""
    pairs = [(p, artifact_for(model, p)) for p in precisions if p != "fp16"]
    return [(p, art) for p, art in pairs if art.is_file()]


# ------------------------------------------------------------------------------------------------ inputs
def make_frames(n: int, size: int, seed: int = 0) -> list[np.ndarray]:
    """``n`` distinct SEM-like grey uint8 frames (line pattern, blur, shot noise), ``size`` × ``size``.

    Content barely matters for inference latency, but it does for PNG decode (noise compresses poorly, like SEM).
    """
    import cv2

    rng = np.random.default_rng(seed)
    frames = []
    for _ in range(n):
        pitch = rng.uniform(24, 64)
        x = np.arange(size, dtype=np.float32)
        lines = ((x / pitch + rng.uniform()) % 1.0 < 0.5).astype(np.float32)
        img = np.tile(lines, (size, 1)) * 0.45 + 0.25
        img = cv2.GaussianBlur(img, (0, 0), 1.5)
        img = rng.poisson(img * 60).astype(np.float32) / 60
        frames.append(np.clip(img * 255, 0, 255).astype(np.uint8))
    return frames


def encode_png(frames: Sequence[np.ndarray]) -> list[bytes]:
    import cv2

    out = []
    for f in frames:
        ok, buf = cv2.imencode(".png", f)
        if not ok:
            raise RuntimeError("cv2.imencode failed")
        out.append(buf.tobytes())
    return out


# ------------------------------------------------------------------------------------------------ configurations
@dataclass
class Config:
    """One measured configuration (a row of the table)."""

    backend: str  # onnxruntime | tensorrt | torch
    mode: str  # "pipeline": frame → prediction; "bare": one inference call on a ready tensor
    precision: str
    batch: int
    artifact: str | None = None
    device: str = "cpu"
    skip_reason: str | None = None
    notes: list[str] = field(default_factory=list)

    @property
    def label(self) -> str:
        if self.backend == "torch":
            return "torch eager" + (" (bare)" if self.mode == "bare" else "")
        return self.backend + (" bare" if self.mode == "bare" else "")

    @property
    def key(self) -> str:
        return f"{self.backend}/{self.mode}/{self.precision}/b{self.batch}"


class Inputs:
    """The frames a pipeline runner consumes: raw grey arrays (camera) or PNG bytes (files, decode stage)."""

    def __init__(self, frames: list[np.ndarray], source: str) -> None:
        self.frames = frames
        self.source = source
        self.png = encode_png(frames) if source == "png" else None

    def batch(self, n: int, sw: Stopwatch) -> list[np.ndarray]:
        items = [self.frames[i % len(self.frames)] for i in range(n)]
        if self.png is None:
            return items
        from runtime.preprocess import decode_image

        with sw("decode"):
            return [decode_image(self.png[i % len(self.png)], f"frame{i}.png") for i in range(n)]


def _postprocess(meta: ModelMetadata, outputs: dict[str, np.ndarray]) -> Any:
    """The rejection rule (:func:`runtime.scores.is_rejected`) on torch's logits, so the torch baseline pays the
    same postprocessing as the deployed path (runtime.Classifier keeps its own version private)."""
    from runtime.scores import is_rejected, logit_score, softmax

    logits = outputs[meta.output_name]
    probs = softmax(logits, meta.temperature)
    score = outputs[meta.score_output].reshape(-1) if meta.score_output else logit_score(meta.score, logits,
                                                                                         meta.temperature)
    top = probs.argmax(axis=1)
    rejected = is_rejected(score, meta.threshold)
    return np.where(rejected, meta.reject_index, top), probs, score


class TorchRunner:
    """PyTorch eager, channels_last + inference_mode; on CUDA, stages are timed with CUDA events."""

    def __init__(self, cfg: Config, meta: ModelMetadata, inputs: Inputs | None, checkpoint: str | None,
                 threads: int) -> None:
        import torch

        from runtime.preprocess import Preprocessor

        self.torch = torch
        self.cfg, self.meta, self.inputs = cfg, meta, inputs
        torch.set_num_threads(threads)
        # Best settings: denormals flushed to zero (random-init nets produce many; on x86 each costs ~100 cycles).
        torch.set_flush_denormal(True)
        if checkpoint:
            from train.checkpoint import model_from_checkpoint

            model, self.meta = model_from_checkpoint(checkpoint)
        else:
            model = _random_model(meta)
        self.device = torch.device(cfg.device)
        dtype = torch.float16 if cfg.precision == "fp16" else torch.float32
        self.dtype = dtype
        self.model = model.eval().to(self.device, dtype=dtype, memory_format=torch.channels_last)
        self.pre = Preprocessor(self.meta)
        c, (h, w) = self.meta.channels, self.meta.input_size
        self.host = np.empty((cfg.batch, c, h, w), np.float32)
        if self.device.type == "cuda":
            self.host_t = torch.from_numpy(self.host).pin_memory()
            self.host = self.host_t.numpy()
            self.events = [torch.cuda.Event(enable_timing=True) for _ in range(4)]
        if cfg.mode == "bare":
            self.host[:] = np.random.default_rng(0).standard_normal(self.host.shape, dtype=np.float32)
            self.ready = torch.from_numpy(self.host).to(self.device, dtype=dtype).contiguous(
                memory_format=torch.channels_last)

    def step(self) -> dict[str, float]:
        torch = self.torch
        sw = Stopwatch()
        with torch.inference_mode():
            if self.cfg.mode == "bare":
                with sw("inference"):
                    out = self.model(self.ready)
                    if self.device.type == "cuda":
                        torch.cuda.synchronize()
                return sw.result()
            assert self.inputs is not None
            frames = self.inputs.batch(self.cfg.batch, sw)
            with sw("preprocess"):
                for i, f in enumerate(frames):
                    self.pre(f, out=self.host[i])
            if self.device.type == "cuda":
                # Host-side wall time would measure launch, not the work; CUDA events time the device.
                e0, e1, e2, e3 = self.events
                e0.record()
                x = self.host_t.to(self.device, dtype=self.dtype, non_blocking=True).contiguous(
                    memory_format=torch.channels_last)
                e1.record()
                y = self.model(x).float()
                e2.record()
                logits = y.to("cpu", non_blocking=False)
                e3.record()
                e3.synchronize()
                sw.times["h2d"] = e0.elapsed_time(e1)
                sw.times["inference"] = e1.elapsed_time(e2)
                sw.times["d2h"] = e2.elapsed_time(e3)
                out = logits.numpy()
            else:
                with sw("inference"):
                    x = torch.from_numpy(self.host).contiguous(memory_format=torch.channels_last)
                    out = self.model(x).numpy()
            with sw("postprocess"):
                _postprocess(self.meta, {self.meta.output_name: np.asarray(out, np.float32)})
        return sw.result()


def _random_model(meta: ModelMetadata) -> Any:
    """A randomly initialised network of the model's architecture (latency does not depend on the weights)."""
    try:
        from train.models import build_model

        return build_model(meta.arch, num_classes=meta.num_classes, weights="none")
    except ImportError:
        import torchvision

        if meta.arch != "efficientnet_b0":
            raise
        return torchvision.models.efficientnet_b0(num_classes=meta.num_classes)


class OrtBareRunner:
    """``session.run`` on a ready tensor, with the deployed session options (the ONNX Runtime floor)."""

    def __init__(self, cfg: Config, threads: int) -> None:
        from runtime.ort_backend import OrtBackend

        self.backend = OrtBackend(cfg.artifact, providers=None, threads=threads)
        self.session = self.backend.session
        c, (h, w) = self.backend.meta.channels, self.backend.meta.input_size
        self.feed = {self.backend.input_name: np.random.default_rng(0).standard_normal(
            (cfg.batch, c, h, w), dtype=np.float32).astype(self.backend.input_dtype)}

    def step(self) -> dict[str, float]:
        sw = Stopwatch()
        with sw("inference"):
            self.session.run(None, self.feed)
        return sw.result()


class ClassifierRunner:
    """The deployed path: ``runtime.Classifier.predict_batch`` from grey frames (or PNG bytes) to predictions.

    Stage times are the Classifier's own (``Prediction.timings``: per-image preprocess, and the batch's inference
    and postprocess shared out per image), summed back to per-batch; "total" is the wall time around the call.
    """

    def __init__(self, cfg: Config, inputs: Inputs, threads: int) -> None:
        from runtime import Classifier

        self.cfg, self.inputs = cfg, inputs
        backend = "tensorrt" if cfg.backend == "tensorrt" else "ort"  # ort: CUDA provider if present, else CPU
        self.clf = Classifier(cfg.artifact, backend=backend, threads=threads, batch_size=cfg.batch)
        self.backend = self.clf.backend
        if cfg.backend == "onnxruntime":
            cfg.device = "cuda" if self.backend.providers[0].startswith("CUDA") else "cpu"
        cfg.notes.append(self.clf.describe())

    def step(self) -> dict[str, float]:
        sw = Stopwatch()
        frames = self.inputs.batch(self.cfg.batch, sw)
        t0 = time.perf_counter()
        preds = self.clf.predict_batch(frames, batch_size=self.cfg.batch)
        wall = (time.perf_counter() - t0) * 1e3
        stages = batch_stage_times(preds)
        stages.update(sw.times)
        stages[TOTAL] = wall + sw.times.get("decode", 0.0)
        return stages


def batch_stage_times(preds: Sequence[Any]) -> dict[str, float]:
    """Per-batch stage times from ``predict_batch`` results, whose ``timings`` are per image (see Prediction)."""
    out: dict[str, float] = {}
    for p in preds:
        if isinstance(p, Exception):
            raise p
        for k, v in p.timings.items():
            if k in STAGES:
                out[k] = out.get(k, 0.0) + float(v)
    return out


class TrtBareRunner:
    """A ready tensor in the engine's pinned input buffer: host→device copy, ``execute_async_v3`` and
    device→host copies, each timed with CUDA events on the backend's stream (the TensorRT floor), through
    :meth:`TrtBackend.timed_run`, so the measurement is of the deployed engine setup. NOT RUN on the development
    machine (no GPU).
    """

    def __init__(self, cfg: Config, threads: int) -> None:
        from runtime.trt_backend import TrtBackend

        self.cfg = cfg
        self.be = TrtBackend(cfg.artifact, max_batch=None)
        if cfg.batch > self.be.max_batch:
            raise SkipConfig(f"batch {cfg.batch} exceeds the engine's profile maximum {self.be.max_batch}")
        if cfg.batch < self.be.min_batch:
            raise SkipConfig(f"batch {cfg.batch} is below the engine's profile minimum {self.be.min_batch}")
        buf = self.be.input_buffer(cfg.batch)
        buf[:] = np.random.default_rng(0).standard_normal(buf.shape, dtype=np.float32)
        cfg.notes.append(self.be.describe())

    def step(self) -> dict[str, float]:
        sw = Stopwatch()
        gpu = self.be.timed_run(self.cfg.batch)
        out = sw.result()
        out.update(gpu)
        return out


class SkipConfig(Exception):
    """This configuration cannot run on this machine; the message says why."""


# ------------------------------------------------------------------------------------------------ planning
def _torch_device() -> tuple[str | None, str | None]:
    """("cuda"|"cpu", None) or (None, reason torch is unusable)."""
    try:
        import torch
    except ImportError:
        return None, "torch not installed (pip install '.[train]')"
    return ("cuda" if torch.cuda.is_available() else "cpu"), None


def _tensorrt_reason() -> str | None:
    """Why TensorRT cannot run here, or None when it can."""
    try:
        import tensorrt  # noqa: F401
    except ImportError:
        return "TensorRT not installed (pip install '.[tensorrt]' on a machine with an NVIDIA GPU)"
    try:
        from runtime.cuda_buffers import cuda_available
    except ImportError:
        return None
    return None if cuda_available() else "no CUDA GPU (TensorRT needs one)"


def plan(model: Path, backends: Sequence[str], precisions: Sequence[str], batches: Sequence[int]) -> list[Config]:
    """Every requested configuration, each either runnable or carrying the reason it is skipped."""
    configs: list[Config] = []
    torch_device, torch_reason = _torch_device() if "torch" in backends else (None, None)
    trt_reason = _tensorrt_reason() if "tensorrt" in backends else None
    for b in batches:
        if "torch" in backends:
            for p in precisions:
                cfg = Config("torch", "pipeline", p, b, device=torch_device or "cpu")
                if torch_reason:
                    cfg.skip_reason = torch_reason
                elif p == "int8":
                    cfg.skip_reason = "torch eager has no deployable INT8 path; INT8 is measured on the ONNX/engine"
                elif p == "fp16" and torch_device != "cuda":
                    cfg.skip_reason = "FP16 eager on CPU is not a deployment path (no CUDA GPU here)"
                configs.append(cfg)
        if "onnxruntime" in backends:
            for p in precisions:
                art = artifact_for(model, p)
                for mode in ("bare", "pipeline"):
                    cfg = Config("onnxruntime", mode, p, b, artifact=str(art))
                    if not art.is_file():
                        cfg.skip_reason = f"no {p} artifact {art}" + (
                            " (build it: python -m export.build_engine --onnx MODEL --int8)" if p == "int8" else
                            " (build it: python -m export.build_engine --onnx MODEL --fp16)" if p == "fp16" else "")
                    configs.append(cfg)
        if "tensorrt" in backends:
            for p in precisions:
                art = artifact_for(model, p, "tensorrt")
                for mode in ("bare", "pipeline"):
                    cfg = Config("tensorrt", mode, p, b, artifact=str(art), device="cuda")
                    if trt_reason:
                        cfg.skip_reason = trt_reason
                    elif not art.is_file():
                        cfg.skip_reason = (f"no engine {art} (build it on this GPU: python -m export.build_engine "
                                           f"--onnx MODEL --{p})")
                    configs.append(cfg)
    return configs


def make_runner(cfg: Config, meta: ModelMetadata, inputs: Inputs, checkpoint: str | None, threads: int) -> Any:
    """The runner for ``cfg``; raises :class:`SkipConfig` (with the reason) when it cannot be built here."""
    from runtime.errors import BackendUnavailable

    try:
        if cfg.backend == "torch":
            return TorchRunner(cfg, meta, inputs, checkpoint, threads)
        if cfg.mode == "bare" and cfg.backend == "tensorrt":
            return TrtBareRunner(cfg, threads)
        if cfg.mode == "bare":
            runner = OrtBareRunner(cfg, threads)
            cfg.device = "cuda" if runner.backend.providers[0].startswith("CUDA") else "cpu"
            return runner
        return ClassifierRunner(cfg, inputs, threads)
    except BackendUnavailable as e:
        raise SkipConfig(str(e)) from None
    except ImportError as e:
        raise SkipConfig(f"cannot import what this backend needs: {e}") from None


# ------------------------------------------------------------------------------------------------ results
def _record(cfg: Config, s: Samples | None, gemm_gflops: float | None, macs: int | None,
            max_spread: float) -> dict[str, Any]:
    rec: dict[str, Any] = {"key": cfg.key, "backend": cfg.backend, "label": cfg.label, "mode": cfg.mode,
                           "precision": cfg.precision, "batch": cfg.batch, "artifact": cfg.artifact,
                           "device": cfg.device, "status": "skipped" if s is None else "ok",
                           "reason": cfg.skip_reason, "notes": list(cfg.notes)}
    if s is None:
        return rec
    stages = {k: summarize(v) for k, v in s.stages.items() if k != TOTAL}
    rec["stages"] = {k: stages[k] for k in STAGES if k in stages}
    rec["total"] = summarize(s.stages[TOTAL])
    rec["throughput_ips"] = cfg.batch * 1e3 / rec["total"]["median_ms"]
    rec["round_medians_ms"] = s.round_medians()
    rec["spread"] = spread(rec["round_medians_ms"])
    rec["noisy"] = bool(rec["spread"]["rel"] > max_spread)
    inf = rec["stages"].get("inference")
    if inf and gemm_gflops and macs and cfg.device == "cpu":
        rec["floor_ms"] = floor_ms(macs, gemm_gflops, cfg.batch)
        rec["gemm_fraction"] = rec["floor_ms"] / inf["median_ms"]
    return rec


def add_ratios(records: list[dict[str, Any]], samples: dict[str, Samples]) -> None:
    """Per-round paired ratios to the torch eager FP32 row and to the bare ONNX Runtime FP32 row of the same batch.

    Pipeline rows compare end to end with the torch pipeline; bare rows compare with torch's inference stage.
    """
    for rec in records:
        if rec["status"] != "ok":
            continue
        s = samples[rec["key"]]
        b = rec["batch"]
        torch_key = f"torch/pipeline/fp32/b{b}"
        if torch_key in samples and rec["key"] != torch_key:
            stage_b = TOTAL if rec["mode"] == "pipeline" else "inference"
            rec["vs_torch"] = paired_ratio(s, samples[torch_key], TOTAL, stage_b)
        bare_key = f"onnxruntime/bare/fp32/b{b}"
        if bare_key in samples and rec["key"] != bare_key:
            rec["vs_ort_bare_fp32"] = paired_ratio(s, samples[bare_key])


def _fmt_ms(x: float | None) -> str:
    if x is None:
        return "-"
    return f"{x:.2f}" if x < 10 else f"{x:.1f}" if x < 100 else f"{x:.0f}"


def _fmt_ratio(r: dict[str, Any] | None) -> str:
    if not r:
        return "-"
    mark = "" if r["conclusive"] else " ≈"
    return f"{r['ratio']:.2f}× ({r['lo']:.2f}–{r['hi']:.2f}){mark}"


def format_tables(records: list[dict[str, Any]], header: dict[str, Any]) -> str:
    """The Markdown report: caption, end-to-end table, per-stage table, skipped configurations."""
    ok = [r for r in records if r["status"] == "ok"]
    lines = [
        f"### Latency: {header['model_label']}",
        "",
        envinfo.format_header(header["machine"]),
        f"- model: `{header['model']}` ({header['macs'] / 1e6:.0f} M MACs/image)" if header.get("macs") else
        f"- model: `{header['model']}`",
        f"- input: {header['source_label']}; {header['iters']} timed iterations per row in {header['rounds']} "
        f"interleaved rounds after {header['warmup']} warm-up; times in ms per batch",
        f"- compute floor: SGEMM {header['gemm']['gflops']:.0f} GFLOP/s ({header['gemm']['best']}, "
        f"{header['gemm']['n']}²) → FP32 floor {header['floor_ms_b1']:.2f} ms/image" if header.get("gemm")
        and header.get("floor_ms_b1") else "- compute floor: not measured",
        f"- torch eager: {header['torch_weights']}; channels_last, inference_mode, denormals flushed",
        "",
        "| config | prec | batch | median | p90 | p99 | min | max | img/s | × torch eager | × ORT bare fp32 "
        "| round spread | % of GEMM rate |",
        "|---|---|---:|---:|---:|---:|---:|---:|---:|---|---|---|---:|",
    ]
    for r in ok:
        t = r["total"]
        sp = r["spread"]
        spread_txt = f"{sp['rel'] * 100:.0f}%" + (" ⚠ noisy" if r["noisy"] else "")
        frac = f"{r['gemm_fraction'] * 100:.0f}%" if r.get("gemm_fraction") else "-"
        lines.append(f"| {r['label']} | {r['precision']} | {r['batch']} | {_fmt_ms(t['median_ms'])} | "
                     f"{_fmt_ms(t['p90_ms'])} | {_fmt_ms(t['p99_ms'])} | {_fmt_ms(t['min_ms'])} | "
                     f"{_fmt_ms(t['max_ms'])} | {r['throughput_ips']:.1f} | {_fmt_ratio(r.get('vs_torch'))} | "
                     f"{_fmt_ratio(r.get('vs_ort_bare_fp32'))} | {spread_txt} | {frac} |")
    present = [s for s in STAGES if any(s in r.get("stages", {}) for r in ok)]
    lines += ["", "Per-stage medians (ms per batch; `-` = stage not part of that path):", "",
              "| config | prec | batch | " + " | ".join(present) + " | total |",
              "|---|---|---:|" + "---:|" * (len(present) + 1)]
    for r in ok:
        cells = [_fmt_ms(r["stages"][s]["median_ms"]) if s in r["stages"] else "-" for s in present]
        lines.append(f"| {r['label']} | {r['precision']} | {r['batch']} | " + " | ".join(cells)
                     + f" | {_fmt_ms(r['total']['median_ms'])} |")
    skipped = [r for r in records if r["status"] != "ok"]
    if skipped:
        lines += ["", "Skipped:"]
        seen: set[tuple[str, str, str]] = set()
        for r in skipped:
            k = (r["label"], r["precision"], r["reason"] or "")
            if k in seen:
                continue
            seen.add(k)
            batches = sorted({x["batch"] for x in skipped if (x["label"], x["precision"], x["reason"] or "") == k})
            lines.append(f"- {r['label']} {r['precision']} (batch {', '.join(map(str, batches))}): {r['reason']}")
    lines += ["", "Ratios are per-round paired medians: value (min–max over rounds); `≈` = the range straddles 1.0, "
              "too noisy to call a difference. Pipeline rows are compared end to end with the torch eager pipeline, "
              "bare rows with torch's inference stage. `% of GEMM rate` = FP32 compute floor / inference median."]
    return "\n".join(lines)


# ------------------------------------------------------------------------------------------------ the run
@dataclass
class Settings:
    model: Path
    backends: tuple[str, ...] = BACKENDS
    precisions: tuple[str, ...] = PRECISIONS
    batches: tuple[int, ...] = (1, 8, 32)
    frame_size: int = 1024
    source: str = "frame"
    iters: int = 50
    warmup: int = 5
    rounds: int = 5
    threads: int | None = None
    checkpoint: str | None = None
    gemm_size: int = 2048
    max_spread: float = DEFAULT_MAX_SPREAD
    progress: bool = True


def run_latency(st: Settings) -> dict[str, Any]:
    """Measure every configuration of ``st``; returns the JSON document (``records`` + run header)."""
    threads = st.threads or envinfo.cores_available()
    meta = read_onnx_metadata(st.model)
    configs = plan(st.model, st.backends, st.precisions, st.batches)
    frames = make_frames(min(max(st.batches), 8), st.frame_size)
    inputs = Inputs(frames, st.source)
    runners: list[Any] = []
    runnable: list[Config] = []
    for cfg in configs:
        if cfg.skip_reason:
            continue
        try:
            runners.append(make_runner(cfg, meta, inputs, st.checkpoint, threads))
            runnable.append(cfg)
        except SkipConfig as e:
            cfg.skip_reason = str(e)
    macs_info = count_macs(st.model)
    macs = macs_info["macs"] or None
    gemm = measure_gemm_gflops(st.gemm_size, threads=threads) if st.gemm_size else None
    bar = _progress(len(runners) * st.iters, st.progress)
    samples = run_interleaved(runners, st.iters, st.warmup, st.rounds, progress=bar.update if bar else None)
    if bar:
        bar.close()
    by_key = {cfg.key: s for cfg, s in zip(runnable, samples)}
    records = [_record(cfg, by_key.get(cfg.key) if not cfg.skip_reason else None,
                       gemm["gflops"] if gemm else None, macs, st.max_spread) for cfg in configs]
    add_ratios(records, by_key)
    torch_weights = (f"weights from {st.checkpoint}" if st.checkpoint else
                     f"random-init {meta.arch} (same architecture, not the ONNX's weights: fine for latency, "
                     "not for accuracy)")
    return {
        "schema": SCHEMA,
        "command": " ".join(["python -m benchmarks.latency", *sys.argv[1:]]) if sys.argv else "",
        "machine": envinfo.machine_info(threads),
        "model": str(st.model),
        "model_label": f"{st.model.name} ({meta.arch}, {meta.input_size[0]}×{meta.input_size[1]})",
        "macs": macs,
        "macs_uncounted_nodes": macs_info["uncounted"],
        "gemm": gemm,
        "floor_ms_b1": floor_ms(macs, gemm["gflops"]) if macs and gemm else None,
        "torch_weights": torch_weights,
        "source_label": (f"{st.frame_size}×{st.frame_size} grey uint8 frames" +
                         (", PNG-encoded (decode timed)" if st.source == "png" else " (camera-like, no decode)")),
        "settings": {"backends": list(st.backends), "precisions": list(st.precisions), "batches": list(st.batches),
                     "frame_size": st.frame_size, "source": st.source, "iters": st.iters, "warmup": st.warmup,
                     "rounds": st.rounds, "threads": threads, "max_spread": st.max_spread},
        "iters": st.iters, "warmup": st.warmup, "rounds": st.rounds,
        "records": records,
    }


def _progress(total: int, enabled: bool) -> Any:
    if not enabled or total <= 0:
        return None
    try:
        from tqdm import tqdm
    except ImportError:
        return None
    return tqdm(total=total, desc="timing", unit="it", file=sys.stderr, leave=False)


def write_results(doc: dict[str, Any], markdown: str, out: Path, name: str = "latency") -> tuple[Path, Path]:
    """``out/<name>.json`` and ``out/<name>.md``, each written atomically."""
    j = atomic_write_text(out / f"{name}.json", json.dumps(doc, indent=2, default=_json_default) + "\n")
    m = atomic_write_text(out / f"{name}.md", markdown + "\n")
    return j, m


def _json_default(o: Any) -> Any:
    if isinstance(o, (np.integer, np.floating)):
        return o.item()
    if isinstance(o, Path):
        return str(o)
    raise TypeError(f"not JSON-serialisable: {type(o).__name__}")


# ------------------------------------------------------------------------------------------------ --pipeline
PREDICT_GOAL = 1.15  # Classifier.predict on a decoded frame ≤ 1.15 × bare session.run
PIPELINE_GOAL = 0.9  # runtime.run fps ≥ 0.9 × bare inference rate


def sem_frames(n: int, size: int, seed: int = 0) -> tuple[list[np.ndarray], str]:
    """``n`` frames for the pipeline video: synthetic SEM images (train.synthetic, rendered at ≤ 512 px and
    enlarged, since rendering at 1024 px takes seconds each) when available, else :func:`make_frames`."""
    import cv2

    try:
        from runtime.contract import CLASSES
        from train.synthetic import render_sample
    except ImportError:
        return make_frames(n, size, seed), "line-pattern frames (train.synthetic not available)"
    rng = np.random.default_rng(seed)
    render = min(size, 512)
    frames = []
    for i in range(n):
        img, _ = render_sample(CLASSES[i % len(CLASSES)], rng, render)
        frames.append(img if render == size else cv2.resize(img, (size, size), interpolation=cv2.INTER_LINEAR))
    return frames, f"train.synthetic SEM frames rendered at {render} px" + ("" if render == size else ", enlarged")


def write_video(path: Path, frames: Sequence[np.ndarray], count: int, fps: float = 30.0,
                fourcc: str = "mp4v") -> Path:
    """A grey video (``fourcc``, mp4v by default) of ``count`` frames cycling through ``frames``; written to a temp
    name, then renamed."""
    import cv2

    h, w = frames[0].shape[:2]
    tmp = path.with_name(f".{path.stem}.tmp{path.suffix}")
    writer = cv2.VideoWriter(str(tmp), cv2.VideoWriter_fourcc(*fourcc), fps, (w, h), isColor=False)
    if not writer.isOpened():
        raise RuntimeError(f"{tmp}: OpenCV cannot write {fourcc} video here")
    try:
        for i in range(count):
            writer.write(frames[i % len(frames)])
    finally:
        writer.release()
    os.replace(tmp, path)
    return path


class PredictRunner:
    """``Classifier.predict`` on one decoded grey frame (batch 1): what a station's per-frame call costs."""

    def __init__(self, artifact: str, frame: np.ndarray, threads: int) -> None:
        from runtime import Classifier

        self.clf = Classifier(artifact, backend="ort", threads=threads)
        self.frame = frame

    def step(self) -> dict[str, float]:
        t0 = time.perf_counter()
        p = self.clf.predict(self.frame)
        out = {k: float(v) for k, v in p.timings.items() if k in STAGES}
        out[TOTAL] = (time.perf_counter() - t0) * 1e3
        return out


def predict_overhead(model: Path, precisions: Sequence[str], frame_size: int, iters: int, warmup: int,
                     rounds: int, threads: int) -> list[dict[str, Any]]:
    """Classifier.predict on a decoded frame vs bare session.run on a ready tensor, interleaved, per precision."""
    frame = make_frames(1, frame_size)[0]
    results = []
    for p, art in cpu_artifacts(model, precisions):
        bare = OrtBareRunner(Config("onnxruntime", "bare", p, 1, artifact=str(art)), threads)
        pred = PredictRunner(str(art), frame, threads)
        s_bare, s_pred = run_interleaved([bare, pred], iters, warmup, rounds)
        ratio = paired_ratio(s_pred, s_bare)
        results.append({
            "precision": p, "artifact": str(art), "frame": f"{frame_size}×{frame_size} grey uint8",
            "bare_ms": summarize(s_bare.stages[TOTAL]), "predict_ms": summarize(s_pred.stages[TOTAL]),
            "predict_stages_ms": {k: summarize(v)["median_ms"] for k, v in s_pred.stages.items() if k != TOTAL},
            "ratio": ratio, "goal": PREDICT_GOAL, "meets_goal": ratio["ratio"] <= PREDICT_GOAL,
            "conclusive": not (ratio["lo"] <= PREDICT_GOAL <= ratio["hi"]),
        })
    return results


def _run_loop(artifact: str, video: Path, frames: int, out_dir: Path, threads: int) -> float:
    """Wall seconds of ``python -m runtime.run`` classifying the first ``frames`` frames of ``video``."""
    import subprocess

    jsonl = out_dir / f"run-{Path(artifact).name}-{frames}.jsonl"
    jsonl.unlink(missing_ok=True)
    cmd = [sys.executable, "-m", "runtime.run", "--source", str(video), "--model", artifact, "--output", str(jsonl),
           "--headless", "--max-frames", str(frames), "--threads", str(threads), "--quiet", "--no-status"]
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, check=False)
    wall = time.perf_counter() - t0
    if proc.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)} failed ({proc.returncode}): {proc.stderr.strip()[-800:]}")
    n = sum(1 for _ in jsonl.open(encoding="utf-8")) if jsonl.is_file() else 0
    if n < frames:
        raise RuntimeError(f"runtime.run wrote {n} records for {frames} frames ({jsonl})")
    return wall


def pipeline_fps(model: Path, precisions: Sequence[str], frame_size: int, n_frames: int, out_dir: Path,
                 threads: int, iters: int, rounds: int) -> dict[str, Any]:
    """``runtime.run`` fps on a generated video vs the bare inference rate (1 / median session.run at batch 1).

    Start-up (imports, model load, warm-up) is removed by timing a short run (n/5 frames) and the full run and
    dividing the extra frames by the extra time. Bare session.run is timed just before and after each pair.
    """
    if importlib_util_find_spec("runtime.run") is None:
        return {"status": "skipped", "reason": "runtime.run does not exist yet"}
    out_dir.mkdir(parents=True, exist_ok=True)
    frames, content = sem_frames(6, frame_size)
    video = write_video(out_dir / f"pipeline_{frame_size}.mp4", frames, n_frames)
    short = max(5, n_frames // 5)
    rows = []
    for p, art in cpu_artifacts(model, precisions):
        bare = OrtBareRunner(Config("onnxruntime", "bare", p, 1, artifact=str(art)), threads)
        bare_samples: list[float] = []
        fps_rounds: list[float] = []
        ratio_rounds: list[float] = []
        for _ in range(max(1, rounds)):
            (b1,) = run_interleaved([bare], iters, 2, 1)
            t_short = _run_loop(str(art), video, short, out_dir, threads)
            t_full = _run_loop(str(art), video, n_frames, out_dir, threads)
            (b2,) = run_interleaved([bare], iters, 2, 1)
            bare_ms = float(np.median(b1.stages[TOTAL] + b2.stages[TOTAL]))
            bare_samples += b1.stages[TOTAL] + b2.stages[TOTAL]
            fps = (n_frames - short) / max(t_full - t_short, 1e-9)
            fps_rounds.append(fps)
            ratio_rounds.append(fps / (1e3 / bare_ms))
        ratio = float(np.median(ratio_rounds))
        rows.append({
            "precision": p, "artifact": str(art), "fps": float(np.median(fps_rounds)), "fps_rounds": fps_rounds,
            "bare_ms": summarize(bare_samples), "bare_rate_ips": 1e3 / float(np.median(bare_samples)),
            "ratio": ratio, "ratio_lo": min(ratio_rounds), "ratio_hi": max(ratio_rounds), "goal": PIPELINE_GOAL,
            "meets_goal": ratio >= PIPELINE_GOAL,
            "conclusive": not (min(ratio_rounds) <= PIPELINE_GOAL <= max(ratio_rounds)),
        })
    return {"status": "ok", "video": str(video), "frames": n_frames, "short_run_frames": short,
            "content": content, "frame_size": frame_size, "rows": rows}


def importlib_util_find_spec(name: str) -> Any:
    import importlib.util

    try:
        return importlib.util.find_spec(name)
    except ModuleNotFoundError:
        return None


def run_pipeline_checks(st: Settings, n_frames: int, out_dir: Path, station: dict[str, Any] | None = None,
                        only_station: bool = False) -> dict[str, Any]:
    """The ``--pipeline`` measurements; ``only_station`` (``--pipeline-only``) runs just the overlap and station
    checks (``station``: sources, fps list, seconds)."""
    threads = st.threads or envinfo.cores_available()
    precisions = [p for p in ("fp32", "int8") if p in st.precisions]
    out: dict[str, Any] = {}
    if not only_station:
        out["predict_vs_bare"] = predict_overhead(st.model, precisions, st.frame_size, st.iters, st.warmup,
                                                  st.rounds, threads)
        out["run_loop"] = pipeline_fps(st.model, precisions, st.frame_size, n_frames, out_dir, threads,
                                       max(10, st.iters // 2), min(st.rounds, 3))
    out["overlap"] = overlap_check(st.model, st.frame_size, n_frames, out_dir, min(st.rounds, 3))
    if station and station.get("sources"):
        out["station"] = station_check(st.model, station["sources"], station.get("frame_size", st.frame_size),
                                       station.get("fps", (30.0, 0.0)), station.get("seconds", 15.0), out_dir,
                                       station.get("rounds", 1))
    return out


def _verdict(meets: bool, conclusive: bool) -> str:
    if not conclusive:
        return "too noisy to call"
    return "yes" if meets else "**no**"


def format_pipeline(pl: dict[str, Any]) -> str:
    if "predict_vs_bare" not in pl:
        return format_station(pl)
    return _format_pipeline(pl) + "\n\n" + format_station(pl)


def _format_pipeline(pl: dict[str, Any]) -> str:
    lines = ["#### Classifier.predict on a decoded frame vs bare session.run (batch 1)", "",
             "| prec | bare session.run ms | predict ms | predict stages (median ms) | ratio (min–max) | "
             f"≤ {PREDICT_GOAL}×? |", "|---|---:|---:|---|---|---|"]
    for r in pl["predict_vs_bare"]:
        st = ", ".join(f"{k} {v:.2f}" for k, v in r["predict_stages_ms"].items())
        q = r["ratio"]
        lines.append(f"| {r['precision']} | {_fmt_ms(r['bare_ms']['median_ms'])} | "
                     f"{_fmt_ms(r['predict_ms']['median_ms'])} | {st} | {q['ratio']:.2f}× ({q['lo']:.2f}–"
                     f"{q['hi']:.2f}) | {_verdict(r['meets_goal'], r['conclusive'])} |")
    loop = pl["run_loop"]
    lines += ["", "#### python -m runtime.run on a generated video vs bare inference rate", ""]
    if loop.get("status") != "ok":
        lines.append(f"skipped: {loop.get('reason')}")
        return "\n".join(lines)
    lines += [f"{loop['frames']} frames of {loop['frame_size']}×{loop['frame_size']} mp4 ({loop['content']}); fps "
              f"= (frames − {loop['short_run_frames']}) / (t_full − t_short), start-up excluded.", "",
              "| prec | runtime.run fps (per round) | bare rate img/s | ratio (min–max) | "
              f"≥ {PIPELINE_GOAL}×? |", "|---|---|---:|---|---|"]
    for r in loop["rows"]:
        per = ", ".join(f"{f:.1f}" for f in r["fps_rounds"])
        lines.append(f"| {r['precision']} | {r['fps']:.1f} ({per}) | {r['bare_rate_ips']:.1f} | {r['ratio']:.2f}× "
                     f"({r['ratio_lo']:.2f}–{r['ratio_hi']:.2f}) | {_verdict(r['meets_goal'], r['conclusive'])} |")
    return "\n".join(lines)


# ------------------------------------------------------------------------------------------------ --pipeline: overlap
OVERLAP_GOAL = 0.8  # runtime.run fps ≥ 0.8 × min(decode-only rate, Classifier.predict rate) on the same video


def write_mjpg(path: Path, frames: Sequence[np.ndarray], count: int, fps: float = 30.0) -> Path:
    """A grey MJPG ``.avi`` of ``count`` frames cycling through ``frames`` (what many USB/GigE cameras send)."""
    return write_video(path, frames, count, fps, fourcc="MJPG")


def _cpu_s(children: bool = False) -> float:
    """CPU seconds (user + system) used so far by this process, or by its finished children."""
    t = os.times()
    return t.children_user + t.children_system if children else t.user + t.system


def decode_rate(video: Path, keep: int = 30) -> tuple[float, list[np.ndarray], float]:
    """Frames per second of ``cv2.VideoCapture.read`` over the whole video, its first ``keep`` frames, and the CPU
    milliseconds per frame it took."""
    import cv2

    cap = cv2.VideoCapture(str(video))
    kept: list[np.ndarray] = []
    n = 0
    c0, t0 = _cpu_s(), time.perf_counter()
    try:
        while True:
            ok, img = cap.read()
            if not ok:
                break
            n += 1
            if len(kept) < keep:
                kept.append(img)
    finally:
        cap.release()
    wall, cpu = time.perf_counter() - t0, _cpu_s() - c0
    return n / wall, kept, cpu / max(n, 1) * 1e3


def predict_rate(clf: Any, frames: Sequence[np.ndarray], n: int) -> tuple[float, float]:
    """Frames per second of ``Classifier.predict`` on decoded frames (cycled), one at a time, and its CPU
    milliseconds per frame."""
    for f in frames[:3]:
        clf.predict(f)
    c0, t0 = _cpu_s(), time.perf_counter()
    for i in range(n):
        clf.predict(frames[i % len(frames)])
    return n / (time.perf_counter() - t0), (_cpu_s() - c0) / n * 1e3


def _run_seconds(sources: Sequence[Path], model: str, out_dir: Path, max_frames: int | None,
                 threads: int | None) -> tuple[float, float]:
    """Wall and CPU seconds of one ``python -m runtime.run`` over ``sources`` (to their end, or ``max_frames``)."""
    import subprocess

    jsonl = out_dir / "overlap-run.jsonl"
    jsonl.unlink(missing_ok=True)
    cmd = [sys.executable, "-m", "runtime.run", "--model", model, "--output", str(jsonl), "--headless", "--quiet",
           "--no-status"]
    for s in sources:
        cmd += ["--source", str(s)]
    if max_frames:
        cmd += ["--max-frames", str(max_frames)]
    if threads:
        cmd += ["--threads", str(threads)]
    c0, t0 = _cpu_s(children=True), time.perf_counter()
    proc = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, check=False)
    wall, cpu = time.perf_counter() - t0, _cpu_s(children=True) - c0
    if proc.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)} failed ({proc.returncode}): {proc.stderr.strip()[-800:]}")
    return wall, cpu


def _loop_rate(video: Path, model: str, out_dir: Path, n_frames: int, short: int,
               threads: int | None) -> tuple[float, float]:
    """``runtime.run`` fps and CPU ms per frame over a whole video, start-up removed by subtracting a run of its
    first ``short`` frames."""
    w_short, c_short = _run_seconds([video], model, out_dir, short, threads)
    w_full, c_full = _run_seconds([video], model, out_dir, None, threads)
    extra = n_frames - short
    return extra / max(w_full - w_short, 1e-9), max(c_full - c_short, 0.0) / extra * 1e3


#: overlap_check's measurements: key, what it is (the table's column)
OVERLAP_COLUMNS = (
    ("decode", "decode only"),
    ("predict", "predict, all cores"),
    ("predict_spin", "predict, all cores, spinning"),
    ("predict_run_threads", "predict, run's threads"),
    ("run", "runtime.run (default)"),
    ("run_all_cores", "runtime.run --threads all cores"),
)


def overlap_check(model: Path, frame_size: int, n_frames: int, out_dir: Path, rounds: int) -> dict[str, Any]:
    """Does decoding overlap inference in ``runtime.run``? Per round, on one MJPG video: the decode-only rate;
    ``Classifier.predict`` on its decoded frames with ONNX Runtime on every physical core (as ``runtime.run`` sets
    it up, and with the ``Classifier`` defaults, which let idle threads spin) and on the run's default threads; and
    ``runtime.run`` over the whole video at its default threads and with ``--threads`` = all cores, start-up
    removed by subtracting a run of ``n/5`` frames. The order rotates by round. The goal's ratio = run fps /
    min(decode, the faster predict on all cores); CPU milliseconds per frame are kept for each measurement."""
    from runtime import Classifier
    from runtime.ort_backend import physical_cores
    from runtime.run import default_threads

    out_dir.mkdir(parents=True, exist_ok=True)
    frames, content = sem_frames(6, frame_size)
    video = write_mjpg(out_dir / f"overlap_{frame_size}.avi", frames, n_frames)
    short = max(5, n_frames // 5)
    cores, run_threads = physical_cores(), default_threads()
    keys = [k for k, _ in OVERLAP_COLUMNS]
    per: dict[str, list[float]] = {k: [] for k in keys}
    cpu: dict[str, list[float]] = {k: [] for k in keys}
    clfs = {"predict": Classifier(str(model), backend="ort", threads=cores, spin=False),
            "predict_spin": Classifier(str(model), backend="ort", threads=cores),
            "predict_run_threads": Classifier(str(model), backend="ort", threads=run_threads, spin=False)}
    kept: list[np.ndarray] = []

    def measure(key: str) -> None:
        nonlocal kept
        if key == "decode":
            rate, kept, ms = decode_rate(video)
        elif key in clfs:
            rate, ms = predict_rate(clfs[key], kept, min(n_frames, 150))
        else:
            threads = cores if key == "run_all_cores" else None
            rate, ms = _loop_rate(video, str(model), out_dir, n_frames, short, threads)
        per[key].append(rate)
        cpu[key].append(ms)

    try:
        for r in range(max(1, rounds)):
            measure("decode")  # first: the predict runs use its frames
            rest = keys[1:]
            for key in rest[r % len(rest):] + rest[:r % len(rest)]:
                measure(key)
    finally:
        for clf in clfs.values():
            clf.close()

    def ratio_rounds(run_key: str, pred_keys: Sequence[str]) -> list[float]:
        return [per[run_key][i] / min(per["decode"][i], max(per[p][i] for p in pred_keys))
                for i in range(len(per["decode"]))]

    best = ("predict", "predict_spin")
    ratios = {"run": ratio_rounds("run", best), "run_all_cores": ratio_rounds("run_all_cores", best),
              "run_vs_same_threads": ratio_rounds("run", ("predict_run_threads",))}
    main_r = ratios["run"]
    return {"status": "ok", "video": str(video), "codec": "MJPG", "frames": n_frames, "short_run_frames": short,
            "content": content, "frame_size": frame_size, "physical_cores": cores, "run_default_threads": run_threads,
            "rates_fps": per, "medians_fps": {k: float(np.median(v)) for k, v in per.items()},
            "cpu_ms_per_frame": cpu, "medians_cpu_ms": {k: float(np.median(v)) for k, v in cpu.items()},
            "ratios": {k: {"median": float(np.median(v)), "min": min(v), "max": max(v), "rounds": v}
                       for k, v in ratios.items()},
            "goal": OVERLAP_GOAL, "meets_goal": float(np.median(main_r)) >= OVERLAP_GOAL,
            "conclusive": not (min(main_r) <= OVERLAP_GOAL <= max(main_r))}


# ------------------------------------------------------------------------------------------------ --pipeline: station
class PacedCapture:
    """A stand-in camera for the station measurement: decodes a video file at ``fps`` (0: as fast as it can),
    looping, like a camera sending MJPG. ``cv2.VideoCapture``'s interface, as ``runtime.run`` uses it."""

    def __init__(self, video: str, fps: float) -> None:
        import cv2

        self._cv2 = cv2
        self.video, self.period = video, (1.0 / fps if fps else 0.0)
        self.cap = cv2.VideoCapture(video)
        self.next_t = time.perf_counter()

    def isOpened(self) -> bool:  # noqa: N802 - OpenCV's name
        return self.cap is not None and self.cap.isOpened()

    def read(self) -> tuple[bool, Any]:
        if self.period:
            now = time.perf_counter()
            if self.next_t > now:
                time.sleep(self.next_t - now)
            self.next_t = max(self.next_t + self.period, time.perf_counter() - self.period)
        ok, img = self.cap.read()
        if not ok:
            self.cap.set(self._cv2.CAP_PROP_POS_FRAMES, 0)
            ok, img = self.cap.read()
        return ok, img

    def get(self, prop: int) -> float:
        return 1.0 / self.period if self.period and prop == self._cv2.CAP_PROP_FPS else 0.0

    def release(self) -> None:
        if self.cap is not None:
            self.cap.release()


def station_worker(spec_json: str) -> None:
    """One measured ``runtime.run`` process: cameras ``/dev/video9N`` that play the given videos at ``fps``, for
    ``seconds`` after the loop starts; prints the summary (with latency percentiles) as one JSON line."""
    import threading

    from runtime.run import LoopHook, run

    spec = json.loads(spec_json)
    videos: dict[str, str] = {f"/dev/video9{i}": v for i, v in enumerate(spec["videos"])}
    stop = threading.Event()
    lat: list[float] = []

    class Timer(LoopHook):
        def on_start(self, loop: Any) -> None:
            threading.Timer(spec["seconds"], stop.set).start()

        def on_result(self, loop: Any, feed: Any, result: Any) -> None:
            if result.prediction is not None:
                lat.append(result.latency_ms)

    summary = run(list(videos), model=spec["model"], outputs=[], quiet=True, status=False, stop_event=stop,
                  capture_factory=lambda loc: PacedCapture(videos[loc], spec["fps"]), hooks=[Timer()],
                  threads=spec.get("threads"), err=open(os.devnull, "w"))  # noqa: SIM115
    d = summary.to_dict()
    d["latency_p50_ms"] = float(np.percentile(lat, 50)) if lat else None
    d["latency_p90_ms"] = float(np.percentile(lat, 90)) if lat else None
    print(json.dumps(d))


def _station_processes(groups: Sequence[Sequence[str]], model: str, fps: float, seconds: float,
                       threads: int | None) -> list[dict[str, Any]]:
    """Run one :func:`station_worker` process per group of videos, all at once; their summaries."""
    import subprocess

    procs = []
    for g in groups:
        spec = json.dumps({"videos": list(g), "model": model, "fps": fps, "seconds": seconds, "threads": threads})
        code = "import sys, benchmarks.latency as b; b.station_worker(sys.argv[1])"
        procs.append(subprocess.Popen([sys.executable, "-c", code, spec], cwd=REPO, stdout=subprocess.PIPE,
                                      stderr=subprocess.PIPE, text=True))
    out = []
    for p in procs:
        so, se = p.communicate(timeout=seconds + 300)
        if p.returncode != 0:
            raise RuntimeError(f"station worker failed ({p.returncode}): {se.strip()[-800:]}")
        out.append(json.loads(so.strip().splitlines()[-1]))
    return out


def station_check(model: Path, n_sources: int, frame_size: int, fps_list: Sequence[float], seconds: float,
                  out_dir: Path, rounds: int) -> dict[str, Any]:
    """``n_sources`` synthetic cameras (MJPG videos played at a camera's rate, or as fast as they decode with 0):
    all in one ``runtime.run`` process (batched across sources) vs one process per camera, run alternately in
    the same invocation. Throughput = frames classified per second of loop time, summed over processes; latency
    = capture-to-result age of every classified frame (p50/p90, worst process); drops = frames a camera sent that
    the classifier had no time for."""
    out_dir.mkdir(parents=True, exist_ok=True)
    videos = []
    for i in range(n_sources):
        frames, content = sem_frames(4, frame_size, seed=100 + i)
        videos.append(str(write_mjpg(out_dir / f"station_{frame_size}_{i}.avi", frames, 60)))
    rows = []
    for fps in fps_list:
        for _ in range(max(1, rounds)):
            for mode, groups in (("one process", [videos]), (f"{n_sources} processes", [[v] for v in videos])):
                res = _station_processes(groups, str(model), fps, seconds, None)
                frames = sum(r["frames"] for r in res)
                rows.append({
                    "fps_per_camera": fps, "mode": mode, "processes": len(res),
                    "throughput_fps": sum(r["frames"] / r["elapsed_s"] for r in res if r["elapsed_s"]),
                    "frames": frames, "dropped": sum(r["dropped"] for r in res),
                    "latency_p50_ms": max(r["latency_p50_ms"] or 0.0 for r in res),
                    "latency_p90_ms": max(r["latency_p90_ms"] or 0.0 for r in res),
                    "mean_batch": frames / max(1, sum(r["batches"] for r in res)),
                })
    return {"status": "ok", "sources": n_sources, "frame_size": frame_size, "seconds": seconds, "content": content,
            "rows": rows}


def _format_overlap(ov: dict[str, Any]) -> list[str]:
    """The overlap check's rates, CPU per frame and ratios (per round and median)."""
    t, cores = ov["run_default_threads"], ov["physical_cores"]
    m, c = ov["medians_fps"], ov["medians_cpu_ms"]
    heads = [f"{what} ({cores if k in ('predict', 'predict_spin', 'run_all_cores') else t} thr)"
             if k != "decode" else what for k, what in OVERLAP_COLUMNS]
    lines = [f"{ov['frames']} frames of {ov['frame_size']}² MJPG ({ov['content']}); {cores} physical cores; "
             f"runtime.run's default ONNX Runtime threads: {t}; medians over rounds:", "",
             "| | " + " | ".join(heads) + " |", "|---|" + "---:|" * len(heads),
             "| fps | " + " | ".join(f"{m[k]:.1f}" for k, _ in OVERLAP_COLUMNS) + " |",
             "| CPU ms/frame | " + " | ".join(f"{c[k]:.2f}" for k, _ in OVERLAP_COLUMNS) + " |", "",
             "| ratio | per round | median (min–max) |", "|---|---|---|"]
    names = {"run": "runtime.run / min(decode, faster predict on all cores)  ← the goal",
             "run_all_cores": f"runtime.run --threads {cores} / min(decode, faster predict on all cores)",
             "run_vs_same_threads": f"runtime.run / min(decode, predict at {t} threads)"}
    for k, r in ov["ratios"].items():
        per = ", ".join(f"{x:.2f}" for x in r.get("rounds", []))
        lines.append(f"| {names[k]} | {per} | {r['median']:.2f}× ({r['min']:.2f}–{r['max']:.2f}) |")
    return lines


def format_station(pl: dict[str, Any]) -> str:
    lines = []
    ov = pl.get("overlap")
    if ov:
        lines += ["#### runtime.run: decode overlapping inference (one source)", ""]
        if ov.get("status") != "ok":
            lines.append(f"skipped: {ov.get('reason')}")
        else:
            lines += _format_overlap(ov)
            lines += ["", f"≥ {ov['goal']}×? {_verdict(ov['meets_goal'], ov['conclusive'])}"]
    stn = pl.get("station")
    if stn:
        lines += ["", f"#### {stn.get('sources')} cameras: one process (batched) vs one process each", ""]
        if stn.get("status") != "ok":
            lines.append(f"skipped: {stn.get('reason')}")
        else:
            lines += [f"synthetic MJPG cameras, {stn['frame_size']}² ({stn['content']}), {stn['seconds']:g} s per "
                      "run; latency = capture to result; fps 0 = as fast as they decode", "",
                      "| fps/camera | mode | classified fps (total) | dropped | latency p50 ms | p90 ms | mean batch |",
                      "|---:|---|---:|---:|---:|---:|---:|"]
            for r in stn["rows"]:
                lines.append(f"| {r['fps_per_camera']:g} | {r['mode']} | {r['throughput_fps']:.1f} | {r['dropped']} | "
                             f"{r['latency_p50_ms']:.1f} | {r['latency_p90_ms']:.1f} | {r['mean_batch']:.2f} |")
    return "\n".join(lines)


# ------------------------------------------------------------------------------------------------ CLI
EPILOG = """\
examples:
  python -m benchmarks.latency                                   # bundled model, everything this machine can run
  python -m benchmarks.latency --model runs/synth/model.onnx --batch 1,8 --iters 100
  python -m benchmarks.latency --backends onnxruntime,torch --precisions fp32,int8 --batch 1 --source png
  python -m benchmarks.latency --checkpoint runs/synth/best.pt    # torch baseline with the trained weights
  python -m benchmarks.latency --pipeline                         # + runtime.run fps and predict() overhead

Configurations interleave (A B C, B C A, ...) over --rounds rounds; ratios are paired per round. A row whose
per-round medians spread more than --max-spread is marked noisy; a ratio whose range straddles 1.0 is marked ≈.
"""


def _csv(kind: Callable[[str], Any], allowed: Sequence[Any] | None = None) -> Callable[[str], tuple[Any, ...]]:
    def parse(text: str) -> tuple[Any, ...]:
        items = tuple(kind(t.strip()) for t in text.split(",") if t.strip())
        if not items:
            raise argparse.ArgumentTypeError("empty list")
        if allowed is not None:
            bad = [i for i in items if i not in allowed]
            if bad:
                raise argparse.ArgumentTypeError(f"{bad} not in {list(allowed)}")
        return items

    return parse


def _positive_batches(text: str) -> tuple[int, ...]:
    items = _csv(int)(text)
    if any(b < 1 for b in items):
        raise argparse.ArgumentTypeError(f"batch sizes must be ≥ 1, got {list(items)}")
    return items


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="python -m benchmarks.latency", description=__doc__.split("\n\n")[0],
                                 epilog=EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", type=Path, default=None,
                    help="FP32 ONNX model; int8/fp16 artifacts are looked up next to it "
                         f"(default: the bundled {BUNDLED_NAME}, wherever the runtime is installed)")
    ap.add_argument("--checkpoint", default=None, help="training checkpoint for the torch eager baseline's weights")
    ap.add_argument("--backends", type=_csv(str, BACKENDS), default=BACKENDS, help="default: all")
    ap.add_argument("--precisions", type=_csv(str, PRECISIONS), default=PRECISIONS, help="default: all")
    ap.add_argument("--batch", type=_positive_batches, default=(1, 8, 32), help="batch sizes (default 1,8,32)")
    ap.add_argument("--frame-size", type=int, default=1024, help="side of the square grey input frames (1024)")
    ap.add_argument("--source", choices=("frame", "png"), default="frame",
                    help="frame: raw grey arrays as from a camera; png: PNG bytes, so decode is timed too")
    ap.add_argument("--iters", type=int, default=50, help="timed iterations per configuration (50)")
    ap.add_argument("--warmup", type=int, default=5, help="untimed warm-up iterations per configuration (5)")
    ap.add_argument("--rounds", type=int, default=5, help="interleaved rounds the iterations are split into (5)")
    ap.add_argument("--threads", type=int, default=None, help="intra-op threads for every backend (all cores)")
    ap.add_argument("--max-spread", type=float, default=DEFAULT_MAX_SPREAD,
                    help="relative spread of per-round medians above which a row is marked noisy (0.25)")
    ap.add_argument("--gemm-size", type=int, default=2048, help="SGEMM size for the compute floor; 0 skips it")
    ap.add_argument("--pipeline", action="store_true",
                    help="also: runtime.run fps on a generated video, and Classifier.predict vs bare session.run")
    ap.add_argument("--pipeline-frames", type=int, default=300, help="frames in the generated video (300)")
    ap.add_argument("--pipeline-only", action="store_true",
                    help="only the runtime.run checks: decode/inference overlap and the multi-camera station (no "
                    "backend table)")
    ap.add_argument("--station-sources", type=int, default=4,
                    help="--pipeline: synthetic cameras, one process vs one process each (4; 0 skips)")
    ap.add_argument("--station-fps", type=_csv(float), default=(30.0, 0.0),
                    help="--pipeline: camera rates to measure the station at, 0 = as fast as they decode (30,0)")
    ap.add_argument("--station-seconds", type=float, default=15.0, help="--pipeline: seconds per station run (15)")
    ap.add_argument("--station-size", type=int, default=512, help="--pipeline: camera frame side (512)")
    ap.add_argument("--out", type=Path, default=Path("results"), help="folder for latency.json/.md (results/)")
    ap.add_argument("--no-progress", action="store_true", help="no progress bar")
    return ap


def resolve_model(model: Path | None) -> Path:
    """The model to measure, or SystemExit with what to do when there is none."""
    if model is None:
        try:
            return bundled_model_path()  # the runtime's resolver: installed package or source checkout
        except FileNotFoundError as e:
            raise SystemExit(f"benchmarks.latency: {e.strerror}") from None
    if not model.is_file():
        raise SystemExit(f"benchmarks.latency: model file {model} does not exist")
    return model


@cli("python -m benchmarks.latency")
def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    for name in ("iters", "rounds", "frame_size"):
        if getattr(args, name) < 1:
            raise SystemExit(f"benchmarks.latency: --{name.replace('_', '-')} must be ≥ 1")
    # The compute floor reads the graph with onnx (the train extra): fail on that now, not after measuring.
    import onnx  # noqa: F401

    model = resolve_model(args.model)
    if args.pipeline_only:
        args.pipeline = True
    st = Settings(model=model, backends=args.backends, precisions=args.precisions, batches=args.batch,
                  frame_size=args.frame_size, source=args.source, iters=args.iters, warmup=max(0, args.warmup),
                  rounds=args.rounds, threads=args.threads, checkpoint=args.checkpoint, gemm_size=args.gemm_size,
                  max_spread=args.max_spread, progress=not args.no_progress)
    if args.pipeline_only:
        doc: dict[str, Any] = {"schema": SCHEMA, "records": [], "pipeline_only": True}
        md = ""
    else:
        doc = run_latency(st)
        md = format_tables(doc["records"], doc)
        print(md)
    # Written now, so a failure in the --pipeline part below cannot cost the table.
    j, m = write_results(doc, md, args.out)
    rc = 0
    if args.pipeline:
        station = {"sources": args.station_sources, "fps": args.station_fps, "seconds": args.station_seconds,
                   "frame_size": args.station_size}
        try:
            doc["pipeline"] = run_pipeline_checks(st, args.pipeline_frames, args.out, station, args.pipeline_only)
            extra = format_pipeline(doc["pipeline"])
        except Exception as e:  # noqa: BLE001 - report, keep the latency table, exit non-zero
            doc["pipeline"] = {"status": "error", "reason": f"{type(e).__name__}: {e}"}
            extra = f"#### --pipeline failed\n\n{doc['pipeline']['reason']}"
            rc = 1
        print("\n" + extra)
        md += "\n\n" + extra
        j, m = write_results(doc, md, args.out)
    print(f"\nwrote {j} and {m}", file=sys.stderr)
    return rc


if __name__ == "__main__":
    sys.exit(main())
