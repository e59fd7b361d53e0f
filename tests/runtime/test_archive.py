"""``python -m runtime.archive`` on a real two-node Ray cluster on this host (one per test session): rows for every
image, bad files as error rows, answers equal to a single-process Classifier, both nodes used, and a driver killed
mid-job then rerun with the same ``--out`` loses and duplicates nothing.

Ray comes with the ``scale`` extra; without it these tests skip, unless ``SEM_SCALE_REQUIRED=1`` (CI) makes that a
failure.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import cv2
import numpy as np
import pytest

from runtime import archive
from runtime.classifier import Classifier

REPO = Path(__file__).resolve().parents[2]
REQUIRED = os.environ.get("SEM_SCALE_REQUIRED") == "1"
#: The test cluster listens on loopback only: no token authentication (docs/scale.md says how to keep it on).
ENV = {"OMP_NUM_THREADS": "1", "RAY_AUTH_MODE": "disabled"}


def _need_ray() -> None:
    try:
        import pyarrow  # noqa: F401
        import ray  # noqa: F401
    except ModuleNotFoundError as e:
        if REQUIRED:
            raise
        pytest.skip(f"{e.name} not installed (pip install '.[scale]')")


@pytest.fixture(scope="module")
def images(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """40 small frames in two folders (dark ones classify clean, bright ones bridges), plus one corrupt file."""
    root = tmp_path_factory.mktemp("archive_images")
    rng = np.random.default_rng(0)
    for i in range(40):
        sub = root / ("a" if i % 2 else "b")
        sub.mkdir(exist_ok=True)
        img = np.clip(rng.normal(i * 6, 3, (40, 40)), 0, 255).astype(np.uint8)
        cv2.imwrite(str(sub / f"{i:03d}.png"), img)
    (root / "b" / "corrupt.png").write_bytes(b"not a png")
    (root / "notes.txt").write_text("not an image")
    return root


@pytest.fixture(scope="module")
def tiny(tiny_model: Path) -> Path:
    """tests/runtime/conftest.py's tiny ONNX model (no torch): dark frames → clean, bright → bridges."""
    return tiny_model


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _descendants(pid: int) -> list[int]:
    children: dict[int, list[int]] = {}
    for d in Path("/proc").iterdir():
        if d.name.isdigit():
            try:
                ppid = int((d / "stat").read_text().rsplit(")", 1)[1].split()[1])
            except (OSError, IndexError, ValueError):
                continue
            children.setdefault(ppid, []).append(int(d.name))
    out, todo = [], [pid]
    while todo:
        p = todo.pop()
        out.append(p)
        todo.extend(children.get(p, []))
    return out


def _start_node(args: list[str], log: Path, env: dict[str, str]) -> subprocess.Popen:
    ray_cli = Path(sys.executable).with_name("ray")
    return subprocess.Popen([str(ray_cli), "start", *args, "--block", "--disable-usage-stats"], env=env,
                            stdout=log.open("w"), stderr=subprocess.STDOUT, start_new_session=True)


def _stop(proc: subprocess.Popen) -> None:
    """SIGKILL the ``ray start --block`` process and everything it started (by pid; SIGTERM drains for 30 s)."""
    for pid in reversed(_descendants(proc.pid)):
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    proc.wait(timeout=30)


@pytest.fixture(scope="module")
def cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """A head node and a second node, one CPU each (``ray start``), on this host; yields the address."""
    _need_ray()
    logs = tmp_path_factory.mktemp("ray_logs")
    temp = Path(f"/tmp/ray_sem_{os.getpid()}")  # Ray's socket paths must stay short
    port = _free_port()
    env = {**os.environ, **ENV}
    head = _start_node(["--head", "--num-cpus", "1", "--port", str(port), "--node-ip-address", "127.0.0.1",
                        "--include-dashboard=false", "--temp-dir", str(temp)], logs / "head.log", env)
    nodes = [head]
    address = f"127.0.0.1:{port}"
    try:
        _wait_for(logs / "head.log", "Ray runtime started", head)
        second = _start_node(["--address", address, "--num-cpus", "1", "--node-ip-address", "127.0.0.1"],
                             logs / "node2.log", env)
        nodes.append(second)
        _wait_for(logs / "node2.log", "Ray runtime started", second)
        yield address
    finally:
        for n in reversed(nodes):
            _stop(n)
        shutil.rmtree(temp, ignore_errors=True)


def _wait_for(log: Path, text: str, proc: subprocess.Popen, timeout: float = 120) -> None:
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        if text in log.read_text(errors="replace"):
            return
        if proc.poll() is not None:
            raise RuntimeError(f"ray start exited {proc.returncode}: {log.read_text()[-3000:]}")
        time.sleep(0.3)
    raise TimeoutError(f"{log}: no {text!r} after {timeout} s")


