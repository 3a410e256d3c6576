"""Assembles the pipeline's collaborators from the settings.

One ``Runtime`` per process: it owns the Redis client, the state and dead-letter
stores, the mapper and (lazily, so a prefork child builds its own HTTP session
after fork) the ITSM client. Embedded mode (no Redis URL) uses an in-process
fakeredis server shared by everything in this process.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from typing import Any

import redis as redis_lib

from bridge.dedup import DedupPolicy, StateStore
from bridge.dlq import DeadLetterStore
from bridge.keyconfig import KeyRule, reconcile_key_rule
from bridge.mapping import Mapper
from bridge.pipeline import ActionSink, Pipeline
from bridge.settings import Settings

_fake_server: Any = None
_fake_lock = threading.Lock()


def embedded_redis_server() -> Any:
    """The process-wide fakeredis server used when no Redis URL is configured."""
    global _fake_server
    with _fake_lock:
        if _fake_server is None:
            import fakeredis

            _fake_server = fakeredis.FakeServer()
        return _fake_server


def connect_redis(settings: Settings, *, dedicated: bool = False) -> Any:
    """The state store's client; ``dedicated`` keeps one connection for every command.

    A dedicated connection skips the pool's checkout on every command (a liveness probe
    of three system calls and a pid check): about a fifth of the Python cost of a round
    trip. It is for a process that runs one task at a time (a prefork child); threads
    would queue behind its lock.
    """
    if settings.redis_url:
        return redis_lib.Redis.from_url(
            settings.redis_url,
            socket_timeout=5,
            socket_connect_timeout=3,
            health_check_interval=30,
            single_connection_client=dedicated,
        )
    import fakeredis

    return fakeredis.FakeRedis(server=embedded_redis_server())


class Runtime:
    """Everything a worker or a CLI command needs to run the pipeline."""

    def __init__(
        self,
        settings: Settings,
        *,
        sink: ActionSink,
        redis: Any = None,
        clock: Callable[[], float] = time.time,
        observer: Any = None,
        on_request: Any = None,
        client_factory: Callable[[], Any] | None = None,
    ) -> None:
        self.settings = settings
        self._on_request = on_request
        self._observer = observer
        self.redis = redis if redis is not None else connect_redis(settings)
        self.clock = clock
        self.store = StateStore(
            self.redis,
            DedupPolicy.from_settings(settings),
            prefix=settings.redis_prefix,
            clock=clock,
        )
        self.dlq = DeadLetterStore(
            self.redis,
            prefix=settings.redis_prefix,
            max_entries=settings.dlq_max_entries,
            clock=clock,
        )
        self.mapper = Mapper(settings.mapping)
        self.pipeline = Pipeline(
            settings=settings,
            redis=self.redis,
            store=self.store,
            dlq=self.dlq,
            client_factory=client_factory or self._make_client,
            mapper=self.mapper,
            sink=sink,
            clock=clock,
            observer=observer,
        )

    def watch_key_rule(self) -> None:
        """Record the key rule; keep the previous one if it changed (see bridge.keyconfig)."""
        previous = reconcile_key_rule(
            self.redis, self.settings.redis_prefix, KeyRule.from_settings(self.settings)
        )
        self.pipeline.previous_key_rule = previous
        if previous is not None and self._observer is not None:
            self._observer("anomaly", kind="key_rule_changed")

    def _make_client(self) -> Any:
        from bridge.itsm.client import build_client

        return build_client(self.settings, self.redis, on_request=self._on_request)
