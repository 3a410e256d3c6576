"""How the intake worker gathers messages into batches and settles them
(workers/intake_batch.py); a real prefork worker runs them in
tests/pipeline/test_intake_batch_e2e.py."""

from __future__ import annotations

import pickle
from dataclasses import dataclass, field
from typing import Any

import pytest
from kombu.exceptions import ContentDisallowed
from kombu.serialization import dumps

from workers import intake_batch
from workers.intake_batch import Batcher, _on_current_channel, batchable

ACCEPT = {"application/json"}
LIVE = object()  # the consumer's current channel


@dataclass
class Message:
    id: str
    body: bytes = b'[["x"], {}, {}]'
    content_type: str = "application/json"
    content_encoding: str = "utf-8"
    headers: dict[str, Any] = field(default_factory=dict)
    delivery_info: dict[str, Any] = field(default_factory=dict)
    channel: Any = LIVE
    settled: str = ""

    def __post_init__(self) -> None:
        self.headers = {"id": self.id, "task": "bridge.intake", **self.headers}

    def ack(self, _log: Any, _errors: Any) -> None:
        assert not self.settled
        self.settled = "acked"

    def reject(self, _log: Any, _errors: Any, requeue: bool) -> None:
        assert not self.settled
        self.settled = "requeued" if requeue else "dropped"


class Pool:
    """Records the jobs it is given; the test decides when each returns or fails."""

    def __init__(self) -> None:
        self.jobs: list[dict[str, Any]] = []

    def apply_async(self, target: Any, args: tuple, **options: Any) -> object:
        self.jobs.append({"ids": [item[3] for item in args[1]], **options})
        return object()  # billiard's ApplyResult

    def finish(self, index: int, undecoded: list[int] | None = None) -> None:
        self.jobs[index]["callback"](undecoded or [])

    def fail(self, index: int) -> None:
        self.jobs[index]["error_callback"](RuntimeError("the process died"))


def _batcher(pool: Pool, slots: int = 2, max_messages: int = 32) -> Batcher:
    return Batcher(
        pool=pool,
        job=print,
        app_id=1,
        slots=slots,
        max_messages=max_messages,
        current=lambda message: message.channel is LIVE,
    )


def _add(batcher: Batcher, *ids: str) -> list[Message]:
    messages = [Message(i) for i in ids]
    for m in messages:
        batcher.add(m, m.ack, m.reject)
    return messages


def test_a_message_goes_to_the_pool_at_once_while_a_process_is_free():
    pool = Pool()
    _add(_batcher(pool), "a", "b")
    assert [job["ids"] for job in pool.jobs] == [["a"], ["b"]]


def test_messages_arriving_while_every_process_is_busy_go_together_to_the_next_free_one():
    pool = Pool()
    batcher = _batcher(pool)
    _add(batcher, "a", "b", "c", "d", "e")
    assert len(pool.jobs) == 2
    pool.finish(0)
    assert pool.jobs[2]["ids"] == ["c", "d", "e"]


def test_a_full_batch_goes_without_waiting_for_a_free_process():
    pool = Pool()
    _add(_batcher(pool, max_messages=3), "a", "b", "c", "d", "e")
    assert [job["ids"] for job in pool.jobs] == [["a"], ["b"], ["c", "d", "e"]]


def test_messages_are_acknowledged_only_when_their_batch_returns():
    pool = Pool()
    batcher = _batcher(pool, slots=1)
    first, second, third = _add(batcher, "a", "b", "c")
    assert not first.settled
    pool.finish(0)
    assert first.settled == "acked"
    assert not second.settled and not third.settled
    pool.finish(1)
    assert second.settled == third.settled == "acked"


def test_every_message_of_a_failed_batch_is_requeued():
    pool = Pool()
    batcher = _batcher(pool, slots=1)
    first, second, third = _add(batcher, "a", "b", "c")
    pool.finish(0)
    pool.fail(1)
    assert (first.settled, second.settled, third.settled) == ("acked", "requeued", "requeued")


