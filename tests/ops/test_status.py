"""``bridge status``: reachability of the broker, Redis and the ITSM, queue depths, dead letters."""

from __future__ import annotations

import os
import time

import orjson
import pytest
from click.testing import CliRunner

from bridge.cli import main
from bridge.dlq import DeadLetterStore, Reason
from bridge.status import display_url, probe_broker
from tests.conftest import SIM_CLIENT_ID, SIM_CLIENT_SECRET, SIM_PASSWORD, SIM_USERNAME
from tests.ops.test_cli import restore_logging  # noqa: F401  (autouse fixture)


def _itsm_env(sim, password: str = SIM_PASSWORD) -> dict[str, str]:
    return {
        "BRIDGE_ITSM_URL": sim.url,
        "BRIDGE_ITSM_FLAVOR": sim.flavor,
        "BRIDGE_ITSM_CLIENT_ID": SIM_CLIENT_ID,
        "BRIDGE_ITSM_CLIENT_SECRET": SIM_CLIENT_SECRET,
        "BRIDGE_ITSM_USERNAME": SIM_USERNAME,
        "BRIDGE_ITSM_PASSWORD": password,
    }


def status(*args: str, **env: str):
    clean: dict[str, str | None] = {k: None for k in os.environ if k.startswith("BRIDGE_")}
    clean.update(env)
    return CliRunner().invoke(main, ["status", *args], env=clean, catch_exceptions=False)


def _add_dead_letter(redis_client) -> None:
    DeadLetterStore(redis_client, prefix="bridge", clock=time.time).add(
        reason=Reason.ITSM_REJECTED,
        detail="subject too long",
        kind="action",
        source="alertmanager",
        key="k1",
        fmt="canonical",
        payload="{}",
        attempts=1,
        first_seen=time.time(),
    )


def test_all_reachable_on_a_redis_broker_with_depths_and_dead_letters(
    redis_url, redis_client, serviceops_sim
):
    redis_client.rpush("bridge.urgent", "m1", "m2")
    redis_client.rpush("bridge.intake\x06\x163", "m3")  # kombu's list for priority 3
    _add_dead_letter(redis_client)
    env = {**_itsm_env(serviceops_sim), "BRIDGE_BROKER_URL": redis_url}
    result = status("--json", BRIDGE_REDIS_URL=redis_url, **env)
    assert result.exit_code == 0, result.output
    data = orjson.loads(result.stdout)
    assert data["ok"] is True
    assert {name: c["ok"] for name, c in data["checks"].items()} == {
        "broker": True,
        "redis": True,
        "itsm": True,
    }
    assert data["queues"] == {"bridge.intake": 1, "bridge.urgent": 2, "bridge.updates": 0}
    assert data["dead_letters"] == 1


def test_human_output_lists_each_dependency_and_queue(redis_url, redis_client, itsm_sim):
    env = {**_itsm_env(itsm_sim), "BRIDGE_BROKER_URL": redis_url}
    result = status(BRIDGE_REDIS_URL=redis_url, **env)
    assert result.exit_code == 0, result.output
    lines = result.stdout.splitlines()
    assert [ln.split()[:2] for ln in lines[:3]] == [
        ["broker", "ok"],
        ["redis", "ok"],
        ["itsm", "ok"],
    ]
    assert any(ln.startswith("queue bridge.updates") for ln in lines)
    assert "dead letters 0" in result.output


def test_unreachable_broker_and_rejected_itsm_password_exit_non_zero(redis_url, serviceops_sim):
    env = {
        **_itsm_env(serviceops_sim, password="wr0ng-S3CRET-pass"),
        "BRIDGE_BROKER_URL": "amqp://bridge:brok3r-S3CRET@127.0.0.1:1/prod",
    }
    result = status("--json", "--timeout", "0.5", BRIDGE_REDIS_URL=redis_url, **env)
    assert result.exit_code == 1
    data = orjson.loads(result.stdout)
    assert data["ok"] is False
    assert data["checks"]["broker"]["ok"] is False
    assert "127.0.0.1:1" in data["checks"]["broker"]["detail"]
    assert data["checks"]["redis"]["ok"] is True
    assert data["checks"]["itsm"]["ok"] is False
    assert "password" in data["checks"]["itsm"]["detail"]
    for secret in ("wr0ng-S3CRET-pass", "brok3r-S3CRET", SIM_CLIENT_SECRET):
        assert secret not in result.output


def test_unreachable_redis_is_down_and_the_dead_letter_count_unknown(serviceops_sim):
    result = status(
        "--json",
        "--timeout",
        "0.5",
        BRIDGE_REDIS_URL="redis://127.0.0.1:1/0",
        BRIDGE_BROKER_URL="redis://127.0.0.1:1/0",
        **_itsm_env(serviceops_sim),
    )
    assert result.exit_code == 1
    data = orjson.loads(result.stdout)
    assert data["checks"]["redis"]["ok"] is False
    assert data["dead_letters"] is None
    assert data["queues"] == dict.fromkeys(("bridge.intake", "bridge.urgent", "bridge.updates"))


def test_nothing_configured_is_reported_as_down():
    result = status()
    assert result.exit_code == 1
    assert "not configured (set BRIDGE_BROKER_URL)" in result.output
    assert "not configured (set BRIDGE_ITSM_URL)" in result.output


def test_rabbitmq_depths_come_from_a_passive_declare(amqp_url, unique):
    from kombu import Connection, Exchange, Producer, Queue

    name = f"ops-status-{unique}"
    # confirmed publishes: the broker has queued all three before the probe counts them
    with Connection(amqp_url, transport_options={"confirm_publish": True}) as conn:
        queue = Queue(name, Exchange(""), routing_key=name, auto_delete=False)
        queue(conn.default_channel).declare()
        producer = Producer(conn.default_channel)
        for i in range(3):
            producer.publish({"n": i}, routing_key=name, serializer="json")
        try:
            probe, depths = probe_broker(amqp_url, [name, f"{name}-missing"], timeout=3)
        finally:
            queue(conn.default_channel).delete()
    assert probe.ok, probe.detail
    assert depths == {name: 3, f"{name}-missing": None}
    assert "guest:***@" in probe.detail


@pytest.mark.parametrize(
    ("url", "shown"),
    [
        ("amqp://bridge:s3cret@rabbit:5672/v", "amqp://bridge:***@rabbit:5672/v"),
        ("redis://:s3cret@redis:6379/0", "redis://:***@redis:6379/0"),
        ("redis://redis:6379/0", "redis://redis:6379/0"),
    ],
)
def test_urls_are_shown_without_their_password(url, shown):
    assert display_url(url) == shown
