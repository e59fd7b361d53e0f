"""The model contract: the class list and the metadata that travels inside every model artifact.

Training writes a :class:`ModelMetadata`, export embeds it in ONNX ``metadata_props`` (key
:data:`METADATA_KEY`) and writes it as a JSON sidecar next to formats that cannot hold it (TensorRT engines),
and the runtime reads it back to preprocess, calibrate and reject exactly as the model was trained. It is
defined here, once, so there is a single source of truth for labels, input size, normalisation, temperature
and the rejection rule.
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Mapping
from dataclasses import asdict, dataclass, field, fields, replace
from pathlib import Path
from typing import Any

from runtime.errors import MetadataError
from runtime.files import atomic_write_text

#: The eight classes, in the order of the network's outputs. ``other`` is also where rejections go.
CLASSES: tuple[str, ...] = ("clean", "bridges", "gaps", "cracks", "foreign_materials", "cmp", "ler", "other")
REJECT_LABEL = "other"

SCHEMA = "sem-classifier/1"
#: Key under which the metadata JSON is stored in ONNX ``metadata_props``.
METADATA_KEY = "sem_classifier"
RESIZE_METHODS = ("area", "linear", "nearest")
CHANNEL_MODES = ("grey_replicated",)
#: Built-in rejection scores, all oriented so that higher means "more like the known classes".
LOGIT_SCORES = ("msp", "max_logit", "energy")
#: How raw pixel values become the 0–1 intensity scale (see :mod:`runtime.preprocess`): ``full_scale`` divides by
#: the dtype's maximum (255, 65535; models made before this field), ``bit_depth`` divides uint16 data by the
#: maximum of its real bit depth (10, 12, 14 or 16 bits, from the frame's maximum), ``percentile`` stretches each
#: frame's robust range (``intensity_percentiles``) to 0–1, whatever its bit depth, brightness or contrast.
INTENSITY_MODES = ("full_scale", "bit_depth", "percentile")
#: The outcome of a frame the frame-quality gate refuses (:mod:`runtime.quality`): not a class, not a rejection.
INVALID_LABEL = "invalid"

__version__ = "0.1.0"


def project_version() -> str:
    return __version__


@dataclass(frozen=True)
class ModelMetadata:
    """Everything a consumer needs to run a model the way it was trained.

    ``mean``/``std`` are per network channel on the 0–1 intensity scale. Grey input is replicated into the
    ``channels`` network channels (``channel_mode="grey_replicated"``); colour input is first converted to grey
    (BT.601 luma), because SEM contrast is intensity and false colour is an artefact of the tool.
    A prediction is rejected to ``other`` when ``score < threshold`` (``threshold=None`` disables rejection).
    """

    labels: tuple[str, ...] = CLASSES
    input_size: tuple[int, int] = (224, 224)  # (height, width)
    channels: int = 3
    channel_mode: str = "grey_replicated"
    resize: str = "area"  # area when shrinking, linear when enlarging
    mean: tuple[float, ...] = (0.485, 0.456, 0.406)
    std: tuple[float, ...] = (0.229, 0.224, 0.225)
    temperature: float = 1.0
    score: str = "msp"
    threshold: float | None = None
    input_name: str = "images"
    output_name: str = "logits"
    #: Graph output holding a per-image rejection score computed inside the model (feature-space scores), if any.
    score_output: str | None = None
    arch: str = "efficientnet_b0"
    precision: str = "fp32"
    project_version: str = __version__
    data_fingerprint: str = ""
    intensity: str = "full_scale"
    intensity_percentiles: tuple[float, float] = (0.5, 99.5)
    #: Frame-quality gate statistics and limits fitted on the training split (:func:`runtime.quality.fit_limits`);
    #: ``None`` for models made before the gate (the runtime then uses its defaults and warns once).
    quality: Mapping[str, Any] | None = None
    #: Free-form provenance (training command, metrics, calibration details); not used for inference.
    extra: Mapping[str, Any] = field(default_factory=dict)
    schema: str = SCHEMA

    def __post_init__(self) -> None:
        # Normalise JSON lists to tuples so equality and hashing behave.
        object.__setattr__(self, "labels", tuple(self.labels))
        object.__setattr__(self, "input_size", tuple(int(v) for v in self.input_size))
        object.__setattr__(self, "mean", tuple(float(v) for v in self.mean))
        object.__setattr__(self, "std", tuple(float(v) for v in self.std))
        object.__setattr__(self, "extra", dict(self.extra))
        object.__setattr__(self, "intensity_percentiles", tuple(float(v) for v in self.intensity_percentiles))
        if self.quality is not None:
            object.__setattr__(self, "quality", dict(self.quality))

    # ---------------------------------------------------------------- validation
    def validate(self, source: str = "<metadata>") -> ModelMetadata:
        """Raise :class:`MetadataError` naming ``source`` and the first thing that is wrong."""

        def bad(msg: str) -> MetadataError:
            return MetadataError(f"{source}: invalid model metadata: {msg}")

        if self.schema != SCHEMA:
            raise bad(f"schema {self.schema!r} is not supported (expected {SCHEMA!r})")
        if len(self.labels) < 2 or len(set(self.labels)) != len(self.labels) or not all(
            isinstance(x, str) and x for x in self.labels
        ):
            raise bad(f"labels must be at least two distinct non-empty names, got {list(self.labels)}")
        if REJECT_LABEL not in self.labels:
            raise bad(f"labels must include {REJECT_LABEL!r}, where rejected predictions go")
        if len(self.input_size) != 2 or not all(8 <= v <= 4096 for v in self.input_size):
            raise bad(f"input_size must be (height, width) with sides in 8..4096, got {list(self.input_size)}")
        if self.channels not in (1, 3):
            raise bad(f"channels must be 1 or 3, got {self.channels}")
        if self.channel_mode not in CHANNEL_MODES:
            raise bad(f"channel_mode {self.channel_mode!r} is not one of {CHANNEL_MODES}")
        if self.resize not in RESIZE_METHODS:
            raise bad(f"resize {self.resize!r} is not one of {RESIZE_METHODS}")
        if len(self.mean) != self.channels or len(self.std) != self.channels:
            raise bad(f"mean and std need {self.channels} values each, got {len(self.mean)} and {len(self.std)}")
        if not all(math.isfinite(v) for v in self.mean) or not all(math.isfinite(v) and v > 0 for v in self.std):
            raise bad(f"mean must be finite and std finite and positive, got mean={self.mean} std={self.std}")
        if not (math.isfinite(self.temperature) and 0.01 <= self.temperature <= 100):
            raise bad(f"temperature must be in 0.01..100, got {self.temperature}")
        if not isinstance(self.score, str) or not self.score:
            raise bad("score must name a rejection score")
        if self.threshold is not None and not math.isfinite(float(self.threshold)):
            raise bad(f"threshold must be a finite number or null, got {self.threshold}")
        if self.intensity not in INTENSITY_MODES:
            raise bad(f"intensity {self.intensity!r} is not one of {INTENSITY_MODES}")
        lo_hi = self.intensity_percentiles
        if len(lo_hi) != 2 or not (0.0 <= lo_hi[0] < lo_hi[1] <= 100.0):
            raise bad(f"intensity_percentiles must be (low, high) with 0 <= low < high <= 100, got {list(lo_hi)}")
        if self.quality is not None and not isinstance(self.quality, Mapping):
            raise bad(f"quality must be an object or null, got {type(self.quality).__name__}")
        if self.score not in LOGIT_SCORES and not self.score_output:
            raise bad(f"score {self.score!r} is not computed from logits ({', '.join(LOGIT_SCORES)}), "
                      "so score_output must name the graph output that carries it")
        return self

    @property
    def num_classes(self) -> int:
        return len(self.labels)

    @property
    def reject_index(self) -> int:
        return self.labels.index(REJECT_LABEL)

    def with_updates(self, **changes: Any) -> ModelMetadata:
        return replace(self, **changes)

    # ------------------------------------------------------------ serialisation
    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        for k in ("labels", "input_size", "mean", "std", "intensity_percentiles"):
            d[k] = list(d[k])
        return d

    def to_json(self, indent: int | None = None) -> str:
        return json.dumps(self.to_dict(), indent=indent, sort_keys=True)

    @classmethod
    def from_dict(cls, d: Mapping[str, Any], source: str = "<metadata>") -> ModelMetadata:
        if not isinstance(d, Mapping):
            raise MetadataError(f"{source}: invalid model metadata: expected a JSON object, got {type(d).__name__}")
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(d) - known)
        if unknown:
            raise MetadataError(f"{source}: invalid model metadata: unknown field(s) {unknown}; "
                                "was it written by a newer version of this project?")
        try:
            meta = cls(**dict(d))
        except (TypeError, ValueError) as e:
            raise MetadataError(f"{source}: invalid model metadata: {e}") from None
        return meta.validate(source)

    @classmethod
    def from_json(cls, text: str | bytes, source: str = "<metadata>") -> ModelMetadata:
        try:
            d = json.loads(text)
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise MetadataError(f"{source}: model metadata is not valid JSON: {e}") from None
        return cls.from_dict(d, source)

    @classmethod
    def from_props(cls, props: Mapping[str, str], source: str = "<model>") -> ModelMetadata:
        """Read from ONNX ``metadata_props`` (a name → string mapping)."""
        if METADATA_KEY not in props:
            raise MetadataError(f"{source}: no model metadata (ONNX metadata_props key {METADATA_KEY!r} is missing); "
                                "export the model with `python -m export` so labels and preprocessing travel with it")
        return cls.from_json(props[METADATA_KEY], source)

    def validate_against_model(self, source: str, input_shape: list[Any] | tuple[Any, ...],
                               output_classes: int | None) -> None:
        """Check that the metadata agrees with the model's actual input shape and class count."""
        if output_classes is not None and output_classes != self.num_classes:
            raise MetadataError(f"{source}: metadata lists {self.num_classes} labels but the model outputs "
                                f"{output_classes} classes")
        if len(input_shape) == 4:
            c, h, w = input_shape[1:]
            for name, want, got in (("channels", self.channels, c), ("height", self.input_size[0], h),
                                    ("width", self.input_size[1], w)):
                if isinstance(got, int) and got != want:
                    raise MetadataError(f"{source}: metadata says input {name} {want} but the model takes {got}")


