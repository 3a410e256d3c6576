"""kombu's Redis transport with a fetch that cannot drop a message.

kombu takes a message with ``BRPOP`` and only then, in a second round trip, copies it
into the ``unacked`` hash that its restore sweep brings back after the visibility
timeout. A worker killed between the two (or with the ``BRPOP`` reply still in its
socket) loses the message for good: it is in neither place. Killing whole workers
under a steady stream of tasks loses about one message in a few thousand that way.

Here the pop and the copy into ``unacked`` are one Lua script, so a fetched message
is always somewhere a restore finds it. The hash entries have kombu's own layout, so
kombu's sweep, acks and rejects work on them unchanged, and stock workers can share
the broker. A script cannot block, so once the queues are empty the worker blocks on
``XREAD`` of small wake-up streams, one per queue, that this transport's producers
(and kombu's requeues and restores, through this channel) append to after every push.
The fetch returns the streams' last ids when it found nothing or took the last
message, so a push between the fetch and the wait is never missed, and a worker that
took the last message waits at once instead of first fetching nothing (unless it ran
out of prefetch credit meanwhile: then it fetches). A push wakes only the consumers
of its own queue. An idle worker costs Redis two calls a second.

kombu acknowledges each message with a transaction of its own (a round trip for every
task). Here an ack waits for the worker's next fetch, whose script removes the tag
before it pops; a worker with nothing more to fetch writes its acks within
``ACK_DELAY_S`` on a timer of its event loop, and on close. A worker killed in that
window runs those tasks again after the visibility timeout, as it would any task
it had not acknowledged: the bridge's tasks are idempotent (architecture.md).
"""

from __future__ import annotations

import hashlib
from collections import deque
from collections.abc import Iterator
from contextlib import contextmanager
from queue import Empty
from time import monotonic, time
from typing import Any

import structlog
from kombu.transport import redis as kombu_redis
from kombu.transport import virtual
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import NoScriptError

from workers import wire_json

FETCH_SCRIPT = """
-- KEYS: the queue lists in the order BRPOP would read them, kombu's unacked hash and its
-- index, then the wake-up streams of the queues. ARGV[1]: the delivery time, on the clock
-- the restore sweep reads; ARGV[2]: how many of the keys are queue lists; ARGV[3...]: the
-- delivery tags acked since the last fetch.
local lists = tonumber(ARGV[2])
local unacked, index = KEYS[lists + 1], KEYS[lists + 2]

-- kombu's ack (the same two deletions), carried here instead of in a round trip of its own
if #ARGV > 2 then
  redis.call('ZREM', index, unpack(ARGV, 3))
  redis.call('HDEL', unacked, unpack(ARGV, 3))
end

-- the last wake-up of each stream so far, to wait for the next one
local function wake_ids(reply)
  for i = lists + 3, #KEYS do
    local last = redis.call('XREVRANGE', KEYS[i], '+', '-', 'COUNT', 1)
    reply[#reply + 1] = #last > 0 and last[1][1] or '0-0'
  end
  return reply
end

for i = 1, lists do
  local item = redis.call('RPOP', KEYS[i])
  if item then
    local reply = {i, item, ''}
    local ok, msg = pcall(cjson.decode, item)
    local props = ok and type(msg) == 'table' and msg['properties']
    local info = type(props) == 'table' and props['delivery_info']
    local tag = type(props) == 'table' and props['delivery_tag']
    if type(info) == 'table' and type(tag) == 'string' then
      -- the same value kombu writes: [message, exchange, routing key]
      local entry = '[' .. item .. ',' .. cjson.encode(info['exchange']) .. ','
        .. cjson.encode(info['routing_key']) .. ']'
      redis.call('ZADD', index, ARGV[1], tag)
      redis.call('HSET', unacked, tag, entry)
      reply[3] = tag
    end
    -- the lists before this one are empty; when the rest are too, the ids to wait from
    for j = i, lists do
      if redis.call('LLEN', KEYS[j]) > 0 then return reply end
    end
    return wake_ids(reply)
  end
end
return wake_ids({0})
"""

FETCH_SHA = hashlib.sha1(FETCH_SCRIPT.encode()).hexdigest()

