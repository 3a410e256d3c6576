"""The ITSM boundary's one error hierarchy. Callers decide by type, never by text.

Messages never contain credentials or tokens: they carry the operation, the
status and the server's own message (truncated).
"""

from __future__ import annotations

import datetime
import email.utils
import json
import re
import time
from collections.abc import Iterable
from typing import Any

import requests
import urllib3

from bridge.logs import REDACTED, redactor


class ItsmError(Exception):
    """Base of every failure talking to the ITSM."""

    reason: str = "itsm_error"

    def __init__(
        self,
        message: str,
        *,
        status: int | None = None,
        server_message: str | None = None,
        retry_after: float | None = None,
        operation: str = "",
    ) -> None:
        super().__init__(message)
        self.status = status
        self.server_message = server_message
        self.retry_after = retry_after
        self.operation = operation

    def __reduce__(self) -> tuple[Any, ...]:
        # Keep the keyword state through pickling (Celery, multiprocessing).
        return (
            _rebuild,
            (
                type(self),
                str(self),
                self.status,
                self.server_message,
                self.retry_after,
                self.operation,
            ),
        )


def _rebuild(
    cls: type[ItsmError],
    message: str,
    status: int | None,
    server_message: str | None,
    retry_after: float | None,
    operation: str,
) -> ItsmError:
    return cls(
        message,
        status=status,
        server_message=server_message,
        retry_after=retry_after,
        operation=operation,
    )


class TransientError(ItsmError):
    """Not applied; safe to retry (connection refused, 408, 429, 5xx before effect)."""

    reason = "itsm_transient"


class AmbiguousError(ItsmError):
    """May or may not have been applied (read timeout, 502/504 on a create)."""

    reason = "itsm_ambiguous"


class PermanentError(ItsmError):
    """Will fail the same way again (400, 403, 404, 409, 422): dead-letter it."""

    reason = "itsm_rejected"


class AuthError(ItsmError):
    """Credentials are wrong or were revoked and a fresh token did not help."""

    reason = "itsm_auth"


class BadClientCredentials(AuthError):
    """The token endpoint rejected the client id or secret (``invalid_client``)."""


class BadUserCredentials(AuthError):
    """The token endpoint rejected the username or password (``invalid_grant``)."""


class NotSupported(PermanentError):
    """This API generation has no such operation (Gen A: search and delete)."""


# ---------------------------------------------------------------- classification
#
# Two total functions turn what ``requests`` gives us into one class of the tree:
# ``error_for_status`` for an HTTP answer, ``error_for_exception`` for a failure
# without one. ``creates`` marks a non-idempotent call (incident create): there, a
# failure after the request may have reached the server is ambiguous, not transient.

MESSAGE_LIMIT = 500

# Statuses that mean "not applied, try again".
_TRANSIENT_STATUSES = frozenset({408, 425, 429, 500, 503})
# A gateway gave up waiting: the backend may have applied the call.
_GATEWAY_STATUSES = frozenset({502, 504})
# The server will never do this, whatever the load.
_PERMANENT_5XX = frozenset({501, 505})

_JWT = re.compile(r"\beyJ[A-Za-z0-9_-]{4,}\.[A-Za-z0-9_-]{4,}\.[A-Za-z0-9_-]*")
_LONG_OPAQUE = re.compile(r"\b[A-Za-z0-9_-]{40,}\b")
_TAGS = re.compile(r"<[^>]{0,300}>")
_SPACE = re.compile(r"\s+")


def scrub(text: str, secrets: Iterable[str] = ()) -> str:
    """``text`` without credentials: known secrets, JWTs, long opaque strings, auth headers."""
    for secret in sorted((s for s in secrets if s and len(s) >= 4), key=len, reverse=True):
        text = text.replace(secret, REDACTED)
    text = _JWT.sub(REDACTED, text)
    text = _LONG_OPAQUE.sub(REDACTED, text)
    return redactor.scrub(text)


def server_message(body: str, content_type: str = "", secrets: Iterable[str] = ()) -> str | None:
    """The server's own words from an error body: ``userMessage``, ``error_description``,
    ``message`` or the text itself; tags stripped, scrubbed, at most 500 characters."""
    text = body.strip()
    if not text:
        return None
    try:
        payload = json.loads(text)
    except ValueError:
        payload = None
    if isinstance(payload, dict):
        for name in ("userMessage", "error_description", "message", "error", "detail"):
            value = payload.get(name)
            if isinstance(value, str) and value.strip():
                text = value
                break
    elif "html" in content_type or text.startswith("<"):
        text = _TAGS.sub(" ", text)
    text = _SPACE.sub(" ", scrub(text, secrets)).strip()
    if len(text) > MESSAGE_LIMIT:
        text = text[: MESSAGE_LIMIT - 1] + "…"
    return text or None


def parse_retry_after(value: str | None, now: float | None = None) -> float | None:
    """Seconds to wait from a ``Retry-After`` header (delta-seconds or an HTTP date).

    Anything unparseable, negative or absent is None: the caller's own backoff applies.
    """
    if value is None:
        return None
    value = value.strip()
    if not value:
        return None
    try:
        seconds = float(value)
    except ValueError:
        pass
    else:
        return seconds if seconds >= 0 and seconds == seconds and seconds != float("inf") else None
    try:
        when = email.utils.parsedate_to_datetime(value)
    except (TypeError, ValueError, IndexError, OverflowError):
        return None
    if when.tzinfo is None:  # RFC 9110 dates are GMT
        when = when.replace(tzinfo=datetime.UTC)
    now = time.time() if now is None else now
    return max(0.0, when.timestamp() - now)


