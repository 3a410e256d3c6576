"""What the ingest refuses, and that nothing refused ever reaches the broker."""

from __future__ import annotations

import io
from typing import Any

import orjson
import pytest
import requests

from bridge.ingest import Limits, create_wsgi_app
from tests.ingest import (
    AUTH,
    GRAFANA_TOKEN,
    TOKEN,
    alertmanager_payload,
    redis_broker,
    running_ingest,
    settings_for,
)

AM = "/api/v1/alerts/alertmanager"
MAX_BODY = 4096
MAX_ALERTS = 5


@pytest.fixture
def broker(redis_url: str):
    broker = redis_broker(redis_url)
    yield broker
    broker.cleanup()


LIMITS = Limits(
    max_body_bytes=MAX_BODY,
    max_alerts=MAX_ALERTS,
    max_labels=10,
    max_label_name_chars=40,
    max_label_value_chars=100,
)


@pytest.fixture
def ingest(broker):
    settings = settings_for(broker.url, http_max_body_bytes=MAX_BODY, http_max_alerts=MAX_ALERTS)
    with running_ingest(settings, broker.celery_app(settings), limits=LIMITS) as server:
        yield server


def _json_body(payload: Any) -> bytes:
    return orjson.dumps(payload)


JSON = {"Content-Type": "application/json"}
REFUSED: list[tuple[str, str, dict[str, Any], int, str, str | None]] = [
    # id, path, request kwargs, status, reason, field
    ("no-token", AM, {"data": _json_body(alertmanager_payload()), "headers": JSON}, 401, "", None),
    (
        "wrong-token",
        AM,
        {
            "data": _json_body(alertmanager_payload()),
            "headers": {**JSON, "Authorization": "Bearer nope"},
        },
        401,
        "",
        None,
    ),
    (
        "basic-auth-instead-of-bearer",
        AM,
        {
            "data": _json_body(alertmanager_payload()),
            "headers": {**JSON, "Authorization": f"Basic {TOKEN}"},
        },
        401,
        "",
        None,
    ),
    (
        "token-bound-to-grafana",
        AM,
        {
            "data": _json_body(alertmanager_payload()),
            "headers": {**JSON, "Authorization": f"Bearer {GRAFANA_TOKEN}"},
        },
        401,
        "",
        None,
    ),
    (
        "body-too-large",
        AM,
        {"data": b" " * (MAX_BODY + 1), "headers": {**JSON, **AUTH}},
        413,
        "",
        None,
    ),
    (
        "text-plain",
        AM,
        {
            "data": _json_body(alertmanager_payload()),
            "headers": {"Content-Type": "text/plain", **AUTH},
        },
        415,
        "",
        None,
    ),
    (
        "form-encoded",
        AM,
        {"data": {"a": "b"}, "headers": AUTH},
        415,
        "",
        None,
    ),
    (
        "malformed-json",
        AM,
        {"data": b'{"alerts": [', "headers": {**JSON, **AUTH}},
        400,
        "invalid_json",
        None,
    ),
    (
        "missing-alerts",
        AM,
        {"data": _json_body({"version": "4", "status": "firing"}), "headers": {**JSON, **AUTH}},
        400,
        "invalid_payload",
        "alerts",
    ),
    (
        "too-many-alerts",
        AM,
        {"data": _json_body(alertmanager_payload(MAX_ALERTS + 1)), "headers": {**JSON, **AUTH}},
        400,
        "too_many_alerts",
        "alerts",
    ),
]


@pytest.mark.parametrize(
    ("path", "kwargs", "status", "reason", "field"),
    [case[1:] for case in REFUSED],
    ids=[case[0] for case in REFUSED],
)
def test_refused_request_gets_its_status_and_never_reaches_the_broker(
    ingest, broker, path, kwargs, status, reason, field
):
    response = requests.post(ingest.url + path, timeout=5, **kwargs)

    assert response.status_code == status, response.text
    body = response.json()
    assert body["error"]
    if field is not None:
        assert body["field"] == field
        assert field in body["error"]
    if status == 401:
        assert response.headers["WWW-Authenticate"].startswith("Bearer")
    assert broker.count() == 0


