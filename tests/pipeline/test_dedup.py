"""Every row of the state table, on real Redis (and on fakeredis where Redis is absent)."""

from __future__ import annotations

import itertools
from dataclasses import replace

import pytest
import redis

from bridge.alert import Alert, Severity, Status
from bridge.dedup import Decision, DedupPolicy, StateStore

POLICY = DedupPolicy(
    update_interval_s=300,
    reopen_window_s=3600,
    claim_lease_s=120,
    flap_threshold=3,
    flap_window_s=1800,
    state_ttl_s=86400,
    group_mode=False,
)


class Clock:
    def __init__(self) -> None:
        self.now = 1_800_000_000.0

    def __call__(self) -> float:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += seconds


@pytest.fixture(params=["redis", "fakeredis"])
def redis_conn(request):
    if request.param == "fakeredis":
        return request.getfixturevalue("fake_redis")
    return request.getfixturevalue("redis_client")


@pytest.fixture
def clock() -> Clock:
    return Clock()


@pytest.fixture
def store(redis_conn, clock) -> StateStore:
    return StateStore(redis_conn, POLICY, prefix="t", clock=clock)


_tokens = (f"tok-{i}" for i in itertools.count())


def alert(status: Status = Status.FIRING, severity: Severity = Severity.WARNING, **kw) -> Alert:
    base = Alert(
        source="generic",
        identity="fp1",
        status=status,
        severity=severity,
        summary="disk full",
        key="k1",
    )
    return replace(base, **kw)


def decide(store: StateStore, a: Alert) -> str:
    return store.decide(a, next(_tokens)).decision


def open_incident(store: StateStore, a: Alert | None = None) -> None:
    a = a or alert()
    token = next(_tokens)
    assert store.decide(a, token).decision == Decision.CREATE
    store.mark_inflight(a.key, token)
    assert store.record_created(a.key, token, 42, "INC-42").decision == "open"


def test_first_firing_alert_claims_and_creates(store):
    assert decide(store, alert()) == Decision.CREATE


def test_resolved_alert_for_unknown_key_is_ignored_as_orphan(store, redis_conn):
    assert decide(store, alert(Status.RESOLVED)) == Decision.IGNORE_ORPHAN
    assert redis_conn.exists(store.state_key("k1")) == 0


def test_firing_while_another_worker_creates_never_creates_twice(store):
    assert decide(store, alert()) == Decision.CREATE
    assert [decide(store, alert()) for _ in range(5)] == [Decision.WAIT_FOR_CREATOR] * 5


def test_same_token_delivered_twice_gets_the_same_decision(store):
    first = store.decide(alert(), "t-same")
    again = store.decide(alert(), "t-same")
    assert first.decision == again.decision == Decision.CREATE
    assert first.gen == again.gen


def test_resolve_while_creating_is_applied_when_the_create_is_recorded(store):
    token = "creator"
    assert store.decide(alert(), token).decision == Decision.CREATE
    assert decide(store, alert(Status.RESOLVED)) == Decision.PENDING_RESOLVE
    assert store.record_created("k1", token, 7, "INC-7").decision == "resolve"


def test_claim_older_than_the_lease_is_taken_over(store, clock):
    decide(store, alert())
    clock.advance(POLICY.claim_lease_s + 1)
    assert decide(store, alert()) == Decision.TAKEOVER


def test_a_create_is_recorded_even_after_its_claim_was_taken_over(store, clock):
    store.decide(alert(), "owner")
    clock.advance(POLICY.claim_lease_s + 1)
    store.decide(alert(), "taker")
    assert store.record_created("k1", "owner", 1, "INC-1").decision == "open"
    assert store.mark_inflight("k1", "taker").decision == "stale"


def test_a_second_create_record_is_stale(store):
    open_incident(store)
    assert store.record_created("k1", "late", 2, "INC-2").decision == "stale"


def test_second_create_attempt_of_a_claim_must_reconcile(store):
    store.decide(alert(), "owner")
    assert store.mark_inflight("k1", "owner").decision == "first"
    assert store.mark_inflight("k1", "owner").decision == "reconcile"


def test_repeats_of_an_open_incident_are_counted_not_written(store):
    open_incident(store)
    assert [decide(store, alert()) for _ in range(10)] == [Decision.COUNT_ONLY] * 10


