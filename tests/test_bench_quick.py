"""``bridge bench`` runs a tiny configuration end to end on real Redis and writes its JSON.

Uses Redis databases 7 (broker) and 8 (state) with the prefix ``bench`` by default
(``ITSM_BRIDGE_BENCH_TEST_REDIS_DBS=7,8`` to change), never the suites' 11-13, and never
the benchmark's own 5 and 6, so a benchmark running meanwhile is not disturbed.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from urllib.parse import urlparse, urlunparse

import pytest

from bridge.bench import INTAKE_PREFETCH
from tests.conftest import REDIS_URL, require_service

KEYS = (
    "floor_msgs_per_s",
    "floor_rtt_msgs_per_s",
    "per_alert_alerts_per_s",
    "batched_alerts_per_s",
    "new_incidents_per_s",
    "latency_p50_ms",
    "latency_p99_ms",
    "itsm_latency_ms",
    "storm_alerts",
    "storm_keys",
    "storm_token_requests",
    "storm_creates",
    "storm_writes",
    "redis_bytes_per_key",
    "worker_rss_growth_ratio",
    "broker",
    "workers",
    "git_commit",
)


@pytest.mark.timeout(90)
def test_bench_quick_writes_every_figure(tmp_path: Path, capsys: pytest.CaptureFixture[str]):
    require_service(REDIS_URL, 6379, "Redis")
    from bridge.bench import main

    broker_db, state_db = os.environ.get("ITSM_BRIDGE_BENCH_TEST_REDIS_DBS", "7,8").split(",")
    server = urlunparse(urlparse(REDIS_URL)._replace(path=""))
    out = tmp_path / "bench.json"
    code = main(
        [
            "--quick",
            "--scale",
            "0.1",
            "--redis-url",
            server,
            "--broker-db",
            broker_db,
            "--state-db",
            state_db,
            "--json",
            str(out),
        ]
    )
    printed = capsys.readouterr()
    assert code == 0, printed.err
    data = json.loads(out.read_text())
    missing = [k for k in KEYS if k not in data]
    assert not missing, missing
    assert data["broker"] == "redis"
    assert data["workers"] == 2
    assert data["prefetch_multiplier"] == INTAKE_PREFETCH  # the intake workers as deployed
    assert data["storm_keys"] == 10
    assert data["storm_alerts"] == 200
    # the storm creates one incident per key with one token, whatever the speed
    assert data["storm_creates"] == data["storm_keys"]
    assert data["storm_token_requests"] == 1
    rates = ("floor_msgs_per_s", "floor_rtt_msgs_per_s", "per_alert_alerts_per_s")
    for key in (*rates, "batched_alerts_per_s"):
        assert data[key] is not None and data[key] > 0, key
    assert data["latency_p99_ms"] >= data["latency_p50_ms"] > 0
    assert 0 < data["redis_bytes_per_key"] < 10_000
    assert "per-alert path" in printed.out
    # each floor is drained on both sides of the storm, and the ratios use the mean
    for floor in ("floor", "floor_rtt"):
        before, after = data[f"{floor}_msgs_per_s_before"], data[f"{floor}_msgs_per_s_after"]
        assert data[f"{floor}_msgs_per_s"] == pytest.approx((before + after) / 2)
