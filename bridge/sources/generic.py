"""The bridge's own format: one alert object, or ``{"alerts": [...]}``.

The contract is the JSON Schema beside this module (``schemas/generic.schema.json``),
checked with a validator compiled once per process; docs/generic-format.md explains
it. Alerts get ``source="generic"`` (a closed set, as metrics need); the sender's
``source`` field is kept as the label ``source`` unless the labels already have one.
"""

from __future__ import annotations

import functools
from collections.abc import Iterable
from importlib import resources
from typing import Any

import orjson
from jsonschema import Draft202012Validator
from jsonschema.exceptions import ValidationError, best_match

from bridge.alert import Alert, Severity, Status
from bridge.sources.errors import ROOT, InvalidPayload, excerpt, member, timestamp, type_name

SOURCE = "generic"
SCHEMA_FILE = "schemas/generic.schema.json"


@functools.cache
def schema() -> dict[str, Any]:
    """The generic format's JSON Schema (draft 2020-12), as stored beside this module."""
    data: dict[str, Any] = orjson.loads(
        resources.files(__package__ or "bridge.sources").joinpath(SCHEMA_FILE).read_bytes()
    )
    return data


@functools.cache
def _validator() -> Draft202012Validator:
    return Draft202012Validator(schema())


def parse(payload: Any) -> list[Alert]:
    """The alerts of one generic payload; raises InvalidPayload naming the field."""
    if not _plainly_valid(payload):
        try:
            error = best_match(_validator().iter_errors(payload))
        except RecursionError:
            raise InvalidPayload(ROOT, "nested too deeply") from None
        if error is not None:
            raise _invalid(error)
    if "alerts" in payload:
        return [_alert(item, f"alerts[{i}]") for i, item in enumerate(payload["alerts"])]
    return [_alert(payload, "")]


def _alert(item: dict[str, Any], path: str) -> Alert:
    key: str = item["key"]
    labels = dict(item.get("labels") or {})
    labels.setdefault("source", item.get("source") or SOURCE)
    return Alert(
        source=SOURCE,
        identity=key,
        status=Status(item["status"]),
        severity=Severity(item.get("severity") or Severity.WARNING),
        summary=item.get("summary") or key,
        description=item.get("description") or "",
        labels=labels,
        annotations=dict(item.get("annotations") or {}),
        starts_at=timestamp(item.get("starts_at"), member(path, "starts_at")),
        ends_at=timestamp(item.get("ends_at"), member(path, "ends_at")),
        links=tuple(dict.fromkeys(item.get("links") or ())),
    )


# A hand-written check of the common, valid case: the schema validator costs ~80 µs
# an alert, this ~2 µs. It may only ever say "valid" when the schema agrees (a
# property test holds it to that); anything it is unsure of goes to the validator,
# which also words the error.
_FIELDS = {
    "source", "key", "status", "severity", "summary", "description",
    "labels", "annotations", "starts_at", "ends_at", "links",
}  # fmt: skip
_STATUSES = frozenset(("firing", "resolved"))
_SEVERITIES = frozenset(("critical", "error", "warning", "info"))
_LIMITS = {"source": (1, 255), "key": (1, 255), "summary": (0, 1024), "description": (0, 65536)}


def _plainly_valid(payload: Any) -> bool:
    if type(payload) is not dict:
        return False
    if "alerts" not in payload:
        return _plain_alert(payload)
    alerts = payload["alerts"]
    return len(payload) == 1 and type(alerts) is list and all(map(_plain_alert, alerts))


def _plain_alert(item: Any) -> bool:
    if type(item) is not dict or not _FIELDS.issuperset(item):
        return False
    status = item.get("status")
    if type(status) is not str or status not in _STATUSES or "key" not in item:
        return False
    for name, (low, high) in _LIMITS.items():
        if name in item:
            value = item[name]
            if type(value) is not str or not low <= len(value) <= high:
                return False
    if "severity" in item:
        severity = item["severity"]
        if type(severity) is not str or severity not in _SEVERITIES:
            return False
    for name in ("labels", "annotations"):
        if name in item and not _plain_map(item[name]):
            return False
    for name in ("starts_at", "ends_at"):
        if name in item and item[name] is not None and type(item[name]) is not str:
            return False
    if "links" in item:
        links = item["links"]
        if type(links) is not list or len(links) > 32:
            return False
        if not all(type(link) is str and 1 <= len(link) <= 2048 for link in links):
            return False
    return True


def _plain_map(value: Any) -> bool:
    if type(value) is not dict:
        return False
    return all(type(k) is str and 1 <= len(k) <= 256 and type(v) is str for k, v in value.items())


def _path(parts: Iterable[Any]) -> str:
    path = ""
    for part in parts:
        path = f"{path}[{part}]" if isinstance(part, int) else member(path, str(part))
    return path


def _invalid(error: ValidationError) -> InvalidPayload:
    """Our message for a schema error: the field it concerns, never the instance itself."""
    path = _path(error.absolute_path)
    # jsonschema types these as possibly unset; on a reported error they are set.
    kind: Any = error.validator
    rule: Any = error.validator_value
    instance: Any = error.instance
    schema: Any = error.schema
    if kind == "required" and isinstance(instance, dict):
        missing = next((name for name in rule if name not in instance), "")
        return InvalidPayload(member(path, missing), "is required")
    if kind == "additionalProperties" and isinstance(instance, dict):
        known = schema.get("properties", {})
        extra = next((name for name in instance if name not in known), "")
        allowed = ", ".join(known)
        return InvalidPayload(
            member(path, str(extra)), f"is not a field of this format (known: {allowed})"
        )
    field = path or ROOT
    if "propertyNames" in error.relative_schema_path:
        return InvalidPayload(field, "names must be 1 to 256 characters")
    if kind == "type":
        wanted = " or ".join(rule) if isinstance(rule, list) else rule
        return InvalidPayload(field, f"expected {wanted}, got {type_name(instance)}")
    if kind == "enum":
        shown = repr(excerpt(instance)) if isinstance(instance, str) else type_name(instance)
        return InvalidPayload(field, f"must be one of {', '.join(rule)}, got {shown}")
    if kind == "minLength":
        return InvalidPayload(field, "must not be empty")
    if kind == "maxLength":
        return InvalidPayload(field, f"{len(instance)} characters, at most {rule} allowed")
    if kind == "maxItems":
        return InvalidPayload(field, f"{len(instance)} items, at most {rule} allowed")
    return InvalidPayload(field, f"does not satisfy the schema rule {kind!r}")
