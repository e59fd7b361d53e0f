"""``python -m runtime.archive``: classify an archive of images on Ray Data into Parquet, resumable.

Why: re-screening a lot after a new defect type is found, or auditing a tool, means classifying millions of stored
images; Ray Data spreads that over every core of one machine or of a cluster, streaming, with bounded memory.

Pipeline: the driver lists the source (folder, glob, ``LIST.txt``, or a ``s3://``/``gs://`` prefix through pyarrow
file systems) → a Ray dataset of (path, size, mtime) → ``map_batches`` reading the bytes → ``map_batches`` with
:class:`ArchiveWorker`, a callable class, so each actor opens its model once → result rows streamed back to the
driver, which writes them as Parquet parts. One row per image (:data:`COLUMNS`): an unreadable or bad file is a row
with ``error`` set and an empty ``label``, never a failed job.

Resumable: every part is written atomically (temporary file, then rename) and names its images by path, size and
mtime. A rerun with the same ``--out`` skips the images already in a complete part and classifies the rest, so a
killed or interrupted job loses nothing and writes nothing twice; a changed file (other size or mtime) is classified
again and :func:`read_results` keeps its newest row. ``--out`` belongs to one model: a rerun with another model is
refused. Ray is imported only when a job runs (``pip install '.[scale]'``), so ``import runtime`` never needs it.
"""

from __future__ import annotations

import argparse
import contextlib
import glob
import json
import logging
import os
import signal
import sys
import tempfile
import threading
import time
import uuid
from collections.abc import Iterator, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from runtime.files import atomic_write_text
from runtime.sources import IMAGE_SUFFIXES

log = logging.getLogger("runtime.archive")

#: One row per image, in this order (the Parquet schema; ``score`` is NaN for an invalid frame or an error).
COLUMNS: tuple[tuple[str, str], ...] = (
    ("path", "string"), ("size", "int64"), ("mtime_ns", "int64"),
    ("label", "string"), ("confidence", "float32"), ("rejected", "bool_"), ("score", "float32"),
    ("top_label", "string"), ("reason", "string"), ("error", "string"), ("model", "string"), ("worker", "string"),
    ("read_ms", "float32"), ("preprocess_ms", "float32"), ("inference_ms", "float32"), ("total_ms", "float32"),
    ("finished_at", "float64"),
)
PART_PREFIX, PART_SUFFIX = "part-", ".parquet"
JOB_FILE = "_job.json"
SUMMARY_FILE = "_summary.json"
#: Unreadable parts (a torn file from another tool; ours are atomic) are moved here, and their images redone.
QUARANTINE = "_quarantine"
REMOTE_SCHEMES = ("s3://", "gs://", "gcs://", "hdfs://", "abfs://", "abfss://", "file://")

EXIT_OK = 0  # every image has a row; none with an error
EXIT_USAGE = 2  # nothing ran: bad arguments, source or model not found, --out made with another model, no Ray
EXIT_INPUT = 3  # done, but some images could not be read or decoded (rows with `error`)
EXIT_INTERRUPTED = 130  # Ctrl-C / SIGTERM: the rows received so far were written; rerun to finish

#: Test hook: "N:PATH" makes the driver write PATH after its N-th part and wait to be killed, so a test kills it at
#: a known point instead of after a guessed sleep (tests/runtime/test_archive.py).
PAUSE_ENV = "SEM_ARCHIVE_PAUSE_AFTER_PARTS"


class ArchiveError(RuntimeError):
    """The job cannot start or go on (source, --out, model); the message names what and why."""


def _need(module: str) -> Any:
    import importlib

    try:
        return importlib.import_module(module)
    except ModuleNotFoundError as e:
        raise ModuleNotFoundError(f"needs {module.partition('.')[0]}, from the scale extra: "
                                  "pip install '.[scale]'", name=e.name) from e


def is_remote(source: str) -> bool:
    return source.lower().startswith(REMOTE_SCHEMES)


