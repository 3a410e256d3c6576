"""HTTP ingest: webhooks in, one broker message per request out, the truth in the answer.

Order of a request: route -> authenticate -> content type -> size -> decode -> throttle
-> parse -> limits -> publish -> answer. Everything that can be refused is refused
before the broker sees it; a 202 means the broker confirmed the message (publisher
confirms on RabbitMQ, the LPUSH reply on Redis). While the broker cannot take it the
answer is 503 with ``Retry-After`` (never 429 to Alertmanager, which does not retry
a 429). The server is waitress; ``create_wsgi_app`` takes the publisher and the
readiness check as arguments, so tests drive it against a real broker.
"""

from __future__ import annotations

import contextlib
import hashlib
import hmac
import ipaddress
import logging
import re
import signal
import threading
import time
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from typing import Any

import orjson
import structlog
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Counter, Histogram
from prometheus_client.exposition import generate_latest

from bridge import sources
from bridge.alert import Alert
from bridge.pipeline import envelope
from bridge.settings import Settings, parse_ingest_tokens

log = structlog.get_logger(__name__)

# A publish (connect included) gives up after this long, so a sender never waits
# more than about a second for a 503 while the broker is away.
PUBLISH_TIMEOUT_S = 0.8
# Each readiness check (broker, Redis) gets this long; both together stay under a second.
READY_TIMEOUT_S = 0.45
RETRY_AFTER_S = 5
DEFAULT_THREADS = 8

# endpoint path -> the format its body is parsed as (also the metrics' source label)
ALERT_ENDPOINTS: Mapping[str, str] = {
    "/api/v1/alerts/alertmanager": "alertmanager",
    "/api/v1/alerts/grafana": "grafana",
    "/api/v1/alerts": "generic",
    "/v2/enqueue": "pagerduty",
}
SOURCES = tuple(ALERT_ENDPOINTS.values())
_INFO_ENDPOINTS = {
    "/healthz": "healthz",
    "/readyz": "readyz",
    "/metrics": "metrics",
    "/openapi.json": "openapi",
}
ROUTES: tuple[tuple[str, str], ...] = (
    *(("POST", path) for path in ALERT_ENDPOINTS),
    *(("GET", path) for path in _INFO_ENDPOINTS),
)
# Senders that retry only on 5xx hear 503 when throttled; the others hear 429.
_THROTTLE_STATUS = {"alertmanager": 503, "grafana": 503, "generic": 429, "pagerduty": 429}
REJECT_REASONS = (
    "unauthorized",
    "unsupported_media_type",
    "too_large",
    "invalid_json",
    "invalid_payload",
    "too_many_alerts",
    "label_limits",
    "throttled",
    "broker_unavailable",
    "internal_error",
)
_ALERT_CODES = ("202", "400", "401", "405", "413", "415", "429", "500", "503")

Publisher = Callable[[dict[str, Any]], None]
"""Puts one intake message on the broker; returns once it is confirmed, raises otherwise."""
Readiness = Callable[[], dict[str, str]]
"""Checks the dependencies; maps each one ("broker", "redis") to "ok" or why it is not."""


class BrokerUnavailable(Exception):
    """The broker did not confirm the message in time; the sender should retry."""


@dataclass(frozen=True, slots=True)
class Limits:
    """What one request may carry."""

    max_body_bytes: int = 1024 * 1024
    max_alerts: int = 1000
    max_labels: int = 100
    max_label_name_chars: int = 256
    max_label_value_chars: int = 4096

    @classmethod
    def from_settings(cls, settings: Settings) -> Limits:
        return cls(max_body_bytes=settings.http_max_body_bytes, max_alerts=settings.http_max_alerts)


@dataclass(frozen=True, slots=True)
class RateLimit:
    """A token bucket: ``per_second`` sustained, ``burst`` at once."""

    per_second: float
    burst: float


class _Reject(Exception):
    """A request refused before the broker; carries the answer."""

    def __init__(
        self,
        status: int,
        reason: str,
        message: str,
        field: str | None = None,
        headers: Iterable[tuple[str, str]] = (),
    ) -> None:
        super().__init__(message)
        self.status = status
        self.reason = reason
        self.message = message
        self.field = field
        self.headers = list(headers)


# -- guards -------------------------------------------------------------------------


