"""Soak: a steady offered load through the real stack, memory measured at start and end.

    python -m bench.soak --minutes 10 --rate 100 [--json PATH] [--broker rabbitmq]

Starts what ``bridge bench`` starts (its Harness: the ITSM simulator in a thread of
this process at 5 ms per call, ``bridge serve`` and a prefork ``bridge worker`` with 2
pool processes as subprocesses), then offers ``--rate`` alerts/s over HTTP for
``--minutes``: a rolling population of ``--keys`` problems that appear, repeat,
change, escalate, resolve, relapse, go silent and are replaced by new ones, sent as
Alertmanager payloads of 1-5 alerts and as single generic alerts. The state TTL is
set short (``--state-ttl-s``, default 120 s) so retired keys expire during the run.

Every ``--sample-s`` it records the RSS of the ingest, the worker main process and
each pool child, Redis ``used_memory``, the bytes and keys of its own two databases,
dead letters, alerts accepted (202) and decided (``{prefix}:stats`` field ``alerts``)
and the queue depth. "start" is the first sample after ``--warmup-s`` (imports,
caches and connection pools are settled by then), "end" the sample when the load
stops. After the load it drains and checks the accounting.

Bounds (exit 1 when one is exceeded, 2 when the run could not be made):

- RSS of each process: growth from start to end <= max(10 % of start, 8 MiB). CPython
  RSS moves in steps (pymalloc arenas, malloc arenas per thread, pages touched once by
  a burst), a few MiB with no leak; 8 MiB is the floor of that noise for the ~40-70
  MiB processes here, 10 % for bigger ones. A leak of a few hundred bytes per alert
  decided exceeds it within 10 minutes at 100 alerts/s.
- Redis: the state database's bytes (MEMORY USAGE of every key) per live incident
  key <= 400 at the end (a tracked key is ~250-300 bytes; the rest is counters, the
  token, locks), and their growth from start to end <= 400 bytes x the live keys
  gained + 64 KiB. Live keys are bounded by the TTL, so this bounds Redis. The broker
  database holds only messages in flight (a backlog, not growth): once drained it
  must be back to <= 64 KiB. Server-wide ``used_memory`` is judged with the same
  allowance plus 1 MiB (allocator, client buffers, a backlog in flight) only when no
  other database on the server changed meanwhile; otherwise it is shown, not judged.
- Nothing lost, nothing doubled: every alert accepted is decided once (accepted ==
  decided after the drain), one ITSM create per new problem, no dead letter, no
  request refused, no pool process replaced, the offered rate achieved within 5 %.

Uses Redis databases 9 (broker) and 10 (state) by default and FLUSHES both before and
after; the key prefix is ``soak<pid>``.
"""

from __future__ import annotations

import argparse
import http.client
import math
import os
import random
import sys
import threading
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import orjson

from bridge.bench import (
    INGEST_TOKEN,
    RESERVED_DBS,
    BenchError,
    Harness,
    _children,
    _git_dirty,
    _rss_bytes,
    am_alert,
    am_payload,
    git_commit,
)

MIB = 2**20
RSS_GROWTH_RATIO = 0.10
RSS_GROWTH_FLOOR = 8 * MIB
BYTES_PER_LIVE_KEY = 400
STATE_BYTES_SLACK = 64 * 1024
BROKER_IDLE_BYTES = 64 * 1024
SERVER_BYTES_SLACK = 1 * MIB
RATE_TOLERANCE = 0.05
AM_PATH = "/api/v1/alerts/alertmanager"
GENERIC_PATH = "/api/v1/alerts"

# Per visit of a key: what the problem does next (see Population.visit).
P_GENERIC = 0.2  # share of keys sent by a generic source rather than Alertmanager
P_RESOLVE = 0.08  # a firing problem recovers
P_VANISH = 0.01  # a firing problem stops being sent without a recovery (state expires)
P_CHANGE = 0.15  # the value in the summary changes (an occurrence, not a snapshot repeat)
P_ESCALATE = 0.02  # warning becomes critical (written at once)
P_RELAPSE = 0.3  # a resolved problem fires again (reopen) instead of going away


# ------------------------------------------------------------------ options


