"""On-target self-check: an artifact reproduces its FP32 golden references on this machine, or it is not trusted.

When an artifact is written (``python -m export``, ``python -m export.build_engine``, ``python -m export.golden``)
a few preprocessed inputs covering the classes are stored with it, together with the FP32 model's logits and
rejection score for them (:class:`Goldens`). ONNX files carry them in ``metadata_props`` under
:data:`GOLDEN_KEY` (so the file hash covers them); TensorRT engines, which cannot hold metadata, get the same
document next to the engine as ``<engine>.golden.json`` (:data:`GOLDEN_SUFFIX`). The document hashes its own payload,
so a truncated or edited copy is refused rather than trusted.

:func:`check_backend` feeds the golden inputs through a backend exactly as :class:`runtime.Classifier` does
(``input_buffer`` + ``infer``, the same calls, batching and pinned buffers an engine uses for frames) and compares
the outputs with the references against per-precision tolerances (:data:`TOLERANCES`): max |Δlogit| relative to the
references' logit scale, top-1 agreement, and the deviation of the rejection score. INT8 kernels differ between
CPUs (and TensorRT tactics between GPUs), so this runs where the artifact runs: ``Classifier`` does it once when it
opens an INT8 model or a TensorRT engine (``self_check=None``), always with ``self_check=True``, never with
``self_check=False``; a FAIL raises :class:`~runtime.errors.SelfCheckError` naming the artifact, how far off it is
and the command that rebuilds it.

``python -m runtime.check --model PATH [--backend B]`` prints the report; exit codes: :data:`EXIT_PASS`,
:data:`EXIT_FAIL`, :data:`EXIT_ERROR` (cannot open the model), :data:`EXIT_NO_GOLDENS` (nothing to check).
"""

from __future__ import annotations

import argparse
import base64
import io
import json
import math
import os
import platform
import sys
import warnings
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from runtime.artifacts import GOLDEN_SUFFIX, read_onnx_props
from runtime.backend import Backend
from runtime.errors import MetadataError, SelfCheckError
from runtime.files import sha256_bytes

#: ONNX ``metadata_props`` key holding the golden document (JSON).
GOLDEN_KEY = "sem_classifier.golden"
GOLDEN_FORMAT = "sem-golden/1"

EXIT_PASS, EXIT_FAIL, EXIT_ERROR, EXIT_NO_GOLDENS = 0, 1, 2, 3

#: x86 instruction-set flags that decide which integer kernels ONNX Runtime runs (recorded with INT8 results).
ISA_FLAGS = ("avx2", "fma", "avx512f", "avx512bw", "avx512vl", "avx512_vnni", "avx_vnni", "avx512_bf16",
             "amx_tile", "amx_int8", "amx_bf16", "asimd", "asimddp", "i8mm")


@dataclass(frozen=True)
class Tolerance:
    """Limits for one precision. ``max_dlogit`` and ``max_dscore`` are fractions of the references' scale
    (the largest |reference logit|, resp. |reference score|, at least 1)."""

    max_dlogit: float
    min_agreement: float
    max_dscore: float


#: Per precision. INT8 allows what a correctly quantised network deviates by (a few percent of the logit scale on
#: inputs far from a decision boundary) with margin, and is far below what saturated integer kernels or a broken
#: quantisation produce; FP32 leaves room for another CPU's or GPU's summation order (and TF32).
TOLERANCES: dict[str, Tolerance] = {
    "fp32": Tolerance(max_dlogit=5e-3, min_agreement=1.0, max_dscore=5e-3),
    "fp16": Tolerance(max_dlogit=0.03, min_agreement=1.0, max_dscore=0.03),
    "int8": Tolerance(max_dlogit=0.12, min_agreement=1.0, max_dscore=0.12),
}


def tolerance_for(precision: str) -> Tolerance:
    p = (precision or "fp32").lower()
    for key, tol in TOLERANCES.items():
        if p.startswith(key):
            return tol
    return TOLERANCES["fp32"]


