"""``--output http://HOST:PORT``: a live view of the run in a browser (standard library only).

A small page served by the runtime from a thread (``http.server``): the latest frame of each source with its
overlay (label, confidence, rejected/invalid), class counts, rejection rate, invalid frames by reason, and each
source's state, fps and drops, updated live. The page's numbers come as server-sent events (``/events``, twice a
second); its pictures are fetched one after the other (``/frame/<i>.jpg``), and ``/stream/<i>.mjpg`` is the same
as an MJPEG stream for other viewers. Classification never waits for the page: :meth:`LiveViewOutput.write` only
keeps a reference to the newest result of each source; frames are drawn and JPEG-encoded in the server's threads,
only when a viewer asks, at most once per frame whatever the number of viewers.

Security: the view shows the station's images. It listens on 127.0.0.1 unless the URI (or ``--host``) names
another address; then a token is required (``--http-token``, or ``SEM_HTTP_TOKEN``), given by the browser as
``?token=...`` (the page passes it on) or ``Authorization: Bearer ...``; without one the run does not start.
"""

from __future__ import annotations

import hmac
import json
import os
import threading
import time
import urllib.parse
from collections import Counter
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

import cv2

from runtime.outputs import FrameResult, Output, OutputError, draw_overlay
from runtime.sources import redact

TOKEN_ENV = "SEM_HTTP_TOKEN"
LOCALHOST = "127.0.0.1"
MAX_SIDE = 640  # frames are shrunk to this for the page
JPEG_QUALITY = 80
STREAM_FPS = 10.0  # the MJPEG stream's rate cap
EVENTS_EVERY_S = 0.5


def is_loopback(host: str) -> bool:
    """Whether a listening address is reachable from this machine only."""
    import ipaddress

    h = host.strip("[]")
    if h == "localhost":
        return True
    try:
        return ipaddress.ip_address(h).is_loopback
    except ValueError:
        return False


class _Slot:
    """The newest result of one source, and its JPEG once someone asked for it."""

    __slots__ = ("name", "result", "seq", "jpeg", "jpeg_seq", "jpeg_info")

    def __init__(self, name: str) -> None:
        self.name = name
        self.result: FrameResult | None = None
        self.seq = 0
        self.jpeg: bytes | None = None
        self.jpeg_seq = -1
        self.jpeg_info: dict[str, Any] = {}  # what the JPEG shows (label, confidence, ...), for its caption


