"""The frame-quality gate refuses frames with no usable content, and only those, before inference."""

from __future__ import annotations

import math
import warnings

import cv2
import numpy as np
import pytest

from runtime import quality
from runtime.contract import INVALID_LABEL, ModelMetadata
from runtime.errors import MetadataError
from runtime.quality import QualityGate, default_limits, fit_limits, frame_stats, full_scale


def _lines(size: int = 96, seed: int = 0, noise: float = 0.04, pitch: int = 12) -> np.ndarray:
    """A line/space pattern with a blob and shot-like noise: what an SEM frame with content looks like."""
    rng = np.random.default_rng(seed)
    x = np.arange(size)
    img = np.tile(np.where((x // (pitch // 2)) % 2 == 0, 0.3, 0.7), (size, 1)).astype(np.float32)
    cv2.circle(img, (size // 3, size // 2), size // 10, 0.9, -1)
    img = cv2.GaussianBlur(img, (0, 0), 0.8) + rng.normal(0, noise, img.shape).astype(np.float32)
    return np.clip(img, 0, 1)


def _u8(img: np.ndarray) -> np.ndarray:
    return np.round(np.clip(img, 0, 1) * 255).astype(np.uint8)


GATE = QualityGate(default_limits("percentile"))


@pytest.mark.parametrize("dtype", [np.uint8, np.uint16, np.float32])
@pytest.mark.parametrize("value", [0.0, 0.5, 1.0])
def test_uniform_frames_are_blank_at_any_level_and_depth(value, dtype):
    top = np.iinfo(dtype).max if np.dtype(dtype).kind == "u" else 1.0
    assert GATE(np.full((64, 64), value * top, dtype)) == "blank"


def test_a_trace_of_noise_on_a_flat_frame_is_still_blank():
    rng = np.random.default_rng(1)
    img = 0.4 + rng.normal(0, 0.002, (128, 128))
    assert GATE(_u8(img)) == "blank"


def test_mostly_clipped_frame_is_saturated():
    img = _lines()
    img[:, : int(0.7 * img.shape[1])] = 1.0
    assert GATE(_u8(img)) == "saturated"
    dark = _lines()
    dark[: int(0.8 * dark.shape[0])] = 0.0
    assert GATE(_u8(dark)) == "saturated"


@pytest.mark.parametrize("kind", ["gauss", "uniform", "saltpepper"])
def test_structureless_noise_is_noise(kind):
    rng = np.random.default_rng(2)
    if kind == "gauss":
        img = 0.5 + rng.normal(0, 0.15, (128, 128))
    elif kind == "uniform":
        img = rng.uniform(0, 1, (128, 128))
    else:
        img = np.full((128, 128), 0.5)
        u = rng.random(img.shape)
        img[u < 0.1], img[u > 0.9] = 0.0, 1.0
    assert GATE(_u8(img)) == "noise"


def test_defocused_scene_and_smooth_gradient_are_defocus():
    blurred = cv2.GaussianBlur(_lines(128, noise=0.0), (0, 0), 12)
    assert GATE(_u8(blurred)) == "defocus"
    ramp = np.tile(np.linspace(0.2, 0.8, 128, dtype=np.float32), (128, 1))
    assert GATE(_u8(ramp)) == "defocus"


@pytest.mark.parametrize("seed", range(4))
def test_frames_with_content_pass_in_every_encoding(seed):
    img = _lines(seed=seed)
    assert GATE(_u8(img)) == ""
    assert GATE(_u8(img * 0.1)) == ""  # a tenth of the brightness
    for bits in (10, 12, 14, 16):
        assert GATE(np.round(img * ((1 << bits) - 1)).astype(np.uint16)) == "", bits


def test_full_scale_of_uint16_is_the_smallest_standard_bit_depth_holding_the_data():
    assert full_scale(np.array([[0, 1023]], np.uint16)) == 1023
    assert full_scale(np.array([[0, 1024]], np.uint16)) == 4095
    assert full_scale(np.array([[0, 40000]], np.uint16)) == 65535
    assert full_scale(np.zeros((2, 2), np.uint8)) == 255
    assert full_scale(np.zeros((2, 2), np.float32)) == 1.0


def test_stats_are_the_same_for_8_bit_and_12_bit_copies_of_a_frame():
    img = _lines()
    a = frame_stats(_u8(img))
    b = frame_stats(np.round(img * 4095).astype(np.uint16))
    for k in ("spread", "signal", "detail", "level"):
        assert a[k] == pytest.approx(b[k], abs=0.02), k
    assert b["raw_spread"] == pytest.approx(a["raw_spread"] / 16, rel=0.05)  # on uint16's own scale: 1/16


def test_fit_keeps_every_training_frame_and_bounds_the_level():
    frames = [_lines(seed=s, noise=0.02 + 0.01 * (s % 4), pitch=8 + 2 * (s % 5)) for s in range(40)]
    frames += [_lines(seed=s, noise=0.4, pitch=8 + 2 * (s % 5)) for s in range(5)]  # heavy shot noise
    stats = [frame_stats(_u8(f)) for f in frames]
    q = fit_limits(stats, intensity="percentile")
    gate = QualityGate(q["limits"])
    assert all(gate.reason(s) == "" for s in stats)
    noisy = [s["band"] for s in stats if s["signal"] < quality.DEFOCUS_MIN_SIGNAL]
    assert noisy and q["limits"]["defocus_band"] == min(quality.DEFAULT_LIMITS["defocus_band"],
                                                        quality.BAND_FIT_SHARE * min(noisy))
    lo, hi = q["limits"]["range"]["level"]
    assert 0 <= lo < min(s["level"] for s in stats) and max(s["level"] for s in stats) < hi <= 1
    # A frame that is nearly all background with a few bright pixels is far outside that level range.
    sparse = np.full((96, 96), 0.2, np.float32) + np.random.default_rng(0).normal(0, 0.03, (96, 96))
    sparse[40:44, 40:90] = 0.95
    sparse = cv2.GaussianBlur(sparse.astype(np.float32), (0, 0), 0.7)
    s = frame_stats(_u8(sparse))
    assert not lo <= s["level"] <= hi
    assert gate.reason(s) == "out_of_range"
    with pytest.raises(ValueError, match="too few"):
        fit_limits(stats[:5])


def test_full_scale_models_refuse_frames_using_little_of_the_scale():
    gate = QualityGate(default_limits("full_scale"))
    img = _lines()
    assert gate(_u8(img)) == ""
    assert gate(np.round(img * 4095).astype(np.uint16)) == "out_of_range"  # 12-bit data a full-scale model sees dark
    assert gate(_u8(img * 0.08)) == "out_of_range"  # dimmed to 8%


def test_model_without_statistics_gets_defaults_and_one_warning():
    meta = ModelMetadata()
    src = f"model-{np.random.default_rng().integers(1 << 30)}.onnx"
    with pytest.warns(RuntimeWarning, match="no frame-quality statistics"):
        gate = QualityGate.for_model(meta, src)
    assert gate is not None and not gate.fitted and gate.limits == default_limits("full_scale")
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        QualityGate.for_model(meta, src)  # once per model
    fitted = {"limits": {"blank_spread": 0.005}}
    g2 = QualityGate.for_model(meta.with_updates(quality=fitted), "x")
    assert g2.fitted and g2.limits["blank_spread"] == 0.005 and g2.limits["noise_signal"] == 0.15
    assert QualityGate.for_model(meta.with_updates(quality={"gate": "off"}), "y") is None


def test_metadata_round_trips_the_new_fields_and_defaults_them_for_old_models():
    meta = ModelMetadata(intensity="percentile", intensity_percentiles=(1, 99), quality={"limits": {"a": 1}})
    back = ModelMetadata.from_json(meta.to_json())
    assert back == meta and back.intensity_percentiles == (1.0, 99.0)
    old = {k: v for k, v in ModelMetadata().to_dict().items()
           if k not in ("intensity", "intensity_percentiles", "quality")}
    legacy = ModelMetadata.from_dict(old)
    assert (legacy.intensity, legacy.quality) == ("full_scale", None)
    with pytest.raises(MetadataError, match="intensity"):
        ModelMetadata(intensity="auto").validate()
    with pytest.raises(MetadataError, match="intensity_percentiles"):
        ModelMetadata(intensity_percentiles=(99, 1)).validate()


# ------------------------------------------------------------------------------------------ through the Classifier
@pytest.fixture
def gated(make_model, meta_factory):
    """A tiny model whose metadata carries fitted limits (the gate on), counting its backend calls."""
    from runtime.classifier import Classifier

    q = {"limits": default_limits("percentile")}
    clf = Classifier(make_model("gated.onnx", meta=meta_factory(quality=q, intensity="percentile")),
                     backend="ort", threads=1)
    calls = []
    infer = clf.backend.infer

    def counting(batch):
        calls.append(len(batch))
        return infer(batch)

    clf.backend.infer = counting
    clf.calls = calls
    return clf


def test_refused_frame_has_the_agreed_shape_and_skips_inference(gated):
    gated.calls.clear()
    p = gated.predict(np.zeros((64, 64), np.uint8))
    assert (p.label, p.index, p.rejected, p.reason) == (INVALID_LABEL, -1, True, "blank")
    assert (p.top_label, p.top_index, p.confidence) == ("", -1, 0.0) and math.isnan(p.score)
    assert p.invalid and gated.calls == []
    d = p.to_dict(probs=True)
    assert d["reason"] == "blank" and d["label"] == "invalid" and d["score"] is None
    ok = gated.predict(_u8(_lines()))
    assert ok.reason == "" and ok.label != INVALID_LABEL and ok.to_dict()["reason"] == "" and gated.calls == [1]


def test_batch_keeps_indices_aligned_and_sends_only_usable_frames(gated):
    rng = np.random.default_rng(3)
    items = [_u8(_lines(seed=1)), np.full((50, 50), 200, np.uint8), np.zeros((2, 2), np.uint8),
             _u8(0.5 + rng.normal(0, 0.2, (96, 96))), _u8(_lines(seed=2))]
    gated.calls.clear()
    out = gated.predict_batch(items, on_error="keep", sources=["a", "b", "c", "d", "e"])
    assert [getattr(p, "reason", type(p).__name__) for p in out] == ["", "blank", "InputError", "noise", ""]
    assert [getattr(p, "source", None) for p in out] == ["a", "b", None, "d", "e"]
    assert gated.calls == [2]
    assert gated.predict_batch([np.zeros((40, 40), np.uint8)])[0].reason == "blank" and gated.calls == [2]


def test_small_noise_frame_is_judged_before_it_is_enlarged(gated):
    # Enlarged to the input with linear interpolation, noise looks smooth; prepare judges it at its own size.
    rng = np.random.default_rng(4)
    small = _u8(0.5 + rng.normal(0, 0.2, (16, 16)))
    prepared = gated.prepare(small)
    assert prepared.shape == (32, 32) and prepared.reason == "noise"
    assert gated.predict(prepared).reason == "noise"


def test_gate_can_be_turned_off_by_the_caller(make_model, meta_factory):
    from runtime.classifier import Classifier

    clf = Classifier(make_model("g2.onnx", meta=meta_factory(quality={"limits": {}})), backend="ort", threads=1,
                     quality_gate=False)
    p = clf.predict(np.zeros((40, 40), np.uint8))
    assert p.label == "clean" and p.reason == ""


def test_gate_is_cheap_next_to_inference():
    """Its cost is bounded in operations, not time: it works on at most ANALYSIS_SIDE² pixels."""
    big = _u8(cv2.resize(_lines(128), (1024, 1024)))
    view = quality._analysis_view(big)
    assert max(view.shape) == quality.ANALYSIS_SIDE


def test_little_detail_is_defocus_when_smooth_and_a_noisy_frame_is_judged_by_its_mid_scale_band():
    base = {"spread": 0.5, "clipped": 0.0, "detail": 0.0, "level": 0.5, "raw_spread": 0.5, "raw_mean": 0.5,
            "band": 0.3}
    assert GATE.reason({**base, "signal": 0.95}) == "defocus"  # smooth: out of focus or a gradient
    assert GATE.reason({**base, "signal": 0.4}) == ""  # faint structure in heavy shot noise: left to the network
    assert GATE.reason({**base, "signal": 0.4, "band": 0.01}) == "defocus"  # only a smooth blur under the noise
    assert GATE.reason({**base, "signal": 0.05}) == "noise"


@pytest.mark.parametrize("seed", range(3))
def test_heavy_noise_over_a_blur_is_defocus_over_lines_it_passes(seed):
    rng = np.random.default_rng(seed)
    blur = cv2.GaussianBlur(_lines(128, noise=0.0), (0, 0), 8)
    noisy_blur = frame_stats(_u8(blur + rng.normal(0, 0.1, blur.shape)))
    assert noisy_blur["signal"] < quality.DEFOCUS_MIN_SIGNAL and GATE.reason(noisy_blur) == "defocus"
    noisy_lines = frame_stats(_u8(_lines(128, seed=seed, noise=0.4)))
    assert noisy_lines["signal"] < quality.DEFOCUS_MIN_SIGNAL and noisy_lines["detail"] < 0.02
    assert GATE.reason(noisy_lines) == ""


def test_a_frame_enlarged_for_the_model_needs_more_detail():
    gate = QualityGate(default_limits("percentile"), input_size=(128, 128))
    assert gate.zoom((64, 64)) == 2 and gate.zoom((128, 128)) == 1 and gate.zoom((512, 256)) == 1
    assert gate.zoom((64, 128)) == pytest.approx(2 ** 0.5) and QualityGate({}).zoom((8, 8)) == 1
    # The same scene out of focus: at 64 px it measures several times the detail it has at 128 px.
    small = _u8(cv2.GaussianBlur(_lines(64, noise=0.0), (0, 0), 4))
    assert GATE(small) == "" and gate(small) == "defocus"  # judged as the 2x enlarged frame the model would see
    assert gate(_u8(cv2.GaussianBlur(_lines(128, noise=0.0, pitch=24), (0, 0), 8))) == "defocus"
    for seed in range(4):
        assert gate(_u8(_lines(64, seed=seed))) == ""  # a sharp small frame still passes
    assert gate.reason({"spread": 0.5, "clipped": 0.0, "signal": 0.9, "detail": 0.03, "band": 0.3}, zoom=2) == \
        "defocus"
    assert gate.reason({"spread": 0.5, "clipped": 0.0, "signal": 0.9, "detail": 0.03, "band": 0.3}, zoom=1) == ""


def test_fragmented_clipping_is_counted_on_the_frame_as_it_came(gated):
    # 75% of the pixels clipped in fine speckles: shrinking to the input blends them away; the native count does not.
    rng = np.random.default_rng(6)
    img = _u8(_lines(256, seed=6))
    img[rng.random(img.shape) < 0.75] = 255
    from runtime.preprocess import resize_grey

    small = resize_grey(img, (32, 32))
    assert frame_stats(small)["clipped"] < 0.5
    assert gated.prepare(img).reason == "saturated"


@pytest.mark.parametrize(("pitch", "sigma"), [(24, 10), (32, 10), (64, 8)])
def test_quantisation_contours_of_a_smooth_8_bit_frame_are_not_detail(pitch: int, sigma: float):
    """A noise-free defocused frame spanning 16 grey levels: its 8-bit contour steps would measure as fine detail
    (several times what the same frame has in 16 bits); the noise floor never goes below the quantisation noise."""
    x = np.arange(256)
    img = np.tile(np.where((x // (pitch // 2)) % 2 == 0, 0.0, 1.0), (256, 1)).astype(np.float32)
    img[100:140, 100:140] = 1.0
    b = cv2.GaussianBlur(img, (0, 0), sigma)
    b = 0.2 + 0.06 * (b - b.min()) / (b.max() - b.min())
    f8, f16 = np.round(b * 255).astype(np.uint8), np.round(b * 65535).astype(np.uint16)
    assert len(np.unique(f8)) == 16
    d8 = frame_stats(cv2.resize(f8, (128, 128), interpolation=cv2.INTER_AREA), f8)["detail"]
    d16 = frame_stats(cv2.resize(f16, (128, 128), interpolation=cv2.INTER_AREA), f16)["detail"]
    assert d8 == pytest.approx(d16, rel=0.35)


def test_the_gate_judges_small_frames_as_they_came_and_large_ones_as_resized():
    small, large = np.zeros((64, 80), np.uint8), np.zeros((256, 256), np.uint8)
    resized = np.zeros((128, 128), np.uint8)
    assert quality.measured_view(small, resized) == (small, None)
    grey, native = quality.measured_view(large, resized)
    assert grey is resized and native is large
    wide = np.zeros((64, 300), np.uint8)  # larger than the input on one side: shrunk, so judged resized
    assert quality.measured_view(wide, resized)[0] is resized
    gate = QualityGate(default_limits("percentile"), input_size=(128, 128))
    assert gate.judge(small, resized) == gate(small) == "blank"


def _steps(n: int, sigma: float, contrast: float = 1.0, size: int = 128) -> np.ndarray:
    img = np.full((size, size), 0.5 - 0.2 * contrast, np.float32)
    for k in range(n):
        img[:, size * (2 * k + 1) // (2 * n):size * (2 * k + 2) // (2 * n)] = 0.5 + 0.2 * contrast
    return _u8(cv2.GaussianBlur(img, (0, 0), sigma))


@pytest.mark.parametrize("sigma", [0.5, 1.0, 2.0, 3.0, 4.0])
def test_edge_is_the_blur_of_the_strongest_edges_whatever_their_number_and_contrast(sigma):
    # A step blurred by sigma measures sqrt(sigma^2 + 0.7^2): the pixel grid and the gradient operator add ~0.7 px.
    expected = math.hypot(sigma, 0.7)
    for n in (1, 4):
        for contrast in (1.0, 0.3):
            assert frame_stats(_steps(n, sigma, contrast))["edge"] == pytest.approx(expected, rel=0.1), (n, contrast)


def test_a_mildly_defocused_pattern_with_detail_left_is_defocus_by_its_edges():
    mild = _u8(cv2.GaussianBlur(_lines(128, noise=0.0, pitch=24), (0, 0), 4))  # blur 3% of the side
    s = frame_stats(mild)
    lim = default_limits("percentile")
    assert s["detail"] >= lim["defocus_detail"]  # the detail rule alone lets it through
    assert s["edge"] > lim["defocus_edge"] and GATE(mild) == "defocus"
    assert QualityGate({**lim, "defocus_edge": math.inf})(mild) == ""
    slightly = _u8(cv2.GaussianBlur(_lines(128, noise=0.0, pitch=24), (0, 0), 1.5))
    assert GATE(slightly) == ""
    # Sharp frames pass at the input size and enlarged (edge is scaled to the model input's pixels).
    small = QualityGate(lim, input_size=(128, 128))
    for seed in range(4):
        assert GATE(_u8(_lines(128, seed=seed))) == "" and small(_u8(_lines(64, seed=seed))) == ""
    # A sharp scene with a single edge has little detail but a sharp edge; judged by its detail alone.
    assert frame_stats(_steps(1, 0.5))["edge"] < lim["defocus_edge"]


def test_the_edge_rule_spares_frames_with_plenty_of_detail_and_counts_enlargement():
    lim = default_limits("percentile")
    gate = QualityGate(lim, input_size=(128, 128))
    floor = lim["defocus_detail"]
    base = {"spread": 0.5, "clipped": 0.0, "signal": 0.9, "band": math.nan, "level": 0.5}
    blurred = {**base, "edge": lim["defocus_edge"] + 1}
    assert gate.reason({**blurred, "detail": 0.99 * quality.EDGE_DETAIL_MARGIN * floor}) == "defocus"
    assert gate.reason({**blurred, "detail": 1.01 * quality.EDGE_DETAIL_MARGIN * floor}) == ""
    # Edges of a frame enlarged twice are twice as wide at the model input.
    half = {**base, "edge": 0.6 * lim["defocus_edge"], "detail": 2 * floor * 2 ** quality.DEFOCUS_ZOOM_POWER}
    assert gate.reason(half, zoom=1) == "" and gate.reason(half, zoom=2) == "defocus"
    # Noisy frames have no edge statistic (noise would sharpen it); they are judged by band.
    assert math.isnan(frame_stats(_u8(_lines(128, noise=0.4)))["edge"])


def test_fit_moves_the_edge_limit_up_to_keep_soft_training_frames():
    soft = [_u8(cv2.GaussianBlur(_lines(128, seed=s, noise=0.0, pitch=24 + 2 * (s % 3)), (0, 0), 3.5))
            for s in range(30)]
    stats = [frame_stats(f) for f in soft]
    assert max(s["edge"] for s in stats) > quality.DEFAULT_LIMITS["defocus_edge"]
    q = fit_limits(stats, intensity="percentile")
    gate = QualityGate(q["limits"])
    assert q["limits"]["defocus_edge"] > max(s["edge"] for s in stats)
    assert all(gate.reason(s) == "" for s in stats)
    sharp = fit_limits([frame_stats(_u8(_lines(seed=s))) for s in range(30)], intensity="percentile")
    assert sharp["limits"]["defocus_edge"] == quality.DEFAULT_LIMITS["defocus_edge"]


def test_the_gate_measures_edge_only_where_its_rule_can_refuse_with_the_same_verdicts():
    gate = QualityGate(default_limits("percentile"), input_size=(128, 128))
    frames = [_u8(_lines(size, seed=s, noise=n)) for size in (64, 128) for s in range(3) for n in (0.0, 0.04)]
    frames += [_u8(cv2.GaussianBlur(_lines(size, noise=0.0, pitch=24), (0, 0), b)) for size in (64, 128)
               for b in (1.0, 2.0, 3.0, 4.0, 6.0)]
    for f in frames:
        assert gate(f) == gate.reason(frame_stats(f), gate.zoom(f.shape))
    sharp = _u8(_lines(128))
    assert math.isnan(frame_stats(sharp, edge_below=frame_stats(sharp)["detail"])["edge"])
    assert not math.isnan(frame_stats(sharp)["edge"])
