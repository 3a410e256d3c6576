"""Incident operations in the bridge's words, spoken to either ITSM API generation.

``build_client(settings, redis)`` returns the client for ``settings.itsm_flavor``:
Gen A (``itsm``, the 2018 ``/api/v1/incident`` API) or Gen B (``serviceops``,
``/api/v1/request``). Both raise only the ``bridge.itsm.errors`` tree.

Create the client after fork (callers build it lazily in each worker process):
it holds HTTP connections, which must never be shared between processes. Each
thread gets its own ``requests.Session`` (thread safety of one shared Session is
not documented), so the client may be used from any number of threads.
"""

from __future__ import annotations

import html
import os
import threading
import time
from collections.abc import Callable
from datetime import UTC, datetime
from typing import Any

import requests
import structlog

from bridge.itsm.auth import Credentials, OnRequest, build_auth
from bridge.itsm.errors import (
    AuthError,
    NotSupported,
    PermanentError,
    error_for_exception,
    error_for_status,
    parse_retry_after,
    server_message,
)
from bridge.itsm.guard import Guard
from bridge.itsm.model import Impact, Incident, IncidentDraft, IncidentRef, Priority
from bridge.itsm.sessions import new_session, tls_verify

log = structlog.get_logger(__name__)

KEY_TAG_PREFIX = "bridge-key:"
SEARCH_PAGE_SIZE = 50
# Pages read at most by one search: a key has a handful of incidents, not thousands.
_SEARCH_MAX_PAGES = 20
# Gen A keeps notes in the description; past this size the oldest notes are elided.
_GEN_A_DESCRIPTION_MAX = 60_000

_A_PRIORITY = {p: p.value for p in Priority}  # LOW, MEDIUM, HIGH, URGENT
_A_IMPACT = {
    Impact.LOW: "LOW",
    Impact.ON_USER: "ONUSER",
    Impact.ON_DEPARTMENT: "ONDEPARTMENT",
    Impact.ON_BUSINESS: "ONBUSINESS",
}
_B_PRIORITY = {
    Priority.LOW: "Low",
    Priority.MEDIUM: "Medium",
    Priority.HIGH: "High",
    Priority.URGENT: "Urgent",
}
_B_IMPACT = {
    Impact.LOW: "Low",
    Impact.ON_USER: "On User",
    Impact.ON_DEPARTMENT: "On Department",
    Impact.ON_BUSINESS: "On Business",
}


# What every call sends besides its token: requests' defaults, JSON answers asked for.
_HEADERS = {**requests.utils.default_headers(), "Accept": "application/json"}

# _send's answer when a first 401 was answered by dropping the token: send once more.
_SEND_AGAIN = object()


def key_tag(key: str) -> str:
    """The tag that marks an incident as the one for alert key ``key``."""
    return KEY_TAG_PREFIX + key


def _priority_from(value: Any) -> Priority | None:
    if not isinstance(value, str):
        return None
    try:
        return Priority(value.strip().upper())
    except ValueError:
        return None


