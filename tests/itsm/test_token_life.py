"""A 20 s token over a 60 s run, shared by two processes: at most one token request per life."""

from __future__ import annotations

import multiprocessing
import threading
import time
from typing import Any

from tests.conftest import _simulator
from tests.itsm.test_auth import DRAFT, settings_for, token_requests

LIFE_S = 20.0
RUN_S = 60.0


def _hammer(url: str, flavor: str, redis_url: str, incident_id: int, seconds: float, out: Any):
    import redis

    from bridge.itsm.client import build_client
    from bridge.itsm.errors import ItsmError
    from bridge.itsm.model import IncidentRef

    class _Sim:
        pass

    sim = _Sim()
    sim.url, sim.flavor = url, flavor  # type: ignore[attr-defined]
    client = build_client(settings_for(sim), redis.Redis.from_url(redis_url))
    failures = 0
    stop = threading.Event()

    def loop() -> None:
        nonlocal failures
        while not stop.is_set():
            try:
                client.get(IncidentRef(incident_id))
            except ItsmError:
                failures += 1
            stop.wait(0.05)

    threads = [threading.Thread(target=loop) for _ in range(4)]
    for thread in threads:
        thread.start()
    time.sleep(seconds)
    stop.set()
    for thread in threads:
        thread.join()
    out.put(failures)


def test_a_20s_token_over_a_60s_run_costs_at_most_one_request_per_life(redis_url):
    sim = _simulator("itsm", token_ttl_s=LIFE_S)
    try:
        import redis

        from bridge.itsm.client import build_client

        seed = build_client(settings_for(sim), redis.Redis.from_url(redis_url))
        ref = seed.create(DRAFT, "k-life")
        seed.close()
        ctx = multiprocessing.get_context("spawn")
        out = ctx.Queue()
        procs = [
            ctx.Process(target=_hammer, args=(sim.url, "itsm", redis_url, ref.id, RUN_S, out))
            for _ in range(2)
        ]
        started = time.monotonic()
        for proc in procs:
            proc.start()
        failures = [out.get(timeout=RUN_S + 60) for _ in procs]
        for proc in procs:
            proc.join(timeout=30)
        elapsed = time.monotonic() - started
        assert failures == [0, 0]
        lives = int(elapsed // LIFE_S) + 1
        assert token_requests(sim) <= lives, sim.calls()
    finally:
        sim.stop()
