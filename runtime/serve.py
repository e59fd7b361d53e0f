"""``python -m runtime.serve --model MODEL``: the whole classifier behind NVIDIA Triton Inference Server (PyTriton).

Stations send encoded images (or arrays) and get decisions back: preprocessing, the model, calibration and the
rejection rule all run here, from the model's own metadata, so every station answers exactly as the model was
trained. Triton batches requests across clients (dynamic batching), runs ``--instances`` copies of the model, serves
health/readiness on HTTP and gRPC and Prometheus metrics, and drains in-flight requests on SIGTERM or Ctrl-C.
A malformed image fails its own item with the local runtime's message; the other items are answered.

Needs the ``serve`` extra (``pip install '.[serve]'``, which brings PyTriton and its own Triton binary). Triton's
Python-backend stub loads the interpreter's shared libpython: this command puts that library's folder on
``LD_LIBRARY_PATH`` and restarts itself, or says what is missing. The wire contract is in :mod:`runtime.remote`.

Security: it binds to 127.0.0.1 unless ``--host`` says otherwise; Triton has no authentication of its own, so
expose it only behind a proxy that terminates TLS and checks clients (see docs/serving.md).
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import signal
import sys
import sysconfig
import threading
import time
from pathlib import Path
from typing import Any

import numpy as np

from runtime.errors import InputError
from runtime.remote import (
    DEFAULT_MODEL_NAME,
    INPUT_IMAGE,
    INPUT_SOURCE,
    NPY_MAGIC,
    OUTPUTS,
    decode_npy,
    model_fingerprint,
)

log = logging.getLogger("runtime.serve")

#: Largest encoded image (or .npy array) one item may be; larger ones are refused before decoding.
DEFAULT_MAX_IMAGE_BYTES = 64 << 20
#: Exit codes for a supervisor.
EXIT_OK, EXIT_USAGE, EXIT_MODEL, EXIT_ENV = 0, 2, 3, 4
_REEXEC_FLAG = "SEM_SERVE_REEXEC"


# --------------------------------------------------------------------------------------------- libpython
def libpython_dir() -> tuple[Path | None, str]:
    """The folder holding this interpreter's shared libpython, or (None, why not)."""
    if not sysconfig.get_config_var("Py_ENABLE_SHARED"):
        return None, (f"{sys.executable} was built without a shared libpython (Py_ENABLE_SHARED=0); Triton's "
                      "Python backend needs one: use a Python built with --enable-shared (pyenv: "
                      "PYTHON_CONFIGURE_OPTS=--enable-shared, or Debian/Ubuntu's python3) for the serve venv")
    libdir = sysconfig.get_config_var("LIBDIR")
    name = sysconfig.get_config_var("LDLIBRARY") or f"libpython{sys.version_info[0]}.{sys.version_info[1]}.so"
    if not libdir or not (Path(libdir) / name).exists():
        return None, f"{sys.executable}: shared libpython {name} not found in LIBDIR={libdir!r}"
    return Path(libdir), ""


def ensure_libpython(argv: list[str]) -> None:
    """Put libpython's folder on ``LD_LIBRARY_PATH`` (read by the loader only at start: so re-exec), or exit 4."""
    libdir, why = libpython_dir()
    if libdir is None:
        sys.exit(f"runtime.serve: {why}")
    paths = [p for p in os.environ.get("LD_LIBRARY_PATH", "").split(":") if p]
    if str(libdir) in paths:
        return
    if os.environ.get(_REEXEC_FLAG):
        print(f"runtime.serve: LD_LIBRARY_PATH still lacks {libdir} after restarting; set it yourself: "
              f"LD_LIBRARY_PATH={libdir}:$LD_LIBRARY_PATH", file=sys.stderr)
        sys.exit(EXIT_ENV)
    env = dict(os.environ, LD_LIBRARY_PATH=":".join([str(libdir), *paths]), **{_REEXEC_FLAG: "1"})
    os.execve(sys.executable, [sys.executable, "-m", "runtime.serve", *argv], env)


# --------------------------------------------------------------------------------------------- the model side
def _size(n: int) -> str:
    return f"{n / 2**20:.1f} MiB" if n >= 1 << 20 else f"{n / 1024:.0f} KiB"


