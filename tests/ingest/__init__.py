"""Helpers for the ingest tests: a cuttable TCP proxy, brokers under test, payloads."""

from __future__ import annotations

import contextlib
import select
import socket
import threading
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any
from urllib.parse import urlparse, urlunparse

from pydantic import SecretStr

from bridge.settings import Settings

# The Redis broker of these tests lives in its own database, flushed around each test.
REDIS_BROKER_DB = 12
TOKEN = "ingest-T0KEN-5d1e"
GRAFANA_TOKEN = "grafana-T0KEN-77aa"
AUTH = {"Authorization": f"Bearer {TOKEN}"}


def alertmanager_payload(count: int = 1, **labels: str) -> dict[str, Any]:
    alerts = [
        {
            "status": "firing",
            "labels": {"alertname": "DiskFull", "instance": f"host-{i}", **labels},
            "annotations": {"summary": f"disk full on host-{i}"},
            "startsAt": "2026-01-01T00:00:00Z",
            "endsAt": "0001-01-01T00:00:00Z",
            "generatorURL": "http://prometheus.example/graph",
            "fingerprint": f"{i:016x}",
        }
        for i in range(count)
    ]
    return {
        "version": "4",
        "groupKey": '{}:{alertname="DiskFull"}',
        "truncatedAlerts": 0,
        "status": "firing",
        "receiver": "bridge",
        "groupLabels": {"alertname": "DiskFull"},
        "commonLabels": {"alertname": "DiskFull"},
        "commonAnnotations": {},
        "externalURL": "http://alertmanager.example",
        "alerts": alerts,
    }


def pagerduty_event(**overrides: Any) -> dict[str, Any]:
    event: dict[str, Any] = {
        "routing_key": TOKEN,
        "event_action": "trigger",
        "dedup_key": "disk-full-host-1",
        "payload": {
            "summary": "Disk full on host-1",
            "source": "host-1",
            "severity": "critical",
        },
    }
    event.update(overrides)
    return event


def settings_for(broker_url: str, **overrides: Any) -> Settings:
    values: dict[str, Any] = {
        "broker_url": broker_url,
        "http_host": "127.0.0.1",
        "http_port": 0,
        "ingest_tokens": SecretStr(f"{TOKEN},{GRAFANA_TOKEN}:grafana"),
    }
    values.update(overrides)
    return Settings(**values)


def with_db(url: str, db: int) -> str:
    parsed = urlparse(url)
    return urlunparse(parsed._replace(path=f"/{db}"))


def with_port(url: str, port: int) -> str:
    parsed = urlparse(url)
    netloc = parsed.netloc.rsplit("@", 1)
    host = f"{parsed.hostname}:{port}"
    return urlunparse(parsed._replace(netloc=f"{netloc[0]}@{host}" if len(netloc) == 2 else host))


def closed_port() -> int:
    """A local port nothing listens on (bound, then released)."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@dataclass
class Broker:
    """A real broker the ingest publishes to, and a way to count what arrived."""

    kind: str
    url: str
    queue: str

    def celery_app(self, settings: Settings) -> Any:
        from workers.app import create_app

        app = create_app(settings)
        if self.kind == "amqp":
            # A queue of this test's own: other suites may consume bridge.intake on
            # the shared vhost at the same time.
            app.conf.task_routes = {"bridge.intake": {"queue": self.queue}}
        return app

    def count(self, url: str | None = None) -> int:
        """Messages waiting in the intake queue (always read from the real broker)."""
        from kombu import Connection

        if self.kind == "redis":
            import redis

            client = redis.Redis.from_url(self.url)
            try:
                return int(client.llen(self.queue))
            finally:
                client.close()
        with Connection(self.url) as conn, conn.channel() as channel:
            try:
                return int(channel.queue_declare(queue=self.queue, passive=True).message_count)
            except Exception as exc:  # the queue is declared by the first publish
                if "NOT_FOUND" in str(exc):
                    return 0
                raise

    def messages(self) -> list[dict[str, Any]]:
        """The intake messages' first argument (the envelope), oldest first."""
        import json

        from kombu import Connection

        bodies: list[Any] = []
        with Connection(self.url) as conn:
            queue = conn.SimpleQueue(self.queue)
            try:
                while True:
                    try:
                        message = queue.get(block=True, timeout=0.5)
                    except queue.Empty:
                        break
                    payload = message.payload
                    bodies.append(payload if not isinstance(payload, str) else json.loads(payload))
                    message.ack()
            finally:
                queue.close()
        return [body[0][0] for body in bodies]

    def cleanup(self) -> None:
        if self.kind == "redis":
            import redis

            client = redis.Redis.from_url(self.url)
            client.flushdb()
            client.close()
            return
        from kombu import Connection

        with (
            Connection(self.url) as conn,
            conn.channel() as channel,
            contextlib.suppress(Exception),
        ):
            channel.queue_delete(self.queue)


