"""The Redis broker's fetch: a message taken from a queue is already where a restore finds it."""

from __future__ import annotations

import json
import socket
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest
import redis as redis_lib
from kombu import Connection, Exchange, Queue
from kombu.asynchronous import Hub
from kombu.asynchronous.timer import Entry

from workers import redis_transport
from workers.redis_transport import FETCH_SCRIPT, wake_stream

ROOT = Path(__file__).resolve().parents[2]
TRANSPORT = "workers.redis_transport:Transport"


@pytest.fixture
def queue_name() -> str:
    return f"test.fetch.{uuid.uuid4().hex[:8]}"


def _publish(redis_url: str, queue_name: str, body: dict) -> None:
    with Connection(redis_url, transport=TRANSPORT) as conn:
        queue = Queue(queue_name, Exchange(queue_name), routing_key=queue_name)
        conn.Producer().publish(body, exchange=queue.exchange, routing_key=queue_name,
                                declare=[queue], serializer="json")  # fmt: skip


def _fetch(client: redis_lib.Redis, *queues: str, acked: tuple = ()) -> list:
    keys = [*queues, "unacked", "unacked_index", *(wake_stream(q) for q in queues)]
    return client.eval(FETCH_SCRIPT, len(keys), *keys, time.time(), len(queues), *acked)


def _last_wake_up(client: redis_lib.Redis, queue: str) -> bytes:
    return client.xrevrange(wake_stream(queue), count=1)[0][0]


def test_a_fetched_message_is_in_unacked_in_the_same_step(redis_url, redis_client, queue_name):
    _publish(redis_url, queue_name, {"alert": 1})
    index, item, tag, _ = _fetch(redis_client, queue_name)
    assert index == 1
    assert redis_client.llen(queue_name) == 0
    payload, exchange, routing_key = json.loads(redis_client.hget("unacked", tag))
    assert payload == json.loads(item)  # kombu's layout: [message, exchange, routing key]
    assert (exchange, routing_key) == (queue_name, queue_name)
    assert redis_client.zscore("unacked_index", tag) is not None


def test_kombus_restore_returns_a_message_whose_consumer_died_after_the_fetch(
    redis_url, redis_client, queue_name
):
    _publish(redis_url, queue_name, {"alert": 2})
    _fetch(redis_client, queue_name)  # and the consumer dies before it acks
    with Connection(redis_url, transport_options={"visibility_timeout": 0}) as conn:
        conn.default_channel.qos.restore_visible(interval=1)  # stock kombu's sweep
        restored = conn.SimpleQueue(queue_name).get(timeout=5)
    assert restored.payload == {"alert": 2}
    assert redis_client.hlen("unacked") == 0


def test_a_fetch_removes_the_messages_acked_since_the_last_one(redis_url, redis_client, queue_name):
    _publish(redis_url, queue_name, {"alert": 1})
    _publish(redis_url, queue_name, {"alert": 2})
    _, _, first, *_ = _fetch(redis_client, queue_name)
    _, _, second, *_ = _fetch(redis_client, queue_name, acked=(first,))
    assert redis_client.hkeys("unacked") == [second]
    assert redis_client.zrange("unacked_index", 0, -1) == [second]
    _fetch(redis_client, queue_name, acked=(second,))  # it finds nothing, and still acks
    assert redis_client.hlen("unacked") == 0 and redis_client.zcard("unacked_index") == 0


def test_the_fetch_reads_queues_in_the_order_given(redis_client, queue_name):
    redis_client.lpush(f"{queue_name}.low", "not json")
    redis_client.lpush(f"{queue_name}.high", "also not json")
    assert _fetch(redis_client, f"{queue_name}.high", f"{queue_name}.low") == [
        1,
        b"also not json",
        b"",
    ]


def test_a_message_that_is_not_kombus_is_handed_over_unrecorded(redis_client, queue_name):
    redis_client.lpush(queue_name, "not json")
    redis_client.lpush(queue_name, "more")
    assert _fetch(redis_client, queue_name) == [1, b"not json", b""]
    assert _fetch(redis_client, queue_name) == [1, b"more", b"", b"0-0"]  # the last one
    assert redis_client.hlen("unacked") == 0