class Handler:
    """One model instance: a ``Classifier`` plus the per-item decoding and limits; called by PyTriton per batch."""

    def __init__(self, model: Path, backend: str, threads: int | None, max_image_bytes: int, fingerprint: str,
                 max_batch: int) -> None:
        from runtime.classifier import Classifier
        from runtime.preprocess import MAX_PIXELS

        self.clf = Classifier(model, backend, threads=threads, batch_size=max_batch, spin=False)
        self.max_image_bytes = max_image_bytes
        self.max_pixels = MAX_PIXELS
        self.fingerprint = fingerprint.encode()
        self.metadata = self.clf.meta.to_json().encode()
        self.classes = len(self.clf.labels)

    def _item(self, data: bytes, name: str) -> Any:
        """Wire bytes → what ``Classifier.predict_batch`` takes; limits checked before any decoding."""
        if len(data) > self.max_image_bytes:
            raise InputError(f"{name}: image is {_size(len(data))}, over this server's "
                             f"{_size(self.max_image_bytes)} limit (--max-image-bytes)")
        if data.startswith(NPY_MAGIC):
            return decode_npy(data, name, self.max_pixels)
        return data

    def __call__(self, requests: list[Any]) -> list[dict[str, np.ndarray]]:
        items: list[Any] = []
        names: list[str] = []
        errors: dict[int, str] = {}
        counts = []
        for req in requests:
            imgs = np.asarray(req[INPUT_IMAGE]).reshape(-1)
            srcs = req.data.get(INPUT_SOURCE)
            srcs = np.asarray(srcs).reshape(-1) if srcs is not None else None
            counts.append(len(imgs))
            for k, raw in enumerate(imgs):
                data = bytes(raw)
                name = f"<{len(data)} bytes>"
                if srcs is not None and k < len(srcs):
                    name = bytes(srcs[k]).decode(errors="replace") or name
                names.append(name)
                try:
                    items.append(self._item(data, name))
                except InputError as e:
                    errors[len(items)] = str(e)
                    items.append(None)
        good = [i for i in range(len(items)) if i not in errors]
        preds = self.clf.predict_batch([items[i] for i in good], on_error="keep", sources=[names[i] for i in good])
        results: list[Any] = [None] * len(items)
        for i, p in zip(good, preds):
            results[i] = p
        for i, msg in errors.items():
            results[i] = InputError(msg)
        responses = []
        start = 0
        for n in counts:
            responses.append(self._pack(results[start:start + n]))
            start += n
        return responses

    def _pack(self, results: list[Any]) -> dict[str, np.ndarray]:
        n, c = len(results), self.classes
        out: dict[str, np.ndarray] = {}
        for name, dtype, shape in OUTPUTS:
            width = c if shape == (-1,) else shape[0]
            out[name] = (np.full((n, width), b"", np.object_) if dtype is np.object_
                         else np.zeros((n, width), dtype))
        out["fingerprint"][:] = self.fingerprint
        out["metadata"][:] = self.metadata
        out["score"][:] = np.nan
        for k, r in enumerate(results):
            if isinstance(r, Exception):
                out["error"][k, 0] = str(r).encode()
                out["index"][k] = out["top_index"][k] = -1
                out["rejected"][k] = True
                continue
            out["label"][k, 0] = r.label.encode()
            out["index"][k] = r.index
            out["top_label"][k, 0] = r.top_label.encode()
            out["top_index"][k] = r.top_index
            out["confidence"][k] = r.confidence
            out["score"][k] = r.score
            out["rejected"][k] = r.rejected
            out["reason"][k, 0] = getattr(r, "reason", "").encode()
            out["probs"][k] = r.probs
            out["logits"][k] = r.logits
        return out


# --------------------------------------------------------------------------------------------- the server
def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="python -m runtime.serve", description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    ap.add_argument("--model", required=True, help="ONNX model or TensorRT engine (its metadata travels with it)")
    ap.add_argument("--name", default=DEFAULT_MODEL_NAME, help="model name clients ask for")
    ap.add_argument("--host", default="127.0.0.1",
                    help="address to bind; 0.0.0.0 exposes an unauthenticated server to the network")
    ap.add_argument("--http-port", type=int, default=8000)
    ap.add_argument("--grpc-port", type=int, default=8001)
    ap.add_argument("--metrics-port", type=int, default=8002)
    ap.add_argument("--max-batch", type=int, default=16, help="largest batch Triton assembles for one instance")
    ap.add_argument("--max-queue-delay-us", type=int, default=2000,
                    help="how long Triton may hold a request to fill a batch")
    ap.add_argument("--instances", type=int, default=1, help="model copies answering in parallel")
    ap.add_argument("--threads", type=int, default=None,
                    help="ONNX Runtime threads per instance (default: physical cores / instances)")
    ap.add_argument("--backend", default="auto", choices=("auto", "ort", "trt"))
    ap.add_argument("--max-image-bytes", type=int, default=DEFAULT_MAX_IMAGE_BYTES,
                    help="refuse larger encoded images before decoding")
    ap.add_argument("--drain-timeout", type=int, default=30,
                    help="seconds in-flight requests get to finish on SIGTERM/Ctrl-C")
    ap.add_argument("--log-level", default="INFO")
    return ap


