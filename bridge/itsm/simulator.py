"""A faithful ITSM simulator over real HTTP, for both API generations, with fault injection.

``Simulator("itsm")`` speaks Gen A (the 2018 ``/api/v1/incident`` API),
``Simulator("serviceops")`` speaks Gen B (``/api/v1/request``); both share the
OAuth2 token endpoint. Behaviour follows docs/itsm-api.md; where that page says
"not documented", the choice made here is listed in docs/simulator.md.

The WSGI app is served by waitress in a daemon thread, so it handles concurrent
keep-alive connections. All state sits behind one lock; sleeps (latency, hangs)
happen outside it. ``/_sim/*`` is an unauthenticated admin API exposing the same
observation and fault controls to other processes.
"""

from __future__ import annotations

import base64
import binascii
import contextlib
import copy
import http
import json
import logging
import math
import re
import secrets
import threading
import time
import uuid
from collections.abc import Callable, Collection, Iterable
from dataclasses import dataclass, field, replace
from email import policy
from email.parser import BytesParser
from typing import Any
from urllib.parse import parse_qs

from waitress.server import create_server

__all__ = ["FLAVORS", "OPERATIONS", "Simulator", "serve_forever"]

FLAVORS = ("itsm", "serviceops")
# Operation families accepted by ``fail_next(operations=...)`` and ``hang_next``.
OPERATIONS = ("token", "create", "get", "update", "search", "note", "delete")
# Keys of ``calls()``; every one starts at zero.
_CALL_KEYS = (
    "token_password",
    "token_refresh",
    "create",
    "get",
    "update",
    "search",
    "note",
    "note_search",
    "delete",
    "unknown",
    "unauthorized",
    "injected_fault",
    "hung",
    "total",
)

_FIRST_ID = 60  # numeric ids and display numbers deliberately differ (65 vs INC-46 observed)
_FIRST_DISPLAY = 40
_FIRST_CONVERSATION_ID = 500
_REFRESH_TTL_S = 30 * 24 * 3600.0  # 2018 sample: refresh token lived ~30 days

_GEN_A_IMPACT = ("LOW", "ONUSER", "ONDEPARTMENT", "ONBUSINESS")
_GEN_A_PRIORITY = ("LOW", "MEDIUM", "HIGH", "URGENT")
_GEN_A_STATUS = (
    "Open",
    "In Progress",
    "Pending",
    "Pending on Requester",
    "Pending on Technician",
    "Resolved",
    "Closed",
    "Cancelled",
)
_GEN_A_CUSTOM_TYPES = frozenset({1, 2, 3, 4, 5, 7, 8, 10})
# The doc writes "On department"; the UI label is "On Department". Both map to the label.
_GEN_B_IMPACT = {
    "Low": "Low",
    "On User": "On User",
    "On Department": "On Department",
    "On department": "On Department",
    "On Business": "On Business",
}
_GEN_B_PRIORITY = ("Low", "Medium", "High", "Urgent")
_GEN_B_STATUS = ("Open", "In Progress", "Pending", "Resolved", "Closed", "Cancelled")
_CONVERSATION_TYPES = ("note", "collaborate", "technician_to_requester", "requestor_to_technician")

# Gen A GET returns exactly the documented keys: no id, no display number.
_GEN_A_GET_KEYS = (
    "requesterEmail",
    "requesterName",
    "ccEmailSet",
    "subject",
    "description",
    "categoryName",
    "status",
    "impact",
    "priority",
    "urgency",
    "locationName",
    "tags",
    "spam",
    "fileAttachments",
    "customFieldValueDetails",
)


# Keys of a Gen B request object and of a conversation, for qualification and sort keys.
_GEN_B_KEYS = frozenset(
    [
        "id",
        "name",
        "subject",
        "description",
        "categoryName",
        "statusName",
        "impactName",
        "priorityName",
        "urgencyName",
        "requesterName",
        "requesterEmail",
        "createdByName",
        "updatedByName",
        "ccEmailSet",
        "tags",
        "departmentName",
        "locationName",
        "source",
        "spam",
        "supportLevel",
        "assigneeEmail",
        "technicianGroupName",
        "fileAttachments",
        "customField",
        "createdTime",
        "updatedTime",
        "resolvedTime",
        "lastResolvedTime",
        "lastClosedTime",
    ]
)
_CONVERSATION_KEYS = frozenset(
    [
        "id",
        "conversationType",
        "details",
        "createdByName",
        "createdByEmail",
        "createdTime",
        "updatedTime",
        "subject",
        "conversationState",
        "emailIds",
        "ccEmailIds",
        "updatable",
        "deletable",
        "fileAttachments",
    ]
)


# ---------------------------------------------------------------- requests and replies


@dataclass(frozen=True, slots=True)
class _Request:
    method: str
    path: str
    query: dict[str, list[str]]
    authorization: str
    content_type: str
    body: bytes
    args: tuple[str, ...] = ()
    accept: str = ""


@dataclass(slots=True)
class _Reply:
    status: int
    body: bytes
    headers: list[tuple[str, str]] = field(default_factory=list)
    content_type: str = "application/json"
    # Extra counter this reply adds to calls(): "unauthorized" or "injected_fault".
    mark: str | None = None


def _json(status: int, payload: Any, headers: Iterable[tuple[str, str]] = ()) -> _Reply:
    return _Reply(status, json.dumps(payload).encode(), list(headers))


def _html(status: int, text: str | None = None) -> _Reply:
    phrase = _phrase(status)
    body = text if text is not None else f"<html><body><h1>{status} {phrase}</h1></body></html>"
    return _Reply(status, body.encode(), content_type="text/html")


def _phrase(status: int) -> str:
    try:
        return http.HTTPStatus(status).phrase
    except ValueError:
        return "Unknown"


class _BadRequest(Exception):
    """A validation failure; the message names the field at fault."""


def _now_ms() -> int:
    return int(time.time() * 1000)


def _formatted_time() -> str:
    # Conversation timestamps are display strings, e.g. "Wed, Jul 16, 2025 04:33 pm".
    text = time.strftime("%a, %b %d, %Y %I:%M %p", time.localtime())
    return text[:-2] + text[-2:].lower()


# ---------------------------------------------------------------- field validation

