"""What ``bridge status`` reports: can the bridge reach what it needs, and how much waits.

Each dependency gets one probe (the broker, Redis, the ITSM) answering ok or why
not in one sentence; the queue depths come from the broker itself (``LLEN`` on a
Redis broker, a passive ``queue.declare`` on RabbitMQ) and the dead-letter count
from the store. Every probe is bounded by a timeout, so a dead dependency costs
seconds, not minutes. The caller passes the queue names and the ITSM check in.
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import urlsplit, urlunsplit

from bridge.settings import Settings

# kombu's Redis transport keeps one list per priority step: the queue's own name
# for priority 0 and "<name>\x06\x16<step>" for the others.
_KOMBU_PRIORITY_SEP = "\x06\x16"
_KOMBU_PRIORITY_STEPS = (3, 6, 9)
DEFAULT_TIMEOUT_S = 3.0


@dataclass(frozen=True, slots=True)
class Probe:
    """One dependency: reachable or not, and a sentence saying so."""

    name: str
    ok: bool
    detail: str


@dataclass(frozen=True)
class Status:
    probes: tuple[Probe, ...]
    queues: dict[str, int | None] = field(default_factory=dict)  # None: could not be read
    dead_letters: int | None = None

    @property
    def ok(self) -> bool:
        """True when every dependency answered."""
        return all(p.ok for p in self.probes)

    def to_dict(self) -> dict[str, Any]:
        return {
            "ok": self.ok,
            "checks": {p.name: {"ok": p.ok, "detail": p.detail} for p in self.probes},
            "queues": dict(self.queues),
            "dead_letters": self.dead_letters,
        }


def display_url(url: str) -> str:
    """The URL with any password replaced by ``***``."""
    parts = urlsplit(url)
    if parts.password is None:
        return url
    host = parts.hostname or ""
    if parts.port:
        host += f":{parts.port}"
    user = f"{parts.username}:***@" if parts.username else ":***@"
    return urlunsplit((parts.scheme, user + host, parts.path, parts.query, parts.fragment))


def _error(exc: BaseException) -> str:
    text = str(exc).strip() or type(exc).__name__
    return text.splitlines()[0][:200]


def probe_redis(redis: Any, url: str) -> Probe:
    """PING the state store."""
    if not url:
        return Probe("redis", False, "not configured (set BRIDGE_REDIS_URL)")
    try:
        redis.ping()
    except Exception as exc:
        return Probe("redis", False, f"{display_url(url)} did not answer: {_error(exc)}")
    return Probe("redis", True, f"{display_url(url)} answered PING")


def _redis_broker(url: str, queues: Sequence[str], timeout: float) -> tuple[Probe, dict[str, Any]]:
    import redis as redis_lib

    client = redis_lib.Redis.from_url(url, socket_timeout=timeout, socket_connect_timeout=timeout)
    try:
        with client.pipeline(transaction=False) as pipe:
            pipe.ping()
            for queue in queues:
                pipe.llen(queue)
                for step in _KOMBU_PRIORITY_STEPS:
                    pipe.llen(f"{queue}{_KOMBU_PRIORITY_SEP}{step}")
            replies = pipe.execute()
    except Exception as exc:
        depths: dict[str, Any] = dict.fromkeys(queues)
        return Probe("broker", False, f"{display_url(url)} did not answer: {_error(exc)}"), depths
    finally:
        client.close()
    per_queue = 1 + len(_KOMBU_PRIORITY_STEPS)
    lengths = replies[1:]
    depths = {
        queue: sum(int(n) for n in lengths[i * per_queue : (i + 1) * per_queue])
        for i, queue in enumerate(queues)
    }
    return Probe("broker", True, f"{display_url(url)} answered PING"), depths


def _amqp_broker(url: str, queues: Sequence[str], timeout: float) -> tuple[Probe, dict[str, Any]]:
    from kombu import Connection

    depths: dict[str, Any] = dict.fromkeys(queues)
    try:
        with Connection(url, connect_timeout=timeout) as conn:
            conn.ensure_connection(
                max_retries=1, interval_start=0, interval_step=0, timeout=timeout
            )
            for queue in queues:
                # A passive declare of a missing queue closes the channel: one channel each.
                channel = conn.channel()
                try:
                    _, count, _ = channel.queue_declare(queue=queue, passive=True)
                    depths[queue] = int(count)
                except Exception:
                    depths[queue] = None  # not declared yet: no worker has started
                finally:
                    # already closed by the broker if the queue was missing
                    with contextlib.suppress(Exception):
                        channel.close()
    except Exception as exc:
        return Probe("broker", False, f"{display_url(url)} did not answer: {_error(exc)}"), depths
    return Probe("broker", True, f"{display_url(url)} accepted a connection"), depths


def probe_broker(
    url: str, queues: Sequence[str], timeout: float = DEFAULT_TIMEOUT_S
) -> tuple[Probe, dict[str, int | None]]:
    """Connect to the broker and read the depth of each queue."""
    if not url:
        return Probe("broker", False, "not configured (set BRIDGE_BROKER_URL)"), dict.fromkeys(
            queues
        )
    scheme = urlsplit(url).scheme
    if scheme in {"redis", "rediss", "unix"}:
        return _redis_broker(url, queues, timeout)
    if scheme in {"amqp", "amqps", "pyamqp"}:
        return _amqp_broker(url, queues, timeout)
    return Probe("broker", False, f"unsupported broker scheme {scheme!r}"), dict.fromkeys(queues)


def probe_itsm(settings: Settings, check: Callable[[Settings], Any]) -> Probe:
    """A token and one read call (``bridge.itsm.check``), timed."""
    if not settings.itsm_url:
        return Probe("itsm", False, "not configured (set BRIDGE_ITSM_URL)")
    started = time.monotonic()
    try:
        result = check(settings)
    except Exception as exc:
        return Probe("itsm", False, f"the check failed: {_error(exc)}")
    took = time.monotonic() - started
    return Probe("itsm", bool(result.ok), f"{result.message} Took {took:.2f} s.")


def collect_status(
    settings: Settings,
    *,
    queues: Sequence[str],
    redis: Any,
    dlq: Any,
    itsm_check: Callable[[Settings], Any],
    timeout: float = DEFAULT_TIMEOUT_S,
) -> Status:
    """Probe the broker, Redis and the ITSM; read queue depths and the dead-letter count."""
    broker, depths = probe_broker(settings.broker_url, queues, timeout)
    state = probe_redis(redis, settings.redis_url)
    dead_letters: int | None = None
    if state.ok:
        try:
            dead_letters = int(dlq.count())
        except Exception:
            dead_letters = None
    itsm = probe_itsm(settings, itsm_check)
    return Status(probes=(broker, state, itsm), queues=depths, dead_letters=dead_letters)


def render_text(status: Status) -> str:
    """The human form of a status: one line per dependency, then the queues."""
    lines = []
    for probe in status.probes:
        mark = "ok  " if probe.ok else "DOWN"
        lines.append(f"{probe.name:<8} {mark}  {probe.detail}")
    lines.append("")
    width = max((len(q) for q in status.queues), default=0)
    for queue, depth in status.queues.items():
        shown = "?" if depth is None else str(depth)
        lines.append(f"queue {queue:<{width}}  {shown:>8} waiting")
    shown = "?" if status.dead_letters is None else str(status.dead_letters)
    lines.append(f"dead letters {shown}" + ("  (bridge dlq list)" if status.dead_letters else ""))
    lines.append("")
    lines.append("all dependencies reachable" if status.ok else "something is down")
    return "\n".join(lines)