def test_a_failed_batch_frees_its_process_for_the_messages_that_waited():
    pool = Pool()
    batcher = _batcher(pool, slots=1)
    _add(batcher, "a", "b")
    pool.fail(0)
    assert pool.jobs[1]["ids"] == ["b"]


def test_a_message_the_job_could_not_decode_is_requeued_alone_and_the_rest_acknowledged():
    pool = Pool()
    batcher = _batcher(pool, slots=1)
    _, second, third = _add(batcher, "a", "b", "c")
    pool.finish(0)
    pool.finish(1, undecoded=[1])
    assert (second.settled, third.settled) == ("acked", "requeued")


def test_messages_of_a_replaced_connection_are_neither_acknowledged_nor_sent_again():
    # the broker hands them out again; an ack on their old tag would act on the new delivery
    pool = Pool()
    batcher = _batcher(pool, slots=1)
    first, second = _add(batcher, "a", "b")
    first.channel = second.channel = object()  # Celery reconnected: a new task channel
    pool.finish(0)
    assert first.settled == second.settled == ""
    assert len(pool.jobs) == 1


def test_messages_are_requeued_when_the_pool_has_stopped():
    class StoppedPool(Pool):
        def apply_async(self, target: Any, args: tuple, **options: Any) -> None:
            return None  # what billiard answers once the pool is closing

    batcher = _batcher(StoppedPool())
    (message,) = _add(batcher, "a")
    assert message.settled == "requeued"
    assert batcher.in_flight == 0


def batchable_(message: Message) -> bool:
    return batchable(message, ACCEPT)


def test_a_first_delivery_is_batched():
    assert batchable_(Message("a"))


def test_a_redelivered_message_runs_alone():
    # a batch whose process died comes back this way: a message that kills its process
    # must not take a batch with it a second time
    assert not batchable_(Message("a", delivery_info={"redelivered": True}))


def test_a_delayed_or_retried_message_runs_alone():
    assert not batchable_(Message("a", headers={"eta": "2026-12-03T10:00:00+00:00"}))
    assert not batchable_(Message("a", headers={"retries": 1}))
    assert not batchable_(Message("a", headers={"expires": "2026-12-03T10:00:00+00:00"}))


def test_content_the_app_does_not_accept_runs_alone():
    # Celery's path refuses it; a batch must not unpickle what a publisher sent
    assert not batchable_(Message("a", content_type="application/x-python-serialize"))


def test_a_message_too_large_to_batch_runs_alone():
    assert not batchable_(Message("a", body=b"x" * intake_batch.MAX_BATCH_BYTES))


def test_a_batched_message_decodes_to_the_task_argument_and_its_id():
    envelope = {"v": 1, "id": "e1", "format": "generic", "payload": {"a": 1}}
    content_type, encoding, body = dumps([[envelope], {}, {}], serializer="json")
    item = (body, content_type, encoding, "task-1")
    assert intake_batch.decode(item, ACCEPT) == (envelope, "task-1")


def test_a_body_in_a_content_type_the_app_does_not_accept_is_not_decoded():
    body = pickle.dumps([[{"payload": 1}], {}, {}])
    with pytest.raises(ContentDisallowed):
        intake_batch.decode((body, "application/x-python-serialize", "binary", "t"), ACCEPT)


class Channel:
    closed = False


class Consumer:
    def __init__(self, channel: Channel | None) -> None:
        self.task_consumer = None if channel is None else type("TC", (), {"channel": channel})()


def test_a_message_of_the_consumers_open_task_channel_is_current():
    channel = Channel()
    assert _on_current_channel(Consumer(channel), Message("a", channel=channel))


def test_a_message_of_a_replaced_task_channel_is_not_current():
    assert not _on_current_channel(Consumer(Channel()), Message("a", channel=Channel()))


def test_a_message_of_a_closed_task_channel_is_not_current():
    # a shutdown that begins while Celery reconnects keeps the old consumer and channel
    channel = Channel()
    channel.closed = True
    assert not _on_current_channel(Consumer(channel), Message("a", channel=channel))


def test_no_message_is_current_once_the_task_consumer_is_gone():
    assert not _on_current_channel(Consumer(None), Message("a", channel=Channel()))
