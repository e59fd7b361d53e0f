"""Every backend satisfies :class:`runtime.backend.Backend`, and ``open_backend`` returns one.

Two checks per backend class: ``isinstance`` against the runtime-checkable protocol on a real instance (every member
present), and each method's signature against the protocol's (a renamed parameter, a missing one or an extra one
without a default fails: ``isinstance`` alone cannot see arity). TensorRT runs on the fakes of ``tests/fake_gpu.py``;
the Triton backend is built over a stand-in client (its real-server run is ``test_remote_raw.py``).
"""

from __future__ import annotations

import inspect
import sys
import typing
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest

from runtime.backend import Backend
from runtime.classifier import open_backend
from runtime.contract import ModelMetadata
from runtime.ort_backend import OrtBackend
from runtime.triton_backend import TritonBackend
from runtime.trt_backend import TrtBackend

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from fake_gpu import FakeCudart, fake_tensorrt, install_cudart  # noqa: E402

#: The protocol's methods, read from the protocol itself so a method added there is checked everywhere.
METHODS = tuple(name for name, value in vars(Backend).items()
                if inspect.isfunction(value) and (not name.startswith("_") or name in ("__enter__", "__exit__")))
DATA = tuple(typing.get_type_hints(Backend))


def signature_problems(cls: type) -> list[str]:
    """How ``cls``'s methods differ from the protocol's: missing, or parameters the protocol's callers cannot pass."""
    problems = []
    for name in METHODS:
        impl = inspect.getattr_static(cls, name, None)
        if not inspect.isfunction(impl):
            problems.append(f"{cls.__name__}.{name}: missing")
            continue
        want = list(inspect.signature(getattr(Backend, name)).parameters.values())[1:]
        have = list(inspect.signature(impl).parameters.values())[1:]
        for w in want:
            match = next((h for h in have if h.name == w.name), None)
            if w.kind is inspect.Parameter.VAR_POSITIONAL:
                if not any(h.kind is inspect.Parameter.VAR_POSITIONAL for h in have):
                    problems.append(f"{cls.__name__}.{name}: takes no *{w.name}")
            elif match is None or match.kind is not w.kind:
                problems.append(f"{cls.__name__}.{name}: no parameter {w.name!r} ({w.kind.description})")
        extra = [h.name for h in have if h.name not in {w.name for w in want}
                 and h.default is inspect.Parameter.empty
                 and h.kind not in (inspect.Parameter.VAR_POSITIONAL, inspect.Parameter.VAR_KEYWORD)]
        if extra:
            problems.append(f"{cls.__name__}.{name}: required parameter(s) {extra} the protocol does not pass")
    return problems


def check_backend(backend: object, cls: type) -> None:
    assert type(backend) is cls
    assert isinstance(backend, Backend), [m for m in (*METHODS, *DATA) if not hasattr(backend, m)]
    assert signature_problems(cls) == []
    assert isinstance(backend.meta, ModelMetadata)
    assert backend.max_batch is None or (isinstance(backend.max_batch, int) and backend.max_batch >= 1)
    assert isinstance(backend.describe(), str) and backend.describe()


def run_once(backend: Backend) -> None:
    """The classifier's own sequence: stage into the input buffer, infer on it, read the named output."""
    buf = backend.input_buffer(2)
    assert buf.dtype == np.float32 and buf.shape[0] == 2
    buf[:] = 0.5
    outs = backend.infer(buf)
    assert outs[backend.meta.output_name].shape[0] == 2


def test_the_protocol_names_what_the_classifier_calls() -> None:
    assert set(METHODS) == {"input_buffer", "infer", "describe", "close", "__enter__", "__exit__"}
    assert set(DATA) == {"meta", "max_batch"}
    assert typing.get_type_hints(open_backend)["return"] is Backend


def test_onnxruntime_backend(tiny_model: Path) -> None:
    backend = open_backend(tiny_model, "ort", threads=1)
    check_backend(backend, OrtBackend)
    with backend as same:
        assert same is backend
        run_once(backend)
    assert backend.session is None  # the with block closed it
    backend.close()  # twice is harmless


@pytest.fixture
def fake_engine(tmp_path: Path, tiny_model: Path, meta_factory, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A tiny engine built on fake TensorRT 10.3, which then also runs it (on a fake CUDA device)."""
    from export.tensorrt_build import build_serialized_engine
    from runtime.contract import write_sidecar

    cudart = install_cudart(monkeypatch, FakeCudart())
    trt = fake_tensorrt("10.3.0.30", cudart)
    monkeypatch.setitem(sys.modules, "tensorrt", trt)
    profile = {"input": "images", "min": [1, 3, 32, 32], "opt": [4, 3, 32, 32], "max": [4, 3, 32, 32]}
    engine = tmp_path / "tiny.engine"
    engine.write_bytes(build_serialized_engine(trt, tiny_model, profile, 1 << 28, tmp_path / "timing.cache"))
    write_sidecar(engine, meta_factory(), {"tensorrt_version": trt.__version__, "gpu_name": "Orin",
                                           "compute_capability": "8.7", "precision": "fp32", "onnx": str(tiny_model)})
    return engine


def test_tensorrt_backend_on_fakes(fake_engine: Path) -> None:
    backend = open_backend(fake_engine, "trt")
    check_backend(backend, TrtBackend)
    assert backend.max_batch == 4
    with backend:
        run_once(backend)
    with pytest.raises(RuntimeError, match="closed"):
        backend.input_buffer(1)
    backend.close()


def test_triton_backend_over_a_stand_in_client(meta_factory) -> None:
    meta = meta_factory()
    remote = SimpleNamespace(meta=meta, max_batch=8, address="127.0.0.1:8001", model_name="sem_classifier")
    backend = TritonBackend(remote, {"input": meta.input_name, "outputs": (meta.output_name,), "batched": True})
    check_backend(backend, TritonBackend)
    assert backend.max_batch == 8 and backend.input_buffer(3).shape == (3, meta.channels, *meta.input_size)
    with backend:
        pass


def test_an_engine_without_tensorrt_opens_its_onnx_fallback(tmp_path: Path, tiny_model: Path, meta_factory,
                                                           monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "tensorrt", None)  # TensorRT not installed
    engine = tmp_path / "tiny.engine"
    engine.write_bytes(b"not used")
    (tmp_path / "tiny.onnx").write_bytes(tiny_model.read_bytes())  # the engine's ONNX, found by its name
    with pytest.warns(RuntimeWarning, match="ONNX Runtime instead"):
        backend = open_backend(engine, "auto", threads=1)
    check_backend(backend, OrtBackend)
    backend.close()


@pytest.mark.parametrize("breakage", ["rename", "arity", "parameter"])
def test_the_signature_check_catches_a_broken_backend(breakage: str) -> None:
    """The check itself can fail: a backend with ``infer`` renamed, given a required extra argument, or with its
    batch parameter renamed is reported."""
    attrs = {name: getattr(OrtBackend, name) for name in METHODS}
    if breakage == "rename":
        attrs["run"] = attrs.pop("infer")
    elif breakage == "arity":
        attrs["infer"] = lambda self, batch, stream: {}
    else:
        attrs["infer"] = lambda self, images: {}
    broken = type("Broken", (), attrs)
    assert signature_problems(broken) and "infer" in signature_problems(broken)[0]
    if breakage == "rename":
        assert not isinstance(broken(), Backend)
