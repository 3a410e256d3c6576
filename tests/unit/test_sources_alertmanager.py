"""Alertmanager webhook v4 -> canonical alerts, specified."""

from __future__ import annotations

import copy
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import orjson
import pytest

from bridge.alert import Alert, Severity, Status
from bridge.sources import InvalidPayload, alertmanager, parse, parse_alertmanager_group

SAMPLES = Path(__file__).resolve().parent.parent / "fixtures" / "samples"


def sample(name: str) -> Any:
    return orjson.loads((SAMPLES / name).read_bytes())


def firing() -> dict[str, Any]:
    return sample("alertmanager-firing.json")


def invalid_field(payload: Any) -> str:
    with pytest.raises(InvalidPayload) as caught:
        alertmanager.parse(payload)
    assert str(caught.value).startswith(caught.value.field + ": ")
    return caught.value.field


def test_firing_sample_parses_to_one_alert_per_entry():
    alerts = parse("alertmanager", firing())

    assert alerts[0] == Alert(
        source="alertmanager",
        identity="3f9a1c22be04d7e1",
        status=Status.FIRING,
        severity=Severity.CRITICAL,
        summary="Disk /var/lib/postgresql on db-01 is 97% full",
        description="Free space fell below 3% (12.1 GiB left).",
        labels={
            "alertname": "DiskAlmostFull",
            "job": "node",
            "severity": "critical",
            "team": "storage",
            "instance": "db-01:9100",
            "mountpoint": "/var/lib/postgresql",
        },
        annotations={
            "summary": "Disk /var/lib/postgresql on db-01 is 97% full",
            "description": "Free space fell below 3% (12.1 GiB left).",
            "runbook_url": "https://runbooks.example.com/disk",
        },
        starts_at=datetime(2026, 11, 28, 9, 14, 5, 123000, tzinfo=UTC),
        ends_at=None,
        links=(
            "http://prometheus.example.com:9090/graph?g0.expr=node_filesystem_avail_bytes",
            "https://runbooks.example.com/disk",
        ),
    )
    assert [a.identity for a in alerts] == ["3f9a1c22be04d7e1", "a07c55e19d3b6f42"]


def test_resolved_sample_carries_status_and_end_time():
    [alert] = parse("alertmanager", sample("alertmanager-resolved.json"))

    assert alert.status is Status.RESOLVED
    assert alert.identity == "3f9a1c22be04d7e1"
    assert alert.ends_at == datetime(2026, 11, 28, 10, 2, 45, 870000, tzinfo=UTC)


def test_zero_end_time_means_no_end():
    [first, _] = parse("alertmanager", firing())
    assert first.ends_at is None


def test_group_info_comes_beside_the_alerts():
    alerts, group = parse_alertmanager_group(firing())

    assert len(alerts) == 2
    assert group == alertmanager.GroupInfo(
        receiver="itsm-bridge",
        group_key='{}/{severity=~"critical|warning"}:{alertname="DiskAlmostFull"}',
        group_labels={"alertname": "DiskAlmostFull"},
        truncated_alerts=0,
    )


def test_truncated_alerts_count_is_reported():
    payload = firing()
    payload["truncatedAlerts"] = 7
    assert parse_alertmanager_group(payload)[1].truncated_alerts == 7


def test_summary_falls_back_to_alertname():
    payload = firing()
    del payload["alerts"][0]["annotations"]["summary"]
    assert parse("alertmanager", payload)[0].summary == "DiskAlmostFull"


def test_missing_severity_label_means_warning():
    payload = firing()
    del payload["alerts"][0]["labels"]["severity"]
    assert parse("alertmanager", payload)[0].severity is Severity.WARNING


def test_severity_label_spelling_is_normalised():
    payload = firing()
    payload["alerts"][0]["labels"]["severity"] = "Major"
    assert parse("alertmanager", payload)[0].severity is Severity.ERROR


def test_missing_fingerprint_is_derived_stably_from_labels():
    payload = firing()
    del payload["alerts"][0]["fingerprint"]
    reordered = copy.deepcopy(payload)
    reordered["alerts"][0]["labels"] = dict(reversed(payload["alerts"][0]["labels"].items()))

    first = parse("alertmanager", payload)[0].identity
    assert first == parse("alertmanager", reordered)[0].identity
    assert len(first) == 16
    assert first != parse("alertmanager", payload)[1].identity


