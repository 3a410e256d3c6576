"""The pipeline end to end: prefork workers, a real broker, real Redis, the simulator.

Each test runs once with Redis as the broker and once with RabbitMQ.
"""

from __future__ import annotations

import itertools
import random
import subprocess
import sys

import pytest
import redis as redis_lib

from tests.conftest import AMQP_URL, REDIS_URL, require_service
from tests.pipeline.stack import ROOT, BridgeStack, am_alert, am_payload
from tests.servers import wait_for

BROKER_REDIS_URL = REDIS_URL.rsplit("/", 1)[0] + "/11"


def _purge_amqp() -> None:
    from kombu import Connection

    with Connection(AMQP_URL, connect_timeout=3) as conn:
        channel = conn.channel()
        for queue in ("bridge.intake", "bridge.urgent", "bridge.updates"):
            try:
                channel.queue_purge(queue)
            except Exception:
                channel = conn.channel()


@pytest.fixture(params=["redis", "rabbitmq"])
def broker_url(request, redis_url):
    if request.param == "redis":
        client = redis_lib.Redis.from_url(BROKER_REDIS_URL)
        client.flushdb()
        yield BROKER_REDIS_URL
        client.flushdb()
        client.close()
    else:
        require_service(AMQP_URL, 5672, "RabbitMQ")
        _purge_amqp()
        yield AMQP_URL
        _purge_amqp()


def _stack(broker_url, redis_url, sim, unique, tmp_path, **env):
    stack = BridgeStack(
        broker_url=broker_url,
        redis_url=redis_url,
        sim=sim,
        prefix=f"t{unique}",
        log_path=tmp_path / "workers.log",
        extra_env={k.upper(): str(v) for k, v in env.items()},
    )
    stack.start_workers()
    return stack


@pytest.fixture
def stack_factory(broker_url, redis_url, unique, tmp_path):
    stacks = []

    def make(sim, **env):
        stack = _stack(broker_url, redis_url, sim, unique, tmp_path, **env)
        stacks.append(stack)
        return stack

    yield make
    for stack in stacks:
        stack.close()


def incidents_by_key(sim) -> dict[str, list[dict]]:
    found: dict[str, list[dict]] = {}
    for incident in sim.incidents():
        for tag in incident.get("tags") or []:
            if tag.startswith("bridge-key:"):
                found.setdefault(tag, []).append(incident)
    return found


def status_of(incident: dict) -> str:
    return incident.get("statusName") or incident.get("status") or ""


def test_storm_of_10000_alerts_over_100_keys_makes_exactly_100_incidents(
    stack_factory, itsm_sim, record_property
):
    stack = stack_factory(itsm_sim, bridge_dedup_update_interval_s=3600)
    fingerprints = [f"{i:016x}" for i in range(100)]
    order = fingerprints * 100
    random.Random(7).shuffle(order)
    for start in range(0, len(order), 10):
        stack.publish(
            "alertmanager", am_payload([am_alert(fp) for fp in order[start : start + 10]])
        )

    wait_for(lambda: stack.processed_alerts() >= 10_000, timeout=180, what="10,000 alerts")
    wait_for(lambda: len(itsm_sim.incidents()) >= 100, timeout=60, what="100 incidents")
    by_key = incidents_by_key(itsm_sim)
    calls = itsm_sim.calls()
    assert len(itsm_sim.incidents()) == 100
    assert all(len(v) == 1 for v in by_key.values())
    assert calls.get("create", 0) == 100
    # one coalesced update per incident per interval at most (the interval is an hour here)
    assert calls.get("update", 0) + calls.get("note", 0) <= 100
    assert calls.get("token_password", 0) + calls.get("token_refresh", 0) == 1
    assert stack.dead_letters() == 0
    writes = calls.get("create", 0) + calls.get("update", 0) + calls.get("note", 0)
    record_property("itsm_writes_per_alert", writes / 10_000)
    print(f"storm: 10000 alerts, {writes} ITSM writes, {writes / 10_000:.4f} writes per alert")


def test_resolution_resolves_the_incident(stack_factory, serviceops_sim):
    stack = stack_factory(serviceops_sim)
    stack.publish("alertmanager", am_payload([am_alert("aa01")]))
    wait_for(lambda: serviceops_sim.incidents(), what="the incident")
    stack.publish("alertmanager", am_payload([am_alert("aa01", "resolved")], "resolved"))
    wait_for(lambda: status_of(serviceops_sim.incidents()[0]) == "Resolved", what="resolution")


def test_relapse_inside_window_reopens_same_incident(stack_factory, serviceops_sim):
    stack = stack_factory(serviceops_sim, bridge_dedup_reopen_window_s=3600)
    stack.publish("alertmanager", am_payload([am_alert("bb01")]))
    wait_for(lambda: serviceops_sim.incidents(), what="the incident")
    stack.publish("alertmanager", am_payload([am_alert("bb01", "resolved")], "resolved"))
    wait_for(lambda: status_of(serviceops_sim.incidents()[0]) == "Resolved", what="resolution")
    stack.publish("alertmanager", am_payload([am_alert("bb01")]))
    wait_for(lambda: status_of(serviceops_sim.incidents()[0]) == "Open", what="the reopen")
    assert len(serviceops_sim.incidents()) == 1