# ------------------------------------------------------------------------------------------------ machine info
def cpu_info(cpuinfo: str | None = None) -> dict[str, Any]:
    """This machine's CPU model and the instruction-set flags among :data:`ISA_FLAGS` (plus ONNX Runtime's version)."""
    if cpuinfo is None:
        try:
            cpuinfo = Path("/proc/cpuinfo").read_text(errors="replace")
        except OSError:
            cpuinfo = ""
    model, flags = platform.processor() or platform.machine(), set()
    for line in cpuinfo.splitlines():
        key, _, value = line.partition(":")
        key = key.strip().lower()
        if key == "model name" and value.strip():
            model = value.strip()
        elif key in ("flags", "features") and not flags:
            flags = set(value.split())
    info: dict[str, Any] = {"cpu": model, "machine": platform.machine(),
                            "isa": [f for f in ISA_FLAGS if f in flags]}
    try:
        import onnxruntime as ort

        info["onnxruntime"] = ort.__version__
    except ImportError:  # pragma: no cover - runtime always has onnxruntime
        pass
    return info


def isa_summary(info: Mapping[str, Any] | None = None) -> str:
    info = cpu_info() if info is None else info
    isa = ", ".join(info.get("isa") or []) or "no AVX2/AVX-512/VNNI/AMX"
    return f"{info.get('cpu', '?')} ({isa})"


# ------------------------------------------------------------------------------------------------ golden document
def _pack(a: np.ndarray) -> str:
    buf = io.BytesIO()
    np.save(buf, np.ascontiguousarray(a), allow_pickle=False)
    import zlib

    return base64.b64encode(zlib.compress(buf.getvalue(), 9)).decode("ascii")


def _unpack(text: str) -> np.ndarray:
    import zlib

    return np.load(io.BytesIO(zlib.decompress(base64.b64decode(text))), allow_pickle=False)