_Check = Callable[[Any], str | None]  # returns what is wrong, or None


def _string(value: Any) -> str | None:
    return None if isinstance(value, str) else "must be a string"


def _non_empty_string(value: Any) -> str | None:
    if not isinstance(value, str):
        return "must be a string"
    return None if value.strip() else "must not be empty"


def _string_list(value: Any) -> str | None:
    if isinstance(value, list) and all(isinstance(item, str) for item in value):
        return None
    return "must be an array of strings"


def _boolean(value: Any) -> str | None:
    return None if isinstance(value, bool) else "must be true or false"


def _object_list(value: Any) -> str | None:
    if isinstance(value, list) and all(isinstance(item, dict) for item in value):
        return None
    return "must be an array of objects"


def _one_of(values: Collection[str]) -> _Check:
    allowed = ", ".join(values)

    def check(value: Any) -> str | None:
        if isinstance(value, str) and value in values:
            return None
        return f"must be one of {allowed} (got {_short(value)})"

    return check


def _gen_a_custom_fields(value: Any) -> str | None:
    if not isinstance(value, dict):
        return "must be an object keyed by custom field id"
    for key, item in value.items():
        if not key.isdigit():
            return f"key {_short(key)} must be a numeric custom field id"
        if not isinstance(item, dict) or item.get("type") not in _GEN_A_CUSTOM_TYPES:
            return f"entry {key} must be an object with a known numeric 'type'"
    return None


def _gen_b_custom_fields(value: Any) -> str | None:
    if not isinstance(value, dict):
        return "must be an object keyed by field label"
    for label, item in value.items():
        if isinstance(item, str | int | float | bool) or item is None:
            continue
        if isinstance(item, list) and all(isinstance(x, str | int | float) for x in item):
            continue
        return f"value of {_short(label)} must be a string, number, boolean or array"
    return None


def _short(value: Any) -> str:
    text = json.dumps(value) if not isinstance(value, str) else f"'{value}'"
    return text if len(text) <= 60 else text[:57] + "..."


_GEN_A_CREATE: dict[str, _Check] = {
    "subject": _non_empty_string,
    "categoryName": _non_empty_string,
    "requesterEmail": _non_empty_string,
    "requesterName": _string,
    "ccEmailSet": _string_list,
    "tags": _string_list,
    "impact": _one_of(_GEN_A_IMPACT),
    "priority": _one_of(_GEN_A_PRIORITY),
    "urgency": _one_of(_GEN_A_PRIORITY),
    "description": _string,
    "locationName": _string,
    "attachmentsRefNames": _string_list,
    "customFieldValueDetails": _gen_a_custom_fields,
}
_GEN_A_UPDATE: dict[str, _Check] = {
    "subject": _non_empty_string,
    "description": _string,
    "categoryName": _non_empty_string,
    "impact": _one_of(_GEN_A_IMPACT),
    "priority": _one_of(_GEN_A_PRIORITY),
    "urgency": _one_of(_GEN_A_PRIORITY),
    "locationName": _string,
    "tags": _string_list,
    "spam": _boolean,
    "status": _one_of(_GEN_A_STATUS),
    "attachmentsRefNames": _string_list,
    "customFieldValueDetails": _gen_a_custom_fields,
}
_GEN_B_FIELDS: dict[str, _Check] = {
    "subject": _non_empty_string,
    "requesterEmail": _non_empty_string,
    "categoryName": _non_empty_string,
    "ccEmailSet": _string_list,
    "tags": _string_list,
    "impactName": _one_of(tuple(_GEN_B_IMPACT)),
    "priorityName": _one_of(_GEN_B_PRIORITY),
    "urgencyName": _one_of(_GEN_B_PRIORITY),
    "statusName": _one_of(_GEN_B_STATUS),
    "departmentName": _string,
    "locationName": _string,
    "supportLevel": _string,
    "spam": _boolean,
    "assigneeEmail": _string,
    "technicianGroupName": _string,
    "source": _string,
    "fileAttachments": _object_list,
    "description": _string,
    "customField": _gen_b_custom_fields,
}
_CONVERSATION_FIELDS: dict[str, _Check] = {
    "conversationType": _string,
    "details": _non_empty_string,
    "subject": _string,
    "conversationState": _string,
    "emailIds": _string_list,
    "ccEmailIds": _string_list,
    "fileAttachments": _object_list,
}


def _validated(payload: Any, fields: dict[str, _Check], required: Iterable[str]) -> dict[str, Any]:
    """The payload's non-null fields, or _BadRequest naming the first field at fault."""
    if not isinstance(payload, dict):
        raise _BadRequest("request body must be a JSON object")
    for name in required:
        if payload.get(name) is None:
            raise _BadRequest(f"{name} is required")
    clean: dict[str, Any] = {}
    for name, value in payload.items():
        check = fields.get(name)
        if check is None:
            raise _BadRequest(f"unknown field {_short(name)}")
        if value is None:
            continue
        problem = check(value)
        if problem:
            raise _BadRequest(f"{name} {problem}")
        clean[name] = value
    return clean


def _parse_json(body: bytes) -> Any:
    if not body.strip():
        raise _BadRequest("request body is required")
    try:
        return json.loads(body)
    except json.JSONDecodeError as exc:
        raise _BadRequest(f"malformed JSON body: {exc.msg}") from None
    except UnicodeDecodeError:
        raise _BadRequest("malformed JSON body: not UTF-8") from None


# ---------------------------------------------------------------- search qualifications


def _compile_qualification(
    qual: Any, known_keys: Collection[str]
) -> Callable[[dict[str, Any]], bool]:
    """A predicate for a ServiceOps ``qualDetails`` tree (flat AND of relational terms)."""
    if qual is None:
        return lambda obj: True
    if not isinstance(qual, dict):
        raise _BadRequest("qualDetails must be an object")
    kind = qual.get("type")
    if kind == "FlatQualificationRest":
        quals = qual.get("quals")
        if not isinstance(quals, list):
            raise _BadRequest("qualDetails.quals must be an array")
        terms = [_compile_qualification(item, known_keys) for item in quals]
        return lambda obj: all(term(obj) for term in terms)
    if kind == "RelationalQualificationRest":
        return _compile_relational(qual, known_keys)
    raise _BadRequest(f"unsupported qualification type {_short(kind)}")


