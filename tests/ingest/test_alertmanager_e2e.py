"""A real Alertmanager 0.25 delivers firing and resolved groups through the bridge."""

from __future__ import annotations

import shutil
import signal
import socket
import subprocess
from datetime import UTC, datetime, timedelta

import pytest
import redis as redis_lib
import requests

from bridge.ingest import start_ingest
from tests.conftest import IN_CI, REDIS_URL
from tests.pipeline.stack import BridgeStack
from tests.servers import wait_for

TOKEN = "am-e2e-ingest-token-5d1c"
BROKER_URL = REDIS_URL.rsplit("/", 1)[0] + "/11"


def _alertmanager_binary() -> str:
    for name in ("prometheus-alertmanager", "alertmanager"):
        path = shutil.which(name)
        if path:
            return path
    message = "Alertmanager is not installed (Debian: apt-get install prometheus-alertmanager)"
    if IN_CI:
        pytest.fail(message)
    pytest.skip(message)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture
def bridge(redis_url, itsm_sim, unique, tmp_path):
    broker = redis_lib.Redis.from_url(BROKER_URL)
    broker.flushdb()
    stack = BridgeStack(
        broker_url=BROKER_URL,
        redis_url=redis_url,
        sim=itsm_sim,
        prefix=f"am{unique}",
        log_path=tmp_path / "workers.log",
        extra_env={"BRIDGE_INGEST_TOKENS": TOKEN},
    )
    stack.start_workers()
    settings = stack.settings.model_copy(update={"http_port": _free_port()})
    ingest = start_ingest(settings, stack.app)
    yield stack, ingest
    ingest.stop()
    stack.close()
    broker.flushdb()
    broker.close()


@pytest.fixture
def alertmanager(bridge, tmp_path):
    _stack, ingest = bridge
    port = _free_port()
    config = tmp_path / "alertmanager.yml"
    config.write_text(
        f"""
route:
  receiver: bridge
  group_by: ['alertname']
  group_wait: 1s
  group_interval: 1s
  repeat_interval: 1h
receivers:
  - name: bridge
    webhook_configs:
      - url: {ingest.url}/api/v1/alerts/alertmanager
        send_resolved: true
        http_config:
          authorization:
            type: Bearer
            credentials: {TOKEN}
"""
    )
    log = (tmp_path / "alertmanager.log").open("wb")
    proc = subprocess.Popen(
        [
            _alertmanager_binary(),
            f"--config.file={config}",
            f"--storage.path={tmp_path / 'am-data'}",
            f"--web.listen-address=127.0.0.1:{port}",
            "--cluster.listen-address=",
        ],
        stdout=log,
        stderr=subprocess.STDOUT,
    )
    url = f"http://127.0.0.1:{port}"

    def ready() -> bool:
        try:
            return requests.get(f"{url}/-/ready", timeout=1).status_code == 200
        except requests.ConnectionError:
            return False

    wait_for(ready, timeout=30, what="Alertmanager to be ready")
    yield url
    proc.send_signal(signal.SIGTERM)
    proc.wait(timeout=10)
    log.close()


def _post_alerts(am_url: str, instances: list[str], ends_at: datetime) -> None:
    now = datetime.now(UTC)
    alerts = [
        {
            "labels": {"alertname": "DiskAlmostFull", "instance": i, "severity": "critical"},
            "annotations": {"summary": f"disk on {i} is almost full"},
            "startsAt": (now - timedelta(minutes=1)).isoformat(),
            "endsAt": ends_at.isoformat(),
        }
        for i in instances
    ]
    answer = requests.post(f"{am_url}/api/v2/alerts", json=alerts, timeout=5)
    assert answer.status_code == 200, answer.text


def _status(incident: dict) -> str:
    return incident.get("statusName") or incident.get("status") or ""


def test_alertmanager_firing_and_resolved_groups_become_incidents_and_resolutions(
    alertmanager, bridge, itsm_sim
):
    instances = ["db-01:9100", "db-02:9100", "db-03:9100"]
    _post_alerts(alertmanager, instances, datetime.now(UTC) + timedelta(hours=1))
    wait_for(lambda: len(itsm_sim.incidents()) == 3, timeout=60, what="three incidents")

    _post_alerts(alertmanager, instances, datetime.now(UTC) - timedelta(seconds=1))
    wait_for(
        lambda: all(_status(i) == "Resolved" for i in itsm_sim.incidents()),
        timeout=60,
        what="all three incidents resolved",
    )
    assert len(itsm_sim.incidents()) == 3
    assert itsm_sim.calls()["create"] == 3
