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

A message the job cannot decode is handed back and requeued alone, so Celery's path
deals with it as with any message it cannot read, without failing its batch. After
the broker connection is lost and restored, the messages of the old connection are
neither acknowledged nor sent to the pool any more: the broker has handed them out
again, and an ack on their old delivery tag would act on the new delivery's record.

Only prefork pools on the worker's event loop batch: their results come back on that
loop, in the thread that owns this state. The threads pool (``bridge run``) and
transports without an event loop keep Celery's path.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from functools import partial
from typing import Any

from celery.worker.strategy import default as default_strategy
from kombu.serialization import loads, prepare_accept_content

# Celery's own ack and reject callbacks log their failures through a stdlib logger.
_log = logging.getLogger("workers.intake_batch")

# A message this large (a webhook group of hundreds of alerts) is already a batch.
MAX_BATCH_BYTES = 256 * 1024

Item = tuple[bytes, str, str, str]  # body, content type, content encoding, task id
# The pool job: takes the app's id and the items, answers the indexes it could not decode.
Job = Callable[[int, list[Item]], list[int]]
Entry = tuple[Any, Any, Any]  # message, ack, reject


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
        current: Callable[[Any], bool] = lambda message: True,
    ) -> None:
        self._pool = pool
        self._job = job
        self._app_id = app_id
        self.slots = max(1, slots)
        self.max_messages = max(1, max_messages)
        self._errors = connection_errors
        # False for a message of a connection the consumer has replaced
        self._current = current
        self.waiting: list[Entry] = []
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
        batch = [entry for entry in self.waiting if self._current(entry[0])]
        self.waiting, self._bytes = [], 0
        if not batch:
            return
        items = [(m.body, m.content_type, m.content_encoding, m.headers["id"]) for m, _, _ in batch]
        self.in_flight += 1
        try:
            started = self._pool.apply_async(
                self._job,
                (self._app_id, items),
                callback=partial(self._done, batch),
                error_callback=partial(self._failed, batch),
                correlation_id=items[0][3],
            )
        except Exception:
            _log.warning("intake batch could not be handed to the pool", exc_info=True)
            started = None
        if started is None:
            # the pool is stopping (billiard answers None then): hand the messages back
            self.in_flight -= 1
            _log.warning("intake batch of %d messages not started; requeued", len(batch))
            self._requeue(batch)

    def _done(self, batch: list[Entry], undecoded: list[int] | None = None) -> None:
        self.in_flight -= 1
        alone = set(undecoded or ())
        for i, (message, ack, reject) in enumerate(batch):
            if not self._current(message):
                continue  # handed out again after the connection was replaced
            if i in alone:
                reject(_log, self._errors, True)  # Celery's path deals with it alone
            else:
                ack(_log, self._errors)
        self.flush()

    def _failed(self, batch: list[Entry], exc_info: Any = None) -> None:
        self.in_flight -= 1
        error = getattr(exc_info, "exception", exc_info)
        _log.warning(
            "intake batch of %d messages failed (%r); each is requeued and runs on its own",
            len(batch),
            error,
        )
        self._requeue(batch)
        self.flush()

    def _requeue(self, batch: list[Entry]) -> None:
        for message, _, reject in batch:
            if self._current(message):
                reject(_log, self._errors, True)


def batchable(message: Any, accept: frozenset[str] | set[str]) -> bool:
    """True for a first delivery of a plain task message: no delay, retry or expiry, and
    content the app accepts (anything else takes Celery's path, which refuses it)."""
    headers = message.headers
    if not isinstance(headers, dict) or "id" not in headers:
        return False
    if headers.get("eta") or headers.get("expires") or headers.get("retries"):
        return False
    if (message.delivery_info or {}).get("redelivered"):
        return False
    if message.content_type not in accept:
        return False
    return isinstance(message.body, bytes | str) and len(message.body) < MAX_BATCH_BYTES


def decode(item: Item, accept: frozenset[str] | set[str]) -> tuple[Any, str]:
    """(the task's message argument, its task id) from one batched message's body."""
    body, content_type, content_encoding, task_id = item
    args, kwargs, _embed = loads(body, content_type, content_encoding, accept=accept)
    message = args[0] if args else kwargs["message"]
    return message, task_id


def strategy_for(job: Job, app_id: int, max_messages: int) -> Callable[..., Any]:
    """A Celery task strategy (``Task.Strategy``) that batches as the module says."""

    def strategy(task: Any, app: Any, consumer: Any, **kwargs: Any) -> Callable[..., Any]:
        single = default_strategy(task, app, consumer, **kwargs)
        pool = consumer.pool
        if max_messages <= 1 or not _is_prefork(pool) or consumer.hub is None:
            return single
        accept = prepare_accept_content(app.conf.accept_content) or frozenset()
        batcher = Batcher(
            pool=pool,
            job=job,
            app_id=app_id,
            slots=pool.num_processes,
            max_messages=max_messages,
            connection_errors=tuple(consumer.connection_errors),
            current=partial(_on_current_channel, consumer),
        )

        def handler(message: Any, body: Any, ack: Any, reject: Any, callbacks: Any, **kw: Any):
            if body is not None or not batchable(message, accept):
                return single(message, body, ack, reject, callbacks, **kw)
            batcher.add(message, ack, reject)
            return None

        return handler

    return strategy


def _is_prefork(pool: Any) -> bool:
    from celery.concurrency.prefork import TaskPool

    return isinstance(pool, TaskPool)


def _on_current_channel(consumer: Any, message: Any) -> bool:
    """True while ``message`` came through the consumer's current task channel.

    Celery replaces its task consumer (and channel) when it reconnects, and drops it
    while it shuts down: a message of the old channel has been or will be handed out
    again, and its delivery tag may already name the new delivery. A shutdown that
    begins while Celery reconnects still holds the old consumer, whose channel is closed.
    """
    task_consumer = consumer.task_consumer
    channel = message.channel
    return (
        task_consumer is not None
        and channel is task_consumer.channel
        # closed, it may still reach Redis (its close restored the messages through it)
        and not getattr(channel, "closed", False)  # kombu's virtual channels
        and getattr(channel, "is_open", True)  # py-amqp's
    )
