"""Whatever a client sends to an alert endpoint, the answer is a clear 4xx or a true 202.

The WSGI app is driven in process (no sockets), with a recording sink in place of
the broker (the broker path has its own tests). For every POST endpoint:

- no request a client can make gets a 5xx (503 only from a sink that is failing);
- every 4xx is a JSON object saying why, and a 400 names the field at fault;
- every answer is one the OpenAPI document lists for that endpoint;
- a 202 means the sink got exactly one message holding the alerts the answer counts
  (none for a request without alerts), and anything refused reached no sink.

Each test runs twice HYPOTHESIS_EXAMPLES (default 300, the parser tests' own setting):
with the parser and key property tests that is over 10,000 generated cases per CI run
(``pytest --hypothesis-show-statistics`` shows each test's count).
"""

from __future__ import annotations

import io
import json
import os
from dataclasses import dataclass, field
from datetime import UTC
from typing import Any

import orjson
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from bridge.ingest import Limits, create_wsgi_app
from bridge.ingest_openapi import document
from bridge.sources import parse
from tests.ingest import GRAFANA_TOKEN, TOKEN, settings_for
from tests.unit.test_sources_properties import (
    SAMPLE_FORMATS,
    _mutate,
    json_values,
    sample,
    shaped_alertmanager,
    shaped_generic,
    shaped_grafana,
    shaped_pagerduty,
)

# Drawing a case is most of a case's cost, here as in the parser tests; twice their
# count keeps this file within about a minute on two cores.
EXAMPLES = 2 * int(os.environ.get("HYPOTHESIS_EXAMPLES", "300"))
MAX_BODY = 16 * 1024
LIMITS = Limits(
    max_body_bytes=MAX_BODY,
    max_alerts=5,
    max_labels=8,
    max_label_name_chars=40,
    max_label_value_chars=100,
)
ENDPOINTS = {
    "alertmanager": "/api/v1/alerts/alertmanager",
    "grafana": "/api/v1/alerts/grafana",
    "generic": "/api/v1/alerts",
    "pagerduty": "/v2/enqueue",
}
FORMATS = sorted(ENDPOINTS)
DOCUMENTED = {
    path: set(document()["paths"][path]["post"]["responses"]) for path in ENDPOINTS.values()
}
run = settings(
    max_examples=EXAMPLES,
    deadline=None,
    # Payload strategies are shared with the parser tests, whose nested JSON values
    # are sometimes large to draw; that is the point of them, not a problem.
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)

# -- a tiny in-process client ---------------------------------------------------------


@dataclass
class Answer:
    status: int
    headers: dict[str, str]
    body: bytes
    published: list[dict[str, Any]] = field(default_factory=list)

    def json(self) -> Any:
        return orjson.loads(self.body)


class Sink:
    """Records what the app publishes; ``failing`` makes it refuse like a broker that is down."""

    def __init__(self, *, failing: bool = False) -> None:
        self.failing = failing
        self.messages: list[dict[str, Any]] = []

    def __call__(self, message: dict[str, Any]) -> None:
        if self.failing:
            raise ConnectionError("broker down")
        self.messages.append(message)


class Client:
    def __init__(self, *, failing_sink: bool = False) -> None:
        self.sink = Sink(failing=failing_sink)
        settings_ = settings_for(
            "memory://", http_max_body_bytes=MAX_BODY, http_max_alerts=LIMITS.max_alerts
        )
        self.app = create_wsgi_app(settings_, self.sink, lambda: {"broker": "ok"}, limits=LIMITS)

    def post(
        self,
        fmt: str,
        body: bytes,
        *,
        content_type: str | None = "application/json",
        authorization: str | None = f"Bearer {TOKEN}",
        content_length: str | None = None,
    ) -> Answer:
        environ: dict[str, Any] = {
            "REQUEST_METHOD": "POST",
            "PATH_INFO": ENDPOINTS[fmt],
            "SERVER_NAME": "localhost",
            "SERVER_PORT": "80",
            "wsgi.url_scheme": "http",
            "wsgi.input": io.BytesIO(body),
            "CONTENT_LENGTH": str(len(body)) if content_length is None else content_length,
        }
        if content_type is not None:
            environ["CONTENT_TYPE"] = content_type
        if authorization is not None:
            environ["HTTP_AUTHORIZATION"] = authorization
        started: list[tuple[str, list[tuple[str, str]]]] = []
        self.sink.messages = []
        chunks = self.app(environ, lambda status, headers: started.append((status, headers)))
        [(status, headers)] = started
        return Answer(
            status=int(status.split(" ", 1)[0]),
            headers=dict(headers),
            body=b"".join(chunks),
            published=self.sink.messages,
        )


