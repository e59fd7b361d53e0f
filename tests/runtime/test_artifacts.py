"""The artifact table: what export writes is what the loaders and the benchmark look for, row by row; the ONNX
metadata reader agrees with ONNX Runtime's without the onnx package."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

from runtime import artifacts
from runtime.artifacts import BY_KEY, FORMATS
from runtime.contract import ModelMetadata, write_sidecar
from runtime.errors import BackendUnavailable, MetadataError

EXPORT_ROWS = [f for f in FORMATS if f.written_by.startswith("python -m export")]


def test_table_is_consistent() -> None:
    assert len(BY_KEY) == len(FORMATS)  # keys are unique
    assert len({f.suffix for f in FORMATS}) == len(FORMATS)  # so is every name
    for f in FORMATS:
        assert f.precision in ("fp32", "fp16", "int8") and f.device in ("cpu", "gpu")
        assert f.opened_by in (artifacts.ONNXRUNTIME, artifacts.TENSORRT)
        assert artifacts.is_engine("m" + f.suffix) == (f.opened_by == artifacts.TENSORRT)
        if f.built_from:
            assert f.opened_by == artifacts.TENSORRT and BY_KEY[f.built_from].suffix.endswith(".onnx")
    # every precision export builds has a written ONNX file and a written engine
    for p in artifacts.BUILD_PRECISIONS:
        assert {f.opened_by for f in EXPORT_ROWS if f.precision == p} == {artifacts.ONNXRUNTIME, artifacts.TENSORRT}


@pytest.mark.parametrize("fmt", FORMATS, ids=lambda f: f.key)
def test_export_paths_and_loader_candidates_agree(fmt: artifacts.ArtifactFormat, tmp_path: Path) -> None:
    """For every row: the file export names is one the benchmark's and the runtime's look-ups find, from the FP32
    model or from any other artifact of the same model."""
    from benchmarks import latency
    from export.build_engine import artifact_paths

    src = tmp_path / "models" / "sem.v2.onnx"  # a dot in the stem must survive
    paths = artifacts.artifact_paths(src)
    path = paths[fmt.key]
    assert artifact_paths(src, None)[fmt.key] == path  # export's own view is the table's
    assert path == tmp_path / "models" / f"sem.v2{fmt.suffix}"
    assert artifacts.format_of(path) is fmt and artifacts.stem_of(path) == "sem.v2"
    for model in (src, *paths.values()):
        assert path in latency.artifact_candidates(model, fmt.precision, fmt.opened_by)
        assert path in artifacts.candidates(model, fmt.precision, fmt.opened_by)
    if fmt.opened_by == artifacts.ONNXRUNTIME:  # golden references for any ONNX variant come from the FP32 file
        from export.golden import default_reference

        assert default_reference(path) == paths["fp32_onnx"]
    if fmt.built_from:  # an engine's source ONNX is where export wrote it, and the CPU fallback finds it
        from runtime.trt_backend import fallback_onnx

        assert artifacts.source_onnx(path) == paths[fmt.built_from]
        path.parent.mkdir(parents=True, exist_ok=True)
        paths[fmt.built_from].write_bytes(b"onnx")
        assert fallback_onnx(path) == paths[fmt.built_from]


def test_export_writes_its_rows_into_out_and_reports_beside_them(tmp_path: Path) -> None:
    from export.build_engine import artifact_paths

    paths = artifact_paths(tmp_path / "in" / "m.onnx", tmp_path / "out")
    assert all(p.parent == tmp_path / "out" for p in paths.values())
    assert paths["int8_report"].name == "m.int8.build-report.json"
    # a variant passed as the source is never overwritten: its whole name less .onnx is the stem
    assert artifact_paths(tmp_path / "m.fp16.onnx", None)["fp16_onnx"].name == "m.fp16.fp16.onnx"


def test_engine_sidecars_are_the_files_the_runtime_reads(tmp_path: Path) -> None:
    from runtime.check import golden_sidecar_path
    from runtime.contract import sidecar_path

    engine = BY_KEY["int8_engine"].file(tmp_path, "m")
    assert artifacts.sidecar_files(engine) == [sidecar_path(engine), golden_sidecar_path(engine)]
    assert artifacts.sidecar_files(BY_KEY["fp32_onnx"].file(tmp_path, "m")) == []  # ONNX holds both inside


def test_sidecar_keys_written_by_export_are_the_keys_the_loader_reads(tmp_path: Path) -> None:
    from export.build_engine import sidecar_extra

    extra = sidecar_extra("a", "10.3.0", "Orin", "8.7", "int8", {}, "cmd", "m.int8.qdq.onnx", "b")
    assert tuple(extra) == artifacts.SIDECAR_KEYS
    engine = tmp_path / "m.int8.engine"
    write_sidecar(engine, ModelMetadata(precision="int8"), extra)
    (tmp_path / "m.int8.qdq.onnx").write_bytes(b"x")
    from runtime.trt_backend import fallback_onnx, rebuild_command

    assert fallback_onnx(engine) == tmp_path / "m.int8.qdq.onnx" and rebuild_command(engine, extra) == "cmd"


def test_bundled_names_come_from_the_table() -> None:
    from runtime import classifier

    assert classifier.DEFAULT_MODEL == "sem_classifier.onnx" == artifacts.DEFAULT_MODEL
    assert classifier.DEFAULT_INT8_MODEL == "sem_classifier.int8.onnx"
    assert artifacts.format_of(classifier.DEFAULT_INT8_MODEL) is BY_KEY["int8_onnx"]


def test_names_outside_the_table() -> None:
    assert artifacts.format_of("notes.txt") is None and artifacts.stem_of("x.plan") == "x"
    assert artifacts.source_onnx("model.plan") is None
    assert artifacts.format_of(".onnx") is None  # a suffix alone is not a model
    assert artifacts.rejected_path(Path("a/x.int8.cpu.onnx")) == Path("a/x.int8.cpu.rejected.onnx")
    assert artifacts.rejected_path(Path("x.engine")) == Path("x.engine.rejected")


# ------------------------------------------------------------------ metadata reader
def test_metadata_reader_matches_onnxruntime(tiny_model: Path) -> None:
    import onnxruntime as ort

    sess = ort.InferenceSession(str(tiny_model), providers=["CPUExecutionProvider"])
    assert artifacts.read_onnx_props(tiny_model) == dict(sess.get_modelmeta().custom_metadata_map)
    meta = artifacts.read_onnx_metadata(tiny_model)
    assert meta == ModelMetadata.from_props(sess.get_modelmeta().custom_metadata_map)


def test_metadata_reader_errors_name_the_file(tmp_path: Path, tiny_model: Path) -> None:
    bad = tmp_path / "bad.onnx"
    bad.write_bytes(b"\x0b\x0c not protobuf")
    with pytest.raises(MetadataError, match="bad.onnx: not a readable ONNX model"):
        artifacts.read_onnx_metadata(bad)
    cut = tmp_path / "cut.onnx"
    cut.write_bytes(tiny_model.read_bytes()[:-7])  # truncated inside the metadata
    with pytest.raises(MetadataError, match="cut.onnx"):
        artifacts.read_onnx_metadata(cut)
    empty = tmp_path / "empty.onnx"
    empty.write_bytes(b"")
    with pytest.raises(MetadataError, match="empty.onnx: no model metadata"):
        artifacts.read_onnx_metadata(empty)
    with pytest.raises(FileNotFoundError):
        artifacts.read_onnx_metadata(tmp_path / "missing.onnx")


# ------------------------------------------------------------------ TensorRT import
def test_import_tensorrt_says_what_to_do_or_returns_none(monkeypatch: pytest.MonkeyPatch) -> None:
    from runtime import trt_build

    monkeypatch.setitem(sys.modules, "tensorrt", None)  # import tensorrt → ImportError, installed or not
    assert artifacts.import_tensorrt(required=False) is None and trt_build.import_tensorrt() is None
    with pytest.raises(BackendUnavailable, match="TensorRT is not installed here.*backend='ort'"):
        artifacts.import_tensorrt()
    import types

    fake = types.ModuleType("tensorrt")
    monkeypatch.setitem(sys.modules, "tensorrt", fake)
    assert artifacts.import_tensorrt() is fake and trt_build.import_tensorrt() is fake
    from export import tensorrt_build
    from runtime import trt_backend

    assert trt_backend.import_tensorrt is tensorrt_build.import_tensorrt is artifacts.import_tensorrt


def test_runtime_artifacts_imports_without_onnx_or_torch() -> None:
    import subprocess

    code = ("import sys; sys.modules.update(onnx=None, torch=None, tensorrt=None); import runtime.artifacts, "
            "runtime.trt_backend, runtime.classifier")
    subprocess.run([sys.executable, "-c", code], check=True)
