"""``python -m export``: the library call writes a parity-checked ONNX file with metadata and golden references;
main maps its failures to exit codes with one clear line."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from export.__main__ import main
from export.checkpoint import ExportFailed, export_checkpoint
from runtime.artifacts import read_onnx_metadata
from runtime.check import read_goldens
from runtime.contract import ModelMetadata
from train.checkpoint import save_checkpoint
from train.models import build_model


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory: pytest.TempPathFactory) -> Path:
    torch.manual_seed(0)
    model = build_model("efficientnet_lite0")
    meta = ModelMetadata(input_size=(32, 32), arch="efficientnet_lite0", threshold=0.5)
    return save_checkpoint(tmp_path_factory.mktemp("ckpt") / "m.pt", model, meta, epoch=1)


def test_main_prints_what_it_wrote_and_maps_failures(checkpoint: Path, tmp_path: Path,
                                                     capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "x.onnx"
    assert main(["--checkpoint", str(checkpoint), "--out", str(out), "--no-simplify", "--parity-images", "2"]) == 0
    text = capsys.readouterr().out
    assert "parity on 2 images" in text and "golden references:" in text and f"wrote {out}" in text
    meta = read_onnx_metadata(out)
    assert meta.input_size == (32, 32) and meta.threshold == 0.5 and read_goldens(out) is not None
    bad = tmp_path / "bad.pt"
    bad.write_bytes(b"not a checkpoint")
    assert main(["--checkpoint", str(bad)]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and "bad.pt: not a checkpoint of this project" in err
    # a parity failure moves the file aside and exits 1
    with pytest.raises(ExportFailed, match="failed-parity") as e:
        export_checkpoint(checkpoint, tmp_path / "p.onnx", parity_images=2, tolerance=-1.0, simplify=False)
    assert e.value.exit_code == 1 and (tmp_path / "p.onnx.failed-parity").is_file()
