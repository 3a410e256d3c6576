"""Every parser, fed anything JSON can hold, returns alerts or raises InvalidPayload.

Nothing else may escape: a parser crash would dead-letter a payload as a bug
instead of telling the sender which field is wrong. Examples per test come from
HYPOTHESIS_EXAMPLES (default 300).
"""

from __future__ import annotations

import copy
import json
import os
from pathlib import Path
from typing import Any

import orjson
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from jsonschema import Draft202012Validator

from bridge.alert import Alert
from bridge.sources import FORMATS, InvalidPayload, decode, detect, generic, parse

EXAMPLES = int(os.environ.get("HYPOTHESIS_EXAMPLES", "300"))
SAMPLES = Path(__file__).resolve().parent.parent / "fixtures" / "samples"
SAMPLE_FORMATS = {
    "alertmanager-firing.json": "alertmanager",
    "alertmanager-resolved.json": "alertmanager",
    "grafana-firing.json": "grafana",
    "pagerduty-trigger.json": "pagerduty",
    "pagerduty-resolve.json": "pagerduty",
    "generic.json": "generic",
}
# A message is a field and a sentence; it never grows with the payload.
MAX_MESSAGE_CHARS = 600

scalars = (
    st.none()
    | st.booleans()
    | st.integers()
    | st.floats(allow_nan=True, allow_infinity=True)
    | st.text(max_size=20)
    | st.sampled_from(["firing", "resolved", "4", "trigger", "resolve", "critical", ""])
)
json_values = st.recursive(
    scalars,
    lambda inner: (
        st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner, max_size=4)
    ),
    max_leaves=24,
)
run = settings(
    max_examples=EXAMPLES,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)


def sample(name: str) -> Any:
    return orjson.loads((SAMPLES / name).read_bytes())


def parses_or_names_a_field(fmt: str, payload: Any) -> None:
    try:
        alerts = parse(fmt, payload)
    except InvalidPayload as error:
        assert error.field
        assert str(error) == f"{error.field}: {error.message}"
        assert len(str(error)) <= MAX_MESSAGE_CHARS
        return
    assert isinstance(alerts, list)
    assert all(isinstance(alert, Alert) for alert in alerts)


# Structure-aware payloads: the format's own field names with arbitrary values,
# so the fuzzing reaches past the first type check.
AM_ALERT_FIELDS = [
    "status",
    "labels",
    "annotations",
    "startsAt",
    "endsAt",
    "generatorURL",
    "fingerprint",
    "valueString",
    "silenceURL",
    "dashboardURL",
    "panelURL",
]
GENERIC_FIELDS = [
    "source",
    "key",
    "status",
    "severity",
    "summary",
    "description",
    "labels",
    "annotations",
    "starts_at",
    "ends_at",
    "links",
]


def shaped(names: list[str]) -> st.SearchStrategy[dict[str, Any]]:
    return st.dictionaries(st.sampled_from(names), json_values, max_size=len(names))


shaped_alertmanager = st.fixed_dictionaries(
    {
        "version": st.just("4") | json_values,
        "alerts": st.lists(shaped(AM_ALERT_FIELDS) | json_values, max_size=3),
    },
    optional={
        "receiver": json_values,
        "groupKey": json_values,
        "groupLabels": json_values,
        "truncatedAlerts": json_values,
    },
)
shaped_grafana = st.fixed_dictionaries(
    {"orgId": st.just(1), "alerts": st.lists(shaped(AM_ALERT_FIELDS) | json_values, max_size=3)}
)
shaped_pagerduty = st.fixed_dictionaries(
    {
        "routing_key": st.just("R0UTINGKEY0000000000000000000001") | json_values,
        "event_action": st.sampled_from(["trigger", "acknowledge", "resolve"]) | json_values,
    },
    optional={
        "dedup_key": json_values,
        "payload": shaped(
            [
                "summary",
                "source",
                "severity",
                "timestamp",
                "component",
                "group",
                "class",
                "custom_details",
            ]
        )
        | json_values,
        "links": st.lists(shaped(["href", "text"]) | json_values, max_size=3) | json_values,
        "images": st.lists(shaped(["src", "href", "alt"]) | json_values, max_size=3),
        "client": json_values,
        "client_url": json_values,
    },
)
shaped_generic = shaped(GENERIC_FIELDS) | st.fixed_dictionaries(
    {"alerts": st.lists(shaped(GENERIC_FIELDS) | json_values, max_size=3)}
)