class _Tokens:
    """Bearer tokens, each optionally bound to one source; compared in constant time."""

    def __init__(self, pairs: list[tuple[str, str | None]]) -> None:
        unknown = sorted({src for _, src in pairs if src is not None and src not in SOURCES})
        if unknown:
            raise ValueError(
                f"[http] ingest_tokens (BRIDGE_INGEST_TOKENS): unknown source {', '.join(unknown)}"
                f" (expected one of {', '.join(SOURCES)})"
            )
        self._pairs = [(tok.encode(), src) for tok, src in pairs]

    @property
    def enabled(self) -> bool:
        return bool(self._pairs)

    def allows(self, presented: str, source: str) -> bool:
        candidate = presented.encode()
        allowed = False
        # No early exit: every configured token is compared, so timing says nothing.
        for token, bound in self._pairs:
            match = hmac.compare_digest(candidate, token)
            allowed |= match and (bound is None or bound == source)
        return allowed


class _Buckets:
    """Per-source token buckets; sources without a limit always pass."""

    def __init__(self, limits: Mapping[str, RateLimit], clock: Callable[[], float]) -> None:
        self._limits = dict(limits)
        self._clock = clock
        self._state = {src: (limit.burst, clock()) for src, limit in self._limits.items()}
        self._lock = threading.Lock()

    def take(self, source: str) -> float:
        """Take one token; 0 when granted, else the seconds until one is available."""
        limit = self._limits.get(source)
        if limit is None:
            return 0.0
        with self._lock:
            tokens, since = self._state[source]
            now = self._clock()
            tokens = min(limit.burst, tokens + (now - since) * limit.per_second)
            if tokens >= 1:
                self._state[source] = (tokens - 1, now)
                return 0.0
            self._state[source] = (tokens, now)
            return (1 - tokens) / limit.per_second


def _bearer(environ: Mapping[str, Any]) -> str | None:
    header = environ.get("HTTP_AUTHORIZATION", "")
    scheme, _, value = header.partition(" ")
    if scheme.lower() != "bearer" or not value.strip():
        return None
    return value.strip()


def _is_json(content_type: str) -> bool:
    media = content_type.split(";", 1)[0].strip().lower()
    return media == "application/json" or (
        media.startswith("application/") and media.endswith("+json")
    )


def _read_body(environ: Mapping[str, Any], limit: int) -> bytes:
    too_large = _Reject(413, "too_large", f"request body exceeds {limit} bytes")
    raw_length = environ.get("CONTENT_LENGTH") or ""
    declared: int | None = None
    if raw_length:
        try:
            declared = int(raw_length)
        except ValueError:
            raise _Reject(
                400, "invalid_json", "Content-Length: not a number of bytes", "Content-Length"
            ) from None
        if declared > limit:
            raise too_large
    stream = environ["wsgi.input"]
    # Read no more than the limit plus one byte, whatever the header claimed.
    remaining = min(declared, limit + 1) if declared is not None else limit + 1
    chunks: list[bytes] = []
    size = 0
    while remaining > 0:
        chunk = stream.read(min(remaining, 64 * 1024))
        if not chunk:
            break
        chunks.append(chunk)
        size += len(chunk)
        remaining -= len(chunk)
    if size > limit:
        raise too_large
    return b"".join(chunks)


_PLAIN_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]*\Z")


def _member(path: str, name: str) -> str:
    """``labels.team``, or ``labels["a b"]`` for names that are not identifiers (as sources do)."""
    if _PLAIN_NAME.match(name):
        return f"{path}.{name}"
    shown = name if len(name) <= 40 else name[:40] + "…"
    return f'{path}["{shown.replace(chr(92), chr(92) * 2).replace(chr(34), chr(92) + chr(34))}"]'


def _labels_field(fmt: str, payload: Any, index: int) -> str:
    """Where the labels of the ``index``-th alert came from in the request."""
    if fmt == "pagerduty":
        return "payload"  # PD labels are payload.source, .component, .group, .class
    if fmt == "generic" and not (isinstance(payload, dict) and "alerts" in payload):
        return "labels"
    return f"alerts[{index}].labels"