def test_an_empty_fetch_answers_the_last_wake_up_of_each_queue(redis_client, queue_name):
    other = f"{queue_name}.other"
    assert _fetch(redis_client, queue_name, other) == [0, b"0-0", b"0-0"]  # none written yet
    redis_client.xadd(wake_stream(other), {"q": other})
    assert _fetch(redis_client, queue_name, other) == [
        0,
        b"0-0",
        _last_wake_up(redis_client, other),
    ]


def test_taking_the_last_message_answers_the_wake_ups_to_wait_from(
    redis_url, redis_client, queue_name
):
    _publish(redis_url, queue_name, {"alert": 5})
    _publish(redis_url, queue_name, {"alert": 6})
    assert len(_fetch(redis_client, queue_name)) == 3  # one left: fetch again, no waiting
    *_, wait_from = _fetch(redis_client, queue_name)  # the last: wait next
    assert wait_from == _last_wake_up(redis_client, queue_name)


def test_a_message_left_in_a_later_queue_is_fetched_next_not_waited_for(redis_client, queue_name):
    redis_client.lpush(f"{queue_name}.high", "first")
    redis_client.lpush(f"{queue_name}.low", "second")
    reply = _fetch(redis_client, f"{queue_name}.high", f"{queue_name}.low")
    assert reply == [1, b"first", b""]  # no ids: the next step is a fetch


def test_a_publish_after_an_empty_fetch_is_a_wake_up_newer_than_the_fetch_saw(
    redis_url, redis_client, queue_name
):
    _, seen = _fetch(redis_client, queue_name)
    _publish(redis_url, queue_name, {"alert": 3})
    # the consumer's XREAD from what its fetch saw returns at once: no lost wake-up
    woken = redis_client.xread({wake_stream(queue_name): seen})
    assert woken and woken[0][1][-1][1] == {b"q": queue_name.encode()}
    assert _fetch(redis_client, queue_name)[0] == 1


def test_a_publish_wakes_only_the_consumers_of_its_queue(redis_url, redis_client, queue_name):
    other = f"{queue_name}.other"
    _, seen = _fetch(redis_client, other)
    _publish(redis_url, queue_name, {"alert": 7})
    assert redis_client.xread({wake_stream(other): seen}, block=50) == []
    assert redis_client.xlen(wake_stream(queue_name)) == 1


def test_a_requeued_message_is_a_wake_up_for_its_queue(redis_url, redis_client, queue_name):
    _publish(redis_url, queue_name, {"alert": 8})
    with Connection(redis_url, transport=TRANSPORT) as conn:
        message = conn.default_channel.basic_get(queue_name, no_ack=False)
        message.reject(requeue=True)  # kombu's restore: it pushes without _put
    assert redis_client.llen(queue_name) == 1
    assert redis_client.xlen(wake_stream(queue_name)) == 2  # the publish's and the requeue's


def _as_a_worker(conn: Connection, defer_acks: bool = False) -> None:
    """What a worker's hub sets on the transport: the bridge's fetch, and the ack timer."""
    conn.transport.event_loop = object()
    if defer_acks:
        conn.transport.ack_timer = Entry(lambda: None)  # never fires: no hub runs here


@contextmanager
def _consumer(
    redis_url: str, queue_name: str, prefetch: int = 0, defer_acks: bool = False
) -> Iterator[tuple]:
    """A consuming connection that fetches as a worker does, and the messages it got."""
    got: list = []
    with Connection(redis_url, transport=TRANSPORT) as conn:
        _as_a_worker(conn, defer_acks)
        queue = Queue(queue_name, Exchange(queue_name), routing_key=queue_name)
        consumer = conn.Consumer([queue], callbacks=[lambda body, m: got.append(m)],
                                 accept=["json"], prefetch_count=prefetch)  # fmt: skip
        with consumer:
            yield conn, got


