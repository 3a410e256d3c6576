"""kombu's Redis transport with a fetch that cannot drop a message.

kombu takes a message with ``BRPOP`` and only then, in a second round trip, copies it
into the ``unacked`` hash that its restore sweep brings back after the visibility
timeout. A worker killed between the two (or with the ``BRPOP`` reply still in its
socket) loses the message for good: it is in neither place. Killing whole workers
under a steady stream of tasks loses about one message in a few thousand that way.

Here the pop and the copy into ``unacked`` are one Lua script, so a fetched message
is always somewhere a restore finds it. The hash entries have kombu's own layout, so
kombu's sweep, acks and rejects work on them unchanged, and stock workers can share
the broker. A script cannot block, so when the queues are empty the channel asks
again after a short pause that grows while they stay empty (2 ms up to 25 ms): an
idle worker costs Redis about 40 cheap calls a second, and a message waits at most
one pause before it is fetched.
"""

from __future__ import annotations

from queue import Empty
from time import monotonic, time
from typing import Any

from kombu.transport import redis as kombu_redis
from kombu.transport import virtual
from kombu.utils.json import loads

FETCH_SCRIPT = """
-- KEYS: the queue lists in the order BRPOP would read them, then kombu's unacked hash
-- and its index. ARGV[1]: the delivery time, on the clock the restore sweep reads.
local n = #KEYS
for i = 1, n - 2 do
  local item = redis.call('RPOP', KEYS[i])
  if item then
    local ok, msg = pcall(cjson.decode, item)
    local props = ok and type(msg) == 'table' and msg['properties']
    local info = type(props) == 'table' and props['delivery_info']
    local tag = type(props) == 'table' and props['delivery_tag']
    if type(info) == 'table' and type(tag) == 'string' then
      -- the same value kombu writes: [message, exchange, routing key]
      local entry = '[' .. item .. ',' .. cjson.encode(info['exchange']) .. ','
        .. cjson.encode(info['routing_key']) .. ']'
      redis.call('ZADD', KEYS[n], ARGV[1], tag)
      redis.call('HSET', KEYS[n - 1], tag, entry)
      return {i, item, tag}
    end
    return {i, item}
  end
end
return false
"""

IDLE_PAUSE_MIN_S = 0.002
IDLE_PAUSE_MAX_S = 0.025


class QoS(kombu_redis.QoS):
    def append(self, message: Any, delivery_tag: str) -> None:
        if self.channel.recorded.pop(delivery_tag, None) is not None:
            # the fetch script has already written it to unacked: only the local bookkeeping
            virtual.QoS.append(self, message, delivery_tag)
        else:
            super().append(message, delivery_tag)


class Channel(kombu_redis.Channel):
    QoS = QoS

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        self.recorded: dict[str, bool] = {}
        self._idle_pause = 0.0
        self._next_fetch_at = 0.0
        self._fetch_keys: list[str] = []
        super().__init__(*args, **kwargs)

    def _event_loop(self) -> Any:
        return getattr(self.connection, "event_loop", None)

    def _brpop_start(self, timeout: float | None = None) -> None:
        loop = self._event_loop()
        if loop is None:  # drained without an event loop: a blocking pop is all there is
            super()._brpop_start(timeout)
            return
        if monotonic() < self._next_fetch_at:
            return
        queues = self._queue_cycle.consume(len(self.active_queues))
        if not queues:
            return
        keys = [self._q_for_pri(queue, pri) for pri in self.priority_steps for queue in queues]
        keys += [self.unacked_key, self.unacked_index_key]
        if self.global_keyprefix:
            keys = [f"{self.global_keyprefix}{key}" for key in keys]
        self._fetch_keys = keys
        self._in_poll = self.client.connection
        self._brpop_sent_at = monotonic()
        self.client.connection.send_command("EVAL", FETCH_SCRIPT, len(keys), *keys, time())

    def _brpop_read(self, **options: Any) -> bool:
        if not self._fetch_keys:
            return bool(super()._brpop_read(**options))
        try:
            try:
                reply = self.client.parse_response(self.client.connection, "EVAL", **options)
            except self.connection_errors:
                self.client.connection.disconnect()
                raise
            if not reply:
                self._pause_fetching()
                raise Empty()
            self._idle_pause = 0.0
            dest = self._fetch_keys[int(reply[0]) - 1]
            if self.global_keyprefix:
                dest = dest.removeprefix(self.global_keyprefix)
            dest = dest.rsplit(self.sep, 1)[0]
            if len(reply) > 2:
                self.recorded[reply[2].decode()] = True
            self._queue_cycle.rotate(dest)
            self.connection._deliver(loads(reply[1].decode()), dest)
            return True
        finally:
            self._fetch_keys = []
            self._in_poll = None
            self._flush_brpop_reauth()

    def _pause_fetching(self) -> None:
        self._idle_pause = min(max(self._idle_pause * 2, IDLE_PAUSE_MIN_S), IDLE_PAUSE_MAX_S)
        self._next_fetch_at = monotonic() + self._idle_pause
        # wake the event loop when the pause ends; nothing else may be due before then
        self._event_loop().call_later(self._idle_pause, _nothing)


def _nothing() -> None:
    pass


class Transport(kombu_redis.Transport):
    Channel = Channel

    event_loop: Any = None

    def register_with_event_loop(self, connection: Any, loop: Any) -> None:
        self.event_loop = loop
        super().register_with_event_loop(connection, loop)
