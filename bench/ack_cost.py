"""What a consumed message costs the worker's process with each way of acknowledging it.

    python bench/ack_cost.py [--redis-url redis://127.0.0.1:6379/11] [--messages 4000]
                             [--rounds 3]

A kombu consumer on the bridge's transport (its fetch script, as a worker runs it)
takes ``--messages`` messages with prefetch 2 and acks each in its callback, once with
kombu's own ack (a MULTI/ZREM/HDEL/EXEC transaction per message) and once with acks
carried by the next fetch, alternating, ``--rounds`` times. Prints the consumer's CPU
and wall time per message and the Redis server's CPU per message (``INFO cpu``, so the
publishes count too, and anything else the server does meanwhile: give it a server of
its own for that column). No Celery: the difference is the ack alone. The database is
FLUSHED: give it one nobody else uses.
"""

from __future__ import annotations

import argparse
import sys
import time
import uuid
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import redis
from kombu import Connection, Exchange, Queue
from kombu.asynchronous.timer import Entry

TRANSPORT = "workers.redis_transport:Transport"


def _redis_cpu_s(client: redis.Redis) -> float:
    info = client.info("cpu")
    return float(info["used_cpu_user"]) + float(info["used_cpu_sys"])


def _consume(url: str, messages: int, deferred: bool) -> tuple[float, float]:
    name = f"ackcost.{uuid.uuid4().hex[:8]}"
    queue = Queue(name, Exchange(name), routing_key=name)
    with Connection(url, transport=TRANSPORT) as conn:
        producer = conn.Producer()
        for i in range(messages):
            producer.publish({"i": i}, exchange=queue.exchange, routing_key=name,
                             declare=[queue], serializer="json")  # fmt: skip
    done: list[int] = []

    def on_message(body: object, message: object) -> None:
        done.append(1)
        message.ack()  # type: ignore[attr-defined]

    with Connection(url, transport=TRANSPORT) as conn:
        conn.transport.event_loop = object()  # what a worker's hub sets: the bridge's fetch
        # and the ack timer; never fires here (no hub): the close writes the last acks
        conn.transport.ack_timer = Entry(lambda: None) if deferred else None
        consumer = conn.Consumer([queue], callbacks=[on_message], accept=["json"],
                                 prefetch_count=2)  # fmt: skip
        with consumer:
            cpu, wall = time.process_time(), time.perf_counter()
            while len(done) < messages:
                conn.drain_events(timeout=5)
            cpu, wall = time.process_time() - cpu, time.perf_counter() - wall
    return cpu / messages * 1e6, wall / messages * 1e6


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--redis-url", default="redis://127.0.0.1:6379/11")
    parser.add_argument("--messages", type=int, default=4000)
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()
    client = redis.Redis.from_url(args.redis_url)
    client.flushdb()
    print("ack                      consumer CPU    wall    Redis CPU (incl. publish), per message")
    try:
        for _ in range(args.rounds):
            for deferred in (False, True):
                before = _redis_cpu_s(client)
                cpu, wall = _consume(args.redis_url, args.messages, deferred)
                redis_cpu = (_redis_cpu_s(client) - before) / args.messages * 1e6
                label = "carried by the next fetch" if deferred else "kombu's transaction    "
                print(f"{label}  {cpu:7.1f} us  {wall:7.1f} us  {redis_cpu:6.1f} us")
                client.flushdb()
    finally:
        client.flushdb()


if __name__ == "__main__":
    main()