def _compile_relational(
    qual: dict[str, Any], known_keys: Collection[str]
) -> Callable[[dict[str, Any]], bool]:
    left = qual.get("leftOperand")
    if not isinstance(left, dict) or left.get("type") not in (
        "PropertyOperandRest",
        "DbOperandRest",
    ):
        raise _BadRequest("leftOperand must be a PropertyOperandRest or DbOperandRest")
    key = left.get("key")
    if not isinstance(key, str) or not key:
        raise _BadRequest("leftOperand.key is required")
    attribute = re.sub(r"^\.?(request|conversation)\.", "", key).lstrip(".")
    if attribute not in known_keys:
        raise _BadRequest(f"unsupported qualification key {_short(key)}")
    right = qual.get("rightOperand")
    if not isinstance(right, dict) or right.get("type") != "ValueOperandRest":
        raise _BadRequest("rightOperand must be a ValueOperandRest")
    value = _operand_value(right.get("value"))
    operator = qual.get("operator")
    if operator in ("in", "not_in") and not isinstance(value, list):
        raise _BadRequest(f"operator {operator} needs a list value")
    if operator in ("equal", "not_equal") and isinstance(value, list):
        raise _BadRequest(f"operator {operator} needs a single value")
    if operator not in ("equal", "not_equal", "in", "not_in"):
        raise _BadRequest(f"unsupported operator {_short(operator)}")

    # A list-valued field (tags) matches when any of its items is wanted.
    wanted = frozenset(value) if isinstance(value, list) else frozenset((value,))
    positive = operator in ("equal", "in")

    def predicate(obj: dict[str, Any]) -> bool:
        actual = obj[attribute]
        try:
            if isinstance(actual, list):
                hit = any(item in wanted for item in actual)
            else:
                hit = actual in wanted
        except TypeError:  # a nested object (customField) never equals a plain value
            hit = False
        return hit == positive

    return predicate


def _operand_value(value: Any) -> Any:
    if not isinstance(value, dict):
        raise _BadRequest("rightOperand.value must be a typed value object")
    kind, raw = value.get("type"), value.get("value")
    if kind in ("StringValueRest", "EnumValueRest") and isinstance(raw, str):
        return raw
    if kind in ("LongValueRest", "IntegerValueRest") and _is_int(raw):
        return raw
    if kind == "BooleanValueRest" and isinstance(raw, bool):
        return raw
    if kind == "ListStringValueRest" and _string_list(raw) is None:
        return raw
    if kind in ("ListLongValueRest", "ListIntegerValueRest") and (
        isinstance(raw, list) and all(_is_int(x) for x in raw)
    ):
        return raw
    raise _BadRequest(f"unsupported or malformed value type {_short(kind)}")


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


# ---------------------------------------------------------------- request parsing


def _read_body(environ: dict[str, Any]) -> bytes:
    stream = environ["wsgi.input"]
    length = environ.get("CONTENT_LENGTH")
    if length:
        return bytes(stream.read(int(length)))
    return bytes(stream.read())


def _parse_form(content_type: str, body: bytes) -> dict[str, str]:
    """Fields of a multipart/form-data or urlencoded body (the token endpoint takes both)."""
    if content_type.startswith("multipart/form-data"):
        head = f"Content-Type: {content_type}\r\n\r\n".encode()
        message = BytesParser(policy=policy.HTTP).parsebytes(head + body)
        form: dict[str, str] = {}
        if message.is_multipart():
            for part in message.iter_parts():
                name = part.get_param("name", header="content-disposition")
                payload = part.get_payload(decode=True)
                if isinstance(name, str) and isinstance(payload, bytes):
                    form[name] = payload.decode("utf-8", "replace")
        return form
    pairs = parse_qs(body.decode("utf-8", "replace"), keep_blank_values=True)
    return {name: values[0] for name, values in pairs.items()}


def _basic_credentials(header: str) -> tuple[str, str] | None:
    scheme, _, encoded = header.partition(" ")
    if scheme.lower() != "basic":
        return None
    try:
        decoded = base64.b64decode(encoded.strip(), validate=True).decode()
    except (binascii.Error, UnicodeDecodeError):
        return None
    client_id, sep, secret = decoded.partition(":")
    return (client_id, secret) if sep else None


def _family(op: str) -> str:
    """The fault-injection family of an operation counted in calls()."""
    if op.startswith("token"):
        return "token"
    if op == "note_search":
        return "note"
    return op


# ---------------------------------------------------------------- the simulator


@dataclass(slots=True)
class _Token:
    kind: str  # "access" or "refresh"
    expires_at: float  # time.monotonic()


@dataclass(slots=True)
class _FailRule:
    remaining: int
    status: int
    retry_after: str | None
    operations: frozenset[str] | None
    body: str | None


@dataclass(slots=True)
class _HangRule:
    remaining: int
    seconds: float
    operations: frozenset[str] | None


_Handler = Callable[[_Request], _Reply]


