"""kill -9 of worker processes, pool children and whole instances, during a storm."""

from __future__ import annotations

import threading
import time

import pytest

from bridge.bench import INTAKE_PREFETCH
from tests.chaos.conftest import (
    ChaosStack,
    assert_exactly_one_incident_per_key,
    record,
    storm,
)


def _storm_with_kills(
    stack: ChaosStack,
    payloads: list,
    *,
    child_kills: int,
    instance_kills: int,
    pace_s: float,
    instance: int | None = None,
) -> None:
    """Publish the storm while a killer SIGKILLs pool children and whole instances
    (``instance``: always that one, else one at random)."""
    stop = threading.Event()
    # whole-instance kills early and spread out, so their messages come back inside the run
    plan = ["child"] * child_kills
    for i in range(instance_kills):
        plan.insert(1 + 3 * i, "instance")

    def killer() -> None:
        time.sleep(1.0)
        for what in plan:
            if stop.is_set():
                return
            if what == "instance":
                stack.kill_instance(instance)
            else:
                for _ in range(20):  # a respawned child may take a moment to appear
                    if stack.kill_child():
                        break
                    time.sleep(0.1)
            time.sleep(0.9)

    thread = threading.Thread(target=killer, daemon=True)
    thread.start()
    for payload in payloads:
        stack.publish_until_accepted("alertmanager", payload)
        time.sleep(pace_s)
    thread.join(timeout=60)
    stop.set()
    stack.ensure_running()


# "prefork": every queue on the prefork instances, whole-instance kills at random;
# "threads" and "intake": the deployed layout, the intake on prefork instances that
# prefetch 16 messages per process (so killed children hold batches) and the ITSM
# actions on a threads worker. In "threads" every whole-instance kill hits the threads
# worker (its actions in flight must come back), in "intake" the first intake instance
# (its prefetched and gathered messages must come back).
DEPLOYED = {"act_pool": "threads:8", "intake_prefetch": INTAKE_PREFETCH}
LAYOUTS = {"prefork": {}, "threads": DEPLOYED, "intake": DEPLOYED}
VICTIM = {"prefork": None, "threads": -1, "intake": 0}


@pytest.mark.timeout(240)
@pytest.mark.parametrize("layout", LAYOUTS)
def test_kill_9_storm_on_the_redis_broker(redis_servers, sim_factory, stack_factory, layout):
    broker, state = redis_servers
    sim = sim_factory("serviceops")
    sim.set_latency(0.05)  # kills land while requests are in flight
    stack = stack_factory(
        broker_url=broker.url(), redis_url=state.url(), sim=sim, **LAYOUTS[layout]
    )
    stack.start()
    payloads = storm(n_keys=40, repeats=5, batch=4, seed=1)
    _storm_with_kills(
        stack, payloads, child_kills=10, instance_kills=2, pace_s=0.25, instance=VICTIM[layout]
    )
    assert stack.kills >= 12
    # a whole instance killed on Redis: its unacked messages return after the visibility
    # timeout (60 s) and the next restore sweep (10 s)
    acc = stack.settle(timeout=150)
    assert not acc.missing
    assert not acc.duplicates, acc.duplicates
    replayed = stack.replay_all()
    acc = assert_exactly_one_incident_per_key(stack)
    assert not stack.dead_letters()
    assert not stack.crashes, "no worker exits other than the kills"
    record(acc, stack, dead_letters_replayed=replayed)


@pytest.mark.timeout(180)
@pytest.mark.parametrize("layout", LAYOUTS)
def test_kill_9_storm_on_rabbitmq(rabbit_vhost, redis_servers, sim_factory, stack_factory, layout):
    node, vhost, url = rabbit_vhost
    _, state = redis_servers
    sim = sim_factory("serviceops")
    sim.set_latency(0.05)
    stack = stack_factory(
        broker_url=url,
        redis_url=state.url(),
        sim=sim,
        broker_queued=lambda: node.queued(vhost),
        **LAYOUTS[layout],
    )
    stack.start()
    payloads = storm(n_keys=40, repeats=5, batch=4, seed=2)
    _storm_with_kills(
        stack, payloads, child_kills=8, instance_kills=4, pace_s=0.25, instance=VICTIM[layout]
    )
    assert stack.kills >= 12
    acc = stack.settle(timeout=90)
    assert not acc.missing
    assert not acc.duplicates, acc.duplicates
    replayed = stack.replay_all()
    acc = assert_exactly_one_incident_per_key(stack)
    assert not stack.dead_letters()
    assert not stack.crashes, "no worker exits other than the kills"
    record(acc, stack, dead_letters_replayed=replayed)
