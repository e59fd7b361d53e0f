"""``--output mqtt://host:1883/topic``: one JSON message per result to an MQTT broker, QoS 1, never lost.

Every result is first appended to a journal on local disk, then published with QoS 1; the broker's PUBACK marks it
delivered. While the broker is unreachable results stay in the journal and the status line says how many; when it
comes back they are sent in order. A run that ends while the broker is away leaves them in the journal and the
next run with the same broker and topic sends them first. In the normal case (broker down, restarted, slow) no
message is lost and none is sent twice; only a crash between the broker's PUBACK and the journal's note of it can
repeat a message, and every message carries its journal ``seq`` so a consumer can drop such a repeat.

URI: ``mqtt://[user[:password]@]host[:port]/topic[?option=value&...]``, ``mqtts://`` for TLS (port 8883).
Options: ``ca=FILE`` (TLS: the CA that signed the broker's certificate; default the system's), ``cert=FILE`` and
``key=FILE`` (TLS client certificate), ``spool=DIR`` (the journal folder), ``client_id=ID``, ``drain=S`` (how
long the end of a run waits for the broker to take what is still in the journal, default 5 s). The environment
gives the same: ``SEM_MQTT_USERNAME``, ``SEM_MQTT_PASSWORD``, ``SEM_MQTT_CA``, ``SEM_MQTT_SPOOL`` (the URI
wins). Prefer the environment for the password: a URI shows in the process list. Credentials are never written
anywhere by this module: not to the journal, the records, the status line or messages, which name the broker as
``mqtt://host:port/topic`` only.

Drift alarms (:mod:`runtime.drift`) go to ``<topic>/drift`` through the same journal, when they start and end.
"""

from __future__ import annotations

import fcntl
import json
import os
import queue
import ssl
import sys
import threading
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import parse_qsl, unquote, urlsplit

from runtime.files import atomic_write_text, sha256_bytes
from runtime.frameloop import LoopHook
from runtime.outputs import FrameResult, Output, OutputError, OutputWriteError

SCHEMES = {"mqtt": 1883, "mqtts": 8883}
DEFAULT_TOPIC = "sem/results"
ENV_USERNAME, ENV_PASSWORD, ENV_CA, ENV_SPOOL = ("SEM_MQTT_USERNAME", "SEM_MQTT_PASSWORD", "SEM_MQTT_CA",
                                                 "SEM_MQTT_SPOOL")
OPTIONS = ("ca", "cert", "key", "spool", "client_id", "drain")
#: Results handed to the MQTT client and not yet acknowledged, at most (the rest wait in the journal).
MAX_OUTSTANDING = 500
#: A journal segment is closed and a new one started beyond this size; acknowledged segments are deleted.
SEGMENT_BYTES = 8 << 20
INSTALL_HINT = "MQTT output needs paho-mqtt: pip install 'sem-defect-classifier[station]' (or pip install paho-mqtt)"


@dataclass(frozen=True)
class MqttConfig:
    """A parsed ``mqtt://`` / ``mqtts://`` URI. ``password`` never appears in :meth:`redacted` or ``repr``."""

    scheme: str
    host: str
    port: int
    topic: str
    username: str | None = None
    password: str | None = None
    ca: str | None = None
    cert: str | None = None
    key: str | None = None
    spool: str | None = None
    client_id: str | None = None
    drain_s: float = 5.0

    @property
    def tls(self) -> bool:
        return self.scheme == "mqtts"

    def redacted(self) -> str:
        """``mqtt://host:1883/topic``: what messages and summaries call this output (no user, no password)."""
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"{self.scheme}://{host}:{self.port}/{self.topic}"

    def __repr__(self) -> str:  # dataclass repr would show the password
        return f"MqttConfig({self.redacted()!r}, login={'yes' if self.username else 'no'})"

    def default_spool(self) -> Path:
        base = os.environ.get("XDG_STATE_HOME") or os.path.join(os.path.expanduser("~"), ".local", "state")
        digest = sha256_bytes(f"{self.host}\0{self.port}\0{self.topic}".encode())[:12]
        safe_host = "".join(c if c.isalnum() or c in "-." else "_" for c in self.host)[:40]
        return Path(base) / "sem-classifier" / "mqtt" / f"{safe_host}-{self.port}-{digest}"


def is_mqtt_uri(uri: str) -> bool:
    return str(uri).strip().lower().split("://", 1)[0] in SCHEMES and "://" in str(uri)