# ------------------------------------------------------------------------------------------------ listing
@dataclass
class Listing:
    """The images of a source: parallel lists of path, size and mtime (ns); ``problems`` are source-level notes."""

    paths: list[str] = field(default_factory=list)
    sizes: list[int] = field(default_factory=list)
    mtimes: list[int] = field(default_factory=list)
    problems: list[str] = field(default_factory=list)

    def add(self, path: str, size: int, mtime_ns: int) -> None:
        self.paths.append(path)
        self.sizes.append(int(size))
        self.mtimes.append(int(mtime_ns))

    def __len__(self) -> int:
        return len(self.paths)


def _is_image(name: str) -> bool:
    base = name.rsplit("/", 1)[-1]
    return not base.startswith(".") and os.path.splitext(base)[1].lower() in IMAGE_SUFFIXES


def _stat_local(path: str, listing: Listing) -> None:
    try:
        st = os.stat(path)
    except OSError as e:
        # Listed but not there: still one row (with the error), so the job accounts for every listed image.
        listing.add(path, -1, -1)
        listing.problems.append(f"{path}: {e.strerror or e}")
        return
    listing.add(path, st.st_size, st.st_mtime_ns)


def _list_remote(uri: str, listing: Listing) -> None:
    fs_mod = _need("pyarrow.fs")
    fs, root = fs_mod.FileSystem.from_uri(uri)
    scheme = uri.split("://", 1)[0] + "://"
    info = fs.get_file_info(root)
    if info.type == fs_mod.FileType.File:
        infos = [info]
    elif info.type == fs_mod.FileType.Directory:
        infos = fs.get_file_info(fs_mod.FileSelector(root, recursive=True))
    else:
        raise ArchiveError(f"--source {uri}: not found")
    for i in sorted((i for i in infos if i.type == fs_mod.FileType.File and _is_image(i.path)), key=lambda i: i.path):
        listing.add(scheme + i.path, i.size if i.size is not None else -1, i.mtime_ns or 0)


def list_source(source: str) -> Listing:
    """Every image of ``source``: a folder (recursive), a glob (``**`` recursive), a text file with one path or URI
    per line (``#`` comments), or a ``s3://``/``gs://`` prefix (pyarrow file systems; credentials as pyarrow finds
    them). Sorted, duplicates dropped. Raises :class:`ArchiveError` when the source itself is missing or empty."""
    listing = Listing()
    if is_remote(source):
        _list_remote(source, listing)
    elif source.endswith(".txt") and os.path.isfile(source):
        base = os.path.dirname(os.path.abspath(source))
        seen: set[str] = set()
        with open(source, encoding="utf-8") as f:
            for line in f:
                item = line.strip()
                if not item or item.startswith("#"):
                    continue
                if not is_remote(item):
                    item = os.path.normpath(os.path.join(base, item))
                if item in seen:
                    continue
                seen.add(item)
                if is_remote(item):
                    _list_remote(item, listing)
                else:
                    _stat_local(item, listing)
    elif os.path.isdir(source):
        found = []
        for root, dirs, files in os.walk(source):
            dirs[:] = [d for d in dirs if not d.startswith(".")]
            found.extend(os.path.join(root, f) for f in files if _is_image(f))
        for p in sorted(os.path.abspath(p) for p in found):
            _stat_local(p, listing)
    elif glob.has_magic(source):
        for p in sorted({os.path.abspath(p) for p in glob.iglob(source, recursive=True)}):
            if os.path.isfile(p) and _is_image(p):
                _stat_local(p, listing)
    elif os.path.isfile(source):
        _stat_local(os.path.abspath(source), listing)
    else:
        raise ArchiveError(f"--source {source}: no such folder, file, glob match or list")
    if not listing.paths:
        raise ArchiveError(f"--source {source}: no images (suffixes {', '.join(sorted(IMAGE_SUFFIXES))})")
    return listing


# ------------------------------------------------------------------------------------------------ output folder
def _parts(out: Path) -> list[Path]:
    return sorted(p for p in out.glob(f"{PART_PREFIX}*{PART_SUFFIX}") if p.is_file())