def _run(args: list[str], env: dict[str, str] | None = None, **kw) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "runtime.archive", "--no-progress", *args], cwd=REPO,
                          env={**os.environ, **ENV, **(env or {})}, capture_output=True, text=True,
                          timeout=300, **kw)


# -------------------------------------------------------------------------------- without Ray: listing, bookkeeping
def test_listing_folder_glob_list_and_missing(images: Path, tmp_path: Path) -> None:
    folder = archive.list_source(str(images))
    assert len(folder) == 41 and folder.paths == sorted(folder.paths)  # .txt skipped, corrupt.png listed
    assert all(os.path.isabs(p) for p in folder.paths)
    globbed = archive.list_source(str(images / "a" / "*.png"))
    assert len(globbed) == 20
    recursive = archive.list_source(str(images / "**" / "*.png"))
    assert recursive.paths == folder.paths
    lst = tmp_path / "files.txt"
    lst.write_text(f"# two, one twice, one missing\n{folder.paths[0]}\n{folder.paths[0]}\n\n"
                   f"{folder.paths[1]}\n{tmp_path / 'gone.png'}\n")
    listed = archive.list_source(str(lst))
    assert listed.paths == [folder.paths[0], folder.paths[1], str(tmp_path / "gone.png")]
    assert listed.sizes[2] == -1 and "gone.png" in listed.problems[0]
    with pytest.raises(archive.ArchiveError, match="no such"):
        archive.list_source(str(tmp_path / "nowhere"))


def test_listing_through_a_pyarrow_file_system(images: Path) -> None:
    """The s3:// / gs:// code path (pyarrow FileSystem.from_uri), exercised with pyarrow's file:// file system."""
    _need_ray()
    listing = archive.list_source(f"file://{images}")
    assert len(listing) == 41 and all(p.startswith("file:///") for p in listing.paths)
    batch = archive.read_bytes({"path": np.array(listing.paths[:2], dtype=object)})
    assert batch["data"][0] == Path(listing.paths[0][len("file://"):]).read_bytes() and not batch["error"][0]


def test_pending_skips_same_path_size_mtime_only() -> None:
    listing = archive.Listing()
    for i in range(3):
        listing.add(f"/x/{i}.png", 10, 100)
    done = {"/x/0.png": (10, 100), "/x/1.png": (10, 999)}  # 1 changed since its row was written
    assert archive.pending(listing, done) == [1, 2]


def test_dataset_rows_are_the_pending_listing_rows_made_on_demand() -> None:
    listing = archive.Listing()
    for i in range(5):
        listing.add(f"/x/{i}.png", 10 + i, 100 + i)
    rows = archive._Rows(listing, [1, 3, 4])
    assert len(rows) == 3
    assert rows[0] == {"path": "/x/1.png", "size": 11, "mtime_ns": 101}
    assert rows[-1]["path"] == "/x/4.png" and [r["path"] for r in rows[1:]] == ["/x/3.png", "/x/4.png"]
    assert [r["size"] for r in rows] == [11, 13, 14]


def test_read_bytes_turns_an_unreadable_file_into_an_error(tmp_path: Path) -> None:
    (tmp_path / "empty.png").write_bytes(b"")
    out = archive.read_bytes({"path": np.array([str(tmp_path / "none.png"), str(tmp_path / "empty.png")],
                                               dtype=object)})
    assert "cannot read" in out["error"][0] and "No such file" in out["error"][0]
    assert out["error"][1] == "empty file"


def test_another_model_is_refused_for_the_same_out(images: Path, tiny: Path, tmp_path: Path) -> None:
    _need_ray()
    out = tmp_path / "out"
    out.mkdir()
    (out / archive.JOB_FILE).write_text('{"model": "other.onnx", "model_fingerprint": "0123456789abcdef"}')
    r = _run(["--source", str(images), "--out", str(out), "--model", str(tiny)])
    assert r.returncode == archive.EXIT_USAGE, r.stderr
    assert "other.onnx" in r.stderr and "another --out" in r.stderr
    assert not list(out.glob("part-*"))


def test_a_bad_model_is_one_line_before_ray_starts(images: Path, tmp_path: Path) -> None:
    bad = tmp_path / "bad.onnx"
    bad.write_bytes(b"not a model")
    r = _run(["--source", str(images), "--out", str(tmp_path / "o"), "--model", str(bad)])
    assert r.returncode == archive.EXIT_USAGE and "Traceback" not in r.stderr, r.stderr[-2000:]
    assert "bad.onnx" in r.stderr and "cannot load" in r.stderr
    assert not list((tmp_path / "o").glob("part-*"))