class LiveViewOutput(Output):
    """The live view (see module docstring). ``host``/``port`` as bound; ``url`` to open (without the token)."""

    needs_image = True

    def __init__(self, host: str = LOCALHOST, port: int = 8080, token: str | None = None) -> None:
        self.host = host
        token = token or os.environ.get(TOKEN_ENV) or None
        if not is_loopback(host) and not token:
            raise OutputError(f"http://{host}:{port}: the live view would be reachable from other machines and "
                              f"shows the station's images: give a token with --http-token or ${TOKEN_ENV}, or "
                              f"listen on {LOCALHOST}")
        self._token = token
        self._lock = threading.Lock()
        self._encode_lock = threading.Lock()
        self._slots: dict[str, _Slot] = {}
        self._labels: Counter[str] = Counter()
        self._invalid: Counter[str] = Counter()
        self.frames = self.classified = self.rejected = self.errors = 0
        self.encoded = 0  # JPEGs made (tests: only at the page's rate)
        self._loop: Any = None
        self._started = time.monotonic()
        self._closing = threading.Event()
        view = self

        class Handler(_Handler):
            live = view

        try:
            self._server = ThreadingHTTPServer((host, port), Handler)
        except OSError as e:
            raise OutputError(f"http://{host}:{port}: cannot listen: {e.strerror or e}") from None
        self._server.daemon_threads = True
        self.port = self._server.server_address[1]
        self._thread = threading.Thread(target=self._server.serve_forever, kwargs={"poll_interval": 0.2},
                                        name="liveview", daemon=True)
        self._thread.start()

    @classmethod
    def from_uri(cls, uri: str, host: str = LOCALHOST, token: str | None = None) -> LiveViewOutput:
        """``http://[HOST]:PORT[/]``: an empty HOST takes ``host`` (``--host``, default 127.0.0.1)."""
        parsed = urllib.parse.urlsplit(uri)
        if parsed.path not in ("", "/") or parsed.query or parsed.username or parsed.password:
            raise OutputError(f"{redact(uri)}: a live view is http://HOST:PORT (no path, query or login)")
        try:
            port = parsed.port if parsed.port is not None else 8080
        except ValueError:
            raise OutputError(f"{redact(uri)}: bad port") from None
        return cls(parsed.hostname or host, port, token)

    # ---------------------------------------------------------------------------------------------- the run side
    @property
    def url(self) -> str:
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"http://{host}:{self.port}/"

    @property
    def startup_note(self) -> str:
        if self._token:
            return (f"live view on {self.url} (token required: open {self.url}?token=<token>, or send "
                    "Authorization: Bearer <token>)")
        return f"live view on {self.url} (this machine only; --host and --http-token to open it to others)"

    def attach(self, loop: Any) -> None:
        """Called by the frame loop at start: source states and the model come from it."""
        self._loop = loop
        with self._lock:
            for f in loop.feeds:
                self._slots.setdefault(f.name, _Slot(f.name))

    def write(self, result: FrameResult) -> None:
        """Keep the newest result per source and count it: no drawing or encoding here."""
        name = redact(result.frame.source)
        loop = self._loop
        if loop is not None and len(loop.feeds) == 1:
            name = loop.feeds[0].name  # a folder is one source, whatever its file names
        elif loop is not None:
            name = next((f.name for f in loop.feeds if f.last is not None and f.last.frame is result.frame), name)
        p = result.prediction
        with self._lock:
            slot = self._slots.get(name)
            if slot is None:
                slot = self._slots[name] = _Slot(name)
            slot.result = result
            slot.seq += 1
            self.frames += 1
            if p is None:
                self.errors += 1
            elif p.reason:
                self._invalid[p.reason] += 1
            else:
                self.classified += 1
                self.rejected += bool(p.rejected)
                self._labels[p.label] += 1

    def describe(self) -> str:
        return f"live view {self.url}"

    def close(self) -> None:
        self._closing.set()
        server = getattr(self, "_server", None)
        if server is not None:
            self._server = None
            server.shutdown()
            server.server_close()

    # ---------------------------------------------------------------------------------------------- the page side
    def check_token(self, query: dict[str, list[str]], auth: str | None) -> bool:
        if not self._token:
            return True
        given = (query.get("token") or [""])[0]
        if not given and auth and auth.lower().startswith("bearer "):
            given = auth[7:].strip()
        return hmac.compare_digest(given.encode(), self._token.encode())

    def status(self, pictures: bool = False) -> dict[str, Any]:
        """The numbers the page shows (also ``/status.json``); ``pictures``: also encode each source's newest
        frame now and say what it shows (``shown``), so the page opens with pictures and matching captions."""
        loop = self._loop
        feeds = {f.name: f for f in (loop.feeds if loop is not None else [])}
        with self._lock:
            slots = list(self._slots.values())
            doc: dict[str, Any] = {
                "frames": self.frames, "classified": self.classified, "rejected": self.rejected,
                "rejection_rate": self.rejected / self.classified if self.classified else 0.0,
                "invalid": dict(self._invalid.most_common()), "errors": self.errors,
                "labels": dict(self._labels.most_common()),
            }
        doc["model"] = loop.summary.model if loop is not None else ""
        doc["uptime_s"] = round(time.monotonic() - self._started, 1)
        sources = []
        for i, slot in enumerate(slots):
            f = feeds.get(slot.name)
            r = slot.result
            p = r.prediction if r is not None else None
            sources.append({
                "id": i, "name": slot.name, "state": f.state if f is not None else "running",
                "fps": round(f.fps_now, 1) if f is not None else None,
                "frames": f.frames if f is not None else None,
                "dropped": f.total_dropped if f is not None else 0,
                "reconnects": f.total_reconnects if f is not None else 0,
                "label": p.label if p is not None else None, "confidence": round(p.confidence, 3) if p else None,
                "rejected": bool(p.rejected) if p is not None else None, "reason": (p.reason or None) if p else None,
                "error": r.error if r is not None else None, "seq": slot.seq,
            })
            if pictures and r is not None:
                data, seq, info = self.jpeg_with_info(i)
                if data is not None:
                    sources[-1]["shown"] = {**info, "seq": seq}
        doc["sources"] = sources
        return doc

    def jpeg(self, index: int) -> tuple[bytes | None, int]:
        """The JPEG of source ``index``'s newest frame with its overlay (made once per frame), and its number."""
        data, seq, _ = self.jpeg_with_info(index)
        return data, seq

    def jpeg_with_info(self, index: int, seq: int | None = None) -> tuple[bytes | None, int, dict[str, Any]]:
        """:meth:`jpeg` and what the picture shows (label, confidence, rejected, reason, error); ``seq``: that
        picture if it is the one encoded last (the page's first picture), else the newest."""
        with self._lock:
            slots = list(self._slots.values())
        if not 0 <= index < len(slots):
            return None, -1, {}
        slot = slots[index]
        with self._encode_lock:
            if slot.jpeg_seq in (slot.seq, seq) or slot.result is None:
                return slot.jpeg, slot.jpeg_seq, slot.jpeg_info
            result, seq = slot.result, slot.seq
            img = result.frame.image
            size = None
            if img is not None:
                h, w = img.shape[:2]
                scale = min(1.0, MAX_SIDE / max(h, w))
                size = (max(1, round(w * scale)), max(1, round(h * scale)))
            canvas = draw_overlay(img, result, size)
            ok, buf = cv2.imencode(".jpg", canvas, [cv2.IMWRITE_JPEG_QUALITY, JPEG_QUALITY])
            if ok:
                p = result.prediction
                slot.jpeg, slot.jpeg_seq = buf.tobytes(), seq
                slot.jpeg_info = {"label": p.label if p else None,
                                  "confidence": round(p.confidence, 3) if p else None,
                                  "rejected": bool(p.rejected) if p else None,
                                  "reason": (p.reason or None) if p else None,
                                  "error": result.error, "frame": result.frame.index}
                self.encoded += 1
            return slot.jpeg, slot.jpeg_seq, slot.jpeg_info