def test_a_message_requeued_after_the_last_one_was_taken_comes_back_at_once(redis_url, queue_name):
    _publish(redis_url, queue_name, {"alert": 9})
    with _consumer(redis_url, queue_name) as (conn, got):
        conn.drain_events(timeout=5)  # took the last message: the next poll is a wait
        got[0].reject(requeue=True)
        # sooner than the wait's own 1 s timeout: the requeue woke it
        conn.drain_events(timeout=0.8)
    assert len(got) == 2 and got[1].payload == {"alert": 9}


def test_a_consumer_that_ran_out_of_credit_fetches_when_it_resumes(redis_url, queue_name):
    _publish(redis_url, queue_name, {"alert": 10})
    with _consumer(redis_url, queue_name, prefetch=1) as (conn, got):
        conn.drain_events(timeout=5)  # the last message: it would wait next
        # a stock producer writes no wake-up
        with Connection(redis_url) as stock:
            queue = Queue(queue_name, Exchange(queue_name), routing_key=queue_name)
            stock.Producer().publish({"alert": 11}, exchange=queue.exchange,
                                     routing_key=queue_name, serializer="json")  # fmt: skip
        with pytest.raises(socket.timeout):
            conn.drain_events(timeout=0.1)  # no credit: not polling
        got[0].ack()
        conn.drain_events(timeout=0.8)  # fetches at once, not after the wait's 1 s timeout
    assert [m.payload for m in got] == [{"alert": 10}, {"alert": 11}]


def test_an_ack_rides_on_the_next_fetch(redis_url, redis_client, queue_name):
    _publish(redis_url, queue_name, {"alert": 13})
    with _consumer(redis_url, queue_name, defer_acks=True) as (conn, got):
        conn.drain_events(timeout=5)
        got[0].ack()
        assert redis_client.hexists("unacked", got[0].delivery_tag)  # not written yet
        _publish(redis_url, queue_name, {"alert": 14})
        conn.drain_events(timeout=5)  # this fetch carried the ack
        assert not redis_client.hexists("unacked", got[0].delivery_tag)
        assert redis_client.zscore("unacked_index", got[0].delivery_tag) is None
        assert redis_client.hexists("unacked", got[1].delivery_tag)


def test_acks_no_fetch_carried_are_written_when_the_channel_closes(
    redis_url, redis_client, queue_name
):
    _publish(redis_url, queue_name, {"alert": 15})
    with _consumer(redis_url, queue_name, defer_acks=True) as (conn, got):
        conn.drain_events(timeout=5)
        got[0].ack()
    assert redis_client.hlen("unacked") == 0 and redis_client.zcard("unacked_index") == 0


def test_a_rejected_message_is_requeued_at_once_not_with_the_deferred_acks(
    redis_url, redis_client, queue_name
):
    _publish(redis_url, queue_name, {"alert": 16})
    with _consumer(redis_url, queue_name, defer_acks=True) as (conn, got):
        conn.drain_events(timeout=5)
        got[0].reject(requeue=True)
        # back in its queue and out of unacked, in the reject's own transaction
        assert redis_client.llen(queue_name) == 1
        assert redis_client.hlen("unacked") == 0
        assert not conn.default_channel.acks_due


def test_acks_a_closing_channel_cannot_write_are_left_to_the_visibility_timeout(
    redis_url, redis_client, queue_name
):
    _publish(redis_url, queue_name, {"alert": 18})
    with Connection(redis_url, transport=TRANSPORT) as conn:
        _as_a_worker(conn, defer_acks=True)
        channel = conn.default_channel
        message = channel.basic_get(queue_name, no_ack=False)
        message.ack()
        channel._pool = redis_lib.ConnectionPool(port=_closed_port())  # the broker went away
    # closed without an error; the sweep brings it back after the visibility timeout, and
    # the task runs again then (as after an ack refused by kombu's own transport)
    assert redis_client.hexists("unacked", message.delivery_tag)


@contextmanager
def _first_of(redis_url: str, queue_name: str, *bodies: dict) -> Iterator[tuple]:
    """A worker-like consumer that took the first of ``bodies`` and acked it (deferred)."""
    redis_client = redis_lib.Redis.from_url(redis_url)
    for body in bodies:
        _publish(redis_url, queue_name, body)
    try:
        with _consumer(redis_url, queue_name, defer_acks=True) as (conn, got):
            conn.drain_events(timeout=5)
            got[0].ack()
            yield conn, got, redis_client
    finally:
        redis_client.close()