class Simulator:
    """An ITSM server ("itsm" = Gen A incident API, "serviceops" = Gen B request API)."""

    def __init__(
        self,
        flavor: str = "itsm",
        *,
        host: str = "127.0.0.1",
        port: int = 0,
        client_id: str = "bridge-client",
        client_secret: str = "bridge-secret",
        username: str = "bridge@example.com",
        password: str = "bridge-password",
        api_key: str | None = None,
        token_ttl_s: float = 7199,
        refresh_ttl_s: float = _REFRESH_TTL_S,
        latency_s: float = 0.0,
        threads: int = 16,
        connection_limit: int = 1000,
    ) -> None:
        if flavor not in FLAVORS:
            raise ValueError(f"flavor must be one of {', '.join(FLAVORS)}, not {flavor!r}")
        self.flavor = flavor
        self.host = host
        self.port = port
        self.url = ""
        self._threads = threads
        self._connection_limit = connection_limit
        self._client_id = client_id
        self._api_key = api_key if flavor == "serviceops" else None
        # What reset() restores.
        self._initial_secrets = (client_secret, password)
        self._initial_timing = (float(token_ttl_s), float(latency_s))
        self._username = username
        self._refresh_ttl_s = refresh_ttl_s
        self._lock = threading.Lock()
        self._stopping = threading.Event()
        self._server: Any = None
        self._thread: threading.Thread | None = None
        self._tokens: dict[str, _Token] = {}
        self._reset_locked()

    # ------------------------------------------------------------ lifecycle

    def start(self) -> str:
        """Serve in a daemon thread; returns the base URL (port 0 picks a free port)."""
        if self._server is not None:
            return self.url
        self._stopping.clear()
        # All workers busy is the normal state under a benchmark; waitress warns on every task.
        logging.getLogger("waitress.queue").setLevel(logging.ERROR)
        self._server = create_server(
            self._wsgi,
            map={},
            host=self.host,
            port=self.port,
            threads=self._threads,
            connection_limit=self._connection_limit,
            asyncore_use_poll=True,
            ident="itsm-simulator",
            expose_tracebacks=False,
        )
        self.port = int(self._server.effective_port)
        self.url = f"http://{self.host}:{self.port}"
        self._thread = threading.Thread(
            target=self._server.run, name=f"itsm-sim-{self.port}", daemon=True
        )
        self._thread.start()
        return self.url

    def stop(self) -> None:
        """Close every connection, stop the worker threads; hanging requests are woken."""
        server, self._server = self._server, None
        if server is None:
            return
        self._stopping.set()
        # Workers first: a finishing worker pulls the trigger, which must still be open.
        server.task_dispatcher.shutdown(cancel_pending=True, timeout=2)

        def close_all() -> None:  # runs in the loop thread; an empty map ends server.run()
            for dispatcher in list(server._map.values()):
                if dispatcher is not server and dispatcher is not server.trigger:
                    dispatcher.handle_close()
            server.close()

        try:
            server.trigger.pull_trigger(close_all)
        except OSError:
            # The wake-up pipe is already gone (seen once after a hung request's client
            # went away): the loop thread cannot be woken, so close from here; its next
            # poll finds an empty map and returns.
            with contextlib.suppress(OSError):
                close_all()
        if self._thread is not None:
            self._thread.join(timeout=5)
            self._thread = None

    def __enter__(self) -> Simulator:
        self.start()
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.stop()

    # ------------------------------------------------------------ fault injection

    def fail_next(
        self,
        n: int,
        status: int,
        *,
        retry_after: str | None = None,
        operations: tuple[str, ...] | None = None,
        body: str | None = None,
    ) -> None:
        """The next n matching calls get ``status`` and are NOT applied (None = any operation)."""
        ops = _operation_set(operations)
        with self._lock:
            self._fail_rules.append(_FailRule(n, status, retry_after, ops, body))

    def commit_then_fail(self, n: int, status: int = 502) -> None:
        """The next n valid creates are stored but answered with ``status`` and an HTML body."""
        with self._lock:
            self._commit_fail.append([n, status])

    def set_latency(self, seconds: float) -> None:
        with self._lock:
            self._latency_s = max(0.0, seconds)

    def hang_next(
        self, n: int, seconds: float, *, operations: tuple[str, ...] | None = None
    ) -> None:
        """The next n matching calls are applied, then answered only after ``seconds``.

        ``operations=None`` means every operation except the token grant, so that a
        client's login does not swallow a hang meant for its create.
        """
        ops = _operation_set(operations) or frozenset(OPERATIONS) - {"token"}
        with self._lock:
            self._hang_rules.append(_HangRule(n, seconds, ops))

    def revoke_tokens(self) -> None:
        """Every issued access and refresh token becomes invalid."""
        with self._lock:
            self._tokens.clear()

    def set_credentials(
        self, *, password: str | None = None, client_secret: str | None = None
    ) -> None:
        """Rotate the user password and/or client secret; issued tokens stay valid."""
        with self._lock:
            if password is not None:
                self._password = password
            if client_secret is not None:
                self._client_secret = client_secret

    def expire_tokens_after(self, seconds: float) -> None:
        """Lifetime of access tokens issued from now on."""
        with self._lock:
            self._token_ttl_s = seconds

    def close_incident(self, incident_id: int, status: str = "Closed") -> None:
        """A person changes the status in the UI (KeyError for an unknown id)."""
        with self._lock:
            record = self._records[incident_id]
            self._set_status(record, status)

    # ------------------------------------------------------------ observation

    def incidents(self) -> list[dict[str, Any]]:
        """Every stored incident, in the flavour's field names, plus id, name, status, notes."""
        with self._lock:
            return [self._observed(record) for record in self._records.values()]

    def calls(self) -> dict[str, int]:
        with self._lock:
            return dict(self._calls)

    def call_log(self) -> list[dict[str, Any]]:
        with self._lock:
            return [dict(entry) for entry in self._log]

    def reset(self) -> None:
        """Forget incidents, counters, log, faults; restore credentials, TTL and latency.

        Issued tokens stay valid, so a long-lived client need not log in again.
        """
        with self._lock:
            self._reset_locked()

    def _reset_locked(self) -> None:
        self._records: dict[int, dict[str, Any]] = {}
        self._next_id = _FIRST_ID
        self._next_display = _FIRST_DISPLAY
        self._next_conversation_id = _FIRST_CONVERSATION_ID
        self._calls: dict[str, int] = dict.fromkeys(_CALL_KEYS, 0)
        self._log: list[dict[str, Any]] = []
        self._fail_rules: list[_FailRule] = []
        self._hang_rules: list[_HangRule] = []
        self._commit_fail: list[list[int]] = []
        self._client_secret, self._password = self._initial_secrets
        self._token_ttl_s, self._latency_s = self._initial_timing

    def _observed(self, record: dict[str, Any]) -> dict[str, Any]:
        observed = copy.deepcopy(record)
        status_key = "status" if self.flavor == "itsm" else "statusName"
        observed["status"] = record[status_key]
        return observed

    # ------------------------------------------------------------ WSGI entry

    def _wsgi(self, environ: dict[str, Any], start_response: Callable[..., Any]) -> list[bytes]:
        arrived = time.monotonic()
        method = environ["REQUEST_METHOD"]
        path = environ.get("PATH_INFO", "") or "/"
        request = _Request(
            method=method,
            path=path,
            query=parse_qs(environ.get("QUERY_STRING", "")),
            authorization=environ.get("HTTP_AUTHORIZATION", ""),
            content_type=environ.get("CONTENT_TYPE", ""),
            body=_read_body(environ),
            accept=environ.get("HTTP_ACCEPT", ""),
        )
        if path == "/_sim" or path.startswith("/_sim/"):
            reply = self._admin(request)
        else:
            reply = self._serve(request, arrived)
        headers = [("Content-Type", reply.content_type), ("Content-Length", str(len(reply.body)))]
        start_response(f"{reply.status} {_phrase(reply.status)}", headers + reply.headers)
        return [reply.body]

    def _serve(self, request: _Request, arrived: float) -> _Reply:
        op, handler, request = self._route(request)
        family = _family(op)
        if op == "token":
            grant = _parse_form(request.content_type, request.body).get("grant_type")
            op = "token_refresh" if grant == "refresh_token" else "token_password"
        # Counted on arrival, so a hanging call is already visible in calls().
        with self._lock:
            latency = self._latency_s
            fail = _take(self._fail_rules, family) if op != "unknown" else None
            hang = _take(self._hang_rules, family) if op != "unknown" and fail is None else None
            self._calls[op] += 1
            self._calls["total"] += 1
            if hang is not None:
                self._calls["hung"] += 1
        if latency > 0:
            self._stopping.wait(latency)
        if fail is not None:
            reply = _html(fail.status, fail.body)
            if fail.body is not None and fail.body.lstrip().startswith(("{", "[")):
                reply.content_type = "application/json"
            if fail.retry_after is not None:
                reply.headers.append(("Retry-After", fail.retry_after))
            reply.mark = "injected_fault"
        elif family == "token":
            reply = handler(request)
        else:
            reply = self._authenticated(request, handler)
        if hang is not None:
            self._stopping.wait(hang.seconds)
        with self._lock:
            if reply.mark:
                self._calls[reply.mark] += 1
            self._log.append(
                {
                    "t": arrived,
                    "op": op,
                    "method": request.method,
                    "path": request.path,
                    "status": reply.status,
                    "accept": request.accept,
                }
            )
        return reply

    def _route(self, request: _Request) -> tuple[str, _Handler, _Request]:
        method, path = request.method, request.path
        if path == "/api/oauth/token":
            return ("token", self._token if method == "POST" else _method_not_allowed, request)
        table = _GEN_A_ROUTES if self.flavor == "itsm" else _GEN_B_ROUTES
        for pattern, methods in table:
            match = pattern.fullmatch(path)
            if match is None:
                continue
            if method not in methods:
                return ("unknown", _method_not_allowed, request)
            op, name = methods[method]
            bound = replace(request, args=match.groups())
            return (op, getattr(self, name), bound)
        return ("unknown", _not_found, request)

    def _authenticated(self, request: _Request, handler: _Handler) -> _Reply:
        scheme, _, credential = request.authorization.partition(" ")
        credential = credential.strip()
        problem: str | None
        if scheme.lower() == "bearer" and credential:
            with self._lock:
                token = self._tokens.get(credential)
                if token is None or token.kind != "access":
                    problem = "Invalid access token"
                elif token.expires_at <= time.monotonic():
                    del self._tokens[credential]
                    problem = "Access token expired"
                else:
                    problem = None
        elif scheme.lower() == "apikey" and self._api_key is not None:
            problem = (
                None if secrets.compare_digest(credential, self._api_key) else "Invalid api key"
            )
        else:
            problem = "Full authentication is required to access this resource"
        if problem is not None:
            reply = _json(
                401,
                {"error": "invalid_token", "error_description": problem},
                [("WWW-Authenticate", 'Bearer error="invalid_token"')],
            )
            reply.mark = "unauthorized"
            return reply
        return handler(request)

    # ------------------------------------------------------------ token endpoint

    def _token(self, request: _Request) -> _Reply:
        client = _basic_credentials(request.authorization)
        form = _parse_form(request.content_type, request.body)
        with self._lock:
            if client is None or client != (self._client_id, self._client_secret):
                return _json(
                    401,
                    {"error": "invalid_client", "error_description": "Bad client credentials"},
                    [("WWW-Authenticate", 'Basic realm="oauth2/client"')],
                )
            grant = form.get("grant_type")
            if not grant:
                return _oauth_error(400, "invalid_request", "Missing grant type")
            if grant == "password":
                for name in ("username", "password"):
                    if not form.get(name):
                        return _oauth_error(400, "invalid_request", f"Missing parameter: {name}")
                if form["username"] != self._username or not secrets.compare_digest(
                    form["password"], self._password
                ):
                    return _oauth_error(400, "invalid_grant", "Bad credentials")
                return _json(200, self._issue_locked())
            if grant == "refresh_token":
                presented = form.get("refresh_token")
                if not presented:
                    return _oauth_error(400, "invalid_request", "Missing parameter: refresh_token")
                token = self._tokens.get(presented)
                if token is None or token.kind != "refresh":
                    return _oauth_error(400, "invalid_grant", "Invalid refresh token")
                if token.expires_at <= time.monotonic():
                    del self._tokens[presented]
                    return _oauth_error(400, "invalid_grant", "Invalid refresh token (expired)")
                return _json(200, self._issue_locked())
            return _oauth_error(400, "unsupported_grant_type", "Unsupported grant type")

    def _issue_locked(self) -> dict[str, Any]:
        ttl = self._token_ttl_s
        scope = "main-web-app-scope" if self.flavor == "itsm" else "other-api-scope"
        access_jti = str(uuid.uuid4())
        access = self._jwt({"exp": int(time.time() + ttl), "jti": access_jti, "scope": [scope]})
        refresh = self._jwt(
            {
                "exp": int(time.time() + self._refresh_ttl_s),
                "jti": str(uuid.uuid4()),
                "ati": access_jti,
                "scope": [scope],
            }
        )
        now = time.monotonic()
        self._tokens[access] = _Token("access", now + ttl)
        self._tokens[refresh] = _Token("refresh", now + self._refresh_ttl_s)
        return {
            "access_token": access,
            "token_type": "bearer",
            "refresh_token": refresh,
            # Rounded up, so a client trusting expires_in meets the server-side expiry first.
            "expires_in": math.ceil(ttl),
            "scope": scope,
            "jti": access_jti,
        }

    def _jwt(self, claims: dict[str, Any]) -> str:
        header = {"alg": "none", "typ": "JWT"}
        payload = {
            "user_name": self._username,
            "authorities": ["USER"],
            "client_id": self._client_id,
            **claims,
        }
        parts = [_b64(json.dumps(part).encode()) for part in (header, payload)]
        return ".".join([*parts, _b64(secrets.token_bytes(16))])

    # ------------------------------------------------------------ Gen A: /api/v1/incident

    def _a_create(self, request: _Request) -> _Reply:
        try:
            fields = _validated(
                _parse_json(request.body),
                _GEN_A_CREATE,
                ("subject", "requesterEmail", "categoryName"),
            )
        except _BadRequest as exc:
            return _a_failure(400, str(exc))
        now = _now_ms()
        with self._lock:
            record: dict[str, Any] = {
                "id": 0,
                "name": "",
                "requesterEmail": fields["requesterEmail"],
                "requesterName": fields.get("requesterName", _person(fields["requesterEmail"])),
                "ccEmailSet": fields.get("ccEmailSet", []),
                "subject": fields["subject"],
                "description": fields.get("description", ""),
                "categoryName": fields["categoryName"],
                "status": "Open",
                "impact": fields.get("impact", "LOW"),
                "priority": fields.get("priority", "LOW"),
                "urgency": fields.get("urgency", "LOW"),
                "locationName": fields.get("locationName"),
                "tags": fields.get("tags", []),
                "spam": False,
                "fileAttachments": None,
                "attachmentsRefNames": fields.get("attachmentsRefNames", []),
                "customFieldValueDetails": fields.get("customFieldValueDetails", {}),
                "createdTime": now,
                "updatedTime": now,
                "notes": [],
            }
            incident_id = self._store_locked(record)
            committed_failure = _take_commit_fail(self._commit_fail)
        if committed_failure is not None:
            return _committed_failure(committed_failure)
        return _json(200, _a_wrapper(incident_id))

    def _a_get(self, request: _Request) -> _Reply:
        with self._lock:
            record = self._a_record(request.args[0])
            if isinstance(record, _Reply):
                return record
            return _json(200, {key: copy.deepcopy(record[key]) for key in _GEN_A_GET_KEYS})

    def _a_update(self, request: _Request) -> _Reply:
        try:
            fields = _validated(_parse_json(request.body), _GEN_A_UPDATE, ())
        except _BadRequest as exc:
            return _a_failure(400, str(exc))
        with self._lock:
            record = self._a_record(request.args[0])
            if isinstance(record, _Reply):
                return record
            status = fields.pop("status", None)
            record.update(copy.deepcopy(fields))
            record["updatedTime"] = _now_ms()
            if status is not None:
                self._set_status(record, status)
            return _json(200, _a_wrapper(record["id"]))

    def _a_record(self, raw_id: str) -> dict[str, Any] | _Reply:
        if not raw_id.isdigit():
            return _a_failure(400, f"id must be numeric (got {_short(raw_id)})")
        record = self._records.get(int(raw_id))
        if record is None:
            return _a_failure(404, f"Incident with id {raw_id} not found")
        return record

    # ------------------------------------------------------------ Gen B: /api/v1/request

    def _b_create(self, request: _Request) -> _Reply:
        try:
            fields = _validated(
                _parse_json(request.body), _GEN_B_FIELDS, ("subject", "requesterEmail")
            )
        except _BadRequest as exc:
            return _b_error(400, str(exc))
        now = _now_ms()
        creator = _person(self._username)
        with self._lock:
            record: dict[str, Any] = {
                "id": 0,
                "name": "",
                "subject": fields["subject"],
                "description": fields.get("description", ""),
                "categoryName": fields.get("categoryName", "Service Request"),
                "statusName": "Open",
                "impactName": _GEN_B_IMPACT[fields.get("impactName", "Low")],
                "priorityName": fields.get("priorityName", "Low"),
                "urgencyName": fields.get("urgencyName", "Low"),
                "requesterName": _person(fields["requesterEmail"]),
                "requesterEmail": fields["requesterEmail"],
                "createdByName": creator,
                "updatedByName": creator,
                "ccEmailSet": fields.get("ccEmailSet", []),
                "tags": fields.get("tags", []),
                "departmentName": fields.get("departmentName", ""),
                "locationName": fields.get("locationName", ""),
                "source": fields.get("source", "External"),
                "spam": fields.get("spam", False),
                "supportLevel": fields.get("supportLevel", "tier0"),
                "assigneeEmail": fields.get("assigneeEmail", ""),
                "technicianGroupName": fields.get("technicianGroupName", ""),
                "fileAttachments": fields.get("fileAttachments", []),
                "customField": fields.get("customField", {}),
                "createdTime": now,
                "updatedTime": now,
                "resolvedTime": 0,
                "lastResolvedTime": 0,
                "lastClosedTime": 0,
                "notes": [],
            }
            self._store_locked(record)
            if "statusName" in fields:
                self._set_status(record, fields["statusName"])
            body = _b_object(record)
            committed_failure = _take_commit_fail(self._commit_fail)
        if committed_failure is not None:
            return _committed_failure(committed_failure)
        return _json(200, body)

    def _b_get(self, request: _Request) -> _Reply:
        with self._lock:
            record = self._b_record(request.args[0])
            if isinstance(record, _Reply):
                return record
            return _json(200, _b_object(record))

    def _b_update(self, request: _Request) -> _Reply:
        try:
            fields = _validated(_parse_json(request.body), _GEN_B_FIELDS, ())
        except _BadRequest as exc:
            return _b_error(400, str(exc))
        if "impactName" in fields:
            fields["impactName"] = _GEN_B_IMPACT[fields["impactName"]]
        with self._lock:
            record = self._b_record(request.args[0])
            if isinstance(record, _Reply):
                return record
            status = fields.pop("statusName", None)
            if "requesterEmail" in fields:
                fields["requesterName"] = _person(fields["requesterEmail"])
            record.update(copy.deepcopy(fields))
            record["updatedTime"] = _now_ms()
            record["updatedByName"] = _person(self._username)
            if status is not None:
                self._set_status(record, status)
            return _json(200, _b_object(record))

    def _b_delete(self, request: _Request) -> _Reply:
        with self._lock:
            record = self._b_record(request.args[0])
            if isinstance(record, _Reply):
                return record
            del self._records[record["id"]]
        return _json(200, {})

    def _b_search(self, request: _Request) -> _Reply:
        try:
            offset = _query_int(request.query, "offset", 0, minimum=0)
            size = _query_int(request.query, "size", 100, minimum=1)
            sort_by = request.query.get("sort_by", ["createdTime"])[0]
            predicate = _compile_qualification(_qual_details(request.body), _GEN_B_KEYS)
            if sort_by not in _GEN_B_KEYS:
                raise _BadRequest(f"sort_by {_short(sort_by)} is not a request field")
            # Filter and sort the stored records in place; copy only the page answered.
            with self._lock:
                matches = [record for record in self._records.values() if predicate(record)]
                matches.sort(key=lambda record: (record[sort_by], record["id"]))
                page = [_b_object(record) for record in matches[offset : offset + size]]
        except TypeError:
            return _b_error(400, f"sort_by {_short(sort_by)} is not a sortable field")
        except _BadRequest as exc:
            return _b_error(400, str(exc))
        return _json(200, {"objectList": page, "totalCount": len(matches)})

    def _b_note(self, request: _Request) -> _Reply:
        try:
            fields = _validated(_parse_json(request.body), _CONVERSATION_FIELDS, ("details",))
            kind = fields.get("conversationType", "note").lower()
            if kind not in _CONVERSATION_TYPES:
                allowed = ", ".join(_CONVERSATION_TYPES)
                raise _BadRequest(f"conversationType must be one of {allowed}")
        except _BadRequest as exc:
            return _b_error(400, str(exc))
        stamp = _formatted_time()
        with self._lock:
            record = self._b_record(request.args[0])
            if isinstance(record, _Reply):
                return record
            conversation = {
                "id": self._next_conversation_id,
                "conversationType": kind,
                "details": fields["details"],
                "createdByName": _person(self._username),
                "createdByEmail": self._username,
                "createdTime": stamp,
                "updatedTime": stamp,
                "subject": fields.get("subject") or f"[{record['name']}]: {record['subject']}",
                "conversationState": fields.get("conversationState", "published"),
                "emailIds": fields.get("emailIds", []),
                "ccEmailIds": fields.get("ccEmailIds", []),
                "updatable": True,
                "deletable": True,
                "fileAttachments": fields.get("fileAttachments", []),
            }
            self._next_conversation_id += 1
            record["notes"].append(conversation)
            return _json(200, copy.deepcopy(conversation))

    def _b_note_update(self, request: _Request) -> _Reply:
        try:
            fields = _validated(_parse_json(request.body), _CONVERSATION_FIELDS, ())
        except _BadRequest as exc:
            return _b_error(400, str(exc))
        with self._lock:
            record = self._b_record(request.args[0])
            if isinstance(record, _Reply):
                return record
            wanted = int(request.args[1])
            for conversation in record["notes"]:
                if conversation["id"] == wanted:
                    conversation.update(copy.deepcopy(fields))
                    conversation["updatedTime"] = _formatted_time()
                    return _json(200, copy.deepcopy(conversation))
        return _b_error(404, f"Conversation with id {wanted} not found", "NOT_FOUND")

    def _b_note_search(self, request: _Request) -> _Reply:
        try:
            predicate = _compile_qualification(_qual_details(request.body), _CONVERSATION_KEYS)
            with self._lock:
                record = self._b_record(request.args[0])
                if isinstance(record, _Reply):
                    return record
                notes = copy.deepcopy(record["notes"])
            matches = [note for note in notes if predicate(note)]
        except _BadRequest as exc:
            return _b_error(400, str(exc))
        return _json(200, {"objectList": matches, "totalCount": len(matches)})

    def _b_record(self, raw_id: str) -> dict[str, Any] | _Reply:
        if not raw_id.isdigit():
            return _b_error(400, f"id must be numeric (got {_short(raw_id)})")
        record = self._records.get(int(raw_id))
        if record is None:
            return _b_error(404, f"Request with id {raw_id} not found", "NOT_FOUND")
        return record

    # ------------------------------------------------------------ shared state changes

    def _store_locked(self, record: dict[str, Any]) -> int:
        incident_id = self._next_id
        record["id"] = incident_id
        record["name"] = f"INC-{self._next_display}"
        self._next_id += 1
        self._next_display += 1
        self._records[incident_id] = record
        return incident_id

    def _set_status(self, record: dict[str, Any], status: str) -> None:
        now = _now_ms()
        record["status" if self.flavor == "itsm" else "statusName"] = status
        record["updatedTime"] = now
        if self.flavor == "serviceops":
            if status == "Resolved":
                record["resolvedTime"] = record["lastResolvedTime"] = now
            elif status == "Closed":
                record["lastClosedTime"] = now

    # ------------------------------------------------------------ admin API

    def _admin(self, request: _Request) -> _Reply:
        route = (request.method, request.path.rstrip("/"))
        if route == ("GET", "/_sim/state"):
            return _json(200, {"incidents": self.incidents(), "calls": self.calls()})
        if route == ("GET", "/_sim/calls"):
            return _json(200, self.calls())
        if route == ("GET", "/_sim/log"):
            return _json(200, self.call_log())
        if route == ("POST", "/_sim/reset"):
            self.reset()
            return _json(200, {"ok": True})
        if route == ("POST", "/_sim/faults"):
            try:
                self._apply_faults(_parse_json(request.body))
            except (_BadRequest, KeyError, TypeError, ValueError) as exc:
                return _json(400, {"error": str(exc)})
            return _json(200, {"ok": True})
        return _json(404, {"error": f"no admin route {request.method} {request.path}"})

    def _apply_faults(self, spec: Any) -> None:
        if not isinstance(spec, dict) or not spec:
            raise _BadRequest("body must be a non-empty JSON object")
        actions: dict[str, Callable[[Any], None]] = {
            "fail_next": lambda v: self.fail_next(
                int(v["n"]),
                int(v["status"]),
                retry_after=None if v.get("retry_after") is None else str(v["retry_after"]),
                operations=tuple(v["operations"]) if v.get("operations") else None,
                body=v.get("body"),
            ),
            "commit_then_fail": lambda v: self.commit_then_fail(
                int(v.get("n", 1)), int(v.get("status", 502))
            ),
            "latency_s": lambda v: self.set_latency(float(v)),
            "hang_next": lambda v: self.hang_next(
                int(v.get("n", 1)),
                float(v["seconds"]),
                operations=tuple(v["operations"]) if v.get("operations") else None,
            ),
            "revoke_tokens": lambda v: self.revoke_tokens() if v else None,
            "credentials": lambda v: self.set_credentials(
                password=v.get("password"), client_secret=v.get("client_secret")
            ),
            "expire_tokens_after": lambda v: self.expire_tokens_after(
                float(v["seconds"] if isinstance(v, dict) else v)
            ),
            "close_incident": lambda v: self.close_incident(
                int(v["id"]), str(v.get("status", "Closed"))
            ),
        }
        unknown = sorted(set(spec) - set(actions))
        if unknown:
            raise _BadRequest(f"unknown fault keys: {', '.join(unknown)}")
        for key, value in spec.items():
            actions[key](value)