def parse_args(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m bench.soak",
        description="Steady load through ingest, broker, workers and ITSM simulator; "
        "memory of every process and of Redis at start and end, checked against bounds.",
    )
    parser.add_argument("--minutes", type=float, default=10.0, help="load duration")
    parser.add_argument("--rate", type=float, default=100.0, help="offered alerts/s")
    parser.add_argument("--keys", type=int, default=2000, help="live problems at any time")
    parser.add_argument("--warmup-s", type=float, default=60.0, help="start figures after this")
    parser.add_argument("--sample-s", type=float, default=30.0, help="sampling interval")
    parser.add_argument("--state-ttl-s", type=int, default=120, help="dedup state TTL (>= 60)")
    parser.add_argument("--update-interval-s", type=int, default=60, help="dedup update interval")
    parser.add_argument("--flap-quiet-s", type=int, default=60, help="dedup flap quiet time")
    parser.add_argument("--broker", choices=("redis", "rabbitmq"), default="redis")
    parser.add_argument("--workers", type=int, default=2, help="prefork pool processes")
    parser.add_argument("--itsm-latency-ms", type=float, default=5.0)
    parser.add_argument("--redis-url", default="redis://127.0.0.1:6379")
    parser.add_argument("--broker-db", type=int, default=9, help="FLUSHED before and after")
    parser.add_argument("--state-db", type=int, default=10, help="FLUSHED before and after")
    parser.add_argument("--amqp-url", default="amqp://guest:guest@127.0.0.1:5672/bridge-soak")
    parser.add_argument("--seed", type=int, default=1, help="seed of the alert mix")
    parser.add_argument("--json", metavar="PATH", help="also write samples and verdicts as JSON")
    parser.add_argument("--keep-logs", action="store_true", help="keep the worker/ingest logs")
    # read by bridge.bench.Harness; not options of the soak
    parser.set_defaults(flavor="itsm", act_pool=None, intake_prefetch=1, profile=None)
    args = parser.parse_args(argv)
    if args.minutes * 60 <= args.warmup_s:
        parser.error("--minutes must outlast --warmup-s")
    if args.state_ttl_s < 60:
        parser.error("--state-ttl-s must be at least 60 (the bridge's minimum)")
    if args.rate <= 0 or args.keys < 10 or args.sample_s <= 0:
        parser.error("--rate must be positive, --keys at least 10, --sample-s positive")
    if 2 * args.keys / args.rate >= args.state_ttl_s:
        # a live problem re-sent less often than its TTL would expire and be created again
        parser.error("--state-ttl-s must exceed 2 x --keys / --rate (the longest re-send gap)")
    for db in (args.broker_db, args.state_db):
        if db in RESERVED_DBS:
            parser.error(f"Redis database {db} belongs to the test suites; pick another")
    if args.broker_db == args.state_db:
        parser.error("--broker-db and --state-db must differ")
    return args


# ------------------------------------------------------------------ the stack


class SoakHarness(Harness):
    """bridge bench's Harness with the soak's prefix and dedup timings."""

    def __init__(self, args: argparse.Namespace, prefix: str) -> None:
        super().__init__(args)
        from bridge.settings import load_settings

        self.prefix = prefix
        self.env.update(
            {
                "BRIDGE_REDIS_PREFIX": prefix,
                "BRIDGE_DEDUP_STATE_TTL_S": str(args.state_ttl_s),
                "BRIDGE_DEDUP_UPDATE_INTERVAL_S": str(args.update_interval_s),
                "BRIDGE_DEDUP_FLAP_QUIET_S": str(args.flap_quiet_s),
            }
        )
        # the publishing app of fresh() must see the same settings as the subprocesses
        self.settings = load_settings(env=self.env)

    def alerts_done(self) -> int:
        raw = self.state.hget(f"{self.prefix}:stats", "alerts")
        return int(raw) if raw else 0

    def dead_letters(self) -> int:
        return int(self.state.zcard(f"{self.prefix}:dlq:index"))


# ------------------------------------------------------------------ the load


@dataclass
class Problem:
    """One alerting problem as its source sees it."""

    serial: int
    generic: bool
    phase: str = "new"  # new | firing | resolved
    severity: str = "warning"
    value: int = 0

    @property
    def ident(self) -> str:
        return f"k{self.serial:015x}"