@dataclass
class Goldens:
    """Golden references: ``grey`` (N, H, W) uint8 images and the per-channel affine that turns them into the network
    input (``x[n, c] = grey[n] * scale[c] + offset[c]``, float32), plus the FP32 model's ``logits`` (N, K) and
    rejection ``score`` (N,) for exactly those inputs. ``score_name``/``temperature`` say how the score was computed
    (``score_output`` when it is a graph output). ``classes`` are the folders the images came from, ``sources`` their
    names; ``reference`` describes the FP32 model (file name, sha256), ``built`` the machine that wrote them;
    ``build_command`` rebuilds the artifact they travel with."""

    grey: np.ndarray
    scale: np.ndarray
    offset: np.ndarray
    logits: np.ndarray
    score: np.ndarray
    score_name: str
    temperature: float
    score_output: str | None = None
    labels: tuple[str, ...] = ()
    classes: tuple[str, ...] = ()
    sources: tuple[str, ...] = ()
    reference: dict[str, Any] = field(default_factory=dict)
    built: dict[str, Any] = field(default_factory=dict)
    build_command: str = ""

    def __post_init__(self) -> None:
        self.grey = np.asarray(self.grey, np.uint8)
        self.scale = np.asarray(self.scale, np.float32).reshape(-1)
        self.offset = np.asarray(self.offset, np.float32).reshape(-1)
        self.logits = np.asarray(self.logits, np.float32)
        self.score = np.asarray(self.score, np.float32).reshape(-1)
        n = len(self.grey)
        if self.grey.ndim != 3 or n == 0 or self.logits.shape[0] != n or self.score.shape[0] != n:
            raise ValueError(f"golden references are inconsistent: grey {self.grey.shape}, logits "
                             f"{self.logits.shape}, score {self.score.shape}")
        if self.scale.shape != self.offset.shape or self.scale.size == 0:
            raise ValueError("golden references: scale and offset need one value per network channel")

    def __len__(self) -> int:
        return len(self.grey)

    def inputs(self) -> np.ndarray:
        """The network input ``(N, C, H, W)`` float32, reconstructed bit-exactly on any machine."""
        g = self.grey.astype(np.float32)[:, None]
        return (g * self.scale[None, :, None, None] + self.offset[None, :, None, None]).astype(np.float32)

    # serialisation: arrays as compressed .npy in base64; the payload's sha256 rides along
    def _payload(self) -> dict[str, Any]:
        return {"format": GOLDEN_FORMAT, "grey": _pack(self.grey), "scale": self.scale.tolist(),
                "offset": self.offset.tolist(), "logits": self.logits.tolist(), "score": self.score.tolist(),
                "score_name": self.score_name, "temperature": float(self.temperature),
                "score_output": self.score_output, "labels": list(self.labels), "classes": list(self.classes),
                "sources": list(self.sources), "reference": dict(self.reference), "built": dict(self.built),
                "build_command": self.build_command}

    def to_json(self) -> str:
        payload = self._payload()
        return json.dumps({**payload, "sha256": _digest(payload)}, sort_keys=True)

    @classmethod
    def from_json(cls, text: str | bytes, source: str = "<golden>") -> Goldens:
        try:
            doc = json.loads(text)
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise MetadataError(f"{source}: golden references are not valid JSON: {e}") from None
        if not isinstance(doc, dict) or doc.get("format") != GOLDEN_FORMAT:
            fmt = doc.get("format") if isinstance(doc, dict) else type(doc).__name__
            raise MetadataError(f"{source}: golden references have format {fmt!r}, expected {GOLDEN_FORMAT!r}")
        want = doc.pop("sha256", None)
        if want != _digest(doc):
            raise MetadataError(f"{source}: golden references are corrupt (their sha256 does not match their "
                                "content); re-add them with `python -m export.golden`")
        try:
            return cls(grey=_unpack(doc["grey"]), scale=np.asarray(doc["scale"]), offset=np.asarray(doc["offset"]),
                       logits=np.asarray(doc["logits"]), score=np.asarray(doc["score"]),
                       score_name=str(doc["score_name"]), temperature=float(doc["temperature"]),
                       score_output=doc.get("score_output"), labels=tuple(doc.get("labels") or ()),
                       classes=tuple(doc.get("classes") or ()), sources=tuple(doc.get("sources") or ()),
                       reference=dict(doc.get("reference") or {}), built=dict(doc.get("built") or {}),
                       build_command=str(doc.get("build_command") or ""))
        except (KeyError, TypeError, ValueError, OSError) as e:
            raise MetadataError(f"{source}: golden references are malformed: {type(e).__name__}: {e}") from None

    @property
    def sha256(self) -> str:
        return _digest(self._payload())


def _digest(payload: Mapping[str, Any]) -> str:
    return sha256_bytes(json.dumps(payload, sort_keys=True).encode("utf-8"))


def golden_sidecar_path(artifact: str | os.PathLike[str]) -> Path:
    p = Path(artifact)
    return p.with_name(p.name + GOLDEN_SUFFIX)


def write_golden_sidecar(artifact: str | os.PathLike[str], goldens: Goldens) -> Path:
    """Write ``<artifact>.golden.json`` atomically (for artifacts that cannot hold metadata: engines)."""
    from runtime.files import atomic_write_text

    return atomic_write_text(golden_sidecar_path(artifact), goldens.to_json() + "\n")


def read_goldens(artifact: str | os.PathLike[str], props: Mapping[str, str] | None = None) -> Goldens | None:
    """The artifact's golden references: ``<artifact>.golden.json`` if present, else the ONNX metadata entry
    (``props`` when the caller has them, else read from the file). ``None`` when it has none."""
    side = golden_sidecar_path(artifact)
    if side.is_file():
        return Goldens.from_json(side.read_text(encoding="utf-8"), str(side))
    if props is None:
        if Path(artifact).suffix.lower() != ".onnx":
            return None
        props = read_onnx_props(artifact)
    text = props.get(GOLDEN_KEY)
    return None if text is None else Goldens.from_json(text, f"{artifact} (metadata {GOLDEN_KEY!r})")