def test_first_repeat_after_the_interval_carries_the_folded_count(store, clock):
    open_incident(store)
    for _ in range(40):
        decide(store, alert())
    clock.advance(POLICY.update_interval_s)
    outcome = store.decide(alert(), "after-interval")
    assert outcome.decision == Decision.COALESCED_UPDATE
    assert outcome.pending_count == 41


def test_rise_in_severity_updates_at_once(store):
    open_incident(store)
    outcome = store.decide(alert(severity=Severity.CRITICAL), "rise")
    assert outcome.decision == Decision.COALESCED_UPDATE
    assert outcome.severity_written == Severity.WARNING
    assert outcome.severity_peak == Severity.CRITICAL


def test_lower_severity_does_not_force_an_update(store):
    open_incident(store, alert(severity=Severity.CRITICAL))
    assert decide(store, alert(severity=Severity.INFO)) == Decision.COUNT_ONLY


def test_resolution_of_an_open_incident_resolves(store):
    open_incident(store)
    assert decide(store, alert(Status.RESOLVED)) == Decision.RESOLVE


def test_repeated_resolution_is_ignored(store):
    open_incident(store)
    decide(store, alert(Status.RESOLVED))
    assert decide(store, alert(Status.RESOLVED)) == Decision.IGNORE_DUPLICATE


def test_relapse_inside_window_reopens_same_incident(store, clock):
    open_incident(store)
    decide(store, alert(Status.RESOLVED))
    clock.advance(POLICY.reopen_window_s - 1)
    outcome = store.decide(alert(), "relapse")
    assert outcome.decision == Decision.REOPEN
    assert outcome.incident_id == 42


def test_relapse_after_window_creates_a_new_incident_linked_to_the_old(store, clock):
    open_incident(store)
    decide(store, alert(Status.RESOLVED))
    clock.advance(POLICY.reopen_window_s + 1)
    outcome = store.decide(alert(), "late")
    assert outcome.decision == Decision.NEW_AFTER_WINDOW
    assert outcome.previous_id == 42
    assert outcome.incident_id is None


def test_many_resolve_relapse_cycles_are_damped_as_flapping(store, clock):
    open_incident(store)
    decisions = []
    for _ in range(POLICY.flap_threshold + 2):
        decisions.append(decide(store, alert(Status.RESOLVED)))
        clock.advance(10)
        decisions.append(decide(store, alert()))
        clock.advance(10)
    assert decisions[:4] == [Decision.RESOLVE, Decision.REOPEN] * 2
    assert decisions[4:6] == [Decision.RESOLVE, Decision.FLAPPING]
    # from then on: no resolve/reopen churn, only held resolves that relapses cancel
    assert Decision.RESOLVE not in decisions[6:] and Decision.REOPEN not in decisions[6:]


def test_held_resolve_settles_when_no_relapse_follows(store, clock):
    open_incident(store)
    for _ in range(POLICY.flap_threshold):
        decide(store, alert(Status.RESOLVED))
        decide(store, alert())
    held = store.decide(alert(Status.RESOLVED), "hold")
    assert held.decision == Decision.HOLD_RESOLVE
    assert store.settle("k1", "settle", held.hold).decision == Decision.RESOLVE


def test_settle_is_stale_after_a_relapse(store):
    open_incident(store)
    for _ in range(POLICY.flap_threshold):
        decide(store, alert(Status.RESOLVED))
        decide(store, alert())
    held = store.decide(alert(Status.RESOLVED), "hold")
    decide(store, alert())
    assert store.settle("k1", "settle", held.hold).decision == "stale"


def test_released_claim_lets_the_next_alert_create(store):
    store.decide(alert(), "owner")
    store.release_claim("k1", "owner")
    assert decide(store, alert()) == Decision.CREATE


def test_incident_closed_by_a_person_is_recreated_with_a_link(store):
    open_incident(store)
    outcome = store.recreate("k1", "recreate")
    assert outcome.decision == Decision.NEW_AFTER_WINDOW
    assert outcome.previous_id == 42