def test_a_fetch_that_failed_hands_its_acks_to_the_next_one(private_redis, queue_name):
    with _first_of(private_redis, queue_name, {"alert": 19}) as (conn, got, redis_client):
        redis_client.script_flush()  # the next fetch, by digest, fails with NOSCRIPT
        _publish(private_redis, queue_name, {"alert": 20})
        conn.drain_events(timeout=5)  # the failed fetch, then one that carried its acks
        assert not redis_client.hexists("unacked", got[0].delivery_tag)


def _give_up_a_fetch(conn: Connection, redis_client: redis_lib.Redis) -> None:
    """A fetch that carries the acks gets no reply, and kombu's health check drops it."""
    fetching = conn.default_channel.client.connection
    fetching.send_command("CLIENT", "ID")
    client_id = int(fetching.read_response())
    redis_client.client_pause(5000, all=False)  # scripts wait: the fetch gets no reply
    conn.default_channel._brpop_start()
    fetching.disconnect()
    # Unpaused before Redis saw the connection close, the paused fetch would still run
    # (and take the next message into unacked, its reply lost): wait for the close.
    deadline = time.monotonic() + 5
    while any(int(c["id"]) == client_id for c in redis_client.client_list()):
        assert time.monotonic() < deadline, "Redis kept the dropped connection"
        time.sleep(0.01)
    redis_client.client_unpause()


def test_a_fetch_given_up_without_a_reply_hands_its_acks_to_the_next_one(private_redis, queue_name):
    # two messages: after the first the next poll is a fetch, not a wait
    with _first_of(private_redis, queue_name, {"alert": 23}, {"alert": 24}) as (
        conn,
        got,
        redis_client,
    ):
        _give_up_a_fetch(conn, redis_client)
        conn.drain_events(timeout=5)  # the next fetch carries the ack
        assert got[1].payload == {"alert": 24}
        assert not redis_client.hexists("unacked", got[0].delivery_tag)


def test_acks_the_broker_refused_go_with_the_next_fetch(redis_url, queue_name):
    with _first_of(redis_url, queue_name, {"alert": 17}, {"alert": 18}) as (conn, got, client):
        channel = conn.default_channel
        pool, channel._pool = channel._pool, redis_lib.ConnectionPool(port=_closed_port())
        assert channel.flush_acks() is False  # logged, not raised
        assert list(channel.acks_due) == [got[0].delivery_tag]
        channel._pool = pool  # the broker is back
        conn.drain_events(timeout=5)
        assert not client.hexists("unacked", got[0].delivery_tag)


def test_after_a_refusal_the_timer_pauses_before_it_tries_again(redis_url, queue_name, monkeypatch):
    clock = [1000.0]
    monkeypatch.setattr(redis_transport, "monotonic", lambda: clock[0])
    with _first_of(redis_url, queue_name, {"alert": 27}) as (conn, got, client):
        channel = conn.default_channel
        pool, channel._pool = channel._pool, redis_lib.ConnectionPool(port=_closed_port())
        assert channel.flush_acks() is False
        channel._pool = pool  # the broker is back
        clock[0] += redis_transport.ACK_DELAY_S  # the timer's next turn: still pausing
        assert channel.flush_acks() is False
        assert client.hexists("unacked", got[0].delivery_tag)
        clock[0] += redis_transport.ACK_DELAY_S * 1.5  # past the first pause, twice the delay
        assert channel.flush_acks() is True
        assert not client.hexists("unacked", got[0].delivery_tag)


def test_the_event_loops_timer_writes_the_acks_no_fetch_carried(
    redis_url, redis_client, queue_name
):
    _publish(redis_url, queue_name, {"alert": 28})
    with Connection(redis_url, transport=TRANSPORT) as conn:
        conn.register_with_event_loop(Hub())
        timer = conn.transport.ack_timer
        message = conn.default_channel.basic_get(queue_name, no_ack=False)
        message.ack()
        assert redis_client.hexists("unacked", message.delivery_tag)  # left for a fetch
        timer()  # what the hub runs every ACK_DELAY_S
        assert not redis_client.hexists("unacked", message.delivery_tag)
    assert timer.canceled  # with its connection


