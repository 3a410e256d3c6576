"""The ITSM boundary's one error hierarchy. Callers decide by type, never by text.

Messages never contain credentials or tokens: they carry the operation, the
status and the server's own message (truncated).
"""

from __future__ import annotations


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

    def __reduce__(self):  # keep keyword state through pickling (Celery, multiprocessing)
        return (
            _rebuild,
            (type(self), str(self), self.status, self.server_message, self.retry_after, self.operation),
        )


def _rebuild(cls, message, status, server_message, retry_after, operation):  # type: ignore[no-untyped-def]
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
