"""The pipeline's decisions and actions, run inline (no broker) against the simulator
over HTTP and Redis state. The broker path is covered by test_pipeline_e2e.py."""

from __future__ import annotations

import itertools
from dataclasses import dataclass, field

import pytest

from bridge.dlq import Reason
from bridge.pipeline import POISON_DELIVERIES, Action, envelope
from bridge.runtime import Runtime
from bridge.settings import load_settings
from tests.conftest import SIM_CLIENT_ID, SIM_CLIENT_SECRET, SIM_PASSWORD, SIM_USERNAME
from tests.pipeline.stack import am_alert, am_payload


@dataclass
class InlineSink:
    """Collects submitted actions; ``drain`` runs them (countdowns are not waited for)."""

    queue: list[tuple[Action, float]] = field(default_factory=list)

    def submit(self, action: Action, countdown: float = 0.0) -> None:
        self.queue.append((action, countdown))


class Clock:
    def __init__(self) -> None:
        self.now = 1_800_000_000.0

    def __call__(self) -> float:
        return self.now


_ids = (f"msg-{i}" for i in itertools.count())


class Harness:
    def __init__(self, sim, redis, **overrides) -> None:
        env = {
            "BRIDGE_ITSM_URL": sim.url,
            "BRIDGE_ITSM_FLAVOR": sim.flavor,
            "BRIDGE_ITSM_CLIENT_ID": SIM_CLIENT_ID,
            "BRIDGE_ITSM_CLIENT_SECRET": SIM_CLIENT_SECRET,
            "BRIDGE_ITSM_USERNAME": SIM_USERNAME,
            "BRIDGE_ITSM_PASSWORD": SIM_PASSWORD,
            "BRIDGE_REDIS_PREFIX": "unit",
        }
        self.settings = load_settings(env=env, **overrides)
        self.sink = InlineSink()
        self.clock = Clock()
        self.sim = sim
        self.rt = Runtime(self.settings, sink=self.sink, redis=redis, clock=self.clock)
        self.pipeline = self.rt.pipeline
        self.countdowns: list[float] = []
        self.settles: list[Action] = []

    def settle_all(self) -> None:
        while self.settles:
            self.pipeline.settle(self.settles.pop(0).to_dict())
            self.drain()

    def send(self, *alerts: dict, fmt: str = "alertmanager") -> None:
        payload = am_payload(list(alerts)) if fmt == "alertmanager" else alerts[0]
        message = envelope(fmt, payload, received_at=self.clock.now)
        self.pipeline.intake(message, next(_ids))
        self.drain()

    def drain(self, limit: int = 50) -> None:
        for _ in range(limit):
            if not self.sink.queue:
                return
            action, countdown = self.sink.queue.pop(0)
            self.countdowns.append(countdown)
            if action.decision == "settle":
                self.settles.append(action)  # due only after the quiet period
            else:
                self.pipeline.run_action(action.to_dict())
        raise AssertionError("actions kept coming")


@pytest.fixture
def so(serviceops_sim, redis_client):
    h = Harness(serviceops_sim, redis_client)
    yield h
    h.pipeline.client.close()


@pytest.fixture
def gen_a(itsm_sim, redis_client):
    h = Harness(itsm_sim, redis_client)
    yield h
    h.pipeline.client.close()


def status(incident: dict) -> str:
    return incident.get("statusName") or incident.get("status") or ""


def test_new_alert_creates_one_incident_tagged_with_its_key(so):
    so.send(am_alert("a1"))
    (incident,) = so.sim.incidents()
    assert any(t.startswith("bridge-key:") for t in incident["tags"])


def test_three_identical_deliveries_within_a_second_cost_one_create_and_nothing_else(so):
    for _ in range(3):
        so.send(am_alert("a1"))
    calls = so.sim.calls()
    writes = calls.get("create", 0) + calls.get("update", 0) + calls.get("note", 0)
    assert writes == 1
    print(f"HA copies: 3 deliveries, {writes} ITSM write, {writes / 3:.2f} writes per alert")


def test_an_unchanged_snapshot_after_the_interval_writes_nothing(so):
    so.send(am_alert("a1"))
    so.clock.now += so.settings.dedup_update_interval_s * 3
    so.send(am_alert("a1"))
    calls = so.sim.calls()
    assert calls.get("update", 0) + calls.get("note", 0) == 0


