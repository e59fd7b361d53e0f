"""``RemoteClassifier``: the station's ``Classifier`` API, answered by a Triton server (``python -m runtime.serve``).

>>> from runtime import Classifier
>>> clf = Classifier("grpc://inference-host:8001/sem_classifier")     # a RemoteClassifier
>>> p = clf.predict("wafer_0412.png")                                 # the same Prediction as a local model

Station code stays as it is: ``predict``/``predict_batch``/``Prediction`` behave like the local classifier, a bad
image raises the same ``InputError`` with the same message, and ``predict_batch(on_error="keep")`` keeps one bad
image from costing the others. Only ``tritonclient[grpc]`` is needed here (``pip install '.[client]'``).

The wire contract (this module is its one home; ``runtime.serve`` implements the server side of it): each item is
one ``image`` (``BYTES``): the encoded file (PNG, TIFF, JPEG, ...) or an ``.npy`` array (``np.save``; uint8,
uint16 or float in [0, 1]), with an optional ``source`` name for messages. Every output is per item: the decision
(``label``, ``index``, ``top_label``, ``top_index``, ``confidence``, ``score``, ``rejected``, ``reason``),
``probs``/``logits``, ``error`` (empty, or the local runtime's message for that item alone), ``fingerprint`` (which
model answered) and ``metadata`` (its contract, JSON).

A server that is down is retried with exponential backoff up to ``retry_timeout``; every response carries the
model fingerprint, so a server restarted with another model is an error, never a silent change of answers.

The client also works against the bare network in stock Triton (the repository ``python -m export.triton`` writes:
one float32 ``(N, C, H, W)`` input, logits and an optional score output, the model metadata and fingerprint in the
config's ``parameters``). It then runs the local classifier's own preprocessing, frame-quality gate, temperature
and rejection rule here (a :class:`~runtime.classifier.Classifier` whose backend is the server) and sends float32
batches; the fingerprint is checked when connecting, as the bare model's responses cannot carry it.
"""

from __future__ import annotations

import io
import os
import random
import threading
import time
from collections.abc import Iterable, Sequence
from typing import Any
from urllib.parse import parse_qs, urlsplit

import numpy as np

from runtime.classifier import Classifier, ClassifierBase, Prediction, PreparedFrame
from runtime.contract import METADATA_KEY, REJECT_LABEL, ModelMetadata
from runtime.errors import InputError, MetadataError
from runtime.files import sha256_file
from runtime.preprocess import Preprocessor, describe, read_image_bytes, resize_grey
from runtime.quality import QualityGate
from runtime.scores import is_rejected
from runtime.triton_backend import TritonBackend

#: URL schemes ``Classifier(...)`` hands to :class:`RemoteClassifier`.
SCHEMES = ("grpc://",)
DEFAULT_MODEL_NAME = "sem_classifier"
DEFAULT_GRPC_PORT = 8001

INPUT_IMAGE = "image"
INPUT_SOURCE = "source"
#: (name, numpy dtype, per-item shape); ``-1`` is the class count.
OUTPUTS: tuple[tuple[str, Any, tuple[int, ...]], ...] = (
    ("label", np.object_, (1,)), ("index", np.int32, (1,)), ("top_label", np.object_, (1,)),
    ("top_index", np.int32, (1,)), ("confidence", np.float32, (1,)), ("score", np.float32, (1,)),
    ("rejected", np.bool_, (1,)), ("reason", np.object_, (1,)), ("probs", np.float32, (-1,)),
    ("logits", np.float32, (-1,)), ("error", np.object_, (1,)), ("fingerprint", np.object_, (1,)),
    ("metadata", np.object_, (1,)),
)
#: What a prediction needs (``metadata`` is only asked for once, when connecting).
_PREDICTION_OUTPUTS = tuple(name for name, _, _ in OUTPUTS if name != "metadata")
NPY_MAGIC = b"\x93NUMPY"
#: The ``config.pbtxt`` parameter (``export.triton``) holding :func:`model_fingerprint` of the served artifact; the
#: metadata JSON is under :data:`runtime.contract.METADATA_KEY`.
FINGERPRINT_PARAMETER = "sem_fingerprint"


class ServerUnavailable(ConnectionError):
    """No Triton server answers at the URL (down, wrong host/port, or still starting) after the retries."""


