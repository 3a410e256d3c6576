"""The generic format -> canonical alerts, and its JSON Schema, specified."""

from __future__ import annotations

from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import orjson
import pytest
from jsonschema import Draft202012Validator

from bridge.alert import Alert, Severity, Status
from bridge.sources import InvalidPayload, generic, parse

SAMPLES = Path(__file__).resolve().parent.parent / "fixtures" / "samples"
DOC = Path(__file__).resolve().parents[2] / "docs" / "generic-format.md"


def one() -> dict[str, Any]:
    return orjson.loads((SAMPLES / "generic.json").read_bytes())


def invalid(payload: Any) -> InvalidPayload:
    with pytest.raises(InvalidPayload) as caught:
        generic.parse(payload)
    return caught.value


def test_sample_parses_to_the_expected_alert():
    assert parse("generic", one()) == [
        Alert(
            source="generic",
            identity="host=mq-03/service=queue-depth",
            status=Status.FIRING,
            severity=Severity.WARNING,
            summary="mq-03 queue depth above 10k",
            description="orders.in has 12,407 messages waiting (threshold 10,000).",
            labels={
                "host": "mq-03",
                "service": "queue-depth",
                "team": "platform",
                "source": "nagios",
            },
            starts_at=datetime(2026, 11, 28, 12, 30, tzinfo=UTC),
            links=("https://nagios.example.com/cgi-bin/extinfo.cgi?host=mq-03",),
        )
    ]


def test_the_schema_is_valid_draft_2020_12():
    Draft202012Validator.check_schema(generic.schema())
    assert generic.schema()["$schema"] == "https://json-schema.org/draft/2020-12/schema"


def test_a_batch_gives_one_alert_per_entry():
    second = {"key": "b", "status": "resolved"}
    alerts = parse("generic", {"alerts": [one(), second]})
    assert [(a.identity, a.status) for a in alerts] == [
        ("host=mq-03/service=queue-depth", Status.FIRING),
        ("b", Status.RESOLVED),
    ]


def test_minimal_alert_gets_defaults():
    [alert] = parse("generic", {"key": "k1", "status": "firing"})
    assert alert.summary == "k1"
    assert alert.severity is Severity.WARNING
    assert alert.labels == {"source": "generic"}


def test_a_source_label_of_the_sender_wins_over_the_source_field():
    payload = one()
    payload["labels"]["source"] = "from-labels"
    assert parse("generic", payload)[0].labels["source"] == "from-labels"


def test_null_times_mean_unknown():
    payload = one()
    payload["starts_at"] = None
    assert parse("generic", payload)[0].starts_at is None


@pytest.mark.parametrize(
    ("payload", "field"),
    [
        ({"status": "firing"}, "key"),
        ({"key": "k"}, "status"),
        ({"key": "", "status": "firing"}, "key"),
        ({"key": 5, "status": "firing"}, "key"),
        ({"key": "k", "status": "open"}, "status"),
        ({"key": "k", "status": "firing", "severity": "urgent"}, "severity"),
        ({"key": "k", "status": "firing", "labels": {"port": 80}}, "labels.port"),
        ({"key": "k", "status": "firing", "labels": {"": "x"}}, "labels"),
        ({"key": "k", "status": "firing", "labels": []}, "labels"),
        ({"key": "k", "status": "firing", "starts_at": "soon"}, "starts_at"),
        ({"key": "k", "status": "firing", "links": ["ok", 3]}, "links[1]"),
        ({"key": "k", "status": "firing", "sumary": "typo"}, "sumary"),
        ({"alerts": [{"key": "a", "status": "firing"}, {"key": "b"}]}, "alerts[1].status"),
        ({"alerts": [{"key": "a", "status": "x"}]}, "alerts[0].status"),
        ({"alerts": [{"key": "a", "status": "firing", "ends_at": "?"}]}, "alerts[0].ends_at"),
        ({"alerts": "many"}, "alerts"),
        ({"alerts": [], "extra": 1}, "extra"),
        (None, "body"),
        ([], "body"),
        ("text", "body"),
    ],
)
def test_each_violation_names_its_field(payload, field):
    error = invalid(payload)
    assert error.field == field
    assert str(error).startswith(f"{field}: ")


def test_type_error_message_names_the_types_not_the_value():
    error = invalid([{"key": "very-secret-value", "status": "firing"}])
    assert str(error) == "body: expected object, got array"


def test_unknown_field_message_lists_the_known_ones():
    error = invalid({"key": "k", "status": "firing", "sumary": "typo"})
    assert "summary" in error.message


def test_fast_check_and_schema_agree_on_the_sample():
    assert generic._plainly_valid(one())
    assert Draft202012Validator(generic.schema()).is_valid(one())


def test_documentation_example_is_valid():
    text = DOC.read_text()
    start = text.index("```json\n") + len("```json\n")
    example = orjson.loads(text[start : text.index("```", start)])
    assert parse("generic", example)