# ------------------------------------------------------------------------------------------------ the check
@dataclass
class CheckReport:
    """Outcome of running an artifact's golden references on this machine."""

    artifact: str
    backend: str
    precision: str
    n: int
    max_dlogit: float
    logit_scale: float
    top1_agreement: float
    max_dscore: float
    score_scale: float
    tolerance: Tolerance
    machine: str
    worst: str = ""
    rebuild: str = ""
    reference: str = ""

    @property
    def rel_dlogit(self) -> float:
        return self.max_dlogit / self.logit_scale

    @property
    def rel_dscore(self) -> float:
        return self.max_dscore / self.score_scale

    @property
    def failures(self) -> list[str]:
        t, out = self.tolerance, []
        if not (self.rel_dlogit <= t.max_dlogit):  # NaN fails
            out.append(f"max |Δlogit| {self.max_dlogit:.4g} is {self.rel_dlogit:.1%} of the logit scale "
                       f"{self.logit_scale:.3g} (limit {t.max_dlogit:.1%})")
        if not (self.top1_agreement >= t.min_agreement):
            out.append(f"top-1 agreement {self.top1_agreement:.1%} (limit {t.min_agreement:.0%})")
        if not (self.rel_dscore <= t.max_dscore):
            out.append(f"score deviation {self.max_dscore:.4g} is {self.rel_dscore:.1%} of the score scale "
                       f"{self.score_scale:.3g} (limit {t.max_dscore:.1%})")
        return out

    @property
    def ok(self) -> bool:
        return not self.failures

    def render(self) -> str:
        t = self.tolerance
        lines = [f"self-check {self.artifact} ({self.precision}) on {self.backend}",
                 f"  machine          {self.machine}",
                 f"  golden inputs    {self.n}" + (f" (reference {self.reference})" if self.reference else ""),
                 f"  max |Δlogit|     {self.max_dlogit:.4g} = {self.rel_dlogit:.2%} of scale {self.logit_scale:.3g}"
                 f"   (limit {t.max_dlogit:.1%})",
                 f"  top-1 agreement  {self.top1_agreement:.1%}   (limit {t.min_agreement:.0%})",
                 f"  score deviation  {self.max_dscore:.4g} = {self.rel_dscore:.2%} of scale {self.score_scale:.3g}"
                 f"   (limit {t.max_dscore:.1%})"]
        if self.worst:
            lines.append(f"  worst input      {self.worst}")
        lines.append("PASS" if self.ok else "FAIL: " + "; ".join(self.failures))
        if not self.ok and self.rebuild:
            lines.append(f"rebuild it on this machine: {self.rebuild}")
        return "\n".join(lines)

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d.update(ok=self.ok, failures=self.failures, rel_dlogit=self.rel_dlogit, rel_dscore=self.rel_dscore)
        return d


def run_goldens(backend: Backend, goldens: Goldens, output_name: str, score_output: str | None = None
                ) -> tuple[np.ndarray, np.ndarray | None]:
    """The backend's logits (and graph score output, if any) for the golden inputs, through the frame path:
    ``backend.input_buffer(n)`` filled in place, then ``backend.infer`` on it, in chunks of the backend's max batch."""
    x = goldens.inputs()
    size = int(backend.max_batch or len(x))
    logits, scores = [], []
    for start in range(0, len(x), size):
        chunk = x[start:start + size]
        buf = backend.input_buffer(len(chunk))
        buf[...] = chunk
        outs = backend.infer(buf)
        logits.append(np.asarray(outs[output_name], np.float32).reshape(len(chunk), -1))
        if score_output:
            scores.append(np.asarray(outs[score_output], np.float32).reshape(len(chunk), -1)[:, 0])
    return np.concatenate(logits), (np.concatenate(scores) if score_output else None)