def test_repeats_inside_the_interval_cost_no_itsm_write(so):
    so.send(am_alert("a1"))
    before = so.sim.calls()
    for _ in range(3):
        so.send(am_alert("a1"))
    after = so.sim.calls()
    assert after.get("create", 0) == before.get("create", 0)
    assert after.get("update", 0) == before.get("update", 0)
    assert after.get("note", 0) == before.get("note", 0)


def generic(key: str = "g1", **fields) -> dict:
    return {"key": key, "status": "firing", "summary": "queue depth high", **fields}


def test_occurrences_are_folded_into_one_note_per_interval(so):
    so.send(generic(), fmt="generic")
    for _ in range(40):
        so.send(generic(), fmt="generic")
    so.clock.now += so.settings.dedup_update_interval_s
    so.send(generic(), fmt="generic")
    (incident,) = so.sim.incidents()
    assert so.sim.calls()["note"] == 1
    assert "41" in incident["notes"][0]["details"]


def test_rise_in_severity_raises_priority(so):
    so.send(am_alert("a1", severity="warning"))
    so.send(am_alert("a1", severity="critical"))
    (incident,) = so.sim.incidents()
    assert incident["priorityName"] == "Urgent"


def test_lower_severity_leaves_priority_alone(so):
    so.send(am_alert("a1", severity="critical"))
    so.clock.now += so.settings.dedup_update_interval_s
    so.send(am_alert("a1", severity="info"))
    (incident,) = so.sim.incidents()
    assert incident["priorityName"] == "Urgent"


def test_incident_closed_by_a_person_is_not_reopened(so):
    so.send(am_alert("a1"))
    so.send(am_alert("a1", status="resolved"))
    (first,) = so.sim.incidents()
    so.sim.close_incident(first["id"])
    so.send(am_alert("a1"))
    incidents = sorted(so.sim.incidents(), key=lambda i: i["id"])
    assert len(incidents) == 2
    assert status(incidents[0]) == "Closed"
    assert first["name"] in incidents[1]["description"]


def test_flapping_is_damped_to_one_note_without_churn(so):
    so.send(am_alert("a1"))
    for _ in range(so.settings.dedup_flap_threshold + 3):
        so.send(am_alert("a1", status="resolved"))
        so.send(am_alert("a1"))
    calls = so.sim.calls()
    # resolve + reopen per cycle until flapping is detected, then nothing but one note
    cycles = so.settings.dedup_flap_threshold
    assert calls["update"] <= 2 * cycles
    assert calls["note"] == 1


def test_held_resolve_of_a_flapping_incident_settles(so):
    so.send(am_alert("a1"))
    for _ in range(so.settings.dedup_flap_threshold):
        so.send(am_alert("a1", status="resolved"))
        so.send(am_alert("a1"))
    so.send(am_alert("a1", status="resolved"))
    assert so.countdowns[-1] == so.settings.dedup_flap_quiet_s
    so.settle_all()
    (incident,) = so.sim.incidents()
    assert status(incident) == "Resolved"


def test_resolution_with_note_policy_leaves_the_incident_open(serviceops_sim, redis_client):
    h = Harness(serviceops_sim, redis_client, dedup_on_resolve="note")
    h.send(am_alert("a1"))
    h.send(am_alert("a1", status="resolved"))
    (incident,) = h.sim.incidents()
    assert status(incident) == "Open"
    assert h.sim.calls()["note"] == 1


def test_ambiguous_create_without_search_is_dead_lettered_by_default(itsm_sim, redis_client):
    h = Harness(itsm_sim, redis_client, itsm_read_timeout_s=0.5)
    h.send(am_alert("a0"))  # the token is in hand; the next call is the create
    itsm_sim.hang_next(1, 2.0)  # the create lands but its answer comes too late
    h.send(am_alert("a1"))
    entries = h.rt.dlq.list()
    assert [e.reason for e in entries] == [Reason.AMBIGUOUS_CREATE]


def _ambiguous_create(h, fingerprint: str, *, lands: bool):
    """Send a first alert for ``fingerprint`` whose create ends dead-lettered as ambiguous."""
    h.send(am_alert("warm-up"))  # the token is in hand; the next call is the create
    if lands:
        h.sim.hang_next(1, 2.0)  # applied at once, answered too late
    else:
        h.sim.fail_next(1, 502, operations=("create",))  # refused, but nobody can tell
    h.send(am_alert(fingerprint))
    (entry,) = h.rt.dlq.list()
    assert entry.reason == Reason.AMBIGUOUS_CREATE
    return entry


