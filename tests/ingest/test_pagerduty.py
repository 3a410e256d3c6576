"""PagerDuty Events v2 senders get PD's status codes and PD's JSON, key order included."""

from __future__ import annotations

import pytest
import requests

from bridge.ingest import RateLimit
from tests.ingest import (
    TOKEN,
    pagerduty_event,
    redis_broker,
    running_ingest,
    settings_for,
)

ENQUEUE = "/v2/enqueue"
THROTTLED = {
    "status": "throttle event",
    "message": "Requests for this service are arriving too quickly. Please retry later.",
}


@pytest.fixture
def broker(redis_url: str):
    broker = redis_broker(redis_url)
    yield broker
    broker.cleanup()


@pytest.fixture
def ingest(broker):
    settings = settings_for(broker.url)
    with running_ingest(settings, broker.celery_app(settings)) as server:
        yield server


def _items(response: requests.Response) -> list[tuple[str, object]]:
    return list(response.json().items())


def test_success_is_202_with_pd_body(ingest, broker):
    response = requests.post(ingest.url + ENQUEUE, json=pagerduty_event(), timeout=5)

    assert response.status_code == 202
    assert response.headers["Content-Type"] == "application/json"
    assert _items(response) == [
        ("status", "success"),
        ("message", "Event processed"),
        ("dedup_key", "disk-full-host-1"),
    ]
    assert response.content == (
        b'{"status":"success","message":"Event processed","dedup_key":"disk-full-host-1"}'
    )
    assert broker.count() == 1


def test_without_dedup_key_the_generated_key_comes_back(ingest, broker):
    event = pagerduty_event()
    del event["dedup_key"]

    response = requests.post(ingest.url + ENQUEUE, json=event, timeout=5)

    assert response.status_code == 202
    keys = [key for key, _ in _items(response)]
    assert keys == ["status", "message", "dedup_key"]
    assert isinstance(response.json()["dedup_key"], str)
    assert response.json()["dedup_key"]


def test_the_generated_key_travels_with_the_event_to_the_workers(ingest, broker):
    event = pagerduty_event()
    del event["dedup_key"]

    response = requests.post(ingest.url + ENQUEUE, json=event, timeout=5)

    (message,) = broker.messages()
    assert message["payload"]["dedup_key"] == response.json()["dedup_key"]


def test_resolve_with_the_returned_key_is_accepted(ingest, broker):
    first = requests.post(ingest.url + ENQUEUE, json=pagerduty_event(), timeout=5)
    key = first.json()["dedup_key"]
    resolve = {"routing_key": TOKEN, "event_action": "resolve", "dedup_key": key}

    response = requests.post(ingest.url + ENQUEUE, json=resolve, timeout=5)

    assert response.status_code == 202, response.text
    assert response.json()["dedup_key"] == key
    assert broker.count() == 2


def test_invalid_event_is_400_with_pd_body_naming_the_field(ingest, broker):
    event = pagerduty_event()
    del event["payload"]["summary"]

    response = requests.post(ingest.url + ENQUEUE, json=event, timeout=5)

    assert response.status_code == 400
    items = _items(response)
    assert items[:2] == [("status", "invalid event"), ("message", "Event object is invalid")]
    assert [key for key, _ in items] == ["status", "message", "errors"]
    [error] = response.json()["errors"]
    assert "summary" in error
    assert broker.count() == 0


def test_malformed_json_is_an_invalid_event(ingest, broker):
    response = requests.post(
        ingest.url + ENQUEUE,
        data=b'{"routing_key": ',
        headers={"Content-Type": "application/json", "Authorization": f"Bearer {TOKEN}"},
        timeout=5,
    )

    assert response.status_code == 400
    assert [key for key, _ in _items(response)] == ["status", "message", "errors"]
    assert response.json()["status"] == "invalid event"


def test_routing_key_or_bearer_token_authenticates(ingest, broker):
    by_header = pagerduty_event(routing_key="not-a-token")
    wrong = pagerduty_event(routing_key="not-a-token")

    ok = requests.post(
        ingest.url + ENQUEUE,
        json=by_header,
        headers={"Authorization": f"Bearer {TOKEN}"},
        timeout=5,
    )
    refused = requests.post(ingest.url + ENQUEUE, json=wrong, timeout=5)

    assert ok.status_code == 202
    assert refused.status_code == 401
    assert broker.count() == 1


def test_throttled_is_429_with_pd_body(broker):
    settings = settings_for(broker.url)
    limits = {"pagerduty": RateLimit(per_second=0.01, burst=1)}
    with running_ingest(settings, broker.celery_app(settings), rate_limits=limits) as server:
        first = requests.post(server.url + ENQUEUE, json=pagerduty_event(), timeout=5)
        second = requests.post(server.url + ENQUEUE, json=pagerduty_event(), timeout=5)

    assert first.status_code == 202
    assert second.status_code == 429
    assert _items(second) == list(THROTTLED.items())
    assert int(second.headers["Retry-After"]) >= 1
    assert broker.count() == 1


def test_throttled_alertmanager_hears_503_not_429(broker):
    from tests.ingest import AUTH, alertmanager_payload

    settings = settings_for(broker.url)
    limits = {"alertmanager": RateLimit(per_second=0.01, burst=1)}
    url_path = "/api/v1/alerts/alertmanager"
    with running_ingest(settings, broker.celery_app(settings), rate_limits=limits) as server:
        statuses = [
            requests.post(
                server.url + url_path, json=alertmanager_payload(), headers=AUTH, timeout=5
            ).status_code
            for _ in range(2)
        ]

    assert statuses == [202, 503]
    assert broker.count() == 1
