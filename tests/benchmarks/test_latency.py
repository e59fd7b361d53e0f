"""python -m benchmarks.latency: schema, stages, skips and ratios on a tiny model (few iterations, no timing)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from benchmarks import latency
from benchmarks.compute_floor import count_macs, floor_ms
from benchmarks.timing import Samples, paired_ratio, run_interleaved, spread, summarize
from tests.benchmarks.conftest import TINY_MACS

STAGE_KEYS = {"median_ms", "p90_ms", "p99_ms", "min_ms", "max_ms", "mean_ms", "n"}


def small_settings(model: Path, **kw: object) -> latency.Settings:
    base = dict(model=model, backends=("onnxruntime", "tensorrt", "torch"), precisions=("fp32", "int8", "fp16"),
                batches=(1, 2), frame_size=64, iters=3, warmup=1, rounds=3, threads=1, gemm_size=64, progress=False)
    base.update(kw)
    return latency.Settings(**base)  # type: ignore[arg-type]


@pytest.fixture(scope="module")
def latency_doc(tiny_models: Path) -> dict:
    # torch is a test dependency (the train extra): the torch baseline rows must be measured, never skipped here.
    import torch

    try:
        return latency.run_latency(small_settings(tiny_models))
    finally:
        # The torch baseline flushes denormals to zero process-wide (right for a benchmark process); give the rest
        # of the test session IEEE floats back.
        torch.set_flush_denormal(False)


def test_every_configuration_is_measured_or_skipped_with_a_reason(latency_doc: dict) -> None:
    recs = latency_doc["records"]
    keys = {r["key"] for r in recs}
    for b in (1, 2):
        for k in (f"torch/pipeline/fp32/b{b}", f"onnxruntime/bare/fp32/b{b}", f"onnxruntime/pipeline/fp32/b{b}",
                  f"onnxruntime/bare/int8/b{b}", f"onnxruntime/pipeline/int8/b{b}", f"tensorrt/pipeline/fp32/b{b}"):
            assert k in keys
    by_key = {r["key"]: r for r in recs}
    for b in (1, 2):
        for k in ("torch/pipeline/fp32", "onnxruntime/bare/fp32", "onnxruntime/pipeline/fp32",
                  "onnxruntime/bare/int8", "onnxruntime/pipeline/int8"):
            assert by_key[f"{k}/b{b}"]["status"] == "ok", by_key[f"{k}/b{b}"]
    for r in recs:
        if r["status"] == "skipped":
            assert r["reason"], r
    # No TensorRT on the test machine: skipped with its reason, never an error.
    trt = [r for r in recs if r["backend"] == "tensorrt"]
    assert trt and all(r["status"] == "skipped" and ("TensorRT" in r["reason"] or "GPU" in r["reason"]) for r in trt)
    # No fp16 artifact next to the model: the reason names the missing file.
    fp16 = by_key["onnxruntime/bare/fp16/b1"]
    assert fp16["status"] == "skipped" and "tiny.fp16.onnx" in fp16["reason"]


def test_every_reported_stage_is_present_and_positive(latency_doc: dict) -> None:
    ok = [r for r in latency_doc["records"] if r["status"] == "ok"]
    for r in ok:
        expected = {"inference"} if r["mode"] == "bare" else {"preprocess", "inference", "postprocess"}
        assert expected <= set(r["stages"]), (r["key"], r["stages"].keys())
        for name, st in [*r["stages"].items(), ("total", r["total"])]:
            assert set(st) == STAGE_KEYS, name
            assert st["n"] == 3
            assert 0 < st["min_ms"] <= st["median_ms"] <= st["p90_ms"] <= st["p99_ms"] <= st["max_ms"], (r["key"], name)
        # End to end covers the stages it is made of.
        assert r["total"]["median_ms"] >= r["stages"]["inference"]["median_ms"] * 0.999
        assert r["throughput_ips"] == pytest.approx(r["batch"] * 1e3 / r["total"]["median_ms"])
        assert len(r["round_medians_ms"]) == 3 and r["spread"]["lo_ms"] <= r["spread"]["hi_ms"]


def test_rows_carry_ratios_to_torch_and_bare_onnxruntime(latency_doc: dict) -> None:
    by_key = {r["key"]: r for r in latency_doc["records"]}
    row = by_key["onnxruntime/pipeline/int8/b2"]
    # Recomputed from the rows' own per-round end-to-end medians: this row's time over the reference's, per round.
    for name, ref in (("vs_torch", "torch/pipeline/fp32/b2"), ("vs_ort_bare_fp32", "onnxruntime/bare/fp32/b2")):
        per_round = np.asarray(row["round_medians_ms"]) / np.asarray(by_key[ref]["round_medians_ms"])
        ratio = row[name]
        assert ratio["rounds"] == 3
        assert (ratio["ratio"], ratio["lo"], ratio["hi"]) == pytest.approx(
            (np.median(per_round), per_round.min(), per_round.max())), name
    assert "vs_ort_bare_fp32" not in by_key["onnxruntime/bare/fp32/b1"]  # not compared with itself
    assert "vs_torch" not in by_key["torch/pipeline/fp32/b1"]


def test_header_documents_machine_model_and_compute_floor(latency_doc: dict) -> None:
    import importlib.util
    import os
    import shutil

    import onnxruntime
    import torch

    m = latency_doc["machine"]
    # Each field against what this process can see for itself (not just that the key exists).
    assert m["cpu"] and m["cores_available"] == len(os.sched_getaffinity(0)) and m["threads_used"] == 1
    cpuinfo = Path("/proc/cpuinfo").read_text() if Path("/proc/cpuinfo").is_file() else ""
    assert ("AVX2" in m["isa"]) == ("avx2" in cpuinfo.split())
    assert m["onnxruntime"] == onnxruntime.__version__
    assert m["torch"] == torch.__version__.split("+")[0]
    if importlib.util.find_spec("tensorrt") is None:
        assert m["tensorrt"] == "not installed"
    else:
        import tensorrt

        assert m["tensorrt"] == tensorrt.__version__
    if not torch.cuda.is_available() and shutil.which("nvidia-smi") is None:
        assert m["gpu"] is None
    assert latency_doc["macs"] == TINY_MACS
    assert latency_doc["gemm"]["gflops"] > 0
    assert "random-init" in latency_doc["torch_weights"]


def test_markdown_and_json_are_written(latency_doc: dict, tmp_path: Path) -> None:
    md = latency.format_tables(latency_doc["records"], latency_doc)
    assert "| config | prec | batch | median |" in md and "Skipped:" in md and "TensorRT" in md
    j, m = latency.write_results(latency_doc, md, tmp_path / "out")
    back = json.loads(j.read_text())
    assert back["schema"] == latency.SCHEMA and len(back["records"]) == len(latency_doc["records"])
    assert m.read_text().startswith("### Latency")


def test_cli_runs_onnxruntime_only_and_writes_results(tiny_models: Path, tmp_path: Path,
                                                      capsys: pytest.CaptureFixture[str]) -> None:
    rc = latency.main(["--model", str(tiny_models), "--backends", "onnxruntime", "--precisions", "fp32",
                       "--batch", "1", "--iters", "2", "--rounds", "2", "--warmup", "0", "--frame-size", "48",
                       "--source", "png", "--gemm-size", "0", "--out", str(tmp_path), "--no-progress"])
    assert rc == 0
    doc = json.loads((tmp_path / "latency.json").read_text())
    pipe = next(r for r in doc["records"] if r["key"] == "onnxruntime/pipeline/fp32/b1")
    assert pipe["stages"]["decode"]["median_ms"] > 0  # --source png times the decode
    assert "onnxruntime bare" in capsys.readouterr().out


def test_missing_bundled_model_says_what_to_pass(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    import runtime.classifier

    monkeypatch.setattr(runtime.classifier, "_bundled_dirs", lambda: [tmp_path])  # the runtime's resolver finds none
    with pytest.raises(SystemExit, match="--model") as e:
        latency.main([])
    assert str(tmp_path) in str(e.value)  # where it looked


def test_default_model_is_the_runtimes_bundled_model() -> None:
    from runtime.classifier import bundled_model_path

    assert latency.resolve_model(None) == bundled_model_path()


def test_precisions_map_to_artifacts_next_to_the_model() -> None:
    m = Path("models/sem_classifier.onnx")
    assert latency.artifact_for(m, "fp32") == m
    assert latency.artifact_for(m, "int8") == Path("models/sem_classifier.int8.onnx")
    int8 = Path("models/sem_classifier.int8.onnx")
    assert latency.artifact_for(int8, "fp16") == Path("models/sem_classifier.fp16.onnx")
    assert latency.artifact_for(m, "int8", "tensorrt") == Path("models/sem_classifier.int8.engine")


def test_int8_falls_back_to_the_cpu_artifact_export_writes(tmp_path: Path) -> None:
    (tmp_path / "m.onnx").write_bytes(b"x")
    assert latency.artifact_for(tmp_path / "m.onnx", "int8") == tmp_path / "m.int8.onnx"  # nothing there yet
    (tmp_path / "m.int8.qdq.onnx").write_bytes(b"x")
    assert latency.artifact_for(tmp_path / "m.onnx", "int8") == tmp_path / "m.int8.qdq.onnx"
    (tmp_path / "m.int8.cpu.onnx").write_bytes(b"x")
    assert latency.artifact_for(tmp_path / "m.onnx", "int8") == tmp_path / "m.int8.cpu.onnx"
    assert latency.artifact_for(tmp_path / "m.int8.cpu.onnx", "fp32") == tmp_path / "m.onnx"


def test_macs_are_counted_from_the_graph(tiny_models: Path) -> None:
    r = count_macs(tiny_models)
    assert r["macs"] == TINY_MACS and r["by_op"] == {"Conv": 8 * 32 * 32 * 27, "Gemm": 64} and not r["uncounted"]
    assert floor_ms(10**9, 100.0) == pytest.approx(20.0)


class FakeRunner:
    """Returns scripted times; records the global order in which runners were stepped."""

    def __init__(self, name: str, ms: float, log: list[str]) -> None:
        self.name, self.ms, self.log = name, ms, log

    def step(self) -> dict[str, float]:
        self.log.append(self.name)
        return {"inference": self.ms, "total": self.ms}


def test_configurations_are_interleaved_round_by_round() -> None:
    log: list[str] = []
    a, b = FakeRunner("A", 2.0, log), FakeRunner("B", 4.0, log)
    sa, sb = run_interleaved([a, b], iters=4, warmup=1, rounds=2)
    # warm-up A, B; round 0: A (re-warm + 2), B (re-warm + 2); round 1 starts with B.
    assert log == ["A", "B"] + ["A"] * 3 + ["B"] * 3 + ["B"] * 3 + ["A"] * 3
    assert sa.rounds == [0, 0, 1, 1] and len(sb.stages["total"]) == 4
    r = paired_ratio(sa, sb)
    assert r["ratio"] == pytest.approx(0.5) and r["conclusive"]


def test_ratio_straddling_one_is_not_conclusive() -> None:
    a, b = Samples(), Samples()
    for rnd, (x, y) in enumerate([(1.0, 1.1), (1.2, 1.0), (1.0, 1.0)]):
        a.add({"total": x}, rnd)
        b.add({"total": y}, rnd)
    r = paired_ratio(a, b)
    assert not r["conclusive"] and r["lo"] < 1 < r["hi"]
    assert spread([1.0, 1.5, 2.0])["rel"] == pytest.approx(2 / 3)
    s = summarize([1, 2, 3, 4, 100])
    assert s["median_ms"] == 3 and s["max_ms"] == 100 and s["p99_ms"] > s["p90_ms"]
