"""The ITSM misbehaves: down past the retry budget, slow, tokens revoked, password rotated,
creates applied but answered with an error."""

from __future__ import annotations

import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest

from tests.chaos.conftest import (
    FIGURES,
    ChaosStack,
    am_alert,
    am_payload,
    assert_exactly_one_incident_per_key,
    record,
    storm,
)
from tests.servers import wait_for


class _Unavailable:
    """What answers on the ITSM's port while it is down: 503 to everything, counted."""

    def __init__(self, port: int) -> None:
        self.requests = 0
        outer = self

        class Handler(BaseHTTPRequestHandler):
            def _answer(self) -> None:
                outer.requests += 1
                length = int(self.headers.get("Content-Length") or 0)
                if length:
                    self.rfile.read(length)
                body = b"<html><body>503 Service Unavailable</body></html>"
                self.send_response(503)
                self.send_header("Content-Type", "text/html")
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            do_GET = do_POST = do_PUT = do_PATCH = do_DELETE = _answer

            def log_message(self, *args: object) -> None:
                pass

        ThreadingHTTPServer.allow_reuse_address = True
        self.server = ThreadingHTTPServer(("127.0.0.1", port), Handler)
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self.thread.start()

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


def _publish(stack: ChaosStack, payloads: list, events: dict[int, object], pace: float) -> None:
    for i, payload in enumerate(payloads):
        if i in events:
            events[i]()
        stack.publish_until_accepted("alertmanager", payload)
        time.sleep(pace)


@pytest.mark.timeout(150)
def test_itsm_down_longer_than_the_retry_budget_dead_letters_then_replays_cleanly(
    redis_servers, sim_factory, stack_factory
):
    broker, state = redis_servers
    sim = sim_factory("serviceops")
    stack = stack_factory(
        broker_url=broker.url(),
        redis_url=state.url(),
        sim=sim,
        extra_env={"BRIDGE_RETRY_MAX_AGE_S": "5", "BRIDGE_ITSM_BREAKER_FAILURES": "5"},
    )
    stack.start()
    outage: dict[str, _Unavailable] = {}
    down_at = up_at = 0.0

    def down() -> None:
        nonlocal down_at
        sim.stop()
        outage["503"] = _Unavailable(sim.port)
        down_at = time.monotonic()

    def up() -> None:
        nonlocal up_at
        outage["503"].close()
        sim.start()
        up_at = time.monotonic()

    # 30 keys x 3 over ~15 s; the ITSM answers 503 for ~9 s of it
    _publish(stack, storm(30, 3, 2, seed=31), {6: down, 36: up}, pace=0.25)
    acc = stack.settle(timeout=90)
    assert not acc.missing, acc.missing
    assert not acc.duplicates, acc.duplicates
    dead = stack.dead_letters()
    assert dead, "alerts older than the retry budget were dead-lettered"
    assert {e.reason for e in dead} <= {"retries_exhausted"}
    # the breaker kept the outage from becoming load: 5 failures open it for 2 s, then one
    # probe per period (plus calls already past the guard when it opened)
    seconds = up_at - down_at
    load = outage["503"].requests
    assert load <= 5 + seconds / 2 + 8, f"{load} calls in a {seconds:.1f}s outage"

    replayed = stack.replay_all()
    assert replayed == len(dead)
    assert not stack.dead_letters(), "every dead letter replayed cleanly"
    acc = assert_exactly_one_incident_per_key(stack)
    record(acc, stack, itsm_outages=1, dead_letters_replayed=replayed)
    FIGURES["outage_calls_with_breaker"] = load
    FIGURES["outage_seconds"] = round(seconds, 1)


