"""``python -m benchmarks.serve --clients 1,4,16 --duration S --out DIR``: the Triton server against in-process.

In one run on one machine: ``Classifier.predict_batch`` in this process (the ceiling a single station process
reaches), then ``python -m runtime.serve`` as a child process and, for each client count, that many clients (one
thread and one ``RemoteClassifier`` each) sending one encoded image per request for ``--duration`` seconds, then
in-process again (the reference is the mean of both, so load drifting on a shared machine shows).
Reported per row: images/s, its ratio to in-process, p50/p99 request latency, errors. Also the server's start-up
time and resident memory (Triton, the Python backend stubs, and the process holding the model instances).

Runs where the ``serve`` extra is installed (the server and ``tritonclient``). Output: a Markdown table on stdout,
``serve.json`` and ``serve.md`` under ``--out``.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import cv2
import numpy as np

from benchmarks.timing import summarize
from runtime.files import atomic_write_text

ROOT = Path(__file__).resolve().parents[1]


def make_images(n: int, size: int, seed: int = 0) -> list[bytes]:
    """``n`` SEM-like grey PNGs (lines, noise, a blob) as encoded bytes, the way a station sends frames."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float32)
    out = []
    for _ in range(n):
        img = 0.45 + 0.2 * np.sin(2 * np.pi * xx / rng.uniform(8, 24) + rng.uniform(0, 6))
        (cy, cx), r = rng.uniform(0.2, 0.8, 2) * size, rng.uniform(0.03, 0.1) * size
        img += 0.3 * np.exp(-((yy - cy) ** 2 + (xx - cx) ** 2) / (2 * r * r))
        img += rng.normal(0, 0.05, img.shape)
        ok, buf = cv2.imencode(".png", np.clip(img * 255, 0, 255).astype(np.uint8))
        assert ok
        out.append(buf.tobytes())
    return out


