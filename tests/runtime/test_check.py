"""On-target self-check: golden references travel with an artifact, and a backend that drifts from them is refused.

Engines are checked through the real :class:`runtime.trt_backend.TrtBackend` on the fake TensorRT/CUDA of
``test_trt_backend_fake`` (the code path a real engine runs: pinned input buffer, profile-sized chunks, fp16
staging); ONNX models through ONNX Runtime on the tiny GAP→Gemm model of ``conftest``.
"""

from __future__ import annotations

import json
import warnings
from pathlib import Path

import numpy as np
import onnx
import pytest
import test_trt_backend_fake as fake
from test_trt_backend_fake import gpu, make_engine  # noqa: F401 - fixtures

from runtime.check import (
    EXIT_FAIL,
    EXIT_NO_GOLDENS,
    EXIT_PASS,
    GOLDEN_KEY,
    Goldens,
    compare,
    cpu_info,
    golden_sidecar_path,
    main,
    read_goldens,
    self_check,
    tolerance_for,
    write_golden_sidecar,
)
from runtime.classifier import Classifier
from runtime.errors import MetadataError, SelfCheckError
from runtime.scores import logit_score


def _goldens(logits_fn, meta, n: int = 8, seed: int = 0, **kw) -> Goldens:
    """Goldens whose references are ``logits_fn(inputs)`` on ``n`` images of varied brightness and texture."""
    h, w = meta.input_size
    rng = np.random.default_rng(seed)
    base = np.linspace(10, 245, n)[:, None, None] + rng.normal(0, 12, (n, h, w))
    grey = np.clip(base, 0, 255).astype(np.uint8)
    std, mean = np.asarray(meta.std), np.asarray(meta.mean)
    scale, offset = (1 / (255 * std)).astype(np.float32), (-mean / std).astype(np.float32)
    g = Goldens(grey=grey, scale=scale, offset=offset, logits=np.zeros((n, meta.num_classes)), score=np.zeros(n),
                score_name=meta.score, temperature=meta.temperature, labels=meta.labels,
                sources=tuple(f"img{i}.png" for i in range(n)), reference={"name": "ref.onnx", "precision": "fp32"},
                build_command=kw.pop("build_command", ""))
    g.logits = np.asarray(logits_fn(g.inputs()), np.float32)
    g.score = logit_score(meta.score, g.logits, meta.temperature)
    return g


# ------------------------------------------------------------------------------------------------ the document
def test_goldens_round_trip_and_refuse_tampering(meta_factory):
    meta = meta_factory()
    g = _goldens(lambda x: x.mean(axis=(2, 3)) @ np.ones((3, 8)), meta)
    back = Goldens.from_json(g.to_json())
    np.testing.assert_array_equal(back.inputs(), g.inputs())
    np.testing.assert_array_equal(back.logits, g.logits)
    assert back.sha256 == g.sha256 and back.labels == meta.labels
    doc = json.loads(g.to_json())
    doc["logits"][0][0] += 0.5
    with pytest.raises(MetadataError, match="corrupt"):
        Goldens.from_json(json.dumps(doc))
    with pytest.raises(MetadataError, match="format"):
        Goldens.from_json(json.dumps({"format": "x"}))


def test_inputs_apply_the_stored_affine_per_channel(meta_factory):
    meta = meta_factory(mean=(0.1, 0.5, 0.9), std=(0.2, 0.25, 0.3))
    g = _goldens(lambda x: np.zeros((len(x), 8)), meta, n=2)
    x = g.inputs()
    want = (g.grey[:, None].astype(np.float64) / 255 - np.array(meta.mean)[None, :, None, None]) \
        / np.array(meta.std)[None, :, None, None]
    assert x.dtype == np.float32 and x.shape == (2, 3, *meta.input_size)
    np.testing.assert_allclose(x, want, atol=1e-5)