class IncidentClient:
    """One ITSM, one flavour. Subclasses fill in the paths and field names."""

    flavor: str = ""
    can_search: bool = False

    def __init__(
        self,
        settings: Any,
        auth: Credentials,
        *,
        on_request: OnRequest | None = None,
        clock: Callable[[], float] = time.time,
        guard: Guard | None = None,
    ) -> None:
        self._settings = settings
        self.guard = guard
        self._base = settings.itsm_url.rstrip("/")
        self._auth = auth
        self._timeout = (settings.itsm_connect_timeout_s, settings.itsm_read_timeout_s)
        self._verify = tls_verify(settings)
        self._pool_size = settings.itsm_pool_size
        self._on_request = on_request
        self._clock = clock
        self._local = threading.local()
        self._sessions: list[requests.Session] = []
        self._sessions_lock = threading.Lock()
        self._pid = os.getpid()

    def __repr__(self) -> str:
        return f"{type(self).__name__}(url={self._base!r})"

    # ------------------------------------------------------------ operations

    def create(self, draft: IncidentDraft, key: str) -> IncidentRef:
        """Create the incident, tagged with ``key_tag(key)``."""
        raise NotImplementedError

    def get(self, ref: IncidentRef) -> Incident:
        raise NotImplementedError

    def update(
        self,
        ref: IncidentRef,
        *,
        priority: Priority | None = None,
        urgency: Priority | None = None,
        subject: str | None = None,
        description: str | None = None,
    ) -> None:
        raise NotImplementedError

    def set_status(self, ref: IncidentRef, status: str) -> None:
        raise NotImplementedError

    def resolve(self, ref: IncidentRef) -> None:
        self.set_status(ref, self._settings.itsm_resolved_status)

    def reopen(self, ref: IncidentRef) -> None:
        self.set_status(ref, self._settings.itsm_reopen_status)

    def add_note(self, ref: IncidentRef, text: str) -> None:
        raise NotImplementedError

    def find_by_key(self, key: str) -> list[Incident]:
        """Incidents tagged with ``key_tag(key)``; NotSupported where ``can_search`` is False."""
        raise NotSupported(
            f"the {self.flavor} API has no search: incidents cannot be found by key",
            operation="search",
        )

    def delete(self, ref: IncidentRef) -> None:
        raise NotSupported(f"the {self.flavor} API has no delete", operation="delete")

    def close(self) -> None:
        """Close every connection of every thread and the credentials' own."""
        with self._sessions_lock:
            sessions, self._sessions = self._sessions, []
        for session in sessions:
            session.close()
        self._local = threading.local()
        self._auth.close()

    # ------------------------------------------------------------ HTTP

    def _session(self) -> requests.Session:
        if os.getpid() != self._pid:
            # Inherited through fork: never reuse the parent's sockets.
            self._pid = os.getpid()
            self._local = threading.local()
            with self._sessions_lock:
                self._sessions = []
        session: requests.Session | None = getattr(self._local, "session", None)
        if session is None:
            session = new_session(self._base, self._verify, self._pool_size)
            self._local.session = session
            with self._sessions_lock:
                self._sessions.append(session)
        return session

    def _call(
        self,
        operation: str,
        method: str,
        path: str,
        *,
        body: Any = None,
        params: dict[str, Any] | None = None,
        creates: bool = False,
    ) -> Any:
        """One API call; the parsed JSON answer (None when empty) or an ItsmError.

        A 401 drops the token that failed and the call is sent once more with a
        fresh one; a second 401 is an AuthError (the credentials themselves are bad).
        Each attempt passes the shared guard (rate limit, circuit breaker) first.
        """
        url = self._base + path
        for attempt in (1, 2):
            permit = self.guard.acquire(operation) if self.guard is not None else None
            try:
                answer = self._send(attempt, operation, method, url, body, params, creates)
            except BaseException as exc:
                if self.guard is not None and permit is not None:
                    self.guard.record(permit, exc)
                raise
            if self.guard is not None and permit is not None:
                self.guard.record(permit, None)
            if answer is _SEND_AGAIN:
                continue
            return answer
        raise AssertionError("unreachable")  # pragma: no cover

    def _send(
        self,
        attempt: int,
        operation: str,
        method: str,
        url: str,
        body: Any,
        params: dict[str, Any] | None,
        creates: bool,
    ) -> Any:
        """One request; the parsed answer, ``_SEND_AGAIN`` after a first 401, or an ItsmError."""
        authorization = self._auth.authorization()
        started = time.monotonic()
        status: int | None = None
        try:
            session = self._session()
            # Prepared here and sent with Session.send, not Session.request: that one
            # merges the session's headers, settings and hooks into every call, a sixth
            # of the client's CPU per call. The headers are the ones it would send.
            request = requests.PreparedRequest()
            request.prepare(
                method=method,
                url=url,
                headers={**_HEADERS, "Authorization": authorization},
                params=params,
                json=body,
                cookies=session.cookies,
            )
            response = session.send(request, timeout=self._timeout, allow_redirects=False)
            status = response.status_code
        except requests.RequestException as exc:
            raise error_for_exception(exc, operation=operation, creates=creates) from exc
        finally:
            if self._on_request is not None:
                self._on_request(operation, status, time.monotonic() - started)
        with response:
            if status == 401 and attempt == 1 and self._auth.renewable:
                self._auth.invalidate(authorization)
                log.info("itsm answered 401; retrying once with a new token", op=operation)
                return _SEND_AGAIN
            if not 200 <= response.status_code < 300:
                raise self._status_error(response, operation, creates)
            return self._parse(response, operation, creates)

    def _status_error(
        self, response: requests.Response, operation: str, creates: bool
    ) -> Exception:
        message = server_message(response.text, response.headers.get("Content-Type", ""))
        error = error_for_status(
            response.status_code,
            operation=operation,
            creates=creates,
            server_message=message,
            retry_after=parse_retry_after(response.headers.get("Retry-After")),
        )
        if isinstance(error, AuthError) and not self._auth.renewable:
            return AuthError(
                f"ITSM {operation} failed: HTTP 401: the API key was rejected",
                status=401,
                server_message=message,
                operation=operation,
            )
        return error

    def _parse(self, response: requests.Response, operation: str, creates: bool) -> Any:
        if not response.content.strip():
            return None
        try:
            return response.json()
        except ValueError as exc:
            raise error_for_exception(exc, operation=operation, creates=creates) from None

    def _tags(self, draft: IncidentDraft, key: str) -> list[str]:
        return list(dict.fromkeys([*draft.tags, key_tag(key)]))


