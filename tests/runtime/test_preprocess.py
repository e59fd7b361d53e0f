"""The shared preprocessing accepts what SEM tools and cameras produce and refuses what would poison a batch."""

from __future__ import annotations

import struct
import zlib

import cv2
import numpy as np
import pytest

from runtime.contract import ModelMetadata
from runtime.errors import InputError
from runtime.preprocess import Normalizer, Preprocessor, load_grey, preprocess, read_image, resize_grey, to_grey

META = ModelMetadata(input_size=(32, 32))


def _ramp(h: int = 48, w: int = 64) -> np.ndarray:
    return np.tile(np.linspace(0, 255, w, dtype=np.float32), (h, 1)).astype(np.uint8)


def test_output_shape_dtype_and_normalisation():
    x = preprocess(np.full((40, 40), 255, np.uint8), META)
    assert x.shape == (3, 32, 32) and x.dtype == np.float32
    expected = (1.0 - np.array(META.mean)) / np.array(META.std)
    np.testing.assert_allclose(x[:, 0, 0], expected, rtol=1e-6)


def test_8bit_16bit_and_float_versions_of_one_image_agree():
    g8 = _ramp()
    g16 = g8.astype(np.uint16) * 257  # 255 → 65535: the same intensities on the 16-bit scale
    gf = g8.astype(np.float32) / 255
    a, b, c = (preprocess(g, META) for g in (g8, g16, gf))
    np.testing.assert_allclose(a, b, atol=2e-2)
    np.testing.assert_allclose(a, c, atol=2e-2)


def test_grey_colour_and_alpha_versions_agree():
    g = _ramp()
    variants = [
        g[:, :, None],
        np.dstack([g, g, g]),
        np.dstack([g, g, g, np.full_like(g, 255)]),
        np.dstack([g, np.full_like(g, 255)]),  # grey + alpha
    ]
    ref = preprocess(g, META)
    for v in variants:
        np.testing.assert_allclose(preprocess(v, META), ref, atol=1e-5)


@pytest.mark.parametrize("ext", [".png", ".tif", ".jpg", ".bmp"])
def test_files_in_common_formats(tmp_path, ext):
    path = tmp_path / f"img{ext}"
    assert cv2.imwrite(str(path), _ramp())
    got = preprocess(path, META)
    ref = preprocess(_ramp(), META)
    np.testing.assert_allclose(got, ref, atol=0.1 if ext == ".jpg" else 1e-5)


def test_16bit_tiff_keeps_its_depth(tmp_path):
    img = (np.arange(64 * 64, dtype=np.uint32).reshape(64, 64) * 15).astype(np.uint16)
    path = tmp_path / "sem16.tif"
    assert cv2.imwrite(str(path), img)
    grey = load_grey(path)
    assert grey.dtype == np.uint16 and grey.max() == img.max()


def _png_chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))


def _palette_png(indices: np.ndarray, palette: list[tuple[int, int, int]]) -> bytes:
    h, w = indices.shape
    raw = b"".join(b"\0" + row.astype(np.uint8).tobytes() for row in indices)
    return (b"\x89PNG\r\n\x1a\n" + _png_chunk(b"IHDR", struct.pack(">IIBBBBB", w, h, 8, 3, 0, 0, 0))
            + _png_chunk(b"PLTE", bytes(v for rgb in palette for v in rgb))
            + _png_chunk(b"IDAT", zlib.compress(raw)) + _png_chunk(b"IEND", b""))


def test_palette_png_is_read_as_its_colours(tmp_path):
    idx = np.zeros((16, 16), np.uint8)
    idx[:, 8:] = 1
    path = tmp_path / "pal.png"
    path.write_bytes(_palette_png(idx, [(10, 10, 10), (200, 200, 200)]))
    grey = load_grey(path)
    assert grey[0, 0] == 10 and grey[0, 15] == 200


def test_decompression_bomb_is_refused_before_decoding(tmp_path):
    path = tmp_path / "bomb.png"
    # Header claims 100k × 100k pixels; the body is tiny. Must be refused without allocating 10 GB.
    ihdr = struct.pack(">IIBBBBB", 100_000, 100_000, 8, 0, 0, 0, 0)
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + _png_chunk(b"IHDR", ihdr) + _png_chunk(b"IEND", b""))
    with pytest.raises(InputError, match=r"bomb.png.*100000×100000"):
        read_image(path)


