"""train.audit: near-identical images with different labels (conflicts) or across splits (leaks) are found."""

from __future__ import annotations

import json
from pathlib import Path

import cv2
import numpy as np
import pytest

from train.audit import audit_dataset, main, near_pairs, thumbnail


def _texture(seed: int, size: int = 64) -> np.ndarray:
    rng = np.random.default_rng(seed)
    small = rng.integers(0, 256, (8, 8)).astype(np.uint8)
    return cv2.resize(small, (size, size), interpolation=cv2.INTER_CUBIC)


def _write(root: Path, rel: str, img: np.ndarray) -> Path:
    p = root / rel
    p.parent.mkdir(parents=True, exist_ok=True)
    assert cv2.imwrite(str(p), img)
    return p


@pytest.fixture()
def dataset(tmp_path: Path) -> Path:
    root = tmp_path / "data"
    base = _texture(1)
    defect = base.copy()
    cv2.circle(defect, (32, 32), 3, 255, -1)  # a small particle: the defect twin of `base`
    _write(root, "train/clean/base.png", base)
    _write(root, "train/foreign_materials/base_particle.png", defect)
    leak = _texture(2)
    _write(root, "train/cracks/leak.png", leak)
    _write(root, "val/cracks/leak_copy.png", np.clip(leak.astype(int) + 3, 0, 255).astype(np.uint8))
    for k, cls in enumerate(("gaps", "cmp", "ler", "other")):
        _write(root, f"val/{cls}/distinct{k}.png", _texture(10 + k))
    _write(root, "val/clean/flat.png", np.full((64, 64), 90, np.uint8))
    (root / "val/gaps/broken.png").write_bytes(b"not a png")
    return root


def test_audit_finds_the_defect_twin_and_the_cross_split_copy_and_nothing_else(dataset: Path) -> None:
    r = audit_dataset(dataset, threshold=0.9)
    assert r["images"] == 8 and r["flat_images"] == 1  # broken file left out, flat image not compared
    assert any("broken.png" in p for p in r["problems"])
    assert [sorted((c["a"]["label"], c["b"]["label"])) for c in r["conflicts"]] == [["clean", "foreign_materials"]]
    assert len(r["leaks"]) == 1 and {r["leaks"][0]["a"]["split"], r["leaks"][0]["b"]["split"]} == {"train", "val"}
    assert r["duplicates"] == []
    assert r["images_in_conflicts"] == {"train": 2}
    # a stricter threshold than the twin's correlation drops it
    strict = audit_dataset(dataset, threshold=min(c["correlation"] for c in r["conflicts"]) + 1e-3)
    assert strict["conflicts"] == []


def test_near_pairs_matches_brute_force_across_chunks(monkeypatch: pytest.MonkeyPatch) -> None:
    import train.audit as audit

    rng = np.random.default_rng(0)
    base = rng.normal(size=(5, 64)).astype(np.float32)
    x = np.concatenate([base, base + rng.normal(scale=0.2, size=base.shape).astype(np.float32)])
    t = np.stack([thumbnail(v.reshape(8, 8), 8) for v in x])
    monkeypatch.setattr(audit, "_CHUNK", 3)  # several chunks, pairs that straddle them
    pairs, truncated = near_pairs(t, 0.8)
    got = {(i, j) for i, j, _ in pairs}
    c = t @ t.T / t.shape[1]
    want = {(i, j) for i in range(len(t)) for j in range(i + 1, len(t)) if c[i, j] >= 0.8}
    assert got == want and {(k, k + 5) for k in range(5)} <= got and not truncated
    assert [p[2] for p in pairs] == sorted((p[2] for p in pairs), reverse=True)
    few, truncated = near_pairs(t, 0.8, limit=2)  # a folder of near-identical frames must not exhaust memory
    assert len(few) == 2 and truncated and {(i, j) for i, j, _ in few} <= want


def test_cli_writes_json_and_sheet_and_reports_a_missing_folder(dataset: Path, tmp_path: Path,
                                                               capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "audit"
    assert main(["--data", str(dataset), "--out", str(out), "--no-progress"]) == 0
    report = json.loads((out / "audit.json").read_text())
    assert len(report["conflicts"]) == 1
    sheet = cv2.imread(str(out / "pairs.png"))
    assert sheet is not None and sheet.shape[1] == 3 * 160  # one column of A | B | difference
    assert "1 with different labels" in capsys.readouterr().out
    assert main(["--data", str(tmp_path / "nope")]) == 2
    assert "does not exist" in capsys.readouterr().err
