"""``python -m benchmarks.archive`` end to end on a few small images: generated once, the single-process runner and
the Ray job both give a row per image, and the table reports throughput, CPU and memory; the /proc sampler sees a
process's real peak memory."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from benchmarks.archive import Monitor, generate, main, rss_trend

REPO = Path(__file__).resolve().parents[2]


def test_monitor_sees_peak_memory_and_cpu_of_a_child_tree() -> None:
    code = ("import subprocess, sys, time\n"
            "hold = 'b = bytearray(150 << 20); import time; time.sleep(1.5)'\n"
            "child = subprocess.Popen([sys.executable, '-c', hold])\n"
            "t = time.process_time()\nwhile time.process_time() - t < 0.6: pass\nchild.wait()\n")
    proc = subprocess.Popen([sys.executable, "-c", code])
    mon = Monitor([proc.pid], interval=0.05)
    mon.start()
    proc.wait(timeout=60)
    time.sleep(0.1)
    res = mon.stop()
    assert res["total_peak_mb"] >= 150, res  # the grandchild's 150 MB
    assert res["driver_peak_mb"] < 150 <= res["total_peak_mb"]
    assert res["cpu_s"] >= 0.5, res


def test_generate_once_and_reuse(tmp_path: Path) -> None:
    pytest.importorskip("torch")
    folder = generate(tmp_path / "images", 5, 64, pool=2, progress=False)
    files = sorted(folder.rglob("*.png"))
    assert len(files) == 5 and files[0].read_bytes() == files[2].read_bytes() != files[1].read_bytes()
    stamp = files[0].stat().st_mtime_ns
    generate(tmp_path / "images", 5, 64, pool=2, progress=False)
    assert files[0].stat().st_mtime_ns == stamp  # kept, not rewritten


def test_generate_with_hard_links_gives_distinct_paths_to_the_pool(tmp_path: Path) -> None:
    pytest.importorskip("torch")
    folder = generate(tmp_path / "images", 7, 64, pool=3, progress=False, links=True)
    files = sorted(folder.rglob("*.png"))
    assert len({str(f) for f in files}) == 7 and len({f.stat().st_ino for f in files}) == 3
    assert files[0].read_bytes() == files[3].read_bytes() == files[6].read_bytes() != files[1].read_bytes()
    assert files[0].stat().st_nlink == 3
    plain = generate(tmp_path / "images", 7, 64, pool=3, progress=False)  # another layout: made again
    assert len({f.stat().st_ino for f in plain.rglob("*.png")}) == 7


def test_monitor_series_follows_progress_and_trend_table(tmp_path: Path) -> None:
    csv = tmp_path / "rss.csv"
    proc = subprocess.Popen([sys.executable, "-c", "import time; b = bytearray(80 << 20); time.sleep(1.2)"])
    done = iter(range(0, 10_000, 100))
    mon = Monitor([proc.pid], interval=0.05, series_every=0.1, progress=lambda: next(done), series_csv=csv)
    mon.start()
    proc.wait(timeout=60)
    mon.stop()
    assert len(mon.series) >= 3
    lines = csv.read_text().splitlines()  # written while sampling, one line a row
    assert lines[0].startswith("seconds,images_done") and len(lines) == len(mon.series) + 1
    seconds, images = [r[0] for r in mon.series], [r[1] for r in mon.series]
    assert seconds == sorted(seconds) and images == sorted(images)
    assert max(r[2] for r in mon.series) >= 80 and all(r[4] >= r[2] for r in mon.series)
    table = rss_trend(mon.series)
    assert table.splitlines()[0].startswith("| images done | driver MB") and len(table.splitlines()) == 7
    assert rss_trend([(0.0, 0, 1.0, 0.0, 1.0)]).startswith("rss: no parts")


@pytest.mark.slow
def test_benchmark_single_process_and_ray(tmp_path: Path) -> None:
    try:
        import ray  # noqa: F401
    except ModuleNotFoundError:
        if os.environ.get("SEM_SCALE_REQUIRED") == "1":
            raise
        pytest.skip("ray not installed (pip install '.[scale]')")
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    assert main(["--images", "12", "--size", "96", "--out", str(tmp_path), "--runs", "single", "ray2",
                 "--batch-size", "4", "--no-progress"]) == 0
    report = json.loads((tmp_path / "archive_bench.json").read_text())
    single, ray2 = report["results"]
    assert single["rows"] == ray2["rows"] == 12 and ray2["duplicates"] == 0
    assert ray2["model_workers"] >= 2 and ray2["worker_peak_mb"] > 50 and ray2["driver_peak_mb"] > 50
    assert single["wall_s"] > 0 and single["cpu_s"] > 0
    # Start-up and shut-down are reported apart from the steady rate.
    assert 0 < ray2["first_result_s"] < ray2["wall_s"] and 0 <= ray2["exit_after_last_s"] < ray2["wall_s"]
    assert "first_rows" in ray2["phases"]
    md = (tmp_path / "archive_bench.md").read_text()
    assert "runtime.run (1 process)" in md and "runtime.archive, local (2 workers)" in md