def test_a_key_whose_create_may_have_landed_creates_nothing_more(itsm_sim, redis_client):
    h = Harness(itsm_sim, redis_client, itsm_read_timeout_s=0.5)
    _ambiguous_create(h, "a1", lands=True)
    creates = h.sim.calls()["create"]
    h.send(am_alert("a1", severity="critical"))
    h.clock.now += h.settings.dedup_claim_lease_s + 1  # no takeover of a held claim either
    h.send(am_alert("a1", severity="critical"))
    assert h.sim.calls()["create"] == creates
    assert len(h.rt.dlq.list()) == 1


def test_adopting_a_landed_create_binds_the_key_to_that_incident(itsm_sim, redis_client):
    h = Harness(itsm_sim, redis_client, itsm_read_timeout_s=0.5)
    entry = _ambiguous_create(h, "a1", lands=True)
    h.send(am_alert("a1", status="resolved"))  # waits for the operator's answer
    landed = max(int(i["id"]) for i in h.sim.incidents())
    assert h.pipeline.adopt(entry, landed).status == "done"
    adopted = next(i for i in h.sim.incidents() if int(i["id"]) == landed)
    assert status(adopted) == "Resolved", "the resolve seen meanwhile is applied"


def test_adopting_a_missing_incident_fails_and_keeps_the_key_waiting(itsm_sim, redis_client):
    h = Harness(itsm_sim, redis_client, itsm_read_timeout_s=0.5)
    entry = _ambiguous_create(h, "a1", lands=False)
    result = h.pipeline.adopt(entry, 999_999)
    assert result.status == "failed"
    creates = h.sim.calls()["create"]
    h.send(am_alert("a1", severity="critical"))
    assert h.sim.calls()["create"] == creates


def test_replaying_a_create_that_did_not_land_creates_it_once(itsm_sim, redis_client):
    h = Harness(itsm_sim, redis_client, itsm_read_timeout_s=0.5)
    entry = _ambiguous_create(h, "a1", lands=False)
    assert len(h.sim.incidents()) == 1  # the warm-up's
    assert h.pipeline.replay(entry).status == "done"
    assert len(h.sim.incidents()) == 2
    h.send(am_alert("a1", severity="critical"))
    assert len(h.sim.incidents()) == 2


def test_permanent_rejection_is_dead_lettered_with_the_server_message(so):
    so.sim.fail_next(1, 400, operations=("create",), body='{"userMessage":"subject too long"}')
    so.send(am_alert("a1"))
    (entry,) = so.rt.dlq.list()
    assert entry.reason == Reason.ITSM_REJECTED
    assert "subject too long" in entry.detail


def test_replaying_a_rejected_create_creates_it_once(so):
    so.sim.fail_next(1, 400, operations=("create",))
    so.send(am_alert("a1"))
    (entry,) = so.rt.dlq.list()
    assert so.pipeline.replay(entry).status == "done"
    assert so.pipeline.replay(entry).status == "done"
    assert len(so.sim.incidents()) == 1


def test_invalid_payload_is_dead_lettered_with_the_field(so):
    message = envelope("alertmanager", {"version": "4", "alerts": "nope"})
    so.pipeline.intake(message, "bad-1")
    (entry,) = so.rt.dlq.list()
    assert entry.reason == Reason.INVALID_PAYLOAD
    assert "alerts" in entry.detail


def test_undecodable_raw_body_is_dead_lettered(so):
    from workers.raw import to_intake

    so.pipeline.intake(to_intake(b"\xff\xfe garbage", "auto"), "raw-1")
    (entry,) = so.rt.dlq.list()
    assert entry.reason == Reason.INVALID_PAYLOAD


def test_lost_redis_state_does_not_duplicate_where_the_itsm_can_search(so, redis_client):
    so.send(am_alert("a1"))
    redis_client.flushdb()
    so.send(am_alert("a1"))
    assert len(so.sim.incidents()) == 1