def test_relapse_after_window_creates_a_new_incident(stack_factory, serviceops_sim):
    stack = stack_factory(serviceops_sim, bridge_dedup_reopen_window_s=0)
    stack.publish("alertmanager", am_payload([am_alert("cc01")]))
    wait_for(lambda: serviceops_sim.incidents(), what="the incident")
    stack.publish("alertmanager", am_payload([am_alert("cc01", "resolved")], "resolved"))
    wait_for(lambda: status_of(serviceops_sim.incidents()[0]) == "Resolved", what="resolution")
    stack.publish("alertmanager", am_payload([am_alert("cc01")]))
    wait_for(lambda: len(serviceops_sim.incidents()) == 2, what="a second incident")
    newer = max(serviceops_sim.incidents(), key=lambda i: i["id"])
    assert serviceops_sim.incidents()[0]["name"] in newer["description"]


def test_pagerduty_resolve_by_dedup_key_resolves_what_trigger_created(
    stack_factory, serviceops_sim
):
    stack = stack_factory(serviceops_sim)
    event = {
        "routing_key": "R0UTINGKEY0000000000000000000001",
        "event_action": "trigger",
        "dedup_key": "zabbix-trigger-18842",
        "payload": {"summary": "web-07 down", "source": "web-07", "severity": "critical"},
    }
    stack.publish("pagerduty", event)
    wait_for(lambda: serviceops_sim.incidents(), what="the incident")
    stack.publish("pagerduty", {**event, "event_action": "resolve", "payload": None})
    wait_for(lambda: status_of(serviceops_sim.incidents()[0]) == "Resolved", what="resolution")


def test_retry_after_is_honoured_and_the_incident_created_once(stack_factory, itsm_sim):
    itsm_sim.fail_next(5, 503, retry_after="2", operations=("create",))
    stack = stack_factory(itsm_sim)
    stack.publish("alertmanager", am_payload([am_alert("dd01")]))
    wait_for(lambda: itsm_sim.incidents(), timeout=90, what="the incident")
    attempts = [c["t"] for c in itsm_sim.call_log() if c["op"] == "create"]
    assert len(attempts) == 6
    assert len(itsm_sim.incidents()) == 1
    gaps = [later - earlier for earlier, later in itertools.pairwise(attempts)]
    assert min(gaps) >= 2.0, f"a retry came sooner than Retry-After: {gaps}"


def test_create_rejected_with_400_is_dead_lettered_then_replayed_once(
    stack_factory, itsm_sim, tmp_path
):
    itsm_sim.fail_next(1, 400, operations=("create",), body='{"userMessage":"requester unknown"}')
    stack = stack_factory(itsm_sim)
    stack.publish("alertmanager", am_payload([am_alert("ee01")]))
    wait_for(lambda: stack.dead_letters() == 1, what="the dead letter")
    assert itsm_sim.calls()["create"] == 1, "a permanent failure is not retried"
    entry_text = subprocess.run(
        [sys.executable, "-m", "bridge.cli", "dlq", "list", "--json"],
        cwd=ROOT,
        env=stack.env,
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    assert "requester unknown" in entry_text

    def replay():
        return subprocess.run(
            [sys.executable, "-m", "bridge.cli", "dlq", "replay", "--all"],
            cwd=ROOT,
            env=stack.env,
            capture_output=True,
            text=True,
        )

    first = replay()
    assert first.returncode == 0, first.stderr
    assert len(itsm_sim.incidents()) == 1
    second = replay()
    assert second.returncode == 0, second.stderr
    assert len(itsm_sim.incidents()) == 1
    assert itsm_sim.calls()["create"] == 2


def test_commit_then_fail_creates_no_duplicate(stack_factory, serviceops_sim):
    serviceops_sim.commit_then_fail(1)
    stack = stack_factory(serviceops_sim)
    stack.publish("alertmanager", am_payload([am_alert("ff01")]))
    wait_for(lambda: serviceops_sim.incidents(), what="the incident")
    wait_for(
        lambda: stack.redis.hget(f"{stack.prefix}:inc:" + _only_key(stack), "ph") == b"o",
        what="the incident recorded as open",
    )
    stack.publish("alertmanager", am_payload([am_alert("ff01", severity="critical")]))
    wait_for(lambda: serviceops_sim.calls().get("update", 0) >= 1, what="the severity update")
    assert len(serviceops_sim.incidents()) == 1


def _only_key(stack) -> str:
    keys = list(stack.redis.scan_iter(f"{stack.prefix}:inc:*"))
    assert len(keys) == 1
    return keys[0].decode().split(":inc:", 1)[1]