def test_malformed_json_message_says_what_is_wrong(ingest, broker):
    response = requests.post(
        ingest.url + AM, data=b'{"alerts": [', headers={**JSON, **AUTH}, timeout=5
    )

    assert response.status_code == 400
    assert "field" in response.json()
    assert "JSON" in response.json()["error"] or "json" in response.json()["error"]


def test_schema_error_inside_an_alert_names_the_path(ingest, broker):
    payload = alertmanager_payload(2)
    del payload["alerts"][1]["labels"]

    response = requests.post(ingest.url + AM, json=payload, headers=AUTH, timeout=5)

    assert response.status_code == 400
    body = response.json()
    assert body["field"].startswith("alerts[1]")
    assert body["error"].startswith(body["field"])
    assert broker.count() == 0


def test_too_many_labels_is_400_naming_the_labels(ingest, broker):
    labels = {f"l{i}": "v" for i in range(LIMITS.max_labels)}
    payload = alertmanager_payload(2)
    payload["alerts"][1]["labels"].update(labels)

    response = requests.post(ingest.url + AM, json=payload, headers=AUTH, timeout=5)

    assert response.status_code == 400
    assert response.json()["field"] == "alerts[1].labels"
    assert broker.count() == 0


def test_too_long_label_value_is_400_naming_the_label(ingest, broker):
    payload = alertmanager_payload(1, team="x" * (LIMITS.max_label_value_chars + 1))

    response = requests.post(ingest.url + AM, json=payload, headers=AUTH, timeout=5)

    assert response.status_code == 400
    assert response.json()["field"] == "alerts[0].labels.team"
    assert broker.count() == 0


def test_too_long_label_name_is_400_naming_the_labels(ingest, broker):
    payload = alertmanager_payload(1, **{"n" * (LIMITS.max_label_name_chars + 1): "v"})

    response = requests.post(ingest.url + AM, json=payload, headers=AUTH, timeout=5)

    assert response.status_code == 400
    assert response.json()["field"] == "alerts[0].labels"
    assert broker.count() == 0


def test_chunked_body_over_the_limit_is_413(ingest, broker):
    def chunks():
        for _ in range(MAX_BODY // 512 + 2):
            yield b" " * 512

    response = requests.post(ingest.url + AM, data=chunks(), headers={**JSON, **AUTH}, timeout=5)

    assert response.status_code == 413
    assert broker.count() == 0


def test_token_bound_to_grafana_is_accepted_there(ingest, broker):
    response = requests.post(
        ingest.url + "/api/v1/alerts/grafana",
        json=alertmanager_payload(),
        headers={"Authorization": f"Bearer {GRAFANA_TOKEN}"},
        timeout=5,
    )

    assert response.status_code == 202, response.text
    assert broker.count() == 1


def test_body_longer_than_the_limit_without_content_length_is_413():
    """The size is checked while reading too, whatever the headers said."""
    published: list[dict[str, Any]] = []
    app = create_wsgi_app(
        settings_for("memory://", http_max_body_bytes=MAX_BODY),
        published.append,
        lambda: {},
    )
    body = _json_body(alertmanager_payload(200))
    assert len(body) > MAX_BODY
    environ = {
        "REQUEST_METHOD": "POST",
        "PATH_INFO": AM,
        "CONTENT_TYPE": "application/json",
        "HTTP_AUTHORIZATION": f"Bearer {TOKEN}",
        "wsgi.input": io.BytesIO(body),
    }
    statuses: list[str] = []

    app(environ, lambda status, headers: statuses.append(status))

    assert statuses == ["413 Content Too Large"]
    assert published == []


def test_without_tokens_on_loopback_no_authorization_is_needed(broker):
    settings = settings_for(broker.url, ingest_tokens="")
    with running_ingest(settings, broker.celery_app(settings)) as server:
        response = requests.post(server.url + AM, json=alertmanager_payload(), timeout=5)

    assert response.status_code == 202
    assert broker.count() == 1