def _send_a_fetch_that_fails(conn: Connection, redis_client: redis_lib.Redis) -> None:
    """A fetch that carries the acks is in flight, and will fail with NOSCRIPT."""
    redis_client.script_flush()
    conn.default_channel._brpop_start()


@pytest.mark.parametrize(
    "fetch", [_give_up_a_fetch, _send_a_fetch_that_fails], ids=["given up", "failing in flight"]
)
def test_a_channel_closed_after_a_fetch_that_carried_acks_writes_them(
    private_redis, queue_name, fetch
):
    with _first_of(private_redis, queue_name, {"alert": 21}, {"alert": 22}) as (
        conn,
        got,
        redis_client,
    ):
        fetch(conn, redis_client)
        conn.close()
        assert not redis_client.hexists("unacked", got[0].delivery_tag)


def _closed_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def test_a_wake_up_stream_goes_away_a_day_after_its_last_push(redis_url, redis_client, queue_name):
    _publish(redis_url, queue_name, {"alert": 12})
    assert 0 < redis_client.ttl(wake_stream(queue_name)) <= 86400


def test_the_wake_up_stream_stays_short(redis_url, redis_client, queue_name):
    with redis_client.pipeline(transaction=False) as pipe:
        for _ in range(3000):
            pipe.xadd(wake_stream(queue_name), {"q": queue_name})
        pipe.execute()
    _publish(redis_url, queue_name, {"alert": 4})
    assert redis_client.xlen(wake_stream(queue_name)) < 1200  # trimmed to ~1,000 on every push


def test_publishes_and_acks_share_one_client_per_connection_pool(redis_url):
    with Connection(redis_url, transport=TRANSPORT) as conn:
        channel = conn.default_channel
        with channel.conn_or_acquire() as first, channel.conn_or_acquire() as second:
            assert first is second
            assert first.connection_pool is channel.pool


def test_a_channel_whose_pool_was_replaced_gets_a_client_on_the_new_pool(redis_url):
    with Connection(redis_url, transport=TRANSPORT) as conn:
        channel = conn.default_channel
        with channel.conn_or_acquire() as before:
            pass
        channel._disconnect_pools()  # what kombu does in a forked child
        with channel.conn_or_acquire() as after:
            assert after is not before
            assert after.connection_pool is channel.pool
            assert after.ping()


def test_closing_a_channel_left_over_from_a_closed_connection_is_not_a_crash(
    redis_url, redis_client, queue_name
):
    # After the broker went away, Celery collects its connection (which lets the
    # transport go of its URL) and then closes it; the default channel, still open,
    # restores its unacked messages on close through a new pool. kombu's own channel
    # raised AttributeError there ('NoneType' object has no attribute 'hostname'),
    # which ended the worker; a connection error is what kombu's close ignores.
    _publish(redis_url, queue_name, {"alert": 3})
    with Connection(redis_url, transport=TRANSPORT) as conn:
        channel = conn.default_channel
        message = channel.basic_get(queue_name, no_ack=False)
        assert message is not None  # delivered, not acked: the close will restore it
        channel.connection.client = None  # what collecting the connection leaves behind
        conn.maybe_close_channel(channel)  # ignores connection errors only
    # not restored now: it stays in unacked, for the visibility-timeout sweep
    assert redis_client.hexists("unacked", message.delivery_tag)


WORKER = """
import sys
from celery import Celery
app = Celery("fetchtest", broker=sys.argv[1])
app.conf.update(broker_transport="workers.redis_transport:Transport", task_acks_late=True,
                worker_prefetch_multiplier=1, task_ignore_result=True,
                worker_hijack_root_logger=False)
@app.task(name="fetchtest.mark")
def mark(key):
    import redis
    redis.Redis.from_url(sys.argv[1]).rpush(key, "done")
app.worker_main(["worker", "-P", "solo", "-Q", sys.argv[2], "--loglevel", "WARNING"])
"""