# ------------------------------------------------------------------ sidecars
def sidecar_path(artifact: str | os.PathLike[str]) -> Path:
    """``model.engine`` → ``model.engine.json``."""
    p = Path(artifact)
    return p.with_name(p.name + ".json")


def write_sidecar(artifact: str | os.PathLike[str], meta: ModelMetadata,
                  extra: Mapping[str, Any] | None = None) -> Path:
    """Write ``{"metadata": ..., **extra}`` next to ``artifact``, atomically."""
    doc: dict[str, Any] = {"metadata": meta.validate(str(artifact)).to_dict()}
    doc.update(extra or {})
    return atomic_write_text(sidecar_path(artifact), json.dumps(doc, indent=2, sort_keys=True) + "\n")


def read_sidecar(artifact: str | os.PathLike[str]) -> tuple[ModelMetadata, dict[str, Any]]:
    """Return (metadata, the other sidecar fields). Errors name the sidecar file."""
    path = sidecar_path(artifact)
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise MetadataError(f"{artifact}: its metadata sidecar {path} is missing; rebuild the artifact") from None
    try:
        doc = json.loads(text)
    except json.JSONDecodeError as e:
        raise MetadataError(f"{path}: sidecar is not valid JSON: {e}") from None
    if not isinstance(doc, dict) or "metadata" not in doc:
        raise MetadataError(f"{path}: sidecar has no 'metadata' object")
    meta = ModelMetadata.from_dict(doc.pop("metadata"), str(path))
    return meta, doc
