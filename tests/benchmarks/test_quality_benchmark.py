"""benchmarks.quality: the corpus is what it says, outcomes are counted right, the report is written."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest

from benchmarks import quality as bq
from runtime.contract import INVALID_LABEL


def _pred(label: str, reason: str = "", index: int = 0, top: int = 0, score: float = 2.0) -> SimpleNamespace:
    return SimpleNamespace(label=label, reason=reason, index=index, top_index=top, score=score, confidence=0.9)


class _Always:
    """A classifier stand-in that gives every frame the same prediction."""

    def __init__(self, pred: SimpleNamespace) -> None:
        self.pred = pred

    def predict(self, x):
        return self.pred

    def predict_batch(self, items, on_error="raise"):
        return [self.pred for _ in items]


def test_outcomes():
    assert bq.outcome(_pred(INVALID_LABEL, "blank", -1, -1)) == "invalid:blank"
    assert bq.outcome(_pred("other", index=7)) == "other"
    assert bq.outcome(_pred("clean")) == "clean"
    assert bq.outcome(_pred("cracks", index=3, top=3)) == "defect"


def test_transforms_change_what_they_name():
    img = np.tile(np.arange(0, 256, 4, dtype=np.uint8), (8, 1))
    assert bq.transform(img, "brightness", 0.5).mean() == pytest.approx(img.mean() / 2, abs=1)
    flat = bq.transform(img, "contrast", 0.2)
    assert flat.std() == pytest.approx(img.std() * 0.2, rel=0.05)
    assert bq.transform(img, "gamma", 2.0).mean() < img.mean()
    twelve = bq.transform(img, "bits", 12)
    assert twelve.dtype == np.uint16 and twelve.max() == round(252 / 255 * 4095)
    np.testing.assert_array_equal(bq.transform(img, "none", 1.0), img)


def test_corpus_covers_every_kind_size_and_depth_reproducibly():
    frames = list(bq.corpus(1, [64, 96], seed=123))
    assert len(frames) == 5 * 2 * 2
    assert {(k, s, b) for k, s, b, _ in frames} == {(k, s, b) for k in ("blank", "noise", "gradient", "saturated",
                                                                         "defocus") for s in (64, 96) for b in (8, 16)}
    for _, size, bits, img in frames:
        assert img.shape == (size, size) and img.dtype == (np.uint8 if bits == 8 else np.uint16)
    again = list(bq.corpus(1, [64, 96], seed=123))
    assert all(np.array_equal(a[3], b[3]) for a, b in zip(frames, again))


def test_corpus_counts_a_classifier_that_calls_everything_clean():
    res = bq.run_corpus(_Always(_pred("clean")), 1, [64], seed=1, progress=False)
    assert res["frames"] == 10 and res["classified"] == 10 and res["total"] == {"clean": 10}
    ok = bq.run_corpus(_Always(_pred(INVALID_LABEL, "noise", -1, -1)), 1, [64], seed=1, progress=False)
    assert ok["classified"] == 0 and ok["cells"]["noise/64"] == {"invalid:noise": 2} and ok["leaks"] == []


def test_corpus_frames_that_became_a_class_are_listed_drawable_again_and_pictured():
    class _DefocusIsCmp:
        def predict(self, img: np.ndarray) -> SimpleNamespace:
            return _pred("cmp", index=5, top=5) if img.dtype == np.uint16 and img.shape == (96, 96) else \
                _pred("other", index=7, top=0)

    frames: list[np.ndarray] = []
    res = bq.run_corpus(_DefocusIsCmp(), 2, [64, 96], seed=3, progress=False, leaked=frames)
    assert res["classified"] == 10 == len(res["leaks"]) == len(frames)
    assert {(x["size"], x["bits"], x["label"]) for x in res["leaks"]} == {(96, 16, "cmp")}
    # Each listed leak is the frame the corpus draws again at that kind/size/bits/index.
    again: dict[tuple[str, int, int], list[np.ndarray]] = {}
    for kind, size, bits, img in bq.corpus(2, [64, 96], seed=3):
        again.setdefault((kind, size, bits), []).append(img)
    for x, img in zip(res["leaks"], frames):
        np.testing.assert_array_equal(again[(x["kind"], x["size"], x["bits"])][x["index"]], img)
    pic = bq.leak_picture(frames, res["leaks"], side=64)
    assert pic.dtype == np.uint8 and pic.shape[0] == 64 + 28 and pic.shape[1] == 10 * 66
    text = bq.format_report({"models": [{"model": "m", "corpus": {**res, "leak_picture": "corpus_leaks.png"}}]})
    assert "defocus 96px 16-bit #1 → cmp" in text and "`corpus_leaks.png`" in text


def test_clean_images_called_a_defect_are_listed_with_their_scores(tmp_path: Path,
                                                                   make_class_dataset: Callable[..., Path]):
    synth = make_class_dataset(tmp_path / "synth", per_class=2, size=32, splits=())
    samples = bq.labelled(synth, None)
    res = bq.run_robustness(_Always(_pred("cracks", index=3, top=3, score=1.5)), samples, ["original", "gamma 2"],
                            progress=False)
    alarms = res["rows"]["original"]["clean_false_alarms"]
    assert [Path(a["file"]).parent.name for a in alarms] == ["clean", "clean"]
    assert all(a["label"] == "cracks" and a["score"] == 1.5 for a in alarms)
    assert "clean_false_alarms" not in res["rows"]["gamma 2"]
    quiet = bq.run_robustness(_Always(_pred("other", index=7, top=0)), samples, ["original"], progress=False)
    assert quiet["rows"]["original"]["clean_false_alarms"] == []
    text = bq.format_report({"models": [{"model": "m", "robustness": res}]})
    assert "Clean images called a defect (unmodified): " in text and "→ cracks (score 1.5)" in text


def test_main_writes_the_report_and_skips_missing_real_data(tmp_path: Path, tiny_models: Path,
                                                           make_class_dataset: Callable[..., Path]):
    synth = make_class_dataset(tmp_path / "synth", per_class=2, size=32, splits=())
    out = tmp_path / "out"
    rc = bq.main(["--models", str(tiny_models), "--per-cell", "1", "--sizes", "64", "--synthetic", str(synth),
                  "--real", str(tmp_path / "absent"), "--transforms", "brightness 0.1x,12-bit", "--out", str(out),
                  "--threads", "1", "--quiet"])
    assert rc == 0
    doc = json.loads((out / "quality.json").read_text())
    m = doc["models"][0]
    assert m["corpus"]["frames"] == 10
    assert m["false_invalid"][0]["skipped"]
    assert m["false_invalid"][1]["images"] == 16
    assert list(m["robustness"]["rows"]) == ["original", "brightness 0.1x", "12-bit"]
    assert "Content-free corpus" in (out / "quality.md").read_text()
    leaks = m["corpus"]["leaks"]  # the tiny model classifies whatever the gate lets through
    assert (out / "corpus_leaks.png").is_file() == bool(leaks)
    assert m["corpus"].get("leak_picture") == ("corpus_leaks.png" if leaks else None)
    assert bq.main(["--models", str(tmp_path / "nope.onnx")]) == 2


def test_defocus_part_counts_each_outcome_per_size_and_blur_and_plots_them(tmp_path: Path):
    frames = list(bq.defocus_frames(1, [32, 48], [0.0, 0.05], seed=5))
    assert len(frames) == 7 * 2 * 2 and {f[2] for f in frames} == set(bq.CLASSES) - {"other"}
    assert all(img.shape == (size, size) and img.dtype == np.uint8 for size, _, _, img in frames)
    sharp, blurred = frames[0][3], frames[7][3]  # the same scene at 32 px, unblurred and blurred
    assert frames[0][2] == frames[7][2] and np.diff(blurred.astype(float)).std() < np.diff(sharp.astype(float)).std()

    class _BlurIsInvalid:
        """Right on sharp frames of class clean, calls sharp defects clean, refuses blurred 48 px frames."""

        def predict(self, img: np.ndarray) -> SimpleNamespace:
            if img.shape == (48, 48) and np.diff(img.astype(float)).std() < 2:
                return _pred(INVALID_LABEL, "defocus", -1, -1)
            return _pred("clean")

    res = bq.run_defocus(_BlurIsInvalid(), 2, [32, 48], [0.0, 0.2], seed=5, progress=False)
    rows = {(r["size"], r["blur"]): r for r in res["rows"]}
    assert rows[(32, 0.0)] == {"size": 32, "blur": 0.0, "n": 14, "right": 2, "wrong": 12, "defect_to_clean": 12,
                               "other": 0, "invalid": 0}
    assert rows[(48, 0.2)]["invalid"] == 14 and rows[(48, 0.2)]["right"] == 0
    assert rows[(48, 0.0)]["invalid"] == 0
    text = bq.format_report({"models": [{"model": "m", "defocus": res}]})
    assert "| 48² | 20% | 0 | 0 (0) | 0 | 14 |" in text
    bq.defocus_plot(res, tmp_path / "defocus.png")
    assert (tmp_path / "defocus.png").stat().st_size > 1000
    assert bq.main(["--parts", "corpus,blur"]) == 2  # unknown part
