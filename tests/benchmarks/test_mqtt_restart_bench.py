"""benchmarks.mqtt_restart end to end on a real mosquitto: ``runtime.run`` keeps every result across a broker
SIGKILL. Skips without Debian's mosquitto or paho-mqtt; SEM_MQTT_REQUIRED=1 (CI) turns that skip into a failure."""

from __future__ import annotations

import os
import shutil

import pytest

from benchmarks.mqtt_restart import restart_benchmark

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
    assert r["lost"] == 0 and r["published_twice"] == 0 and r["distinct"] == 150
    assert r["received"] == r["distinct"] + r["broker_redeliveries"]
    assert not r["password_written"]