class ModelMismatch(MetadataError):
    """The server does not serve the expected model: wrong name, or another fingerprint than expected."""


def model_fingerprint(path: str | os.PathLike[str]) -> str:
    """The identity of a model artifact: the first 16 hex digits of the SHA-256 of its bytes."""
    return sha256_file(path)[:16]


def is_remote(model: object) -> bool:
    return isinstance(model, str) and model.lower().startswith(SCHEMES)


def parse_url(url: str) -> tuple[str, str, str | None]:
    """``grpc://host:port/name?fingerprint=abc`` → (``host:port``, ``name``, fingerprint or None)."""
    parts = urlsplit(url)
    if parts.scheme.lower() != "grpc" or not parts.hostname:
        raise ValueError(f"{url!r}: expected grpc://host[:port][/model_name][?fingerprint=HEX]")
    host = parts.hostname if ":" not in parts.hostname else f"[{parts.hostname}]"
    try:
        port = parts.port or DEFAULT_GRPC_PORT
    except ValueError:
        raise ValueError(f"{url!r}: bad port") from None
    name = parts.path.strip("/") or DEFAULT_MODEL_NAME
    fp = parse_qs(parts.query).get("fingerprint", [None])[0]
    return f"{host}:{port}", name, fp


# --------------------------------------------------------------------------------------------- encoding (client)
def encode_item(x: Any, color_order: str = "bgr") -> tuple[bytes, str]:
    """One input → (wire bytes, source name). Paths are read here (missing files raise ``OSError`` like locally);
    RGB(A) arrays are sent as BGR(A), the server's order."""
    if isinstance(x, (bytes, bytearray, memoryview)):
        return bytes(x), f"<{len(x)} bytes>"
    if isinstance(x, (str, os.PathLike)):
        return read_image_bytes(x), str(x)
    if isinstance(x, np.ndarray):
        if x.dtype.kind not in "uf" or x.dtype == np.bool_:
            raise InputError(f"{describe(x)}: unsupported pixel type {x.dtype}; use uint8, uint16 or float in [0, 1]")
        name = describe(x)
        if color_order == "rgb" and x.ndim == 3 and x.shape[2] in (3, 4):
            x = x[:, :, [2, 1, 0, 3][:x.shape[2]]]
        buf = io.BytesIO()
        np.save(buf, np.ascontiguousarray(x), allow_pickle=False)
        return buf.getvalue(), name
    raise InputError(f"{describe(x)}: expected an image path, encoded image bytes or a numpy array, got "
                     f"{type(x).__name__}")


def decode_npy(data: bytes, name: str, max_pixels: int) -> np.ndarray:
    """Server side: an ``.npy`` payload → array, its header checked (dtype, rank, pixel count) before any copy."""
    from runtime.preprocess import _check_size

    f = io.BytesIO(data)
    try:
        version = np.lib.format.read_magic(f)
        read_header = {(1, 0): np.lib.format.read_array_header_1_0,
                       (2, 0): np.lib.format.read_array_header_2_0}.get(version)
        if read_header is None:
            raise ValueError(f"unsupported .npy version {version}")
        shape, fortran, dtype = read_header(f)  # the header only: nothing is allocated yet
    except Exception as e:  # noqa: BLE001 - any malformed header is the client's input error
        raise InputError(f"{name}: malformed .npy array: {e}") from None
    if dtype.hasobject or dtype.kind not in "uf" or dtype == np.bool_:
        raise InputError(f"{name}: unsupported pixel type {dtype}; use uint8, uint16 or float in [0, 1]")
    if len(shape) not in (2, 3):
        raise InputError(f"{name}: expected a grey (H, W) or colour (H, W, 3|4) image, got shape {tuple(shape)}")
    if shape[0] * shape[1] > max_pixels:
        raise InputError(f"{name}: image claims {shape[0]}×{shape[1]} = {shape[0] * shape[1] / 1e6:.0f} MP, over the "
                         f"{max_pixels / 1e6:.0f} MP limit")
    _check_size(int(shape[0]), int(shape[1]), name)
    offset = f.tell()
    count = int(np.prod(shape))
    need = count * dtype.itemsize
    body = data[offset:offset + need]
    if len(body) != need:
        raise InputError(f"{name}: truncated .npy array ({len(body)} of {need} data bytes)")
    arr = np.frombuffer(body, dtype, count)
    return arr.reshape(shape, order="F" if fortran else "C")


