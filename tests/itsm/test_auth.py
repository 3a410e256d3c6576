"""The token provider: one token shared by every process and thread, renewed ahead of
expiry, dropped only when it is the one that failed, never shown anywhere."""

from __future__ import annotations

import io
import logging
import multiprocessing
import pickle
import threading
import time
import uuid
from typing import Any

import pytest
import redis as redis_lib
import structlog

from bridge.itsm.auth import ApiKeyAuth, TokenProvider
from bridge.itsm.client import build_client
from bridge.itsm.errors import AuthError, BadClientCredentials, BadUserCredentials, ItsmError
from bridge.itsm.model import Impact, IncidentDraft, IncidentRef, Priority
from bridge.itsm.sessions import new_session
from bridge.logs import configure_logging
from bridge.settings import load_settings
from tests.conftest import (
    SIM_API_KEY,
    SIM_CLIENT_ID,
    SIM_CLIENT_SECRET,
    SIM_PASSWORD,
    SIM_USERNAME,
    _simulator,
)

DRAFT = IncidentDraft(
    subject="disk full",
    description="/var at 99%",
    requester_email="alerts@example.com",
    category="Incident",
    priority=Priority.HIGH,
    urgency=Priority.HIGH,
    impact=Impact.ON_USER,
)


def settings_for(sim: Any, **overrides: Any) -> Any:
    env = {
        "BRIDGE_ITSM_URL": sim.url,
        "BRIDGE_ITSM_FLAVOR": sim.flavor,
        "BRIDGE_ITSM_CLIENT_ID": SIM_CLIENT_ID,
        "BRIDGE_ITSM_CLIENT_SECRET": SIM_CLIENT_SECRET,
        "BRIDGE_ITSM_USERNAME": SIM_USERNAME,
        "BRIDGE_ITSM_PASSWORD": SIM_PASSWORD,
        "BRIDGE_REDIS_PREFIX": "authtest",
    }
    return load_settings(env=env, **overrides)


def provider(sim: Any, redis: Any, **overrides: Any) -> TokenProvider:
    kwargs: dict[str, Any] = {
        "url": sim.url,
        "client_id": SIM_CLIENT_ID,
        "client_secret": SIM_CLIENT_SECRET,
        "username": SIM_USERNAME,
        "password": SIM_PASSWORD,
        "margin_s": 60.0,
        "prefix": "authtest",
    }
    kwargs.update(overrides)
    return TokenProvider(new_session(kwargs["url"], True), redis, **kwargs)


def token_requests(sim: Any) -> int:
    calls = sim.calls()
    return calls["token_password"] + calls["token_refresh"]


class CountingRedis:
    """A Redis client that counts the commands a provider sends."""

    def __init__(self, inner: Any) -> None:
        self._inner = inner
        self.count = 0

    def __getattr__(self, name: str) -> Any:
        attr = getattr(self._inner, name)
        if not callable(attr) or name in ("register_script", "pipeline"):
            return attr

        def counted(*args: Any, **kwargs: Any) -> Any:
            self.count += 1
            return attr(*args, **kwargs)

        return counted


def test_many_calls_cost_one_token_request(itsm_sim, redis_client):
    client = build_client(settings_for(itsm_sim), redis_client)
    ref = client.create(DRAFT, "k1")
    for _ in range(20):
        client.get(ref)
    assert itsm_sim.calls()["token_password"] == 1
    client.close()


def test_hot_path_does_not_touch_redis(itsm_sim, redis_client):
    counting = CountingRedis(redis_client)
    tokens = provider(itsm_sim, counting)
    first = tokens.authorization()
    after_first = counting.count
    for _ in range(1000):
        assert tokens.authorization() == first
    assert counting.count == after_first


def test_two_processes_share_one_token_through_redis(itsm_sim, redis_client):
    one, two = provider(itsm_sim, redis_client), provider(itsm_sim, redis_client)
    assert one.authorization() == two.authorization()
    assert token_requests(itsm_sim) == 1
    assert redis_client.ttl("authtest:itsm:token") > 7000