@pytest.mark.timeout(150)
def test_itsm_slow_read_timeouts_make_no_duplicate(redis_servers, sim_factory, stack_factory):
    broker, state = redis_servers
    sim = sim_factory("serviceops")
    stack = stack_factory(
        broker_url=broker.url(),
        redis_url=state.url(),
        sim=sim,
        extra_env={"BRIDGE_ITSM_READ_TIMEOUT_S": "1"},
    )
    stack.start()

    def slow() -> None:
        # creates are applied but answered after the read timeout; searches hang too
        sim.hang_next(8, 1.5, operations=("create",))
        sim.hang_next(3, 1.5, operations=("search",))

    def slower() -> None:
        sim.set_latency(0.6)

    def normal() -> None:
        sim.set_latency(0.0)

    _publish(stack, storm(30, 3, 3, seed=32), {2: slow, 12: slower, 22: normal}, pace=0.2)
    acc = stack.settle(timeout=120)
    assert not acc.missing, acc.missing
    assert not acc.duplicates, acc.duplicates
    assert sim.calls()["hung"] >= 8
    replayed = stack.replay_all()
    acc = assert_exactly_one_incident_per_key(stack)
    record(acc, stack, itsm_outages=1, dead_letters_replayed=replayed)


@pytest.mark.timeout(120)
def test_tokens_revoked_mid_storm(redis_servers, sim_factory, stack_factory):
    broker, state = redis_servers
    sim = sim_factory("itsm")
    stack = stack_factory(broker_url=broker.url(), redis_url=state.url(), sim=sim)
    stack.start()
    revoke = sim.revoke_tokens
    _publish(stack, storm(30, 3, 3, seed=33), {5: revoke, 12: revoke, 20: revoke}, pace=0.15)
    acc = stack.settle(timeout=90)
    assert not acc.missing, acc.missing
    assert sim.calls()["unauthorized"] >= 1, "the revocations were felt"
    assert not stack.dead_letters(), "a revoked token is renewed, nothing is dead-lettered"
    acc = assert_exactly_one_incident_per_key(stack)
    record(acc, stack, itsm_outages=3)


@pytest.mark.timeout(180)
def test_password_rotated_then_fixed_in_config_loses_nothing(
    redis_servers, sim_factory, stack_factory
):
    broker, state = redis_servers
    sim = sim_factory("itsm")
    stack = stack_factory(broker_url=broker.url(), redis_url=state.url(), sim=sim)
    stack.start()
    new_password = "rotated-Pa55word-c0ffee"
    payloads = storm(30, 3, 3, seed=34)

    def rotate() -> None:
        sim.set_credentials(password=new_password)
        sim.revoke_tokens()  # the old grant is gone too: the bridge must log in again

    _publish(stack, payloads[:15], {5: rotate}, pace=0.2)
    # alerts keep failing with auth errors (retried no faster than every 2 s here) ...
    wait_for(lambda: sim.calls()["unauthorized"] >= 2, timeout=30, what="auth failures")
    time.sleep(3)
    # ... until the operator puts the new password in the config and restarts the workers
    stack.restart_with(BRIDGE_ITSM_PASSWORD=new_password)
    _publish(stack, payloads[15:], {}, pace=0.1)
    acc = stack.settle(timeout=120)
    assert not acc.missing, acc.missing
    replayed = stack.replay_all()
    acc = assert_exactly_one_incident_per_key(stack)
    assert not stack.dead_letters()
    record(acc, stack, itsm_outages=1, dead_letters_replayed=replayed)


@pytest.mark.timeout(120)
def test_commit_then_fail_creates_make_no_duplicate_where_the_itsm_can_search(
    redis_servers, sim_factory, stack_factory
):
    broker, state = redis_servers
    sim = sim_factory("serviceops")
    sim.commit_then_fail(10, 502)
    stack = stack_factory(broker_url=broker.url(), redis_url=state.url(), sim=sim)
    stack.start()
    _publish(stack, storm(30, 3, 3, seed=35), {12: lambda: sim.commit_then_fail(5, 504)}, 0.1)
    acc = stack.settle(timeout=90)
    assert not acc.missing, acc.missing
    assert sim.calls()["injected_fault"] >= 15
    assert not stack.dead_letters()
    acc = assert_exactly_one_incident_per_key(stack)
    record(acc, stack, itsm_outages=1)