def done_images(out: Path) -> tuple[dict[str, tuple[int, int]], int, set[str]]:
    """``{path: (size, mtime_ns)}`` of the images already in complete parts of ``out``, the number of rows, and the
    paths whose newest row carries an error.

    A part that cannot be read is moved to ``out/_quarantine/`` (its images are then done again)."""
    pq = _need("pyarrow.parquet")
    done: dict[str, tuple[int, int]] = {}
    newest: dict[str, tuple[float, bool]] = {}
    rows = 0
    for part in _parts(out):
        try:
            t = pq.read_table(part, columns=["path", "size", "mtime_ns", "error", "finished_at"])
        except Exception as e:  # noqa: BLE001 -- any unreadable part: set aside, never fatal
            (out / QUARANTINE).mkdir(exist_ok=True)
            part.rename(out / QUARANTINE / part.name)
            log.warning("%s: unreadable (%s); moved to %s, its images will be classified again", part, e, QUARANTINE)
            continue
        rows += t.num_rows
        for p, s, m, e, f in zip(*(t.column(c).to_pylist() for c in ("path", "size", "mtime_ns", "error",
                                                                        "finished_at"))):
            if p not in newest or f >= newest[p][0]:
                done[p], newest[p] = (s, m), (f, bool(e))
    return done, rows, {p for p, (_, e) in newest.items() if e}


def pending(listing: Listing, done: dict[str, tuple[int, int]]) -> list[int]:
    """Indices of the listed images that still need a row: new ones, and ones whose size or mtime changed."""
    return [i for i, p in enumerate(listing.paths) if done.get(p) != (listing.sizes[i], listing.mtimes[i])]


def read_results(out: str | os.PathLike[str], latest: bool = True) -> Any:
    """All rows of a job's ``out`` folder as one ``pyarrow.Table``; ``latest`` keeps only the newest row of an image
    classified again after it changed."""
    pa, pq = _need("pyarrow"), _need("pyarrow.parquet")
    parts = _parts(Path(out))
    if not parts:
        return pa.schema([(n, getattr(pa, t)()) for n, t in COLUMNS]).empty_table()
    table = pa.concat_tables([pq.read_table(p) for p in parts])
    if not latest:
        return table
    order = np.argsort(np.asarray(table.column("finished_at").to_numpy(zero_copy_only=False)), kind="stable")
    keep: dict[str, int] = {}
    paths = table.column("path").to_pylist()
    for i in order:
        keep[paths[i]] = int(i)
    return table.take(sorted(keep.values()))


class PartWriter:
    """Buffers result rows on the driver and writes them as atomic Parquet parts of ``rows`` rows (or every
    ``seconds``), so an interruption loses at most the buffer, which a rerun classifies again."""

    def __init__(self, out: Path, rows: int = 1000, seconds: float = 30.0) -> None:
        self.pa, self.pq = _need("pyarrow"), _need("pyarrow.parquet")
        self.schema = self.pa.schema([(n, getattr(self.pa, t)()) for n, t in COLUMNS])
        self.out, self.rows, self.seconds = out, max(1, rows), seconds
        self.run_id = time.strftime("%Y%m%d-%H%M%S") + f"-{uuid.uuid4().hex[:6]}"
        self.buffer: list[Any] = []
        self.buffered = self.parts = self.written = 0
        self.last = time.monotonic()

    def add(self, table: Any) -> None:
        self.buffer.append(table.select([n for n, _ in COLUMNS]).cast(self.schema))
        self.buffered += table.num_rows
        if self.buffered >= self.rows or time.monotonic() - self.last >= self.seconds:
            self.flush()

    def flush(self) -> None:
        if not self.buffered:
            return
        table = self.pa.concat_tables(self.buffer)
        self.parts += 1
        final = self.out / f"{PART_PREFIX}{self.run_id}-{self.parts:05d}{PART_SUFFIX}"
        fd, tmp = tempfile.mkstemp(prefix=".part-", suffix=".tmp", dir=self.out)
        os.close(fd)
        try:
            self.pq.write_table(table, tmp, compression="zstd")
            with open(tmp, "rb") as f:
                os.fsync(f.fileno())
            os.replace(tmp, final)
        except BaseException:
            with contextlib.suppress(OSError):
                os.unlink(tmp)
            raise
        self.written += table.num_rows
        self.buffer, self.buffered, self.last = [], 0, time.monotonic()
        pause = os.environ.get(PAUSE_ENV, "")
        if pause:
            n, _, flag = pause.partition(":")
            if self.parts == int(n):
                Path(flag).write_text(f"{self.parts} {self.written}\n")
                while True:  # until the test's SIGKILL
                    time.sleep(0.2)