def parse_mqtt_uri(uri: str, env: Mapping[str, str] | None = None) -> MqttConfig:
    """Parse an MQTT output URI (see the module docstring); errors never repeat the password."""
    env = os.environ if env is None else env
    text = str(uri).strip()
    try:
        parts = urlsplit(text)
        port = parts.port
    except ValueError as e:
        raise OutputError(f"{_strip_login(text)}: not a valid MQTT URI: {e}") from None
    scheme = parts.scheme.lower()
    shown = _strip_login(text)
    if scheme not in SCHEMES:
        raise OutputError(f"{shown}: MQTT URIs start with mqtt:// or mqtts://")
    if not parts.hostname:
        raise OutputError(f"{shown}: no broker host (mqtt://host:1883/topic)")
    topic = unquote(parts.path.lstrip("/")) or DEFAULT_TOPIC
    if "#" in text or any(c in topic for c in "+\0"):
        raise OutputError(f"{shown}: topic {topic!r} has a wildcard or NUL; publish topics cannot")
    opts: dict[str, str] = {}
    for k, v in parse_qsl(parts.query, keep_blank_values=True):
        if k not in OPTIONS:
            raise OutputError(f"{shown}: unknown option {k!r}; known: {', '.join(OPTIONS)}")
        opts[k] = v
    username = unquote(parts.username) if parts.username else env.get(ENV_USERNAME) or None
    password = unquote(parts.password) if parts.password is not None else env.get(ENV_PASSWORD) or None
    try:
        drain = float(opts.get("drain", 5.0))
    except ValueError:
        raise OutputError(f"{shown}: drain must be seconds, got {opts['drain']!r}") from None
    ca = opts.get("ca") or env.get(ENV_CA) or None
    if (ca or opts.get("cert")) and scheme != "mqtts":
        raise OutputError(f"{shown}: ca=/cert= need TLS: use mqtts://")
    return MqttConfig(scheme=scheme, host=parts.hostname, port=port or SCHEMES[scheme], topic=topic,
                      username=username, password=password, ca=ca, cert=opts.get("cert") or None,
                      key=opts.get("key") or None, spool=opts.get("spool") or env.get(ENV_SPOOL) or None,
                      client_id=opts.get("client_id") or None, drain_s=max(0.0, drain))


def _strip_login(text: str) -> str:
    """The URI without anything between ``://`` and ``@`` (for messages about a URI that did not parse)."""
    head, sep, rest = text.partition("://")
    if not sep:
        return text
    netloc, slash, tail = rest.partition("/")
    return f"{head}://{netloc.rpartition('@')[2]}{slash}{tail.split('?', 1)[0]}"


