"""The client half of serving without a server: URLs, the wire encoding and its limits, ``Classifier("grpc://")``.

These run in every environment (no tritonclient needed, except where a test says so); the real-server tests are in
``test_serve.py``.
"""

from __future__ import annotations

import io
import sys
from pathlib import Path

import numpy as np
import pytest

from runtime.errors import InputError
from runtime.preprocess import MAX_PIXELS
from runtime.remote import (
    DEFAULT_GRPC_PORT,
    NPY_MAGIC,
    decode_npy,
    encode_item,
    is_remote,
    model_fingerprint,
    parse_url,
)


def test_parse_url_defaults_and_errors() -> None:
    assert parse_url("grpc://host") == (f"host:{DEFAULT_GRPC_PORT}", "sem_classifier", None)
    assert parse_url("grpc://10.0.0.5:9001/line3?fingerprint=abc") == ("10.0.0.5:9001", "line3", "abc")
    assert parse_url("GRPC://[::1]:8001/m")[0] == "[::1]:8001"
    for bad in ("http://host:8000/m", "grpc:///m", "grpc://host:notaport/m"):
        with pytest.raises(ValueError, match=r"grpc://host\[:port\]|bad port"):
            parse_url(bad)
    assert is_remote("grpc://h/m") and not is_remote("model.onnx") and not is_remote(Path("grpc:/x"))


def test_arrays_round_trip_through_the_wire_format() -> None:
    for arr in (np.arange(30 * 40, dtype=np.uint16).reshape(30, 40), np.zeros((8, 9, 3), np.uint8),
                np.asfortranarray(np.linspace(0, 1, 64, dtype=np.float32).reshape(8, 8))):
        data, name = encode_item(arr)
        assert data.startswith(NPY_MAGIC) and name.startswith("array(")
        back = decode_npy(data, name, MAX_PIXELS)
        assert back.dtype == arr.dtype and np.array_equal(back, arr)


def test_rgb_arrays_are_sent_in_the_servers_bgr_order() -> None:
    rgb = np.zeros((6, 6, 3), np.uint8)
    rgb[..., 0] = 200  # red
    back = decode_npy(encode_item(rgb, "rgb")[0], "x", MAX_PIXELS)
    assert back[0, 0].tolist() == [0, 0, 200]
    assert decode_npy(encode_item(rgb, "bgr")[0], "x", MAX_PIXELS)[0, 0].tolist() == [200, 0, 0]


def _npy_header(shape: tuple[int, ...], descr: str) -> bytes:
    buf = io.BytesIO()
    np.lib.format.write_array_header_1_0(buf, {"descr": descr, "fortran_order": False, "shape": shape})
    return buf.getvalue()


@pytest.mark.parametrize(("payload", "message"), [
    (_npy_header((50000, 50000), "|u1") + b"\0" * 8, "over the 100 MP limit"),  # claims 2.5 GB: refused unread
    (_npy_header((3, 3), "|u1") + b"\0" * 9, "at least 4×4"),
    (_npy_header((10, 10), "<i8") + b"\0" * 800, "unsupported pixel type int64"),
    (_npy_header((10, 10), "|O"), "unsupported pixel type object"),
    (_npy_header((10,), "|u1") + b"\0" * 10, "got shape (10,)"),
    (_npy_header((20, 20), "|u1") + b"\0" * 10, "truncated .npy array (10 of 400 data bytes)"),
    (NPY_MAGIC + b"\x09\x00garbage", "malformed .npy array"),
])
def test_hostile_arrays_are_refused_from_the_header(payload: bytes, message: str) -> None:
    with pytest.raises(InputError, match=f"^item: .*{__import__('re').escape(message)}"):
        decode_npy(payload, "item", MAX_PIXELS)


def test_encode_item_errors_match_the_local_runtime(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match="cannot read image"):
        encode_item(tmp_path / "missing.png")
    with pytest.raises(IsADirectoryError):
        encode_item(tmp_path)
    with pytest.raises(InputError, match="unsupported pixel type bool"):
        encode_item(np.zeros((8, 8), bool))
    with pytest.raises(InputError, match="expected an image path, encoded image bytes or a numpy array, got int"):
        encode_item(42)
    f = tmp_path / "a.png"
    f.write_bytes(b"12345")
    assert encode_item(f) == (b"12345", str(f)) and encode_item(b"xyz") == (b"xyz", "<3 bytes>")


def test_fingerprint_is_the_hash_of_the_artifact(tmp_path: Path) -> None:
    a, b = tmp_path / "a.onnx", tmp_path / "b.onnx"
    a.write_bytes(b"model one")
    b.write_bytes(b"model two")
    assert len(model_fingerprint(a)) == 16 and model_fingerprint(a) != model_fingerprint(b)
    import hashlib

    assert model_fingerprint(a) == hashlib.sha256(b"model one").hexdigest()[:16]


def test_without_tritonclient_the_error_says_what_to_install(monkeypatch: pytest.MonkeyPatch) -> None:
    from runtime.classifier import Classifier

    monkeypatch.setitem(sys.modules, "tritonclient.grpc", None)  # as if not installed (import raises ImportError)
    with pytest.raises(ImportError, match=r"pip install 'sem-defect-classifier\[client\]'"):
        Classifier("grpc://127.0.0.1:1/sem_classifier")
