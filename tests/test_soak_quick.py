"""``python -m bench.soak`` runs a 30-second soak end to end on real Redis and writes its JSON.

Not a timing test: it checks that the report has every figure, that every process was
sampled at start and end, and that the accounting holds (every alert accepted by the
ingest was decided, no dead letter). Uses Redis databases 9 (broker) and 10 (state) by
default (``ITSM_BRIDGE_SOAK_TEST_REDIS_DBS=9,10`` to change), never the suites' 11-13; both
are flushed before and after.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from urllib.parse import urlparse, urlunparse

import pytest

from tests.conftest import REDIS_URL, require_service

PROCESSES = ("ingest", "worker main", "worker pool 1", "worker pool 2")
SAMPLE_KEYS = (
    "t_s",
    "processes",
    "redis_used_memory",
    "own_bytes",
    "live_keys",
    "prefix_keys",
    "dead_letters",
    "decided",
    "queues",
    "load",
)


@pytest.mark.timeout(120)
def test_soak_quick_accounts_for_every_alert(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    require_service(REDIS_URL, 6379, "Redis")
    from bench.soak import main

    broker_db, state_db = os.environ.get("ITSM_BRIDGE_SOAK_TEST_REDIS_DBS", "9,10").split(",")
    server = urlunparse(urlparse(REDIS_URL)._replace(path=""))
    out = tmp_path / "soak.json"
    code = main(
        [
            "--minutes",
            "0.5",
            "--warmup-s",
            "10",
            "--sample-s",
            "5",
            "--rate",
            "40",
            "--keys",
            "200",
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
    # 1 is a bound exceeded: the report is still complete and checked below
    assert code in (0, 1), printed.err
    data = json.loads(out.read_text())

    # every sample has every figure; start is after the warm-up, end when the load stops
    assert len(data["samples"]) >= 5
    for sample in data["samples"]:
        missing = [k for k in SAMPLE_KEYS if k not in sample]
        assert not missing, missing
    assert data["start"]["t_s"] >= 10
    assert data["end"]["t_s"] == pytest.approx(30, abs=2)
    assert {r["process"] for r in data["processes"]} >= set(PROCESSES)
    for row in data["processes"]:
        assert row["rss_start_mib"] > 0 and row["rss_end_mib"] > 0, row
    assert data["end"]["live_keys"] > 0
    assert data["end"]["redis_used_memory"] > 0

    # the accounting: nothing accepted was lost or decided twice
    load, final = data["load"], data["final"]
    assert load["offered"] == 40 * 30
    assert load["refused"] == 0, load["statuses"]
    assert final["accepted"] == load["accepted"] == load["offered"]
    assert final["decided"] == final["accepted"]
    assert final["dead_letters"] == 0
    assert final["itsm_calls"]["create"] == data["events"]["new"] > 0
    checks = {c["check"]: c["ok"] for c in data["checks"]}
    assert checks["accepted == decided"] is True
    assert checks["dead letters"] is True

    assert "RSS start MiB" in printed.out and "accepted == decided" in printed.out