def _mutate(data: st.DataObject, payload: Any) -> Any:
    """Replace, delete or add one node somewhere in a copy of ``payload``."""
    payload = copy.deepcopy(payload)
    parent: Any = None
    slot: Any = None
    node = payload
    while isinstance(node, dict | list) and node and data.draw(st.booleans()):
        parent = node
        slot = data.draw(
            st.sampled_from(list(node) if isinstance(node, dict) else range(len(node)))
        )
        node = node[slot]
    action = data.draw(st.sampled_from(["replace", "delete", "add"]))
    if parent is None:
        return data.draw(json_values) if action == "replace" else payload
    if action == "delete":
        del parent[slot]
    elif action == "add" and isinstance(parent, dict):
        parent[data.draw(st.text(max_size=8))] = data.draw(json_values)
    else:
        parent[slot] = data.draw(json_values)
    return payload


@run
@given(fmt=st.sampled_from(FORMATS), payload=json_values)
def test_any_json_value_parses_or_names_a_field(fmt, payload):
    parses_or_names_a_field(fmt, payload)


@run
@given(payload=shaped_alertmanager)
def test_alertmanager_shaped_garbage_parses_or_names_a_field(payload):
    parses_or_names_a_field("alertmanager", payload)


@run
@given(payload=shaped_grafana)
def test_grafana_shaped_garbage_parses_or_names_a_field(payload):
    parses_or_names_a_field("grafana", payload)


@run
@given(payload=shaped_pagerduty)
def test_pagerduty_shaped_garbage_parses_or_names_a_field(payload):
    parses_or_names_a_field("pagerduty", payload)


@run
@given(payload=shaped_generic)
def test_generic_shaped_garbage_parses_or_names_a_field(payload):
    parses_or_names_a_field("generic", payload)


@run
@given(name=st.sampled_from(sorted(SAMPLE_FORMATS)), data=st.data())
def test_mutated_samples_parse_or_name_a_field(name, data):
    parses_or_names_a_field(SAMPLE_FORMATS[name], _mutate(data, sample(name)))


@run
@given(payload=json_values)
def test_detect_never_fails(payload):
    assert detect(payload) in (*FORMATS, None)


@run
@given(body=st.binary(max_size=64) | json_values.map(lambda v: json.dumps(v).encode()))
def test_decode_returns_a_value_or_names_the_body(body):
    try:
        decode(body)
    except InvalidPayload as error:
        assert error.field == "body"


@run
@given(payload=shaped_generic | st.builds(lambda d: d, shaped(GENERIC_FIELDS)))
def test_generic_fast_check_never_accepts_what_the_schema_refuses(payload):
    if generic._plainly_valid(payload):
        assert Draft202012Validator(generic.schema()).is_valid(payload)


@run
@given(
    key=st.text(min_size=0, max_size=300),
    status=st.sampled_from(["firing", "resolved", "open"]),
    severity=st.sampled_from(["critical", "error", "warning", "info", "major"]),
    summary=st.text(max_size=1100),
    labels=st.dictionaries(st.text(max_size=300), st.text(max_size=5) | st.integers(), max_size=3),
    links=st.lists(st.text(max_size=5), max_size=3),
)
def test_generic_fast_check_agrees_with_the_schema_on_near_valid_alerts(
    key, status, severity, summary, labels, links
):
    payload = {
        "key": key,
        "status": status,
        "severity": severity,
        "summary": summary,
        "labels": labels,
        "links": links,
    }
    schema_says = Draft202012Validator(generic.schema()).is_valid(payload)
    assert generic._plainly_valid(payload) == schema_says
