"""PagerDuty Events API v2 events (one event per request).

Mapping, and the choices PagerDuty leaves open:

- ``event_action`` trigger -> firing, acknowledge -> acknowledged, resolve -> resolved.
- identity = ``dedup_key``, so a resolve naming the key of a trigger reaches the same
  incident. A trigger without one gets a random key (uuid4 hex), as PagerDuty does;
  the ingest returns it so the sender can resolve with it.
- ``payload`` is required for trigger (``summary`` ≤ 1024 characters, ``source``,
  ``severity`` critical|error|warning|info) and ignored for acknowledge and resolve,
  as PagerDuty ignores it. Those two carry severity info unless a valid payload
  says otherwise, so they never look like a severity rise.
- labels are kept small, for routing and grouping: ``source``, ``component``,
  ``group``, ``class`` when present. ``custom_details`` go to annotations (top-level
  scalars as text, nested values as JSON) and to the description as ``name: value``
  lines; a string ``custom_details`` becomes the description itself.
- links: ``client_url``, then every ``links[].href``; ``client`` is kept as an
  annotation. ``images`` are checked for shape and not kept.
- ``routing_key`` must be a non-empty string; it authenticates the sender and never
  enters the alert (it is a secret).
"""

from __future__ import annotations

import json
import uuid
from typing import Any

import orjson

from bridge.alert import Alert, Severity, Status
from bridge.sources.errors import (
    ROOT,
    InvalidPayload,
    expect_list,
    expect_object,
    optional_str,
    required_str,
    timestamp,
    type_name,
)

SOURCE = "pagerduty"
MAX_DEDUP_KEY_CHARS = 255
MAX_SUMMARY_CHARS = 1024
_ACTIONS = {
    "trigger": Status.FIRING,
    "acknowledge": Status.ACKNOWLEDGED,
    "resolve": Status.RESOLVED,
}
_SEVERITIES = {s.value: s for s in Severity}
_LABEL_FIELDS = ("source", "component", "group", "class")


def parse(payload: Any) -> list[Alert]:
    """The one alert of a PagerDuty v2 event; raises InvalidPayload naming the field."""
    event = expect_object(payload, ROOT)
    required_str(event, "routing_key", "")
    action = event.get("event_action")
    status = _ACTIONS.get(action) if type(action) is str else None
    if status is None:
        if action is None:
            raise InvalidPayload("event_action", "is required (trigger, acknowledge or resolve)")
        raise InvalidPayload("event_action", "must be trigger, acknowledge or resolve")
    dedup_key = _dedup_key(event, status)
    links = _links(event)
    annotations: dict[str, str] = {}
    client = optional_str(event, "client", "")
    if client:
        annotations["client"] = client
    if status is Status.FIRING:
        return [_trigger(event, dedup_key, links, annotations)]
    severity = Severity.INFO
    raw_payload = event.get("payload")
    if type(raw_payload) is dict and type(raw_payload.get("severity")) is str:
        severity = _SEVERITIES.get(raw_payload["severity"], Severity.INFO)
    return [
        Alert(
            source=SOURCE,
            identity=dedup_key,
            status=status,
            severity=severity,
            summary=dedup_key,
            annotations=annotations,
            links=links,
        )
    ]


def _dedup_key(event: dict[str, Any], status: Status) -> str:
    value = event.get("dedup_key")
    if value is None or value == "":
        if status is Status.FIRING:
            return uuid.uuid4().hex
        raise InvalidPayload("dedup_key", "is required for acknowledge and resolve")
    if type(value) is not str:
        raise InvalidPayload("dedup_key", f"expected a string, got {type_name(value)}")
    if len(value) > MAX_DEDUP_KEY_CHARS:
        raise InvalidPayload(
            "dedup_key", f"{len(value)} characters, at most {MAX_DEDUP_KEY_CHARS} allowed"
        )
    return value


def _trigger(
    event: dict[str, Any], dedup_key: str, links: tuple[str, ...], annotations: dict[str, str]
) -> Alert:
    if event.get("payload") is None:
        raise InvalidPayload("payload", "is required for trigger")
    body = expect_object(event["payload"], "payload")
    summary = required_str(body, "summary", "payload", max_chars=MAX_SUMMARY_CHARS)
    labels = {"source": required_str(body, "source", "payload")}
    raw_severity = body.get("severity")
    severity = _SEVERITIES.get(raw_severity) if type(raw_severity) is str else None
    if severity is None:
        if raw_severity is None:
            raise InvalidPayload("payload.severity", "is required")
        raise InvalidPayload("payload.severity", "must be critical, error, warning or info")
    for name in _LABEL_FIELDS[1:]:
        value = optional_str(body, name, "payload")
        if value:
            labels[name] = value
    description = _details(body.get("custom_details"), annotations)
    return Alert(
        source=SOURCE,
        identity=dedup_key,
        status=Status.FIRING,
        severity=severity,
        summary=summary,
        description=description,
        labels=labels,
        annotations=annotations,
        starts_at=timestamp(body.get("timestamp"), "payload.timestamp"),
        links=links,
    )


def _details(details: Any, annotations: dict[str, str]) -> str:
    """Fold ``custom_details`` into ``annotations``; return the description text."""
    if details is None:
        return ""
    if type(details) is str:
        return details
    if type(details) is not dict:
        # PagerDuty accepts any JSON here; keep it whole, as text.
        text = _json_text(details, "payload.custom_details")
        annotations["custom_details"] = text
        return text
    lines = []
    for name, value in details.items():
        text = value if type(value) is str else _json_text(value, "payload.custom_details")
        if name:
            annotations.setdefault(str(name), text)
        lines.append(f"{name}: {text}")
    return "\n".join(lines)


def _json_text(value: Any, field: str) -> str:
    try:
        return orjson.dumps(value, option=orjson.OPT_NON_STR_KEYS).decode()
    except (TypeError, orjson.JSONEncodeError):
        pass
    # orjson refuses integers beyond 64 bits and lone surrogates, which a payload
    # decoded by another JSON library may hold; the standard library copes.
    try:
        return json.dumps(value, default=repr)
    except (TypeError, ValueError, RecursionError):
        raise InvalidPayload(field, "cannot be represented as JSON") from None


def _links(event: dict[str, Any]) -> tuple[str, ...]:
    links = []
    client_url = optional_str(event, "client_url", "")
    if client_url:
        links.append(client_url)
    raw_links = event.get("links")
    if raw_links is not None:
        for index, raw in enumerate(expect_list(raw_links, "links")):
            link = expect_object(raw, f"links[{index}]")
            href = required_str(link, "href", f"links[{index}]")
            optional_str(link, "text", f"links[{index}]")
            links.append(href)
    raw_images = event.get("images")
    if raw_images is not None:
        for index, raw in enumerate(expect_list(raw_images, "images")):
            image = expect_object(raw, f"images[{index}]")
            required_str(image, "src", f"images[{index}]")
    return tuple(dict.fromkeys(links))