WAKE_STREAM_PREFIX = "bridge.wake."
WAKE_STREAM_LENGTH = 1000
# A queue's stream goes away a day after its last push: replies to `celery inspect` and
# `celery control` go to a new queue per client, each of which would leave a stream.
WAKE_STREAM_TTL_S = 86400
# Producers that are not this transport do not write to the streams; their messages are
# fetched when the wait times out.
WAKE_WAIT_MS = 1000
# Acks no fetch has carried are written together by a timer this often; after a failed
# write it pauses, doubling the pause up to ACK_BACKOFF_MAX_S, until the broker answers.
ACK_DELAY_S = 0.1
ACK_BACKOFF_MAX_S = 5.0
# At most this many acks ride on one fetch (each is an argument of the script).
ACKS_PER_FETCH = 200

log = structlog.get_logger("workers.redis_transport")


def wake_stream(queue: str) -> str:
    """The wake-up stream of ``queue``: a push wakes only the consumers of its queue."""
    return WAKE_STREAM_PREFIX + queue


def _wake(pipe: Any, queue: str) -> None:
    """After a push to ``queue``, in the same pipeline: wake its waiting consumers."""
    stream = wake_stream(queue)
    pipe.xadd(stream, {"q": queue}, maxlen=WAKE_STREAM_LENGTH, approximate=True)
    pipe.expire(stream, WAKE_STREAM_TTL_S)


class QoS(kombu_redis.QoS):
    def append(self, message: Any, delivery_tag: str) -> None:
        if delivery_tag in self.channel.recorded:
            # the fetch script has already written it to unacked: only the local bookkeeping
            self.channel.recorded.discard(delivery_tag)
            virtual.QoS.append(self, message, delivery_tag)
        else:
            super().append(message, delivery_tag)

    def ack(self, delivery_tag: str) -> None:
        channel = self.channel
        if not channel.defers_acks():
            super().ack(delivery_tag)
            return
        channel.acks_due.append(delivery_tag)
        virtual.QoS.ack(self, delivery_tag)  # the credit is free now: the next fetch carries it

    def can_consume(self) -> bool:
        able = bool(super().can_consume())
        if not able:
            # The worker stops polling until a task ends. Messages pushed meanwhile may
            # have come without a wake-up (a stock producer): fetch when it resumes.
            self.channel.wait_ids_stale = True
        return able