@dataclass
class Population:
    """A fixed number of live problems; one that goes away is replaced by a new one.

    Problems are visited in passes, each in a new random order, as Alertmanager re-sends
    every firing alert each repeat interval: a live problem is never silent for longer
    than two passes, so only problems that went away outlive their state's TTL.
    """

    size: int
    rng: random.Random
    serial: int = 0
    problems: list[Problem] = field(default_factory=list)
    events: Counter[str] = field(default_factory=Counter)
    order: list[int] = field(default_factory=list)

    def __post_init__(self) -> None:
        self.problems = [self._born() for _ in range(self.size)]

    def _born(self) -> Problem:
        self.serial += 1
        return Problem(self.serial, generic=self.rng.random() < P_GENERIC)

    def next_alert(self) -> tuple[Problem, str]:
        """Visit the next live problem of the pass: (problem, status) of the alert it sends."""
        if not self.order:
            self.order = list(range(self.size))
            self.rng.shuffle(self.order)
        return self._visit(self.order.pop())

    def _replace(self, slot: int, why: str) -> tuple[Problem, str]:
        self.events[why] += 1
        self.problems[slot] = self._born()
        return self._visit(slot)

    def _visit(self, slot: int) -> tuple[Problem, str]:
        p, r = self.problems[slot], self.rng.random()
        if p.phase == "new":
            return self._event(p, "new", "firing")
        if p.phase == "resolved":
            if r < P_RELAPSE:
                return self._event(p, "relapse", "firing")
            return self._replace(slot, "retire")
        if r < P_RESOLVE:
            return self._event(p, "resolve", "resolved")
        r -= P_RESOLVE
        if r < P_VANISH:
            return self._replace(slot, "vanish")
        r -= P_VANISH
        if r < P_CHANGE:
            p.value += 1
            return self._event(p, "change", "firing")
        r -= P_CHANGE
        if r < P_ESCALATE and p.severity == "warning":
            p.severity = "critical"
            return self._event(p, "escalate", "firing")
        return self._event(p, "repeat", "firing")

    def _event(self, p: Problem, what: str, status: str) -> tuple[Problem, str]:
        self.events[what] += 1
        p.phase = "firing" if status == "firing" else "resolved"
        return p, status


def _summary(p: Problem) -> str:
    return f"p99 latency {1 + p.value % 9}.{p.value % 7} s on service {p.serial}"


def _am(p: Problem, status: str) -> dict[str, Any]:
    alert = am_alert(p.ident, _summary(p), status)
    alert["labels"]["severity"] = p.severity
    if status == "resolved":
        alert["endsAt"] = "2026-01-01T01:00:00Z"
    return alert


def _generic(p: Problem, status: str) -> dict[str, Any]:
    return {
        "source": "soak-checker",
        "key": f"soak:{p.ident}",
        "status": status,
        "severity": p.severity,
        "summary": _summary(p),
        "labels": {"service": f"svc-{p.serial % 50}", "team": "platform"},
    }


def requests_for(pop: Population, count: int) -> list[tuple[str, bytes, int]]:
    """``count`` alerts as requests: (path, body, alerts in it).

    The Alertmanager alerts of the draw go in one payload (as Alertmanager groups them),
    each generic alert in a request of its own.
    """
    am: list[dict[str, Any]] = []
    out: list[tuple[str, bytes, int]] = []
    for _ in range(count):
        problem, status = pop.next_alert()
        if problem.generic:
            out.append((GENERIC_PATH, orjson.dumps(_generic(problem, status)), 1))
        else:
            am.append(_am(problem, status))
    if am:
        out.append((AM_PATH, orjson.dumps(am_payload(am)), len(am)))
    return out


@dataclass
class LoadStats:
    """What the load generator sent and what the ingest answered."""

    requests: int = 0
    offered: int = 0
    accepted: int = 0
    refused: int = 0
    statuses: Counter[int] = field(default_factory=Counter)
    lock: threading.Lock = field(default_factory=threading.Lock)

    def snapshot(self) -> dict[str, Any]:
        with self.lock:
            return {
                "requests": self.requests,
                "offered": self.offered,
                "accepted": self.accepted,
                "refused": self.refused,
                "statuses": {str(k): v for k, v in sorted(self.statuses.items())},
            }


