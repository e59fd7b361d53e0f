"""The model contract: one class list, metadata that round-trips and refuses to be wrong quietly."""

from __future__ import annotations

import json

import pytest

from runtime.contract import (
    CLASSES,
    METADATA_KEY,
    ModelMetadata,
    read_sidecar,
    sidecar_path,
    write_sidecar,
)
from runtime.errors import MetadataError


def test_class_order_is_the_products():
    assert CLASSES == ("clean", "bridges", "gaps", "cracks", "foreign_materials", "cmp", "ler", "other")


def test_metadata_round_trips_through_json_and_props():
    meta = ModelMetadata(input_size=(128, 160), temperature=1.7, threshold=0.42, data_fingerprint="abc",
                         extra={"val_macro_f1": 0.9})
    assert ModelMetadata.from_json(meta.to_json()) == meta
    assert ModelMetadata.from_props({METADATA_KEY: meta.to_json()}) == meta
    assert ModelMetadata.from_json(meta.to_json()).input_size == (128, 160)


@pytest.mark.parametrize(
    ("change", "needle"),
    [
        ({"labels": ["a", "a", "other"]}, "labels"),
        ({"labels": ["a", "b"]}, "'other'"),
        ({"input_size": [0, 224]}, "input_size"),
        ({"mean": [0.5]}, "mean and std"),
        ({"std": [0.2, 0.0, 0.2]}, "std"),
        ({"temperature": float("nan")}, "temperature"),
        ({"resize": "bicubic-ish"}, "resize"),
        ({"score": "knn"}, "score_output"),
        ({"schema": "something-else/9"}, "schema"),
        ({"surprise": 1}, "unknown field"),
    ],
)
def test_malformed_metadata_names_the_source_and_the_problem(change, needle):
    d = ModelMetadata().to_dict()
    d.update(change)
    with pytest.raises(MetadataError) as e:
        ModelMetadata.from_json(json.dumps(d), source="models/x.onnx")
    assert "models/x.onnx" in str(e.value) and needle in str(e.value)


def test_missing_and_non_json_metadata_are_clear():
    with pytest.raises(MetadataError, match="m.onnx.*metadata_props"):
        ModelMetadata.from_props({}, source="m.onnx")
    with pytest.raises(MetadataError, match="m.onnx.*not valid JSON"):
        ModelMetadata.from_props({METADATA_KEY: "{oops"}, source="m.onnx")


def test_metadata_must_match_the_model():
    meta = ModelMetadata(input_size=(128, 128))
    meta.validate_against_model("m.onnx", ["N", 3, 128, 128], 8)  # dynamic batch is fine
    with pytest.raises(MetadataError, match="8 labels but the model outputs 5"):
        meta.validate_against_model("m.onnx", ["N", 3, 128, 128], 5)
    with pytest.raises(MetadataError, match="height 128 but the model takes 224"):
        meta.validate_against_model("m.onnx", [1, 3, 224, 128], 8)


def test_sidecar_round_trip_and_errors(tmp_path):
    engine = tmp_path / "model.engine"
    engine.write_bytes(b"\0")
    meta = ModelMetadata(precision="int8")
    path = write_sidecar(engine, meta, extra={"tensorrt_version": "10.3.0"})
    assert path == sidecar_path(engine) == tmp_path / "model.engine.json"
    got, extra = read_sidecar(engine)
    assert got == meta and extra == {"tensorrt_version": "10.3.0"}
    assert not list(tmp_path.glob("*.tmp"))  # written atomically, no leftovers

    path.write_text("{ not json")
    with pytest.raises(MetadataError, match="model.engine.json.*not valid JSON"):
        read_sidecar(engine)
    path.unlink()
    with pytest.raises(MetadataError, match="sidecar .* is missing"):
        read_sidecar(engine)
