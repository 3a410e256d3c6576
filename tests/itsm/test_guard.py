"""The ITSM guard on real Redis and the simulator: a shared rate limit and circuit breaker.

These tests use the shared Redis under a unique key prefix and delete only their
own keys (no FLUSHDB), so they can run beside other suites.
"""

from __future__ import annotations

import multiprocessing
import threading
import time
import uuid
from typing import Any

import pytest
import redis as redis_lib

from bridge.itsm.client import build_client
from bridge.itsm.errors import AmbiguousError, PermanentError, TransientError
from bridge.itsm.guard import CircuitOpen, Guard, Throttled
from bridge.itsm.model import Impact, IncidentDraft, IncidentRef, Priority
from bridge.settings import load_settings
from tests.conftest import (
    REDIS_URL,
    SIM_CLIENT_ID,
    SIM_CLIENT_SECRET,
    SIM_PASSWORD,
    SIM_USERNAME,
    require_service,
)

pytestmark = pytest.mark.timeout(60)


@pytest.fixture
def guard_redis():
    """The shared Redis and a prefix of our own; our keys are removed afterwards."""
    require_service(REDIS_URL, 6379, "Redis")
    client = redis_lib.Redis.from_url(REDIS_URL)
    prefix = f"guardtest-{uuid.uuid4().hex[:10]}"
    yield client, prefix
    keys = list(client.scan_iter(f"{prefix}:*"))
    if keys:
        client.delete(*keys)
    client.close()


def settings_for(sim: Any, prefix: str, **overrides: Any) -> Any:
    env = {
        "BRIDGE_ITSM_URL": sim.url,
        "BRIDGE_ITSM_FLAVOR": sim.flavor,
        "BRIDGE_ITSM_CLIENT_ID": SIM_CLIENT_ID,
        "BRIDGE_ITSM_CLIENT_SECRET": SIM_CLIENT_SECRET,
        "BRIDGE_ITSM_USERNAME": SIM_USERNAME,
        "BRIDGE_ITSM_PASSWORD": SIM_PASSWORD,
        "BRIDGE_REDIS_PREFIX": prefix,
    }
    return load_settings(env=env, **overrides)


def _draft() -> IncidentDraft:
    return IncidentDraft(
        subject="disk full",
        description="it is full",
        requester_email="alerts@example.com",
        category="Incident",
        priority=Priority.HIGH,
        urgency=Priority.HIGH,
        impact=Impact.ON_USER,
    )


def _ref(client: Any) -> IncidentRef:
    return client.create(_draft(), "guard-key")


# ---------------------------------------------------------------- settings and wiring


def test_the_client_is_guarded_by_default_and_not_when_both_protections_are_off(
    itsm_sim, guard_redis
):
    redis, prefix = guard_redis
    client = build_client(settings_for(itsm_sim, prefix), redis)
    assert client.guard is not None
    assert client.guard.breaker_failures == 10 and client.guard.rate_per_s == 0
    off = build_client(
        settings_for(itsm_sim, prefix, itsm_breaker_failures=0, itsm_rate_limit_per_s=0), redis
    )
    assert off.guard is None


def test_an_unguarded_breaker_writes_nothing_to_redis(itsm_sim, guard_redis):
    redis, prefix = guard_redis
    client = build_client(
        settings_for(itsm_sim, prefix, itsm_breaker_failures=0, itsm_rate_limit_per_s=0), redis
    )
    ref = _ref(client)
    client.get(ref)
    assert not list(redis.scan_iter(f"{prefix}:itsm:breaker*"))
    assert not redis.exists(f"{prefix}:itsm:rate")


# ---------------------------------------------------------------- rate limit


def test_a_call_without_a_free_slot_sleeps_exactly_the_computed_wait(guard_redis):
    redis, prefix = guard_redis
    slept: list[float] = []
    guard = Guard(redis, prefix=prefix, rate_per_s=5, burst=1, max_wait_s=1.0, sleep=slept.append)
    guard.acquire("get")  # the burst
    for _ in range(5):
        guard.acquire("get")  # the fake sleep does not advance time: each reserves the next slot
    assert len(slept) == 5
    for n, wait in enumerate(slept, start=1):
        assert wait == pytest.approx(0.2 * n, abs=0.05)
    with pytest.raises(Throttled) as caught:
        guard.acquire("get")  # the next slot is 1.2 s away: more than max_wait
    assert caught.value.retry_after == pytest.approx(1.2, abs=0.05)
    assert isinstance(caught.value, TransientError)
    assert caught.value.reason == "itsm_throttled"


