"""Content-free frames: what they look like, that the gate refuses them, and how training adds them to `other`."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest

from runtime.contract import CLASSES, ModelMetadata
from runtime.preprocess import Intensity
from runtime.quality import QualityGate, default_limits, frame_stats
from train import contentfree
from train.data import AugmentConfig, ImageFolderDataset, acquisition, fit_quality

GATE = QualityGate(default_limits("percentile"))
MEAN, STD = (0.5, 0.5, 0.5), (0.25, 0.25, 0.25)


def _scene(rng: np.random.Generator, size: tuple[int, int]) -> np.ndarray:
    """Lines with a particle: a scene with real content."""
    h, w = size
    x = np.arange(w)
    img = np.tile(np.where((x // max(2, w // 16)) % 2 == 0, 0.3, 0.7), (h, 1)).astype(np.float32)
    img[h // 3: h // 2, w // 3: w // 2] = 0.95
    return np.clip(img + rng.normal(0, 0.02, img.shape), 0, 1).astype(np.float32)


@pytest.mark.parametrize("kind", contentfree.KINDS)
def test_frames_are_float_unit_range_and_reproducible(kind):
    a = contentfree.frame(kind, np.random.default_rng(3), (40, 56), _scene)
    b = contentfree.frame(kind, np.random.default_rng(3), (40, 56), _scene)
    assert a.shape == (40, 56) and a.dtype == np.float32 and 0 <= a.min() and a.max() <= 1
    np.testing.assert_array_equal(a, b)


def test_quantise_to_each_bit_depth():
    img = np.linspace(0, 1, 64, dtype=np.float32).reshape(8, 8)
    assert contentfree.quantise(img, 8).dtype == np.uint8 and contentfree.quantise(img, 8).max() == 255
    for bits in (10, 12, 14, 16):
        q = contentfree.quantise(img, bits)
        assert q.dtype == np.uint16 and q.max() == (1 << bits) - 1
    with pytest.raises(ValueError):
        contentfree.quantise(img, 9)


@pytest.mark.parametrize("kind", ["blank", "noise", "gradient", "saturated"])
def test_the_gate_refuses_every_frame_of_the_unambiguous_kinds(kind):
    for seed in range(12):
        rng = np.random.default_rng(seed)
        size = (64, 128, 256)[seed % 3]
        img = contentfree.quantise(contentfree.frame(kind, rng, (size, size), _scene), 8 if seed % 2 else 16)
        assert GATE(img) != "", (kind, seed)


def test_defocused_frames_lose_the_detail_of_their_scene():
    rng = np.random.default_rng(0)
    scene = _scene(rng, (128, 128))
    sharp = frame_stats(contentfree.quantise(scene, 8))["detail"]
    blurred = [frame_stats(contentfree.quantise(contentfree.frame("defocus", np.random.default_rng(s), (128, 128),
                                                                  lambda r, sz: scene), 8))["detail"]
               for s in range(8)]
    assert sharp > 0.1 and max(blurred) < sharp / 4


def test_small_defocused_frames_are_refused_as_the_enlarged_frames_the_model_would_see():
    # At 64 px a defocused scene keeps more measurable detail than at 128 px; the gate of a 128-px model scales its
    # limit with the enlargement, so it refuses small frames that the unscaled limit lets through.
    sized = QualityGate(default_limits("percentile"), input_size=(128, 128))
    frames = [contentfree.quantise(contentfree.frame("defocus", np.random.default_rng(s), (64, 64), _scene),
                                   8 if s % 2 else 16) for s in range(24)]
    refused = sum(sized(f) == "defocus" for f in frames)
    assert refused >= 22 and refused > sum(GATE(f) == "defocus" for f in frames)


def test_large_frames_are_drawn_at_a_bounded_cost():
    img = contentfree.frame("defocus", np.random.default_rng(1), (2048, 2048), _scene)
    assert img.shape == (2048, 2048)


def test_acquisition_changes_stay_in_range_on_8_bit_levels():
    img = _scene(np.random.default_rng(0), (32, 32))
    for s in range(20):
        out = acquisition(img, np.random.default_rng(s))
        assert out.min() >= 0 and out.max() <= 1
        np.testing.assert_allclose(out * 255, np.round(out * 255), atol=1e-3)
        assert not np.allclose(out, img, atol=1e-3)


def test_station_frames_come_at_the_input_size_from_other_sizes_and_bit_depths():
    seen_dtypes = set()
    for s in range(30):
        rng = np.random.default_rng(s)
        out = contentfree.station_frame(rng, (32, 40), _scene)
        assert out.shape == (32, 40)
        seen_dtypes.add(out.dtype)
    assert seen_dtypes == {np.dtype(np.uint8), np.dtype(np.uint16)}
    # Reproducible from the generator's state.
    np.testing.assert_array_equal(contentfree.station_frame(np.random.default_rng(4), (32, 40), _scene),
                                  contentfree.station_frame(np.random.default_rng(4), (32, 40), _scene))


def test_station_frames_with_a_gate_are_the_ones_it_lets_through():
    calls: list[tuple[int, ...]] = []

    def gate(native: np.ndarray, resized: np.ndarray) -> str:
        assert resized.shape == (32, 32)
        calls.append(native.shape)
        # A stand-in gate: lets through only frames that came from a source larger than the input.
        return "" if native.shape[0] > resized.shape[0] else "defocus"

    for s in range(10):
        calls.clear()
        out = contentfree.station_frame(np.random.default_rng(s), (32, 32), _scene, gate, tries=50)
        assert out.shape == (32, 32)
        # Drawn until the gate let one through, judged on the frame as it came and as resized.
        assert calls[-1][0] > 32 and all(c[0] <= 32 for c in calls[:-1])
    # A gate that refuses everything: the last draw after `tries` attempts, never an endless loop.
    calls.clear()
    contentfree.station_frame(np.random.default_rng(0), (32, 32), _scene, lambda n, r: calls.append(1) or "noise",
                              tries=7)
    assert len(calls) == 7


def test_training_draws_half_its_content_free_frames_past_the_real_gate(tmp_path: Path,
                                                                        make_class_dataset: Callable[..., Path]):
    root = make_class_dataset(tmp_path / "d", per_class=2, size=32, splits=())
    gate = QualityGate(default_limits("percentile"), input_size=(32, 32))
    ds = ImageFolderDataset(root, (32, 32), MEAN, STD, seed=5, intensity=Intensity("percentile"), content_free=60,
                            gate=gate.judge)
    passed = sum(gate(ds.content_free_frame(i)) == "" for i in range(ds.n_images, len(ds)))
    plain = ImageFolderDataset(root, (32, 32), MEAN, STD, seed=5, intensity=Intensity("percentile"),
                               content_free=60)
    passed_plain = sum(gate(plain.content_free_frame(i)) == "" for i in range(plain.n_images, len(plain)))
    assert passed >= passed_plain + 15, (passed, passed_plain)


def test_training_set_gets_content_free_frames_as_other(tmp_path: Path, make_class_dataset: Callable[..., Path]):
    root = make_class_dataset(tmp_path / "d", per_class=2, size=32, splits=())
    ds = ImageFolderDataset(root, (32, 32), MEAN, STD, augment=AugmentConfig.strength("light"), seed=5,
                            intensity=Intensity("percentile"), content_free=6)
    other = CLASSES.index("other")
    assert ds.n_images == 16 and len(ds) == 22
    assert ds.class_counts()[other] == 2 + 6
    x, y = ds[20]
    assert y == other and x.shape == (3, 32, 32)
    again, _ = ds[20]
    np.testing.assert_array_equal(x.numpy(), again.numpy())
    ds.set_epoch(1)
    assert not np.array_equal(ds[20][0].numpy(), x.numpy())
    # What the network sees of them went through the model's intensity mode: stretched to the full range.
    unit = x.numpy()[0] * STD[0] + MEAN[0]
    assert unit.min() >= -1e-6 and unit.max() <= 1 + 1e-6
    plain = ImageFolderDataset(root, (32, 32), MEAN, STD)
    assert len(plain) == 16 and plain.n_images == 16


def test_fit_quality_accepts_its_own_training_images(tmp_path: Path, make_class_dataset: Callable[..., Path]):
    root = make_class_dataset(tmp_path / "d", per_class=3, size=48, splits=())
    meta = ModelMetadata(input_size=(32, 32), intensity="percentile")
    q = fit_quality(root, meta)
    assert q is not None and q["n_images"] == 24
    gate = QualityGate(q["limits"])
    from runtime.preprocess import load_grey, resize_grey

    for f in sorted(root.rglob("*.png")):
        assert gate(resize_grey(load_grey(f), (32, 32))) == "", f
    small = make_class_dataset(tmp_path / "s", per_class=1, size=32, splits=())
    assert fit_quality(small, meta) is None  # too few images: defaults at runtime, training goes on


def test_batchnorm_statistics_are_re_estimated_on_real_images(tmp_path: Path,
                                                              make_class_dataset: Callable[..., Path]):
    import torch
    from torch import nn

    from train.loop import recompute_batchnorm

    root = make_class_dataset(tmp_path / "d", per_class=4, size=32, splits=())
    ds = ImageFolderDataset(root, (32, 32), MEAN, STD)
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.Dropout(0.5), nn.Flatten())
    bn = model[1]
    bn.running_mean.fill_(50.0)  # as if content-free frames had skewed them
    bn.running_var.fill_(1e4)
    n = recompute_batchnorm(model, ds, "cpu", seed=0, batches=2, batch_size=16)
    assert n == 32 and not model.training and bn.momentum == 0.1
    x = torch.stack([ds[i][0] for i in range(len(ds))])
    with torch.no_grad():
        conv = model[0](x)
    torch.testing.assert_close(bn.running_mean, conv.mean((0, 2, 3)), rtol=1e-3, atol=1e-4)
    assert torch.allclose(bn.running_var, conv.var((0, 2, 3)), rtol=0.1)


def test_training_uses_the_gate_the_model_will_ship_with(tmp_path: Path, make_class_dataset: Callable[..., Path]):
    from train.loop import content_free_gate

    meta = ModelMetadata(input_size=(32, 32), intensity="percentile")
    root = make_class_dataset(tmp_path / "d", per_class=3, size=48, splits=())
    gate = content_free_gate(root, meta)
    assert gate.fitted and gate.input_size == (32, 32)
    assert dict(gate.limits) == {**default_limits("percentile"), **fit_quality(root, meta)["limits"]}
    few = make_class_dataset(tmp_path / "s", per_class=1, size=32, splits=())
    fallback = content_free_gate(few, meta)  # too few images to fit: the runtime's default limits
    assert not fallback.fitted and dict(fallback.limits) == default_limits("percentile")

