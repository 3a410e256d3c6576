"""`bridge run` on embedded defaults: no Redis, no broker, no ITSM configured."""

from __future__ import annotations

import json
import os
import re
import signal
import socket
import subprocess
import sys
from pathlib import Path

import requests

from tests.servers import wait_for

SAMPLE = Path(__file__).resolve().parents[1] / "fixtures" / "samples" / "alertmanager-firing.json"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_bridge_run_turns_an_alert_into_an_incident_with_nothing_but_python(tmp_path):
    port = _free_port()
    env = {k: v for k, v in os.environ.items() if not k.startswith(("BRIDGE_", "PROMETHEUS_"))}
    env.update({"BRIDGE_HTTP_PORT": str(port), "BRIDGE_LOG_FORMAT": "json"})
    log_path = tmp_path / "run.log"
    with log_path.open("wb") as log:
        proc = subprocess.Popen(
            [sys.executable, "-m", "bridge", "run"],
            cwd=tmp_path,
            env=env,
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
    try:
        base = f"http://127.0.0.1:{port}"

        def ready() -> bool:
            try:
                return requests.get(f"{base}/healthz", timeout=1).status_code == 200
            except requests.ConnectionError:
                return False

        wait_for(ready, timeout=60, what="the embedded bridge to listen")
        answer = requests.post(
            f"{base}/api/v1/alerts/alertmanager",
            data=SAMPLE.read_bytes(),
            headers={"Content-Type": "application/json"},
            timeout=5,
        )
        assert answer.status_code == 202
        sim_url = wait_for(
            lambda: re.search(r"(http://127\.0\.0\.1:\d+)/_sim/state", log_path.read_text()),
            what="the simulator's address in the output",
        ).group(1)

        def incidents() -> list:
            return requests.get(f"{sim_url}/_sim/state", timeout=2).json()["incidents"]

        found = wait_for(lambda: len(incidents()) == 2 and incidents(), what="two incidents")
        assert {json.dumps(i["subject"]) for i in found} == {
            json.dumps("[CRITICAL] Disk /var/lib/postgresql on db-01 is 97% full"),
            json.dumps("[CRITICAL] Disk /var/lib/postgresql on db-02 is 95% full"),
        }
    finally:
        os.killpg(proc.pid, signal.SIGTERM)
        proc.wait(timeout=30)