def test_a_token_cached_for_another_user_is_not_used(itsm_sim, redis_client):
    provider(itsm_sim, redis_client).authorization()
    other = provider(itsm_sim, redis_client, username="someone-else@example.com")
    with pytest.raises(BadUserCredentials):
        other.authorization()


def _worker(url: str, redis_url: str, threads: int, ready: Any, start: Any, results: Any) -> None:
    """One worker process: build everything after the process exists, then 50 calls at once."""
    settings = load_settings(
        env={
            "BRIDGE_ITSM_URL": url,
            "BRIDGE_ITSM_FLAVOR": "itsm",
            "BRIDGE_ITSM_CLIENT_ID": SIM_CLIENT_ID,
            "BRIDGE_ITSM_CLIENT_SECRET": SIM_CLIENT_SECRET,
            "BRIDGE_ITSM_USERNAME": SIM_USERNAME,
            "BRIDGE_ITSM_PASSWORD": SIM_PASSWORD,
            "BRIDGE_REDIS_PREFIX": "authtest",
        }
    )
    redis = redis_lib.Redis.from_url(redis_url)
    client = build_client(settings, redis)
    ok: list[int] = []
    gate = threading.Barrier(threads, action=lambda: ready.put(1))

    def call() -> None:
        gate.wait()
        start.wait()
        try:
            client.get(IncidentRef(60))
            ok.append(1)
        except ItsmError:
            pass

    workers = [threading.Thread(target=call) for _ in range(threads)]
    for worker in workers:
        worker.start()
    for worker in workers:
        worker.join()
    results.put(len(ok))
    client.close()


def test_single_flight_across_8_processes_of_50_threads(itsm_sim, redis_client, redis_url):
    setup = build_client(settings_for(itsm_sim), redis_client)
    setup.create(DRAFT, "k1")  # id 60, read by every worker
    setup.close()
    redis_client.flushdb()  # empty cache
    before = token_requests(itsm_sim)
    ctx = multiprocessing.get_context("spawn")
    ready, start, results = ctx.Queue(), ctx.Event(), ctx.Queue()
    procs = [
        ctx.Process(target=_worker, args=(itsm_sim.url, redis_url, 50, ready, start, results))
        for _ in range(8)
    ]
    for proc in procs:
        proc.start()
    for _ in procs:  # every thread of every process is at the gate
        ready.get(timeout=60)
    start.set()
    done = [results.get(timeout=60) for _ in procs]
    for proc in procs:
        proc.join(timeout=10)
    assert done == [50] * 8
    assert token_requests(itsm_sim) - before == 1


def test_short_lived_tokens_are_renewed_once_per_life_by_refresh(redis_client):
    sim = _simulator("itsm", token_ttl_s=2)
    try:
        client = build_client(settings_for(sim), redis_client)
        ref = client.create(DRAFT, "k1")
        failures: list[BaseException] = []
        stop = threading.Event()

        def loop() -> None:
            while not stop.is_set():
                try:
                    client.get(ref)
                except ItsmError as exc:
                    failures.append(exc)
                stop.wait(0.01)

        threads = [threading.Thread(target=loop) for _ in range(4)]
        started = time.monotonic()
        for thread in threads:
            thread.start()
        stop.wait(6.0)
        stop.set()
        for thread in threads:
            thread.join()
        elapsed = time.monotonic() - started
        calls = sim.calls()
        assert failures == []
        # life 2 s, renewed 0.4 s ahead (20 % cap): one request per 1.6 s at most
        assert calls["token_password"] + calls["token_refresh"] <= 1 + int(elapsed / 1.6) + 1
        assert calls["token_password"] == 1
        assert calls["token_refresh"] >= 3
        client.close()
    finally:
        sim.stop()