class Load(threading.Thread):
    """Offers ``rate`` alerts/s until ``seconds`` have passed, on one keep-alive connection.

    Every alert has a due time (start + i / rate); a request goes out when its first
    alert is due, so the offered rate holds whatever the response times, and a slow
    ingest shows up as an achieved rate below the offered one.
    """

    def __init__(self, port: int, rate: float, seconds: float, pop: Population) -> None:
        super().__init__(name="soak-load", daemon=True)
        self.port, self.rate, self.seconds, self.pop = port, rate, seconds, pop
        self.stats = LoadStats()
        self.started = 0.0
        self.elapsed = 0.0
        self.error: BaseException | None = None

    def run(self) -> None:
        try:
            self._offer()
        except BaseException as exc:  # reported by the main thread
            self.error = exc

    def _offer(self) -> None:
        conn = http.client.HTTPConnection("127.0.0.1", self.port, timeout=30)
        self.started = time.perf_counter()
        total, i = int(self.rate * self.seconds), 0
        while i < total:
            pause = self.started + i / self.rate - time.perf_counter()
            if pause > 0:
                time.sleep(pause)
            count = min(total - i, self.pop.rng.randint(1, 5))
            for path, body, alerts in requests_for(self.pop, count):
                conn = self._send(conn, path, body, alerts)
            i += count
        self.elapsed = time.perf_counter() - self.started
        conn.close()

    def _send(
        self, conn: http.client.HTTPConnection, path: str, body: bytes, alerts: int
    ) -> http.client.HTTPConnection:
        headers = {"Content-Type": "application/json", "Authorization": f"Bearer {INGEST_TOKEN}"}
        status, accepted = 0, 0
        try:
            conn.request("POST", path, body=body, headers=headers)
            response = conn.getresponse()
            answer = response.read()
            status = response.status
            if status == 202:
                # the ingest's own count of the alerts the broker confirmed
                accepted = int(orjson.loads(answer).get("alerts", 0))
        except OSError:
            conn.close()
            conn = http.client.HTTPConnection("127.0.0.1", self.port, timeout=30)
        with self.stats.lock:
            self.stats.requests += 1
            self.stats.offered += alerts
            self.stats.accepted += accepted
            self.stats.refused += alerts - accepted
            self.stats.statuses[status] += 1
        return conn


# ------------------------------------------------------------------ sampling


def process_rss(h: SoakHarness) -> dict[str, dict[str, int]]:
    """{name: {"pid", "rss"}} of the ingest, the worker main process and each pool child."""
    out: dict[str, dict[str, int]] = {}
    if h.ingest is not None:
        out["ingest"] = {"pid": h.ingest.pid, "rss": _rss_bytes(h.ingest.pid)}
        for n, pid in enumerate(sorted(_children(h.ingest.pid)), 1):
            out[f"ingest child {n}"] = {"pid": pid, "rss": _rss_bytes(pid)}
    if h.proc is not None:
        out["worker main"] = {"pid": h.proc.pid, "rss": _rss_bytes(h.proc.pid)}
        for n, pid in enumerate(sorted(_children(h.proc.pid)), 1):
            out[f"worker pool {n}"] = {"pid": pid, "rss": _rss_bytes(pid)}
    # not bounded: the simulator keeps every incident it was sent, by design
    out["driver + ITSM simulator"] = {"pid": os.getpid(), "rss": _rss_bytes(os.getpid())}
    return out


def db_footprint(client: Any, prefix: str | None = None) -> dict[str, int]:
    """Keys and MEMORY USAGE bytes of one database (every key: it is ours alone)."""
    keys = list(client.scan_iter(count=1000))
    pipe = client.pipeline(transaction=False)
    for key in keys:
        pipe.memory_usage(key, samples=0)
    sizes = [int(s or 0) for s in pipe.execute()] if keys else []
    out = {"keys": len(keys), "bytes": sum(sizes)}
    if prefix is not None:
        out["prefix_keys"] = sum(1 for k in keys if k.startswith(f"{prefix}:".encode()))
        out["live_keys"] = sum(1 for k in keys if k.startswith(f"{prefix}:inc:".encode()))
    return out


def other_dbs(h: SoakHarness) -> dict[str, int]:
    """Key counts of the server's other databases: were they changing meanwhile?"""
    ours = {f"db{h.args.broker_db}", f"db{h.args.state_db}"}
    space = h.state.info("keyspace")
    return {db: int(v["keys"]) for db, v in space.items() if db not in ours}


