"""Logs of a full inline run: every decision line carries the alert's key, no secret leaks.

The run goes through a storm (one incident, repeats folded), a recovery, an ITSM
outage long enough to dead-letter a create, an invalid payload, and a replay. The last
test is of the logging setup alone: a line below the level is dropped before any work.
"""

from __future__ import annotations

import io
import json
import logging

import pytest
import structlog

from bridge.logs import configure_logging
from bridge.pipeline import envelope
from tests.conftest import SIM_CLIENT_SECRET, SIM_PASSWORD
from tests.pipeline.stack import am_alert
from tests.pipeline.test_pipeline import Harness

# Event texts of the lines that record what happened to an alert.
DECISION_EVENTS = (
    "created",
    "adopted",
    "folded",
    "resolved",
    "recovery",
    "reopened",
    "retrying",
    "dead-lettered",
    "superseded",
)


def _changed(alert: dict, n: int) -> dict:
    """A repeat whose text changed (an unchanged Alertmanager snapshot is not even counted)."""
    alert["annotations"]["summary"] += f" ({n} in a row)"
    return alert


@pytest.fixture
def run(serviceops_sim, redis_client):
    """A full run's log lines (parsed JSON) and the harness it ran on."""
    root = logging.getLogger()
    saved = (root.handlers[:], root.level)
    stream = io.StringIO()
    h = Harness(serviceops_sim, redis_client)
    configure_logging("DEBUG", "json", h.settings.secret_values(), stream=stream)
    try:
        # storm: one incident, repeats counted, then folded into one note
        for i in range(20):
            h.send(_changed(am_alert("storm"), i))
        h.clock.now += h.settings.dedup_update_interval_s
        h.send(_changed(am_alert("storm"), 20))
        # recovery
        h.send(am_alert("storm", status="resolved"))
        # ITSM outage: every create fails until the attempts run out -> dead letter
        serviceops_sim.fail_next(h.settings.retry_max_attempts, 503, operations=("create",))
        h.send(am_alert("outage"))
        # a payload that will never parse -> dead letter for the whole message
        h.pipeline.intake(envelope("alertmanager", {"alerts": "nope"}), "msg-bad")
        # back to normal: replay the create
        for entry in h.rt.dlq.list():
            if entry.kind == "action":
                h.pipeline.replay(entry)
        h.drain()
        h.token = h.pipeline.client._auth.token()  # the live access token, for the leak check
    finally:
        h.pipeline.client.close()
        root.handlers[:], level = saved
        root.setLevel(level)
        structlog.reset_defaults()
    lines = [json.loads(line) for line in stream.getvalue().splitlines() if line.strip()]
    return lines, h


def _key_of(h, fingerprint: str) -> str:
    for incident in h.sim.incidents():
        for tag in incident["tags"]:
            if tag.startswith("bridge-key:") and f"problem {fingerprint}" in incident["subject"]:
                return tag.removeprefix("bridge-key:")
    raise AssertionError(f"no incident for {fingerprint}")


def _decision_lines(lines):
    return [
        line
        for line in lines
        if line.get("logger") == "bridge.pipeline"
        and str(line.get("event", "")).startswith(DECISION_EVENTS)
    ]


def test_every_decision_line_carries_the_alert_key(run):
    lines, _ = run
    decisions = _decision_lines(lines)
    assert decisions, "the run logged no decision"
    for line in decisions:
        if line.get("key"):
            continue
        # a message that never parsed has no key; its line names the dead letter instead
        assert line["event"] == "dead-lettered" and line.get("dlq_id"), line


def test_one_grep_on_a_key_follows_the_alert_from_outage_to_replay(run):
    lines, h = run
    key = _key_of(h, "outage")
    mine = [line["event"] for line in lines if line.get("key") == key]
    assert any(e == "retrying" for e in mine)
    assert any(e == "dead-lettered: retries_exhausted" for e in mine)
    assert any(e.startswith("created ") for e in mine), mine
    assert mine.index("dead-lettered: retries_exhausted") < max(
        i for i, e in enumerate(mine) if e.startswith("created ")
    )


def test_storm_and_recovery_are_one_line_each_with_the_key(run):
    lines, h = run
    key = _key_of(h, "storm")
    mine = [line["event"] for line in lines if line.get("key") == key]
    assert sum(e.startswith("created ") for e in mine) == 1
    assert sum(e.startswith("folded ") for e in mine) == 1
    assert sum(e.startswith("resolved ") for e in mine) == 1
    created = next(
        line for line in lines if line.get("key") == key and line["event"].startswith("created ")
    )
    assert created["incident"].startswith(("INC-", "#")) or created["incident"]


def test_no_secret_or_token_appears_in_the_logs(run):
    lines, h = run
    text = json.dumps(lines)
    for secret in (SIM_CLIENT_SECRET, SIM_PASSWORD, *h.settings.secret_values()):
        assert secret not in text
    assert h.token and h.token not in text


def test_every_alert_decided_at_intake_has_a_line_with_its_key(run):
    lines, h = run
    key = _key_of(h, "storm")
    intake = [
        line
        for line in lines
        if line.get("key") == key and line.get("decision") in {"count_only", "wait_for_creator"}
    ]
    assert intake


def test_a_line_below_the_level_is_dropped_before_redaction(monkeypatch):
    from bridge import logs

    root = logging.getLogger()
    saved = (root.handlers[:], root.level)
    stream = io.StringIO()
    scrubbed: list[str] = []
    monkeypatch.setattr(logs.redactor, "scrub", lambda text: scrubbed.append(text) or text)
    configure_logging("WARNING", "json", (), stream=stream)
    try:
        log = structlog.get_logger("bridge.test")
        log.info("below the level", detail="not scrubbed")
        log.warning("at the level", detail="scrubbed")
    finally:
        root.handlers[:], level = saved
        root.setLevel(level)
        structlog.reset_defaults()
    lines = [json.loads(line) for line in stream.getvalue().splitlines()]
    assert [line["event"] for line in lines] == ["at the level"]
    assert "not scrubbed" not in scrubbed and "scrubbed" in scrubbed