# ---------------------------------------------------------------- routing tables

_ID = r"/([^/]+)"
_GEN_A_ROUTES: list[tuple[re.Pattern[str], dict[str, tuple[str, str]]]] = [
    (re.compile(r"/api/v1/incident"), {"POST": ("create", "_a_create")}),
    (
        re.compile(r"/api/v1/incident" + _ID),
        {"GET": ("get", "_a_get"), "POST": ("update", "_a_update")},
    ),
]
_GEN_B_ROUTES: list[tuple[re.Pattern[str], dict[str, tuple[str, str]]]] = [
    (re.compile(r"/api/v1/request"), {"POST": ("create", "_b_create")}),
    (re.compile(r"/api/v1/request/search/byqual"), {"POST": ("search", "_b_search")}),
    (
        re.compile(r"/api/v1/request" + _ID),
        {
            "GET": ("get", "_b_get"),
            "PATCH": ("update", "_b_update"),
            "DELETE": ("delete", "_b_delete"),
        },
    ),
    (re.compile(r"/api/v1/request" + _ID + "/conversation"), {"POST": ("note", "_b_note")}),
    (
        re.compile(r"/api/v1/request" + _ID + r"/conversation/search/byqual"),
        {"POST": ("note_search", "_b_note_search")},
    ),
    (
        re.compile(r"/api/v1/request" + _ID + r"/conversation/(\d+)"),
        {"PATCH": ("note", "_b_note_update")},
    ),
]


