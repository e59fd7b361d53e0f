"""Model construction and starting weights (B0 / Lite0, Lite0 ImageNet mapping, local files, offline imagenet)."""

from __future__ import annotations

import urllib.error
from pathlib import Path

import pytest
import torch
from torch import nn
from torchvision.ops.misc import SqueezeExcitation

from runtime.contract import ModelMetadata
from train import models
from train.checkpoint import save_checkpoint
from train.models import (
    LITE0_MEAN,
    WeightsUnavailable,
    build_model,
    default_normalisation,
    forward_features,
    load_lite0_weights,
)


def _lite0_source() -> list[tuple[str, torch.Tensor]]:
    return models._lite0_source_tensors(models.lite0_weights_path())


@pytest.mark.parametrize("arch", models.ARCHS)
def test_layout_and_forward_features(arch: str) -> None:
    model = build_model(arch, num_classes=8).eval()
    assert isinstance(model.classifier[-1], nn.Linear) and model.classifier[-1].in_features == 1280
    x = torch.rand(2, 3, 32, 32)
    with torch.no_grad():
        logits, feats = forward_features(model, x)
        assert torch.allclose(logits, model(x), atol=1e-5)
    assert logits.shape == (2, 8) and feats.shape == (2, 1280)


def test_lite0_is_relu6_without_se() -> None:
    model = build_model("efficientnet_lite0")
    kinds = {type(m) for m in model.modules()}
    assert nn.ReLU6 in kinds and nn.SiLU not in kinds and SqueezeExcitation not in kinds
    b0 = build_model("efficientnet_b0")
    assert sum(isinstance(m, SqueezeExcitation) for m in b0.modules()) == 16


def test_lite0_weights_fill_all_245_tensors() -> None:
    src = _lite0_source()
    assert len(src) == 245
    model = build_model("efficientnet_lite0", weights="lite0")
    state = model.state_dict()
    targets = models._feature_targets(model)
    assert len(targets) == 245
    for (_, sv), tk in zip(src, targets):
        assert torch.equal(state[tk], sv), tk


def test_b0_partial_start_copies_non_se_tensors_and_opens_se_gates() -> None:
    model = build_model("efficientnet_b0")
    assert load_lite0_weights(model) == 245
    state = model.state_dict()
    for (_, sv), tk in zip(_lite0_source(), models._feature_targets(model)):
        assert ".fc1." not in tk and ".fc2." not in tk
        assert torch.equal(state[tk], sv), tk
    se = [m for m in model.modules() if isinstance(m, SqueezeExcitation)]
    gate = torch.sigmoid(se[0].fc2(torch.zeros(1, se[0].fc2.in_channels, 1, 1)))
    assert float(gate.detach().min()) > 0.95


def test_lite0_shape_mismatch_fails_loudly(tmp_path: Path) -> None:
    sd = torch.load(models.lite0_weights_path(), map_location="cpu", weights_only=True)
    sd["_conv_stem.weight"] = torch.zeros(16, 3, 3, 3)
    bad = tmp_path / "bad_lite0.pth"
    torch.save(sd, bad)
    with pytest.raises(WeightsUnavailable, match="_conv_stem.weight"):
        load_lite0_weights(build_model("efficientnet_lite0"), bad)


def test_imagenet_offline_gives_clear_error(monkeypatch: pytest.MonkeyPatch) -> None:
    def offline(*_a: object, **_k: object) -> None:
        raise urllib.error.URLError("[Errno -3] Temporary failure in name resolution")

    monkeypatch.setattr(torch.hub, "load_state_dict_from_url", offline)
    with pytest.raises(WeightsUnavailable) as err:
        build_model("efficientnet_b0", weights="imagenet")
    msg = str(err.value)
    assert "offline" in msg and "--weights lite0" in msg and "--weights none" in msg and "PATH" in msg


def test_local_checkpoint_start_and_its_normalisation(tmp_path: Path) -> None:
    src = build_model("efficientnet_lite0", num_classes=8)
    meta = ModelMetadata(arch="efficientnet_lite0", mean=(0.3,) * 3, std=(0.2,) * 3)
    path = save_checkpoint(tmp_path / "synth.pt", src, meta)
    dst = build_model("efficientnet_lite0", num_classes=8, weights=str(path))
    for k, v in src.state_dict().items():
        assert torch.equal(dst.state_dict()[k], v), k
    assert default_normalisation("efficientnet_lite0", str(path)) == ((0.3,) * 3, (0.2,) * 3)


def test_local_file_errors_name_the_file(tmp_path: Path) -> None:
    with pytest.raises(WeightsUnavailable, match="no such file"):
        build_model("efficientnet_b0", weights=str(tmp_path / "missing.pt"))
    junk = tmp_path / "junk.pt"
    junk.write_bytes(b"not a torch file")
    with pytest.raises(WeightsUnavailable, match="junk.pt"):
        build_model("efficientnet_b0", weights=str(junk))
    # A different architecture's weights must not load silently.
    other = tmp_path / "resnet.pt"
    torch.save({"conv1.weight": torch.zeros(64, 3, 7, 7)}, other)
    with pytest.raises(WeightsUnavailable, match="feature tensors match"):
        build_model("efficientnet_b0", weights=str(other))


def test_default_normalisation() -> None:
    assert default_normalisation("efficientnet_lite0", "lite0") == (LITE0_MEAN, models.LITE0_STD)
    assert default_normalisation("efficientnet_b0", "lite0")[0] == pytest.approx((127 / 255,) * 3)
    assert default_normalisation("efficientnet_b0", "imagenet") == (models.IMAGENET_MEAN, models.IMAGENET_STD)
    with pytest.raises(ValueError, match="unknown architecture"):
        default_normalisation("resnet50", "none")