def test_group_mode_resolves_only_when_every_member_has_resolved(redis_conn, clock):
    store = StateStore(redis_conn, replace(POLICY, group_mode=True), prefix="g", clock=clock)
    a1, a2 = alert(identity="a"), alert(identity="b")
    token = "c"
    assert store.decide(a1, token).decision == Decision.CREATE
    store.record_created("k1", token, 5, "INC-5")
    decide(store, a2)
    assert decide(store, replace(a1, status=Status.RESOLVED)) == Decision.COUNT_ONLY
    assert decide(store, replace(a2, status=Status.RESOLVED)) == Decision.RESOLVE


def test_state_expires(store, redis_conn):
    decide(store, alert())
    ttl = redis_conn.ttl(store.state_key("k1"))
    assert 0 < ttl <= POLICY.state_ttl_s


def test_batch_of_one_message_is_decided_in_order(store):
    alerts = [alert(), alert(), alert(Status.RESOLVED)]
    outcomes = store.decide_many(alerts, ["b0", "b1", "b2"])
    assert [o.decision for o in outcomes] == [
        Decision.CREATE,
        Decision.WAIT_FOR_CREATOR,
        Decision.PENDING_RESOLVE,
    ]


def test_create_action_whose_state_was_lost_reclaims_the_key(store, redis_conn):
    store.decide(alert(), "owner")
    redis_conn.delete(store.state_key("k1"))
    assert store.mark_inflight("k1", "owner").decision == "reclaimed"
    assert store.record_created("k1", "owner", 3, "INC-3").decision == "open"


def test_a_create_refused_for_certain_needs_no_reconcile(store):
    store.decide(alert(), "owner")
    store.mark_inflight("k1", "owner")
    store.mark_not_applied("k1", "owner")
    assert store.mark_inflight("k1", "owner").decision == "first"


def snapshot(**kw) -> Alert:
    return alert(source="alertmanager", **kw)


def test_an_unchanged_snapshot_is_skipped_not_counted(store, clock):
    open_incident(store, snapshot())
    clock.advance(POLICY.update_interval_s * 10)
    assert [decide(store, snapshot()) for _ in range(3)] == [Decision.SKIP_UNCHANGED] * 3


def test_a_changed_snapshot_counts_as_an_occurrence(store, clock):
    open_incident(store, snapshot())
    clock.advance(POLICY.update_interval_s)
    outcome = store.decide(snapshot(summary="disk fuller"), "changed")
    assert outcome.decision == Decision.COALESCED_UPDATE
    assert outcome.pending_count == 1


@pytest.fixture(params=["redis", "fakeredis"])
def flushable_conn(request):
    """A server whose script cache a test may flush: never the shared Redis."""
    if request.param == "fakeredis":
        yield request.getfixturevalue("fake_redis")
        return
    client = redis.Redis.from_url(request.getfixturevalue("private_redis"))
    yield client
    client.close()


def test_decisions_survive_a_flushed_script_cache(flushable_conn, clock):
    store = StateStore(flushable_conn, POLICY, prefix="t", clock=clock)
    assert decide(store, alert()) == Decision.CREATE
    flushable_conn.script_flush()
    assert decide(store, alert(key="k2")) == Decision.CREATE


def test_a_message_counts_its_alerts_once_per_delivery(store, redis_conn):
    alerts = [alert(), alert(key="k2"), alert(Status.RESOLVED, key="k3")]
    first = store.decide_many(alerts, ["m:0", "m:1", "m:2"])
    again = store.decide_many(alerts, ["m:0", "m:1", "m:2"])  # the message redelivered
    assert [o.decision for o in again] == [o.decision for o in first]
    assert [o.gen for o in again] == [o.gen for o in first]
    assert int(redis_conn.hget("t:stats", "alerts")) == 6


def test_group_mode_members_of_one_message_share_their_key(redis_conn, clock):
    store = StateStore(redis_conn, replace(POLICY, group_mode=True), prefix="gm", clock=clock)
    a1, a2 = alert(identity="a"), alert(identity="b")
    created = store.decide_many([a1, a2], ["c:0", "c:1"])
    assert [o.decision for o in created] == [Decision.CREATE, Decision.WAIT_FOR_CREATOR]
    store.record_created("k1", "c:0", 5, "INC-5")
    resolved = replace(a1, status=Status.RESOLVED), replace(a2, status=Status.RESOLVED)
    outcomes = store.decide_many(list(resolved), ["r:0", "r:1"])
    assert [o.decision for o in outcomes] == [Decision.COUNT_ONLY, Decision.RESOLVE]
    assert redis_conn.scard("gm:mem:k1") == 0


