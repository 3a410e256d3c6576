"""PagerDuty Events API v2 -> canonical alerts, specified."""

from __future__ import annotations

from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import orjson
import pytest

from bridge.alert import Alert, Severity, Status
from bridge.keys import incident_key
from bridge.sources import InvalidPayload, pagerduty, parse

SAMPLES = Path(__file__).resolve().parent.parent / "fixtures" / "samples"
KEY = "zabbix-trigger-18842-host-web-07"
ROUTING_KEY = "R0UTINGKEY0000000000000000000001"


def sample(name: str) -> Any:
    return orjson.loads((SAMPLES / name).read_bytes())


def trigger() -> dict[str, Any]:
    return sample("pagerduty-trigger.json")


def invalid(payload: Any) -> InvalidPayload:
    with pytest.raises(InvalidPayload) as caught:
        pagerduty.parse(payload)
    return caught.value


def test_trigger_sample_parses_to_the_expected_alert():
    assert parse("pagerduty", trigger()) == [
        Alert(
            source="pagerduty",
            identity=KEY,
            status=Status.FIRING,
            severity=Severity.CRITICAL,
            summary="web-07: HTTP service is down",
            description="trigger_id: 18842\nhost: web-07\nitem: net.tcp.service[http]",
            labels={
                "source": "web-07.example.com",
                "component": "nginx",
                "group": "frontend",
                "class": "availability",
            },
            annotations={
                "client": "Zabbix",
                "trigger_id": "18842",
                "host": "web-07",
                "item": "net.tcp.service[http]",
            },
            starts_at=datetime(2026, 11, 28, 12, 1, 33, tzinfo=UTC),
            links=(
                "https://zabbix.example.com/tr_events.php?triggerid=18842",
                "https://wiki.example.com/web-down",
            ),
        )
    ]


def test_resolve_sample_parses_to_a_resolved_alert_with_the_same_identity():
    [alert] = parse("pagerduty", sample("pagerduty-resolve.json"))
    assert alert.status is Status.RESOLVED
    assert alert.identity == KEY


def test_resolve_and_trigger_of_one_dedup_key_share_the_incident_key():
    [fired] = parse("pagerduty", trigger())
    [resolved] = parse("pagerduty", sample("pagerduty-resolve.json"))
    for mode in ("identity", "group_by"):
        settings = {"mode": mode, "group_by": ("alertname",), "tenant": "prod"}
        assert incident_key(fired, **settings) == incident_key(resolved, **settings), mode


def test_acknowledge_maps_to_acknowledged():
    event = {"routing_key": ROUTING_KEY, "event_action": "acknowledge", "dedup_key": KEY}
    assert parse("pagerduty", event)[0].status is Status.ACKNOWLEDGED


def test_resolve_without_payload_has_lowest_severity():
    assert parse("pagerduty", sample("pagerduty-resolve.json"))[0].severity is Severity.INFO


def test_resolve_ignores_a_broken_payload_as_pagerduty_does():
    event = sample("pagerduty-resolve.json")
    event["payload"] = ["not", "an", "object"]
    assert parse("pagerduty", event)[0].status is Status.RESOLVED


def test_trigger_without_dedup_key_gets_a_generated_one():
    event = trigger()
    del event["dedup_key"]
    first = parse("pagerduty", event)[0].identity
    second = parse("pagerduty", event)[0].identity
    assert len(first) == 32
    assert first != second


def test_string_custom_details_become_the_description():
    event = trigger()
    event["payload"]["custom_details"] = "free text"
    assert parse("pagerduty", event)[0].description == "free text"


def test_nested_custom_details_are_kept_as_json_text():
    event = trigger()
    event["payload"]["custom_details"] = {"disk": {"free": 3}}
    assert parse("pagerduty", event)[0].annotations["disk"] == '{"free":3}'


def test_routing_key_never_enters_the_alert():
    alert = parse("pagerduty", trigger())[0]
    assert ROUTING_KEY not in repr(alert)


def _set(event: dict[str, Any], path: str, value: Any) -> dict[str, Any]:
    target = event
    *parents, last = path.split(".")
    for step in parents:
        target = target[step]
    if value is DELETE:
        del target[last]
    else:
        target[last] = value
    return event


DELETE = object()


@pytest.mark.parametrize(
    ("path", "value", "field"),
    [
        ("routing_key", DELETE, "routing_key"),
        ("routing_key", "", "routing_key"),
        ("routing_key", 42, "routing_key"),
        ("event_action", DELETE, "event_action"),
        ("event_action", "escalate", "event_action"),
        ("dedup_key", 7, "dedup_key"),
        ("dedup_key", "k" * 256, "dedup_key"),
        ("payload", DELETE, "payload"),
        ("payload", "text", "payload"),
        ("payload.summary", DELETE, "payload.summary"),
        ("payload.summary", "", "payload.summary"),
        ("payload.summary", "s" * 1025, "payload.summary"),
        ("payload.source", DELETE, "payload.source"),
        ("payload.severity", DELETE, "payload.severity"),
        ("payload.severity", "major", "payload.severity"),
        ("payload.timestamp", "noon", "payload.timestamp"),
        ("payload.component", 1, "payload.component"),
        ("payload.class", [], "payload.class"),
        ("links", {}, "links"),
        ("links", [{"text": "no href"}], "links[0].href"),
        ("images", [{"href": "no src"}], "images[0].src"),
        ("client_url", 3, "client_url"),
    ],
)
def test_each_trigger_violation_names_its_field_pd_style(path, value, field):
    assert invalid(_set(trigger(), path, value)).field == field


@pytest.mark.parametrize("action", ["acknowledge", "resolve"])
def test_acknowledge_and_resolve_need_a_dedup_key(action):
    event = {"routing_key": ROUTING_KEY, "event_action": action}
    assert invalid(event).field == "dedup_key"


def test_missing_summary_message_names_summary():
    error = invalid(_set(trigger(), "payload.summary", DELETE))
    assert str(error) == "payload.summary: is required"
