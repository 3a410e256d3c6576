"""Protection of the ITSM: one rate limit and one circuit breaker for every worker.

Both live in Redis, so all processes of all workers on all hosts share them, and
both use the Redis server's clock (``TIME`` inside the scripts), so hosts whose
clocks disagree still agree on the limit and on when the circuit may close.

Rate limit
    A token bucket kept as GCRA (one "theoretical arrival time" per bucket): up to
    ``burst`` calls at once, then ``rate`` calls per second. A call that finds no
    token reserves the next free slot and sleeps exactly until it, if that is at
    most ``max_wait_s`` away; otherwise it reserves nothing and raises
    ``Throttled`` with ``retry_after`` = the wait, so the pipeline reschedules the
    action instead of holding a worker. ``rate = 0`` switches the limit off.

Circuit breaker
    ``failures`` consecutive transient or ambiguous failures (connection refused,
    timeouts, 5xx, 429) open the circuit for ``open_s`` seconds. While it is open
    every call fails at once with ``CircuitOpen`` (``retry_after`` = the time left)
    without touching the network. Then the circuit is half-open: exactly one call
    in the whole fleet (``SET NX`` on the probe key) goes through as a probe; its
    success closes the circuit, its failure opens it for another ``open_s``.
    Any answer of the server that is not a transient failure (2xx, 4xx, a refused
    password) proves it is up and counts as a success. ``failures = 0`` switches
    the breaker off.

Priorities
    Calls made inside ``low_priority()`` (cosmetic updates: occurrence notes,
    severity notes) may not take the last half of the burst and never wait for a
    slot: they are throttled at once and rescheduled, so the slots that remain
    serve creates and resolves first, even behind a backlog of updates.

Only resource calls (create, get, update, search, note) pass the guard. The token
endpoint does not take rate tokens: its grants are single-flight across all
processes (one per token lifetime), so they cannot turn into load. A token grant
that fails for a transient reason inside a guarded call does count as that call's
failure, since it is the same server being down.
"""

from __future__ import annotations

import contextlib
import contextvars
import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import structlog

from bridge.itsm.errors import AmbiguousError, ItsmError, TransientError

log = structlog.get_logger(__name__)

_LOW_PRIORITY: contextvars.ContextVar[bool] = contextvars.ContextVar(
    "itsm_low_priority", default=False
)


@contextlib.contextmanager
def low_priority() -> Iterator[None]:
    """ITSM calls inside this block yield rate-limit slots to urgent ones."""
    reset = _LOW_PRIORITY.set(True)
    try:
        yield
    finally:
        _LOW_PRIORITY.reset(reset)


CLOSED = "closed"
OPEN = "open"
HALF_OPEN = "half_open"
# Breaker state outlives the open period by this much, then expires (no stale garbage).
_STATE_TTL_S = 24 * 3600


class GuardRefusal(TransientError):
    """The guard refused the call before it was sent: nothing reached the ITSM."""


class Throttled(GuardRefusal):
    """The shared rate limit has no slot within the bounded wait; retry after ``retry_after``."""

    reason = "itsm_throttled"


class CircuitOpen(GuardRefusal):
    """The ITSM failed repeatedly; calls are refused until ``retry_after`` has passed."""

    reason = "itsm_circuit_open"