def _reference_decide(store: StateStore, a: Alert, token: str):
    """The single-alert ``decide`` operation of the script, one call per alert."""
    from bridge.dedup import SNAPSHOT_SOURCES, Outcome, content_digest

    p = store._policy
    return Outcome.from_reply(
        store._run(
            "decide",
            a.key,
            token,
            a.status.value,
            a.severity.rank,
            p.update_interval_s,
            p.reopen_window_s,
            p.claim_lease_s,
            p.flap_threshold,
            p.flap_window_s,
            a.identity if p.group_mode else "",
            content_digest(a),
            "1" if a.source in SNAPSHOT_SOURCES else "0",
        )
    )


@pytest.mark.parametrize("group_mode", [False, True])
def test_one_call_per_message_decides_as_one_call_per_alert(redis_conn, clock, group_mode):
    """Random messages (repeats of a key in one message, redeliveries, creates recorded,
    time passing): the batched step leaves the same decisions and the same state."""
    import random

    rng = random.Random(7)
    policy = replace(POLICY, group_mode=group_mode, update_interval_s=30, reopen_window_s=100)
    batched = StateStore(redis_conn, policy, prefix="eqb", clock=clock)
    single = StateStore(redis_conn, policy, prefix="eqs", clock=clock)
    claims: dict[str, str] = {}
    seen: set[str] = set()
    for m in range(250):
        size = rng.choice([1, 1, 3, 8])
        alerts = [
            alert(
                rng.choice([Status.FIRING] * 4 + [Status.RESOLVED, Status.ACKNOWLEDGED]),
                rng.choice(list(Severity)),
                key=f"k{rng.randrange(4)}",
                identity=f"fp{rng.randrange(3)}",
                source=rng.choice(["alertmanager", "generic"]),
                summary=rng.choice(["disk full", "disk fuller"]),
            )
            for _ in range(size)
        ]
        tokens = [f"m{m}:{i}" for i in range(size)]
        for _ in range(2 if rng.random() < 0.1 else 1):  # sometimes delivered twice
            got = batched.decide_many(alerts, tokens)
            want = [_reference_decide(single, a, t) for a, t in zip(alerts, tokens, strict=True)]
            assert got == want, f"message {m}"
        seen.update(o.decision for o in got)
        for a, t, o in zip(alerts, tokens, got, strict=True):
            if o.decision in (Decision.CREATE, Decision.NEW_AFTER_WINDOW, Decision.TAKEOVER):
                claims[a.key] = t
        if claims and rng.random() < 0.3:
            key = rng.choice(sorted(claims))
            token = claims.pop(key)
            for s in (batched, single):
                s.record_created(key, token, 7, "INC-7")
        clock.advance(rng.choice([0, 1, 20, 150]))
    assert {
        "create",
        "wait_for_creator",
        "skip_unchanged",
        "coalesced_update",
        "count_only",
        "resolve",
        "reopen",
        "takeover",
        "ignore_orphan",
    } <= seen
    for k in range(4):
        assert batched.snapshot(f"k{k}") == single.snapshot(f"k{k}")
        assert redis_conn.smembers(f"eqb:mem:k{k}") == redis_conn.smembers(f"eqs:mem:k{k}")


def test_a_reply_reads_the_same_from_bytes_and_from_text():
    from bridge.dedup import Outcome

    text = ["coalesced_update", 3, "42", "INC-42", 5, "1800000000.5", 1, 2, "7", "INC-7", "1.25"]
    raw = [v.encode() if isinstance(v, str) else v for v in text]
    outcome = Outcome.from_reply(raw)
    assert outcome == Outcome.from_reply(text)
    assert (outcome.incident_id, outcome.pending_since, outcome.hold) == (42, 1800000000.5, "1.25")
    assert outcome.severity_peak == Severity.ERROR and outcome.previous_display == "INC-7"
    empty = Outcome.from_reply([b"create", 1, b"", b"", 0, b"", 3, 3, b"", b"", b""])
    assert (empty.incident_id, empty.incident_display, empty.pending_since) == (None, None, None)
    assert (empty.previous_id, empty.previous_display, empty.hold) == (None, None, None)