def test_revoked_tokens_cost_at_most_two_token_requests(itsm_sim, redis_client):
    client = build_client(settings_for(itsm_sim), redis_client)
    ref = client.create(DRAFT, "k1")
    failures: list[BaseException] = []
    revoked = threading.Event()
    gate = threading.Barrier(17)

    def loop() -> None:
        gate.wait()
        for i in range(40):
            if i == 10:
                revoked.wait()
            try:
                client.get(ref)
            except ItsmError as exc:
                failures.append(exc)

    threads = [threading.Thread(target=loop) for _ in range(16)]
    for thread in threads:
        thread.start()
    gate.wait()
    before = token_requests(itsm_sim)
    itsm_sim.revoke_tokens()
    revoked.set()
    for thread in threads:
        thread.join()
    assert failures == []
    assert itsm_sim.calls()["unauthorized"] >= 1
    assert token_requests(itsm_sim) - before <= 2
    client.close()


def test_refresh_grant_renews_ahead_of_expiry(itsm_sim, redis_client):
    now = [1_000_000.0]
    tokens = provider(itsm_sim, redis_client, clock=lambda: now[0])
    first = tokens.authorization()
    now[0] += 7199 - 61  # just outside the 60 s margin: still the same token
    assert tokens.authorization() == first
    now[0] += 2  # inside the margin
    second = tokens.authorization()
    assert second != first
    assert itsm_sim.calls()["token_refresh"] == 1
    assert itsm_sim.calls()["token_password"] == 1
    assert tokens.token_requests == {"password": 1, "refresh": 1}


@pytest.mark.parametrize("breakage", ["revoked", "server_error"])
def test_password_grant_when_the_refresh_grant_fails(itsm_sim, redis_client, breakage):
    now = [1_000_000.0]
    tokens = provider(itsm_sim, redis_client, clock=lambda: now[0])
    first = tokens.authorization()
    if breakage == "revoked":
        itsm_sim.revoke_tokens()
    else:
        itsm_sim.fail_next(1, 500, operations=("token",))
    now[0] += 7199
    assert tokens.authorization() != first
    calls = itsm_sim.calls()
    assert (calls["token_refresh"], calls["token_password"]) == (1, 2)


def test_a_failed_renewal_ahead_of_expiry_keeps_the_valid_token(itsm_sim, redis_client):
    now = [1_000_000.0]
    tokens = provider(itsm_sim, redis_client, clock=lambda: now[0])
    first = tokens.authorization()
    itsm_sim.fail_next(2, 503, operations=("token",))  # refresh, then password: both fail
    now[0] += 7199 - 30  # inside the margin, not yet expired
    assert tokens.authorization() == first
    now[0] += 2  # the failure is not repeated at once, then renewal succeeds
    assert tokens.authorization() != first


def test_invalidate_drops_only_the_token_that_failed(itsm_sim, redis_client):
    one, two = provider(itsm_sim, redis_client), provider(itsm_sim, redis_client)
    stale = one.authorization()
    assert two.authorization() == stale
    assert one.invalidate(stale) is True
    fresh = one.authorization()
    assert fresh != stale
    # The other process saw a 401 with the old token later: the new one must survive.
    assert two.invalidate(stale) is False
    assert two.authorization() == fresh
    assert one.invalidate(stale) is False
    assert one.authorization() == fresh
    assert token_requests(itsm_sim) == 2


def test_api_key_mode_makes_no_token_request(serviceops_sim, redis_client):
    settings = settings_for(serviceops_sim, itsm_api_key=SIM_API_KEY)
    client = build_client(settings, redis_client)
    ref = client.create(DRAFT, "k1")
    client.get(ref)
    assert serviceops_sim.calls()["token_password"] == 0
    assert serviceops_sim.calls()["token_refresh"] == 0
    assert redis_client.keys("*") == []
    client.close()


def test_wrong_api_key_is_an_auth_error_without_retry(serviceops_sim, redis_client):
    client = build_client(settings_for(serviceops_sim, itsm_api_key="wrong%40key"), redis_client)
    with pytest.raises(AuthError):
        client.get(IncidentRef(60))
    assert serviceops_sim.calls()["unauthorized"] == 1


