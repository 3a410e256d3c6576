"""Throughput of the HTTP ingest against a real Redis broker (a benchmark, not a test).

Starts the ingest (waitress, the production server) in a child process pinned to two
cores when the machine allows it, then drives it from this process with keep-alive
connections: Alertmanager requests of 1 and of 100 alerts, for ``--seconds`` each.
Every 202 is checked against the broker afterwards (LLEN of the intake queue), so the
figure counts only alerts the broker confirmed.

    python bench/ingest_bench.py [--redis-url redis://127.0.0.1:6379/12] [--seconds 10]

The broker database is flushed before and after each run: give it one nobody else uses.
"""

from __future__ import annotations

import argparse
import http.client
import os
import subprocess
import sys
import threading
import time
from pathlib import Path

import orjson

TOKEN = "bench-token"
PATH = "/api/v1/alerts/alertmanager"


def _payload(count: int) -> bytes:
    alerts = [
        {
            "status": "firing",
            "labels": {
                "alertname": "HighLatency",
                "instance": f"host-{i}:9100",
                "job": "node",
                "severity": "warning",
            },
            "annotations": {"summary": f"p99 latency above 1 s on host-{i}"},
            "startsAt": "2026-01-01T00:00:00Z",
            "endsAt": "0001-01-01T00:00:00Z",
            "generatorURL": "http://prometheus.example/graph?g0.expr=latency",
            "fingerprint": f"{i:016x}",
        }
        for i in range(count)
    ]
    return orjson.dumps(
        {
            "version": "4",
            "groupKey": '{}:{alertname="HighLatency"}',
            "truncatedAlerts": 0,
            "status": "firing",
            "receiver": "bridge",
            "groupLabels": {"alertname": "HighLatency"},
            "commonLabels": {"alertname": "HighLatency", "job": "node"},
            "commonAnnotations": {},
            "externalURL": "http://alertmanager.example",
            "alerts": alerts,
        }
    )


def _serve(redis_url: str, threads: int) -> None:
    """Child process: run the ingest on a free port, print it, stop when stdin closes."""
    from pydantic import SecretStr

    from bridge.ingest import start_ingest
    from bridge.logs import configure_logging
    from bridge.settings import Settings
    from workers.app import create_app

    settings = Settings(
        broker_url=redis_url,
        http_host="127.0.0.1",
        http_port=0,
        ingest_tokens=SecretStr(TOKEN),
        log_level="WARNING",
    )
    configure_logging(level="WARNING", fmt="json", secrets=[TOKEN])
    server = start_ingest(settings, create_app(settings), threads=threads)
    print(server.url, flush=True)
    sys.stdin.read()
    server.stop()


def _client(url: str, body: bytes, stop: threading.Event, out: list[tuple[int, int, list[float]]]):
    host, port = url.removeprefix("http://").rsplit(":", 1)
    conn = http.client.HTTPConnection(host, int(port), timeout=10)
    headers = {
        "Content-Type": "application/json",
        "Authorization": f"Bearer {TOKEN}",
        "Content-Length": str(len(body)),
    }
    ok = failed = 0
    latencies: list[float] = []
    while not stop.is_set():
        started = time.perf_counter()
        conn.request("POST", PATH, body=body, headers=headers)
        response = conn.getresponse()
        response.read()
        latencies.append(time.perf_counter() - started)
        if response.status == 202:
            ok += 1
        else:
            failed += 1
    conn.close()
    out.append((ok, failed, latencies))


def _run(url: str, alerts: int, clients: int, seconds: float, redis_url: str) -> dict[str, float]:
    import redis

    broker = redis.Redis.from_url(redis_url)
    broker.flushdb()
    body = _payload(alerts)
    stop = threading.Event()
    out: list[tuple[int, int, list[float]]] = []
    workers = [
        threading.Thread(target=_client, args=(url, body, stop, out)) for _ in range(clients)
    ]
    started = time.perf_counter()
    for worker in workers:
        worker.start()
    time.sleep(seconds)
    stop.set()
    for worker in workers:
        worker.join()
    elapsed = time.perf_counter() - started
    ok = sum(o for o, _, _ in out)
    failed = sum(f for _, f, _ in out)
    latencies = sorted(x for _, _, lat in out for x in lat)
    queued = int(broker.llen("bridge.intake"))
    broker.flushdb()
    broker.close()
    return {
        "alerts": alerts,
        "requests": ok,
        "failed": failed,
        "queued": queued,
        "req_s": ok / elapsed,
        "alerts_s": ok * alerts / elapsed,
        "p50_ms": latencies[len(latencies) // 2] * 1000 if latencies else 0.0,
        "p99_ms": latencies[int(len(latencies) * 0.99)] * 1000 if latencies else 0.0,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    parser.add_argument("--redis-url", default="redis://127.0.0.1:6379/12")
    parser.add_argument("--seconds", type=float, default=10.0)
    parser.add_argument("--clients", type=int, default=8)
    parser.add_argument("--server-threads", type=int, default=8)
    parser.add_argument("--serve", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.serve:
        _serve(args.redis_url, args.server_threads)
        return

    command = [
        sys.executable,
        __file__,
        "--serve",
        "--redis-url",
        args.redis_url,
        "--server-threads",
        str(args.server_threads),
    ]
    cores = sorted(os.sched_getaffinity(0))[:2] if hasattr(os, "sched_getaffinity") else []
    root = str(Path(__file__).resolve().parent.parent)
    env = dict(
        os.environ, PYTHONPATH=os.pathsep.join(filter(None, [root, os.environ.get("PYTHONPATH")]))
    )
    child = subprocess.Popen(
        command, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, env=env
    )
    try:
        if cores and hasattr(os, "sched_setaffinity"):
            os.sched_setaffinity(child.pid, cores)
        assert child.stdout is not None
        url = child.stdout.readline().strip()
        if not url.startswith("http://"):
            raise SystemExit("the ingest did not start")
        rows = []
        for alerts in (1, 100):
            _run(url, alerts, args.clients, 1.0, args.redis_url)  # warm-up
            rows.append(_run(url, alerts, args.clients, args.seconds, args.redis_url))
    finally:
        if child.stdin:
            child.stdin.close()
        child.wait(timeout=10)

    print(
        f"ingest on cores {cores or 'all'} of {os.cpu_count()}, {args.clients} keep-alive "
        f"clients in one process on the same machine, Redis broker, {args.seconds:.0f} s each"
    )
    print(
        f"{'alerts/req':>10} {'requests':>9} {'req/s':>8} {'alerts/s':>9} {'p50 ms':>7} "
        f"{'p99 ms':>7} {'non-202':>7} {'on broker':>9}"
    )
    for row in rows:
        print(
            f"{row['alerts']:>10} {row['requests']:>9} {row['req_s']:>8.0f} "
            f"{row['alerts_s']:>9.0f} {row['p50_ms']:>7.1f} {row['p99_ms']:>7.1f} "
            f"{row['failed']:>7} {row['queued']:>9}"
        )


if __name__ == "__main__":
    main()
