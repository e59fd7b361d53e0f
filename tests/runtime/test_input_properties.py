"""Property tests (hypothesis) of the runtime's public input contract: any array or byte string a camera, a file or a
caller can hand over gives a valid result or an :class:`InputError` naming the problem; never another exception, a
non-finite network input or a probability vector that is not one.

Only the public contract is tested (``Preprocessor``, ``decode_image``, ``Classifier.predict``), not how the
preprocessing gets there. Examples are derandomized so CI sees the same ones every run.
"""

from __future__ import annotations

from typing import Any

import numpy as np
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

from runtime import InputError, Prediction, Preprocessor
from runtime.contract import INVALID_LABEL
from runtime.preprocess import decode_image


def _elements(dtype: np.dtype) -> st.SearchStrategy | None:
    """Default elements, but floats without subnormals: hypothesis refuses those when a library in the process has
    turned on flush-to-zero."""
    return st.floats(width=8 * dtype.itemsize, allow_subnormal=False) if dtype.kind == "f" else None


DTYPES = (np.uint8, np.uint16, np.int8, np.int16, np.int32, np.int64, np.float16, np.float32, np.float64, np.bool_)
#: Any dtype, 0 to 4 dimensions, sides 0 to 24 (empty, 1-pixel, grey, colour, 2/4-channel, batched), NaN/inf included.
ANY_ARRAY = st.sampled_from(DTYPES).flatmap(
    lambda dt: hnp.arrays(np.dtype(dt), hnp.array_shapes(min_dims=0, max_dims=4, min_side=0, max_side=24),
                          elements=_elements(np.dtype(dt))))
#: Plausible frames: grey or 3-channel, 8 or 16 bit or float in [0, 1], big enough to be real images.
FRAMES = st.tuples(st.sampled_from((np.uint8, np.uint16, np.float32, np.float64)), st.integers(8, 64),
                   st.integers(8, 64), st.sampled_from((None, 3))).flatmap(
    lambda a: hnp.arrays(np.dtype(a[0]), (a[1], a[2]) if a[3] is None else (a[1], a[2], a[3]),
                         elements=st.floats(0, 1, width=32, allow_subnormal=False) if np.dtype(a[0]).kind == "f"
                         else None))
PROPERTY = settings(max_examples=150, deadline=None, derandomize=True,
                    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])


def _network_input_or_input_error(pre: Preprocessor, x: Any) -> np.ndarray | None:
    try:
        out = pre(x)
    except InputError as e:
        assert str(e), "an InputError must say what is wrong"
        return None
    meta = pre.meta if hasattr(pre, "meta") else None
    assert isinstance(out, np.ndarray) and out.dtype == np.float32 and out.ndim == 3
    if meta is not None:
        assert out.shape == (meta.channels, *meta.input_size)
    assert np.isfinite(out).all()
    return out


@PROPERTY
@given(x=ANY_ARRAY)
def test_preprocessing_any_array_gives_a_network_input_or_an_input_error(clf: Any, x: np.ndarray) -> None:
    _network_input_or_input_error(Preprocessor(clf.meta), x)


@PROPERTY
@given(x=FRAMES)
def test_plausible_frames_are_accepted(clf: Any, x: np.ndarray) -> None:
    """Grey or colour, 8/16 bit or float in [0, 1], 8 to 64 px: a real image, so never refused outright (the quality
    gate may still call it invalid: that is a result, not an error)."""
    assert _network_input_or_input_error(Preprocessor(clf.meta), x) is not None
    p = clf.predict(x)
    assert p.label in (*clf.labels, INVALID_LABEL)


@PROPERTY
@given(x=ANY_ARRAY)
def test_classifier_gives_a_prediction_or_an_input_error(clf: Any, x: np.ndarray) -> None:
    try:
        p = clf.predict(x)
    except InputError as e:
        assert str(e)
        return
    assert isinstance(p, Prediction)
    if p.label == INVALID_LABEL:
        assert p.rejected and p.reason, p
        return
    assert p.label in clf.labels and p.top_label in clf.labels
    assert np.isfinite(p.probs).all() and abs(float(np.sum(p.probs)) - 1.0) < 1e-4, p.probs
    assert 0.0 <= p.confidence <= 1.0


PNG_HEAD = b"\x89PNG\r\n\x1a\n"


@PROPERTY
@given(data=st.one_of(st.binary(max_size=512), st.binary(max_size=512).map(lambda b: PNG_HEAD + b)))
def test_decoding_any_bytes_gives_an_image_or_an_input_error(data: bytes) -> None:
    try:
        img = decode_image(data, "frame.png")
    except InputError as e:
        assert "frame.png" in str(e), str(e)  # the error names what it could not decode
        return
    assert isinstance(img, np.ndarray) and img.ndim in (2, 3) and img.size > 0