CLIENT = Client()
DOWN = Client(failing_sink=True)

# -- what every answer must be ----------------------------------------------------------


def alerts_in(fmt: str, message: dict[str, Any]) -> int:
    """How many alerts a worker will find in a published message."""
    assert message["format"] == fmt
    return len(parse(fmt, message["payload"]))


def check_answer(fmt: str, answer: Answer, *, sink_failing: bool = False) -> None:
    """The properties every answer of an alert endpoint has, whatever was sent."""
    assert str(answer.status) in DOCUMENTED[ENDPOINTS[fmt]], answer
    assert answer.headers["Content-Type"] == "application/json"
    assert answer.status < 500 or (answer.status == 503 and sink_failing), answer
    body = answer.json()
    assert isinstance(body, dict)
    if answer.status == 202:
        check_accepted(fmt, answer, body)
        return
    assert answer.published == []
    if fmt == "pagerduty" and answer.status == 400:
        assert body["status"] == "invalid event"
        assert body["errors"], body
        assert all(isinstance(error, str) and ": " in error for error in body["errors"]), body
        return
    assert isinstance(body["error"], str) and body["error"], body
    if answer.status == 400:
        assert body["field"], body
        assert body["error"].startswith(body["field"]), body
    if answer.status == 401:
        assert answer.headers["WWW-Authenticate"].startswith("Bearer")
    if answer.status == 503:
        assert int(answer.headers["Retry-After"]) > 0


def check_accepted(fmt: str, answer: Answer, body: dict[str, Any]) -> None:
    """A 202 means the sink holds exactly the alerts the answer speaks of."""
    if fmt == "pagerduty":
        assert body["status"] == "success"
        [message] = answer.published
        assert alerts_in(fmt, message) == 1
        assert message["payload"]["dedup_key"] == body["dedup_key"]
    else:
        assert body["status"] == "accepted"
        if body["alerts"] == 0:
            assert answer.published == []
        else:
            [message] = answer.published
            assert message["id"] == body["id"]
            assert alerts_in(fmt, message) == body["alerts"]
    for message in answer.published:
        # What the worker gets back from the broker is what was accepted.
        assert orjson.loads(orjson.dumps(message)) == message


def encoded(value: Any) -> bytes:
    """JSON text the way a careless client writes it (NaN, huge integers and all)."""
    return json.dumps(value).encode()


formats = st.sampled_from(FORMATS)

# -- bytes, JSON and near-misses never get a 5xx ---------------------------------------


@run
@given(fmt=formats, body=st.binary(max_size=256))
def test_arbitrary_bytes_get_a_clear_answer(fmt, body):
    check_answer(fmt, CLIENT.post(fmt, body))


@run
@given(fmt=formats, payload=json_values)
def test_arbitrary_json_values_get_a_clear_answer(fmt, payload):
    check_answer(fmt, CLIENT.post(fmt, encoded(payload)))


NEAR_MISSES: dict[str, st.SearchStrategy[Any]] = {
    "alertmanager": shaped_alertmanager,
    "grafana": shaped_grafana,
    "generic": shaped_generic,
    "pagerduty": shaped_pagerduty,
}


@run
@given(data=st.data(), fmt=formats)
def test_payloads_shaped_like_the_format_get_a_clear_answer(data, fmt):
    payload = data.draw(NEAR_MISSES[fmt])

    check_answer(fmt, CLIENT.post(fmt, encoded(payload)))


@run
@given(name=st.sampled_from(sorted(SAMPLE_FORMATS)), data=st.data())
def test_mutated_real_payloads_get_a_clear_answer(name, data):
    fmt = SAMPLE_FORMATS[name]
    payload = _mutate(data, sample(name))

    check_answer(fmt, CLIENT.post(fmt, encoded(payload)))


# -- valid payloads, inside and beyond the limits ---------------------------------------