def serve(args: argparse.Namespace) -> int:
    from pytriton.model_config import DynamicBatcher, ModelConfig, Tensor
    from pytriton.triton import Triton, TritonConfig

    from runtime.ort_backend import physical_cores

    model = Path(args.model).expanduser()
    if not model.is_file():
        print(f"runtime.serve: {model}: model file not found", file=sys.stderr)
        return EXIT_MODEL
    t0 = time.monotonic()
    fingerprint = model_fingerprint(model)
    instances = max(1, args.instances)
    threads = args.threads or max(1, physical_cores() // instances)
    backend = {"trt": "trt", "ort": "ort"}.get(args.backend, "auto")
    try:
        handlers = [Handler(model, backend, threads, args.max_image_bytes, fingerprint, args.max_batch)
                    for _ in range(instances)]
    except (ValueError, OSError, RuntimeError) as e:
        print(f"runtime.serve: cannot load {model}: {e}", file=sys.stderr)
        return EXIT_MODEL
    classes = handlers[0].classes
    inputs = [Tensor(name=INPUT_IMAGE, dtype=np.object_, shape=(1,)),
              Tensor(name=INPUT_SOURCE, dtype=np.object_, shape=(1,), optional=True)]
    outputs = [Tensor(name=name, dtype=dtype, shape=(classes,) if shape == (-1,) else shape)
               for name, dtype, shape in OUTPUTS]
    config = TritonConfig(http_address=args.host, http_port=args.http_port, grpc_address=args.host,
                          grpc_port=args.grpc_port, metrics_port=args.metrics_port,
                          metrics_address=args.host, exit_timeout_secs=args.drain_timeout,
                          log_verbose=0)
    # PyTriton echoes tritonserver's log with print(), in chunks that need not end lines: stdout is kept for this
    # command's own JSON event lines (what a supervisor parses), everything else goes to stderr.
    events = os.fdopen(os.dup(sys.stdout.fileno()), "w", buffering=1)
    sys.stdout = sys.stderr
    triton = Triton(config=config)
    stopping = threading.Event()

    def on_signal(signum: int, _frame: Any) -> None:
        if not stopping.is_set():
            stopping.set()
            log.info("%s: draining in-flight requests (up to %d s), then stopping",
                     signal.Signals(signum).name, args.drain_timeout)
            raise KeyboardInterrupt  # serve()'s wait loop turns this into an orderly stop

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)
    try:
        triton.bind(model_name=args.name, infer_func=handlers, inputs=inputs, outputs=outputs,
                    config=ModelConfig(max_batch_size=args.max_batch,
                                       batcher=DynamicBatcher(max_queue_delay_microseconds=args.max_queue_delay_us)),
                    strict=False)
        triton.run()
        ready = {"event": "ready", "model": str(model), "name": args.name, "fingerprint": fingerprint,
                 "grpc": f"{args.host}:{args.grpc_port}", "http": f"{args.host}:{args.http_port}",
                 "metrics": f"{args.host}:{args.metrics_port}", "instances": instances, "threads": threads,
                 "startup_s": round(time.monotonic() - t0, 2), "model_describe": handlers[0].clf.describe()}
        print(json.dumps(ready), file=events, flush=True)
        triton.serve()
    except KeyboardInterrupt:
        pass
    finally:
        triton.stop()
        print(json.dumps({"event": "stopped", "name": args.name}), file=events, flush=True)
    return EXIT_OK


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=args.log_level.upper(), format="%(asctime)s %(name)s %(levelname)s %(message)s")
    try:
        import pytriton  # noqa: F401
    except ImportError:
        print("runtime.serve: PyTriton is not installed here; install the serving extra in its own environment: "
              "pip install 'sem-defect-classifier[serve]' (it pins numpy<2)", file=sys.stderr)
        return EXIT_ENV
    ensure_libpython(argv)
    return serve(args)


if __name__ == "__main__":
    sys.exit(main())
