"""``python -m benchmarks.archive``: classify one folder of large synthetic SEM images with ``runtime.run`` (one
process) and ``runtime.archive`` on Ray (local, 1 and 2 workers; a two-node cluster on this host), in one run.

Why: the archive job must cost little more than the single-process runner on one box (its overhead bounded) and
keep memory bounded however many images it streams. Reported per run: images/s end to end (start-up included) and
steady (between the first and the last result), CPU use in cores, peak RSS of the driver, of the largest model
worker, and of all processes together (sampled from /proc).

The images are generated once into ``OUT/images`` (a pool of distinct rendered SEM frames, written round-robin
under distinct names; decoding and inference cost the same per file) and reused by later runs with the same
``--images``/``--size``.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from sem_extras import cli

CLK = os.sysconf("SC_CLK_TCK")
PAGE = os.sysconf("SC_PAGE_SIZE")


# ------------------------------------------------------------------------------------------------ images
def generate(folder: Path, n: int, size: int, pool: int = 32, seed: int = 0, progress: bool = True,
             links: bool = False) -> Path:
    """``n`` PNG files of ``size``² px under ``folder`` (1000 per sub-folder); kept if already there. ``links``: the
    ``pool`` distinct files are written once and the rest are hard links to them (distinct paths, each read and
    decoded in full, but a 50k-image folder costs the disk only the pool)."""
    marker = folder / "_generated.json"
    want = {"images": n, "size": size, "pool": pool, "seed": seed} | ({"links": True} if links else {})
    if marker.is_file() and json.loads(marker.read_text()) == want:
        return folder
    import cv2

    from runtime.contract import CLASSES
    from train.synthetic import image_rng, render_sample

    if folder.exists():
        shutil.rmtree(folder)
    folder.mkdir(parents=True)
    blobs = []
    for k in range(min(pool, n)):
        cls = CLASSES[k % len(CLASSES)]
        img, _ = render_sample(cls, image_rng(seed, cls, k), size=size)
        blobs.append((cls, cv2.imencode(".png", img)[1].tobytes()))
    bar = _bar(n, "images", progress)
    first: list[Path] = []
    for i in range(n):
        cls, blob = blobs[i % len(blobs)]
        sub = folder / f"d{i // 1000:04d}"
        if i % 1000 == 0:
            sub.mkdir(exist_ok=True)
        path = sub / f"{i:07d}_{cls}.png"
        if links and i >= len(blobs):
            os.link(first[i % len(blobs)], path)
        else:
            path.write_bytes(blob)
            first.append(path)
        bar.update(1)
    bar.close()
    marker.write_text(json.dumps(want) + "\n")
    return folder


def _bar(total: int, desc: str, enabled: bool) -> Any:
    from tqdm import tqdm

    return tqdm(total=total, desc=desc, unit="img", disable=not enabled, dynamic_ncols=True)


# ------------------------------------------------------------------------------------------------ /proc sampling
def _children() -> dict[int, list[int]]:
    out: dict[int, list[int]] = {}
    for d in os.listdir("/proc"):
        if d.isdigit():
            try:
                with open(f"/proc/{d}/stat") as f:
                    ppid = int(f.read().rsplit(")", 1)[1].split()[1])
            except (OSError, IndexError, ValueError):
                continue
            out.setdefault(ppid, []).append(int(d))
    return out


def _proc(pid: int) -> tuple[float, int, str] | None:
    """(CPU seconds, RSS bytes, cmdline) of a live process."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            fields = f.read().rsplit(")", 1)[1].split()
        with open(f"/proc/{pid}/statm") as f:
            rss = int(f.read().split()[1]) * PAGE
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            cmd = f.read().replace(b"\0", b" ").decode(errors="replace")
    except (OSError, IndexError, ValueError):
        return None
    return (int(fields[11]) + int(fields[12])) / CLK, rss, cmd


def _is_model_worker(cmdline: str) -> bool:
    return "MapWorker" in cmdline or "ArchiveWorker" in cmdline


