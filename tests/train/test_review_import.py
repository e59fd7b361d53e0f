"""python -m train.review: sorted review frames move into the training set, with a batch fingerprint."""

from __future__ import annotations

import json
from pathlib import Path

import cv2
import numpy as np
import pytest

from train.review import MANIFEST, batch_fingerprint, import_queue, main, review_imports


def _png(path: Path, value: int, sidecar: bool = True) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    cv2.imwrite(str(path), np.full((16, 16), value, np.uint8))
    if sidecar:
        path.with_suffix(".json").write_text(json.dumps({"why": "rejected", "value": value}))
    return path


@pytest.fixture
def queue_and_data(tmp_path: Path) -> tuple[Path, Path]:
    q, data = tmp_path / "queue", tmp_path / "data"
    for split in ("train", "val"):
        _png(data / split / "clean" / "a.png", 10, sidecar=False)
    _png(q / "pending" / "00000009-x-rejected-cam.png", 99)  # not sorted yet: stays
    _png(q / "cracks" / "00000001-x-rejected-cam.png", 1)
    _png(q / "cracks" / "00000002-x-rejected-cam.png", 2)
    _png(q / "bridges" / "00000003-x-low_margin-cam.png", 3)
    return q, data


def test_import_moves_sorted_frames_and_records_the_batch(queue_and_data: tuple[Path, Path],
                                                          capsys: pytest.CaptureFixture[str]) -> None:
    q, data = queue_and_data
    assert main(["--queue", str(q), "--data", str(data), "--dry-run"]) == 0
    assert "would move 3 images" in capsys.readouterr().out and not (data / MANIFEST).exists()
    assert len(list((q / "cracks").glob("*.png"))) == 2  # dry run moved nothing
    assert main(["--queue", str(q), "--data", str(data)]) == 0
    out = capsys.readouterr().out
    assert "moved 3 images" in out and "1 still pending" in out
    cracks = sorted((data / "train" / "cracks").glob("review-*.png"))
    assert len(cracks) == 2 and len(list((data / "train" / "bridges").glob("review-*.png"))) == 1
    assert not list((q / "cracks").glob("*")) and (q / "pending" / "00000009-x-rejected-cam.png").exists()
    assert not list((data / "train").rglob("*.json"))  # the queue's JSON stays with the queue, as provenance
    imports = review_imports(data)
    assert len(imports) == 1 and imports[0]["counts"] == {"bridges": 1, "cracks": 2}
    fp = imports[0]["fingerprint"]
    assert len(list((q / "imported" / fp).rglob("*.json"))) == 3 and fp in out
    # the same frames sorted again (e.g. copied back) are not added twice; a new batch gets its own fingerprint
    _png(q / "cracks" / "again.png", 1)
    _png(q / "gaps" / "new.png", 5)
    rep = import_queue(q, data)
    assert rep.duplicates == 1 and rep.counts == {"gaps": 1} and rep.fingerprint != fp
    assert [i["fingerprint"] for i in review_imports(data)] == [fp, rep.fingerprint]


def test_fingerprint_depends_on_content_not_order() -> None:
    a = batch_fingerprint([("cracks", "aa"), ("gaps", "bb")])
    assert a == batch_fingerprint([("gaps", "bb"), ("cracks", "aa")]) != batch_fingerprint([("gaps", "aa")])


def test_a_folder_that_is_not_a_class_is_an_error(queue_and_data: tuple[Path, Path],
                                                  capsys: pytest.CaptureFixture[str]) -> None:
    q, data = queue_and_data
    _png(q / "scratches" / "s.png", 7)
    assert main(["--queue", str(q), "--data", str(data)]) == 2
    err = capsys.readouterr().err
    assert "scratches" in err and "not classes" in err
    assert len(list((q / "cracks").glob("*.png"))) == 2  # nothing moved
    assert main(["--queue", str(q), "--data", str(data / "missing")]) == 2


@pytest.mark.slow
def test_next_model_metadata_names_the_review_batch_and_val_statistics(tiny_dataset: Path, tmp_path: Path) -> None:
    """A (1-epoch, 32 px) training run on a dataset with an imported review batch: its metadata carries the batch
    fingerprint and the validation statistics the drift alarm compares with."""
    from runtime.contract import CLASSES
    from runtime.drift import VAL_STATS_KEY
    from train.checkpoint import load_checkpoint
    from train.loop import TrainConfig, train

    q = tmp_path / "queue"
    _png(q / "cracks" / "r1.png", 200)
    rep = import_queue(q, tiny_dataset)
    summary = train(TrainConfig(data=str(tiny_dataset), out=str(tmp_path / "run"), img_size=32, batch_size=4,
                                threads=1, progress=False, patience=0, epochs=1))
    extra = load_checkpoint(tmp_path / "run" / "best.pt")["metadata"]["extra"]
    assert extra["review_imports"][0]["fingerprint"] == rep.fingerprint == summary["metadata"]["extra"][
        "review_imports"][0]["fingerprint"]
    vs = extra[VAL_STATS_KEY]
    assert vs["n"] == 3 * len(CLASSES) and 0 <= vs["rejection_rate"] <= 1 and set(vs["class_mix"]) == set(CLASSES)
    assert abs(sum(vs["class_mix"].values()) - 1) < 1e-3