class GenAClient(IncidentClient):
    """The 2018 incident API: ``/api/v1/incident``, UPPERCASE enums, wrapper answers.

    It documents no notes, search or delete: notes are appended to the description
    (read, then write), ``find_by_key`` and ``delete`` raise NotSupported.
    """

    flavor = "itsm"
    can_search = False

    def create(self, draft: IncidentDraft, key: str) -> IncidentRef:
        body: dict[str, Any] = {
            "subject": draft.subject,
            "description": draft.description,
            "categoryName": draft.category,
            "requesterEmail": draft.requester_email,
            "tags": self._tags(draft, key),
            "impact": _A_IMPACT[draft.impact],
            "priority": _A_PRIORITY[draft.priority],
            "urgency": _A_PRIORITY[draft.urgency],
        }
        custom = self._custom_fields(draft.custom_fields, key)
        if custom:
            body["customFieldValueDetails"] = custom
        answer = self._wrapped("create", "POST", "/api/v1/incident", body, creates=True)
        incident_id = answer.get("id")
        if not isinstance(incident_id, int) or isinstance(incident_id, bool):
            # The create went through (SUCCESS) but we cannot name it.
            raise error_for_exception(
                ValueError("create answer without a numeric id"), operation="create", creates=True
            )
        return IncidentRef(incident_id, None)

    def get(self, ref: IncidentRef) -> Incident:
        obj = self._call("get", "GET", f"/api/v1/incident/{ref.id}")
        if not isinstance(obj, dict):
            raise PermanentError("ITSM get answered without an incident", operation="get")
        _raise_for_wrapper(obj, "get")
        created = obj.get("createdTime")
        return Incident(
            ref=ref,  # the Gen A answer carries no id and no display number
            subject=str(obj.get("subject") or ""),
            status=str(obj.get("status") or ""),
            priority=_priority_from(obj.get("priority")),
            urgency=_priority_from(obj.get("urgency")),
            tags=tuple(str(t) for t in obj.get("tags") or ()),
            created_ms=created if isinstance(created, int) else None,
        )

    def update(
        self,
        ref: IncidentRef,
        *,
        priority: Priority | None = None,
        urgency: Priority | None = None,
        subject: str | None = None,
        description: str | None = None,
    ) -> None:
        body: dict[str, Any] = {}
        if priority is not None:
            body["priority"] = _A_PRIORITY[priority]
        if urgency is not None:
            body["urgency"] = _A_PRIORITY[urgency]
        if subject is not None:
            body["subject"] = subject
        if description is not None:
            body["description"] = description
        if body:
            self._wrapped("update", "POST", f"/api/v1/incident/{ref.id}", body)

    def set_status(self, ref: IncidentRef, status: str) -> None:
        self._wrapped("update", "POST", f"/api/v1/incident/{ref.id}", {"status": status})

    def add_note(self, ref: IncidentRef, text: str) -> None:
        """Append a dated note block to the description (Gen A has no notes).

        Read-modify-write: two notes on one incident at the same moment could lose
        one; the pipeline serialises actions per alert key, hence per incident.
        """
        obj = self._call("get", "GET", f"/api/v1/incident/{ref.id}")
        _raise_for_wrapper(obj if isinstance(obj, dict) else {}, "get")
        current = str((obj or {}).get("description") or "")
        stamp = datetime.fromtimestamp(self._clock(), UTC).strftime("%Y-%m-%d %H:%M UTC")
        block = f"--- Note {stamp} ---\n{text.strip()}"
        description = f"{current.rstrip()}\n\n{block}" if current.strip() else block
        self._wrapped(
            "note",
            "POST",
            f"/api/v1/incident/{ref.id}",
            {"description": _elide(description, _GEN_A_DESCRIPTION_MAX)},
        )

    def _wrapped(
        self, operation: str, method: str, path: str, body: Any, *, creates: bool = False
    ) -> dict[str, Any]:
        answer = self._call(operation, method, path, body=body, creates=creates)
        if not isinstance(answer, dict):
            raise error_for_exception(
                ValueError("answer is not the documented wrapper"),
                operation=operation,
                creates=creates,
            )
        _raise_for_wrapper(answer, operation)
        return answer

    def _custom_fields(self, fields: dict[str, str], key: str) -> dict[str, Any]:
        # Gen A keys custom fields by numeric id: labels cannot be sent, so they are skipped.
        wanted = dict(fields)
        if self._settings.itsm_key_custom_field:
            wanted[self._settings.itsm_key_custom_field] = key
        custom: dict[str, Any] = {}
        for name, value in wanted.items():
            if str(name).isdigit():
                custom[str(name)] = {"type": 1, "stringValue": value}  # 1 = STRING
            else:
                log.debug("custom field skipped: Gen A needs a numeric field id", field=name)
        return custom