def test_missing_fingerprint_without_labels_is_invalid():
    payload = firing()
    del payload["alerts"][0]["fingerprint"]
    payload["alerts"][0]["labels"] = {}
    assert invalid_field(payload) == "alerts[0].fingerprint"


def test_runbook_is_not_duplicated_in_links():
    payload = firing()
    payload["alerts"][0]["generatorURL"] = "https://runbooks.example.com/disk"
    assert parse("alertmanager", payload)[0].links == ("https://runbooks.example.com/disk",)


def test_empty_alert_list_gives_no_alerts():
    payload = firing()
    payload["alerts"] = []
    assert parse("alertmanager", payload) == []


def test_time_without_offset_is_utc():
    payload = firing()
    payload["alerts"][0]["startsAt"] = "2026-11-28T09:14:05"
    assert parse("alertmanager", payload)[0].starts_at == datetime(
        2026, 11, 28, 9, 14, 5, tzinfo=UTC
    )


def test_nanosecond_times_from_go_are_accepted():
    payload = firing()
    payload["alerts"][0]["startsAt"] = "2026-11-28T09:14:05.123456789Z"
    assert parse("alertmanager", payload)[0].starts_at == datetime(
        2026, 11, 28, 9, 14, 5, 123456, tzinfo=UTC
    )


def _without(path: tuple[Any, ...]) -> dict[str, Any]:
    payload = firing()
    target: Any = payload
    for step in path[:-1]:
        target = target[step]
    del target[path[-1]]
    return payload


def _with(path: tuple[Any, ...], value: Any) -> dict[str, Any]:
    payload = firing()
    target: Any = payload
    for step in path[:-1]:
        target = target[step]
    target[path[-1]] = value
    return payload


@pytest.mark.parametrize(
    ("payload", "field"),
    [
        (_without(("version",)), "version"),
        (_with(("version",), "3"), "version"),
        (_with(("version",), 4), "version"),
        (_without(("alerts",)), "alerts"),
        (_with(("alerts",), {"a": 1}), "alerts"),
        (_with(("alerts", 1), "firing"), "alerts[1]"),
        (_without(("alerts", 1, "status")), "alerts[1].status"),
        (_with(("alerts", 1, "status"), "pending"), "alerts[1].status"),
        (_without(("alerts", 1, "labels")), "alerts[1].labels"),
        (_with(("alerts", 1, "labels"), ["a"]), "alerts[1].labels"),
        (_with(("alerts", 1, "labels", "port"), 9100), "alerts[1].labels.port"),
        (_with(("alerts", 1, "labels", "a b"), 1), 'alerts[1].labels["a b"]'),
        (_with(("alerts", 1, "labels", ""), "x"), "alerts[1].labels"),
        (_with(("alerts", 1, "annotations"), "x"), "alerts[1].annotations"),
        (_with(("alerts", 1, "annotations", "summary"), None), "alerts[1].annotations.summary"),
        (_with(("alerts", 1, "startsAt"), "yesterday"), "alerts[1].startsAt"),
        (_with(("alerts", 1, "endsAt"), 12), "alerts[1].endsAt"),
        (_with(("alerts", 1, "fingerprint"), 12), "alerts[1].fingerprint"),
        (_with(("alerts", 1, "generatorURL"), []), "alerts[1].generatorURL"),
        (_with(("truncatedAlerts",), -1), "truncatedAlerts"),
        (_with(("groupLabels",), []), "groupLabels"),
        (_with(("receiver",), 5), "receiver"),
    ],
    ids=lambda value: value if isinstance(value, str) else "",
)
def test_each_violation_names_its_field(payload, field):
    assert invalid_field(payload) == field


@pytest.mark.parametrize("payload", [None, [], "x", 4, 1.5, True])
def test_a_non_object_body_is_invalid_at_the_root(payload):
    assert invalid_field(payload) == "body"


def test_label_value_numbers_are_rejected_not_coerced():
    payload = _with(("alerts", 0, "labels", "port"), 9100)
    with pytest.raises(InvalidPayload, match="values must be strings, got number"):
        alertmanager.parse(payload)


def test_error_message_never_repeats_the_payload():
    payload = _with(("alerts", 0, "labels", "secretish"), {"token": "s3cr3t-value" * 10})
    with pytest.raises(InvalidPayload) as caught:
        alertmanager.parse(payload)
    assert "s3cr3t" not in str(caught.value)