# KEYS: breaker hash, probe key, rate key
# ARGV: rate/s (0 = off), burst, max wait s, breaker on (1/0), probe token, probe lease ms,
#       open s, slots of the burst held back for urgent calls (0 for urgent calls)
# -> {"go", wait_s, probe (0/1), failures} | {"open", retry_after_s} | {"throttled", wait_s}
_ACQUIRE = """
local t = redis.call('TIME')
local now = tonumber(t[1]) + tonumber(t[2]) / 1000000
local rate = tonumber(ARGV[1])
local burst = tonumber(ARGV[2])
local max_wait = tonumber(ARGV[3])
local probe = 0
local failures = 0
if ARGV[4] == '1' then
  local state = redis.call('HMGET', KEYS[1], 'open_until', 'failures')
  local open_until = tonumber(state[1] or '0') or 0
  failures = tonumber(state[2] or '0') or 0
  if open_until > 0 then
    if now < open_until then
      return {'open', tostring(open_until - now)}
    end
    local ttl = redis.call('PTTL', KEYS[2])
    if ttl > 0 then
      -- another process is probing: come back after its verdict (at most one open period)
      return {'open', tostring(math.min(ttl / 1000, tonumber(ARGV[7])))}
    end
    probe = 1
  end
end
local wait = 0
if rate > 0 then
  local interval = 1 / rate
  local tat = tonumber(redis.call('GET', KEYS[3]) or '0') or 0
  if tat < now then tat = now end
  local new_tat = tat + interval
  wait = new_tat - now - (burst - (tonumber(ARGV[8]) or 0)) * interval
  if wait < 0.000001 then wait = 0 end
  if wait > max_wait then
    return {'throttled', tostring(wait)}
  end
  redis.call('SET', KEYS[3], tostring(new_tat), 'PX', math.ceil((new_tat - now) * 1000) + 1000)
end
if probe == 1 then
  redis.call('SET', KEYS[2], ARGV[5], 'PX', tonumber(ARGV[6]))
end
return {'go', tostring(wait), probe, failures}
"""

# KEYS: breaker hash, probe key;  ARGV: probe token ('' when not the probe)
_SUCCESS = """
if ARGV[1] ~= '' then
  if redis.call('GET', KEYS[2]) == ARGV[1] then redis.call('DEL', KEYS[2]) end
  redis.call('HDEL', KEYS[1], 'open_until')
  redis.call('HSET', KEYS[1], 'failures', 0)
  return 'closed'
end
local open_until = tonumber(redis.call('HGET', KEYS[1], 'open_until') or '0') or 0
if open_until > 0 then
  -- a call sent before the circuit opened: only the probe may close it
  return 'open'
end
if redis.call('EXISTS', KEYS[1]) == 1 then redis.call('HSET', KEYS[1], 'failures', 0) end
return 'closed'
"""

# KEYS: breaker hash, probe key;  ARGV: threshold, open s, probe token, state ttl s
_FAILURE = """
local t = redis.call('TIME')
local now = tonumber(t[1]) + tonumber(t[2]) / 1000000
local open_s = tonumber(ARGV[2])
if ARGV[3] ~= '' then
  if redis.call('GET', KEYS[2]) == ARGV[3] then redis.call('DEL', KEYS[2]) end
  redis.call('HSET', KEYS[1], 'open_until', tostring(now + open_s))
  redis.call('HINCRBY', KEYS[1], 'opens', 1)
  redis.call('EXPIRE', KEYS[1], ARGV[4])
  return 'reopened'
end
local open_until = tonumber(redis.call('HGET', KEYS[1], 'open_until') or '0') or 0
if open_until > 0 then
  return 'open'
end
local n = redis.call('HINCRBY', KEYS[1], 'failures', 1)
redis.call('EXPIRE', KEYS[1], ARGV[4])
if n >= tonumber(ARGV[1]) then
  redis.call('HSET', KEYS[1], 'open_until', tostring(now + open_s))
  redis.call('HINCRBY', KEYS[1], 'opens', 1)
  return 'opened'
end
return 'closed'
"""

# KEYS: probe key;  ARGV: probe token — a probe that proved nothing hands the turn on
_RELEASE = """
if redis.call('GET', KEYS[1]) == ARGV[1] then return redis.call('DEL', KEYS[1]) end
return 0
"""


@dataclass(frozen=True, slots=True)
class CircuitState:
    """The breaker as metrics and operators see it."""

    state: str  # closed | open | half_open
    failures: int  # consecutive failures counted while closed
    open_remaining_s: float  # 0 unless open
    opens: int  # times the circuit opened (kept while the breaker's state lives in Redis)