# ------------------------------------------------------------------------------------------------ the journal
class Journal:
    """Append-only message journal in a folder: ``journal-<first seq>.jsonl`` segments and ``state.json`` holding
    the highest sequence number below which every message is acknowledged. One process at a time (a lock file).

    Lines are ``{"seq": n, "topic": t, "payload": "<json text>"}``, each written whole in one ``write``.
    """

    def __init__(self, folder: str | os.PathLike[str], log: Callable[[str], None] | None = None) -> None:
        self.folder = Path(folder)
        self._log = log or (lambda m: None)
        try:
            self.folder.mkdir(parents=True, exist_ok=True, mode=0o700)
            self._lock_fd = os.open(self.folder / "lock", os.O_RDWR | os.O_CREAT | getattr(os, "O_CLOEXEC", 0),
                                    0o600)
        except OSError as e:
            raise OutputWriteError(f"{self.folder}: cannot use as MQTT journal: {e.strerror or e}") from None
        try:
            fcntl.flock(self._lock_fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            os.close(self._lock_fd)
            raise OutputError(f"{self.folder}: MQTT journal in use by another process (give each run its own "
                              "?spool=DIR or SEM_MQTT_SPOOL)") from None
        self.acked = self._read_state()
        self._segments: list[tuple[int, Path]] = []  # (first seq, path), oldest first
        last = self.acked
        for p in sorted(self.folder.glob("journal-*.jsonl")):
            try:
                first = int(p.stem.split("-", 1)[1])
            except ValueError:
                continue
            end = self._repair(p)
            if end is None or end <= self.acked:
                p.unlink(missing_ok=True)  # empty, or everything in it acknowledged
                continue
            self._segments.append((first, p))
            last = max(last, end)
        self.written = last  # highest seq on disk
        self.resumed = self.written - self.acked  # left from an earlier run, sent first
        self._fd = -1
        self._fd_size = 0
        self._open_segment(self.written + 1)
        # reader: next seq to hand out, and where it is
        self.cursor = self.acked + 1
        self._rfile: Any = None
        self._rseg = 0

    def _read_state(self) -> int:
        try:
            return int(json.loads((self.folder / "state.json").read_text())["acked"])
        except FileNotFoundError:
            return 0
        except (ValueError, KeyError, TypeError, OSError) as e:
            self._log(f"{self.folder}/state.json unreadable ({e}); every message in the journal is sent again")
            return 0

    def _repair(self, path: Path) -> int | None:
        """The last seq in a segment; a line torn by a crash is cut off (it was never sent)."""
        data = path.read_bytes()
        if not data:
            return None
        if not data.endswith(b"\n"):
            keep = data.rfind(b"\n") + 1
            with open(path, "r+b") as f:
                f.truncate(keep)
            self._log(f"{path}: cut off a message torn by an earlier crash ({len(data) - keep} bytes)")
            data = data[:keep]
        lines = data.rstrip(b"\n").rsplit(b"\n", 1)
        if not lines[-1]:
            return None
        return int(json.loads(lines[-1])["seq"])

    def _open_segment(self, first: int) -> None:
        if self._fd >= 0:
            os.close(self._fd)
        path = self.folder / f"journal-{first:012d}.jsonl"
        try:
            self._fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT | getattr(os, "O_CLOEXEC", 0), 0o600)
        except OSError as e:
            raise OutputWriteError(f"{path}: cannot open MQTT journal: {e.strerror or e}") from None
        self._fd_size = os.fstat(self._fd).st_size
        self._segments.append((first, path))

    def append(self, topic: str, payload: str) -> int:
        """Write one message; returns its seq. Raises :class:`OutputWriteError` when the disk refuses."""
        seq = self.written + 1
        if self._fd_size >= SEGMENT_BYTES:
            self._open_segment(seq)
        line = (json.dumps({"seq": seq, "topic": topic, "payload": payload}, ensure_ascii=False) + "\n").encode()
        try:
            n = os.write(self._fd, line)
            if n != len(line):
                raise OSError(28, "short write")
        except OSError as e:
            raise OutputWriteError(f"{self.folder}: cannot write to the MQTT journal: {e.strerror or e}") from None
        self._fd_size += len(line)
        self.written = seq
        return seq

    def read_next(self) -> tuple[int, str, str] | None:
        """The message at :attr:`cursor` (and advance), or None when everything written was handed out."""
        while self.cursor <= self.written:
            if self._rfile is None:
                seg = self._segment_for(self.cursor)
                if seg is None:  # a gap (deleted segment): skip to the next one
                    later = [f for f, _ in self._segments if f > self.cursor]
                    if not later:
                        return None
                    self.cursor = later[0]
                    continue
                self._rseg, path = seg
                self._rfile = open(path, "rb")
            line = self._rfile.readline()
            if not line.endswith(b"\n"):  # end of this segment
                self._rfile.close()
                self._rfile = None
                nxt = [f for f, _ in self._segments if f > self._rseg]
                if not nxt:
                    return None
                self.cursor = max(self.cursor, nxt[0])
                continue
            msg = json.loads(line)
            if msg["seq"] < self.cursor:
                continue
            self.cursor = msg["seq"] + 1
            return msg["seq"], msg["topic"], msg["payload"]
        return None

    def _segment_for(self, seq: int) -> tuple[int, Path] | None:
        found = None
        for first, path in self._segments:
            if first <= seq:
                found = (first, path)
        return found

    def set_acked(self, seq: int) -> None:
        """Everything up to ``seq`` is acknowledged: note it and delete segments wholly below it."""
        self.acked = seq
        atomic_write_text(self.folder / "state.json", json.dumps({"acked": seq}) + "\n")
        while len(self._segments) > 1 and self._segments[1][0] <= seq + 1:
            _, path = self._segments.pop(0)
            path.unlink(missing_ok=True)  # the reader may still hold it open: fine on POSIX

    @property
    def pending(self) -> int:
        return self.written - self.acked

    def close(self) -> None:
        if self._rfile is not None:
            self._rfile.close()
            self._rfile = None
        if self._fd >= 0:
            try:
                os.fsync(self._fd)
            finally:
                os.close(self._fd)
                self._fd = -1
        if self.pending == 0:  # all delivered: leave a clean folder
            for _, path in self._segments:
                path.unlink(missing_ok=True)
        os.close(self._lock_fd)


# ------------------------------------------------------------------------------------------------ the output
def _import_paho() -> Any:
    try:
        import paho.mqtt.client as mqtt
    except ImportError:
        raise OutputError(INSTALL_HINT) from None
    return mqtt