def test_burst_calls_go_through_at_once(guard_redis):
    redis, prefix = guard_redis
    slept: list[float] = []
    guard = Guard(redis, prefix=prefix, rate_per_s=1, burst=8, max_wait_s=0, sleep=slept.append)
    for _ in range(8):
        guard.acquire()
    assert slept == []
    with pytest.raises(Throttled):
        guard.acquire()


def _hammer(url: str, prefix: str, ref_id: int, until: float, threads: int) -> None:
    """Run in a forked process: call get() from several threads until the deadline."""
    settings = load_settings(
        env={
            "BRIDGE_ITSM_URL": url,
            "BRIDGE_ITSM_FLAVOR": "itsm",
            "BRIDGE_ITSM_CLIENT_ID": SIM_CLIENT_ID,
            "BRIDGE_ITSM_CLIENT_SECRET": SIM_CLIENT_SECRET,
            "BRIDGE_ITSM_USERNAME": SIM_USERNAME,
            "BRIDGE_ITSM_PASSWORD": SIM_PASSWORD,
            "BRIDGE_REDIS_PREFIX": prefix,
            "BRIDGE_ITSM_RATE_LIMIT_PER_S": "20",
            "BRIDGE_ITSM_RATE_LIMIT_BURST": "5",
        }
    )
    redis = redis_lib.Redis.from_url(REDIS_URL)
    client = build_client(settings, redis)

    def loop() -> None:
        while time.time() < until:
            try:
                client.get(IncidentRef(ref_id, None))
            except Throttled as exc:
                time.sleep(min(exc.retry_after or 0.05, max(0.0, until - time.time())))

    workers = [threading.Thread(target=loop) for _ in range(threads)]
    for w in workers:
        w.start()
    for w in workers:
        w.join()


def test_the_rate_holds_across_two_processes(itsm_sim, guard_redis):
    redis, prefix = guard_redis
    setup = build_client(settings_for(itsm_sim, prefix, itsm_rate_limit_per_s=0), redis)
    ref = _ref(setup)
    started = time.time()
    until = started + 3.0
    ctx = multiprocessing.get_context("fork")
    procs = [
        ctx.Process(target=_hammer, args=(itsm_sim.url, prefix, ref.id, until, 4)) for _ in (1, 2)
    ]
    for p in procs:
        p.start()
    for p in procs:
        p.join(timeout=30)
        assert p.exitcode == 0
    gets = sorted(c["t"] for c in itsm_sim.call_log() if c["op"] == "get")
    # 20/s with a burst of 5: no one-second window may hold more than 25 calls
    busiest = max(sum(1 for t in gets if start <= t < start + 1.0) for start in gets)
    assert busiest <= 25 + 1, f"{busiest} calls in one second"
    # over the whole run as well (a slot reserved before the deadline may be used after it)
    assert len(gets) <= 5 + 20 * (gets[-1] - gets[0]) + 1
    # ... and the limit does not starve the callers: about 5 + 20 * 3 calls were made
    assert len(gets) >= 50, len(gets)


# ---------------------------------------------------------------- circuit breaker


def test_breaker_opens_after_n_failures_fails_fast_probes_once_and_closes(itsm_sim, guard_redis):
    redis, prefix = guard_redis
    settings = settings_for(itsm_sim, prefix, itsm_breaker_failures=3, itsm_breaker_open_s=1.5)
    client = build_client(settings, redis)
    other = build_client(settings, redis)  # another worker: the state is shared
    ref = _ref(client)
    itsm_sim.fail_next(3, 503, operations=("get",))
    for _ in range(3):
        with pytest.raises(TransientError) as caught:
            client.get(ref)
        assert not isinstance(caught.value, CircuitOpen)
    assert client.guard is not None
    state = client.guard.state()
    assert state.state == "open" and state.opens == 1
    sent = itsm_sim.calls()["get"]

    started = time.monotonic()
    with pytest.raises(CircuitOpen) as refused:
        other.get(ref)
    assert time.monotonic() - started < 0.1, "an open circuit fails fast"
    assert 0 < (refused.value.retry_after or 0) <= 1.5
    assert refused.value.reason == "itsm_circuit_open"
    assert itsm_sim.calls()["get"] == sent, "nothing reached the ITSM while open"

    time.sleep(1.6)
    assert client.guard.state().state == "half_open"
    itsm_sim.hang_next(1, 1.0, operations=("get",))  # the probe takes a while
    probe_done = threading.Event()

    def probe() -> None:
        client.get(ref)
        probe_done.set()

    thread = threading.Thread(target=probe)
    thread.start()
    time.sleep(0.3)
    with pytest.raises(CircuitOpen):
        other.get(ref)  # only one probe in the whole fleet
    thread.join(timeout=10)
    assert probe_done.is_set()
    assert client.guard.state().state == "closed"
    assert itsm_sim.calls()["get"] == sent + 1
    other.get(ref)
    assert itsm_sim.calls()["get"] == sent + 2


