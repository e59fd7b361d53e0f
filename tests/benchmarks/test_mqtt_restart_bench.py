"""benchmarks.mqtt_restart end to end on a real mosquitto: ``runtime.run`` keeps every result across a broker
SIGKILL. Skips without Debian's mosquitto or paho-mqtt; SEM_MQTT_REQUIRED=1 (CI) turns that skip into a failure."""

from __future__ import annotations

import os
import shutil

import pytest

from benchmarks.mqtt_restart import _tally, restart_benchmark
from runtime.mqtt import MAX_OUTSTANDING

if os.environ.get("SEM_MQTT_REQUIRED") != "1":
    pytest.importorskip("paho.mqtt.client", reason="paho-mqtt is not installed (pip install '.[station]')")


def _need(what: str) -> None:
    if os.environ.get("SEM_MQTT_REQUIRED") == "1":
        pytest.fail(f"{what} (SEM_MQTT_REQUIRED=1)")
    pytest.skip(what)


@pytest.mark.slow
def test_no_result_is_lost_or_published_twice_across_a_broker_crash() -> None:
    exe = shutil.which("mosquitto") or "/usr/sbin/mosquitto"
    if not os.path.exists(exe) or not (shutil.which("mosquitto_passwd") or os.path.exists("/usr/bin/mosquitto_passwd")):
        _need("needs Debian's mosquitto (apt-get install mosquitto)")
    r = restart_benchmark(exe, frames=150, kill_after=0.0, down=0.5)
    assert r["run_exit"] == 0 and r["records"] == 150
    assert r["received_before_kill"] < r["records"]  # the broker died while results were flowing
    assert r["lost"] == 0 and r["distinct"] == 150
    # QoS 1 is at least once: only results in flight at the crash may arrive twice, and no more than the client's
    # window of unacknowledged messages.
    assert r["published_twice_unexplained"] == 0
    assert r["published_twice"] == r["repeated_in_flight"] <= MAX_OUTSTANDING
    assert r["received"] == r["distinct"] + r["broker_redeliveries"] + r["published_twice"]
    assert not r["password_written"]


def test_repeats_are_told_apart_by_which_broker_sent_them_first(tmp_path) -> None:
    # seq 1 and 2 came from the old broker; 2 again from the new one (in flight at the crash), 3 twice from the new
    # one without DUP (a fault), 1 re-delivered by the broker itself (DUP: not a publish).
    got = [(1, False), (2, False), (2, False), (3, False), (3, False), (1, True)]
    counts, leaked = _tally(tmp_path, got, 3, "", from_old_broker=2)
    assert counts["published_twice"] == 2 and counts["repeated_in_flight"] == 1
    assert counts["published_twice_unexplained"] == 1 and counts["broker_redeliveries"] == 1
    assert counts["lost"] == 0 and not leaked
