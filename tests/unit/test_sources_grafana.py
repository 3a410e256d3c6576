"""Grafana unified-alerting webhook -> canonical alerts, specified."""

from __future__ import annotations

from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import orjson
import pytest

from bridge.alert import Alert, Severity, Status
from bridge.sources import InvalidPayload, grafana, parse

SAMPLES = Path(__file__).resolve().parent.parent / "fixtures" / "samples"


def firing() -> dict[str, Any]:
    return orjson.loads((SAMPLES / "grafana-firing.json").read_bytes())


def invalid_field(payload: Any) -> str:
    with pytest.raises(InvalidPayload) as caught:
        grafana.parse(payload)
    return caught.value.field


def test_sample_parses_to_the_expected_alert():
    [alert] = parse("grafana", firing())

    assert alert == Alert(
        source="grafana",
        identity="9c0e1f7a2b3d4c5e",
        status=Status.FIRING,
        severity=Severity.WARNING,
        summary="p99 checkout latency is 2.4s",
        description="Above the 1.5s objective for 10 minutes.",
        labels={
            "alertname": "CheckoutLatencyHigh",
            "grafana_folder": "Payments",
            "service": "checkout",
            "severity": "warning",
        },
        annotations={
            "summary": "p99 checkout latency is 2.4s",
            "description": "Above the 1.5s objective for 10 minutes.",
            "valueString": "[ var='B' labels={service=checkout} value=2.41 ]",
        },
        starts_at=datetime(2026, 11, 28, 11, 20, tzinfo=UTC),
        ends_at=None,
        links=(
            "https://grafana.example.com/alerting/grafana/bdz1x9/view",
            "https://grafana.example.com/alerting/silence/new?matcher=alertname%3DCheckoutLatencyHigh",
            "https://grafana.example.com/d/checkout",
            "https://grafana.example.com/d/checkout?viewPanel=4",
        ),
    )


def test_group_info_is_read_like_alertmanager():
    _, group = grafana.parse_group(firing())
    assert group.receiver == "itsm-bridge"
    assert group.group_labels == {"alertname": "CheckoutLatencyHigh"}


def test_version_is_not_required():
    payload = firing()
    del payload["version"]
    assert len(parse("grafana", payload)) == 1


def test_a_rule_annotation_named_value_string_wins():
    payload = firing()
    payload["alerts"][0]["annotations"]["valueString"] = "from the rule"
    assert parse("grafana", payload)[0].annotations["valueString"] == "from the rule"


def test_empty_urls_are_not_links():
    payload = firing()
    for name in ("silenceURL", "dashboardURL", "panelURL"):
        payload["alerts"][0][name] = ""
    assert parse("grafana", payload)[0].links == (
        "https://grafana.example.com/alerting/grafana/bdz1x9/view",
    )


@pytest.mark.parametrize(
    ("name", "value", "field"),
    [
        ("valueString", 2.41, "alerts[0].valueString"),
        ("dashboardURL", {}, "alerts[0].dashboardURL"),
        ("status", "alerting", "alerts[0].status"),
        ("labels", None, "alerts[0].labels"),
    ],
)
def test_each_alert_violation_names_its_field(name, value, field):
    payload = firing()
    payload["alerts"][0][name] = value
    assert invalid_field(payload) == field


def test_missing_alerts_is_invalid():
    payload = firing()
    del payload["alerts"]
    assert invalid_field(payload) == "alerts"