def test_a_failed_probe_opens_the_circuit_again(itsm_sim, guard_redis):
    redis, prefix = guard_redis
    settings = settings_for(itsm_sim, prefix, itsm_breaker_failures=2, itsm_breaker_open_s=0.5)
    client = build_client(settings, redis)
    ref = _ref(client)
    itsm_sim.fail_next(3, 503, operations=("get",))
    for _ in range(2):
        with pytest.raises(TransientError):
            client.get(ref)
    time.sleep(0.6)
    with pytest.raises(TransientError) as caught:
        client.get(ref)  # the probe meets the third 503
    assert not isinstance(caught.value, CircuitOpen)
    assert client.guard is not None
    state = client.guard.state()
    assert state.state == "open" and state.opens == 2
    with pytest.raises(CircuitOpen):
        client.get(ref)
    time.sleep(0.6)
    client.get(ref)
    assert client.guard.state().state == "closed"


def test_refused_connections_and_timeouts_count_client_errors_do_not(itsm_sim, guard_redis):
    redis, prefix = guard_redis
    settings = settings_for(
        itsm_sim, prefix, itsm_breaker_failures=3, itsm_breaker_open_s=30, itsm_read_timeout_s=0.3
    )
    client = build_client(settings, redis)
    ref = _ref(client)
    assert client.guard is not None
    itsm_sim.fail_next(5, 404, operations=("get",))
    for _ in range(5):
        with pytest.raises(PermanentError):
            client.get(ref)
    assert client.guard.state().state == "closed", "a 404 is an answer: the server is up"
    itsm_sim.hang_next(2, 1.0, operations=("get",))
    for _ in range(2):
        with pytest.raises(TransientError):
            client.get(ref)  # read timeouts
    assert client.guard.state().failures == 2
    client.get(ref)  # one success resets the count of consecutive failures
    assert client.guard.state().failures == 0
    itsm_sim.stop()  # nothing listens any more: connection refused
    try:
        for _ in range(3):
            with pytest.raises(TransientError):
                client.get(ref)
        assert client.guard.state().state == "open"
    finally:
        itsm_sim.start()


def test_a_late_success_of_a_call_sent_before_the_circuit_opened_does_not_close_it(guard_redis):
    redis, prefix = guard_redis
    guard = Guard(redis, prefix=prefix, breaker_failures=2, breaker_open_s=30)
    straggler = guard.acquire("get")
    for _ in range(2):
        guard.failure(guard.acquire("get"))
    assert guard.state().state == "open"
    guard.record(straggler, None)
    assert guard.state().state == "open"


def test_a_probe_that_proved_nothing_hands_the_turn_on(guard_redis):
    redis, prefix = guard_redis
    guard = Guard(redis, prefix=prefix, breaker_failures=1, breaker_open_s=0.2)
    guard.failure(guard.acquire())
    time.sleep(0.3)
    probe = guard.acquire()
    assert probe.probe_token
    with pytest.raises(CircuitOpen):
        guard.acquire()
    guard.record(probe, ValueError("a local bug, not the server"))
    assert guard.acquire().probe_token, "the next caller becomes the probe"


def test_a_throttled_or_refused_create_is_refused_for_certain(itsm_sim, guard_redis):
    """Guard refusals are sent nowhere: a create refused by them is never ambiguous."""
    redis, prefix = guard_redis
    settings = settings_for(
        itsm_sim, prefix, itsm_rate_limit_per_s=0.5, itsm_rate_limit_burst=1,
        itsm_rate_limit_max_wait_s=0,
    )  # fmt: skip
    client = build_client(settings, redis)
    _ref(client)
    with pytest.raises(Throttled) as caught:
        _ref(client)
    assert isinstance(caught.value, TransientError)
    assert not isinstance(caught.value, AmbiguousError)
    assert itsm_sim.calls()["create"] == 1