def sample(h: SoakHarness, load: Load, t: float) -> dict[str, Any]:
    state = db_footprint(h.state, h.prefix)
    broker = db_footprint(h.broker_redis)
    info = h.state.info("memory")
    return {
        "t_s": round(t, 1),
        "processes": process_rss(h),
        "redis_used_memory": int(info["used_memory"]),
        "redis_expired_keys": int(h.state.info("stats")["expired_keys"]),
        "redis_other_dbs": other_dbs(h),
        "state_db": state,
        "broker_db": broker,
        "own_bytes": state["bytes"] + broker["bytes"],
        "state_bytes": state["bytes"],
        "broker_bytes": broker["bytes"],
        "live_keys": state["live_keys"],
        "prefix_keys": state["prefix_keys"],
        "dead_letters": h.dead_letters(),
        "load": load.stats.snapshot(),
        "decided": h.alerts_done(),
        "queues": h.queue_depths(),
    }


def _note(text: str) -> None:
    print(text, file=sys.stderr, flush=True)


def _progress(s: dict[str, Any]) -> str:
    short = {"ingest": "ingest", "worker main": "main", "worker pool 1": "pool1"}
    rss = " ".join(
        f"{short.get(name, name.replace('worker pool ', 'pool'))}={p['rss'] / MIB:.1f}"
        for name, p in s["processes"].items()
        if not name.startswith("driver")
    )
    backlog = sum(s["queues"].values())
    return (
        f"  t={s['t_s']:6.0f}s rss MiB {rss} | redis {s['redis_used_memory'] / MIB:.2f} MiB, "
        f"live {s['live_keys']:,}, state {s['state_bytes'] / 1024:.0f} KiB, broker "
        f"{s['broker_bytes'] / 1024:.0f} KiB | accepted "
        f"{s['load']['accepted']:,} decided {s['decided']:,} queued {backlog} "
        f"dlq {s['dead_letters']}"
    )


def watch(h: SoakHarness, load: Load, args: argparse.Namespace) -> list[dict[str, Any]]:
    """Sample every ``sample_s`` while the load runs, and once when it ends."""
    samples: list[dict[str, Any]] = []
    seconds = args.minutes * 60
    k = 1
    while True:
        due = min(k * args.sample_s, seconds)
        pause = load.started + due - time.perf_counter()
        if pause > 0:
            load.join(timeout=pause)
        if h.workers_exited():
            raise h._fail("the workers exited during the load")
        if load.error is not None:
            raise BenchError(f"the load generator failed: {load.error!r}")
        samples.append(sample(h, load, time.perf_counter() - load.started))
        _note(_progress(samples[-1]))
        if due >= seconds:
            load.join(timeout=120)
            return samples
        k += 1


# ------------------------------------------------------------------ drain


def drain(h: SoakHarness, load: Load, args: argparse.Namespace) -> dict[str, Any]:
    """Wait until every accepted alert is decided and every action done; the final counts."""
    accepted = load.stats.snapshot()["accepted"]
    backlog_s = max(120.0, accepted / max(args.rate, 1.0))
    h.wait_for(f"{accepted:,} alerts decided", lambda: h.alerts_done() >= accepted, backlog_s)
    # a flapping key's resolve is held for flap_quiet_s: the last ones land that late
    h.settle_actions("the last actions", timeout=args.flap_quiet_s + 120.0)
    return {
        "accepted": accepted,
        "decided": h.alerts_done(),
        "dead_letters": h.dead_letters(),
        "queues": h.queue_depths(),
        "itsm_calls": h.sim.calls(),
        "itsm_incidents": len(h.sim.incidents()),
        # what stays once the work is done: the broker should hold no message
        "state_db": db_footprint(h.state, h.prefix),
        "broker_db": db_footprint(h.broker_redis),
    }


# ------------------------------------------------------------------ verdicts


def _check(name: str, value: str, bound: str, ok: bool | None) -> dict[str, Any]:
    return {"check": name, "value": value, "bound": bound, "ok": ok}


def rss_bound(start: int) -> int:
    return max(int(start * RSS_GROWTH_RATIO), RSS_GROWTH_FLOOR)


