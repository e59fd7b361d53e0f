"""ONNX Runtime backend: session options for one latency-bound stream, provider choice, metadata checks."""

from __future__ import annotations

import numpy as np
import onnxruntime as ort
import pytest

from runtime.errors import BackendUnavailable
from runtime.ort_backend import CPU, CUDA, OrtBackend, choose_providers, physical_cores, session_options

HYPERTHREADED = "".join(
    f"processor\t: {i}\nphysical id\t: 0\ncore id\t\t: {i % 4}\nsiblings\t: 8\n\n" for i in range(8))


def test_physical_cores_ignores_hyperthreads_and_respects_affinity():
    assert physical_cores(HYPERTHREADED, allowed_cpus=8) == 4
    assert physical_cores(HYPERTHREADED, allowed_cpus=2) == 2  # a container limited to 2 CPUs
    assert physical_cores("", allowed_cpus=3) == 3  # no topology info: logical count
    two_sockets = "".join(f"physical id\t: {i // 2}\ncore id\t\t: {i % 2}\n\n" for i in range(4))
    assert physical_cores(two_sockets, allowed_cpus=64) == 4


def test_session_options_are_tuned_for_one_stream():
    so = session_options()
    assert so.intra_op_num_threads == physical_cores() and so.inter_op_num_threads == 1
    assert so.execution_mode == ort.ExecutionMode.ORT_SEQUENTIAL
    assert so.graph_optimization_level == ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    assert session_options(threads=3).intra_op_num_threads == 3
    assert session_options(spin=False).get_session_config_entry("session.intra_op.allow_spinning") == "0"


def test_provider_choice():
    assert choose_providers(None, [CPU]) == [CPU]
    assert choose_providers("auto", [CUDA, CPU]) == [CUDA, CPU]
    assert choose_providers("cpu", [CUDA, CPU]) == [CPU]
    with pytest.raises(BackendUnavailable, match="onnxruntime-gpu"):
        choose_providers("cuda", [CPU])
    with pytest.raises(BackendUnavailable, match="not available"):
        choose_providers(["TensorrtExecutionProvider"], [CPU])


def test_backend_reads_metadata_and_runs(tiny_model):
    b = OrtBackend(tiny_model, threads=1)
    assert b.meta.input_size == (32, 32) and b.input_name == "images" and b.output_names == ("logits",)
    assert b.name == "onnxruntime-cpu" and b.max_batch is None and "CPUExecutionProvider" in b.describe()
    buf = b.input_buffer(4)
    buf[:] = 0
    assert b.infer(buf)["logits"].shape == (4, 8)
    assert b.input_buffer(2).ctypes.data == buf.ctypes.data  # one buffer, sliced per batch size


def test_io_binding_gives_the_same_outputs(tiny_model):
    x = np.random.default_rng(0).standard_normal((3, 3, 32, 32)).astype(np.float32)
    plain = OrtBackend(tiny_model, threads=1).infer(x)["logits"]
    bound = OrtBackend(tiny_model, threads=1, io_binding=True)
    assert bound.io_binding
    first = bound.infer(x)["logits"]
    second = bound.infer(x * 2)["logits"]  # results are copies, not views of the bound buffers
    np.testing.assert_allclose(first, plain, atol=1e-6)
    assert not np.allclose(first, second)
