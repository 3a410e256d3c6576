"""The incident client against the simulator over HTTP, once per API generation."""

from __future__ import annotations

import multiprocessing
import threading
from dataclasses import replace
from typing import Any

import pytest

from bridge.itsm.client import GenAClient, GenBClient, build_client, key_tag
from bridge.itsm.errors import NotSupported
from bridge.itsm.model import Impact, IncidentDraft, IncidentRef, Priority
from bridge.settings import load_settings
from tests.conftest import SIM_CLIENT_ID, SIM_CLIENT_SECRET, SIM_PASSWORD, SIM_USERNAME

DRAFT = IncidentDraft(
    subject="disk full on db1",
    description="/var at 99%",
    requester_email="alerts@example.com",
    category="Incident",
    priority=Priority.HIGH,
    urgency=Priority.MEDIUM,
    impact=Impact.ON_DEPARTMENT,
    tags=("alert-bridge", "db"),
)

GEN_A_PRIORITY = {"LOW": "LOW", "MEDIUM": "MEDIUM", "HIGH": "HIGH", "URGENT": "URGENT"}
GEN_B_PRIORITY = {"LOW": "Low", "MEDIUM": "Medium", "HIGH": "High", "URGENT": "Urgent"}
GEN_A_IMPACT = {
    "LOW": "LOW",
    "ON_USER": "ONUSER",
    "ON_DEPARTMENT": "ONDEPARTMENT",
    "ON_BUSINESS": "ONBUSINESS",
}
GEN_B_IMPACT = {
    "LOW": "Low",
    "ON_USER": "On User",
    "ON_DEPARTMENT": "On Department",
    "ON_BUSINESS": "On Business",
}


def settings_for(sim: Any, **overrides: Any) -> Any:
    env = {
        "BRIDGE_ITSM_URL": sim.url,
        "BRIDGE_ITSM_FLAVOR": sim.flavor,
        "BRIDGE_ITSM_CLIENT_ID": SIM_CLIENT_ID,
        "BRIDGE_ITSM_CLIENT_SECRET": SIM_CLIENT_SECRET,
        "BRIDGE_ITSM_USERNAME": SIM_USERNAME,
        "BRIDGE_ITSM_PASSWORD": SIM_PASSWORD,
        "BRIDGE_REDIS_PREFIX": "clienttest",
    }
    return load_settings(env=env, **overrides)


@pytest.fixture
def client(simulator, redis_client):
    made = build_client(settings_for(simulator), redis_client)
    yield made
    made.close()


def stored(sim: Any, ref: IncidentRef) -> dict[str, Any]:
    (incident,) = [i for i in sim.incidents() if i["id"] == ref.id]
    return incident


def test_the_flavour_picks_the_api_generation(simulator, client):
    expected = GenBClient if simulator.flavor == "serviceops" else GenAClient
    assert type(client) is expected
    assert client.can_search is (simulator.flavor == "serviceops")


def test_create_then_get_round_trips_the_draft(simulator, client):
    ref = client.create(DRAFT, "grafana/db1/disk")
    assert isinstance(ref.id, int)
    if simulator.flavor == "serviceops":
        assert ref.display is not None and ref.display.startswith("INC-")
        assert ref.display != f"INC-{ref.id}"
    else:
        assert ref.display is None  # Gen A create answers with the id only
    incident = client.get(ref)
    assert incident.ref == ref
    assert incident.subject == DRAFT.subject
    assert incident.status == "Open"
    assert (incident.priority, incident.urgency) == (Priority.HIGH, Priority.MEDIUM)
    assert incident.tags == ("alert-bridge", "db", "bridge-key:grafana/db1/disk")
    if simulator.flavor == "serviceops":
        assert incident.created_ms and incident.created_ms > 1_600_000_000_000


def test_the_key_tag_is_added_once(simulator, client):
    draft = replace(DRAFT, tags=("x", key_tag("k1")))
    ref = client.create(draft, "k1")
    assert stored(simulator, ref)["tags"] == ["x", "bridge-key:k1"]