def _slope_mib_per_h(samples: list[dict[str, Any]], name: str) -> float:
    """Least-squares RSS trend after warm-up: a leak climbs, allocator steps do not."""
    points = [
        (s["t_s"], s["processes"][name]["rss"] / MIB) for s in samples if name in s["processes"]
    ]
    if len(points) < 3:
        return math.nan
    mt = sum(t for t, _ in points) / len(points)
    mr = sum(r for _, r in points) / len(points)
    var = sum((t - mt) ** 2 for t, _ in points)
    cov = sum((t - mt) * (r - mr) for t, r in points)
    return cov / var * 3600 if var else math.nan


def process_rows(start: dict[str, Any], end: dict[str, Any], after: list[dict[str, Any]]):
    rows, checks = [], []
    for name, first in start["processes"].items():
        last = end["processes"].get(name)
        bounded = not name.startswith("driver")
        if last is None or last["pid"] != first["pid"]:
            checks.append(_check(f"{name} kept its pid", "replaced", "same process", False))
            continue
        growth = last["rss"] - first["rss"]
        limit = rss_bound(first["rss"])
        ok = growth <= limit if bounded else None
        rows.append(
            {
                "process": name,
                "pid": first["pid"],
                "rss_start_mib": first["rss"] / MIB,
                "rss_end_mib": last["rss"] / MIB,
                "growth_pct": 100 * growth / first["rss"] if first["rss"] else math.nan,
                "slope_mib_per_h": _slope_mib_per_h(after, name),
                "bound_mib": limit / MIB if bounded else None,
                "ok": ok,
            }
        )
        if bounded:
            checks.append(
                _check(
                    f"RSS growth {name}",
                    f"{growth / MIB:+.1f} MiB",
                    f"<= {limit / MIB:.1f} MiB",
                    ok,
                )
            )
    return rows, checks


def redis_checks(
    start: dict[str, Any], end: dict[str, Any], final: dict[str, Any]
) -> list[dict[str, Any]]:
    """Redis bounded by live keys: per key at the end, and growth per key gained."""
    live0, live1 = start["live_keys"], end["live_keys"]
    allowance = BYTES_PER_LIVE_KEY * max(0, live1 - live0)
    per_key = end["state_bytes"] / live1 if live1 else math.nan
    state_growth = end["state_bytes"] - start["state_bytes"]
    server_growth = end["redis_used_memory"] - start["redis_used_memory"]
    retained = final["broker_db"]["bytes"]
    # another client's writes on the shared server would be counted as ours
    shared = start["redis_other_dbs"] != end["redis_other_dbs"]
    return [
        _check(
            "Redis state bytes per live key (end)",
            f"{per_key:.0f} B",
            f"<= {BYTES_PER_LIVE_KEY} B",
            not math.isnan(per_key) and per_key <= BYTES_PER_LIVE_KEY,
        ),
        _check(
            "Redis state growth",
            f"{state_growth / 1024:+.1f} KiB",
            f"<= {(allowance + STATE_BYTES_SLACK) / 1024:.1f} KiB",
            state_growth <= allowance + STATE_BYTES_SLACK,
        ),
        _check(
            "Redis broker db after the drain",
            f"{retained / 1024:.1f} KiB",
            f"<= {BROKER_IDLE_BYTES / 1024:.0f} KiB",
            retained <= BROKER_IDLE_BYTES,
        ),
        _check(
            "Redis used_memory growth (server)",
            f"{server_growth / 1024:+.1f} KiB" + (" (other dbs changed)" if shared else ""),
            f"<= {(allowance + SERVER_BYTES_SLACK) / 1024:.1f} KiB",
            None if shared else server_growth <= allowance + SERVER_BYTES_SLACK,
        ),
    ]


def accounting_checks(
    load: Load, final: dict[str, Any], events: Counter[str], args: argparse.Namespace
) -> list[dict[str, Any]]:
    stats = load.stats.snapshot()
    achieved = stats["offered"] / load.elapsed if load.elapsed else math.nan
    creates, new = final["itsm_calls"].get("create", 0), events.get("new", 0)
    return [
        _check("ITSM creates == new problems", f"{creates:,} / {new:,}", "equal", creates == new),
        _check(
            "accepted == decided",
            f"{final['accepted']:,} / {final['decided']:,}",
            "equal",
            final["accepted"] == final["decided"],
        ),
        _check("dead letters", str(final["dead_letters"]), "0", final["dead_letters"] == 0),
        _check("alerts refused by the ingest", str(stats["refused"]), "0", stats["refused"] == 0),
        _check(
            "offered rate achieved",
            f"{achieved:.1f} alerts/s",
            f">= {args.rate * (1 - RATE_TOLERANCE):.1f}",
            achieved >= args.rate * (1 - RATE_TOLERANCE),
        ),
    ]