def test_compare_flags_each_kind_of_drift(meta_factory):
    meta = meta_factory(score="energy")
    g = _goldens(lambda x: np.stack([x.mean(axis=(1, 2, 3)) * k for k in range(1, 9)], 1), meta)
    exact = compare(g, g.logits.copy(), None, "int8")
    assert exact.ok and exact.max_dlogit == 0 and exact.top1_agreement == 1
    scale = np.abs(g.logits).max()
    small = compare(g, g.logits + 0.5 * tolerance_for("int8").max_dlogit * scale, None, "int8")
    assert small.ok
    big = compare(g, g.logits + 2 * tolerance_for("int8").max_dlogit * scale, None, "int8")
    assert not big.ok and "max |Δlogit|" in big.render() and "FAIL" in big.render()
    # A flipped decision fails even when the logits barely move, and FP32 is held to a much tighter bound.
    flipped = g.logits.copy()
    i = int(np.argmax(np.abs(flipped).max(1)))
    top = flipped[i].argmax()
    flipped[i, top] -= 1e-3
    flipped[i, (top + 1) % 8] = flipped[i, top] + 1e-3
    r = compare(g, flipped, None, "fp16")
    assert not r.ok and any("agreement" in f for f in r.failures)
    assert not compare(g, g.logits * 1.01, None, "fp32").ok and compare(g, g.logits * 1.01, None, "int8").ok
    nan = g.logits.copy()
    nan[0, 0] = np.nan
    assert not compare(g, nan, None, "int8").ok


def test_cpu_info_reads_the_isa_flags():
    info = cpu_info("processor : 0\nmodel name : Xeon X\nflags : fpu avx2 fma avx512f avx512_vnni amx_int8\n")
    assert info["cpu"] == "Xeon X" and info["isa"] == ["avx2", "fma", "avx512f", "avx512_vnni", "amx_int8"]


# ------------------------------------------------------------------------------------------------ engines
def _engine_with_goldens(make_engine, meta_factory, **engine_kw) -> tuple[Path, Goldens]:  # noqa: F811
    path = make_engine(**engine_kw)
    sidecar = json.loads(Path(str(path) + ".json").read_text())
    sidecar["build_command"] = "python -m export.build_engine --onnx m.onnx --int8 --calib-data data/"
    Path(str(path) + ".json").write_text(json.dumps(sidecar))
    g = _goldens(lambda x: fake.reference(x), meta_factory(input_size=(fake.H, fake.W)), n=11)
    write_golden_sidecar(path, g)
    return path, g


@pytest.mark.parametrize("dtype", ["FLOAT", "HALF"])
def test_an_engine_checks_itself_when_opened(gpu, make_engine, meta_factory, dtype):  # noqa: F811
    path, g = _engine_with_goldens(make_engine, meta_factory, dtype=dtype)
    clf = Classifier(path, backend="trt", warmup=False)
    rep = clf.self_check_report
    assert rep is not None and rep.ok and rep.n == 11 and rep.top1_agreement == 1.0
    assert rep.max_dlogit < (1e-6 if dtype == "FLOAT" else 0.05)
    # The goldens ran through the engine itself, in profile-sized chunks (max batch 4): 4 + 4 + 3.
    assert gpu.runs[:3] == [4, 4, 3]
    assert golden_sidecar_path(path).name == path.name + ".golden.json"


def test_an_engine_that_drifts_is_refused_with_how_far_and_the_rebuild_command(  # noqa: F811
        gpu, make_engine, meta_factory, monkeypatch):  # noqa: F811
    path, g = _engine_with_goldens(make_engine, meta_factory)
    rng = np.random.default_rng(3)
    monkeypatch.setattr(fake, "WEIGHTS", fake.WEIGHTS * (1 + 0.3 * rng.standard_normal(fake.WEIGHTS.shape)))
    with pytest.raises(SelfCheckError) as e:
        Classifier(path, backend="trt", warmup=False)
    msg = str(e.value)
    assert str(path) in msg and "FAILED" in msg and "max |Δlogit|" in msg
    assert "python -m export.build_engine --onnx m.onnx --int8" in msg and e.value.report is not None
    assert not e.value.report.ok and e.value.artifact == str(path)
    assert gpu.released_once(fake.PinnedBuffer) > 0  # the refused engine's buffers were freed
    # The user's explicit override runs it anyway.
    clf = Classifier(path, backend="trt", warmup=False, self_check=False)
    assert clf.self_check_report is None