@pytest.mark.parametrize(
    ("x", "needle"),
    [
        (np.zeros((0, 10), np.uint8), "empty"),
        (np.zeros((2, 2), np.uint8), "at least"),
        (np.full((16, 16), np.nan, np.float32), "NaN"),
        (np.zeros((16, 16, 5), np.uint8), "shape"),
        (np.zeros((16, 16), np.int64), "pixel type"),
        (np.zeros((16, 16), bool), "pixel type"),
        (np.full((16, 16), 3.0, np.float32), r"\[0, 1\]"),
        (np.zeros((4, 4000), np.uint8), "aspect"),
        ("not-an-array-or-path.xyz", "No such file"),
    ],
)
def test_bad_arrays_are_refused_with_a_clear_message(x, needle):
    with pytest.raises((InputError, OSError), match=needle):
        preprocess(x, META)


def test_absurd_array_size_is_refused_without_touching_pixels():
    huge = np.lib.stride_tricks.as_strided(np.zeros(1, np.uint8), shape=(20_000, 20_000), strides=(0, 0))
    with pytest.raises(InputError, match="MP"):
        to_grey(huge)


@pytest.mark.parametrize("content", [b"", b"not an image at all", None])
def test_empty_corrupt_and_truncated_files_name_the_file(tmp_path, content):
    path = tmp_path / "frame_0007.png"
    if content is None:  # truncated: a valid PNG cut in half
        ok, buf = cv2.imencode(".png", np.random.default_rng(0).integers(0, 255, (64, 64), np.uint8))
        content = buf.tobytes()[: len(buf) // 2]
    path.write_bytes(content)
    with pytest.raises(InputError, match="frame_0007.png"):
        preprocess(path, META)


def test_missing_file_and_directory_raise_oserror(tmp_path):
    with pytest.raises(FileNotFoundError, match="nope.png"):
        read_image(tmp_path / "nope.png")
    with pytest.raises(IsADirectoryError):
        read_image(tmp_path)


def test_preprocessor_writes_into_the_callers_buffer():
    pre = Preprocessor(META)
    buf = np.empty((3, 32, 32), np.float32)
    out = pre(_ramp(), out=buf)
    assert out is buf
    np.testing.assert_allclose(buf, preprocess(_ramp(), META))


def test_resize_shrinks_by_area_and_enlarges_linearly():
    checker = np.indices((64, 64)).sum(axis=0) % 2 * 255
    small = resize_grey(checker.astype(np.uint8), (32, 32), "area")
    assert np.all(np.abs(small.astype(int) - 128) <= 1)  # averaged, not aliased
    big = resize_grey(np.array([[0, 255]] * 8, np.uint8), (8, 16), "area")
    assert big.shape == (8, 16) and 0 < big[0, 7] < 255  # interpolated edge


@pytest.mark.parametrize("shape", [(1024, 1024), (1000, 1003), (300, 260), (130, 129)])
def test_area_shrink_is_an_area_average(shape):
    rng = np.random.default_rng(1)
    smooth = cv2.GaussianBlur(rng.integers(0, 255, shape).astype(np.uint8), (0, 0), 6)
    got = resize_grey(smooth, (128, 128), "area")
    ref = cv2.resize(smooth, (128, 128), interpolation=cv2.INTER_AREA)
    assert got.shape == (128, 128) and got.dtype == np.uint8
    assert np.abs(got.astype(int) - ref).mean() < 1.0
    flat = resize_grey(np.full(shape, 77, np.uint8), (128, 128), "area")
    assert np.all(flat == 77)


def test_normaliser_float_path_matches_lut_path():
    norm = Normalizer((0.5, 0.4, 0.3), (0.2, 0.25, 0.3))
    g8 = _ramp()
    np.testing.assert_allclose(norm(g8), norm(g8.astype(np.float32) / 255), atol=1e-5)


# ------------------------------------------------------------------------------------------ intensity modes
def _scene(size: int = 64, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    x = np.arange(size)
    img = np.tile(np.where((x // 6) % 2 == 0, 0.3, 0.75), (size, 1)).astype(np.float32)
    return np.clip(img + rng.normal(0, 0.03, img.shape).astype(np.float32), 0, 1)


PCT = META.with_updates(intensity="percentile")


def test_percentile_mode_gives_one_input_for_every_bit_depth_and_gain():
    img = _scene()
    ref = preprocess(np.round(img * 255).astype(np.uint8), PCT)
    for bits in (10, 12, 14, 16):
        x = preprocess(np.round(img * ((1 << bits) - 1)).astype(np.uint16), PCT)
        np.testing.assert_allclose(x, ref, atol=0.05, err_msg=f"{bits}-bit")
    dim = preprocess(np.round(img * 0.1 * 255).astype(np.uint8), PCT)  # a tenth of the brightness, 8-bit
    assert np.abs(dim - ref).mean() < 0.15
    flat = preprocess(np.round((0.5 + (img - 0.5) * 0.2) * 255).astype(np.uint8), PCT)  # a fifth of the contrast
    assert np.abs(flat - ref).mean() < 0.15


def test_stretch_maps_the_robust_range_to_0_1_and_survives_a_flat_frame():
    from runtime.preprocess import stretch

    g = np.linspace(0, 1000, 10001, dtype=np.float32).reshape(73, 137)
    s = stretch(g, (1, 99))
    assert s.dtype == np.float32 and s.min() == 0 and s.max() == 1
    assert np.count_nonzero(s == 0) == pytest.approx(0.01 * g.size, rel=0.05)
    assert np.isclose(stretch(g, (1, 99))[36, 68], 0.5, atol=0.01)
    assert np.all(stretch(np.full((8, 8), 7, np.uint16)) == 0)


def test_full_scale_mode_is_what_models_made_before_it_get():
    # A model without the field reads as full_scale and gets exactly the dtype-maximum scaling of before.
    legacy = ModelMetadata.from_dict({k: v for k, v in META.to_dict().items()
                                      if k not in ("intensity", "intensity_percentiles", "quality")})
    assert legacy.intensity == "full_scale"
    g16 = np.round(_scene() * 4095).astype(np.uint16)
    x = preprocess(g16, legacy)
    grey = resize_grey(g16, legacy.input_size)
    expected = (grey.astype(np.float32) / 65535 - np.float32(legacy.mean[0])) / np.float32(legacy.std[0])
    np.testing.assert_allclose(x[0], expected, rtol=1e-5, atol=1e-6)
    assert not np.allclose(x, preprocess(g16, PCT), atol=0.1)


@pytest.mark.parametrize("dtype", [np.uint8, np.uint16, np.float32])
def test_fast_percentiles_equal_numpys(dtype):
    from runtime.preprocess import percentiles

    rng = np.random.default_rng(0)
    for shape in ((128, 128), (7, 9), (1, 5)):
        x = (rng.random(shape) * (255 if dtype == np.uint8 else 4095 if dtype == np.uint16 else 1)).astype(dtype)
        for q in ((0.5, 99.5), (1, 99), (0, 100), (50,)):
            np.testing.assert_allclose(percentiles(x, q), np.percentile(x, q), rtol=1e-6, atol=1e-6)


def test_bit_depth_mode_scales_uint16_by_its_real_depth_and_leaves_8_bit_alone():
    bd = META.with_updates(intensity="bit_depth")
    img = _scene()
    ref = preprocess(np.round(img * 255).astype(np.uint8), META)
    np.testing.assert_array_equal(preprocess(np.round(img * 255).astype(np.uint8), bd), ref)
    for bits in (10, 12, 14, 16):
        x = preprocess(np.round(img * ((1 << bits) - 1)).astype(np.uint16), bd)
        np.testing.assert_allclose(x, ref, atol=0.02, err_msg=f"{bits}-bit")
    # full_scale sees 12-bit data as a dark frame
    assert np.abs(preprocess(np.round(img * 4095).astype(np.uint16), META) - ref).mean() > 0.5