def test_a_changed_key_rule_keeps_resolving_incidents_opened_under_the_old_one(
    serviceops_sim, redis_client
):
    before = Harness(serviceops_sim, redis_client, dedup_tenant="prod")
    before.rt.watch_key_rule()
    before.send(am_alert("a1"))
    after = Harness(serviceops_sim, redis_client, dedup_tenant="production")
    after.rt.watch_key_rule()
    assert after.pipeline.previous_key_rule is not None
    after.send(am_alert("a1", status="resolved"))
    (incident,) = serviceops_sim.incidents()
    assert status(incident) == "Resolved"


def test_a_message_that_keeps_killing_its_worker_is_dead_lettered_as_poison(so):
    message = envelope("alertmanager", am_payload([am_alert("p1")]))
    for _ in range(POISON_DELIVERIES):
        so.pipeline.intake(message, "poison-1", redelivered=True)
    assert so.rt.dlq.count() == 0
    so.pipeline.intake(message, "poison-1", redelivered=True)
    (entry,) = so.rt.dlq.list()
    assert entry.reason == Reason.POISON


def test_an_alert_missing_from_a_truncated_payload_is_not_resolved(so):
    so.send(am_alert("t1"), am_alert("t2"))
    truncated = {**am_payload([am_alert("t1")]), "truncatedAlerts": 5}
    so.pipeline.intake(envelope("alertmanager", truncated), "truncated-1")
    so.drain()
    assert [status(i) for i in so.sim.incidents()] == ["Open", "Open"]


def test_an_incident_read_back_without_its_key_tag_is_an_anomaly(serviceops_sim, redis_client):
    seen: list[tuple[str, dict]] = []
    h = Harness(serviceops_sim, redis_client)
    h.pipeline._observer = lambda name, **labels: seen.append((name, labels))
    h.send(am_alert("m1"))
    h.send(am_alert("m1", status="resolved"))
    (incident,) = serviceops_sim.incidents()
    client = h.pipeline.client
    answer = client._session().patch(
        f"{serviceops_sim.url}/api/v1/request/{incident['id']}",
        json={"subject": incident["subject"], "tags": ["edited-by-a-person"]},
        headers={"Authorization": client._auth.authorization()},
        timeout=5,
    )
    assert answer.status_code == 200, answer.text
    h.send(am_alert("m1"))
    assert ("anomaly", {"kind": "key_mismatch"}) in seen


def _one_alert(fingerprint: str, summary: str = "disk full") -> dict:
    return envelope(
        "alertmanager",
        am_payload([{**am_alert(fingerprint), "annotations": {"summary": summary}}]),
    )


def test_messages_decided_together_make_the_decisions_each_would_make_alone(so):
    messages = [(_one_alert("b1"), "m-1"), (_one_alert("b1"), "m-2"), (_one_alert("b2"), "m-3")]
    results = so.pipeline.intake_many(messages)
    assert [r.decisions for r in results] == [
        {"create": 1},
        {"wait_for_creator": 1},
        {"create": 1},
    ]
    so.drain()
    assert len(so.sim.incidents()) == 2


def test_a_message_decided_in_a_batch_and_again_alone_is_a_duplicate(so):
    message = _one_alert("b3")
    so.pipeline.intake_many([(message, "m-10"), (_one_alert("b4"), "m-11")])
    # the batch failed after deciding and its messages came back one by one
    assert so.pipeline.intake(message, "m-10").decisions == {"create": 1}
    so.drain()
    assert len(so.sim.incidents()) == 2


def test_an_invalid_message_in_a_batch_is_dead_lettered_alone(so):
    bad = envelope("alertmanager", {"version": "4", "alerts": "nope"})
    results = so.pipeline.intake_many([(_one_alert("b5"), "m-20"), (bad, "m-21")])
    assert results[0].decisions == {"create": 1}
    assert results[1].dead_letter is not None
    (entry,) = so.rt.dlq.list()
    assert entry.reason == Reason.INVALID_PAYLOAD
    so.drain()
    assert len(so.sim.incidents()) == 1


def test_a_batch_is_one_state_round_trip(so, redis_client):
    calls = []
    decide_many = so.rt.store.decide_many
    so.rt.store.decide_many = lambda alerts, tokens: (
        calls.append(len(alerts)) or decide_many(alerts, tokens)
    )
    so.pipeline.intake_many([(_one_alert(f"b{i}"), f"m-3{i}") for i in range(6)])
    assert calls == [6]