def error_for_status(
    status: int,
    *,
    operation: str,
    creates: bool = False,
    server_message: str | None = None,
    retry_after: float | None = None,
) -> ItsmError:
    """The error for a non-2xx answer. Total: every integer lands on exactly one class.

    401 maps to AuthError: the client renews the token and retries once before it
    gets here, so a 401 reaching this function means fresh credentials failed too.
    """
    cls: type[ItsmError]
    if status == 401:
        cls = AuthError
    elif status in _TRANSIENT_STATUSES:
        cls = TransientError
    elif status in _GATEWAY_STATUSES or (500 <= status <= 599 and status not in _PERMANENT_5XX):
        cls = AmbiguousError if creates else TransientError
    else:  # other 4xx, 501/505, and statuses no API answers with (1xx, 3xx, >= 600)
        cls = PermanentError
    label = f"HTTP {status}"
    if 300 <= status < 400:
        label += " (a redirect: check itsm_url, e.g. http vs https)"
    message = f"ITSM {operation or 'call'} failed: {label}"
    if server_message:
        message += f": {server_message}"
    return cls(
        message,
        status=status,
        server_message=server_message,
        retry_after=retry_after,
        operation=operation,
    )


def error_for_exception(exc: BaseException, *, operation: str, creates: bool = False) -> ItsmError:
    """The error for a call that got no usable answer. Total over exceptions.

    Connect failures never reached the server: transient. Once the request may
    have been sent (read timeout, dropped connection, truncated or unparseable
    body) a create is ambiguous; every other operation is idempotent, so repeating
    it is harmless and the error is transient.
    """
    if isinstance(exc, ItsmError):
        return exc
    after_send = AmbiguousError if creates else TransientError
    cls: type[ItsmError]
    status: int | None = None
    what: str
    if isinstance(exc, requests.HTTPError) and exc.response is not None:
        return error_for_status(
            exc.response.status_code,
            operation=operation,
            creates=creates,
            server_message=server_message(exc.response.text, _content_type(exc.response)),
            retry_after=parse_retry_after(exc.response.headers.get("Retry-After")),
        )
    if isinstance(exc, requests.ConnectTimeout):
        cls, what = TransientError, "connect timeout"
    elif isinstance(exc, requests.ReadTimeout):
        cls, what = after_send, "read timeout (the server may have applied it)"
    elif isinstance(exc, requests.Timeout):
        cls, what = after_send, "timeout"
    elif isinstance(exc, requests.exceptions.SSLError):
        cls, what = TransientError, "TLS failure (certificate or handshake)"
    elif isinstance(exc, requests.exceptions.ProxyError):
        cls, what = TransientError, "proxy failure"
    elif isinstance(exc, requests.ConnectionError):
        if _connection_was_established(exc):
            cls, what = after_send, "connection dropped before the answer"
        else:
            cls, what = TransientError, "cannot connect"
    elif isinstance(
        exc, requests.exceptions.ChunkedEncodingError | requests.exceptions.ContentDecodingError
    ):
        cls, what = after_send, "answer cut off or undecodable"
    elif isinstance(exc, ValueError) and not isinstance(exc, requests.RequestException):
        # json.JSONDecodeError on a 2xx body (a proxy's page, a truncated answer)
        cls, what = after_send, "unreadable answer"
    elif isinstance(exc, requests.exceptions.InvalidJSONError):
        cls, what = after_send, "unreadable answer"
    elif isinstance(
        exc,
        requests.exceptions.InvalidURL
        | requests.exceptions.InvalidSchema
        | requests.exceptions.MissingSchema
        | requests.exceptions.URLRequired
        | requests.exceptions.InvalidHeader
        | requests.exceptions.TooManyRedirects
        | requests.exceptions.UnrewindableBodyError
        | requests.exceptions.StreamConsumedError,
    ):
        cls, what = PermanentError, "invalid request (check itsm_url)"
    elif isinstance(exc, requests.HTTPError):
        cls, what = PermanentError, "HTTP error without an answer"
    elif isinstance(exc, requests.exceptions.RetryError):
        cls, what = TransientError, "retries exhausted"
    elif isinstance(exc, OSError):
        cls, what = after_send, "I/O error"
    else:  # RequestException and anything unforeseen: assume it may have been sent
        cls, what = after_send, "request failed"
    message = f"ITSM {operation or 'call'} failed: {what} ({type(exc).__name__})"
    return cls(message, status=status, operation=operation)


def _connection_was_established(exc: requests.ConnectionError) -> bool:
    """True when the connection broke after the request could have been sent."""
    reason: Any = exc.args[0] if exc.args else None
    reason = getattr(reason, "reason", reason)  # urllib3 MaxRetryError wraps the cause
    if isinstance(reason, urllib3.exceptions.ProtocolError):
        return True
    text = str(reason)
    return "Connection aborted" in text or "RemoteDisconnected" in text


def _content_type(response: requests.Response) -> str:
    return str(response.headers.get("Content-Type", ""))