def compare(goldens: Goldens, logits: np.ndarray, score: np.ndarray | None, precision: str, *, artifact: str = "",
            backend: str = "", rebuild: str = "", machine: str | None = None) -> CheckReport:
    """Compare outputs for the golden inputs with the references (see :class:`Tolerance` for the scales)."""
    from runtime.scores import logit_score

    ref = goldens.logits
    logits = np.asarray(logits, np.float32).reshape(ref.shape)
    if score is None:
        score = logit_score(goldens.score_name, logits, goldens.temperature)
    score = np.asarray(score, np.float32).reshape(-1)
    d = np.abs(logits.astype(np.float64) - ref)
    per_image = np.where(np.isfinite(d), d, np.inf).max(axis=1)
    worst = int(np.argmax(per_image))
    dscore = np.abs(score.astype(np.float64) - goldens.score)
    dscore = np.where(np.isfinite(dscore), dscore, np.inf)
    agree = float((logits.argmax(1) == ref.argmax(1)).mean()) if np.isfinite(logits).all() else 0.0
    name = goldens.sources[worst] if worst < len(goldens.sources) else f"#{worst}"
    cls = goldens.classes[worst] if worst < len(goldens.classes) else ""
    labels = goldens.labels or tuple(str(i) for i in range(ref.shape[1]))
    worst_txt = (f"{name}{' (' + cls + ')' if cls else ''}: |Δlogit| {per_image[worst]:.4g}, top-1 "
                 f"{labels[int(ref[worst].argmax())]} → "
                 f"{labels[int(logits[worst].argmax())] if np.isfinite(logits[worst]).all() else 'non-finite'}")
    ref_txt = ", ".join(str(goldens.reference[k]) for k in ("name", "precision") if goldens.reference.get(k))
    return CheckReport(artifact=artifact, backend=backend, precision=precision, n=len(goldens),
                       max_dlogit=float(per_image.max()), logit_scale=max(1.0, float(np.abs(ref).max())),
                       top1_agreement=agree, max_dscore=float(dscore.max()),
                       score_scale=max(1.0, float(np.abs(goldens.score).max())), tolerance=tolerance_for(precision),
                       machine=isa_summary() if machine is None else machine, worst=worst_txt,
                       rebuild=rebuild or goldens.build_command, reference=ref_txt)


def _backend_props(backend: Any) -> Mapping[str, str] | None:
    sess = getattr(backend, "session", None)
    if sess is None:
        return None
    try:
        return sess.get_modelmeta().custom_metadata_map
    except Exception:  # noqa: BLE001 - a backend without ORT metadata: fall back to reading the file
        return None


def _rebuild_command(clf: Any, goldens: Goldens) -> str:
    cmd = getattr(clf.backend, "_rebuild", "") or goldens.build_command
    if cmd:
        return cmd
    name = goldens.reference.get("name")
    src = Path(clf.model_path).parent / name if name else "<fp32 model>.onnx"
    if not str(clf.meta.precision).startswith(("int8", "fp16")):
        return f"re-export it: python -m export --checkpoint <checkpoint> --out {clf.model_path}"
    prec = "int8" if str(clf.meta.precision).startswith("int8") else "fp16"
    return f"python -m export.build_engine --onnx {src} --{prec}" + \
        (" --calib-data <training data>" if prec == "int8" else "")


def check_classifier(clf: Any) -> CheckReport | None:
    """Run the goldens of ``clf``'s artifact on ``clf``'s own backend; ``None`` when the artifact has none."""
    path = Path(getattr(clf.backend, "path", clf.model_path))
    goldens = read_goldens(path, _backend_props(clf.backend))
    if goldens is None and path != Path(clf.model_path):
        goldens = read_goldens(clf.model_path)  # an engine that fell back to its ONNX: the engine's own goldens
    if goldens is None:
        return None
    meta = clf.meta
    if goldens.logits.shape[1] != meta.num_classes:
        raise SelfCheckError(f"{clf.model_path}: its golden references have {goldens.logits.shape[1]} classes, the "
                             f"model {meta.num_classes}; they belong to another model", str(clf.model_path))
    with clf._lock:
        logits, score = run_goldens(clf.backend, goldens, meta.output_name,
                                    goldens.score_output if goldens.score_output == meta.score_output else None)
    return compare(goldens, logits, score, meta.precision, artifact=str(clf.model_path),
                   backend=clf.backend.describe(), rebuild=_rebuild_command(clf, goldens))


