"""The task serializer: kombu's JSON on the wire, written and read with orjson."""

from __future__ import annotations

import datetime
import os
import uuid

os.environ.setdefault("BRIDGE_NO_APP", "1")

from kombu.serialization import dumps, loads

from bridge.bench import am_payload, storm_alert
from bridge.pipeline import envelope
from workers.app import SERIALIZER

ACCEPT = ["application/json"]


def body(alerts: int) -> list:
    message = envelope("alertmanager", am_payload([storm_alert(i, "s") for i in range(alerts)]))
    return [[message], {}, {"callbacks": None, "errbacks": None, "chain": None, "chord": None}]


def test_a_task_body_reads_back_equal_and_kombu_json_reads_it_too():
    data = body(3)
    content_type, encoding, wire = dumps(data, serializer=SERIALIZER)
    assert (content_type, encoding) == ("application/json", "utf-8")
    assert loads(wire, content_type, encoding, accept=ACCEPT) == data
    from kombu.utils import json as kombu_json

    assert kombu_json.loads(wire) == data


def test_messages_written_by_kombu_json_are_read():
    data = body(2)
    content_type, encoding, wire = dumps(data, serializer="json")
    assert loads(wire, content_type, encoding, accept=ACCEPT) == data
    assert loads(wire.encode(), content_type, encoding, accept=ACCEPT) == data


def test_kombu_typed_values_and_what_orjson_cannot_write_survive():
    when = datetime.datetime(2026, 1, 2, 3, 4, 5)
    ident = uuid.uuid4()
    content_type, encoding, wire = dumps({"t": when, "u": ident}, serializer="json")
    assert loads(wire, content_type, encoding, accept=ACCEPT) == {"t": when, "u": ident}
    content_type, encoding, wire = dumps({"n": 2**70, 1: "x"}, serializer=SERIALIZER)
    assert loads(wire, content_type, encoding, accept=ACCEPT) == {"n": 2**70, "1": "x"}