# ---------------------------------------------------------------- small pieces


def _operation_set(operations: Iterable[str] | None) -> frozenset[str] | None:
    if operations is None:
        return None
    ops = frozenset(operations)
    unknown = ops - set(OPERATIONS)
    if unknown:
        raise ValueError(f"unknown operations {sorted(unknown)}; known: {', '.join(OPERATIONS)}")
    return ops


def _take(rules: list[Any], family: str) -> Any:
    """Consume one use of the first rule matching ``family`` (caller holds the lock)."""
    for rule in rules:
        if rule.operations is None or family in rule.operations:
            rule.remaining -= 1
            if rule.remaining <= 0:
                rules.remove(rule)
            return rule
    return None


def _take_commit_fail(queue: list[list[int]]) -> int | None:
    if not queue:
        return None
    entry = queue[0]
    entry[0] -= 1
    if entry[0] <= 0:
        queue.pop(0)
    return entry[1]


def _committed_failure(status: int) -> _Reply:
    reply = _html(status)
    reply.mark = "injected_fault"
    return reply


def _a_wrapper(incident_id: int) -> dict[str, Any]:
    return {"returnCode": "SUCCESS", "status": 0, "userMessage": None, "id": incident_id}


def _a_failure(status: int, message: str) -> _Reply:
    return _json(status, {"returnCode": "FAILURE", "status": 1, "userMessage": message, "id": None})