# Text JSON can carry (no lone surrogates); names and keys that are not blank.
characters = st.characters(codec="utf-8", exclude_categories=("Cs",))
plain_text = st.text(characters, max_size=30)
nonblank = st.text(
    st.characters(codec="utf-8", exclude_categories=("Cs", "Zs", "Zl", "Zp", "Cc")),
    min_size=1,
    max_size=30,
)
# Label sets reach just past each limit, so some valid requests must be refused.
label_names = st.text(characters, min_size=1, max_size=LIMITS.max_label_name_chars + 5)
label_maps = st.dictionaries(
    label_names,
    st.text(characters, max_size=LIMITS.max_label_value_chars + 5),
    max_size=LIMITS.max_labels + 1,
)
times = st.datetimes(timezones=st.just(UTC)).map(lambda moment: moment.isoformat())
details = st.dictionaries(st.text(characters, max_size=8), plain_text, max_size=3)
am_alerts = st.fixed_dictionaries(
    {
        "status": st.sampled_from(["firing", "resolved"]),
        "labels": label_maps,
        "fingerprint": nonblank,
    },
    optional={
        "annotations": st.dictionaries(label_names, plain_text, max_size=3),
        "startsAt": times,
        "endsAt": times,
        "generatorURL": plain_text,
    },
)
grafana_alerts = am_alerts.flatmap(
    lambda alert: st.fixed_dictionaries(
        {},
        optional={
            "valueString": plain_text,
            "dashboardURL": plain_text,
            "values": st.none() | details,
        },
    ).map(lambda extra: {**alert, **extra})
)
generic_alerts = st.fixed_dictionaries(
    {"key": nonblank, "status": st.sampled_from(["firing", "resolved"])},
    optional={
        "severity": st.sampled_from(["critical", "error", "warning", "info"]),
        "summary": plain_text,
        "labels": label_maps,
        "source": nonblank,
        "starts_at": times,
        "links": st.lists(nonblank, max_size=3),
    },
)
alert_lists = {
    "alertmanager": st.lists(am_alerts, max_size=LIMITS.max_alerts + 1),
    "grafana": st.lists(grafana_alerts, max_size=LIMITS.max_alerts + 1),
    "generic": st.lists(generic_alerts, max_size=LIMITS.max_alerts + 1),
}
VALID: dict[str, st.SearchStrategy[dict[str, Any]]] = {
    "alertmanager": st.fixed_dictionaries(
        {
            "version": st.just("4"),
            "status": st.sampled_from(["firing", "resolved"]),
            "receiver": plain_text,
            "groupKey": plain_text,
            "alerts": alert_lists["alertmanager"],
        }
    ),
    "grafana": st.fixed_dictionaries(
        {
            "orgId": st.integers(min_value=1, max_value=2**31),
            "title": plain_text,
            "alerts": alert_lists["grafana"],
        }
    ),
    "generic": generic_alerts
    | st.builds(lambda alerts: {"alerts": alerts}, alert_lists["generic"]),
    "pagerduty": st.fixed_dictionaries(
        {
            "routing_key": st.just(TOKEN),
            "event_action": st.just("trigger"),
            "payload": st.fixed_dictionaries(
                {
                    "summary": nonblank,
                    "source": nonblank,
                    "severity": st.sampled_from(["critical", "error", "warning", "info"]),
                },
                optional={"component": plain_text, "custom_details": details},
            ),
        },
        optional={"dedup_key": nonblank, "client": plain_text},
    )
    | st.fixed_dictionaries(
        {
            "routing_key": st.just(TOKEN),
            "event_action": st.sampled_from(["acknowledge", "resolve"]),
            "dedup_key": nonblank,
        }
    ),
}


def labels_of(fmt: str, payload: dict[str, Any]) -> list[dict[str, str]]:
    """The label sets the limits apply to, one per alert (the format's own rules)."""
    if fmt == "pagerduty":
        body = payload.get("payload", {})
        return [{name: body[name] for name in ("source", "component") if body.get(name)}]
    alerts = payload.get("alerts", [payload])
    if fmt == "generic":
        return [{"source": "", **alert.get("labels", {})} for alert in alerts]
    return [alert["labels"] for alert in alerts]


def within_limits(fmt: str, payload: dict[str, Any]) -> bool:
    label_sets = labels_of(fmt, payload)
    return len(label_sets) <= LIMITS.max_alerts and all(
        len(labels) <= LIMITS.max_labels
        and all(len(name) <= LIMITS.max_label_name_chars for name in labels)
        and all(len(value) <= LIMITS.max_label_value_chars for value in labels.values())
        for labels in label_sets
    )


