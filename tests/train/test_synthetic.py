"""Tests for train.synthetic: defects are really drawn (and only where their JSON bbox says), roughness statistics,
determinism for a seed, and the CLI's folder layout.

Images are rendered at 128 px (or 64 px for file-writing tests) so the whole file stays fast on 2 cores.  Where
possible the same parameters are rendered with and without the defect (identical scene, textures and noise), so any
difference is the defect itself.
"""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

import cv2
import numpy as np
import pytest

from train import synthetic as syn

SIZE = 128
REPO = Path(__file__).resolve().parents[2]


def _params(cls: str, i: int, seed: int = 0, size: int = SIZE) -> dict:
    return syn.sample_params(cls, syn.image_rng(seed, cls, i), size)


def _pair(cls: str, i: int, seed: int = 0, size: int = SIZE) -> tuple[np.ndarray, np.ndarray, dict]:
    p = _params(cls, i, seed, size)
    img, meta = syn.render_params(p, defects=True)
    ref, _ = syn.render_params(p, defects=False)
    return img, ref, meta


def _binarize_pair(ref: np.ndarray, img: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Threshold both images at the Otsu level of the defect-free one, so only the defect can change the result."""
    sr = cv2.GaussianBlur(ref.astype(np.float32), (0, 0), 1.0)
    si = cv2.GaussianBlur(img.astype(np.float32), (0, 0), 1.0)
    t, _ = cv2.threshold(np.clip(sr, 0, 255).astype(np.uint8), 0, 255, cv2.THRESH_BINARY + cv2.THRESH_OTSU)
    return (sr > t).astype(np.uint8), (si > t).astype(np.uint8)


def _components(binary: np.ndarray) -> int:
    _, _, stats, _ = cv2.connectedComponentsWithStats(binary, connectivity=4)
    return int((stats[1:, cv2.CC_STAT_AREA] >= binary.shape[0] // 2).sum())


def _straighten(img: np.ndarray, scene: dict, half: int) -> np.ndarray:
    """Resample so that lines run down the columns (rows = along the lines), using the scene's known angle."""
    size = img.shape[0]
    a = math.radians(scene["angle_deg"])
    u = np.arange(-half, half, dtype=np.float32)
    uu, vv = np.meshgrid(u, u)
    mx = size / 2 - uu * math.sin(a) + vv * math.cos(a) - 0.5
    my = size / 2 + uu * math.cos(a) + vv * math.sin(a) - 0.5
    return cv2.remap(img.astype(np.float32), mx, my, cv2.INTER_LINEAR)


def _measured_ler(img: np.ndarray, scene: dict) -> float:
    """Median over edges of the std of the sub-pixel threshold-crossing position along the edge."""
    st = cv2.GaussianBlur(_straighten(img, scene, int(0.3 * img.shape[0])), (0, 0), 1.0)
    thr = 0.5 * (np.percentile(st, 10) + np.percentile(st, 90))
    mean_profile = st.mean(axis=0) - thr
    window = scene["pitch"] / 4
    stds = []
    for e in np.flatnonzero(np.sign(mean_profile[:-1]) != np.sign(mean_profile[1:])):
        rising = mean_profile[e + 1] > mean_profile[e]
        lo, hi = max(0, int(e - window)), min(st.shape[1] - 1, int(e + window) + 1)
        pos = []
        for row in st[:, lo : hi + 1] - thr:
            cross = np.flatnonzero((np.sign(row[:-1]) != np.sign(row[1:])) & ((row[1:] > row[:-1]) == rising))
            if cross.size:
                j = cross[np.argmin(np.abs(lo + cross - e))]
                pos.append(lo + j + row[j] / (row[j] - row[j + 1]))
        if len(pos) > 0.8 * st.shape[0]:
            stds.append(np.std(pos))
    return float(np.median(stds))


# --------------------------------------------------------------------------------------------------------------------
# Palasantzas roughness
# --------------------------------------------------------------------------------------------------------------------
def test_palasantzas_profile_std_matches_sigma() -> None:
    rng = np.random.default_rng(0)
    for sigma, xi, alpha in ((0.5, 5.0, 0.5), (2.0, 10.0, 1.0), (1.0, 2.0, 0.3)):
        stds = [syn.palasantzas_profile(4096, sigma, xi, alpha, rng).std() for _ in range(8)]
        assert np.mean(stds) == pytest.approx(sigma, rel=0.05)
    prof = syn.palasantzas_profile(1000, 1.0, 5.0, 0.5, rng)
    assert prof.shape == (1000,) and np.isrealobj(prof)


def test_palasantzas_shorter_xi_has_more_high_frequency_power() -> None:
    def hf_fraction(xi: float) -> float:
        rng = np.random.default_rng(1)
        p = np.mean([np.abs(np.fft.rfft(syn.palasantzas_profile(2048, 1.0, xi, 0.5, rng))) ** 2 for _ in range(16)], 0)
        q = np.fft.rfftfreq(2048)
        return float(p[q > 0.05].sum() / p.sum())

    short, long_ = hf_fraction(2.0), hf_fraction(20.0)
    assert short > 2 * long_


# --------------------------------------------------------------------------------------------------------------------
# The defects are really there
# --------------------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("i", range(6))
def test_bridge_lowers_number_of_line_components(i: int) -> None:
    img, ref, meta = _pair("bridges", i)
    b_ref, b_img = _binarize_pair(ref, img)
    assert _components(b_img) < _components(b_ref), meta["defects"]


@pytest.mark.parametrize("i", range(6))
def test_gap_raises_number_of_line_components(i: int) -> None:
    img, ref, meta = _pair("gaps", i)
    b_ref, b_img = _binarize_pair(ref, img)
    assert _components(b_img) > _components(b_ref), meta["defects"]


def test_ler_images_have_larger_measured_edge_roughness_than_clean() -> None:
    ler, ler_off = [], []
    for i in range(6):
        img, ref, meta = _pair("ler", i)
        ler.append(_measured_ler(img, meta["scene"]))
        ler_off.append(_measured_ler(ref, meta["scene"]))  # same scene with ordinary roughness
    clean = []
    i = 0
    while len(clean) < 6:
        p = _params("clean", i)
        i += 1
        if p["scene"]["type"] == "line_space":
            clean.append(_measured_ler(syn.render_params(p)[0], p["scene"]))
    assert all(a > b for a, b in zip(ler, ler_off)), (ler, ler_off)
    assert np.mean(ler) > 1.5 * np.mean(clean), (ler, clean)


@pytest.mark.parametrize("cls", ["bridges", "gaps", "cracks", "foreign_materials", "cmp", "other"])
def test_defect_changes_pixels_inside_its_bbox_and_not_outside(cls: str) -> None:
    for i in range(4):
        img, ref, meta = _pair(cls, i, seed=1)
        diff = np.abs(img.astype(np.float64) - ref)
        im = meta["imaging"]
        # Beam blur spreads any change by ~3 sigma; bbox is the region the defect occupies before imaging.
        margin = int(math.ceil(3 * max(im["blur_sigma_x"], im["blur_sigma_y"]) + 2))
        near = np.zeros(diff.shape, bool)
        assert meta["defects"]
        for d in meta["defects"]:
            x0, y0, x1, y1 = d["bbox"]
            near[max(0, y0 - margin) : y1 + margin, max(0, x0 - margin) : x1 + margin] = True
            assert np.percentile(diff[y0:y1, x0:x1], 99) > 15, d  # clearly visible inside its own box
        assert diff[near].sum() >= 0.97 * diff.sum(), [d["type"] for d in meta["defects"]]


def test_clean_has_no_defect_and_all_scene_types() -> None:
    scenes = set()
    for i in range(30):
        p = _params("clean", i)
        assert p["defects"] == []
        scenes.add(p["scene"]["type"])
    assert scenes == set(syn.SCENE_TYPES)
    img, ref, _ = _pair("clean", 0)
    assert np.array_equal(img, ref)


@pytest.mark.parametrize("cls", syn.CLASSES)
def test_render_sample_returns_uint8_image_and_honest_meta(cls: str) -> None:
    allowed = {
        "bridges": {"line_space"}, "gaps": {"line_space"}, "ler": {"line_space"}, "cmp": {"planar"},
        "cracks": {"line_space", "planar"}, "other": {"line_space", "contact_holes"},
    }
    for i in range(2):
        img, meta = syn.render_sample(cls, syn.image_rng(2, cls, i), 96)
        assert img.dtype == np.uint8 and img.shape == (96, 96)
        assert meta["class"] == cls and meta["class_index"] == syn.CLASSES.index(cls)
        assert meta["scene"]["type"] in allowed.get(cls, set(syn.SCENE_TYPES))
        assert {"blur_sigma_x", "counts", "read_noise"} <= set(meta["imaging"])
        assert {"sigma", "xi", "alpha"} <= set(meta["roughness"])
        assert (len(meta["defects"]) == 0) == (cls == "clean")
        for d in meta["defects"]:
            x0, y0, x1, y1 = d["bbox"]
            assert 0 <= x0 < x1 <= 96 and 0 <= y0 < y1 <= 96
            assert {"type", "variant", "params", "seed"} <= set(d)
        json.dumps(meta)  # JSON-able as is


def test_params_reloaded_from_json_render_identically() -> None:
    img, meta = syn.render_sample("foreign_materials", syn.image_rng(4, "foreign_materials", 0), SIZE)
    again, meta2 = syn.render_params(json.loads(json.dumps(meta)))
    assert np.array_equal(img, again)
    assert meta2["defects"] == meta["defects"]


# --------------------------------------------------------------------------------------------------------------------
# Visibility floor: a labelled defect must stand out from the clutter around it
# --------------------------------------------------------------------------------------------------------------------
def test_defect_visibility_grows_with_contrast_and_is_zero_without_a_change() -> None:
    rng = np.random.default_rng(0)
    background = np.clip(120 + 12 * rng.standard_normal((64, 64)), 0, 255).astype(np.uint8)
    assert syn.defect_visibility(background, background) == 0.0
    scores = []
    for c in (3, 10, 30):
        img = background.astype(np.int16)
        img[28:36, 28:36] += c
        scores.append(syn.defect_visibility(np.clip(img, 0, 255).astype(np.uint8), background))
    assert scores[0] < 1.0 < scores[2] and scores[0] < scores[1] < scores[2]


def test_faint_cmp_defects_are_redrawn_visible_on_the_same_scene() -> None:
    faint = 0
    for i in range(24):
        p = syn.sample_params("cmp", syn.image_rng(0, "cmp", i), SIZE)
        a, _ = syn.render_params(p)
        b, _ = syn.render_params(p, defects=False)
        before = syn.defect_visibility(a, b)
        img, meta = syn.render_sample("cmp", syn.image_rng(0, "cmp", i), SIZE, min_visibility=1.0)
        vis = meta["visibility"]
        twin, _ = syn.render_params(meta, defects=False)
        assert vis["contrast_to_clutter"] == pytest.approx(syn.defect_visibility(img, twin), abs=1e-3)  # honest record
        # Only the defect is drawn again: same scene, imaging and noise, same kind of CMP damage.
        assert meta["scene"] == p["scene"] and meta["imaging"] == p["imaging"] and meta["seeds"] == p["seeds"]
        assert [d["type"] for d in meta["defects"]] == [d["type"] for d in p["defects"]]
        if before >= 1.0:
            assert vis["redraws"] == 0 and np.array_equal(img, a)  # visible ones are left exactly as they were
        else:
            faint += 1
            assert vis["contrast_to_clutter"] >= 0.95, (i, vis)
    assert faint >= 4  # the sample really contains faint defects, or this test would prove nothing


def test_deepened_defects_rerender_from_their_json_and_pattern_edits_are_not_checked() -> None:
    deepened = None
    for i in range(18, 40):
        img, meta = syn.render_sample("cmp", syn.image_rng(0, "cmp", i), SIZE, min_visibility=1.0)
        if "deepened" in meta["visibility"]:
            deepened = (img, meta)
            break
    assert deepened is not None, "no deepened defect in the sample"
    img, meta = deepened
    again, _ = syn.render_params(json.loads(json.dumps(meta)))
    assert np.array_equal(img, again)
    _, bridge = syn.render_sample("bridges", syn.image_rng(0, "bridges", 0), SIZE, min_visibility=1.0)
    assert "visibility" not in bridge


def test_zero_floor_samples_exactly_as_before() -> None:
    for cls in ("cmp", "cracks", "other"):
        for i in range(3):
            img, meta = syn.render_sample(cls, syn.image_rng(5, cls, i), 96, min_visibility=0.0)
            ref, _ = syn.render_params(syn.sample_params(cls, syn.image_rng(5, cls, i), 96))
            assert np.array_equal(img, ref) and "visibility" not in meta


def test_cli_records_the_floor_and_rejects_a_negative_one(tmp_path: Path) -> None:
    out = tmp_path / "s"
    assert syn.main(["--out", str(out), "--per-class", "1", "--size", "48", "--quiet", "--split", "1,0,0"]) == 0
    assert json.loads((out / "summary.json").read_text())["min_visibility"] == syn.DEFAULT_MIN_VISIBILITY
    meta = json.loads((out / "train" / "cmp" / "cmp_000000.json").read_text())
    assert meta["visibility"]["floor"] == syn.DEFAULT_MIN_VISIBILITY and meta["generator_version"] == 2
    with pytest.raises(SystemExit):
        syn.main(["--out", str(out), "--min-visibility", "-1", "--quiet"])


# --------------------------------------------------------------------------------------------------------------------
# Dataset writing, determinism, CLI
# --------------------------------------------------------------------------------------------------------------------
def _files(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def test_same_seed_gives_identical_bytes_whatever_the_worker_count(tmp_path: Path) -> None:
    syn.generate_dataset(tmp_path / "a", per_class=2, size=64, seed=3, workers=1, progress=False)
    syn.generate_dataset(tmp_path / "b", per_class=2, size=64, seed=3, workers=2, progress=False)
    a, b = _files(tmp_path / "a"), _files(tmp_path / "b")
    assert len([k for k in a if k.endswith(".png")]) == 2 * len(syn.CLASSES)
    assert a == b
    assert not [k for k in a if k.endswith(".tmp")]


def test_different_seed_gives_different_images(tmp_path: Path) -> None:
    syn.generate_dataset(tmp_path / "a", per_class=1, size=64, seed=3, progress=False, classes=("clean", "cmp"))
    syn.generate_dataset(tmp_path / "b", per_class=1, size=64, seed=4, progress=False, classes=("clean", "cmp"))
    a, b = _files(tmp_path / "a"), _files(tmp_path / "b")
    pngs = [k for k in a if k.endswith(".png")]
    assert pngs and all(a[k] != b[k] for k in pngs)


def test_cli_writes_split_layout_jsons_and_montages(tmp_path: Path) -> None:
    out = tmp_path / "synth"
    rc = syn.main(["--out", str(out), "--per-class", "4", "--size", "64", "--seed", "1", "--split", "0.5,0.25,0.25",
                   "--montage", "--quiet"])
    assert rc == 0
    for split, n in zip(syn.SPLITS, (2, 1, 1)):
        for cls in syn.CLASSES:
            pngs = sorted((out / split / cls).glob("*.png"))
            assert len(pngs) == n
            for png in pngs:
                img = cv2.imread(str(png), cv2.IMREAD_UNCHANGED)
                assert img.dtype == np.uint8 and img.shape == (64, 64)  # 8-bit grey
                meta = json.loads(png.with_suffix(".json").read_text())
                assert meta["class"] == cls and meta["split"] == split and meta["file"].endswith(png.name)
                assert meta["seed"]["seed"] == 1
                for d in meta["defects"]:
                    x0, y0, x1, y1 = d["bbox"]
                    assert 0 <= x0 < x1 <= 64 and 0 <= y0 < y1 <= 64
    summary = json.loads((out / "summary.json").read_text())
    assert summary["n_images"] == 4 * len(syn.CLASSES)
    for cls in syn.CLASSES:
        grid = cv2.imread(str(out / "montage" / f"{cls}.png"), cv2.IMREAD_GRAYSCALE)
        assert grid is not None and grid.shape[0] > 2 * 64 and grid.shape[1] > 2 * 64


def test_a_zero_split_gets_no_folder(tmp_path: Path) -> None:
    out = tmp_path / "synth"
    assert syn.main(["--out", str(out), "--per-class", "2", "--size", "48", "--split", "0.5,0.5,0", "--quiet"]) == 0
    assert sorted(p.name for p in out.iterdir() if p.is_dir()) == ["train", "val"]  # no empty test/ to evaluate
    assert all(len(list((out / sp / c).glob("*.png"))) == 1 for sp in ("train", "val") for c in syn.CLASSES)


def test_cli_help_has_examples() -> None:
    res = subprocess.run([sys.executable, "-m", "train.synthetic", "--help"], cwd=REPO, capture_output=True,
                         text=True, timeout=60)
    assert res.returncode == 0
    assert "examples:" in res.stdout and "--per-class" in res.stdout and "--montage" in res.stdout


def test_split_counts_sum_and_rounding() -> None:
    assert syn.split_counts(12, (0.7, 0.15, 0.15)) == [8, 2, 2]
    assert syn.split_counts(100, (0.7, 0.15, 0.15)) == [70, 15, 15]
    assert syn.split_counts(1, (0.7, 0.15, 0.15)) == [1, 0, 0]
    with pytest.raises(ValueError):
        syn.split_counts(10, (-1, 1, 1))
