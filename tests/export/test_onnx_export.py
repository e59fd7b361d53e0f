"""ONNX export: metadata inside, dynamic batch, extra outputs, parity failure is loud, FP16 conversion agrees."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
from tiny_models import TinyEffNet, learned_tiny, pattern_batch, tiny_meta, trained_tiny, write_dataset

from export.onnx_export import ParityError, export_onnx, parity_check, parity_inputs, write_fp16_onnx
from runtime.contract import METADATA_KEY, ModelMetadata


@pytest.fixture(scope="module")
def exported(tmp_path_factory: pytest.TempPathFactory) -> tuple[torch.nn.Module, Path]:
    model = trained_tiny()
    return model, export_onnx(model, tiny_meta(), tmp_path_factory.mktemp("x") / "m.onnx")


def test_metadata_names_and_dynamic_batch(exported: tuple[torch.nn.Module, Path]) -> None:
    _, path = exported
    m = onnx.load(str(path))
    props = {p.key: p.value for p in m.metadata_props}
    assert ModelMetadata.from_props(props) == tiny_meta()
    assert METADATA_KEY in props and m.producer_name and m.producer_version
    sess = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    assert [i.name for i in sess.get_inputs()] == ["images"] and [o.name for o in sess.get_outputs()] == ["logits"]
    for n in (1, 5):
        assert sess.run(None, {"images": np.zeros((n, 3, 32, 32), np.float32)})[0].shape == (n, 8)


def test_parity_on_real_folder_and_loud_failure(exported: tuple[torch.nn.Module, Path], tmp_path: Path) -> None:
    model, path = exported
    data = write_dataset(tmp_path / "d", per_class=2, size=48)
    x, source = parity_inputs(tiny_meta(), [tmp_path / "missing", data], n=6)
    assert x.shape == (6, 3, 32, 32) and source.endswith("val")
    res = parity_check(model, path, x, source)
    assert res.max_abs_diff < 1e-4 and res.top1_agreement == 1.0
    other = TinyEffNet()  # different weights: the export no longer matches this "PyTorch model"
    with pytest.raises(ParityError, match="disagrees with PyTorch"):
        parity_check(other.eval(), path, x, source)
    xg, src = parity_inputs(tiny_meta(), [], n=3)
    assert src == "generated images" and xg.shape == (3, 3, 32, 32)


class _WithScore(torch.nn.Module):
    def __init__(self, net: torch.nn.Module) -> None:
        super().__init__()
        self.net = net

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        logits = self.net(x)
        return logits, -torch.logsumexp(logits, 1)


def test_wrapper_with_extra_output(tmp_path: Path) -> None:
    meta = tiny_meta().with_updates(score="knn", score_output="ood_score")
    wrapper = _WithScore(trained_tiny())
    path = export_onnx(wrapper, meta, tmp_path / "w.onnx")
    sess = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    assert [o.name for o in sess.get_outputs()] == ["logits", "ood_score"]
    x = np.random.default_rng(0).normal(size=(2, 3, 32, 32)).astype(np.float32)
    assert parity_check(wrapper, path, x).per_output.keys() == {"logits", "ood_score"}
    with pytest.raises(ValueError, match="must include"):
        export_onnx(wrapper, meta, tmp_path / "v.onnx", output_names=["a", "b"])


#: FP16 vs FP32 max |Δlogit| on the learned tiny network (logits about ±11): measured 0.0097; a model that ignored its
#: input would be off by 12. Bound: about 5x the measured error.
FP16_BOUND = 0.05


def test_fp16_conversion_runs_and_agrees(tmp_path: Path) -> None:
    path = export_onnx(learned_tiny(), tiny_meta(), tmp_path / "m.onnx")
    out = write_fp16_onnx(path, tmp_path / "m.fp16.onnx", tiny_meta().with_updates(precision="fp16"))
    m = onnx.load(str(out))
    assert any(i.data_type == onnx.TensorProto.FLOAT16 for i in m.graph.initializer)
    assert not any(i.data_type == onnx.TensorProto.FLOAT for i in m.graph.initializer)
    x, _ = pattern_batch(48, seed=2)
    a = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"]).run(None, {"images": x})[0]
    b = ort.InferenceSession(str(out), providers=["CPUExecutionProvider"]).run(None, {"images": x})[0]
    assert b.dtype == np.float32
    assert np.abs(a - b).max() < FP16_BOUND and (a.argmax(1) == b.argmax(1)).all()
    assert np.abs(a - a.mean(0)).max() > 20 * FP16_BOUND  # the bound is far below ignoring the input
    assert ModelMetadata.from_props({p.key: p.value for p in m.metadata_props}).precision == "fp16"