class _Handler(BaseHTTPRequestHandler):
    live: LiveViewOutput
    server_version = "sem-liveview"
    protocol_version = "HTTP/1.1"

    def log_message(self, fmt: str, *args: Any) -> None:  # requests are not logged (tokens in query strings)
        pass

    def _send(self, code: int, body: bytes, ctype: str, extra: dict[str, str] | None = None) -> None:
        self.send_response(code)
        self.send_header("Content-Type", ctype)
        self.send_header("Content-Length", str(len(body)))
        self.send_header("Cache-Control", "no-store")
        self.send_header("X-Content-Type-Options", "nosniff")
        for k, v in (extra or {}).items():
            self.send_header(k, v)
        self.end_headers()
        self.wfile.write(body)

    def do_GET(self) -> None:  # noqa: N802 - http.server's name
        url = urllib.parse.urlsplit(self.path)
        query = urllib.parse.parse_qs(url.query)
        live = self.live
        if not live.check_token(query, self.headers.get("Authorization")):
            self._send(401, b"token required\n", "text/plain; charset=utf-8", {"WWW-Authenticate": "Bearer"})
            return
        path = url.path
        try:
            if path in ("/", "/index.html"):
                initial = json.dumps(live.status(pictures=True)).replace("</", "<\\/")
                self._send(200, PAGE.replace("/*INITIAL*/null", initial).encode(), "text/html; charset=utf-8")
            elif path == "/status.json":
                self._send(200, json.dumps(live.status()).encode(), "application/json")
            elif path == "/events":
                self._events()
            elif path.startswith("/frame/") and path.endswith(".jpg"):
                want = (query.get("n") or [""])[0]
                data, _, info = live.jpeg_with_info(_index(path, "/frame/", ".jpg"),
                                                    int(want) if want.isdigit() else None)
                if data is None:
                    self._send(404, b"no frame yet\n", "text/plain; charset=utf-8")
                else:
                    self._send(200, data, "image/jpeg", {"X-Result": json.dumps(info)})
            elif path.startswith("/stream/") and path.endswith(".mjpg"):
                self._mjpeg(_index(path, "/stream/", ".mjpg"))
            else:
                self._send(404, b"not found\n", "text/plain; charset=utf-8")
        except (BrokenPipeError, ConnectionResetError):  # the viewer went away
            pass

    def _events(self) -> None:
        self.send_response(200)
        self.send_header("Content-Type", "text/event-stream")
        self.send_header("Cache-Control", "no-store")
        self.send_header("Connection", "close")
        self.end_headers()
        self.close_connection = True
        while not self.live._closing.is_set():
            self.wfile.write(b"data: " + json.dumps(self.live.status()).encode() + b"\n\n")
            self.wfile.flush()
            self.live._closing.wait(EVENTS_EVERY_S)

    def _mjpeg(self, index: int) -> None:
        self.send_response(200)
        self.send_header("Content-Type", "multipart/x-mixed-replace; boundary=frame")
        self.send_header("Cache-Control", "no-store")
        self.send_header("Connection", "close")
        self.end_headers()
        self.close_connection = True
        last = -1
        while not self.live._closing.is_set():
            data, seq = self.live.jpeg(index)
            if data is not None and seq != last:
                last = seq
                self.wfile.write(b"--frame\r\nContent-Type: image/jpeg\r\nContent-Length: " + str(len(data)).encode()
                                 + b"\r\n\r\n" + data + b"\r\n")
                self.wfile.flush()
            self.live._closing.wait(1.0 / STREAM_FPS)