class GenBClient(IncidentClient):
    """The ServiceOps request API: ``/api/v1/request``, Title-case names, full objects."""

    flavor = "serviceops"
    can_search = True

    def create(self, draft: IncidentDraft, key: str) -> IncidentRef:
        body: dict[str, Any] = {
            "subject": draft.subject,
            "description": draft.description,
            "categoryName": draft.category,
            "requesterEmail": draft.requester_email,
            "tags": self._tags(draft, key),
            "impactName": _B_IMPACT[draft.impact],
            "priorityName": _B_PRIORITY[draft.priority],
            "urgencyName": _B_PRIORITY[draft.urgency],
        }
        if draft.technician_group:
            body["technicianGroupName"] = draft.technician_group
        custom = dict(draft.custom_fields)
        if self._settings.itsm_key_custom_field:
            custom[self._settings.itsm_key_custom_field] = key
        if custom:
            body["customField"] = custom
        obj = self._call("create", "POST", "/api/v1/request", body=body, creates=True)
        incident_id = obj.get("id") if isinstance(obj, dict) else None
        if not isinstance(incident_id, int) or isinstance(incident_id, bool):
            raise error_for_exception(
                ValueError("create answer without a numeric id"), operation="create", creates=True
            )
        name = obj.get("name")
        return IncidentRef(incident_id, name if isinstance(name, str) and name else None)

    def get(self, ref: IncidentRef) -> Incident:
        obj = self._call("get", "GET", f"/api/v1/request/{ref.id}")
        if not isinstance(obj, dict):
            raise PermanentError("ITSM get answered without a request object", operation="get")
        return _b_incident(obj, ref)

    def update(
        self,
        ref: IncidentRef,
        *,
        priority: Priority | None = None,
        urgency: Priority | None = None,
        subject: str | None = None,
        description: str | None = None,
    ) -> None:
        body: dict[str, Any] = {}
        if priority is not None:
            body["priorityName"] = _B_PRIORITY[priority]
        if urgency is not None:
            body["urgencyName"] = _B_PRIORITY[urgency]
        if subject is not None:
            body["subject"] = subject
        if description is not None:
            body["description"] = description
        if body:
            self._call("update", "PATCH", f"/api/v1/request/{ref.id}", body=body)

    def set_status(self, ref: IncidentRef, status: str) -> None:
        self._call("update", "PATCH", f"/api/v1/request/{ref.id}", body={"statusName": status})

    def add_note(self, ref: IncidentRef, text: str) -> None:
        # ``details`` is HTML: escape the text and keep its line breaks.
        details = html.escape(text.strip(), quote=False).replace("\n", "<br>")
        self._call(
            "note",
            "POST",
            f"/api/v1/request/{ref.id}/conversation",
            body={
                "conversationType": "note",
                "details": details,
                "conversationState": "published",
            },
        )

    def find_by_key(self, key: str) -> list[Incident]:
        """Every request whose tags include ``key_tag(key)``, oldest first."""
        tag = key_tag(key)
        body = {
            "qualDetails": {
                "type": "FlatQualificationRest",
                "quals": [
                    {
                        "type": "RelationalQualificationRest",
                        "leftOperand": {"type": "PropertyOperandRest", "key": "request.tags"},
                        "operator": "in",
                        "rightOperand": {
                            "type": "ValueOperandRest",
                            "value": {"type": "ListStringValueRest", "value": [tag]},
                        },
                    }
                ],
            }
        }
        found: list[Incident] = []
        for page in range(_SEARCH_MAX_PAGES):
            params = {"offset": page * SEARCH_PAGE_SIZE, "size": SEARCH_PAGE_SIZE}
            answer = self._call(
                "search",
                "POST",
                "/api/v1/request/search/byqual",
                body=body,
                params={**params, "sort_by": "createdTime"},
            )
            objects = answer.get("objectList") if isinstance(answer, dict) else None
            if not isinstance(objects, list):
                raise PermanentError("ITSM search answered without objectList", operation="search")
            for obj in objects:
                # The qualification is inferred: trust only records that carry the tag.
                if isinstance(obj, dict) and tag in (obj.get("tags") or ()):
                    incident_id = obj.get("id")
                    if isinstance(incident_id, int):
                        found.append(_b_incident(obj, IncidentRef(incident_id)))
            total = answer.get("totalCount")
            seen = (page + 1) * SEARCH_PAGE_SIZE
            if len(objects) < SEARCH_PAGE_SIZE or not isinstance(total, int) or seen >= total:
                break
        return found

    def delete(self, ref: IncidentRef) -> None:
        self._call("delete", "DELETE", f"/api/v1/request/{ref.id}")