def test_missing_ray_is_one_line_and_nothing_runs(images: Path, tiny: Path, tmp_path: Path) -> None:
    site = tmp_path / "site"
    site.mkdir()
    (site / "sitecustomize.py").write_text(
        "import importlib.abc, sys\n"
        "class B(importlib.abc.MetaPathFinder):\n"
        "    def find_spec(self, name, path=None, target=None):\n"
        "        if name.partition('.')[0] in ('ray', 'pyarrow'):\n"
        "            raise ModuleNotFoundError(name, name=name)\n"
        "sys.meta_path.insert(0, B())\n")
    r = _run(["--source", str(images), "--out", str(tmp_path / "o"), "--model", str(tiny)],
             env={"PYTHONPATH": os.pathsep.join([str(site), str(REPO)])})
    assert r.returncode == archive.EXIT_USAGE
    assert r.stderr.strip().splitlines()[-1].startswith("python -m runtime.archive: needs pyarrow")
    assert "Traceback" not in r.stderr


# -------------------------------------------------------------------------------- on the two-node cluster
@pytest.mark.slow
def test_kill_the_driver_mid_job_then_rerun_loses_and_duplicates_nothing(cluster: str, images: Path, tiny: Path,
                                                                        tmp_path: Path) -> None:
    import pyarrow.parquet as pq

    out = tmp_path / "out"
    flag = tmp_path / "paused"
    common = ["--source", str(images), "--out", str(out), "--model", str(tiny), "--address", cluster,
              "--workers", "2", "--batch-size", "4", "--part-rows", "6"]
    proc = subprocess.Popen([sys.executable, "-m", "runtime.archive", "--no-progress", *common], cwd=REPO,
                            env={**os.environ, **ENV, archive.PAUSE_ENV: f"2:{flag}"},
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        end = time.monotonic() + 240
        while not flag.exists():
            assert proc.poll() is None, proc.communicate()[0][-3000:]
            assert time.monotonic() < end, "the driver never reached its second part"
            time.sleep(0.2)
    finally:
        proc.kill()  # SIGKILL: no handler runs, the buffered rows die with it
        proc.communicate(timeout=60)
    before = pq.read_table(out, columns=["path"]).column("path").to_pylist()
    assert 12 <= len(before) < 41 and len(set(before)) == len(before)

    r = _run(common)
    assert r.returncode == archive.EXIT_INPUT, r.stderr[-3000:]  # the corrupt file is an error row
    assert f"{len(before)} already" in r.stderr
    table = archive.read_results(out, latest=False)
    paths = table.column("path").to_pylist()
    print(f"\nresume after a driver kill: {len(before)} rows before, {len(paths)} after, "
          f"{len(paths) - len(set(paths))} duplicates")
    assert len(paths) == 41 and len(set(paths)) == 41, "every image exactly once"
    assert set(before) <= set(paths)
    rows = {row["path"]: row for row in table.to_pylist()}
    bad = rows[str(images / "b" / "corrupt.png")]
    assert bad["error"] and bad["label"] == "" and np.isnan(bad["score"])

    # The same answers as one Classifier in this process, the model fingerprint on every row.
    clf = Classifier(tiny)
    for p, row in rows.items():
        if p.endswith("corrupt.png"):
            continue
        pred = clf.predict(p)
        assert (row["label"], row["rejected"], row["reason"]) == (pred.label, pred.rejected, pred.reason), p
        assert row["confidence"] == pytest.approx(pred.confidence, abs=1e-5) and not row["error"]
    from runtime.remote import model_fingerprint

    assert set(table.column("model").to_pylist()) == {model_fingerprint(tiny)}
    # The rerun's two actors (one CPU each) sat on the two nodes.
    rerun_nodes = {row["worker"].split(":")[0] for p, row in rows.items() if p not in before}
    assert len(rerun_nodes) == 2, rerun_nodes

    # The rerun timed its start-up phases, in order, in its summary.
    phases = json.loads((out / archive.SUMMARY_FILE).read_text())["phases"]
    assert list(phases) == ["model", "listed", "resume_read", "ray_ready", "first_rows", "done"], phases
    assert list(phases.values()) == sorted(phases.values())

    # A third run has nothing left to do and starts no Ray job.
    s = archive.run_archive(archive.ArchiveConfig(str(images), str(out), str(tiny), address=cluster,
                                                  progress=False))
    assert (s.already_done, s.classified, s.rows_total) == (41, 0, 41)