@pytest.mark.parametrize("priority", list(Priority))
def test_priority_and_urgency_use_the_flavours_literals(simulator, client, priority):
    ref = client.create(replace(DRAFT, priority=priority, urgency=priority), "k1")
    names = GEN_B_PRIORITY if simulator.flavor == "serviceops" else GEN_A_PRIORITY
    incident = stored(simulator, ref)
    field = "priorityName" if simulator.flavor == "serviceops" else "priority"
    urgency = "urgencyName" if simulator.flavor == "serviceops" else "urgency"
    assert incident[field] == incident[urgency] == names[priority.value]
    assert client.get(ref).priority is priority


@pytest.mark.parametrize("impact", list(Impact))
def test_impact_uses_the_flavours_literals(simulator, client, impact):
    ref = client.create(replace(DRAFT, impact=impact), "k1")
    if simulator.flavor == "serviceops":
        assert stored(simulator, ref)["impactName"] == GEN_B_IMPACT[impact.value]
    else:
        assert stored(simulator, ref)["impact"] == GEN_A_IMPACT[impact.value]


def test_update_changes_only_what_is_given(simulator, client):
    ref = client.create(DRAFT, "k1")
    client.update(ref, priority=Priority.URGENT)
    incident = client.get(ref)
    assert (incident.priority, incident.urgency) == (Priority.URGENT, Priority.MEDIUM)
    client.update(ref, subject="disk still full", description="now 100%")
    incident = client.get(ref)
    assert incident.subject == "disk still full"
    assert stored(simulator, ref)["description"] == "now 100%"
    before = simulator.calls()["update"]
    client.update(ref)
    assert simulator.calls()["update"] == before  # nothing to say, nothing sent


def test_resolve_and_reopen_use_the_configured_statuses(simulator, redis_client):
    settings = settings_for(simulator, itsm_resolved_status="Closed")
    client = build_client(settings, redis_client)
    ref = client.create(DRAFT, "k1")
    client.resolve(ref)
    assert client.get(ref).status == "Closed"
    client.reopen(ref)
    assert client.get(ref).status == "Open"
    client.set_status(ref, "Resolved")
    assert stored(simulator, ref)["status"] == "Resolved"
    client.close()


def test_notes(simulator, client):
    ref = client.create(DRAFT, "k1")
    client.add_note(ref, "41 more occurrences since 10:00\n<b>not markup</b>")
    client.add_note(ref, "severity rose to critical")
    incident = stored(simulator, ref)
    if simulator.flavor == "serviceops":
        details = [note["details"] for note in incident["notes"]]
        assert len(details) == 2
        assert "41 more occurrences" in details[0]
        assert "&lt;b&gt;" in details[0]  # the text is escaped, its line break kept
        assert "<br>" in details[0]
        assert incident["notes"][0]["conversationType"] == "note"
    else:
        # Gen A has no notes: dated blocks appended to the description, which stays.
        description = incident["description"]
        assert description.startswith("/var at 99%")
        assert description.count("--- Note ") == 2
        assert description.index("41 more") < description.index("severity rose")
        assert incident["notes"] == []


def test_find_by_key_finds_exactly_the_tagged_incidents(simulator, client):
    if simulator.flavor == "itsm":
        with pytest.raises(NotSupported):
            client.find_by_key("k1")
        return
    first = client.create(DRAFT, "k1")
    client.create(DRAFT, "k10")  # a longer key sharing the prefix
    client.create(replace(DRAFT, tags=("k1",)), "other")
    second = client.create(DRAFT, "k1")
    client.resolve(first)
    found = client.find_by_key("k1")
    assert [i.ref for i in found] == [first, second]
    assert [i.status for i in found] == ["Resolved", "Open"]
    assert client.find_by_key("nothing") == []


def test_find_by_key_reads_every_page(serviceops_sim, redis_client):
    client = build_client(settings_for(serviceops_sim), redis_client)
    refs = [client.create(DRAFT, "busy") for _ in range(55)]
    found = client.find_by_key("busy")
    assert [i.ref for i in found] == refs
    assert serviceops_sim.calls()["search"] == 2
    client.close()


