"""python -m benchmarks.accuracy on a tiny generated dataset: schema, agreement, bad files, skip messages."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path

import pytest

from benchmarks import accuracy
from tests.benchmarks.conftest import write_tiny_onnx


@pytest.fixture
def tiny_test_set(tmp_path: Path, make_class_dataset: Callable[..., Path]) -> Path:
    root = make_class_dataset(tmp_path / "test", per_class=2, size=40, splits=())
    (root / "clean" / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\nnot really a png")
    return root


def test_tables_every_model_against_the_fp32_reference(tiny_models: Path, tiny_test_set: Path, tmp_path: Path,
                                                       capsys: pytest.CaptureFixture[str]) -> None:
    other = write_tiny_onnx(tmp_path / "other_seed.onnx", seed=5)
    int8 = tiny_models.with_name("tiny.int8.onnx")
    out = tmp_path / "out"
    rc = accuracy.main(["--data", str(tiny_test_set), "--models", str(int8), str(tiny_models), str(other),
                        "--out", str(out), "--no-progress", "--batch-size", "3"])
    assert rc == 0
    doc = json.loads((out / "accuracy.json").read_text())
    assert doc["schema"] == accuracy.SCHEMA and doc["num_images"] == 17
    # The reference is the model whose metadata says fp32, even though it was listed second.
    assert doc["reference"] == str(tiny_models)
    recs = {Path(r["model"]).name: r for r in doc["records"]}
    for r in recs.values():
        assert r["status"] == "ok"
        assert r["num_samples"] == 16  # the corrupt PNG is reported and skipped, the rest go on
        assert any("broken.png" in p for p in r["skipped_files"])
        for k in ("accuracy", "macro_f1", "ece", "coverage", "selective_accuracy", "top1_agreement"):
            assert 0.0 <= r[k] <= 1.0, k
        assert r["threshold"] == pytest.approx(0.2)
    assert recs["tiny.onnx"]["top1_agreement"] == 1.0
    assert recs["tiny.int8.onnx"]["top1_agreement"] == 1.0  # same weights, different label
    assert recs["other_seed.onnx"]["top1_agreement"] < 1.0  # different weights disagree somewhere
    md = capsys.readouterr().out
    assert "top-1 agreement vs fp32" in md and "other_seed.onnx" in md
    assert (out / "accuracy.md").read_text().startswith("### Accuracy")


def test_agreement_is_counted_on_images_both_models_classified() -> None:
    recs = [{"status": "ok", "precision": "int8", "model": "q", "_kept": [0, 1, 2, 3], "_top": [0, 1, 1, 5]},
            {"status": "ok", "precision": "fp32", "model": "f", "_kept": [0, 1, 2], "_top": [0, 1, 2]}]
    assert accuracy.add_agreement(recs) == "f"
    assert recs[0]["top1_agreement"] == pytest.approx(2 / 3) and recs[0]["agreement_n"] == 3


def test_missing_real_dataset_is_skipped_with_a_message(tiny_models: Path, tmp_path: Path,
                                                        capsys: pytest.CaptureFixture[str]) -> None:
    missing = tmp_path / "nowhere" / "sem-hackathon" / "test"
    rc = accuracy.main(["--data", str(missing), "--models", str(tiny_models), "--out", str(tmp_path / "o")])
    assert rc == 0
    out = capsys.readouterr().out
    assert "SKIPPED" in out and "sem-hackathon" in out
    assert not (tmp_path / "o").exists()


def test_missing_synthetic_set_says_how_to_generate_it(tiny_models: Path, monkeypatch: pytest.MonkeyPatch,
                                                       tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    monkeypatch.chdir(tmp_path)
    assert accuracy.main(["--models", str(tiny_models)]) == 0
    assert "python -m train.synthetic" in capsys.readouterr().out


def test_missing_model_is_an_error(tiny_test_set: Path, tmp_path: Path) -> None:
    assert accuracy.main(["--data", str(tiny_test_set), "--models", str(tmp_path / "nope.onnx")]) == 2
