"""The one error every source parser raises, and the small field checks that raise it.

Field paths look like ``alerts[3].labels.team`` or ``payload.summary``; the root of
the request is ``body``. Messages name the JSON type or a short excerpt of the
offending value, never the payload, so they are safe to log and to send back.
"""

from __future__ import annotations

import hashlib
import re
from datetime import UTC, datetime
from typing import Any

ROOT = "body"
_EXCERPT_CHARS = 40
_PLAIN_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]*\Z")
_ZERO_TIME_PREFIX = "0001-01-01T00:00:00"


class InvalidPayload(Exception):
    """The payload can never be parsed; ``field`` says where, ``message`` says why."""

    def __init__(self, field: str, message: str) -> None:
        # Both go to args so the exception survives pickling (Celery results, DLQ).
        super().__init__(field, message)
        self.field = field
        self.message = message

    def __str__(self) -> str:
        return f"{self.field}: {self.message}"


def member(path: str, name: str) -> str:
    """The path of ``name`` inside the object at ``path`` (``labels.team``, ``labels["a b"]``)."""
    if _PLAIN_NAME.match(name):
        return f"{path}.{name}" if path else name
    quoted = '"' + excerpt(name).replace("\\", "\\\\").replace('"', '\\"') + '"'
    return f"{path}[{quoted}]"


def excerpt(text: str) -> str:
    """At most a few dozen characters of ``text``, for messages."""
    return text if len(text) <= _EXCERPT_CHARS else text[:_EXCERPT_CHARS] + "…"


def type_name(value: Any) -> str:
    """The JSON name of a decoded value's type."""
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "boolean"
    if isinstance(value, int | float):
        return "number"
    if isinstance(value, str):
        return "string"
    if isinstance(value, list | tuple):
        return "array"
    if isinstance(value, dict):
        return "object"
    return type(value).__name__


def expect_object(value: Any, field: str) -> dict[str, Any]:
    if type(value) is not dict:
        raise InvalidPayload(field, f"expected an object, got {type_name(value)}")
    return value


def expect_list(value: Any, field: str) -> list[Any]:
    if type(value) is not list:
        raise InvalidPayload(field, f"expected an array, got {type_name(value)}")
    return value


def required_str(obj: dict[str, Any], name: str, path: str, *, max_chars: int = 0) -> str:
    """A non-empty string member; ``max_chars`` > 0 caps its length."""
    value = obj.get(name)
    if value is None:
        raise InvalidPayload(member(path, name), "is required")
    if type(value) is not str:
        raise InvalidPayload(member(path, name), f"expected a string, got {type_name(value)}")
    if not value.strip():
        raise InvalidPayload(member(path, name), "must not be empty")
    if max_chars and len(value) > max_chars:
        raise InvalidPayload(
            member(path, name), f"{len(value)} characters, at most {max_chars} allowed"
        )
    return value


def optional_str(obj: dict[str, Any], name: str, path: str) -> str:
    """A string member that may be absent or null (then "")."""
    value = obj.get(name)
    if value is None:
        return ""
    if type(value) is not str:
        raise InvalidPayload(member(path, name), f"expected a string, got {type_name(value)}")
    return value


def string_map(value: Any, field: str) -> dict[str, str]:
    """An object of non-empty names to string values (labels, annotations), copied.

    Numbers are not coerced: a sender that puts ``"port": 8080`` in labels gets a
    clear error instead of a label whose value depends on how we printed it.
    """
    if is_string_map(value):
        return dict(value)
    if type(value) is not dict:
        raise InvalidPayload(field, f"expected an object, got {type_name(value)}")
    for name, item in value.items():
        if type(name) is not str or not name:
            raise InvalidPayload(field, "names must be non-empty strings")
        if type(item) is not str:
            raise InvalidPayload(
                member(field, name), f"values must be strings, got {type_name(item)}"
            )
    return dict(value)  # not reached: is_string_map said no


def is_string_map(value: Any) -> bool:
    """True when ``string_map`` accepts ``value`` (checked without naming any field)."""
    if type(value) is not dict:
        return False
    for name, item in value.items():
        if type(name) is not str or not name or type(item) is not str:
            return False
    return True


def optional_string_map(obj: dict[str, Any], name: str, path: str) -> dict[str, str]:
    value = obj.get(name)
    if value is None:
        return {}
    if is_string_map(value):
        return dict(value)  # the field's path is only worked out for an error
    return string_map(value, member(path, name))


def timestamp(value: Any, field: str) -> datetime | None:
    """An RFC 3339 time, or None for null, "" and Go's zero time (``0001-01-01T00:00:00Z``).

    A time without an offset is taken as UTC.
    """
    if value is None or value == "":
        return None
    if type(value) is not str:
        raise InvalidPayload(field, f"expected an RFC 3339 time string, got {type_name(value)}")
    if value.startswith(_ZERO_TIME_PREFIX):
        return None
    try:
        parsed = datetime.fromisoformat(value)
    except ValueError:
        raise InvalidPayload(
            field, f"not an RFC 3339 time: {excerpt(value)!r} (expected e.g. 2026-01-31T12:00:00Z)"
        ) from None
    if parsed.tzinfo is None:
        parsed = parsed.replace(tzinfo=UTC)
    return parsed


def label_fingerprint(labels: dict[str, str]) -> str:
    """A stable 16-hex-digit identity from a label set, for alerts sent without a fingerprint.

    sha256 over the labels sorted by name, each name and value length-prefixed, so
    no choice of names or values can make two different label sets agree. It is not
    Alertmanager's own (FNV-64a) fingerprint; it only has to be stable for us.
    """
    digest = hashlib.sha256()
    for name in sorted(labels):
        for part in (name, labels[name]):
            raw = part.encode("utf-8", "surrogatepass")
            digest.update(b"%d:" % len(raw))
            digest.update(raw)
    return digest.hexdigest()[:16]