def _b_incident(obj: dict[str, Any], ref: IncidentRef) -> Incident:
    incident_id = obj.get("id")
    name = obj.get("name")
    created = obj.get("createdTime")
    return Incident(
        ref=IncidentRef(
            incident_id if isinstance(incident_id, int) else ref.id,
            name if isinstance(name, str) and name else ref.display,
        ),
        subject=str(obj.get("subject") or ""),
        status=str(obj.get("statusName") or ""),
        priority=_priority_from(obj.get("priorityName")),
        urgency=_priority_from(obj.get("urgencyName")),
        tags=tuple(str(t) for t in obj.get("tags") or ()),
        created_ms=int(created) if isinstance(created, int | float) and created else None,
    )


def _raise_for_wrapper(answer: dict[str, Any], operation: str) -> None:
    """A Gen A 200 whose ``returnCode`` is not SUCCESS is a refusal."""
    code = answer.get("returnCode")
    if code is None or code == "SUCCESS":
        return
    message = server_message(str(answer.get("userMessage") or code))
    raise PermanentError(
        f"ITSM {operation} refused: {message}",
        status=200,
        server_message=message,
        operation=operation,
    )


def _elide(text: str, limit: int) -> str:
    if len(text) <= limit:
        return text
    marker = "\n\n[… earlier notes elided …]\n\n"
    head = limit // 3
    return text[:head] + marker + text[-(limit - head - len(marker)) :]


def build_client(
    settings: Any,
    redis: Any,
    *,
    on_request: OnRequest | None = None,
    clock: Callable[[], float] = time.time,
) -> IncidentClient:
    """The incident client for ``settings.itsm_flavor``; call it after fork."""
    verify = tls_verify(settings)
    if verify is False and settings.itsm_url.startswith("https"):
        # Never silent: every process that talks to the ITSM says so once.
        log.warning(
            "ITSM TLS verification is off (itsm_verify_tls = false): "
            "anyone on the path can read the credentials",
            itsm_url=settings.itsm_url,
        )
    session = new_session(settings.itsm_url, verify)
    auth = build_auth(settings, redis, session, on_request=on_request)
    cls: type[IncidentClient] = GenBClient if settings.itsm_flavor == "serviceops" else GenAClient
    guard = Guard.from_settings(settings, redis)
    return cls(settings, auth, on_request=on_request, clock=clock, guard=guard)


__all__ = ["GenAClient", "GenBClient", "IncidentClient", "build_client", "key_tag"]