class TcpProxy:
    """Forwards a local port to a real service; ``cut`` and ``restore`` keep the port.

    Cutting closes the listener and every open connection, so the service looks
    stopped to the client while the shared server keeps running for everyone else.
    """

    def __init__(self, target_url: str, default_port: int) -> None:
        parsed = urlparse(target_url)
        self._target = (parsed.hostname or "127.0.0.1", parsed.port or default_port)
        self._lock = threading.Lock()
        self._sockets: list[socket.socket] = []
        self._listener: socket.socket | None = None
        self.port = 0
        self.restore()

    def restore(self) -> None:
        listener = socket.socket()
        listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        listener.bind(("127.0.0.1", self.port))
        listener.listen(64)
        self.port = listener.getsockname()[1]
        with self._lock:
            self._listener = listener
        threading.Thread(target=self._accept, args=(listener,), daemon=True).start()

    def cut(self) -> None:
        with self._lock:
            listener, self._listener = self._listener, None
            sockets, self._sockets = self._sockets, []
        for sock in [s for s in [listener] if s is not None] + sockets:
            with contextlib.suppress(OSError):
                sock.shutdown(socket.SHUT_RDWR)
            sock.close()

    close = cut

    def _accept(self, listener: socket.socket) -> None:
        while True:
            try:
                client, _ = listener.accept()
            except OSError:
                return
            try:
                upstream = socket.create_connection(self._target, timeout=2)
            except OSError:
                client.close()
                continue
            upstream.settimeout(None)
            with self._lock:
                if self._listener is not listener:
                    client.close()
                    upstream.close()
                    return
                self._sockets += [client, upstream]
            threading.Thread(target=self._pipe, args=(client, upstream), daemon=True).start()

    @staticmethod
    def _pipe(a: socket.socket, b: socket.socket) -> None:
        try:
            while True:
                ready, _, _ = select.select([a, b], [], [], 1.0)
                for sock in ready:
                    data = sock.recv(65536)
                    if not data:
                        return
                    (b if sock is a else a).sendall(data)
        except (OSError, ValueError):
            return
        finally:
            for sock in (a, b):
                with contextlib.suppress(OSError):
                    sock.close()


@contextlib.contextmanager
def running_ingest(settings: Settings, celery_app: Any, **options: Any) -> Iterator[Any]:
    """The ingest on a free loopback port, served over real HTTP by waitress."""
    from bridge.ingest import start_ingest

    server = start_ingest(settings, celery_app, **options)
    try:
        yield server
    finally:
        server.stop()


def redis_broker(redis_url: str) -> Broker:
    """The Redis broker in its own database (``redis_url`` is the conftest fixture)."""
    from workers.app import INTAKE_QUEUE

    broker = Broker("redis", with_db(redis_url, REDIS_BROKER_DB), INTAKE_QUEUE)
    broker.cleanup()
    return broker


def amqp_broker(amqp_url: str, unique: str) -> Broker:
    broker = Broker("amqp", amqp_url, f"bridge.intake.ingest-test-{unique}")
    broker.cleanup()
    return broker