def _fetch_calls(client: redis_lib.Redis) -> int:
    stats = client.info("commandstats")
    return sum(int(stats.get(f"cmdstat_{c}", {}).get("calls", 0)) for c in ("eval", "evalsha"))


def test_a_celery_worker_runs_tasks_and_leaves_nothing_unacked(redis_url, redis_client,
                                                               queue_name):  # fmt: skip
    from celery import Celery

    worker = subprocess.Popen([sys.executable, "-c", WORKER, redis_url, queue_name], cwd=ROOT,
                              stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)  # fmt: skip
    app = Celery("fetchtest", broker=redis_url, set_as_current=False)
    app.conf.broker_transport = TRANSPORT
    try:
        for _ in range(20):
            app.send_task("fetchtest.mark", args=[f"{queue_name}.done"], queue=queue_name)
        for _ in range(20):  # the worker's replies, each awaited as it comes
            assert redis_client.blpop([f"{queue_name}.done"], timeout=30) is not None
        # the acks follow the tasks' ends; wait for the last one
        deadline = time.monotonic() + 10
        while redis_client.hlen("unacked") and time.monotonic() < deadline:
            time.sleep(0.05)
        assert redis_client.hlen("unacked") == 0

        # idle, the worker waits on the wake-up stream: about one fetch a second
        before = _fetch_calls(redis_client)
        time.sleep(2.5)
        assert 0 < _fetch_calls(redis_client) - before <= 5
    finally:
        worker.terminate()
        worker.wait(timeout=30)
        app.close()


@contextmanager
def _worker(redis_url: str, queue_name: str) -> Iterator[redis_lib.Redis]:
    """A Celery worker on the bridge's transport consuming ``queue_name``, and a client."""
    redis_client = redis_lib.Redis.from_url(redis_url)
    worker = subprocess.Popen([sys.executable, "-c", WORKER, redis_url, queue_name], cwd=ROOT,
                              stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)  # fmt: skip
    try:
        yield redis_client
    finally:
        worker.terminate()
        worker.wait(timeout=30)
        redis_client.close()


def test_a_celery_worker_acknowledges_with_its_fetches_not_a_transaction_per_task(
    private_redis, queue_name
):
    with _worker(private_redis, queue_name) as redis_client:
        _publish_task(private_redis, queue_name, f"{queue_name}.warm")
        assert redis_client.blpop([f"{queue_name}.warm"], timeout=30) is not None
        redis_client.config_resetstat()
        _publish_task(private_redis, queue_name, f"{queue_name}.done", count=50)
        for _ in range(50):
            assert redis_client.blpop([f"{queue_name}.done"], timeout=30) is not None
        deadline = time.monotonic() + 10  # the last ack: on the timer
        while redis_client.hlen("unacked") and time.monotonic() < deadline:
            time.sleep(0.02)
        assert redis_client.hlen("unacked") == 0
        transactions = redis_client.info("commandstats").get("cmdstat_exec", {}).get("calls", 0)
        assert transactions < 50  # one per task when each ack was its own transaction


def test_a_worker_whose_redis_lost_the_fetch_script_loads_it_again(private_redis, queue_name):
    # a server of the test's own: flushing the shared server's scripts would flush them
    # for every client of it
    with _worker(private_redis, queue_name) as redis_client:
        _publish_task(private_redis, queue_name, f"{queue_name}.first")
        assert redis_client.blpop([f"{queue_name}.first"], timeout=30) is not None
        redis_client.script_flush()  # as after a restart: the fetch by digest finds none
        _publish_task(private_redis, queue_name, f"{queue_name}.second")
        assert redis_client.blpop([f"{queue_name}.second"], timeout=30) is not None


def _publish_task(redis_url: str, queue_name: str, done_key: str, count: int = 1) -> None:
    from celery import Celery

    app = Celery("fetchtest", broker=redis_url, set_as_current=False)
    app.conf.broker_transport = TRANSPORT
    try:
        for _ in range(count):
            app.send_task("fetchtest.mark", args=[done_key], queue=queue_name)
    finally:
        app.close()