def _b_error(status: int, message: str, code: str = "INVALID_INPUT") -> _Reply:
    return _json(status, {"userMessage": message, "errorCode": code})


def _b_object(record: dict[str, Any]) -> dict[str, Any]:
    return {key: copy.deepcopy(value) for key, value in record.items() if key != "notes"}


def _oauth_error(status: int, error: str, description: str) -> _Reply:
    return _json(status, {"error": error, "error_description": description})


def _method_not_allowed(request: _Request) -> _Reply:
    return _json(
        405,
        {"status": 405, "error": "Method Not Allowed", "path": request.path},
    )


def _not_found(request: _Request) -> _Reply:
    return _json(404, {"status": 404, "error": "Not Found", "path": request.path})


def _qual_details(body: bytes) -> Any:
    payload = _parse_json(body)
    if not isinstance(payload, dict):
        raise _BadRequest("request body must be a JSON object")
    return payload.get("qualDetails")


def _query_int(query: dict[str, list[str]], name: str, default: int, *, minimum: int) -> int:
    raw = query.get(name)
    if not raw:
        return default
    try:
        value = int(raw[0])
    except ValueError:
        raise _BadRequest(f"{name} must be an integer") from None
    if value < minimum:
        raise _BadRequest(f"{name} must be at least {minimum}")
    return value


def _person(email: str) -> str:
    local = email.split("@", 1)[0]
    return " ".join(part.capitalize() for part in re.split(r"[._-]+", local) if part) or email


def _b64(raw: bytes) -> str:
    return base64.urlsafe_b64encode(raw).rstrip(b"=").decode()


def serve_forever(flavor: str, host: str, port: int, **kwargs: Any) -> None:
    """Run a simulator in the foreground until interrupted (``bridge itsm-sim``)."""
    sim = Simulator(flavor, host=host, port=port, **kwargs)
    url = sim.start()
    print(f"ITSM simulator ({flavor}) on {url}; admin API at {url}/_sim/state", flush=True)
    try:
        while sim._thread is not None and sim._thread.is_alive():
            sim._thread.join(timeout=1.0)
    except KeyboardInterrupt:
        pass
    finally:
        sim.stop()