def _check_limits(fmt: str, payload: Any, alerts: list[Alert], limits: Limits) -> None:
    if len(alerts) > limits.max_alerts:
        raise _Reject(
            400,
            "too_many_alerts",
            f"alerts: {len(alerts)} alerts in one request, at most {limits.max_alerts} allowed",
            "alerts",
        )
    for index, alert in enumerate(alerts):
        where = _labels_field(fmt, payload, index)
        if len(alert.labels) > limits.max_labels:
            raise _Reject(
                400,
                "label_limits",
                f"{where}: {len(alert.labels)} labels, at most {limits.max_labels} allowed",
                where,
            )
        for name, value in alert.labels.items():
            if len(name) > limits.max_label_name_chars:
                raise _Reject(
                    400,
                    "label_limits",
                    f"{where}: a label name is longer than {limits.max_label_name_chars}"
                    " characters",
                    where,
                )
            if len(str(value)) > limits.max_label_value_chars:
                field = _member(where, name)
                raise _Reject(
                    400,
                    "label_limits",
                    f"{field}: longer than {limits.max_label_value_chars} characters",
                    field,
                )


# -- metrics ------------------------------------------------------------------------


class _IngestMetrics:
    def __init__(self) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        kw: dict[str, Any] = {"registry": self.registry}
        self.received = Counter(
            "bridge_alerts_received_total",
            "Alerts in requests the broker confirmed (answered 202), by source.",
            ["source"],
            **kw,
        )
        self.rejected = Counter(
            "bridge_alerts_rejected_total",
            "Requests refused at the ingest, by source and reason.",
            ["source", "reason"],
            **kw,
        )
        self.requests = Counter(
            "bridge_ingest_requests_total",
            "HTTP requests by endpoint and status code.",
            ["endpoint", "code"],
            **kw,
        )
        self.publish_seconds = Histogram(
            "bridge_ingest_publish_seconds",
            "Time to get a message confirmed by the broker (failures included).",
            buckets=(0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0),
            **kw,
        )
        for source in SOURCES:
            self.received.labels(source)
            for reason in REJECT_REASONS:
                self.rejected.labels(source, reason)
            for code in _ALERT_CODES:
                self.requests.labels(source, code)
        for endpoint in _INFO_ENDPOINTS.values():
            self.requests.labels(endpoint, "200")
        self.requests.labels("readyz", "503")

    def render(self) -> bytes:
        return generate_latest(self.registry)


# -- the WSGI application -----------------------------------------------------------

_Answer = tuple[int, bytes, list[tuple[str, str]]]
_JSON = ("Content-Type", "application/json")
_STATUS_TEXT = {
    200: "OK",
    202: "Accepted",
    400: "Bad Request",
    401: "Unauthorized",
    404: "Not Found",
    405: "Method Not Allowed",
    413: "Content Too Large",
    415: "Unsupported Media Type",
    429: "Too Many Requests",
    500: "Internal Server Error",
    503: "Service Unavailable",
}


def _json(status: int, body: Mapping[str, Any], headers: Iterable[tuple[str, str]] = ()) -> _Answer:
    return status, orjson.dumps(body), [_JSON, *headers]


def _pd_answer(reject: _Reject) -> _Answer:
    """PagerDuty Events v2 shapes for the answers PD defines; ours for the rest."""
    if reject.status == 400:
        return _json(
            400,
            {
                "status": "invalid event",
                "message": "Event object is invalid",
                "errors": [reject.message],
            },
        )
    if reject.status == 429:
        body = {
            "status": "throttle event",
            "message": "Requests for this service are arriving too quickly. Please retry later.",
        }
        return _json(429, body, reject.headers)
    return _generic_answer(reject)


def _generic_answer(reject: _Reject) -> _Answer:
    body: dict[str, Any] = {"error": reject.message}
    if reject.field is not None:
        body["field"] = reject.field
    return _json(reject.status, body, reject.headers)


