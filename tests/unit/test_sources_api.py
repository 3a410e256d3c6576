"""bridge.sources: the one entry point, decoding, format detection and the error type."""

from __future__ import annotations

import pickle
from pathlib import Path

import orjson
import pytest

from bridge import sources
from bridge.sources import FORMATS, InvalidPayload, decode, detect, parse

SAMPLES = Path(__file__).resolve().parent.parent / "fixtures" / "samples"
SAMPLE_FORMATS = {
    "alertmanager-firing.json": "alertmanager",
    "alertmanager-resolved.json": "alertmanager",
    "grafana-firing.json": "grafana",
    "pagerduty-trigger.json": "pagerduty",
    "pagerduty-resolve.json": "pagerduty",
    "generic.json": "generic",
}


def test_formats_are_the_four_supported():
    assert FORMATS == ("alertmanager", "grafana", "pagerduty", "generic")


def test_every_stored_sample_has_a_known_format():
    assert {p.name for p in SAMPLES.glob("*.json")} == set(SAMPLE_FORMATS)


@pytest.mark.parametrize(("name", "fmt"), SAMPLE_FORMATS.items())
def test_detect_names_each_samples_format(name, fmt):
    assert detect(decode((SAMPLES / name).read_bytes())) == fmt


@pytest.mark.parametrize(("name", "fmt"), SAMPLE_FORMATS.items())
def test_every_sample_parses_to_alerts_of_its_format(name, fmt):
    alerts = parse(fmt, decode((SAMPLES / name).read_bytes()))
    assert alerts
    assert {a.source for a in alerts} == {fmt}


def test_detect_recognises_a_generic_batch():
    assert detect({"alerts": [{"key": "k", "status": "firing"}]}) == "generic"


@pytest.mark.parametrize("payload", [None, [], "x", 1, {}, {"alerts": "x"}, {"hello": 1}])
def test_detect_gives_up_on_shapes_it_does_not_know(payload):
    assert detect(payload) is None


def test_unknown_format_names_the_format_field():
    with pytest.raises(InvalidPayload) as caught:
        parse("nagios", {})
    assert caught.value.field == "format"


def test_decode_reads_json_bytes():
    assert decode(b'{"a": [1, 2]}') == {"a": [1, 2]}


@pytest.mark.parametrize("body", [b'{"alerts": [', b"", b"\xff\xfe{}", b"nan", b"1e999"])
def test_decode_refuses_what_is_not_json_naming_the_body(body):
    with pytest.raises(InvalidPayload, match="not valid JSON") as caught:
        decode(body)
    assert caught.value.field == "body"


def test_invalid_payload_reads_field_colon_message():
    error = InvalidPayload("alerts[3].labels", "is required")
    assert (error.field, error.message) == ("alerts[3].labels", "is required")
    assert str(error) == "alerts[3].labels: is required"


def test_invalid_payload_survives_pickling():
    error = pickle.loads(pickle.dumps(InvalidPayload("payload.summary", "is required")))
    assert str(error) == "payload.summary: is required"
    assert error.field == "payload.summary"


def test_parse_alertmanager_group_is_exported():
    payload = orjson.loads((SAMPLES / "alertmanager-firing.json").read_bytes())
    alerts, group = sources.parse_alertmanager_group(payload)
    assert len(alerts) == 2
    assert group.receiver == "itsm-bridge"