class Monitor(threading.Thread):
    """Samples the process trees under ``roots`` every ``interval`` s: peak RSS per process and in total, and the
    CPU seconds they used (processes already running at start count from then on)."""

    def __init__(self, roots: Sequence[int], interval: float = 0.25, series_every: float = 0.0,
                 progress: Any = None, series_csv: Path | None = None) -> None:
        super().__init__(daemon=True)
        self.roots, self.interval = list(roots), interval
        #: Every ``series_every`` s (0: never) one row: seconds, images done (``progress()``), driver, largest
        #: model worker and all processes' RSS in MB; shows whether memory grows with the images processed.
        self.series_every, self.progress = series_every, progress
        self.series: list[tuple[float, int, float, float, float]] = []
        self.series_csv = series_csv  # written as it is sampled, so a long run cut short keeps its trend
        if series_csv and series_every:
            series_csv.write_text("seconds,images_done,driver_mb,largest_worker_mb,all_mb\n")
        self.t0 = self.next_row = time.monotonic()
        self.stop_event = threading.Event()
        self.cpu0: dict[int, float] = {}
        self.cpu: dict[int, float] = {}
        self.peak: dict[int, int] = {}
        self.cmd: dict[int, str] = {}
        self.peak_total = 0
        self._sample(first=True)

    def _sample(self, first: bool = False) -> None:
        kids = _children()
        todo, seen = list(self.roots), set()
        total = 0
        rss_now: dict[int, int] = {}
        while todo:
            pid = todo.pop()
            if pid in seen:
                continue
            seen.add(pid)
            todo.extend(kids.get(pid, []))
            info = _proc(pid)
            if info is None:
                continue
            cpu, rss, cmd = info
            if first or pid not in self.cpu0:
                self.cpu0.setdefault(pid, cpu if first else 0.0)
            self.cpu[pid] = cpu
            self.peak[pid] = max(self.peak.get(pid, 0), rss)
            if cmd.strip():
                self.cmd[pid] = cmd
            total += rss
            rss_now[pid] = rss
        self.peak_total = max(self.peak_total, total)
        now = time.monotonic()
        if self.series_every and now >= self.next_row:
            self.next_row = now + self.series_every
            workers = [rss_now[p] for p in rss_now if _is_model_worker(self.cmd.get(p, ""))]
            done = self.progress() if self.progress else 0
            self.series.append((round(now - self.t0, 1), done, rss_now.get(self.roots[0], 0) / 2**20,
                                max(workers, default=0) / 2**20, total / 2**20))
            if self.series_csv:
                with open(self.series_csv, "a") as f:
                    f.write("{},{},{:.0f},{:.0f},{:.0f}\n".format(*self.series[-1]))

    def run(self) -> None:
        while not self.stop_event.wait(self.interval):
            self._sample()

    def stop(self) -> dict[str, Any]:
        self.stop_event.set()
        self.join()
        cpu = sum(self.cpu[p] - self.cpu0.get(p, 0.0) for p in self.cpu)
        workers = [p for p, c in self.cmd.items() if _is_model_worker(c)]
        driver = max((self.peak.get(r, 0) for r in self.roots[:1]), default=0)
        return {"cpu_s": cpu, "driver_peak_mb": driver / 2**20,
                "worker_peak_mb": max((self.peak[p] for p in workers), default=0) / 2**20,
                "model_workers": len(workers), "total_peak_mb": self.peak_total / 2**20}


# ------------------------------------------------------------------------------------------------ runs
def _timed(cmd: list[str], roots_extra: Sequence[int] = (), env: dict[str, str] | None = None,
           log: Path | None = None, rss_every: float = 0.0, progress: Any = None,
           rss_csv: Path | None = None) -> dict[str, Any]:
    t0, t0_unix = time.perf_counter(), time.time()
    with open(log or os.devnull, "w") as f:
        proc = subprocess.Popen(cmd, stdout=f, stderr=subprocess.STDOUT, env={**os.environ, **(env or {})})
    mon = Monitor([proc.pid, *roots_extra], series_every=rss_every, progress=progress, series_csv=rss_csv)
    mon.start()
    rc = proc.wait()
    wall = time.perf_counter() - t0
    res = mon.stop()
    res.update(rc=rc, wall_s=wall, cores=res["cpu_s"] / wall if wall else 0.0, t0_unix=t0_unix,
               rss_series=mon.series)
    return res


def _result_times(res: dict[str, Any], times: list[float]) -> None:
    """Seconds from the process start to its first result, and from its last result to its exit (start-up and
    shut-down: what a short job does not amortise)."""
    if times:
        res["first_result_s"] = min(times) - res["t0_unix"]
        res["exit_after_last_s"] = res["wall_s"] - (max(times) - res["t0_unix"])


class _PartRows:
    """Rows in the complete Parquet parts of an archive ``--out`` so far (read from each part's footer once)."""

    def __init__(self, out: Path) -> None:
        self.out = out
        self.seen: dict[str, int] = {}

    def __call__(self) -> int:
        import pyarrow.parquet as pq

        for part in self.out.glob("part-*.parquet"):
            if part.name not in self.seen:
                try:
                    self.seen[part.name] = pq.read_metadata(part).num_rows
                except OSError:
                    continue
        return sum(self.seen.values())


def _steady(times: list[float]) -> float:
    times = sorted(times)
    if len(times) < 3 or times[-1] <= times[0]:
        return 0.0
    # Results arrive in batches: count from the end of the first batch's second to the last result.
    return (len(times) - 1) / (times[-1] - times[0])