def test_an_engine_without_goldens_warns_once_or_fails_on_request(gpu, make_engine, meta_factory):  # noqa: F811
    path = make_engine()
    with pytest.warns(RuntimeWarning, match="no golden references"):
        Classifier(path, backend="trt", warmup=False)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        Classifier(path, backend="trt", warmup=False)  # once per artifact
    with pytest.raises(SelfCheckError, match="no golden references"):
        Classifier(path, backend="trt", warmup=False, self_check=True)


# ------------------------------------------------------------------------------------------------ ONNX + CLI
def _tiny_with_goldens(make_model, meta_factory, name: str, precision: str = "int8", slopes_scale: float = 1.0,
                       **kw) -> Path:
    import onnxruntime as ort

    meta = meta_factory(precision=precision, **kw)
    path = make_model(name, meta=meta)
    sess = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    g = _goldens(lambda x: sess.run(["logits"], {"images": x})[0], meta, build_command="rebuild-me")
    model = onnx.load(str(path))
    model.metadata_props.append(onnx.StringStringEntryProto(key=GOLDEN_KEY, value=g.to_json()))
    if slopes_scale != 1.0:  # a "miscompiled" copy: the graph no longer computes what the goldens recorded
        w = next(i for i in model.graph.initializer if i.name == "W")
        w.CopyFrom(onnx.numpy_helper.from_array(onnx.numpy_helper.to_array(w) * slopes_scale, "W"))
    onnx.save(model, str(path))
    return path


def test_onnx_goldens_live_in_metadata_and_the_cli_exit_codes(make_model, meta_factory, capsys):
    good = _tiny_with_goldens(make_model, meta_factory, "good.onnx")
    assert read_goldens(good) is not None and not golden_sidecar_path(good).exists()
    assert main(["--model", str(good), "--backend", "cpu", "--threads", "1"]) == EXIT_PASS
    out = capsys.readouterr().out
    assert "PASS" in out and "top-1 agreement  100.0%" in out and "machine" in out
    bad = _tiny_with_goldens(make_model, meta_factory, "bad.onnx", slopes_scale=0.7)
    assert main(["--model", str(bad), "--backend", "cpu", "--threads", "1"]) == EXIT_FAIL
    out = capsys.readouterr().out
    assert "FAIL" in out and "rebuild-me" in out
    bare = make_model("bare.onnx")
    assert main(["--model", str(bare), "--backend", "cpu"]) == EXIT_NO_GOLDENS
    assert "no golden references" in capsys.readouterr().err
    rep = self_check(good, "cpu", threads=1)
    assert rep.ok and rep.precision == "int8"


def test_classifier_checks_int8_by_default_and_fp32_on_request(make_model, meta_factory):
    bad8 = _tiny_with_goldens(make_model, meta_factory, "bad8.onnx", slopes_scale=0.7)
    with pytest.raises(SelfCheckError, match="bad8.onnx"):
        Classifier(bad8, backend="cpu", threads=1)
    bad32 = _tiny_with_goldens(make_model, meta_factory, "bad32.onnx", precision="fp32", slopes_scale=0.98)
    assert Classifier(bad32, backend="cpu", threads=1).self_check_report is None  # FP32: not automatic
    with pytest.raises(SelfCheckError, match="fp32|FAILED"):
        Classifier(bad32, backend="cpu", threads=1, self_check=True)
    ok32 = _tiny_with_goldens(make_model, meta_factory, "ok32.onnx", precision="fp32")
    assert Classifier(ok32, backend="cpu", threads=1, self_check=True).self_check_report.ok
