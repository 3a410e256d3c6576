"""The intake hot path in one process, without Celery: where a message's time goes.

    python bench/profile_intake.py [--redis-url redis://127.0.0.1:6379/6] [--profile]

Runs ``Pipeline.intake`` (what the ``bridge.intake`` task does) on the benchmark's
key mix against real Redis: one alert per message, then Alertmanager payloads of
100 alerts, with a sink that only collects actions. Prints microseconds per message
and per alert, and the cost of each step measured separately (parse, key, digest,
the Redis round trip, the JSON the broker would add). ``--profile`` adds a
pyinstrument profile of both runs. The state database is FLUSHED: give it one
nobody else uses (the benchmark's default, 6, when no benchmark is running).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
os.environ.setdefault("BRIDGE_NO_APP", "1")

import orjson
import redis

from bridge.bench import PREFIX, am_payload, storm_alert
from bridge.pipeline import envelope
from bridge.runtime import Runtime
from bridge.settings import load_settings


class CollectingSink:
    def __init__(self) -> None:
        self.actions: list[Any] = []

    def submit(self, action: Any, countdown: float = 0.0) -> None:
        self.actions.append(action)


def _messages(keys: int, repeats: int, batch: int) -> list[dict[str, Any]]:
    total = keys * repeats
    out = []
    for start in range(0, total, batch):
        alerts = [storm_alert(j % keys, "p") for j in range(start, min(total, start + batch))]
        # what the task receives: the envelope after a JSON round trip through the broker
        out.append(json.loads(json.dumps(envelope("alertmanager", am_payload(alerts)))))
    return out


def _run(rt: Runtime, messages: list[dict[str, Any]]) -> float:
    started = time.perf_counter()
    for i, message in enumerate(messages):
        rt.pipeline.intake(message, f"m{i}")
    return time.perf_counter() - started


def _steps(rt: Runtime, message: dict[str, Any], n: int) -> dict[str, float]:
    """Microseconds per call of each step, measured on its own."""
    from bridge.dedup import content_digest

    pipeline = rt.pipeline
    alerts = pipeline.parse("alertmanager", message["payload"])
    tokens = [f"t:{i}" for i in range(len(alerts))]
    out: dict[str, float] = {}

    def timed(name: str, fn: Any) -> None:
        started = time.perf_counter()
        for _ in range(n):
            fn()
        out[name] = (time.perf_counter() - started) / n * 1e6

    from bridge import sources

    timed("sources.parse", lambda: sources.parse("alertmanager", message["payload"]))
    timed(
        "pipeline.parse (parse + key)", lambda: pipeline.parse("alertmanager", message["payload"])
    )
    timed("content_digest (all alerts)", lambda: [content_digest(a) for a in alerts])
    timed("store.decide_many", lambda: rt.store.decide_many(alerts, tokens))
    timed("redis PING (one round trip)", rt.redis.ping)
    body = [[message], {}, {"callbacks": None, "errbacks": None, "chain": None, "chord": None}]
    timed("json.dumps (stdlib, task body)", lambda: json.dumps(body))
    text = json.dumps(body)
    timed("json.loads (stdlib, task body)", lambda: json.loads(text))
    timed("orjson.dumps (task body)", lambda: orjson.dumps(body))
    timed("orjson.loads (task body)", lambda: orjson.loads(text))
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    parser.add_argument("--redis-url", default="redis://127.0.0.1:6379/6")
    parser.add_argument("--keys", type=int, default=1000)
    parser.add_argument("--repeats", type=int, default=20)
    parser.add_argument("--profile", action="store_true")
    args = parser.parse_args()
    client = redis.Redis.from_url(args.redis_url)
    settings = load_settings(
        env={
            "BRIDGE_REDIS_URL": args.redis_url,
            "BRIDGE_REDIS_PREFIX": PREFIX,
            "BRIDGE_LOG_LEVEL": "WARNING",
        }
    )
    from bridge.logs import configure_logging

    configure_logging(level="WARNING", fmt="json")
    total = args.keys * args.repeats
    for batch in (1, 100):
        client.flushdb()
        sink = CollectingSink()
        rt = Runtime(settings, sink=sink)
        messages = _messages(args.keys, args.repeats, batch)
        profiler: Any = None
        if args.profile:
            from pyinstrument import Profiler

            profiler = Profiler(interval=0.0005)
            profiler.start()
        seconds = _run(rt, messages)
        if profiler is not None:
            profiler.stop()
        print(
            f"batch {batch:>3}: {len(messages):>7,} messages, {total:,} alerts in {seconds:.2f} s"
            f" = {seconds / len(messages) * 1e6:,.0f} us/message,"
            f" {seconds / total * 1e6:,.1f} us/alert, {total / seconds:,.0f} alerts/s,"
            f" {len(sink.actions):,} actions"
        )
        for name, micros in _steps(rt, messages[-1], 200 if batch == 100 else 2000).items():
            print(f"    {name:<34} {micros:>9,.1f} us")
        if profiler is not None:
            print(profiler.output_text(unicode=False, color=False, show_all=False))
    client.flushdb()


if __name__ == "__main__":
    main()