class IngestApp:
    """The WSGI callable; ``routes`` lists every (method, path) it serves."""

    routes = ROUTES

    def __init__(
        self,
        settings: Settings,
        publisher: Publisher,
        readiness: Readiness,
        *,
        limits: Limits | None = None,
        rate_limits: Mapping[str, RateLimit] | None = None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._publish = publisher
        self._readiness = readiness
        self._limits = limits or Limits.from_settings(settings)
        self._tokens = _Tokens(parse_ingest_tokens(settings.ingest_tokens.get_secret_value()))
        self._grafana_secret = settings.ingest_grafana_hmac_secret.get_secret_value().encode()
        self._buckets = _Buckets(rate_limits or {}, clock)
        self._clock = clock
        self._warnings = (
            ["ITSM TLS verification is off (itsm_verify_tls = false)"]
            if not settings.itsm_verify_tls
            else []
        )
        self.metrics = _IngestMetrics()
        self._openapi: bytes | None = None

    def __call__(self, environ: dict[str, Any], start_response: Callable[..., Any]) -> list[bytes]:
        path = environ.get("PATH_INFO") or "/"
        method = environ.get("REQUEST_METHOD", "GET")
        endpoint = ALERT_ENDPOINTS.get(path) or _INFO_ENDPOINTS.get(path) or "other"
        try:
            status, body, headers = self._dispatch(method, path, endpoint, environ)
        except Exception:
            log.exception("ingest request failed", endpoint=endpoint)
            if endpoint in SOURCES:
                self.metrics.rejected.labels(endpoint, "internal_error").inc()
            status, body, headers = _json(500, {"error": "internal error"})
        self.metrics.requests.labels(endpoint, str(status)).inc()
        headers.append(("Content-Length", str(len(body))))
        start_response(f"{status} {_STATUS_TEXT.get(status, '')}".rstrip(), headers)
        return [body]

    def _dispatch(
        self, method: str, path: str, endpoint: str, environ: Mapping[str, Any]
    ) -> _Answer:
        if endpoint == "other":
            return _json(404, {"error": f"no such endpoint: {path}"})
        expected = "POST" if endpoint in SOURCES else "GET"
        if method != expected:
            return _json(405, {"error": f"{path} accepts {expected} only"}, [("Allow", expected)])
        if endpoint in SOURCES:
            return self._alerts(endpoint, environ)
        if endpoint == "healthz":
            return _json(200, {"status": "ok"})
        if endpoint == "readyz":
            return self._ready()
        if endpoint == "metrics":
            return 200, self.metrics.render(), [("Content-Type", CONTENT_TYPE_LATEST)]
        return 200, self._openapi_document(), [_JSON]

    def _alerts(self, fmt: str, environ: Mapping[str, Any]) -> _Answer:
        answer = _pd_answer if fmt == "pagerduty" else _generic_answer
        try:
            return self._accept(fmt, environ)
        except _Reject as reject:
            self.metrics.rejected.labels(fmt, reject.reason).inc()
            log.info(
                "alerts refused",
                source=fmt,
                reason=reject.reason,
                status=reject.status,
                field=reject.field,
                remote=environ.get("REMOTE_ADDR"),
            )
            return answer(reject)

    def _accept(self, fmt: str, environ: Mapping[str, Any]) -> _Answer:
        token = _bearer(environ)
        # A PagerDuty sender cannot set headers; its routing_key is its token (checked below).
        if self._tokens.enabled and (token is not None or fmt != "pagerduty"):
            self._authenticate(token, fmt)
        if not _is_json(environ.get("CONTENT_TYPE", "")):
            raise _Reject(415, "unsupported_media_type", "Content-Type must be application/json")
        body = _read_body(environ, self._limits.max_body_bytes)
        if fmt == "grafana" and self._grafana_secret:
            _verify_grafana_signature(environ, body, self._grafana_secret, time.time())
        try:
            payload = sources.decode(body)
        except sources.InvalidPayload as exc:
            raise _Reject(400, "invalid_json", str(exc), exc.field) from None
        if self._tokens.enabled and token is None:
            routing_key = payload.get("routing_key") if isinstance(payload, dict) else None
            self._authenticate(routing_key if isinstance(routing_key, str) else None, fmt)
        wait = self._buckets.take(fmt)
        if wait:
            retry_after = str(max(1, round(wait + 0.5)))
            raise _Reject(
                _THROTTLE_STATUS[fmt],
                "throttled",
                "too many requests for this source; retry later",
                headers=[("Retry-After", retry_after)],
            )
        try:
            alerts = sources.parse(fmt, payload)
        except sources.InvalidPayload as exc:
            raise _Reject(400, "invalid_payload", str(exc), exc.field) from None
        _check_limits(fmt, payload, alerts, self._limits)
        if fmt == "pagerduty" and alerts and not payload.get("dedup_key"):
            # The key generated here is the one the sender is told: the worker must use it too.
            payload = {**payload, "dedup_key": alerts[0].identity}
        message = envelope(fmt, payload)
        if alerts:
            self._publish_or_503(fmt, message)
        self.metrics.received.labels(fmt).inc(len(alerts))
        if fmt == "pagerduty":
            dedup_key = alerts[0].identity if alerts else None
            return _json(
                202, {"status": "success", "message": "Event processed", "dedup_key": dedup_key}
            )
        return _json(202, {"status": "accepted", "alerts": len(alerts), "id": message["id"]})

    def _authenticate(self, token: str | None, fmt: str) -> None:
        if token is None or not self._tokens.allows(token, fmt):
            raise _Reject(
                401,
                "unauthorized",
                "missing or invalid bearer token for this endpoint",
                headers=[("WWW-Authenticate", 'Bearer realm="alert-bridge"')],
            )

    def _publish_or_503(self, fmt: str, message: dict[str, Any]) -> None:
        started = self._clock()
        try:
            self._publish(message)
        except Exception as exc:
            log.warning("broker did not take the message", source=fmt, error=type(exc).__name__)
            raise _Reject(
                503,
                "broker_unavailable",
                "the broker is unavailable; retry later",
                headers=[("Retry-After", str(RETRY_AFTER_S))],
            ) from None
        finally:
            self.metrics.publish_seconds.observe(self._clock() - started)

    def _ready(self) -> _Answer:
        checks = self._readiness()
        body: dict[str, Any] = {}
        failing = {name: state for name, state in checks.items() if state != "ok"}
        if failing:
            body["status"] = "unavailable"
            body["reason"] = "; ".join(f"{name}: {state}" for name, state in failing.items())
        else:
            body["status"] = "ready"
        body["checks"] = checks
        if self._warnings:
            body["warnings"] = self._warnings
        if failing:
            return _json(503, body, [("Retry-After", str(RETRY_AFTER_S))])
        return _json(200, body)

    def _openapi_document(self) -> bytes:
        if self._openapi is None:
            from bridge.ingest_openapi import document

            self._openapi = orjson.dumps(document())
        return self._openapi


def create_wsgi_app(
    settings: Settings,
    publisher: Publisher,
    readiness: Readiness,
    **options: Any,
) -> IngestApp:
    """The ingest as a WSGI callable; ``options`` are ``limits``, ``rate_limits``, ``clock``."""
    return IngestApp(settings, publisher, readiness, **options)


# -- broker side --------------------------------------------------------------------


def _bounded_transport_options(url: str, timeout: float) -> dict[str, Any]:
    """Transport options that make connect and publish give up after ``timeout``."""
    options: dict[str, Any] = {"max_retries": 0}  # kombu: no reconnect loop on connect
    if url.startswith(("redis://", "rediss://", "unix://")):
        options |= {
            "socket_connect_timeout": timeout,
            "socket_timeout": timeout,
            "retry_on_timeout": False,
        }
    elif url.startswith(("amqp://", "amqps://", "pyamqp://")):
        options |= {"read_timeout": timeout, "write_timeout": timeout}
    return options


class BrokerPublisher:
    """Publishes intake messages through the Celery app, each wait bounded by ``timeout``.

    One connection per server thread (kombu connections are not thread-safe). After a
    failure, connections opened before it are replaced before use, and while the broker
    is failing only one request at a time tries it; the others get 503 at once instead
    of each waiting out the timeout.
    """

    def __init__(self, celery_app: Any, *, timeout: float = PUBLISH_TIMEOUT_S) -> None:
        self._app = celery_app
        self._timeout = timeout
        self._options = _bounded_transport_options(str(celery_app.conf.broker_url), timeout)
        self._local = threading.local()
        self._lock = threading.Lock()
        self._generation = 0
        self._failing = False
        self._probing = False
        self._connections: list[Any] = []

    def __call__(self, message: dict[str, Any]) -> None:
        if not self._admit():
            raise BrokerUnavailable("the broker is failing and is being probed")
        started = time.monotonic()
        try:
            try:
                self._send(message, fresh=False)
            except Exception:
                # A reused connection may have been closed while idle: one fresh try,
                # if there is time left for it.
                if (
                    not getattr(self._local, "reused", False)
                    or time.monotonic() - started > self._timeout / 2
                ):
                    raise
                self._send(message, fresh=True)
        except Exception as exc:
            self._failed()
            raise BrokerUnavailable(f"{type(exc).__name__}: {exc}") from exc
        self._succeeded()

    def ping(self) -> str:
        """Open a fresh connection to the broker: "ok" or why it failed."""
        conn = self._connect(READY_TIMEOUT_S)
        try:
            conn.ensure_connection(max_retries=0, timeout=READY_TIMEOUT_S)
            if conn.transport.driver_type == "redis":
                conn.default_channel.client.ping()
            return "ok"
        except Exception as exc:
            return f"unreachable ({type(exc).__name__}: {exc})"
        finally:
            conn.release()

    def close(self) -> None:
        with self._lock:
            connections, self._connections = self._connections, []
        for conn in connections:
            # Closing a dead connection may fail; there is nothing left to do then.
            with contextlib.suppress(Exception):
                conn.release()

    def _connect(self, timeout: float) -> Any:
        options = _bounded_transport_options(str(self._app.conf.broker_url), timeout)
        return self._app.connection_for_write(connect_timeout=timeout, transport_options=options)

    def _send(self, message: dict[str, Any], *, fresh: bool) -> None:
        local = self._local
        producer = getattr(local, "producer", None)
        if fresh or producer is None or local.generation != self._generation:
            self._drop_local()
            conn = self._app.connection_for_write(
                connect_timeout=self._timeout, transport_options=self._options
            )
            with self._lock:
                self._connections.append(conn)
                local.generation = self._generation
            local.connection = conn
            local.producer = producer = self._app.amqp.Producer(conn, auto_declare=False)
            local.reused = False
        else:
            local.reused = True
        try:
            self._app.send_task(
                "bridge.intake",
                args=[message],
                producer=producer,
                retry=False,
                confirm_timeout=self._timeout,
            )
        except Exception:
            self._drop_local()
            raise

    def _drop_local(self) -> None:
        conn = getattr(self._local, "connection", None)
        self._local.connection = self._local.producer = None
        if conn is None:
            return
        with self._lock:
            if conn in self._connections:
                self._connections.remove(conn)
        with contextlib.suppress(Exception):  # the connection may already be broken
            conn.release()

    def _admit(self) -> bool:
        with self._lock:
            if not self._failing:
                return True
            if self._probing:
                return False
            self._probing = True
            return True

    def _failed(self) -> None:
        with self._lock:
            self._failing = True
            self._probing = False
            self._generation += 1

    def _succeeded(self) -> None:
        with self._lock:
            self._failing = False
            self._probing = False


def _redis_check(url: str) -> Callable[[], str]:
    if not url:
        return lambda: "ok"
    import redis
    from redis.backoff import NoBackoff
    from redis.retry import Retry

    client = redis.Redis.from_url(
        url,
        socket_connect_timeout=READY_TIMEOUT_S,
        socket_timeout=READY_TIMEOUT_S,
        retry=Retry(NoBackoff(), 0),
    )

    def check() -> str:
        try:
            client.ping()
            return "ok"
        except Exception as exc:
            return f"unreachable ({type(exc).__name__}: {exc})"

    return check


def make_readiness(settings: Settings, publisher: BrokerPublisher) -> Readiness:
    """Readiness = a fresh broker connection and a Redis PING, each bounded."""
    redis_check = _redis_check(settings.redis_url)

    def readiness() -> dict[str, str]:
        return {"broker": publisher.ping(), "redis": redis_check()}

    return readiness


# -- the server ---------------------------------------------------------------------


def _is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


def check_exposure(settings: Settings, *, insecure_no_auth: bool) -> None:
    """Refuse to listen beyond loopback without ingest tokens (unless told to).

    Also refuses tokens bound to a source the ingest does not know.
    """
    has_tokens = _Tokens(parse_ingest_tokens(settings.ingest_tokens.get_secret_value())).enabled
    if has_tokens or insecure_no_auth or _is_loopback(settings.http_host):
        return
    raise ValueError(
        f"refusing to listen on {settings.http_host}:{settings.http_port} without ingest tokens:"
        " set BRIDGE_INGEST_TOKENS ([http] ingest_tokens), listen on 127.0.0.1,"
        " or pass --insecure-no-auth"
    )


class IngestServer:
    """A waitress server running the ingest in a daemon thread."""

    def __init__(self, app: IngestApp, host: str, port: int, *, threads: int, max_body: int):
        from waitress.server import create_server

        self.app = app
        self._server: Any = create_server(
            app,
            host=host,
            port=port,
            threads=threads,
            ident="alert-bridge",
            # waitress buffers the body before the app runs; this caps that buffer, while
            # the app's own check answers 413 with a JSON body for anything in between.
            max_request_body_size=max_body * 4 + 64 * 1024,
            clear_untrusted_proxy_headers=True,
            expose_tracebacks=False,
        )
        self._stopping = threading.Event()
        self._thread: threading.Thread | None = None
        self.on_stop: list[Callable[[], None]] = []

    @property
    def url(self) -> str:
        host = self._server.effective_host
        host = f"[{host}]" if ":" in str(host) else host
        return f"http://{host}:{self._server.effective_port}"

    def start(self) -> IngestServer:
        self._thread = threading.Thread(target=self.run, name="bridge-ingest", daemon=True)
        self._thread.start()
        return self

    def run(self) -> None:
        """Serve until ``stop``; waitress's loop in short slices so stop is prompt."""
        from waitress import wasyncore

        server = self._server
        while not self._stopping.is_set():
            wasyncore.loop(timeout=0.2, map=server._map, count=1, use_poll=True)

    def stop(self) -> None:
        self._stopping.set()
        if self._thread is not None and self._thread is not threading.current_thread():
            self._thread.join(timeout=5)
        server = self._server
        for channel in list(server._map.values()):
            with contextlib.suppress(OSError):
                channel.close()
        server.task_dispatcher.shutdown(cancel_pending=True, timeout=5)
        for callback in self.on_stop:
            callback()


def start_ingest(
    settings: Settings,
    celery_app: Any,
    *,
    insecure_no_auth: bool = False,
    threads: int = DEFAULT_THREADS,
    **options: Any,
) -> IngestServer:
    """Start the ingest in a daemon thread, publishing through ``celery_app``."""
    check_exposure(settings, insecure_no_auth=insecure_no_auth)
    # waitress warns "Task queue depth is N" whenever every thread is busy, which
    # under a burst is every request; the metrics show load better than that noise.
    logging.getLogger("waitress.queue").setLevel(logging.ERROR)
    publisher = BrokerPublisher(celery_app)
    app = create_wsgi_app(settings, publisher, make_readiness(settings, publisher), **options)
    server = IngestServer(
        app,
        settings.http_host,
        settings.http_port,
        threads=threads,
        max_body=settings.http_max_body_bytes,
    )
    server.on_stop.append(publisher.close)
    log.info("ingest listening", url=server.url, auth=app._tokens.enabled)
    return server.start()


def serve(settings: Settings, insecure_no_auth: bool = False) -> None:
    """Run the ingest in the foreground until SIGINT or SIGTERM (``bridge serve``)."""
    check_exposure(settings, insecure_no_auth=insecure_no_auth)
    from workers.app import create_app

    server = start_ingest(settings, create_app(settings), insecure_no_auth=insecure_no_auth)
    stop = threading.Event()
    if threading.current_thread() is threading.main_thread():
        signal.signal(signal.SIGTERM, lambda *_: stop.set())
    try:
        while not stop.wait(1.0):
            pass
    except KeyboardInterrupt:
        pass
    finally:
        server.stop()
        log.info("ingest stopped")


GRAFANA_SIGNATURE = "HTTP_X_GRAFANA_ALERTING_SIGNATURE"
GRAFANA_TIMESTAMP = "HTTP_X_GRAFANA_ALERTING_SIGNATURE_TIMESTAMP"
GRAFANA_MAX_SKEW_S = 300


def _verify_grafana_signature(
    environ: Mapping[str, Any], body: bytes, secret: bytes, now: float
) -> None:
    """Grafana's webhook HMAC: hex SHA-256 of the body, or of "timestamp:body" when Grafana
    also sends a timestamp (which then must be recent, so a captured request cannot be replayed).
    """
    signature = str(environ.get(GRAFANA_SIGNATURE, "")).strip().lower()
    if not signature:
        raise _Reject(401, "unauthorized", "missing X-Grafana-Alerting-Signature")
    timestamp = str(environ.get(GRAFANA_TIMESTAMP, "")).strip()
    signed = body
    if timestamp:
        try:
            skew = abs(now - float(timestamp))
        except ValueError:
            raise _Reject(401, "unauthorized", "malformed signature timestamp") from None
        if skew > GRAFANA_MAX_SKEW_S:
            raise _Reject(401, "unauthorized", "signature timestamp too old")
        signed = timestamp.encode() + b":" + body
    expected = hmac.new(secret, signed, hashlib.sha256).hexdigest()
    if not hmac.compare_digest(expected, signature):
        raise _Reject(401, "unauthorized", "bad X-Grafana-Alerting-Signature")
