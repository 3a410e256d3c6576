"""Kill whole Celery workers on a Redis broker while tasks flow; count the tasks lost.

    python -m bench.fetch_loss [--transport stock|bridge] [--tasks 12000] [--kills 30]

Plain Celery workers (prefork, 2 processes, acks late, reject on worker lost,
visibility timeout 5 s) with a task that records its argument in a Redis set. The
script publishes the tasks at a steady pace (300/s) and SIGKILLs a whole worker
(main process and pool) every ``tasks / (kills + 1)`` tasks, starting a new one each
time; then it waits until every task ran or nothing is left on the broker. ``stock``
is kombu's Redis transport, ``bridge`` the one in ``workers/redis_transport.py``. Uses
Redis databases 14 (broker) and 15 (results) of ``--redis``, flushed first.
"""

from __future__ import annotations

import argparse
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import redis

ROOT = Path(__file__).resolve().parents[1]

WORKER = """
import sys
import redis
from celery import Celery

broker, results, transport = sys.argv[1:4]
app = Celery("fetchloss", broker=broker)
app.conf.update(task_acks_late=True, task_reject_on_worker_lost=True,
                worker_prefetch_multiplier=1, task_ignore_result=True,
                worker_hijack_root_logger=False,
                broker_transport_options={"visibility_timeout": 5, "unacked_restore_interval": 1,
                                          "unacked_restore_throttle": 1})
if transport != "stock":
    app.conf.broker_transport = transport
done = redis.Redis.from_url(results)

@app.task(name="fetchloss.record")
def record(i):
    done.sadd("fetchloss:done", i)

app.worker_main(["worker", "-c", "2", "-P", "prefork", "--loglevel", "ERROR"])
"""

TRANSPORTS = {"stock": "stock", "bridge": "workers.redis_transport:Transport"}


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.fetch_loss", description=__doc__)
    parser.add_argument("--transport", choices=sorted(TRANSPORTS), default="stock")
    parser.add_argument("--tasks", type=int, default=12000)
    parser.add_argument("--kills", type=int, default=30)
    parser.add_argument("--redis", default="redis://127.0.0.1:6379")
    parser.add_argument("--rate", type=float, default=300.0, help="tasks published per second")
    parser.add_argument("--seed", type=int, default=1)
    args = parser.parse_args(argv)
    from celery import Celery

    broker_url, results_url = f"{args.redis}/14", f"{args.redis}/15"
    broker, results = redis.Redis.from_url(broker_url), redis.Redis.from_url(results_url)
    broker.flushdb()
    results.flushdb()
    transport = TRANSPORTS[args.transport]
    app = Celery("fetchloss", broker=broker_url, set_as_current=False)
    if transport != "stock":
        app.conf.broker_transport = transport

    def start() -> subprocess.Popen[bytes]:
        return subprocess.Popen(
            [sys.executable, "-c", WORKER, broker_url, results_url, transport],
            cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
            start_new_session=True,
        )  # fmt: skip

    workers = [start(), start()]
    rng = random.Random(args.seed)
    time.sleep(3)  # both workers consuming
    # kills evenly spread over the run, alternating between the two workers, so each new
    # worker has booted and is fetching by the time its turn comes again
    every = max(1, args.tasks // (args.kills + 1))
    kills = 0
    for i in range(args.tasks):
        app.send_task("fetchloss.record", args=[i])
        if i and i % every == 0 and kills < args.kills:
            victim = kills % len(workers)
            time.sleep(rng.uniform(0, 0.005))  # land anywhere in a fetch
            os.killpg(workers[victim].pid, signal.SIGKILL)
            workers[victim].wait()
            workers[victim] = start()
            kills += 1
        time.sleep(1 / args.rate)

    def on_broker() -> int:
        return int(broker.llen("celery")) + int(broker.hlen("unacked"))

    deadline = time.monotonic() + 90
    while time.monotonic() < deadline:
        if results.scard("fetchloss:done") == args.tasks and on_broker() == 0:
            break
        time.sleep(0.5)
    done = {int(x) for x in results.smembers("fetchloss:done")}
    missing = sorted(set(range(args.tasks)) - done)
    left = on_broker()
    # with nothing left on the broker, a task that never ran is lost for good
    lost = missing if left == 0 else []
    print(
        f"transport {args.transport}: {args.tasks} tasks, {kills} kills, ran {len(done)}, "
        f"still on the broker {left}, lost {len(lost)} {lost[:10]}"
    )
    for w in workers:
        os.killpg(w.pid, signal.SIGKILL)
    app.close()
    return 1 if lost else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