class Channel(kombu_redis.Channel):
    QoS = QoS

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        self._sync_client: Any = None  # see conn_or_acquire
        self.recorded: set[str] = set()  # delivery tags the fetch script put in unacked
        self._pending: str | None = None  # "fetch" or "wake": the command in flight
        self._fetch_keys: list[str] = []
        self._fetch_streams: list[str] = []
        # the streams to wait on and the ids to wait from, once the queues were found empty
        self._wake_from: tuple[list[str], list[str]] | None = None
        # set by QoS.can_consume when the worker ran out of credit since its last fetch
        self.wait_ids_stale = False
        # tags acked but not yet removed from unacked (appended by any thread; taken by the
        # fetch, the timer and the close), and those the fetch in flight carries
        self.acks_due: deque[str] = deque()
        self._fetch_acks: list[str] = []
        self._acks_backoff = 0.0  # after a failed flush: the pause before the timer's next try
        self._acks_retry_at = 0.0
        super().__init__(*args, **kwargs)

    def _connparams(self, asynchronous: bool = False) -> Any:
        transport = self.connection
        if transport is None or transport.client is None:
            # When the broker goes away, Celery collects and then closes the
            # connection; closing a channel left open asks it for a new pool (to restore
            # its unacked messages, or for an ack still queued on the event loop) after
            # the connection has let go of its URL. kombu then fails with AttributeError
            # ('NoneType' object has no attribute 'hostname'), which ends the worker as
            # an unrecoverable error. A connection error is what those callers ignore
            # (or log, for an ack); the messages stay in unacked for the visibility-
            # timeout sweep, and a task whose ack was refused runs again then.
            raise RedisConnectionError("the broker connection is closed")
        return super()._connparams(asynchronous=asynchronous)

    @contextmanager
    def conn_or_acquire(self, client: Any = None) -> Iterator[Any]:
        # kombu builds a new redis-py client, with its table of ~100 reply callbacks, for
        # every publish, ack and reject; one client per connection pool does the same
        # work (a client holds no connection of its own; the pool is thread-safe)
        if client:
            yield client
            return
        pool = self.pool  # a new pool after a fork or a reconnect: a new client with it
        cached = self._sync_client
        if cached is None or cached.connection_pool is not pool:
            cached = self._sync_client = self._create_client()
        yield cached

    def _ours(self) -> bool:
        # Without an event loop (a plain drain_events) kombu's blocking pop is the only
        # way to wait; with a global key prefix the script's keys would not match.
        return getattr(self.connection, "event_loop", None) is not None and not (
            self.global_keyprefix
        )

    def defers_acks(self) -> bool:
        """Acks wait for the next fetch: the worker's event loop flushes the ones left."""
        timer = getattr(self.connection, "ack_timer", None)
        return timer is not None and not timer.canceled and not self._closing and self._ours()

    def _take_acks(self, limit: int) -> list[str]:
        due = self.acks_due
        tags: list[str] = []
        while due and len(tags) < limit:
            tags.append(due.popleft())
        return tags

    def flush_acks(self, last: bool = False) -> bool:
        """Write the acks no fetch has carried, one round trip per ``ACKS_PER_FETCH``.

        On failure the acks are kept and False is returned; the timer tries again after a
        pause that doubles up to ``ACK_BACKOFF_MAX_S`` (a broker that does not answer
        holds the event loop for each try), fetches carry them meanwhile. ``last``: the
        channel is closing, no pause, and the acks are dropped if they fail.
        """
        if not last and self.acks_due and monotonic() < self._acks_retry_at:
            return False
        while self.acks_due:
            tags = self._take_acks(ACKS_PER_FETCH)
            try:
                with self.conn_or_acquire() as client, client.pipeline() as pipe:
                    pipe.zrem(self.unacked_index_key, *tags)
                    pipe.hdel(self.unacked_key, *tags)
                    pipe.execute()
            except Exception as exc:
                self.acks_due.extendleft(reversed(tags))
                if last:
                    # as after an ack refused on kombu's own transport
                    log.warning(
                        "acks not written: those tasks run again after the visibility timeout",
                        error=str(exc),
                        tasks=len(self.acks_due),
                    )
                    self.acks_due.clear()
                elif not self._acks_backoff:
                    log.warning("acks not written yet", error=str(exc), tasks=len(self.acks_due))
                self._acks_backoff = min(ACK_BACKOFF_MAX_S, 2 * (self._acks_backoff or ACK_DELAY_S))
                self._acks_retry_at = monotonic() + self._acks_backoff
                return False
        self._acks_backoff = self._acks_retry_at = 0.0
        return True

    def close(self) -> None:
        if self.closed:
            super().close()
            return
        # kombu's flag, set here before its close sets it: from now on acks are written
        # at once, not left for a fetch or a timer that will not come
        self._closing = True
        try:
            try:
                if self._in_poll:
                    # the fetch in flight may carry acks; if it fails, they come back to
                    # be written below (kombu's close would read it after them)
                    self._brpop_read()
            except Exception as exc:  # Empty, or the broker's failure: the close goes on
                log.debug("last poll before close", error=repr(exc))
            self.flush_acks(last=True)
        finally:
            super().close()

    def _on_connection_disconnect(self, connection: Any) -> None:
        if connection is self._in_poll:
            # the fetch is given up without its reply (kombu's health check disconnects
            # one that is overdue): whether its acks were written is not known, so they
            # go with the next fetch, or the close
            self._keep_acks()
            self._pending = None
        super()._on_connection_disconnect(connection)

    def _put(self, queue: str, message: Any, **kwargs: Any) -> None:
        if (
            kwargs.get("_publish_batch") is not None
            or self.global_keyprefix
            or (self._expires and queue in self._expires)
        ):
            super()._put(queue, message, **kwargs)
            return
        key = self._q_for_pri(queue, self._get_message_priority(message, reverse=False))
        with self.conn_or_acquire() as client, client.pipeline(transaction=False) as pipe:
            pipe.lpush(key, wire_json.dumps(message))
            # after the push: a consumer that missed the message is woken by this entry
            _wake(pipe, queue)
            pipe.execute()

    def _brpop_start(self, timeout: float | None = None) -> None:
        if not self._ours():
            super()._brpop_start(timeout)
            return
        connection = self.client.connection
        # a fetch given up without its reply hands its acks on (also done on disconnect)
        self._keep_acks()
        if self.wait_ids_stale:
            self._wake_from = None
        if self._wake_from is not None:
            # the queues were empty at the last fetch: block until a producer writes after it
            (streams, ids), self._wake_from = self._wake_from, None
            self._pending = "wake"
            self._in_poll = connection
            self._brpop_sent_at = monotonic()
            connection.send_command(
                "XREAD", "COUNT", 1, "BLOCK", WAKE_WAIT_MS, "STREAMS", *streams, *ids
            )
            return
        queues = self._queue_cycle.consume(len(self.active_queues))
        if not queues:
            return
        keys = [self._q_for_pri(queue, pri) for pri in self.priority_steps for queue in queues]
        lists = len(keys)
        streams = [wake_stream(queue) for queue in queues]
        keys += [self.unacked_key, self.unacked_index_key, *streams]
        self._fetch_keys = keys
        self._fetch_streams = streams
        # the ids this fetch answers are good to wait from unless credit runs out before
        # the wait is sent (even while the reply is held back for want of credit)
        self.wait_ids_stale = False
        acks = self._fetch_acks = self._take_acks(ACKS_PER_FETCH)
        self._pending = "fetch"
        self._in_poll = connection
        self._brpop_sent_at = monotonic()
        # by its digest: the script's text is not sent (nor hashed by Redis) on every fetch
        connection.send_command("EVALSHA", FETCH_SHA, len(keys), *keys, time(), lists, *acks)

    def _keep_acks(self) -> None:
        if self._fetch_acks:
            self.acks_due.extendleft(reversed(self._fetch_acks))
            self._fetch_acks = []

    def _wait_from(self, ids: list[bytes]) -> None:
        self._wake_from = (self._fetch_streams, [i.decode() for i in ids])

    def _do_restore_message(
        self, payload: Any, exchange: str, routing_key: str, pipe: Any, leftmost: bool = False
    ) -> None:
        # kombu's requeue (a reject, a visibility-timeout restore) pushes without _put: add
        # the wake-up, or a worker waiting since it took the last message would see the
        # message only when its wait times out
        super()._do_restore_message(payload, exchange, routing_key, pipe, leftmost)
        if self.global_keyprefix:
            return  # its consumers pop with kombu's BRPOP, not by wake-ups
        try:
            queues = self._lookup(exchange, routing_key)
        except self.connection_errors:
            raise
        except Exception:
            # the bindings cannot be read (kombu's restore above logged it if it failed
            # too): waiting consumers fetch the message when their wait times out
            return
        for queue in queues:
            _wake(pipe, queue)

    def _brpop_read(self, **options: Any) -> bool:
        pending = self._pending
        if pending is None:
            return bool(super()._brpop_read(**options))
        try:
            try:
                command = "EVALSHA" if pending == "fetch" else "XREAD"
                try:
                    reply = self.client.parse_response(self.client.connection, command, **options)
                except BaseException:
                    # the script did not run (NOSCRIPT, a read-only replica after a
                    # failover), or it is not known whether it did (a lost connection):
                    # its acks go with the next fetch, as deleting twice is harmless
                    self._keep_acks()
                    raise
            except self.connection_errors:
                self.client.connection.disconnect()
                raise
            except NoScriptError:
                # a new or restarted Redis: nothing ran; load the script, fetch again
                self.client.script_load(FETCH_SCRIPT)
                raise Empty() from None
            if pending == "fetch":
                # the broker answers: acks left to the timer need not wait for its pause
                self._acks_backoff = self._acks_retry_at = 0.0
            if pending == "wake":  # something was published, or the wait timed out
                raise Empty()
            index = int(reply[0])
            if index == 0:
                self._wait_from(reply[1:])
                raise Empty()
            dest = self._fetch_keys[index - 1].rsplit(self.sep, 1)[0]
            if reply[2]:
                self.recorded.add(reply[2].decode())
            if len(reply) > 3:
                # that was the last message queued: wait next, rather than fetch nothing
                self._wait_from(reply[3:])
            self._queue_cycle.rotate(dest)
            self.connection._deliver(wire_json.loads(reply[1]), dest)
            return True
        finally:
            self._pending = None
            self._fetch_acks = []
            self._fetch_keys = []
            self._fetch_streams = []
            self._in_poll = None
            self._flush_brpop_reauth()


class Transport(kombu_redis.Transport):
    Channel = Channel

    event_loop: Any = None
    ack_timer: Any = None

    def register_with_event_loop(self, connection: Any, loop: Any) -> None:
        self.event_loop = loop
        super().register_with_event_loop(connection, loop)
        if self.ack_timer is not None:
            self.ack_timer.cancel()
        self.ack_timer = loop.call_repeatedly(ACK_DELAY_S, self._flush_acks)

    def _flush_acks(self) -> None:
        for channel in list(self.channels):
            channel.flush_acks()

    def close_connection(self, connection: Any) -> None:
        if self.ack_timer is not None:
            self.ack_timer.cancel()
            self.ack_timer = None
        super().close_connection(connection)