class MqttOutput(Output):
    """Publish each result as one JSON message (the record plus ``seq``), QoS 1, through the on-disk journal."""

    def __init__(self, uri: str | MqttConfig, *, log: Callable[[str], None] | None = None,
                 connect_timeout: float = 5.0, client_factory: Any = None) -> None:
        mqtt = _import_paho()
        self.config = cfg = uri if isinstance(uri, MqttConfig) else parse_mqtt_uri(uri)
        self._log = log or (lambda m: print(f"[mqtt] {m}", file=sys.stderr, flush=True))
        self.journal = Journal(cfg.spool or cfg.default_spool(), log=self._log)
        self.sent = 0  # acknowledged by the broker in this run
        self.refused: str | None = None  # the broker's reason when it refuses the login
        self.connected = False
        self._acks: queue.SimpleQueue[int] = queue.SimpleQueue()
        self._by_mid: dict[int, int] = {}
        self._done: set[int] = set()
        self._lock = threading.Lock()  # journal writes (frame thread) vs reads and acks (sender thread)
        self._wake = threading.Event()
        self._connack = threading.Event()
        self._closing = False
        self._failed: str | None = None
        client_id = cfg.client_id or f"sem-{os.uname().nodename[:20]}-{os.getpid()}-{id(self) & 0xFFFF:x}"
        factory = client_factory or mqtt.Client
        self.client = c = factory(mqtt.CallbackAPIVersion.VERSION2, client_id=client_id, clean_session=True)
        if cfg.username:
            c.username_pw_set(cfg.username, cfg.password)
        if cfg.tls:
            for what, path in (("CA file", cfg.ca), ("client certificate", cfg.cert), ("client key", cfg.key)):
                if path and not os.path.isfile(path):
                    self.journal.close()
                    raise OutputError(f"{cfg.redacted()}: {what} {path} not found")
            try:
                c.tls_set(ca_certs=cfg.ca, certfile=cfg.cert, keyfile=cfg.key, cert_reqs=ssl.CERT_REQUIRED)
            except (ssl.SSLError, OSError, ValueError) as e:
                self.journal.close()
                raise OutputError(f"{cfg.redacted()}: TLS setup failed: {e}") from None
        c.max_inflight_messages_set(100)
        c.reconnect_delay_set(min_delay=1, max_delay=5)
        c.on_connect = self._on_connect
        c.on_disconnect = self._on_disconnect
        c.on_publish = self._on_publish
        first_error: BaseException | None = None
        try:
            c.connect(cfg.host, cfg.port, keepalive=30)
        except ssl.SSLError as e:
            self._abort()
            raise OutputError(f"{cfg.redacted()}: TLS handshake failed: {getattr(e, 'reason', None) or e} "
                              f"(CA file: {cfg.ca or 'the system CAs'})") from None
        except OSError as e:  # refused, unreachable, unknown host: spool and keep trying
            first_error = e
            c.connect_async(cfg.host, cfg.port, keepalive=30)
        c.loop_start()
        if first_error is None:
            self._connack.wait(connect_timeout)
        if self.refused:
            self._abort()
            raise OutputError(f"{cfg.redacted()}: the broker refused the login: {self.refused}"
                              + ("" if cfg.username else f" (no user name given: set {ENV_USERNAME} and "
                                 f"{ENV_PASSWORD}, or put user@ in the URI)"))
        if not self.connected:
            why = f"{type(first_error).__name__}: {first_error.strerror or first_error}" if isinstance(
                first_error, OSError) else "no answer"
            self._log(f"{cfg.redacted()} unreachable ({why}); results go to the journal {self.journal.folder} "
                      "and are sent when it is back")
        if self.journal.resumed:
            self._log(f"{self.journal.resumed} results left in {self.journal.folder} by an earlier run are sent "
                      "first")
        self._sender = threading.Thread(target=self._send_loop, name="mqtt-sender", daemon=True)
        self._sender.start()

    # -- paho callbacks (network thread; paho holds its own locks here: never take ours)
    def _on_connect(self, client: Any, userdata: Any, flags: Any, reason: Any, properties: Any = None) -> None:
        if getattr(reason, "is_failure", False):
            self.refused = str(reason)
            self.connected = False
        else:
            self.refused = None
            self.connected = True
        self._connack.set()
        self._wake.set()

    def _on_disconnect(self, client: Any, userdata: Any, flags: Any, reason: Any, properties: Any = None) -> None:
        self.connected = False
        self._wake.set()

    def _on_publish(self, client: Any, userdata: Any, mid: int, reason: Any = None, properties: Any = None) -> None:
        self._acks.put(mid)
        self._wake.set()

    # -- sender thread
    def _send_loop(self) -> None:
        last_state = 0.0
        dirty = False
        try:
            while True:
                self._wake.wait(0.2)
                self._wake.clear()
                with self._lock:
                    while True:
                        try:
                            mid = self._acks.get_nowait()
                        except queue.Empty:
                            break
                        seq = self._by_mid.pop(mid, None)
                        if seq is not None:
                            self._done.add(seq)
                            self.sent += 1
                    acked = self.journal.acked
                    while acked + 1 in self._done:
                        acked += 1
                        self._done.discard(acked)
                    if acked != self.journal.acked:
                        self.journal.acked, dirty = acked, True
                    now = time.monotonic()
                    if dirty and (now - last_state >= 0.2 or self._closing):
                        self.journal.set_acked(acked)
                        dirty, last_state = False, now
                    if self._closing and (self.journal.pending == 0 or not self.connected):
                        return
                while self.connected and len(self._by_mid) < MAX_OUTSTANDING:
                    with self._lock:  # held per message: the frame loop's writes never wait long
                        msg = self.journal.read_next()
                    if msg is None:
                        break
                    seq, topic, payload = msg
                    info = self.client.publish(topic, payload, qos=1)
                    self._by_mid[info.mid] = seq  # acks are handled in this thread: no race with _on_publish
        except Exception as e:  # noqa: BLE001 - reported by the next write and at close
            self._failed = f"{type(e).__name__}: {e}"

    # -- Output
    def write(self, result: FrameResult) -> None:
        record = result.record()
        self.publish_json(self.config.topic, record)

    def publish_json(self, topic: str, obj: Mapping[str, Any]) -> int:
        """Journal one JSON message for ``topic`` (sent when the broker takes it); returns its seq."""
        if self._failed:
            raise OutputWriteError(f"{self.config.redacted()}: sender stopped: {self._failed}")
        with self._lock:
            seq = self.journal.written + 1
            payload = json.dumps({**obj, "seq": seq}, ensure_ascii=False)
            self.journal.append(topic, payload)
        self._wake.set()
        return seq

    def publish_drift(self, state: Mapping[str, Any]) -> None:
        """A drift alarm starting or ending (:mod:`runtime.drift`), on ``<topic>/drift``."""
        self.publish_json(f"{self.config.topic}/drift", state)

    @property
    def pending(self) -> int:
        """Results written to the journal and not yet acknowledged by the broker."""
        return self.journal.pending

    def status_text(self) -> str:
        """A few words for the status line: connected or not, and how many results wait in the journal."""
        state = "up" if self.connected else ("login refused" if self.refused else "DOWN")
        return f"mqtt {state}" + (f", {self.pending} spooled" if self.pending else "")

    def _abort(self) -> None:
        try:
            self.client.loop_stop()
            self.client.disconnect()
        except Exception:  # noqa: BLE001
            pass
        self.journal.close()

    def close(self) -> None:
        if self._closing:
            return
        deadline = time.monotonic() + self.config.drain_s
        while self.pending and time.monotonic() < deadline and not self._failed and not self.refused:
            self._wake.set()
            time.sleep(0.02)
        self._closing = True
        self._wake.set()
        self._sender.join(timeout=5)
        try:
            self.client.disconnect()
            self.client.loop_stop()
        except Exception:  # noqa: BLE001 - the journal keeps what was not acknowledged
            pass
        left = self.pending
        with self._lock:
            self.journal.set_acked(self.journal.acked)
            self.journal.close()
        msg = f"{self.config.redacted()}: {self.sent} results acknowledged by the broker"
        if left:
            msg += (f"; {left} not yet: kept in {self.journal.folder}, sent first by the next run to this "
                    "broker and topic")
        self._log(msg)
        if self._failed:
            raise OutputWriteError(f"{self.config.redacted()}: sender stopped: {self._failed}")

    def describe(self) -> str:
        return self.config.redacted()


class MqttStatusHook(LoopHook):
    """Frame-loop hook of ``runtime.run``: the MQTT outputs' state (up/DOWN, results waiting in the journal) in the
    status line."""

    def __init__(self, outputs: list[MqttOutput]) -> None:
        self.outputs = outputs

    def status(self, loop: Any) -> str:
        return "  ".join(o.status_text() for o in self.outputs)

    def close(self) -> None:
        pass


__all__ = ["MqttConfig", "MqttOutput", "MqttStatusHook", "Journal", "parse_mqtt_uri", "is_mqtt_uri", "ENV_USERNAME",
           "ENV_PASSWORD", "ENV_CA", "ENV_SPOOL"]
