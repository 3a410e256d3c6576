"""Grafana's webhook HMAC signature is verified when a secret is configured."""

from __future__ import annotations

import hashlib
import hmac
import json
import time
from pathlib import Path

import pytest
import requests
from pydantic import SecretStr

from tests.ingest import GRAFANA_TOKEN, redis_broker, running_ingest, settings_for

SECRET = "grafana-hmac-S3CRET-77aa"
SAMPLE = Path(__file__).resolve().parents[1] / "fixtures" / "samples" / "grafana-firing.json"
PATH = "/api/v1/alerts/grafana"


@pytest.fixture
def broker(redis_url: str):
    broker = redis_broker(redis_url)
    yield broker
    broker.cleanup()


@pytest.fixture
def ingest(broker):
    settings = settings_for(broker.url, ingest_grafana_hmac_secret=SecretStr(SECRET))
    with running_ingest(settings, broker.celery_app(settings)) as server:
        yield server


def _post(ingest, body: bytes, **headers: str) -> requests.Response:
    return requests.post(
        ingest.url + PATH,
        data=body,
        headers={
            "Content-Type": "application/json",
            "Authorization": f"Bearer {GRAFANA_TOKEN}",
            **headers,
        },
        timeout=5,
    )


def _sign(body: bytes, timestamp: str | None = None) -> str:
    signed = body if timestamp is None else timestamp.encode() + b":" + body
    return hmac.new(SECRET.encode(), signed, hashlib.sha256).hexdigest()


def test_a_correctly_signed_grafana_request_is_accepted(ingest, broker):
    body = SAMPLE.read_bytes()
    response = _post(ingest, body, **{"X-Grafana-Alerting-Signature": _sign(body)})
    assert response.status_code == 202, response.text
    assert broker.count() == 1


def test_a_signed_request_with_a_fresh_timestamp_is_accepted(ingest, broker):
    body = SAMPLE.read_bytes()
    ts = str(int(time.time()))
    response = _post(
        ingest,
        body,
        **{
            "X-Grafana-Alerting-Signature": _sign(body, ts),
            "X-Grafana-Alerting-Signature-Timestamp": ts,
        },
    )
    assert response.status_code == 202, response.text


def test_a_missing_signature_is_refused_and_nothing_is_published(ingest, broker):
    response = _post(ingest, SAMPLE.read_bytes())
    assert response.status_code == 401
    assert broker.count() == 0


def test_a_tampered_body_is_refused(ingest, broker):
    body = SAMPLE.read_bytes()
    signature = _sign(body)
    tampered = json.dumps({**json.loads(body), "title": "changed"}).encode()
    response = _post(ingest, tampered, **{"X-Grafana-Alerting-Signature": signature})
    assert response.status_code == 401
    assert broker.count() == 0


def test_an_old_timestamp_is_refused(ingest, broker):
    body = SAMPLE.read_bytes()
    ts = str(int(time.time()) - 3600)
    response = _post(
        ingest,
        body,
        **{
            "X-Grafana-Alerting-Signature": _sign(body, ts),
            "X-Grafana-Alerting-Signature-Timestamp": ts,
        },
    )
    assert response.status_code == 401
