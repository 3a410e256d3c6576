"""Starting the server safely; health, readiness and metrics."""

from __future__ import annotations

import re

import pytest
import requests
from click.testing import CliRunner
from pydantic import SecretStr
from structlog.testing import capture_logs

from bridge.ingest import check_exposure, serve, start_ingest
from tests.ingest import (
    AUTH,
    GRAFANA_TOKEN,
    TOKEN,
    alertmanager_payload,
    closed_port,
    redis_broker,
    running_ingest,
    settings_for,
    with_db,
    with_port,
)


@pytest.mark.parametrize("host", ["0.0.0.0", "::", "192.0.2.10", "bridge.example"])
def test_refuses_to_listen_beyond_loopback_without_tokens(host):
    settings = settings_for("memory://", http_host=host, ingest_tokens=SecretStr(""))

    with pytest.raises(ValueError, match=r"BRIDGE_INGEST_TOKENS.*--insecure-no-auth"):
        check_exposure(settings, insecure_no_auth=False)
    with pytest.raises(ValueError, match="without ingest tokens"):
        serve(settings)
    with pytest.raises(ValueError, match="without ingest tokens"):
        start_ingest(settings, celery_app=None)


@pytest.mark.parametrize("host", ["127.0.0.1", "::1", "localhost", "127.0.0.2"])
def test_loopback_needs_no_tokens(host):
    check_exposure(
        settings_for("memory://", http_host=host, ingest_tokens=SecretStr("")),
        insecure_no_auth=False,
    )


def test_insecure_flag_or_tokens_allow_any_host():
    exposed = settings_for("memory://", http_host="0.0.0.0", ingest_tokens=SecretStr(""))
    check_exposure(exposed, insecure_no_auth=True)
    check_exposure(settings_for("memory://", http_host="0.0.0.0"), insecure_no_auth=False)


def test_bridge_serve_refuses_with_a_clear_message(monkeypatch):
    from bridge.cli import main

    monkeypatch.setenv("BRIDGE_HTTP_HOST", "0.0.0.0")
    monkeypatch.setenv("BRIDGE_INGEST_TOKENS", "")
    result = CliRunner().invoke(main, ["serve"])

    assert result.exit_code != 0
    assert "without ingest tokens" in result.output


def test_token_bound_to_an_unknown_source_is_a_settings_error():
    settings = settings_for("memory://", ingest_tokens=SecretStr("abc:nagios"))

    with pytest.raises(ValueError, match="nagios"):
        start_ingest(settings, celery_app=None)


@pytest.fixture
def broker(redis_url: str):
    broker = redis_broker(redis_url)
    yield broker
    broker.cleanup()


def test_health_and_readiness_when_all_is_well(broker, redis_url):
    settings = settings_for(broker.url, redis_url=redis_url)
    with running_ingest(settings, broker.celery_app(settings)) as server:
        health = requests.get(server.url + "/healthz", timeout=5)
        ready = requests.get(server.url + "/readyz", timeout=5)

    assert health.status_code == 200
    assert health.json() == {"status": "ok"}
    assert ready.status_code == 200
    assert ready.json() == {"status": "ready", "checks": {"broker": "ok", "redis": "ok"}}


def test_readiness_names_redis_when_it_is_unreachable(broker, redis_url):
    dead_redis = with_port(with_db(redis_url, 13), closed_port())
    settings = settings_for(broker.url, redis_url=dead_redis)
    with running_ingest(settings, broker.celery_app(settings)) as server:
        ready = requests.get(server.url + "/readyz", timeout=5)

    assert ready.status_code == 503
    assert ready.json()["reason"].startswith("redis: unreachable")
    assert ready.json()["checks"]["broker"] == "ok"
    assert "Retry-After" in ready.headers


def test_readiness_warns_when_tls_verification_is_off(broker):
    settings = settings_for(broker.url, itsm_verify_tls=False)
    with running_ingest(settings, broker.celery_app(settings)) as server:
        ready = requests.get(server.url + "/readyz", timeout=5)

    assert ready.status_code == 200
    assert any("TLS" in warning for warning in ready.json()["warnings"])


def _sample(text: str, name: str, **labels: str) -> float:
    rendered = ",".join(f'{k}="{v}"' for k, v in sorted(labels.items()))
    selector = re.escape(f"{{{rendered}}}") if rendered else ""
    match = re.search(rf"^{name}{selector} (\S+)$", text, re.M)
    assert match, f"{name}{{{rendered}}} not exposed"
    return float(match.group(1))


def test_metrics_start_at_zero_and_count_outcomes(broker):
    settings = settings_for(broker.url)
    with running_ingest(settings, broker.celery_app(settings)) as server:
        before = requests.get(server.url + "/metrics", timeout=5).text
        requests.post(
            server.url + "/api/v1/alerts/alertmanager",
            json=alertmanager_payload(4),
            headers=AUTH,
            timeout=5,
        )
        requests.post(
            server.url + "/api/v1/alerts/alertmanager", json=alertmanager_payload(), timeout=5
        )
        after = requests.get(server.url + "/metrics", timeout=5)

    assert after.headers["Content-Type"].startswith("text/plain")
    for source in ("alertmanager", "grafana", "generic", "pagerduty"):
        assert _sample(before, "bridge_alerts_received_total", source=source) == 0
        assert (
            _sample(
                before, "bridge_alerts_rejected_total", source=source, reason="broker_unavailable"
            )
            == 0
        )
        assert _sample(before, "bridge_ingest_requests_total", endpoint=source, code="202") == 0
    assert "bridge_ingest_publish_seconds_bucket" in before
    text = after.text
    assert _sample(text, "bridge_alerts_received_total", source="alertmanager") == 4
    assert (
        _sample(text, "bridge_alerts_rejected_total", source="alertmanager", reason="unauthorized")
        == 1
    )
    assert _sample(text, "bridge_ingest_requests_total", endpoint="alertmanager", code="202") == 1
    assert _sample(text, "bridge_ingest_requests_total", endpoint="alertmanager", code="401") == 1
    assert _sample(text, "bridge_ingest_publish_seconds_count") == 1


def test_tokens_and_bodies_stay_out_of_logs_and_metrics(broker):
    settings = settings_for(with_port(broker.url, closed_port()))
    secret_label = "S3CRET-LABEL-VALUE"
    with capture_logs() as logs, running_ingest(settings, broker.celery_app(settings)) as server:
        for headers in (
            AUTH,
            {"Authorization": f"Bearer {GRAFANA_TOKEN}"},
            {"Authorization": "Bearer x"},
        ):
            requests.post(
                server.url + "/api/v1/alerts/alertmanager",
                json=alertmanager_payload(team=secret_label),
                headers=headers,
                timeout=5,
            )
        metrics = requests.get(server.url + "/metrics", timeout=5).text

    seen = repr(logs) + metrics
    assert logs, "the refusals and the broker failure are logged"
    for secret in (TOKEN, GRAFANA_TOKEN, secret_label):
        assert secret not in seen