# --------------------------------------------------------------------------------------------- the client
class RemoteClassifier(ClassifierBase):
    """The :class:`~runtime.classifier.Classifier` API over gRPC to a Triton server.

    Not a ``Classifier`` over a remote :class:`~runtime.backend.Backend`: a ``runtime.serve`` server runs the whole
    classifier (decoding, quality gate, network, rejection), so the wire carries images and decisions, not float
    batches. The bare-network case is that ``Classifier`` (``_RawModelClassifier``); both share
    :class:`~runtime.classifier.ClassifierBase`.

    Args:
        url: ``grpc://host:port/model_name`` (port 8001, name ``sem_classifier`` by default); ``?fingerprint=HEX``
            pins the model (as does ``fingerprint``).
        threshold: ``None`` keeps the server's decision; a number or ``"off"`` re-decides rejection here from the
            returned score (rule: rejected when ``score < threshold``).
        batch_size: items per request in :meth:`predict_batch` (the server batches across clients too).
        timeout: seconds one request may take before it fails with ``TimeoutError``.
        retry_timeout: how long to keep retrying, with exponential backoff, while the server is unreachable.
        fingerprint: the expected model fingerprint (``runtime.remote.model_fingerprint(path)`` or the one
            ``runtime.serve`` prints); a server answering with another model raises :class:`ModelMismatch`.
        color_order: how 3/4-channel arrays are ordered, ``"bgr"`` (OpenCV) or ``"rgb"`` (PIL).
        ssl, root_certificates: gRPC over TLS (for a server fronted by a TLS proxy).
    """

    def __init__(self, url: str, threshold: float | str | None = None, *, batch_size: int = 8,
                 timeout: float = 30.0, retry_timeout: float = 30.0, fingerprint: str | None = None,
                 color_order: str = "bgr", ssl: bool = False, root_certificates: str | None = None) -> None:
        self._check_color_order(color_order)
        try:
            import tritonclient.grpc as grpcclient
            from tritonclient.utils import InferenceServerException
        except ImportError as e:
            raise ImportError(f"{url}: a remote model needs tritonclient: pip install 'sem-defect-classifier[client]' "
                              f"(or tritonclient[grpc]); {e}") from None
        self._grpc = grpcclient
        self._exc = InferenceServerException
        self.url = url
        self.address, self.model_name, url_fp = parse_url(url)
        self.expected_fingerprint = fingerprint or url_fp
        self.batch_size = max(1, int(batch_size))
        self.color_order = color_order
        self.timeout = float(timeout)
        self.retry_timeout = float(retry_timeout)
        self._override = threshold is not None
        self._client = grpcclient.InferenceServerClient(self.address, ssl=ssl, root_certificates=root_certificates)
        self.model_path = url
        self._connected = False
        self._raw: dict[str, Any] | None = None  # the bare network's layout, when the server has no runtime.serve
        self.fingerprint, meta = self._connect()
        self._connected = True
        self._set_model(meta, threshold)
        # Against a bare model the local classifier runs here, with the server as its backend.
        self._local = _RawModelClassifier(self, self._raw) if self._raw is not None else None

    @classmethod
    def from_classifier_args(cls, url: str, backend: str = "auto", threshold: float | str | None = None, *,
                             batch_size: int = 8, color_order: str = "bgr", **local_only: Any) -> RemoteClassifier:
        """``Classifier(url, ...)``: the local-only options (threads, providers, warmup, ...) do not apply here."""
        if backend not in ("auto", None):
            raise ValueError(f"{url}: backend={backend!r} does not apply to a remote model (the server chooses it)")
        return cls(url, threshold, batch_size=batch_size, color_order=color_order)

    # ---------------------------------------------------------------------------------------------- connection
    def _connect(self) -> tuple[str, ModelMetadata]:
        """Wait (with backoff) for the server, check the model is there and which one it is."""
        deadline = time.monotonic() + self.retry_timeout
        delay = 0.1
        while True:
            try:
                live = self._client.is_server_live(client_timeout=min(self.timeout, 5.0))
            except self._exc as e:
                live, why = False, _status_text(e)
            else:
                why = "server not live yet"
            if live:
                break
            if time.monotonic() + delay > deadline:
                raise ServerUnavailable(
                    f"{self.url}: no Triton server answers at {self.address} after {self.retry_timeout:.0f} s "
                    f"({why}); start one with `python -m runtime.serve --model MODEL` or check host and port")
            time.sleep(delay)
            delay = min(delay * 2, 2.0)
        if not self._model_ready():
            served = self._served_models()
            listing = f"it serves {', '.join(served)}" if served else "it lists no ready models to this client"
            raise ModelMismatch(f"{self.url}: the server at {self.address} has no ready model "
                                f"{self.model_name!r} ({listing})")
        cfg = self._client.get_model_config(self.model_name, as_json=True)["config"]
        names = {i["name"] for i in cfg.get("input", [])}
        self.max_batch = int(cfg.get("max_batch_size", 0)) or 1
        if INPUT_IMAGE not in names:
            if METADATA_KEY in cfg.get("parameters", {}) and len(names) == 1:
                return self._connect_raw(cfg)
            raise ModelMismatch(f"{self.url}: model {self.model_name!r} takes inputs {sorted(names)}, not the "
                                f"{INPUT_IMAGE!r} input of `python -m runtime.serve`, and its config has no model "
                                f"metadata parameter {METADATA_KEY!r} (as `python -m export.triton` writes); serve "
                                "the model with either")
        probe = np.full((16, 16), 128, np.uint8)
        outs = self._infer([encode_item(probe)[0]], ["<connection probe>"], ("fingerprint", "metadata"))
        fp = outs.as_numpy("fingerprint").reshape(-1)[0].decode()
        meta = ModelMetadata.from_json(outs.as_numpy("metadata").reshape(-1)[0], f"{self.url} (served metadata)")
        if self.expected_fingerprint and fp != self.expected_fingerprint:
            raise ModelMismatch(f"{self.url}: the server serves model fingerprint {fp}, expected "
                                f"{self.expected_fingerprint} (another model or version is being served)")
        return fp, meta

    def _connect_raw(self, cfg: dict[str, Any]) -> tuple[str, ModelMetadata]:
        """The bare network (``export.triton``): metadata and fingerprint from the config, layout checked."""
        params = cfg["parameters"]
        meta = ModelMetadata.from_json(params[METADATA_KEY].get("string_value", ""),
                                       f"{self.url} (config parameter {METADATA_KEY!r})")
        fp = params.get(FINGERPRINT_PARAMETER, {}).get("string_value", "")
        if self.expected_fingerprint and fp != self.expected_fingerprint:
            raise ModelMismatch(f"{self.url}: the server serves model fingerprint {fp or '(none in its config)'}, "
                                f"expected {self.expected_fingerprint} (another model or version is being served)")
        (inp,) = cfg["input"]
        batched = int(cfg.get("max_batch_size", 0)) > 0
        dims = [int(d) for d in inp.get("dims", [])]
        want = [meta.channels, *meta.input_size]
        if inp.get("data_type") != "TYPE_FP32" or dims[-3:] != want or len(dims) != (3 if batched else 4):
            raise ModelMismatch(f"{self.url}: model {self.model_name!r} input {inp['name']!r} is "
                                f"{inp.get('data_type')} {dims}, not the float32 {want} its metadata describes")
        outputs = {o["name"] for o in cfg.get("output", [])}
        needed = [meta.output_name] + ([meta.score_output] if meta.score_output else [])
        if missing := [n for n in needed if n not in outputs]:
            raise ModelMismatch(f"{self.url}: model {self.model_name!r} has outputs {sorted(outputs)}, not "
                                f"{missing} its metadata names")
        self._raw = {"input": inp["name"], "outputs": tuple(needed), "batched": batched}
        return fp, meta

    def _model_ready(self) -> bool:
        try:
            return bool(self._client.is_model_ready(self.model_name, client_timeout=min(self.timeout, 5.0)))
        except self._exc:
            return False

    def _served_models(self) -> list[str]:
        try:
            index = self._client.get_model_repository_index(as_json=True)
        except self._exc:
            return []
        return sorted(m["name"] for m in index.get("models", []) if m.get("state", "READY") == "READY")

    def _infer(self, payloads: list[bytes], sources: list[str], outputs: Sequence[str]) -> Any:
        """One ``runtime.serve`` request (images and their names), with retries (see :meth:`_request`)."""
        g = self._grpc
        n = len(payloads)
        image = g.InferInput(INPUT_IMAGE, [n, 1], "BYTES")
        image.set_data_from_numpy(np.array(payloads, dtype=np.object_).reshape(n, 1))
        source = g.InferInput(INPUT_SOURCE, [n, 1], "BYTES")
        source.set_data_from_numpy(np.array([s.encode() for s in sources], dtype=np.object_).reshape(n, 1))
        return self._request([image, source], outputs, n)

    def _request(self, inputs: list[Any], outputs: Sequence[str], n: int) -> Any:
        """One request with retries: an unreachable server is retried with backoff until ``retry_timeout``."""
        requested = [self._grpc.InferRequestedOutput(name) for name in outputs]
        deadline = time.monotonic() + self.retry_timeout
        delay = 0.1
        while True:
            try:
                return self._client.infer(self.model_name, inputs, outputs=requested, client_timeout=self.timeout)
            except self._exc as e:
                status = _status_text(e)
                if "DEADLINE_EXCEEDED" in status or "Deadline" in str(e):
                    raise TimeoutError(f"{self.url}: no answer within {self.timeout:g} s ({n} image(s))") from None
                # Once connected, an unknown model means the server is restarting (models load after the ports
                # open) or unloading: retried like a server that is down.
                restarting = self._connected and "unknown model" in str(e).lower()
                if not (_retryable(e) or restarting) or time.monotonic() + delay > deadline:
                    if _retryable(e) or restarting:
                        raise ServerUnavailable(f"{self.url}: server unreachable for {self.retry_timeout:.0f} s "
                                                f"({status}: {e.message()})") from None
                    if "unknown model" in str(e).lower() or "not ready" in str(e).lower():
                        raise ModelMismatch(f"{self.url}: {e.message()}") from None
                    raise RuntimeError(f"{self.url}: inference failed: {status}: {e.message()}") from None
            time.sleep(delay * (0.5 + random.random()))  # jitter: restarted servers are not hit by all at once
            delay = min(delay * 2, 2.0)

    # ---------------------------------------------------------------------------------------------- info
    def describe(self) -> str:
        return (f"{self.model_name} at {self.address} (fingerprint {self.fingerprint}, {self.meta.arch}, "
                f"{self.meta.precision}, {len(self.labels)} classes, reject: {self._reject_rule()}) on Triton")

    def __repr__(self) -> str:
        return f"RemoteClassifier({self.describe()})"

    def close(self) -> None:
        self._client.close()

    # ---------------------------------------------------------------------------------------------- predict
    def prepare(self, x: Any) -> np.ndarray:
        """Decode, validate and grey here (pipelines call it in their decode thread), and shrink a frame larger than
        the model input to its size, so :meth:`predict` sends a small array instead of the whole file. A smaller
        frame is sent as it is: the server's frame-quality gate judges it before enlarging, exactly as locally
        (the gate's verdict comes back with the prediction)."""
        if isinstance(x, PreparedFrame):
            return x
        if self._local is not None:  # bare model: the whole local preparation, quality gate included
            return self._local.prepare(x)
        grey = self._load_grey(x, self._input_name(x))
        (h, w), size = grey.shape[:2], self.meta.input_size
        if h >= size[0] and w >= size[1]:
            grey = resize_grey(grey, size, self.meta.resize)
        return np.ascontiguousarray(grey).view(PreparedFrame)

    def predict(self, x: Any, source: str | None = None) -> Any:
        """Classify one image (path, encoded bytes or array) on the server; errors as the local runtime's."""
        if self._local is not None:
            return self._local.predict(x, source)
        out = self.predict_batch([x], on_error="raise", sources=None if source is None else [source])[0]
        return out

    def predict_batch(self, items: Iterable[Any], batch_size: int | None = None, on_error: str = "raise",
                      sources: Sequence[str] | None = None) -> list[Any]:
        """Classify many images, ``batch_size`` per request; results in input order (see ``Classifier``)."""
        if self._local is not None:
            return self._local.predict_batch(items, batch_size, on_error, sources)
        items = self._batch_items(items, on_error, sources)
        size = min(max(1, int(batch_size or self.batch_size)), self.max_batch)  # Triton refuses larger requests
        results: list[Any] = [None] * len(items)
        for start in range(0, len(items), size):
            payloads, names, slots = [], [], []
            for j, x in enumerate(items[start:start + size]):
                try:
                    data, name = encode_item(x, self.color_order)
                except (InputError, OSError) as e:
                    if on_error == "raise":
                        raise
                    results[start + j] = e
                    continue
                payloads.append(data)
                names.append(sources[start + j] if sources is not None else name)
                slots.append(start + j)
            if not payloads:
                continue
            t0 = time.perf_counter()
            outs = self._infer(payloads, names, _PREDICTION_OUTPUTS)
            ms = (time.perf_counter() - t0) * 1e3 / len(payloads)
            for k, (slot, name) in enumerate(zip(slots, names)):
                r = self._decode(outs, k, name, ms)
                if isinstance(r, Exception) and on_error == "raise":
                    raise r
                results[slot] = r
        return results

    def _decode(self, outs: Any, k: int, name: str, ms: float) -> Prediction | InputError:
        def one(key: str) -> Any:
            return outs.as_numpy(key)[k]

        fp = one("fingerprint")[0].decode()
        if fp != self.fingerprint:
            raise ModelMismatch(f"{self.url}: the server now serves model fingerprint {fp}, not {self.fingerprint} "
                                "it served when this client connected (restarted with another model?)")
        err = one("error")[0].decode()
        if err:
            return InputError(_rename(err, name))
        reason = one("reason")[0].decode()
        top = int(one("top_index")[0])
        score = float(one("score")[0])
        rejected = bool(one("rejected")[0])
        label, index = one("label")[0].decode(), int(one("index")[0])
        if self._override and not reason:
            rejected = bool(is_rejected(score, self.threshold))
            label, index = (REJECT_LABEL, self.reject_index) if rejected else (self.labels[top], top)
        return Prediction(
            label=label, index=index, top_label=one("top_label")[0].decode(), top_index=top,
            confidence=float(one("confidence")[0]), probs=np.array(one("probs"), np.float32),
            logits=np.array(one("logits"), np.float32), rejected=rejected, score=score,
            timings={"total": ms}, source=name, reason=reason)


