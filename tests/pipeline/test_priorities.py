"""Under the ITSM rate limit, a new problem's incident goes before a backlog of updates."""

from __future__ import annotations

import time

import redis as redis_lib

from bridge.pipeline import Action, envelope
from bridge.runtime import Runtime
from tests.pipeline.stack import BridgeStack
from tests.pipeline.test_pipeline import InlineSink
from tests.pipeline.test_pipeline_e2e import BROKER_REDIS_URL
from tests.servers import wait_for

KEYS = 100
UPDATES_PER_KEY = 5


def _generic(key: str) -> dict:
    return {"key": key, "status": "firing", "summary": f"queue depth high on {key}"}


def test_a_new_incident_is_created_within_seconds_behind_500_pending_updates(
    redis_url, serviceops_sim, unique, tmp_path
):
    broker = redis_lib.Redis.from_url(BROKER_REDIS_URL)
    broker.flushdb()
    stack = BridgeStack(
        broker_url=BROKER_REDIS_URL,
        redis_url=redis_url,
        sim=serviceops_sim,
        prefix=f"prio{unique}",
        log_path=tmp_path / "workers.log",
        extra_env={"BRIDGE_ITSM_RATE_LIMIT_PER_S": "2", "BRIDGE_ITSM_RATE_LIMIT_BURST": "4"},
    )
    try:
        # Open 100 incidents first, without the limit, straight through the pipeline.
        unlimited = stack.settings.model_copy(update={"itsm_rate_limit_per_s": 0.0})
        rt = Runtime(unlimited, sink=InlineSink(), redis=stack.redis)
        for i in range(KEYS):
            rt.pipeline.intake(envelope("generic", _generic(f"k{i}")), f"seed-{i}")
        sink = rt.pipeline.sink
        for action, _ in list(sink.queue):
            rt.pipeline.run_action(action.to_dict())
        assert len(serviceops_sim.incidents()) == KEYS

        # A backlog of 500 cosmetic updates for those incidents, on the broker.
        from workers.app import CelerySink

        publisher = CelerySink(stack.app)
        for action, _ in sink.queue:
            state = rt.store.snapshot(action.key)
            update = Action.from_dict(
                {
                    **action.to_dict(),
                    "decision": "coalesced_update",
                    "gen": int(state["gen"]),
                    "incident_id": int(state["id"]),
                    "incident_display": state.get("dn") or None,
                    "pending_count": 3,
                }
            )
            for _ in range(UPDATES_PER_KEY):
                publisher.submit(update)

        stack.start_workers()
        wait_for(lambda: serviceops_sim.calls().get("note", 0) >= 2, what="updates flowing")
        sent = time.monotonic()
        stack.publish("generic", _generic("brand-new-problem"))
        wait_for(
            lambda: len(serviceops_sim.incidents()) == KEYS + 1,
            timeout=30,
            what="the new problem's incident",
        )
        waited = time.monotonic() - sent
        notes_done = serviceops_sim.calls().get("note", 0)
        assert waited < 5.0, f"the create waited {waited:.1f}s behind the updates"
        assert notes_done < KEYS * UPDATES_PER_KEY / 2, "the backlog was still pending"
    finally:
        stack.close()
        broker.flushdb()
        broker.close()