def test_delete(simulator, client):
    ref = client.create(DRAFT, "k1")
    if simulator.flavor == "itsm":
        with pytest.raises(NotSupported):
            client.delete(ref)
        assert len(simulator.incidents()) == 1
    else:
        client.delete(ref)
        assert simulator.incidents() == []


def test_gen_b_custom_fields_and_technician_group(serviceops_sim, redis_client):
    settings = settings_for(serviceops_sim, itsm_key_custom_field="Alert Key")
    client = build_client(settings, redis_client)
    draft = replace(DRAFT, technician_group="DBA", custom_fields={"Service": "billing"})
    ref = client.create(draft, "k1")
    incident = stored(serviceops_sim, ref)
    assert incident["customField"]["Alert Key"] == "k1"
    assert incident["customField"]["Service"] == "billing"
    assert incident["technicianGroupName"] == "DBA"
    client.close()


def test_gen_a_sends_only_custom_fields_with_numeric_ids(itsm_sim, redis_client):
    settings = settings_for(itsm_sim, itsm_key_custom_field="12")
    client = build_client(settings, redis_client)
    draft = replace(DRAFT, technician_group="DBA", custom_fields={"Service": "x", "7": "y"})
    ref = client.create(draft, "k1")
    assert stored(itsm_sim, ref)["customFieldValueDetails"] == {
        "12": {"type": 1, "stringValue": "k1"},
        "7": {"type": 1, "stringValue": "y"},
    }
    client.close()


def test_the_request_hook_sees_every_call(simulator, redis_client):
    seen: list[tuple[str, int | None, float]] = []
    client = build_client(
        settings_for(simulator), redis_client, on_request=lambda *a: seen.append(a)
    )
    ref = client.create(DRAFT, "k1")
    client.get(ref)
    assert [(op, status) for op, status, _ in seen] == [
        ("token_password", 200),
        ("create", 200),
        ("get", 200),
    ]
    assert all(seconds >= 0 for *_, seconds in seen)
    client.close()


def test_every_incident_call_asks_for_json(simulator, client):
    ref = client.create(DRAFT, "k1")
    client.update(ref, priority=Priority.URGENT)
    client.get(ref)
    calls = [c for c in simulator.call_log() if not c["op"].startswith("token")]
    assert [c["op"] for c in calls] == ["create", "update", "get"]
    assert {c["accept"] for c in calls} == {"application/json"}


def test_many_threads_share_one_client(simulator, client):
    ref = client.create(DRAFT, "k1")
    errors: list[BaseException] = []

    def work() -> None:
        try:
            for _ in range(10):
                assert client.get(ref).subject == DRAFT.subject
        except BaseException as exc:
            errors.append(exc)

    threads = [threading.Thread(target=work) for _ in range(16)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert errors == []
    assert simulator.calls()["get"] == 160
    assert simulator.calls()["token_password"] == 1


def _use_inherited(client: Any, ref: IncidentRef, results: Any) -> None:
    try:
        results.put(client.get(ref).subject)
    except BaseException as exc:
        results.put(repr(exc))


def test_a_client_inherited_through_fork_opens_its_own_connections(simulator, client):
    ref = client.create(DRAFT, "k1")
    parent_session = client._session()
    ctx = multiprocessing.get_context("fork")
    results = ctx.Queue()
    child = ctx.Process(target=_use_inherited, args=(client, ref, results))
    child.start()
    assert results.get(timeout=30) == DRAFT.subject
    child.join(timeout=10)
    assert client._session() is parent_session
    assert client.get(ref).subject == DRAFT.subject


def test_switching_tls_verification_off_is_logged(redis_client):
    from structlog.testing import capture_logs

    settings = load_settings(
        env={"BRIDGE_ITSM_URL": "https://sd.example.com", "BRIDGE_ITSM_API_KEY": "k"},
        itsm_verify_tls=False,
    )
    with capture_logs() as logs:
        build_client(settings, redis_client)
    warnings = [e for e in logs if e["log_level"] == "warning"]
    assert any("TLS verification is off" in e["event"] for e in warnings)