def run_single(images: Path, n: int, work: Path, model: str | None) -> dict[str, Any]:
    rec = work / "single.jsonl"
    rec.unlink(missing_ok=True)
    cmd = [sys.executable, "-m", "runtime.run", "--source", str(images), "--headless", "--quiet", "--no-status",
           "--output", str(rec)] + (["--model", model] if model else [])
    res = _timed(cmd, log=work / "single.log")
    times = [json.loads(line)["unix_time"] for line in rec.read_text().splitlines() if line.strip()]
    res.update(name="runtime.run (1 process)", rows=len(times), steady_ips=_steady(times))
    _result_times(res, times)
    return res


def run_archive(images: Path, n: int, work: Path, model: str | None, workers: int, address: str | None,
                roots: Sequence[int] = (), name: str = "", batch_size: int = 16,
                rss_every: float = 0.0, rss_csv: Path | None = None) -> dict[str, Any]:
    from runtime.archive import read_results

    out = work / f"archive_{name or workers}"
    shutil.rmtree(out, ignore_errors=True)
    cmd = [sys.executable, "-m", "runtime.archive", "--source", str(images), "--out", str(out), "--workers",
           str(workers), "--batch-size", str(batch_size), "--no-progress"] + (["--model", model] if model else [])
    if address:
        cmd += ["--address", address]
    res = _timed(cmd, roots, env={"RAY_AUTH_MODE": "disabled"}, log=work / f"archive_{name or workers}.log",
                 rss_every=rss_every, progress=_PartRows(out), rss_csv=rss_csv)
    t = read_results(out, latest=False)
    paths = t.column("path").to_pylist()
    times = t.column("finished_at").to_pylist()
    res.update(name=f"runtime.archive, {name or 'local'} ({workers} worker{'s' * (workers > 1)})", rows=len(paths),
               duplicates=len(paths) - len(set(paths)),
               errors=sum(1 for e in t.column("error").to_pylist() if e), steady_ips=_steady(times))
    _result_times(res, times)
    summary = out / "_summary.json"
    if summary.is_file():
        res["phases"] = json.loads(summary.read_text()).get("phases", {})
    return res


def start_cluster(work: Path, nodes: int = 2) -> tuple[str, list[subprocess.Popen]]:
    """Ray nodes on this host as `ray start` makes them: two with one CPU each, or one with every CPU (a local
    instance started before the job, so the job only connects); returns the address and processes."""
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    ray_cli = str(Path(sys.executable).with_name("ray"))
    env = {**os.environ, "RAY_AUTH_MODE": "disabled"}
    temp = f"/tmp/ray_bench_{os.getpid()}"
    procs = []
    addr = f"127.0.0.1:{port}"
    cpus = "1" if nodes > 1 else str(os.cpu_count() or 1)
    for i, args in enumerate((["--head", "--port", str(port), "--include-dashboard=false", "--temp-dir", temp],
                              ["--address", addr])[:nodes]):
        log = work / f"node{i}.log"
        procs.append(subprocess.Popen([ray_cli, "start", *args, "--num-cpus", cpus, "--node-ip-address", "127.0.0.1",
                                       "--block", "--disable-usage-stats"], env=env, stdout=log.open("w"),
                                      stderr=subprocess.STDOUT, start_new_session=True))
        end = time.monotonic() + 180
        while "Ray runtime started" not in log.read_text(errors="replace"):
            if procs[-1].poll() is not None or time.monotonic() > end:
                stop_cluster(procs)
                raise RuntimeError(f"ray start failed: {log.read_text()[-2000:]}")
            time.sleep(0.5)
    return addr, procs


def stop_cluster(procs: list[subprocess.Popen]) -> None:
    kids = _children()
    for p in procs:
        todo, pids = [p.pid], []
        while todo:
            q = todo.pop()
            pids.append(q)
            todo.extend(kids.get(q, []))
        for q in reversed(pids):
            try:
                os.kill(q, signal.SIGKILL)
            except ProcessLookupError:
                pass
        p.wait(timeout=30)
    shutil.rmtree(f"/tmp/ray_bench_{os.getpid()}", ignore_errors=True)  # start_cluster's --temp-dir