def wants_check(clf: Any) -> bool:
    """The automatic rule: INT8 models and TensorRT engines are checked when opened."""
    from runtime.trt_backend import is_engine

    return str(clf.meta.precision).lower().startswith("int8") or is_engine(clf.model_path)


_warned: set[str] = set()


def classifier_self_check(clf: Any, mode: bool | None) -> CheckReport | None:
    """What ``Classifier.__init__`` runs: ``mode`` None = automatic, True = always, False = never.

    Raises :class:`SelfCheckError` on FAIL, and when ``mode`` is True but the artifact has no goldens; in automatic
    mode an artifact without goldens warns once and runs unchecked.
    """
    if mode is False or (mode is None and not wants_check(clf)):
        return None
    report = check_classifier(clf)
    if report is None:
        msg = (f"{clf.model_path}: no golden references to self-check against (written by `python -m export`/"
               "`export.build_engine` since they exist; add them to an existing ONNX with "
               "`python -m export.golden --model MODEL --data DIR`)")
        if mode:
            raise SelfCheckError(msg, str(clf.model_path))
        if str(clf.model_path) not in _warned:
            _warned.add(str(clf.model_path))
            warnings.warn(msg + "; running it unchecked", RuntimeWarning, stacklevel=3)
        return None
    if not report.ok:
        raise SelfCheckError(
            f"{clf.model_path}: self-check FAILED on this machine ({report.backend}; {report.machine}): "
            f"{'; '.join(report.failures)}; worst input {report.worst}. Its results here cannot be trusted. "
            f"Rebuild it on this machine: {report.rebuild} (or pass self_check=False / --no-self-check to run it "
            "anyway)", str(clf.model_path), report, report.rebuild)
    return report


def self_check(model_path: str | os.PathLike[str], backend: str = "auto", **classifier_kwargs: Any) -> CheckReport:
    """Open ``model_path`` with ``backend`` and run its golden references; raises :class:`SelfCheckError` when the
    artifact has none (the report's ``ok`` says PASS/FAIL otherwise)."""
    from runtime.classifier import Classifier

    classifier_kwargs.setdefault("warmup", False)
    clf = Classifier(model_path, backend, self_check=False, **classifier_kwargs)
    try:
        report = check_classifier(clf)
    finally:
        clf.close()
    if report is None:
        raise SelfCheckError(f"{model_path}: no golden references to check (add them with `python -m export.golden "
                             "--model MODEL --data DIR`, or rebuild the artifact)", str(model_path))
    return report


# ------------------------------------------------------------------------------------------------ CLI
def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m runtime.check", description="Run a model artifact's stored golden references on this "
        "machine and say whether its outputs can be trusted here.",
        epilog=f"exit codes: {EXIT_PASS} PASS, {EXIT_FAIL} FAIL, {EXIT_ERROR} the model cannot be opened, "
               f"{EXIT_NO_GOLDENS} the artifact has no golden references",
        formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", help="ONNX model or TensorRT engine (default: the bundled model)")
    p.add_argument("--backend", default="auto", help="auto, ort, cpu, cuda or trt (default %(default)s)")
    p.add_argument("--threads", type=int, default=None, help="ONNX Runtime intra-op threads")
    p.add_argument("--json", action="store_true", help="print the report as JSON")
    return p


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    from runtime.classifier import resolve_model

    try:
        path = resolve_model(args.model)
        report = self_check(path, args.backend, threads=args.threads)
    except SelfCheckError as e:
        if e.report is None:
            print(f"error: {e}", file=sys.stderr)
            return EXIT_NO_GOLDENS
        print(f"error: {e}", file=sys.stderr)
        return EXIT_FAIL
    except (OSError, ValueError, RuntimeError) as e:
        print(f"error: {e}", file=sys.stderr)
        return EXIT_ERROR
    print(json.dumps(report.to_dict(), indent=2, default=_json_default) if args.json else report.render())
    return EXIT_PASS if report.ok else EXIT_FAIL


def _json_default(o: Any) -> Any:
    if isinstance(o, float) and not math.isfinite(o):
        return None
    return str(o)


if __name__ == "__main__":
    sys.exit(main())
