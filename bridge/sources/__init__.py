"""Input formats: each turns a decoded payload into canonical ``Alert`` values.

``parse(fmt, payload)`` is the one entry point; every problem with a payload is an
``InvalidPayload`` naming the field at fault, whatever JSON value arrived.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import orjson

from bridge.alert import Alert
from bridge.sources import alertmanager, generic, grafana, pagerduty
from bridge.sources.alertmanager import GroupInfo
from bridge.sources.errors import InvalidPayload

__all__ = [
    "FORMATS",
    "GroupInfo",
    "InvalidPayload",
    "decode",
    "detect",
    "parse",
    "parse_alertmanager_group",
]

FORMATS = ("alertmanager", "grafana", "pagerduty", "generic")

_PARSERS: dict[str, Callable[[Any], list[Alert]]] = {
    "alertmanager": alertmanager.parse,
    "grafana": grafana.parse,
    "pagerduty": pagerduty.parse,
    "generic": generic.parse,
}

parse_alertmanager_group = alertmanager.parse_group


def parse(fmt: str, payload: Any) -> list[Alert]:
    """The alerts in ``payload`` (already decoded JSON) read as format ``fmt``."""
    parser = _PARSERS.get(fmt) if isinstance(fmt, str) else None
    if parser is None:
        raise InvalidPayload("format", f"unknown format; expected one of {', '.join(FORMATS)}")
    return parser(payload)


def decode(body: bytes | bytearray | memoryview | str) -> Any:
    """The JSON value in ``body``; InvalidPayload(field="body") if it is not UTF-8 JSON."""
    try:
        return orjson.loads(body)
    except orjson.JSONDecodeError as exc:
        raise InvalidPayload("body", f"not valid JSON: {exc}") from None


def detect(payload: Any) -> str | None:
    """The format ``payload`` most likely is, judged by its shape; None if none fits."""
    if not isinstance(payload, dict):
        return None
    if "event_action" in payload and "routing_key" in payload:
        return "pagerduty"
    alerts = payload.get("alerts")
    if isinstance(alerts, list):
        first = alerts[0] if alerts and isinstance(alerts[0], dict) else {}
        if "key" in first and "fingerprint" not in first:
            return "generic"
        if payload.get("version") == "4":
            return "alertmanager"
        if any(name in payload for name in ("orgId", "state", "title")):
            return "grafana"
        if "labels" in first or "fingerprint" in first:
            return "alertmanager"
        return None
    if "key" in payload and ("status" in payload or "summary" in payload):
        return "generic"
    return None