@dataclass(frozen=True, slots=True)
class Permit:
    """One guarded call in flight; hand it back with ``success``/``failure``/``release``."""

    probe_token: str  # '' unless this call is the half-open probe
    failures_seen: int  # consecutive failures when the call was let through


class Guard:
    """The rate limit and circuit breaker in front of every ITSM resource call."""

    def __init__(
        self,
        redis: Any,
        *,
        prefix: str = "bridge",
        rate_per_s: float = 0.0,
        burst: int = 10,
        max_wait_s: float = 2.0,
        breaker_failures: int = 0,
        breaker_open_s: float = 30.0,
        probe_lease_s: float = 60.0,
        sleep: Callable[[float], None] = time.sleep,
    ) -> None:
        self._redis = redis
        self.rate_per_s = max(0.0, float(rate_per_s))
        self.burst = max(1, int(burst))
        self.max_wait_s = max(0.0, float(max_wait_s))
        self.breaker_failures = max(0, int(breaker_failures))
        self.breaker_open_s = float(breaker_open_s)
        self._probe_lease_ms = max(1000, int(probe_lease_s * 1000))
        self._sleep = sleep
        self._breaker_key = f"{prefix}:itsm:breaker"
        self._probe_key = f"{prefix}:itsm:breaker:probe"
        self._rate_key = f"{prefix}:itsm:rate"
        self._acquire = redis.register_script(_ACQUIRE)
        self._success = redis.register_script(_SUCCESS)
        self._failure = redis.register_script(_FAILURE)
        self._release = redis.register_script(_RELEASE)

    @classmethod
    def from_settings(cls, settings: Any, redis: Any) -> Guard | None:
        """The configured guard, or None when both the limit and the breaker are off."""
        if settings.itsm_rate_limit_per_s <= 0 and settings.itsm_breaker_failures <= 0:
            return None
        return cls(
            redis,
            prefix=settings.redis_prefix,
            rate_per_s=settings.itsm_rate_limit_per_s,
            burst=settings.itsm_rate_limit_burst,
            max_wait_s=settings.itsm_rate_limit_max_wait_s,
            breaker_failures=settings.itsm_breaker_failures,
            breaker_open_s=settings.itsm_breaker_open_s,
            # the probe is one call: bounded by its timeouts and the rate-limit wait
            probe_lease_s=settings.itsm_connect_timeout_s
            + settings.itsm_read_timeout_s
            + settings.itsm_rate_limit_max_wait_s
            + 5.0,
        )

    def __repr__(self) -> str:
        return (
            f"Guard(rate_per_s={self.rate_per_s}, burst={self.burst}, "
            f"breaker_failures={self.breaker_failures}, breaker_open_s={self.breaker_open_s})"
        )

    @property
    def breaker_on(self) -> bool:
        return self.breaker_failures > 0

    # ------------------------------------------------------------ the call path

    def acquire(self, operation: str = "") -> Permit:
        """Let one call through (after a bounded wait for a rate slot) or raise.

        Raises ``CircuitOpen`` while the circuit is open (or another process holds the
        half-open probe) and ``Throttled`` when no rate slot is free within the wait.
        """
        token = uuid.uuid4().hex
        low = _LOW_PRIORITY.get()
        reserve = self.burst // 2 if low else 0
        max_wait = 0.0 if low else self.max_wait_s
        reply = self._acquire(
            keys=[self._breaker_key, self._probe_key, self._rate_key],
            args=[
                repr(self.rate_per_s),
                self.burst,
                repr(max_wait),
                "1" if self.breaker_on else "0",
                token,
                self._probe_lease_ms,
                repr(self.breaker_open_s),
                reserve,
            ],
        )
        verdict = _text(reply[0])
        if verdict == "open":
            retry_after = max(0.0, float(_text(reply[1])))
            raise CircuitOpen(
                f"ITSM {operation or 'call'} not sent: the circuit is open after repeated "
                f"failures (retry in {retry_after:.1f}s)",
                retry_after=retry_after,
                operation=operation,
            )
        if verdict == "throttled":
            retry_after = float(_text(reply[1]))
            raise Throttled(
                f"ITSM {operation or 'call'} not sent: the shared rate limit of "
                f"{self.rate_per_s:g}/s is exhausted (retry in {retry_after:.1f}s)",
                retry_after=retry_after,
                operation=operation,
            )
        wait = float(_text(reply[1]))
        probe = int(reply[2]) == 1
        if probe:
            log.info("itsm circuit half-open: this call is the probe", op=operation)
        if wait > 0:
            self._sleep(wait)
        return Permit(probe_token=token if probe else "", failures_seen=int(reply[3]))

    def success(self, permit: Permit) -> None:
        """The server answered (any answer that is not a transient failure)."""
        if not self.breaker_on or (not permit.probe_token and permit.failures_seen == 0):
            return  # the common case costs no extra round trip
        state = _text(
            self._success(keys=[self._breaker_key, self._probe_key], args=[permit.probe_token])
        )
        if permit.probe_token and state == CLOSED:
            log.warning("itsm circuit closed: the probe call succeeded")

    def failure(self, permit: Permit, error: BaseException | None = None) -> None:
        """The call failed transiently (no answer, timeout, 5xx, 429)."""
        if not self.breaker_on:
            return
        state = _text(
            self._failure(
                keys=[self._breaker_key, self._probe_key],
                args=[
                    self.breaker_failures,
                    repr(self.breaker_open_s),
                    permit.probe_token,
                    _STATE_TTL_S,
                ],
            )
        )
        if state in {"opened", "reopened"}:
            log.warning(
                "itsm circuit opened: calls fail fast until a probe succeeds",
                after=state,
                open_s=self.breaker_open_s,
                error=type(error).__name__ if error is not None else None,
            )

    def release(self, permit: Permit) -> None:
        """The call proved nothing about the server (a local error): pass the probe on."""
        if permit.probe_token:
            self._release(keys=[self._probe_key], args=[permit.probe_token])

    def record(self, permit: Permit, error: BaseException | None) -> None:
        """Record a call's outcome: ``None`` for an answer, else what it raised."""
        if error is None:
            self.success(permit)
        elif isinstance(error, GuardRefusal):
            self.release(permit)
        elif is_failure(error):
            self.failure(permit, error)
        elif _is_answer(error):
            self.success(permit)
        else:
            self.release(permit)

    # ------------------------------------------------------------ observation

    def state(self) -> CircuitState:
        """The breaker's state now (for metrics and ``bridge`` diagnostics)."""
        pipe = self._redis.pipeline(transaction=False)
        pipe.time()
        pipe.hmget(self._breaker_key, "open_until", "failures", "opens")
        pipe.pttl(self._probe_key)
        (secs, micros), (open_until, failures, opens), _probe_ttl = pipe.execute()
        now = int(secs) + int(micros) / 1e6
        until = float(_text(open_until)) if open_until else 0.0
        if until <= 0:
            state, remaining = CLOSED, 0.0
        elif now < until:
            state, remaining = OPEN, until - now
        else:
            state, remaining = HALF_OPEN, 0.0
        return CircuitState(
            state=state,
            failures=int(failures or 0),
            open_remaining_s=round(remaining, 3),
            opens=int(opens or 0),
        )

    def reset(self) -> None:
        """Close the circuit and empty the rate bucket (operators, tests)."""
        self._redis.delete(self._breaker_key, self._probe_key, self._rate_key)


def is_failure(error: BaseException) -> bool:
    """True for the failures that count against the breaker: the server is not coping."""
    if isinstance(error, GuardRefusal):
        return False
    return isinstance(error, TransientError | AmbiguousError)


def _is_answer(error: BaseException) -> bool:
    """An error built from a status the server sent (a 4xx, a refused password)."""
    return isinstance(error, ItsmError) and error.status is not None


def _text(value: Any) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)