@run
@given(data=st.data(), fmt=formats)
def test_a_valid_request_within_the_limits_is_accepted_and_published_once(data, fmt):
    payload = data.draw(VALID[fmt])
    body = orjson.dumps(payload)

    answer = CLIENT.post(fmt, body)

    check_answer(fmt, answer)
    if len(body) > MAX_BODY:
        assert answer.status == 413
    elif within_limits(fmt, payload):
        assert answer.status == 202, answer
    else:
        assert answer.status == 400, answer
        assert answer.json()["field"].startswith(("alerts", "labels")), answer


@run
@given(data=st.data(), fmt=formats)
def test_a_valid_request_while_the_broker_is_down_is_503_and_never_5xx_otherwise(data, fmt):
    payload = data.draw(VALID[fmt] | NEAR_MISSES[fmt])
    body = encoded(payload)

    answer = DOWN.post(fmt, body)

    check_answer(fmt, answer, sink_failing=True)
    accepted = CLIENT.post(fmt, body)
    carries_alerts = accepted.status == 202 and bool(accepted.published)
    assert (answer.status == 503) == carries_alerts, (answer, accepted)


# -- headers: content type, authorization, length ----------------------------------------

latin1 = st.text(st.characters(codec="latin-1"), max_size=40)
content_types = (
    st.sampled_from(
        [
            "text/plain",
            "application/x-www-form-urlencoded",
            "multipart/form-data; boundary=x",
            "application/xml",
            "text/json",
            "json",
            "application/jsonp",
            "application/json-patch",
            "",
        ]
    )
    | latin1
)


def is_json_media_type(content_type: str) -> bool:
    """What the document promises to take: application/json, or any application/*+json."""
    media = content_type.split(";", 1)[0].strip().lower()
    return media == "application/json" or (
        media.startswith("application/") and media.endswith("+json")
    )


@run
@given(fmt=formats, content_type=content_types, payload=st.sampled_from(sorted(SAMPLE_FORMATS)))
def test_a_body_that_is_not_declared_json_is_415(fmt, content_type, payload):
    answer = CLIENT.post(fmt, orjson.dumps(sample(payload)), content_type=content_type)

    check_answer(fmt, answer)
    assert (answer.status == 415) == (not is_json_media_type(content_type)), answer


@run
@given(
    fmt=formats,
    authorization=st.none()
    | latin1
    | st.builds(lambda token: f"Bearer {token}", latin1)
    | st.sampled_from([f"Basic {TOKEN}", f"Bearer {TOKEN}x", f"bearer {TOKEN[:-1]}"]),
    payload=st.sampled_from(sorted(SAMPLE_FORMATS)),
)
def test_a_missing_or_wrong_token_is_401_and_publishes_nothing(fmt, authorization, payload):
    body = sample(payload)
    if fmt == "pagerduty" and isinstance(body, dict):
        body = {**body, "routing_key": "not-a-token"}

    answer = CLIENT.post(fmt, orjson.dumps(body), authorization=authorization)

    check_answer(fmt, answer)
    if fmt == "pagerduty" and authorization is None:
        assert answer.status in (400, 401), answer
    else:
        assert answer.status == 401, answer


@run
@given(fmt=st.sampled_from(["alertmanager", "generic", "pagerduty"]), payload=json_values)
def test_a_token_bound_to_another_source_is_401(fmt, payload):
    answer = CLIENT.post(fmt, encoded(payload), authorization=f"Bearer {GRAFANA_TOKEN}")

    check_answer(fmt, answer)
    assert answer.status == 401


@run
@given(
    fmt=formats,
    name=st.sampled_from(sorted(SAMPLE_FORMATS)),
    content_length=st.integers(min_value=-(2**70), max_value=2**70).map(str) | latin1,
)
def test_any_content_length_gets_a_clear_answer(fmt, name, content_length):
    body = orjson.dumps(sample(name))

    check_answer(fmt, CLIENT.post(fmt, body, content_length=content_length))


@pytest.mark.parametrize("fmt", FORMATS)
def test_every_endpoint_accepts_its_real_sample(fmt):
    """The properties above would pass vacuously if nothing were ever accepted."""
    name = next(name for name, of in SAMPLE_FORMATS.items() if of == fmt)

    answer = CLIENT.post(fmt, orjson.dumps(sample(name)))

    check_answer(fmt, answer)
    assert answer.status == 202
