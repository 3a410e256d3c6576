"""Poison messages placed straight on the broker: never a crashed or stuck worker, each
one dead-lettered with its reason."""

from __future__ import annotations

import json
import time

import pytest
from kombu import Connection, Exchange, Producer

from bridge.pipeline import envelope
from tests.chaos.conftest import FIGURES, ChaosStack, am_alert, am_payload
from tests.servers import wait_for
from workers.raw import RAW_EXCHANGE, RAW_QUEUE, RAW_ROUTING_KEY

HUGE = 3 * 1024 * 1024


def _workers_intact(stack: ChaosStack, mains: list[int]) -> None:
    """Same main processes, full pools, and a normal alert still goes through."""
    assert [w.proc.pid for w in stack.workers if w.proc] == mains, "a worker process died"
    assert all(len(w.children()) >= stack.concurrency for w in stack.workers)
    before = len(stack.sim.incidents())
    stack.publish_until_accepted("alertmanager", am_payload([am_alert(f"after{time.time_ns()}")]))
    wait_for(lambda: len(stack.sim.incidents()) > before, timeout=30, what="a normal alert")


def _send_intake(stack: ChaosStack, message: object) -> None:
    stack.app.send_task("bridge.intake", args=[message], queue="bridge.intake")


@pytest.mark.timeout(120)
def test_garbage_intake_messages_on_the_redis_broker_are_dead_lettered(
    redis_servers, sim_factory, stack_factory
):
    broker, state = redis_servers
    sim = sim_factory("serviceops")
    stack = stack_factory(broker_url=broker.url(), redis_url=state.url(), sim=sim)
    stack.start()
    mains = [w.proc.pid for w in stack.workers if w.proc]
    poison = {
        "not JSON": envelope("alertmanager", "this is {not json"),
        "wrong format": envelope("alertmanager", {"title": "a Grafana-ish body", "state": 3}),
        "huge": envelope("generic", "x" * HUGE),
        "wrong encoding": envelope("auto", {"__undecodable__": "ff fe 00 e9".replace(" ", "")}),
        "no format": {"v": 1, "id": "abc", "payload": {"alerts": []}},
        "unknown format": envelope("nagios", {"host": "web-1"}),
        "latin-1 text": envelope("generic", b"caf\xe9 \xff".decode("latin-1")),
    }
    for message in poison.values():
        _send_intake(stack, message)
    wait_for(lambda: len(stack.dead_letters()) >= len(poison), timeout=60, what="dead letters")
    entries = stack.dead_letters()
    assert len(entries) == len(poison)
    assert {e.reason for e in entries} == {"invalid_payload"}
    assert all(e.detail for e in entries), "every dead letter says what is wrong"
    huge = [e for e in entries if len(e.payload) > 200_000]
    assert len(huge) == 1 and len(huge[0].payload) < 300_000, "a huge payload is stored truncated"
    _workers_intact(stack, mains)
    FIGURES["poison_dead_lettered"] += len(entries)


@pytest.mark.timeout(120)
def test_intake_messages_the_pipeline_cannot_even_read_are_dead_lettered(
    redis_servers, sim_factory, stack_factory
):
    broker, state = redis_servers
    sim = sim_factory("serviceops")
    stack = stack_factory(broker_url=broker.url(), redis_url=state.url(), sim=sim)
    stack.start()
    mains = [w.proc.pid for w in stack.workers if w.proc]
    unreadable = [
        "just a string, not an envelope",
        ["a", "list"],
        {**envelope("alertmanager", am_payload([am_alert("rcv1")])), "received_at": "yesterday"},
    ]
    for message in unreadable:
        _send_intake(stack, message)
    wait_for(lambda: len(stack.dead_letters()) >= 2, timeout=60, what="dead letters")
    _workers_intact(stack, mains)
    entries = stack.dead_letters()
    assert len(entries) == 2, "the two that are not envelopes are dead-lettered"
    assert all("not an envelope object" in e.detail for e in entries)
    # a bad received_at is not a reason to refuse the alerts: they go through
    wait_for(lambda: any("rcv1" in i["subject"] for i in sim.incidents()), timeout=60,
             what="the create")  # fmt: skip


@pytest.mark.timeout(150)
def test_poison_on_the_raw_amqp_path_is_dead_lettered(
    rabbit_vhost, redis_servers, sim_factory, stack_factory
):
    node, vhost, url = rabbit_vhost
    _, state = redis_servers
    sim = sim_factory("serviceops")
    stack = stack_factory(
        broker_url=url, redis_url=state.url(), sim=sim, broker_queued=lambda: node.queued(vhost)
    )
    stack.start()
    # A worker declares and binds the raw queue once its consumer connects, after its
    # pool is up; until then RabbitMQ drops what reaches the exchange unroutable.
    # (each look is a rabbitmqctl run: about a second of CPU)
    wait_for(lambda: node.consumers(vhost, RAW_QUEUE) > 0, timeout=60, interval=1,
             what="the raw consumer")  # fmt: skip
    mains = [w.proc.pid for w in stack.workers if w.proc]
    good = json.dumps(am_payload([am_alert("raw00001")])).encode()
    poison: list[tuple[bytes, dict[str, str]]] = [
        (b"this is {not json", {}),
        (b'{"title": "a Grafana-ish body", "state": 3}', {"x-alert-format": "alertmanager"}),
        (b"[" + b'"x",' * (HUGE // 4) + b'"x"]', {}),
        (b"caf\xe9 \xff\xfe not utf-8", {}),
        (good, {"x-alert-format": "no-such-format"}),
        (b"", {}),
    ]
    with Connection(url, connect_timeout=5) as conn:
        producer = Producer(conn.channel())
        exchange = Exchange(RAW_EXCHANGE, type="direct", durable=True)
        for body, headers in [*poison, (good, {"x-alert-format": "alertmanager"})]:
            producer.publish(
                body,
                exchange=exchange,
                routing_key=RAW_ROUTING_KEY,
                headers=headers,
                content_type="application/json",
                content_encoding="binary",
                delivery_mode=2,
                declare=[exchange],
            )
    wait_for(lambda: len(stack.dead_letters()) >= len(poison), timeout=60, what="dead letters")
    wait_for(lambda: len(sim.incidents()) == 1, timeout=30, what="the good raw alert")
    entries = stack.dead_letters()
    assert len(entries) == len(poison)
    assert {e.reason for e in entries} == {"invalid_payload"}
    assert all(e.detail for e in entries)
    _workers_intact(stack, mains)
    FIGURES["poison_dead_lettered"] += len(entries)
