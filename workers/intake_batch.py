"""Intake messages decided together: one pool job and one Redis round trip for several.

Celery hands every message to a pool process as a task of its own, and the intake
task's work is one Redis round trip: in a storm of one-alert messages (PagerDuty
events, generic JSON) the worker spends more on the hand-over and the round trip
than on deciding. This strategy for ``bridge.intake`` keeps Celery's path for the
messages it must see alone and batches the rest, adaptively:

- a message is sent to the pool at once while a pool process is free, so at a
  trickle nothing waits;
- while every process is busy, messages gather in the main process and go as one
  job when a process comes free (or when the batch is full), so under load one
  pool job and one ``decide_many`` round trip serve many messages.

Delivery stays at least once: a batch's messages are acknowledged only after the
job returns, and a job that fails (its process died, Redis went away) requeues all
of them. Requeued, redelivered, delayed and retried messages go through Celery's own
path one by one, with its retries and the poison count: a message that kills its
process is isolated on its next delivery instead of taking its batch with it again.
Messages still waiting here when a worker stops or dies are unacknowledged, so the
broker hands them out again.

Only prefork pools batch: their results come back on the worker's event loop, in the
thread that owns this state. The threads pool (``bridge run``) keeps Celery's path.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from functools import partial
from typing import Any

from celery.worker.strategy import default as default_strategy
from kombu.serialization import loads

# Celery's own ack and reject callbacks log their failures through a stdlib logger.
_log = logging.getLogger("workers.intake_batch")

# A message this large (a webhook group of hundreds of alerts) is already a batch.
MAX_BATCH_BYTES = 256 * 1024

Job = Callable[[int, list[tuple[bytes, str, str, str]]], None]


class Batcher:
    """The messages of one consumer waiting for a pool process, and the jobs in flight."""

    def __init__(
        self,
        *,
        pool: Any,
        job: Job,
        app_id: int,
        slots: int,
        max_messages: int,
        connection_errors: tuple[type[BaseException], ...] = (),
    ) -> None:
        self._pool = pool
        self._job = job
        self._app_id = app_id
        self.slots = max(1, slots)
        self.max_messages = max(1, max_messages)
        self._errors = connection_errors
        self.waiting: list[tuple[Any, Any, Any]] = []  # (message, ack, reject)
        self._bytes = 0
        self.in_flight = 0

    def add(self, message: Any, ack: Any, reject: Any) -> None:
        self.waiting.append((message, ack, reject))
        self._bytes += len(message.body)
        if (
            self.in_flight < self.slots
            or len(self.waiting) >= self.max_messages
            or self._bytes >= MAX_BATCH_BYTES
        ):
            self.flush()

    def flush(self) -> None:
        if not self.waiting:
            return
        batch, self.waiting, self._bytes = self.waiting, [], 0
        items = [(m.body, m.content_type, m.content_encoding, m.headers["id"]) for m, _, _ in batch]
        self.in_flight += 1
        try:
            self._pool.apply_async(
                self._job,
                (self._app_id, items),
                callback=partial(self._done, batch),
                error_callback=partial(self._failed, batch),
                correlation_id=items[0][3],
            )
        except Exception:
            # the pool is stopping: the broker hands these out again
            self.in_flight -= 1
            _log.warning("intake batch not started; its messages are requeued", exc_info=True)
            self._requeue(batch)

    def _done(self, batch: list[tuple[Any, Any, Any]], _result: Any = None) -> None:
        self.in_flight -= 1
        for _, ack, _ in batch:
            ack(_log, self._errors)
        self.flush()

    def _failed(self, batch: list[tuple[Any, Any, Any]], exc_info: Any = None) -> None:
        self.in_flight -= 1
        error = getattr(exc_info, "exception", exc_info)
        _log.warning(
            "intake batch of %d messages failed (%r); each is requeued and runs on its own",
            len(batch),
            error,
        )
        self._requeue(batch)
        self.flush()

    def _requeue(self, batch: list[tuple[Any, Any, Any]]) -> None:
        for _, _, reject in batch:
            reject(_log, self._errors, True)


def batchable(message: Any) -> bool:
    """True for a first delivery of a plain task message: no delay, retry or expiry."""
    headers = message.headers
    if not isinstance(headers, dict) or "id" not in headers:
        return False
    if headers.get("eta") or headers.get("expires") or headers.get("retries"):
        return False
    if (message.delivery_info or {}).get("redelivered"):
        return False
    return isinstance(message.body, bytes | str) and len(message.body) < MAX_BATCH_BYTES


def decode(item: tuple[bytes, str, str, str]) -> tuple[Any, str]:
    """(the task's message argument, its task id) from one batched message's body."""
    body, content_type, content_encoding, task_id = item
    args, kwargs, _embed = loads(body, content_type, content_encoding, accept={content_type})
    message = args[0] if args else kwargs["message"]
    return message, task_id


def strategy_for(job: Job, app_id: int, max_messages: int) -> Callable[..., Any]:
    """A Celery task strategy (``Task.Strategy``) that batches as the module says."""

    def strategy(task: Any, app: Any, consumer: Any, **kwargs: Any) -> Callable[..., Any]:
        single = default_strategy(task, app, consumer, **kwargs)
        pool = consumer.pool
        if max_messages <= 1 or not _is_prefork(pool):
            return single
        batcher = Batcher(
            pool=pool,
            job=job,
            app_id=app_id,
            slots=pool.num_processes,
            max_messages=max_messages,
            connection_errors=tuple(consumer.connection_errors),
        )

        def handler(message: Any, body: Any, ack: Any, reject: Any, callbacks: Any, **kw: Any):
            if body is not None or not batchable(message):
                return single(message, body, ack, reject, callbacks, **kw)
            batcher.add(message, ack, reject)
            return None

        handler.batcher = batcher  # type: ignore[attr-defined]
        return handler

    return strategy


def _is_prefork(pool: Any) -> bool:
    from celery.concurrency.prefork import TaskPool

    return isinstance(pool, TaskPool)