# ------------------------------------------------------------------ report


def _f(value: Any, digits: int = 1) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "-"
    return f"{value:,.{digits}f}"


def _table(header: list[str], rows: list[list[str]]) -> list[str]:
    widths = [max(len(r[i]) for r in [header, *rows]) for i in range(len(header))]
    return [
        "  ".join(c.ljust(widths[i]) for i, c in enumerate(r)).rstrip() for r in [header, *rows]
    ]


def _verdict(ok: bool | None) -> str:
    return "not judged" if ok is None else ("held" if ok else "EXCEEDED")


def render(report: dict[str, Any]) -> str:
    start, end = report["start"], report["end"]
    head = (
        f"soak: {report['rate']:g} alerts/s offered for {report['minutes']:g} min over "
        f"{report['keys']:,} live keys, broker {report['broker']}, {report['workers']} prefork "
        f"pool processes, ITSM at {report['itsm_latency_ms']:g} ms, state TTL "
        f"{report['state_ttl_s']} s, commit {report['git_commit']}"
        f"{' (modified)' if report.get('git_dirty') else ''}; start at "
        f"t={start['t_s']:g} s, end at t={end['t_s']:g} s"
    )
    proc = [
        [
            r["process"],
            _f(r["rss_start_mib"]),
            _f(r["rss_end_mib"]),
            f"{r['growth_pct']:+.1f}%",
            _f(r["slope_mib_per_h"]),
            f"+{r['bound_mib']:.1f} MiB" if r["bound_mib"] is not None else "not bounded",
            _verdict(r["ok"]),
        ]
        for r in report["processes"]
    ]
    redis = [
        _redis_row("Redis used_memory MiB (server)", start, end, "redis_used_memory", _mib),
        _redis_row(f"Redis state db {report['state_db']} KiB", start, end, "state_bytes", _kib),
        _redis_row(f"Redis broker db {report['broker_db']} KiB", start, end, "broker_bytes", _kib),
        _redis_row("Redis live incident keys", start, end, "live_keys", _count),
        _redis_row("Redis keys under prefix", start, end, "prefix_keys", _count),
    ]
    lines = [head, ""]
    lines += _table(
        ["process", "RSS start MiB", "RSS end MiB", "growth", "MiB/h", "bound", "verdict"],
        proc + redis,
    )
    lines += ["", *_table(["check", "value", "bound", "verdict"], _check_rows(report))]
    lines += ["", _summary_line(report)]
    return "\n".join(lines)


def _redis_row(label: str, start: dict, end: dict, key: str, fmt: Any) -> list[str]:
    return [label, fmt(start[key]), fmt(end[key]), _pct(start[key], end[key]), "", "", ""]


def _count(n: int) -> str:
    return f"{n:,}"


def _kib(b: int) -> str:
    return f"{b / 1024:,.1f}"


def _mib(b: int) -> str:
    return f"{b / MIB:.2f}"


def _pct(a: float, b: float) -> str:
    return f"{100 * (b - a) / a:+.1f}%" if a else "-"


def _check_rows(report: dict[str, Any]) -> list[list[str]]:
    return [[c["check"], c["value"], c["bound"], _verdict(c["ok"])] for c in report["checks"]]


def _summary_line(report: dict[str, Any]) -> str:
    f, ev = report["final"], report["events"]
    calls = f["itsm_calls"]
    return (
        f"alerts accepted {f['accepted']:,}, decided {f['decided']:,}; problems: "
        f"{ev.get('new', 0):,} new, {ev.get('relapse', 0):,} relapses, "
        f"{ev.get('resolve', 0):,} resolves, {ev.get('retire', 0) + ev.get('vanish', 0):,} "
        f"gone (state expires), {report['expired_keys']:,} keys expired on the server; "
        f"ITSM creates {calls.get('create', 0):,}, updates {calls.get('update', 0):,}, "
        f"notes {calls.get('note', 0):,}; worker log lines {report['logs']['worker_lines']:,}. "
        "Bounds: " + ("all held" if report["ok"] else "EXCEEDED")
    )