# --------------------------------------------------------------------------------------------- bare models
class _RawModelClassifier(Classifier):
    """The local :class:`~runtime.classifier.Classifier` (its preparation, quality gate, temperature and rejection,
    unchanged) over :class:`~runtime.triton_backend.TritonBackend`: only the network runs on the server."""

    def __init__(self, remote: RemoteClassifier, layout: dict[str, Any]) -> None:  # noqa: D107 - see class
        self._remote = remote
        self.model_path = remote.url
        self.backend = TritonBackend(remote, layout)
        self.meta = remote.meta
        self.labels, self.reject_index = remote.labels, remote.reject_index
        self.batch_size, self.color_order = remote.batch_size, remote.color_order
        self._pre = Preprocessor(self.meta, remote.color_order)
        self.quality_gate = QualityGate.for_model(self.meta, remote.url)
        self._lock = threading.RLock()
        self._rows = np.arange(1024)
        self.self_check_report = None

    @property
    def threshold(self) -> float | None:  # the remote client's, so changing it there applies here
        return self._remote.threshold

    @threshold.setter
    def threshold(self, value: float | None) -> None:
        self._remote.threshold = value


def _rename(message: str, name: str) -> str:
    """The server names items ``<N bytes>``; the client knows the path: put it in front, as locally."""
    if message.startswith("<") and ">: " in message:
        return f"{name}: {message.split('>: ', 1)[1]}"
    return message


def _status_text(e: Any) -> str:
    try:
        return str(e.status() or "")
    except Exception:  # noqa: BLE001
        return ""


def _retryable(e: Any) -> bool:
    s, text = _status_text(e), str(e).lower()
    # A stopping server first unloads its models ("no available versions"): it is coming back, not misconfigured.
    return ("UNAVAILABLE" in s or "socket closed" in text or "failed to connect" in text
            or "has no available versions" in text)

