"""Logging: structlog for everything (stdlib and Celery included), secrets redacted.

Redaction works on values, not only on field names: the configured secrets,
anything that looks like a bearer/basic/Apikey credential, and fields whose
name says secret are replaced wherever they appear in the event.
"""

from __future__ import annotations

import logging
import re
import sys
from collections.abc import Iterable, MutableMapping
from typing import Any

import structlog

REDACTED = "[REDACTED]"
_SECRET_NAMES = re.compile(r"(secret|password|passwd|token|api_?key|authorization)", re.I)
_CREDENTIAL_PATTERNS = re.compile(
    r"(?i)\b(bearer|basic|apikey)\s+[A-Za-z0-9._~+/=%-]{6,}"
    r"|(?i:access_token|refresh_token|client_secret|password)(\"?\s*[:=]\s*\"?)[^\s\"&,}]+"
)


class SecretRedactor:
    """structlog processor that scrubs secret values from every event field."""

    def __init__(self, secrets: Iterable[str] = ()) -> None:
        self._secrets: list[str] = []
        self.set_secrets(secrets)

    def set_secrets(self, secrets: Iterable[str]) -> None:
        # Longest first so a secret containing another is replaced whole.
        self._secrets = sorted({s for s in secrets if s and len(s) >= 4}, key=len, reverse=True)

    def scrub(self, text: str) -> str:
        for secret in self._secrets:
            if secret in text:
                text = text.replace(secret, REDACTED)
        return _CREDENTIAL_PATTERNS.sub(_mask_credential, text)

    def _clean(self, key: str, value: Any) -> Any:
        if isinstance(value, str):
            if _SECRET_NAMES.search(key) and value and not key.endswith(("_id", "_count")):
                return REDACTED
            return self.scrub(value)
        if isinstance(value, dict):
            return {k: self._clean(str(k), v) for k, v in value.items()}
        if isinstance(value, (list, tuple)):
            return type(value)(self._clean(key, v) for v in value)
        if isinstance(value, BaseException):
            return self.scrub(repr(value))
        return value

    def __call__(self, _logger: Any, _name: str, event: MutableMapping[str, Any]) -> Any:
        for key in list(event):
            event[key] = self._clean(key, event[key])
        return event


def _mask_credential(match: re.Match[str]) -> str:
    text = match.group(0)
    if match.group(1):
        return f"{match.group(1)} {REDACTED}"
    sep = match.group(2) or "="
    name = text.split(sep, 1)[0]
    return f"{name}{sep}{REDACTED}"


redactor = SecretRedactor()


def _redact_exception(_logger: Any, _name: str, event: MutableMapping[str, Any]) -> Any:
    if "exception" in event and isinstance(event["exception"], str):
        event["exception"] = redactor.scrub(event["exception"])
    return event


def configure_logging(
    level: str = "INFO", fmt: str = "auto", secrets: Iterable[str] = (), stream: Any = None
) -> None:
    """Route structlog and stdlib logging through one redacting pipeline."""
    redactor.set_secrets(secrets)
    stream = stream or sys.stderr
    use_console = fmt == "console" or (fmt == "auto" and getattr(stream, "isatty", lambda: False)())
    shared: list[Any] = [
        structlog.contextvars.merge_contextvars,
        structlog.stdlib.add_log_level,
        structlog.stdlib.add_logger_name,
        structlog.processors.TimeStamper(fmt="iso", utc=True),
        redactor,
    ]
    renderer: Any = (
        structlog.dev.ConsoleRenderer(colors=True)
        if use_console
        else structlog.processors.JSONRenderer()
    )
    structlog.configure(
        # The level filter first: a line below the level is dropped before the time stamp
        # and the redaction are paid for. Foreign (stdlib) records were filtered already.
        processors=[
            structlog.stdlib.filter_by_level,
            *shared,
            structlog.stdlib.ProcessorFormatter.wrap_for_formatter,
        ],
        logger_factory=structlog.stdlib.LoggerFactory(),
        wrapper_class=structlog.stdlib.BoundLogger,
        cache_logger_on_first_use=False,
    )
    formatter = structlog.stdlib.ProcessorFormatter(
        foreign_pre_chain=shared,
        processors=[
            structlog.stdlib.ProcessorFormatter.remove_processors_meta,
            structlog.processors.format_exc_info,
            _redact_exception,
            renderer,
        ],
    )
    handler = logging.StreamHandler(stream)
    handler.setFormatter(formatter)
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level)
    for noisy in ("urllib3", "waitress", "kombu", "amqp"):
        logging.getLogger(noisy).setLevel(max(logging.WARNING, logging.getLevelName(level)))
