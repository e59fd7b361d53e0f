"""``benchmarks.serve`` end to end on a tiny model: a real server, two client counts, the table and JSON."""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import pytest

from benchmarks.serve import main, make_images

if os.environ.get("SEM_SERVE_REQUIRED") != "1":
    pytest.importorskip("tritonclient.grpc", reason="tritonclient is not installed here; runs in the serve venv "
                                                    "(.ci/run)")


def test_make_images_are_decodable_and_distinct() -> None:
    import cv2
    import numpy as np

    imgs = make_images(3, 64)
    arrays = [cv2.imdecode(np.frombuffer(b, np.uint8), cv2.IMREAD_UNCHANGED) for b in imgs]
    assert all(a.shape == (64, 64) and a.dtype == np.uint8 for a in arrays)
    assert not np.array_equal(arrays[0], arrays[1])


@pytest.mark.slow
def test_benchmark_writes_a_row_per_client_count(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "export"))
    from test_deepstream import meta, tiny_onnx

    model = tiny_onnx(tmp_path / "tiny.onnx", meta(input_size=(32, 32)))
    assert main(["--model", str(model), "--clients", "1,3", "--duration", "1", "--image-size", "64",
                 "--out", str(tmp_path / "out")]) == 0
    doc = json.loads((tmp_path / "out" / "serve.json").read_text())
    assert [r["clients"] for r in doc["rows"]] == [1, 3]
    for r in doc["rows"]:
        assert r["errors"] == 0 and r["images"] > 0 and r["p99_ms"] >= r["p50_ms"] > 0
    assert doc["in_process"]["images_per_s"] > 0
    assert doc["server"]["startup_s"] > 0 and doc["server"]["memory_mib"]["model process (runtime.serve)"] > 10
    table = (tmp_path / "out" / "serve.md").read_text()
    assert "× in-process" in table and table in capsys.readouterr().out
