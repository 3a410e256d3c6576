"""The thin tasks: each hands its message to ``bridge.pipeline`` and nothing more.

The runtime (Redis client, stores, ITSM client) is built once per process, on
first use, so prefork children never share sockets with their parent.
"""

from __future__ import annotations

import os
import threading
from typing import Any

import structlog
from celery import Celery
from celery.signals import worker_process_init
from kombu.serialization import prepare_accept_content
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import TimeoutError as RedisTimeoutError

from bridge.runtime import Runtime, connect_redis
from workers import intake_batch

log = structlog.get_logger("workers.tasks")
_runtimes: dict[tuple[int, int], Runtime] = {}
_lock = threading.Lock()

# Infrastructure trouble (the state store is unreachable): the message stays ours and is
# retried with backoff until it works; giving up would lose an accepted alert.
INFRA_ERRORS = (RedisConnectionError, RedisTimeoutError, ConnectionError)


_metrics_instance: Any = None
# Set in prefork children, which run one task at a time: their runtime keeps one Redis
# connection instead of checking one out of a pool for every command.
_one_task_at_a_time = False


@worker_process_init.connect(weak=False)
def _in_prefork_child(**_: Any) -> None:
    global _one_task_at_a_time
    _one_task_at_a_time = True


def _metrics() -> Any:
    """One set of metric objects per process (prometheus_client registers them globally)."""
    global _metrics_instance
    if _metrics_instance is None:
        from bridge.metrics import Metrics

        _metrics_instance = Metrics()
    return _metrics_instance


def runtime_for(app: Celery) -> Runtime:
    key = (os.getpid(), id(app))
    rt = _runtimes.get(key)
    if rt is None:
        with _lock:
            rt = _runtimes.get(key)
            if rt is None:
                from workers.app import CelerySink

                metrics = _metrics()
                settings = app.conf.bridge_settings
                rt = Runtime(
                    settings,
                    redis=connect_redis(settings, dedicated=True) if _one_task_at_a_time else None,
                    sink=CelerySink(app),
                    observer=metrics.observe,
                    on_request=metrics.on_request,
                )
                rt.watch_key_rule()
                _runtimes[key] = rt
    return rt


# The apps registered in this process and the content they accept, for the batch jobs
# its pool processes run.
_apps: dict[int, tuple[Celery, set[str]]] = {}


def run_intake_batch(app_id: int, items: list[intake_batch.Item]) -> list[int]:
    """A pool job: decide several intake messages together (``workers/intake_batch.py``).

    Answers the indexes of the messages it could not decode; they go back to the broker
    and through Celery's own path, one at a time, instead of failing the batch.
    """
    app, accept = _apps[app_id]
    messages, undecoded = [], []
    for i, item in enumerate(items):
        try:
            messages.append(intake_batch.decode(item, accept))
        except Exception:  # not JSON, not accepted, not a task body: Celery's path says why
            undecoded.append(i)
    structlog.contextvars.bind_contextvars(batch=len(messages))
    try:
        if messages:
            runtime_for(app).pipeline.intake_many(messages)
    finally:
        structlog.contextvars.clear_contextvars()
    return undecoded


def _redelivered(task: Any) -> bool:
    """Both brokers flag a message handed out again after its worker died."""
    info = task.request.delivery_info or {}
    return bool(info.get("redelivered"))


def register(app: Celery) -> None:
    common: dict[str, Any] = {
        "bind": True,
        "acks_late": True,
        "reject_on_worker_lost": True,
        "autoretry_for": INFRA_ERRORS,
        "retry_backoff": True,
        "retry_backoff_max": 60,
        "retry_jitter": True,
        "max_retries": None,
        "ignore_result": True,
        "shared": False,  # every app built here registers its own tasks
    }

    # The tasks return nothing: results are ignored, and a return value would still be
    # pickled through the pool's pipe and handled by Celery (~5% of the per-alert rate).
    # The pipeline logs what each message and action did.

    _apps[id(app)] = (app, prepare_accept_content(app.conf.accept_content) or set())
    settings = getattr(app.conf, "bridge_settings", None)
    batch = settings.worker_intake_batch if settings is not None else 1

    @app.task(
        name="bridge.intake",
        # a static attribute: Celery reads it from the task instance
        Strategy=staticmethod(intake_batch.strategy_for(run_intake_batch, id(app), batch)),
        **common,
    )
    def intake(self: Any, message: dict[str, Any]) -> None:
        structlog.contextvars.bind_contextvars(task_id=self.request.id)
        try:
            runtime_for(app).pipeline.intake(
                message, self.request.id, redelivered=_redelivered(self)
            )
        finally:
            structlog.contextvars.clear_contextvars()

    @app.task(name="bridge.act", **common)
    def act(self: Any, action: dict[str, Any]) -> None:
        structlog.contextvars.bind_contextvars(task_id=self.request.id, key=action.get("key"))
        try:
            runtime_for(app).pipeline.run_action(
                action, message_id=self.request.id, redelivered=_redelivered(self)
            )
        finally:
            structlog.contextvars.clear_contextvars()

    @app.task(name="bridge.settle", **common)
    def settle(self: Any, action: dict[str, Any]) -> None:
        runtime_for(app).pipeline.settle(action)

    @app.task(name="bridge.noop", bind=True, acks_late=True, ignore_result=True, shared=False)
    def noop(self: Any, message: Any = None, round_trips: int = 0) -> None:
        """The benchmark's floors: a task that does nothing on the same settings, or
        nothing but ``round_trips`` PINGs on the state store's Redis client (the least a
        decision against shared state costs)."""
        if round_trips:
            redis = runtime_for(app).redis
            for _ in range(min(int(round_trips), 10)):
                redis.ping()