def _clean(value: Any) -> Any:
    if isinstance(value, float):
        return None if math.isnan(value) or math.isinf(value) else round(value, 3)
    if isinstance(value, dict):
        return {str(k): _clean(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_clean(v) for v in value]
    return value


# ------------------------------------------------------------------ main


def run(h: SoakHarness, args: argparse.Namespace) -> dict[str, Any]:
    """The whole soak on a started harness: load, samples, drain, verdicts."""
    # the code the processes load now, not whatever is checked out when the run ends
    commit, dirty = git_commit(), _git_dirty()
    h.fresh()
    h.start_workers()
    h.start_ingest()
    port = int(h.ingest_url.rsplit(":", 1)[1])
    pop = Population(args.keys, random.Random(args.seed))
    load = Load(port, args.rate, args.minutes * 60, pop)
    _note(f"soak: {args.rate:g} alerts/s for {args.minutes:g} min; logs in {h.workdir}")
    load.start()
    samples = watch(h, load, args)
    final = drain(h, load, args)
    after = [s for s in samples if s["t_s"] >= args.warmup_s]
    start, end = after[0], samples[-1]
    rows, checks = process_rows(start, end, after)
    checks += redis_checks(start, end, final) + accounting_checks(load, final, pop.events, args)
    return {
        "rate": args.rate,
        "minutes": args.minutes,
        "keys": args.keys,
        "broker": args.broker,
        "broker_db": args.broker_db,
        "state_db": args.state_db,
        "workers": args.workers,
        "itsm_latency_ms": args.itsm_latency_ms,
        "state_ttl_s": args.state_ttl_s,
        "warmup_s": args.warmup_s,
        "prefix": h.prefix,
        "git_commit": commit,
        "git_dirty": dirty,
        "cpus": os.cpu_count(),
        "start": start,
        "end": end,
        "samples": samples,
        "final": final,
        "load": load.stats.snapshot(),
        "achieved_rate": load.stats.offered / load.elapsed if load.elapsed else None,
        "events": dict(pop.events),
        "expired_keys": end["redis_expired_keys"] - samples[0]["redis_expired_keys"],
        "processes": rows,
        "checks": checks,
        "bounds": {
            "rss_growth_ratio": RSS_GROWTH_RATIO,
            "rss_growth_floor_mib": RSS_GROWTH_FLOOR / MIB,
            "redis_bytes_per_live_key": BYTES_PER_LIVE_KEY,
            "redis_state_slack_bytes": STATE_BYTES_SLACK,
            "redis_broker_idle_bytes": BROKER_IDLE_BYTES,
            "redis_server_slack_bytes": SERVER_BYTES_SLACK,
        },
        "ok": all(c["ok"] is not False for c in checks),
        "logs": {
            "dir": str(h.workdir),
            "worker_lines": _lines(h.log_path),
            "ingest_lines": _lines(h.ingest_log),
        },
    }


def _lines(path: Path) -> int:
    """Lines the processes logged at WARNING or above: a quiet run logs none."""
    try:
        return len(path.read_text(errors="replace").splitlines())
    except OSError:
        return 0


def main(argv: list[str]) -> int:
    args = parse_args(argv)
    try:
        harness = SoakHarness(args, prefix=f"soak{os.getpid()}")
    except BenchError as exc:
        print(f"soak: {exc}", file=sys.stderr)
        return 2
    try:
        report = run(harness, args)
        # keep the evidence of a bound exceeded
        args.keep_logs = args.keep_logs or not report["ok"]
    except BenchError as exc:
        print(f"soak: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("soak: interrupted", file=sys.stderr)
        return 130
    finally:
        harness.close()
    print(render(report))
    if args.keep_logs:
        print(f"logs kept in {report['logs']['dir']}")
    if args.json:
        data = orjson.dumps(_clean(report), option=orjson.OPT_INDENT_2)
        Path(args.json).write_bytes(data + b"\n")
    return 0 if report["ok"] else 1


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
