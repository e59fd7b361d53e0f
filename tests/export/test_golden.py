"""Golden references are written with every artifact, and build_engine neither ships nor buries a rejected one."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np
import onnx
import pytest
from tiny_models import learned_tiny, tiny_meta, write_dataset

from calibration.quantize import CPU_TARGET_WEIGHTS
from export import build_engine as be
from export import golden
from export.onnx_export import export_onnx
from runtime.check import EXIT_PASS, GOLDEN_KEY, golden_sidecar_path, read_goldens, self_check
from runtime.check import main as check_main
from runtime.files import sha256_file

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from fake_gpu import FakeCudart, fake_tensorrt, install_cudart  # noqa: E402


@pytest.fixture(scope="module")
def model(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    d = tmp_path_factory.mktemp("g")
    data = write_dataset(d / "data", per_class=4, size=36)
    return export_onnx(learned_tiny(), tiny_meta(), d / "tiny.onnx"), data


def test_goldens_cover_every_class_and_reproduce_the_fp32_outputs(model: tuple[Path, Path], tmp_path: Path) -> None:
    src, data = model
    g = golden.make_goldens(src, data, n=16, build_command="CMD")
    assert len(g) == 16 and set(g.classes) == set(tiny_meta().labels) and g.build_command == "CMD"
    assert g.reference["sha256"] == sha256_file(src) and g.built["isa"] is not None
    import onnxruntime as ort

    out = ort.InferenceSession(str(src), providers=["CPUExecutionProvider"]).run(None, {"images": g.inputs()})[0]
    np.testing.assert_array_equal(out, g.logits)  # the stored inputs are exactly what the references came from
    assert np.ptp(g.logits, axis=0).max() > 1.0  # the references vary with the input
    # Each class contributes its clearest images: the FP32 top-1 margin of a chosen image is at least the class median.
    top2 = np.sort(g.logits, axis=1)[:, -2:]
    assert (top2[:, 1] - top2[:, 0]).min() > 0
    copy = tmp_path / "m.onnx"
    copy.write_bytes(src.read_bytes())
    golden.add_goldens(copy, g)
    assert len({p.key: p.value for p in onnx.load(str(copy)).metadata_props}[GOLDEN_KEY]) < 400_000
    assert read_goldens(copy).sha256 == g.sha256


def test_golden_cli_adds_goldens_to_an_existing_model(model: tuple[Path, Path], tmp_path: Path,
                                                      capsys: pytest.CaptureFixture[str]) -> None:
    src, data = model
    fp32 = tmp_path / "sem.onnx"
    fp32.write_bytes(src.read_bytes())
    assert check_main(["--model", str(fp32)]) == 3  # no goldens yet
    assert golden.main(["--model", str(fp32), "--data", str(data)]) == 0
    assert "PASS" in capsys.readouterr().out
    assert check_main(["--model", str(fp32), "--backend", "cpu"]) == EXIT_PASS
    # A reduced-precision copy takes its references from the FP32 file beside it (x.int8.onnx → x.onnx).
    assert golden.default_reference(tmp_path / "sem.int8.onnx") == fp32
    assert golden.main(["--model", str(tmp_path / "missing.onnx"), "--data", str(data)]) == 2


def test_build_engine_int8_writes_goldens_and_self_checks(model: tuple[Path, Path], tmp_path: Path,
                                                         monkeypatch: pytest.MonkeyPatch,
                                                         capfd: pytest.CaptureFixture[str]) -> None:
    monkeypatch.setattr("export.tensorrt_build.import_tensorrt", lambda: None)
    src, data = model
    out = tmp_path / "out"
    rc = be.main(["--onnx", str(src), "--int8", "--calib-data", str(data), "--val-data", str(data / "val"),
                  "--out", str(out), "--max-drop", "100"])
    text = capfd.readouterr()
    assert rc == 0, text.err
    # Third-party chatter stays hidden without -v: no calibrator prints, no onnxruntime INFO lines.
    both = text.out + text.err
    assert "Collecting tensor data" not in both and "INFO Performing symbolic shape inference" not in both
    for name in ("tiny.int8.cpu.onnx", "tiny.int8.qdq.onnx"):
        g = read_goldens(out / name)
        assert g is not None and "--int8" in g.build_command and "--val-data" in g.build_command
    report = json.loads((out / "tiny.int8.build-report.json").read_text())
    assert report["self_check"]["int8-cpu"]["ok"] and "int8-trt" not in report["self_check"]
    assert report["gate"]["int8-cpu"]["machine"]["isa"] is not None  # the CPU's instruction set travels along
    meta = be.read_onnx_metadata(out / "tiny.int8.cpu.onnx")
    assert meta.extra["calibration"]["cpu_target"] == "portable" and "isa" in meta.extra["calibration"]["built_on"]
    assert meta.extra["calibration"]["weights"] == CPU_TARGET_WEIGHTS["portable"]
    assert self_check(out / "tiny.int8.cpu.onnx", "cpu").ok
    rc = be.main(["--onnx", str(src), "--int8", "--calib-data", str(data), "--val-data", str(data / "val"),
                  "--out", str(tmp_path / "v"), "--max-drop", "100", "--calib-method", "percentile", "-v"])
    text = capfd.readouterr()
    assert rc == 0 and "Collecting tensor data" in text.out and "Performing symbolic shape inference" in text.err


@pytest.mark.parametrize("keep", [False, True])
def test_a_rejected_artifact_does_not_keep_a_shippable_name(model: tuple[Path, Path], tmp_path: Path,
                                                            monkeypatch: pytest.MonkeyPatch, keep: bool) -> None:
    monkeypatch.setattr("export.tensorrt_build.import_tensorrt", lambda: None)
    src, data = model
    rc = be.main(["--onnx", str(src), "--fp16", "--val-data", str(data / "val"), "--out", str(tmp_path),
                  "--max-drop", "-1"] + (["--keep-rejected"] if keep else []))
    assert rc == be.EXIT_GATE_FAILED
    assert not (tmp_path / "tiny.fp16.onnx").exists()
    assert (tmp_path / "tiny.fp16.rejected.onnx").exists() == keep
    report = json.loads((tmp_path / "tiny.fp16.build-report.json").read_text())
    assert report["rejected"] == [str(tmp_path / "tiny.fp16.onnx")]
    assert str(tmp_path / "tiny.fp16.onnx") not in report["artifacts"]
    rc = be.main(["--onnx", str(src), "--fp16", "--val-data", str(data / "val"), "--out", str(tmp_path),
                  "--max-drop", "-1", "--allow-drop"])
    assert rc == 0 and (tmp_path / "tiny.fp16.onnx").exists()


def test_an_engine_gets_the_same_goldens_beside_it(model: tuple[Path, Path], tmp_path: Path,
                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    cudart = install_cudart(monkeypatch, FakeCudart(name="Orin", sms=8, memory=8 << 30))
    trt = fake_tensorrt("10.3.0.30", cudart)
    monkeypatch.setattr("export.tensorrt_build.import_tensorrt", lambda: trt)
    src, data = model
    assert be.main(["--onnx", str(src), "--fp16", "--out", str(tmp_path), "--golden-data", str(data),
                    "--batch", "1,4,8"]) == 0
    engine = tmp_path / "tiny.fp16.engine"
    side = golden_sidecar_path(engine)
    assert side.is_file() and read_goldens(engine).sha256 == read_goldens(tmp_path / "tiny.fp16.onnx").sha256
    report = json.loads((tmp_path / "tiny.fp16.build-report.json").read_text())
    assert str(side) in report["artifacts"] and report["self_check"]["fp16"]["ok"]