@pytest.mark.parametrize(
    ("change", "error"),
    [
        ({"client_secret": "rotated-secret"}, BadClientCredentials),
        ({"password": "rotated-password"}, BadUserCredentials),
    ],
)
def test_rejected_credentials_name_which_ones(itsm_sim, redis_client, change, error):
    itsm_sim.set_credentials(**change)
    with pytest.raises(error):
        provider(itsm_sim, redis_client).authorization()


def test_threads_behind_a_failed_grant_fail_without_asking_again(itsm_sim, redis_client):
    itsm_sim.set_credentials(password="rotated-password")
    tokens = provider(itsm_sim, redis_client)
    errors: list[BaseException] = []

    def call() -> None:
        try:
            tokens.authorization()
        except AuthError as exc:
            errors.append(exc)

    threads = [threading.Thread(target=call) for _ in range(20)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert len(errors) == 20
    assert itsm_sim.calls()["token_password"] == 1


@pytest.fixture
def captured_logs(caplog):
    stream = io.StringIO()
    root = logging.getLogger()
    saved = (root.handlers[:], root.level)
    # No secrets handed to the redactor: the code itself must not log them.
    configure_logging(level="DEBUG", fmt="json", secrets=(), stream=stream)
    root.addHandler(caplog.handler)
    caplog.set_level(logging.DEBUG)
    yield lambda: stream.getvalue() + caplog.text
    root.handlers[:], level = saved
    root.setLevel(level)
    structlog.reset_defaults()


def test_no_secret_or_token_in_repr_logs_or_errors(
    itsm_sim, serviceops_sim, redis_client, captured_logs
):
    texts: list[str] = []
    tokens_seen: list[str] = []

    def record(exc: BaseException) -> None:
        texts.extend([str(exc), repr(exc), str(getattr(exc, "server_message", ""))])
        texts.append(str(pickle.loads(pickle.dumps(exc))))

    settings = settings_for(itsm_sim)
    client = build_client(settings, redis_client)
    texts += [repr(client), str(client), repr(settings), repr(client._auth)]
    ref = client.create(DRAFT, "k1")
    tokens_seen.append(client._auth.token())
    itsm_sim.revoke_tokens()  # a 401, an invalidation and a new token
    client.get(ref)
    tokens_seen.append(client._auth.token())
    itsm_sim.fail_next(2, 401, operations=("get",))
    with pytest.raises(AuthError) as failed:
        client.get(ref)
    record(failed.value)
    client.close()

    for change in ({"client_secret": "x-rotated"}, {"password": "y-rotated"}):
        redis_client.flushdb()
        itsm_sim.set_credentials(**change)
        with pytest.raises(AuthError) as refused:
            provider(itsm_sim, redis_client, prefix=uuid.uuid4().hex).authorization()
        record(refused.value)
        itsm_sim.reset()

    now = [1_000_000.0]
    tokens = provider(itsm_sim, redis_client, prefix="leak", clock=lambda: now[0])
    tokens_seen.append(tokens.token())
    itsm_sim.revoke_tokens()
    now[0] += 7199  # refresh fails (revoked), password grant follows
    tokens_seen.append(tokens.token())
    texts.append(repr(tokens))

    api = ApiKeyAuth(SIM_API_KEY)
    texts += [repr(api), str(api)]
    key_client = build_client(settings_for(serviceops_sim, itsm_api_key=SIM_API_KEY), redis_client)
    serviceops_sim.fail_next(1, 400, body='{"userMessage":"bad Apikey ' + SIM_API_KEY + '"}')
    with pytest.raises(ItsmError) as rejected:
        key_client.get(IncidentRef(60))
    record(rejected.value)
    key_client.close()

    logged = captured_logs()
    assert "itsm token obtained" in logged
    haystack = "\n".join([*texts, logged])
    for secret in [SIM_CLIENT_SECRET, SIM_PASSWORD, SIM_API_KEY, *tokens_seen]:
        assert secret not in haystack
    assert "Basic " not in haystack