def _index(path: str, prefix: str, suffix: str) -> int:
    try:
        return int(path[len(prefix):-len(suffix)])
    except ValueError:
        return -1


PAGE = """<!doctype html>
<html lang="en"><head><meta charset="utf-8"><title>SEM classifier: live view</title>
<meta name="viewport" content="width=device-width, initial-scale=1">
<style>
body{font:14px system-ui,sans-serif;margin:0;background:#111;color:#ddd}
header{padding:8px 14px;background:#222;display:flex;gap:24px;flex-wrap:wrap;align-items:baseline}
header b{color:#fff;font-size:18px}.num{font-size:18px;color:#fff}
*{box-sizing:border-box}main{display:flex;gap:14px;padding:14px;align-items:flex-start}
.card{background:#1c1c1c;border:1px solid #333;border-radius:6px;padding:8px;width:300px}
.card img{width:100%;aspect-ratio:1;object-fit:contain;background:#000;display:block}
.state{padding:1px 6px;border-radius:4px;background:#444}.running{background:#185c2a}
.reconnecting,.connecting{background:#7a5a00}
.failed{background:#7a1a1a}.rej{color:#ffa500}.inv{color:#e040e0}.err{color:#ff5050}.ok{color:#5d5}
table{border-collapse:collapse}td{padding:2px 8px}.bar{background:#3a6ea5;height:10px}
#side{width:250px}.card img:not([src]){visibility:hidden}#model{font-size:12px;color:#999;width:100%}
</style></head><body>
<header><b>SEM classifier</b><span>frames <span class="num" id="frames">-</span></span>
<span>rejection rate <span class="num" id="rej">-</span></span><span>invalid <span class="num" id="inv">-</span></span>
<span>errors <span class="num" id="errs">-</span></span><span id="model"></span>
<span id="conn">connecting</span></header>
<main><div id="side" class="card"><div>class counts</div><table id="labels"></table><div id="reasons"></div></div>
<div id="cams" style="display:flex;gap:14px;flex-wrap:wrap;flex:1;min-width:0"></div></main>
<script>
const q = new URLSearchParams(location.search); const tok = q.get('token');
const withTok = (u) => tok ? u + (u.includes('?') ? '&' : '?') + 'token=' + encodeURIComponent(tok) : u;
const cams = {};
function esc(s){return String(s).replace(/[&<>"]/g,c=>({'&':'&amp;','<':'&lt;','>':'&gt;','"':'&quot;'}[c]));}
function card(s){
  const d=document.createElement('div'); d.className='card';
  d.innerHTML='<div class="name"></div><img alt=""><div class="info">no frame yet</div>';
  document.getElementById('cams').appendChild(d);
  const c={el:d,img:d.querySelector('img'),seq:-1,busy:false,url:null}; cams[s.id]=c; return c;}
function caption(s){
  if(s.error) return '<span class="err">error: '+esc(s.error)+'</span>';
  if(s.reason) return '<span class="inv">invalid: '+esc(s.reason)+'</span>';
  if(s.label) return '<span class="'+(s.rejected?'rej':'ok')+'">'+esc(s.label)+'</span> '+
    (100*s.confidence).toFixed(0)+'%'+(s.rejected?' (rejected)':'');
  return '';}
function fetchFrame(c,id,seq,s){  // one picture at a time per source: the page's own rate, never the camera's
  c.busy=true; c.seq=seq;
  if(c.first===undefined){  // the first picture as a plain <img>: the page's load event waits for it
    c.first=true; c.img.onload=c.img.onerror=()=>{c.busy=false;};
    if(s.shown){  // encoded when the page was made: this very picture, with what it shows
      c.seq=s.shown.seq; c.el.querySelector('.info').innerHTML=caption(s.shown);
      c.img.src=withTok('frame/'+id+'.jpg?n='+s.shown.seq); return;}}
  fetch(withTok('frame/'+id+'.jpg?n='+seq)).then(r=>{if(!r.ok) throw r.status;
    const info=JSON.parse(r.headers.get('X-Result')||'{}'); return r.blob().then(b=>[b,info]);})
  .then(([b,info])=>{const u=URL.createObjectURL(b); c.img.onload=()=>{if(c.url) URL.revokeObjectURL(c.url); c.url=u;
      c.el.querySelector('.info').innerHTML=caption(info); c.busy=false;}; c.img.src=u;})
  .catch((e)=>{c.busy=false;c.el.dataset.err=String(e);});}
let seen=0;
setInterval(()=>{document.getElementById('conn').textContent=Date.now()-seen<3000?'live':'no connection';},1000);
function show(st){
  seen=Date.now(); document.getElementById('conn').textContent='live';
  document.getElementById('frames').textContent=st.frames;
  document.getElementById('rej').textContent=(100*st.rejection_rate).toFixed(1)+'%';
  const ninv=Object.values(st.invalid).reduce((a,b)=>a+b,0);
  document.getElementById('inv').textContent=ninv;
  document.getElementById('errs').textContent=st.errors;
  document.getElementById('model').textContent=st.model;
  const max=Math.max(1,...Object.values(st.labels));
  document.getElementById('labels').innerHTML=Object.entries(st.labels).map(([k,v])=>
    '<tr><td>'+esc(k)+'</td><td>'+v+'</td><td><div class="bar" style="width:'+(70*v/max)+'px"></div></td></tr>'
  ).join('');
  document.getElementById('reasons').innerHTML=ninv?'<div class="inv">invalid: '+Object.entries(st.invalid).map(
    ([k,v])=>esc(k)+' '+v).join(', ')+'</div>':'';
  for(const s of st.sources){
    const c=cams[s.id]||card(s);
    c.el.querySelector('.name').innerHTML='<b>'+esc(s.name)+'</b> <span class="state '+esc(s.state)+'">'+esc(s.state)+
      '</span> '+(s.fps==null?'':s.fps+' fps')+' drops '+s.dropped+(s.reconnects?' reconnects '+s.reconnects:'');
    // the caption comes with the picture it describes (X-Result), not with the newer numbers
    if(s.seq!==c.seq && !c.busy && s.seq>0) fetchFrame(c,s.id,s.seq,s);
  }}
function poll(){fetch(withTok('status.json')).then(r=>r.json()).then(show).catch(()=>{});}
const INITIAL=/*INITIAL*/null;
if(INITIAL) show(INITIAL);  // at once, from the page itself (a screenshot at load shows frames and numbers)
if(window.EventSource){const es=new EventSource(withTok('events'));es.onmessage=(e)=>show(JSON.parse(e.data));
} else setInterval(poll,500);
</script></body></html>
"""

__all__ = ["LiveViewOutput", "TOKEN_ENV", "LOCALHOST", "is_loopback"]
