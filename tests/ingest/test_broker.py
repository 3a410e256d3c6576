"""A 202 means the broker has the message; without a broker the answer is a quick 503.

Every test runs over real HTTP against each real broker (Redis, RabbitMQ). Outages
are made with a TCP proxy in front of the shared broker, cut and restored on the
same port, so the ingest under test sees the broker stop and come back.
"""

from __future__ import annotations

import time

import pytest
import requests

from tests.ingest import (
    AUTH,
    TcpProxy,
    alertmanager_payload,
    amqp_broker,
    closed_port,
    pagerduty_event,
    redis_broker,
    running_ingest,
    settings_for,
    with_port,
)

AM = "/api/v1/alerts/alertmanager"


@pytest.fixture(params=["redis", "amqp"])
def broker(request, unique):
    if request.param == "redis":
        broker = redis_broker(request.getfixturevalue("redis_url"))
    else:
        broker = amqp_broker(request.getfixturevalue("amqp_url"), unique)
    yield broker
    broker.cleanup()


def _default_port(broker) -> int:
    return 6379 if broker.kind == "redis" else 5672


def test_accepted_request_is_exactly_one_message_on_the_broker(broker):
    settings = settings_for(broker.url)
    payload = alertmanager_payload(3)
    with running_ingest(settings, broker.celery_app(settings)) as server:
        response = requests.post(server.url + AM, json=payload, headers=AUTH, timeout=5)

    assert response.status_code == 202, response.text
    assert response.json()["alerts"] == 3
    assert broker.count() == 1
    [message] = broker.messages()
    assert message["format"] == "alertmanager"
    assert message["payload"] == payload
    assert message["id"] == response.json()["id"]


def test_pagerduty_event_is_one_message_too(broker):
    settings = settings_for(broker.url)
    with running_ingest(settings, broker.celery_app(settings)) as server:
        response = requests.post(server.url + "/v2/enqueue", json=pagerduty_event(), timeout=5)

    assert response.status_code == 202, response.text
    [message] = broker.messages()
    assert message["format"] == "pagerduty"


def test_unreachable_broker_gets_503_with_retry_after_within_a_second(broker):
    settings = settings_for(with_port(broker.url, closed_port()))
    with running_ingest(settings, broker.celery_app(settings)) as server:
        session = requests.Session()
        for path, body in [(AM, alertmanager_payload()), ("/v2/enqueue", pagerduty_event())]:
            for _ in range(3):
                started = time.monotonic()
                response = session.post(server.url + path, json=body, headers=AUTH, timeout=5)
                elapsed = time.monotonic() - started

                assert response.status_code == 503, response.text
                assert int(response.headers["Retry-After"]) > 0
                assert elapsed < 1.0

        started = time.monotonic()
        ready = session.get(server.url + "/readyz", timeout=5)
        assert time.monotonic() - started < 1.0
    assert ready.status_code == 503
    assert ready.json()["status"] == "unavailable"
    assert ready.json()["reason"].startswith("broker: ")


def _post_until_accepted(session, url, payload, deadline_s: float) -> tuple[int, list[int]]:
    """Retry like a sender would; return how many tries and every status seen."""
    statuses: list[int] = []
    deadline = time.monotonic() + deadline_s
    while time.monotonic() < deadline:
        response = session.post(url, json=payload, headers=AUTH, timeout=5)
        statuses.append(response.status_code)
        if response.status_code == 202:
            break
        time.sleep(0.1)
    return len(statuses), statuses


def test_broker_outage_then_return_needs_no_restart(broker):
    proxy = TcpProxy(broker.url, _default_port(broker))
    settings = settings_for(with_port(broker.url, proxy.port))
    accepted = 0
    try:
        with running_ingest(settings, broker.celery_app(settings)) as server:
            session = requests.Session()
            url = server.url + AM
            for _ in range(3):
                assert (
                    session.post(url, json=alertmanager_payload(), headers=AUTH).status_code == 202
                )
                accepted += 1
            assert session.get(server.url + "/readyz").status_code == 200

            proxy.cut()
            for _ in range(5):
                started = time.monotonic()
                response = session.post(url, json=alertmanager_payload(), headers=AUTH, timeout=5)
                assert time.monotonic() - started < 1.0
                assert response.status_code == 503
                assert "Retry-After" in response.headers
            started = time.monotonic()
            ready = session.get(server.url + "/readyz", timeout=5)
            assert time.monotonic() - started < 1.0
            assert ready.status_code == 503

            proxy.restore()
            _, statuses = _post_until_accepted(session, url, alertmanager_payload(), 10)
            assert statuses[-1] == 202, statuses
            accepted += 1
            for _ in range(3):
                assert (
                    session.post(url, json=alertmanager_payload(), headers=AUTH).status_code == 202
                )
                accepted += 1
            assert session.get(server.url + "/readyz").status_code == 200
    finally:
        proxy.cut()

    assert broker.count() == accepted


def test_concurrent_requests_during_an_outage_all_answer_within_a_second(broker):
    from concurrent.futures import ThreadPoolExecutor

    proxy = TcpProxy(broker.url, _default_port(broker))
    settings = settings_for(with_port(broker.url, proxy.port))
    try:
        with running_ingest(settings, broker.celery_app(settings)) as server:
            url = server.url + AM
            assert requests.post(url, json=alertmanager_payload(), headers=AUTH).status_code == 202
            proxy.cut()

            def timed_post(_: int) -> tuple[int, float]:
                started = time.monotonic()
                response = requests.post(url, json=alertmanager_payload(), headers=AUTH, timeout=5)
                return response.status_code, time.monotonic() - started

            with ThreadPoolExecutor(16) as pool:
                results = list(pool.map(timed_post, range(32)))
    finally:
        proxy.cut()

    assert {status for status, _ in results} == {503}
    assert max(elapsed for _, elapsed in results) < 1.0
    assert broker.count() == 1