@pytest.mark.timeout(120)
def test_ambiguous_creates_where_the_itsm_cannot_search_are_dead_lettered_not_repeated(
    redis_servers, sim_factory, stack_factory
):
    """Gen A: a create applied but answered with a 502, or answered after the read timeout,
    cannot be checked by search. Each is dead-lettered as ``ambiguous_create``; the operator
    finds the incident by its key tag and purges the entry (or replays it when none)."""
    broker, state = redis_servers
    sim = sim_factory("itsm")
    stack = stack_factory(
        broker_url=broker.url(),
        redis_url=state.url(),
        sim=sim,
        extra_env={"BRIDGE_ITSM_READ_TIMEOUT_S": "1"},
    )
    stack.start()
    sim.commit_then_fail(3, 502)
    stack.publish_until_accepted(
        "alertmanager", am_payload([am_alert(f"c{i:07x}") for i in range(5)])
    )
    wait_for(lambda: len(stack.dead_letters()) == 3, timeout=60, what="three dead letters")
    sim.hang_next(3, 1.5, operations=("create",))
    stack.publish_until_accepted(
        "alertmanager", am_payload([am_alert(f"e{i:07x}") for i in range(5)])
    )
    wait_for(lambda: len(stack.dead_letters()) == 6, timeout=60, what="six dead letters")
    acc = stack.settle(timeout=60)
    assert {e.reason for e in acc.dead_letters} == {"ambiguous_create"}
    assert not acc.missing and not acc.duplicates
    # the operator's check: each ambiguous create did land, so its incident is adopted
    for entry in acc.dead_letters:
        (landed,) = acc.incidents.get(entry.key, [])
        done = stack.cli("dlq", "adopt", entry.id, "--incident", str(landed["id"]))
        assert done.returncode == 0, done.stderr
    acc = assert_exactly_one_incident_per_key(stack)
    assert not stack.dead_letters()
    record(acc, stack)


@pytest.mark.timeout(90)
def test_the_next_alert_after_an_ambiguous_create_does_not_create_again(
    redis_servers, sim_factory, stack_factory
):
    broker, state = redis_servers
    sim = sim_factory("itsm")
    sim.commit_then_fail(1, 502)
    stack = stack_factory(broker_url=broker.url(), redis_url=state.url(), sim=sim)
    stack.start()
    stack.publish_until_accepted("alertmanager", am_payload([am_alert("d0000001")]))
    wait_for(lambda: len(stack.dead_letters()) == 1, timeout=30, what="the dead letter")
    assert len(sim.incidents()) == 1  # the create landed
    stack.publish_until_accepted(
        "alertmanager", am_payload([am_alert("d0000001", summary="still failing")])
    )
    wait_for(lambda: alerts_decided(stack) == 2, timeout=30, what="the second alert's decision")
    assert len(sim.incidents()) == 1, "the key got a second incident"
    # the operator finds the incident and tells the bridge; the recovery then resolves it
    (entry,) = stack.dead_letters()
    (incident,) = sim.incidents()
    done = stack.cli("dlq", "adopt", entry.id, "--incident", str(incident["id"]))
    assert done.returncode == 0, done.stderr
    assert not stack.dead_letters()
    stack.publish_until_accepted(
        "alertmanager", am_payload([am_alert("d0000001", status="resolved")])
    )
    wait_for(lambda: sim.incidents()[0]["status"] == "Resolved", timeout=30,
             what="the adopted incident resolved")  # fmt: skip
    assert len(sim.incidents()) == 1


def alerts_decided(stack) -> int:
    return int(stack.redis.hget(f"{stack.prefix}:stats", "alerts") or 0)