def in_process(model: str, images: list[bytes], duration: float, batch: int, threads: int | None) -> dict[str, Any]:
    """Images/s of ``Classifier.predict_batch`` on the same encoded images (decode included, as on the server)."""
    from runtime.classifier import Classifier

    clf = Classifier(model, "auto", threads=threads, batch_size=batch, spin=False)  # as the server instances
    clf.predict_batch(images[:batch])
    n, t0 = 0, time.perf_counter()
    items = (images * (batch // len(images) + 1))[:batch]
    while time.perf_counter() - t0 < duration:
        clf.predict_batch(items)
        n += len(items)
    dt = time.perf_counter() - t0
    clf.close()
    return {"images": n, "seconds": dt, "images_per_s": n / dt, "batch": batch}


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _rss_mib(pid: int) -> float:
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    except OSError:
        pass
    return 0.0


def _process_tree(pid: int) -> list[tuple[int, str]]:
    """(pid, command name) of ``pid`` and all its descendants (Linux /proc)."""
    children: dict[int, list[int]] = {}
    names: dict[int, str] = {}
    for d in Path("/proc").iterdir():
        if d.name.isdigit():
            try:
                stat = (d / "stat").read_text()
            except OSError:
                continue
            name = stat[stat.index("(") + 1:stat.rindex(")")]
            ppid = int(stat[stat.rindex(")") + 2:].split()[1])
            children.setdefault(ppid, []).append(int(d.name))
            names[int(d.name)] = name
    out, todo = [], [pid]
    while todo:
        p = todo.pop()
        out.append((p, names.get(p, "?")))
        todo.extend(children.get(p, []))
    return out


class ServerProcess:
    def __init__(self, python: str, model: str, instances: int, max_batch: int, queue_delay_us: int,
                 log: Path) -> None:
        self.grpc, self.http, self.metrics = _free_port(), _free_port(), _free_port()
        self.cmd = [python, "-m", "runtime.serve", "--model", model, "--grpc-port", str(self.grpc), "--http-port",
                    str(self.http), "--metrics-port", str(self.metrics), "--instances", str(instances),
                    "--max-batch", str(max_batch), "--max-queue-delay-us", str(queue_delay_us),
                    "--log-level", "WARNING"]
        self.log = log

    def start(self) -> dict[str, Any]:
        t0 = time.perf_counter()
        self.proc = subprocess.Popen(self.cmd, cwd=ROOT, stdout=subprocess.PIPE, stderr=self.log.open("w"),
                                     text=True)
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            if line.startswith("{") and json.loads(line).get("event") == "ready":
                ready = json.loads(line)
                ready["wall_startup_s"] = time.perf_counter() - t0
                return ready
        raise RuntimeError(f"server did not start; see {self.log}")

    def memory(self) -> dict[str, float]:
        by_name: dict[str, float] = {}
        for pid, name in _process_tree(self.proc.pid):
            key = "model process (runtime.serve)" if pid == self.proc.pid else name
            by_name[key] = by_name.get(key, 0.0) + _rss_mib(pid)
        return by_name

    def stop(self) -> None:
        self.proc.send_signal(signal.SIGTERM)
        try:
            self.proc.wait(120)
        except subprocess.TimeoutExpired:
            self.proc.kill()


def run_clients(url: str, images: list[bytes], clients: int, duration: float) -> dict[str, Any]:
    from runtime.remote import RemoteClassifier

    lat: list[list[float]] = [[] for _ in range(clients)]
    errors: list[str] = []
    conns = [RemoteClassifier(url, timeout=60) for _ in range(clients)]
    start = threading.Barrier(clients + 1)
    stop_at = [0.0]

    def client(k: int) -> None:
        c, mine, i = conns[k], lat[k], k
        start.wait()
        while time.perf_counter() < stop_at[0]:
            t = time.perf_counter()
            try:
                c.predict(images[i % len(images)])
            except Exception as e:  # noqa: BLE001 - counted and reported
                errors.append(f"{type(e).__name__}: {e}")
                continue
            finally:
                i += 1
            mine.append((time.perf_counter() - t) * 1e3)

    threads = [threading.Thread(target=client, args=(k,)) for k in range(clients)]
    for t in threads:
        t.start()
    stop_at[0] = time.perf_counter() + duration
    t0 = time.perf_counter()
    start.wait()
    for t in threads:
        t.join()
    dt = time.perf_counter() - t0
    for c in conns:
        c.close()
    all_ms = [v for m in lat for v in m]
    s = summarize(all_ms) if all_ms else {"median_ms": float("nan"), "p99_ms": float("nan"), "n": 0}
    return {"clients": clients, "images": len(all_ms), "seconds": dt, "images_per_s": len(all_ms) / dt,
            "p50_ms": s["median_ms"], "p99_ms": s["p99_ms"], "errors": len(errors), "first_errors": errors[:3]}


def render(result: dict[str, Any]) -> str:
    ip = result["in_process"]["images_per_s"]
    lines = ["| clients | images/s | × in-process | p50 ms | p99 ms | p99/p50 | errors |",
             "|---:|---:|---:|---:|---:|---:|---:|",
             f"| in-process `predict_batch` (batch {result['in_process']['batch']}; mean of "
             f"{result['in_process']['before']['images_per_s']:.1f} before and "
             f"{result['in_process']['after']['images_per_s']:.1f} after) | {ip:.1f} | 1.00 | | | | |"]
    lines.append(f"| in-process, batch 1 (for reference) | {result['in_process']['batch1_images_per_s']:.1f} | "
                 f"{result['in_process']['batch1_images_per_s'] / ip:.2f} | | | | |")
    for r in result["rows"]:
        lines.append(f"| {r['clients']} | {r['images_per_s']:.1f} | {r['images_per_s'] / ip:.2f} | "
                     f"{r['p50_ms']:.1f} | {r['p99_ms']:.1f} | {r['p99_ms'] / r['p50_ms']:.1f} | {r['errors']} |")
    s = result["server"]
    mem = ", ".join(f"{k} {v:.0f} MiB" for k, v in s["memory_mib"].items())
    lines += ["", f"Server start-up: {s['startup_s']:.1f} s to ready (runtime.serve's own clock; "
                  f"{s['wall_startup_s']:.1f} s from launch incl. the re-exec). Memory (RSS): {mem}."]
    return "\n".join(lines)


def _in_process_pair(model: str, images: list[bytes], duration: float, batch: int,
                     threads: int | None) -> tuple[dict[str, Any], dict[str, Any]]:
    """In-process images/s at ``batch`` for ``duration`` s, then at batch 1 for half as long."""
    return (in_process(model, images, duration, batch, threads),
            in_process(model, images, duration / 2, 1, threads))


def _server_rows(server: ServerProcess, images: list[bytes], counts: Sequence[int],
                 duration: float) -> tuple[dict[str, Any], list[dict[str, Any]], dict[str, float]]:
    """Start ``server``, run a row per client count against it, stop it: (ready info, rows, memory)."""
    ready = server.start()
    url = f"grpc://127.0.0.1:{server.grpc}/sem_classifier"
    rows = []
    try:
        run_clients(url, images, 1, min(1.0, duration))  # warm the server's paths
        for n in counts:
            print(f"{n} client(s) for {duration:g} s ...", file=sys.stderr)
            rows.append(run_clients(url, images, n, duration))
        memory = server.memory()
    finally:
        server.stop()
    return ready, rows, memory


def benchmark(model: str, out: Path, counts: Sequence[int], *, duration: float = 10.0, image_size: int = 512,
              instances: int = 1, max_batch: int = 16, max_queue_delay_us: int = 2000, threads: int | None = None,
              serve_python: str = sys.executable) -> dict[str, Any]:
    """In-process, then the server at each client count, then in-process again; the result :func:`render` shows
    (the server's log goes to ``out/server.log``)."""
    images = make_images(16, image_size)
    print(f"in-process Classifier.predict_batch for {duration:g} s ...", file=sys.stderr)
    before, single_before = _in_process_pair(model, images, duration, max_batch, threads)
    server = ServerProcess(serve_python, model, instances, max_batch, max_queue_delay_us, out / "server.log")
    ready, rows, memory = _server_rows(server, images, counts, duration)
    # Measured again after the server rows: on a shared machine the load drifts, and the mean of both is the
    # fairer reference (both are reported).
    print(f"in-process Classifier.predict_batch again for {duration:g} s ...", file=sys.stderr)
    after, single_after = _in_process_pair(model, images, duration, max_batch, threads)
    ip = {"images_per_s": (before["images_per_s"] + after["images_per_s"]) / 2, "batch": max_batch,
          "before": before, "after": after,
          "batch1_images_per_s": (single_before["images_per_s"] + single_after["images_per_s"]) / 2}
    return {"model": model, "image_size": image_size, "duration_s": duration, "instances": instances,
            "max_batch": max_batch, "max_queue_delay_us": max_queue_delay_us, "in_process": ip, "rows": rows,
            "server": {"startup_s": ready["startup_s"], "wall_startup_s": ready["wall_startup_s"],
                       "threads_per_instance": ready["threads"], "memory_mib": memory}}


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m benchmarks.serve", description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--model", default=None, help="ONNX model (default: the bundled model)")
    p.add_argument("--clients", default="1,4,16", help="client counts, comma-separated")
    p.add_argument("--duration", type=float, default=10.0, help="seconds per row")
    p.add_argument("--out", required=True, help="folder for serve.json and serve.md")
    p.add_argument("--image-size", type=int, default=512, help="side of the generated grey PNG frames")
    p.add_argument("--instances", type=int, default=1)
    p.add_argument("--max-batch", type=int, default=16)
    p.add_argument("--max-queue-delay-us", type=int, default=2000)
    p.add_argument("--threads", type=int, default=None, help="in-process ONNX Runtime threads (default: cores)")
    p.add_argument("--serve-python", default=os.environ.get("SEM_SERVE_PYTHON") or sys.executable,
                   help="interpreter with the serve extra, for the server")
    return p


def main(argv: Sequence[str] | None = None) -> int:
    p = _parser()
    args = p.parse_args(argv)
    try:
        counts = [int(v) for v in args.clients.split(",") if v.strip()]
    except ValueError:
        p.error(f"--clients: expected numbers like 1,4,16, got {args.clients!r}")
    if not counts or min(counts) < 1:
        p.error("--clients: at least one count, each >= 1")
    from runtime.classifier import bundled_model_path

    model = str(Path(args.model) if args.model else bundled_model_path())
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    result = benchmark(model, out, counts, duration=args.duration, image_size=args.image_size,
                       instances=args.instances, max_batch=args.max_batch,
                       max_queue_delay_us=args.max_queue_delay_us, threads=args.threads,
                       serve_python=args.serve_python)
    result["command"] = "python -m benchmarks.serve " + " ".join(sys.argv[1:] if argv is None else argv)
    table = render(result)
    atomic_write_text(out / "serve.json", json.dumps(result, indent=2) + "\n")
    atomic_write_text(out / "serve.md", table + "\n")
    print(table)
    return 0


if __name__ == "__main__":
    sys.exit(main())