# ------------------------------------------------------------------------------------------------ Ray stages
def _open_remote(path: str, cache: dict[str, Any]) -> bytes:
    fs_mod = _need("pyarrow.fs")
    scheme, rest = path.split("://", 1)
    key = scheme + "://" + rest.split("/", 1)[0]  # one file system (client) per bucket
    if key not in cache:
        cache[key] = fs_mod.FileSystem.from_uri(path)[0]
    with cache[key].open_input_stream(rest) as f:
        return f.read()


_FS_CACHE: dict[str, Any] = {}


def read_bytes(batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """Ray stage: add ``data`` (the file's bytes, empty on failure), ``error`` and ``read_ms`` to a listing batch."""
    data, errors, ms = [], [], []
    for p in batch["path"]:
        p = str(p)
        t0 = time.perf_counter()
        try:
            if is_remote(p):
                b = _open_remote(p, _FS_CACHE)
            else:
                with open(p, "rb") as f:
                    b = f.read()
            err = "" if b else "empty file"
        except Exception as e:  # noqa: BLE001 -- any failure to read is this image's error row
            b, err = b"", f"cannot read: {e.strerror if isinstance(e, OSError) and e.strerror else e}"
        data.append(b)
        errors.append(err)
        ms.append((time.perf_counter() - t0) * 1e3)
    out = dict(batch)
    out["data"] = np.array(data, dtype=object)
    out["error"] = np.array(errors, dtype=object)
    out["read_ms"] = np.asarray(ms, np.float32)
    return out


class ArchiveWorker:
    """Ray actor body: opens the model once (from bytes the driver sent, so nodes need no copy of it) and classifies
    batches of encoded images into result rows."""

    def __init__(self, model_files: dict[str, bytes], model_name: str, fingerprint: str, *, backend: str = "auto",
                 threshold: float | str | None = None, threads: int = 1, quality_gate: bool = True,
                 self_check: bool | None = None) -> None:
        from runtime.classifier import Classifier

        self.dir = tempfile.mkdtemp(prefix="sem-archive-model-")
        for name, blob in model_files.items():
            Path(self.dir, name).write_bytes(blob)
        self.fingerprint = fingerprint
        self.clf = Classifier(Path(self.dir, model_name), backend, threshold, threads=threads, spin=False,
                              quality_gate=quality_gate, self_check=self_check)
        node = "local"
        with contextlib.suppress(Exception):
            import ray

            node = ray.get_runtime_context().get_node_id()[:8]
        self.worker = f"{node}:{os.getpid()}"

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        n = len(batch["path"])
        paths = [str(p) for p in batch["path"]]
        errors = [str(e) for e in batch["error"]]
        ok = [i for i in range(n) if not errors[i]]
        preds = self.clf.predict_batch([batch["data"][i] for i in ok], on_error="keep",
                                       sources=[paths[i] for i in ok]) if ok else []
        label, top, reason = [""] * n, [""] * n, [""] * n
        conf = np.zeros(n, np.float32)
        score = np.full(n, np.nan, np.float32)
        rejected = np.zeros(n, bool)
        pre, inf, tot = np.zeros(n, np.float32), np.zeros(n, np.float32), np.zeros(n, np.float32)
        for i, p in zip(ok, preds):
            if isinstance(p, Exception):
                errors[i] = str(p) or type(p).__name__
                continue
            label[i], top[i], reason[i] = p.label, p.top_label, p.reason
            conf[i], score[i], rejected[i] = p.confidence, p.score, p.rejected
            pre[i], inf[i] = p.timings.get("preprocess", 0.0), p.timings.get("inference", 0.0)
            tot[i] = p.timings.get("total", 0.0)
        now = time.time()
        return {
            "path": np.array(paths, dtype=object), "size": np.asarray(batch["size"], np.int64),
            "mtime_ns": np.asarray(batch["mtime_ns"], np.int64), "label": np.array(label, dtype=object),
            "confidence": conf, "rejected": rejected, "score": score, "top_label": np.array(top, dtype=object),
            "reason": np.array(reason, dtype=object), "error": np.array(errors, dtype=object),
            "model": np.array([self.fingerprint] * n, dtype=object),
            "worker": np.array([self.worker] * n, dtype=object),
            "read_ms": np.asarray(batch["read_ms"], np.float32), "preprocess_ms": pre, "inference_ms": inf,
            "total_ms": tot + np.asarray(batch["read_ms"], np.float32), "finished_at": np.full(n, now, np.float64),
        }


# ------------------------------------------------------------------------------------------------ the job
@dataclass
class ArchiveConfig:
    source: str
    out: str
    model: str | None = None
    address: str | None = None
    workers: int = 0  # 0 = one per CPU of the cluster (divided by cpus_per_worker)
    cpus_per_worker: float = 1.0
    gpus_per_worker: float = 0.0
    batch_size: int = 16
    backend: str = "auto"
    threshold: str | None = None
    quality_gate: bool = True
    self_check: bool | None = None
    part_rows: int = 1000
    part_seconds: float = 30.0
    block_rows: int = 0  # listing rows per Ray block (0 = about 1/16 of each worker's share, 1 to 16 batches)
    object_store_mb: int = 0  # local instance only (0 = Ray's default)
    progress: bool = True


@dataclass
class ArchiveSummary:
    listed: int = 0
    already_done: int = 0
    classified: int = 0
    errors: int = 0
    errors_before: int = 0  # rows with an error among the images already done (they are not retried)
    invalid: int = 0
    rejected: int = 0
    labels: dict[str, int] = field(default_factory=dict)
    seconds: float = 0.0
    images_per_s: float = 0.0
    workers: int = 0
    parts_written: int = 0
    rows_total: int = 0
    interrupted: bool = False
    model: str = ""
    #: Seconds from the job's start to the end of each start-up phase (model checked, listed, resume read, Ray
    #: ready, first result rows) and to the last result: what a short job spends before classifying.
    phases: dict[str, float] = field(default_factory=dict)


def _model_files(model: str | None) -> tuple[dict[str, bytes], str, str]:
    from runtime.classifier import resolve_model
    from runtime.remote import model_fingerprint

    path = resolve_model(model)
    if not path.is_file():
        raise ArchiveError(f"--model {path}: no such file")
    if path.suffix.lower() == ".onnx":
        # Open it here once, so a bad model is one clear error before Ray starts, not a traceback from every actor.
        # (An engine is left to the GPU nodes: this driver may have none.)
        from runtime.classifier import Classifier

        Classifier(path, "cpu", threads=1, warmup=False, self_check=False, quality_gate=False).close()
    files = {path.name: path.read_bytes()}
    sidecar = Path(str(path) + ".json")  # a TensorRT engine's sidecar (runtime.trt_backend)
    if sidecar.is_file():
        files[sidecar.name] = sidecar.read_bytes()
    return files, path.name, model_fingerprint(path)


def _check_job(out: Path, cfg: ArchiveConfig, fingerprint: str, model_name: str) -> None:
    job = out / JOB_FILE
    if job.is_file():
        prev = json.loads(job.read_text())
        if prev.get("model_fingerprint") != fingerprint:
            raise ArchiveError(f"--out {out}: its rows come from model {prev.get('model')} (fingerprint "
                               f"{prev.get('model_fingerprint')}), not {model_name} ({fingerprint}); "
                               "use another --out for another model")
        return
    atomic_write_text(job, json.dumps({"source": cfg.source, "model": model_name, "model_fingerprint": fingerprint,
                                       "columns": [n for n, _ in COLUMNS], "created": time.time()}, indent=2) + "\n")


def _init_ray(cfg: ArchiveConfig) -> Any:
    ray = _need("ray")
    if not ray.is_initialized():
        kw: dict[str, Any] = {"logging_level": logging.WARNING, "log_to_driver": False}
        if cfg.address:
            ray.init(address=cfg.address, **kw)
        else:
            if cfg.object_store_mb:
                kw["object_store_memory"] = cfg.object_store_mb * 1024 * 1024
            ray.init(include_dashboard=False, **kw)
    return ray


def run_archive(cfg: ArchiveConfig) -> ArchiveSummary:
    """List, skip what ``cfg.out`` already has, classify the rest on Ray, write Parquet parts; see the module doc."""
    if cfg.batch_size < 1 or cfg.part_rows < 1 or cfg.cpus_per_worker <= 0 or cfg.gpus_per_worker < 0:
        raise ArchiveError("--batch-size and --part-rows must be at least 1, --cpus-per-worker above 0")
    t_start = time.perf_counter()
    out = Path(cfg.out)
    out.mkdir(parents=True, exist_ok=True)
    phases: dict[str, float] = {}

    def mark(name: str) -> None:
        phases[name] = round(time.perf_counter() - t_start, 3)

    files, model_name, fingerprint = _model_files(cfg.model)
    _check_job(out, cfg, fingerprint, model_name)
    mark("model")
    listing = list_source(cfg.source)
    for p in listing.problems[:20]:
        log.warning("%s", p)
    mark("listed")
    done, rows_before, failed = done_images(out)
    mark("resume_read")
    todo = pending(listing, done)
    todo_set = set(todo)
    summary = ArchiveSummary(listed=len(listing), already_done=len(listing) - len(todo), model=fingerprint,
                             errors_before=sum(1 for i, p in enumerate(listing.paths)
                                               if p in failed and i not in todo_set), phases=phases)
    log.info("%d images listed, %d already in %s, %d to classify", len(listing), summary.already_done, out, len(todo))
    writer = PartWriter(out, cfg.part_rows, cfg.part_seconds)
    if todo:
        _classify(cfg, listing, todo, files, model_name, fingerprint, writer, summary, done, mark)
    mark("done")
    summary.parts_written = writer.parts
    summary.rows_total = rows_before + writer.written
    summary.seconds = time.perf_counter() - t_start
    summary.images_per_s = summary.classified / summary.seconds if summary.seconds > 0 else 0.0
    atomic_write_text(out / SUMMARY_FILE, json.dumps(asdict(summary), indent=2) + "\n")
    return summary


def _classify(cfg: ArchiveConfig, listing: Listing, todo: list[int], files: dict[str, bytes], model_name: str,
              fingerprint: str, writer: PartWriter, summary: ArchiveSummary,
              done: dict[str, tuple[int, int]], mark: Any = lambda name: None) -> None:
    ray = _init_ray(cfg)
    mark("ray_ready")
    ctx = ray.data.DataContext.get_current()
    ctx.enable_progress_bars = False  # ours counts images; Ray's count blocks per operator
    ctx.print_on_execution_start = False
    # Start every actor (each opens its model) before the first batch, and fail with a clear timeout instead of
    # waiting forever when the cluster cannot place them.
    ctx.wait_for_min_actors_s = 600
    workers = cfg.workers
    if workers <= 0:
        cpus = ray.cluster_resources().get("CPU", 1.0)
        workers = max(1, int(cpus // cfg.cpus_per_worker))
    summary.workers = workers
    # Blocks of a few batches: every actor gets work early and the last blocks end close together; capped so a
    # million images stay a few thousand objects.
    block = cfg.block_rows or min(max(-(-len(todo) // (16 * workers)), cfg.batch_size), 16 * cfg.batch_size)
    # from_items builds the blocks and their metadata here; from_arrow would first wait for a worker process to
    # read each block's metadata, which at start-up is the slowest part of a short job.
    ds = ray.data.from_items(_Rows(listing, todo), override_num_blocks=-(-len(todo) // block))
    ds = ds.map_batches(read_bytes, batch_size=cfg.batch_size, batch_format="numpy", zero_copy_batch=False)
    threads = max(1, int(round(cfg.cpus_per_worker)))
    ds = ds.map_batches(
        ArchiveWorker, batch_size=cfg.batch_size, batch_format="numpy", zero_copy_batch=False,
        compute=ray.data.ActorPoolStrategy(size=workers), num_cpus=cfg.cpus_per_worker,
        num_gpus=cfg.gpus_per_worker or None,
        fn_constructor_args=(files, model_name, fingerprint),
        fn_constructor_kwargs={"backend": cfg.backend, "threshold": cfg.threshold, "threads": threads,
                               "quality_gate": cfg.quality_gate, "self_check": cfg.self_check})
    bar = _progress(len(todo), cfg.progress)
    stop = {"signal": 0}

    def on_signal(signum: int, _frame: Any) -> None:
        stop["signal"] = signum

    main_thread = threading.current_thread() is threading.main_thread()  # signal handlers only there
    old = {s: signal.signal(s, on_signal) for s in (signal.SIGINT, signal.SIGTERM)} if main_thread else {}
    try:
        for batch in ds.iter_batches(batch_size=None, batch_format="pyarrow", prefetch_batches=1):
            paths = batch.column("path").to_pylist()
            sizes = batch.column("size").to_pylist()
            mtimes = batch.column("mtime_ns").to_pylist()
            # A row for an image this job already wrote (a retried task) is dropped: never two rows per image.
            fresh = [i for i, p in enumerate(paths) if done.get(p) != (sizes[i], mtimes[i])]
            if len(fresh) < len(paths):
                batch = batch.take(fresh)
            for i in fresh:
                done[paths[i]] = (sizes[i], mtimes[i])
            if not summary.classified:
                mark("first_rows")
                log.info("started: %s", ", ".join(f"{k} {v:.1f} s" for k, v in summary.phases.items()))
            _count(batch, summary)
            writer.add(batch)
            bar.update(batch.num_rows)
            bar.set_postfix_str(f"errors {summary.errors} invalid {summary.invalid}", refresh=False)
            if stop["signal"]:
                summary.interrupted = True
                log.warning("interrupted: writing the %d rows received; rerun the same command to finish",
                            writer.buffered)
                break
    finally:
        # Also when the Ray job fails (an actor cannot open the model, the cluster goes away): the rows received are
        # good and are kept, so the rerun only does the rest.
        writer.flush()
        for s, h in old.items():
            signal.signal(s, h)
        bar.close()


class _Rows(Sequence[dict[str, Any]]):
    """The listing rows still to classify, as the dicts ``ray.data.from_items`` asks for, made one at a time so the
    driver never holds a dict per image."""

    def __init__(self, listing: Listing, todo: list[int]) -> None:
        self.listing, self.todo = listing, todo

    def __len__(self) -> int:
        return len(self.todo)

    def __getitem__(self, j: Any) -> Any:
        if isinstance(j, slice):
            return [self[k] for k in range(*j.indices(len(self)))]
        i = self.todo[j]
        return {"path": self.listing.paths[i], "size": self.listing.sizes[i], "mtime_ns": self.listing.mtimes[i]}


def _count(batch: Any, summary: ArchiveSummary) -> None:
    errors = batch.column("error").to_pylist()
    labels = batch.column("label").to_pylist()
    reasons = batch.column("reason").to_pylist()
    rejected = batch.column("rejected").to_pylist()
    for e, lab, r, rej in zip(errors, labels, reasons, rejected):
        summary.classified += 1
        if e:
            summary.errors += 1
            continue
        summary.labels[lab] = summary.labels.get(lab, 0) + 1
        summary.invalid += bool(r)
        summary.rejected += bool(rej) and not r


class _NoBar:
    def update(self, n: int) -> None: ...
    def set_postfix_str(self, s: str, refresh: bool = True) -> None: ...
    def close(self) -> None: ...


def _progress(total: int, enabled: bool) -> Any:
    if not enabled:
        return _NoBar()
    try:
        from tqdm import tqdm
    except ModuleNotFoundError:
        return _NoBar()
    return tqdm(total=total, unit="img", desc="archive", dynamic_ncols=True, smoothing=0.05)


# ------------------------------------------------------------------------------------------------ CLI
EPILOG = """examples:
  python -m runtime.archive --source /data/lot42 --out results/lot42                  # local Ray, all cores
  python -m runtime.archive --source 'scans/**/*.tif' --out results/audit --model m.onnx --workers 2
  python -m runtime.archive --source files.txt --out results/x --address auto          # a running cluster
  python -m runtime.archive --source s3://bucket/lot42/ --out results/lot42 --address ray://head:10001

Run the same command again with the same --out to finish an interrupted job: images already written (same path,
size and mtime) are skipped. Read the rows with pyarrow/pandas (pd.read_parquet(OUT)) or runtime.archive.read_results.
exit codes: 0 every image has a row, 3 some rows carry an error (unreadable or bad files), 2 nothing ran
(arguments, source, model, --out of another model; or Ray missing), 130 interrupted (rows so far written).
"""


def build_parser() -> argparse.ArgumentParser:
    d = ArchiveConfig("", "")
    p = argparse.ArgumentParser(prog="python -m runtime.archive", description=__doc__.split("\n\n")[0],
                                epilog=EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--source", "-s", required=True,
                   help="folder (recursive), glob ('**' recursive), LIST.txt (one path/URI per line) or s3://, gs:// "
                   "prefix (pyarrow file systems)")
    p.add_argument("--out", "-o", required=True, help="output folder of Parquet parts (rerun with it to resume)")
    p.add_argument("--model", "-m", help="ONNX model or TensorRT engine (default: the bundled model); sent to every "
                   "worker by Ray, so cluster nodes need no copy")
    p.add_argument("--address", help="Ray cluster: auto (the one `ray start` made here) or ray://HOST:10001; "
                   "default: a local Ray instance with this machine's cores")
    p.add_argument("--workers", type=int, default=d.workers, help="model actors (default: cluster CPUs / "
                   "--cpus-per-worker)")
    p.add_argument("--cpus-per-worker", type=float, default=d.cpus_per_worker,
                   help="CPUs reserved per actor; also its ONNX Runtime threads (default %(default)s)")
    p.add_argument("--gpus-per-worker", type=float, default=d.gpus_per_worker,
                   help="GPUs per actor (e.g. 1, or 0.5 to share one between two); default 0")
    p.add_argument("--batch-size", type=int, default=d.batch_size, help="images per inference batch (default "
                   "%(default)s)")
    p.add_argument("--backend", default=d.backend, choices=("auto", "ort", "cpu", "cuda", "trt"))
    p.add_argument("--threshold", help="rejection threshold override, or 'off' (default: the model's)")
    p.add_argument("--no-quality-gate", dest="quality_gate", action="store_false",
                   help="classify every frame (no 'invalid' rows from the frame-quality gate)")
    p.add_argument("--self-check", dest="self_check", action="store_true", default=None,
                   help="run the model's golden self-check in every actor (default: INT8 models and engines)")
    p.add_argument("--no-self-check", dest="self_check", action="store_false")
    p.add_argument("--part-rows", type=int, default=d.part_rows,
                   help="rows per Parquet part; an interruption redoes at most this many (default %(default)s)")
    p.add_argument("--part-seconds", type=float, default=d.part_seconds,
                   help="write a part at least this often (default %(default)s)")
    p.add_argument("--object-store-mb", type=int, default=0,
                   help="object store size of the local Ray instance (default: Ray's); bounds memory")
    p.add_argument("--no-progress", dest="progress", action="store_false", help="no progress bar")
    p.add_argument("--quiet", "-q", action="store_true", help="only warnings and errors on stderr")
    return p


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.WARNING if args.quiet else logging.INFO, format="%(message)s")
    cfg = ArchiveConfig(**{k: v for k, v in vars(args).items() if k != "quiet"})
    try:
        s = run_archive(cfg)
    except (ArchiveError, ModuleNotFoundError, OSError, ValueError) as e:
        print(f"python -m runtime.archive: {e}", file=sys.stderr)
        return EXIT_USAGE
    labels = ", ".join(f"{k} {v}" for k, v in sorted(s.labels.items(), key=lambda kv: -kv[1]))
    print(f"{s.classified} classified ({s.images_per_s:.1f} images/s on {s.workers} workers), {s.already_done} "
          f"already done ({s.errors_before} with errors), {s.errors} errors, {s.invalid} invalid, {s.rejected} "
          f"rejected; {s.rows_total} rows in {cfg.out}" + (f" [{labels}]" if labels else ""), file=sys.stderr)
    if s.interrupted:
        return EXIT_INTERRUPTED
    return EXIT_INPUT if s.errors or s.errors_before else EXIT_OK


def iter_rows(out: str | os.PathLike[str]) -> Iterator[dict[str, Any]]:
    """Every (newest) row of a job's output as a dict, for small scripts."""
    yield from read_results(out).to_pylist()


if __name__ == "__main__":
    sys.exit(main())