def table(results: list[dict[str, Any]], n: int) -> str:
    best_single = max((r["rows"] / r["wall_s"] for r in results if r["name"].startswith("runtime.run")), default=0)
    lines = ["| run | images/s end to end | steady images/s | vs 1 process | first result s | exit after last s | "
             "CPU cores | driver peak MB | largest worker MB | all processes peak MB | rows | duplicates | rc |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in results:
        ips = r["rows"] / r["wall_s"] if r["wall_s"] else 0.0
        lines.append(f"| {r['name']} | {ips:.1f} | {r['steady_ips']:.1f} | "
                     f"{ips / best_single if best_single else 0:.2f}x | {r.get('first_result_s', 0):.1f} | "
                     f"{r.get('exit_after_last_s', 0):.1f} | "
                     f"{r['cores']:.2f} | {r['driver_peak_mb']:.0f} | "
                     f"{r['worker_peak_mb']:.0f} | {r['total_peak_mb']:.0f} | {r['rows']}/{n} | "
                     f"{r.get('duplicates', '-')} | {r['rc']} |")
    return "\n".join(lines)


def rss_trend(series: list[tuple[float, int, float, float, float]]) -> str:
    """RSS at a few points of the job (by images done): flat if memory does not grow with the images processed."""
    done = [r for r in series if r[1] > 0]
    if not done:
        return "rss: no parts written while sampling"
    last = done[-1][1]
    lines = ["| images done | driver MB | largest worker MB | all processes MB |", "|---|---|---|---|"]
    for frac in (0.1, 0.25, 0.5, 0.75, 1.0):
        row = next(r for r in done if r[1] >= frac * last)
        lines.append(f"| {row[1]} | {row[2]:.0f} | {row[3]:.0f} | {row[4]:.0f} |")
    return "\n".join(lines)


EPILOG = """examples:
  python -m benchmarks.archive --images 2000 --out runs/archive_bench
  python -m benchmarks.archive --images 50000 --links --out runs/archive_50k --runs ray2 --rss-every 1   # memory
"""


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m benchmarks.archive", description=__doc__.split("\n\n")[0],
                                epilog=EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--images", type=int, required=True, help="number of images to classify")
    p.add_argument("--out", required=True, help="work folder (images/ is generated once and kept)")
    p.add_argument("--size", type=int, default=1024, help="image side in pixels (default %(default)s)")
    p.add_argument("--model", help="model (default: the bundled one)")
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--runs", nargs="+", default=["single", "ray1", "ray2", "cluster"],
                   choices=("single", "ray1", "ray2", "cluster", "started"),
                   help="which runs (default: all but started; started: 2 workers on a Ray instance that `ray start "
                   "--head` made before the job, so the job only connects to it)")
    p.add_argument("--pool", type=int, default=32, help="distinct generated frames (default %(default)s)")
    p.add_argument("--links", action="store_true",
                   help="images beyond the pool are hard links to it (distinct paths, real reads; little disk)")
    p.add_argument("--rss-every", type=float, default=0.0, metavar="S",
                   help="also record RSS every S seconds against images done (OUT/rss_<run>.csv), to see whether "
                   "memory grows with the images processed")
    p.add_argument("--no-progress", dest="progress", action="store_false")
    return p


@cli("python -m benchmarks.archive")
def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    work = Path(args.out)
    work.mkdir(parents=True, exist_ok=True)
    load = os.getloadavg()[0]
    images = generate(work / "images", args.images, args.size, pool=args.pool, progress=args.progress,
                      links=args.links)
    results: list[dict[str, Any]] = []
    for run in args.runs:
        if run == "single":
            results.append(run_single(images, args.images, work, args.model))
        elif run in ("ray1", "ray2"):
            results.append(run_archive(images, args.images, work, args.model, int(run[-1]), None,
                                       batch_size=args.batch_size, rss_every=args.rss_every,
                                       rss_csv=work / f"rss_{run}.csv"))
        else:
            addr, procs = start_cluster(work, 1 if run == "started" else 2)
            try:
                results.append(run_archive(images, args.images, work, args.model, 2, addr,
                                           [p.pid for p in procs], batch_size=args.batch_size,
                                           name="two-node cluster" if run == "cluster" else "started instance",
                                           rss_every=args.rss_every, rss_csv=work / f"rss_{run}.csv"))
            finally:
                stop_cluster(procs)
        print(table(results, args.images).splitlines()[-1], file=sys.stderr, flush=True)
        if results[-1]["rss_series"]:
            print(rss_trend(results[-1]["rss_series"]), file=sys.stderr, flush=True)
    text = table(results, args.images)
    print(f"{args.images} images of {args.size}² px, {os.cpu_count()} CPUs, load average {load:.1f} before, "
          f"{os.getloadavg()[0]:.1f} after\n{text}")
    (work / "archive_bench.json").write_text(json.dumps({"images": args.images, "size": args.size, "load": load,
                                                         "results": results}, indent=2) + "\n")
    (work / "archive_bench.md").write_text(text + "\n")
    return 0 if all(r["rc"] in (0, 3) and r["rows"] == args.images for r in results) else 1


if __name__ == "__main__":
    sys.exit(main())
