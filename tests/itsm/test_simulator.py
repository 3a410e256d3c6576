"""The ITSM simulator behaves as docs/itsm-api.md says the real server does.

These tests speak raw HTTP to the simulator on purpose: they specify the server,
not the bridge's client.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

import pytest
import requests

from bridge.itsm.simulator import Simulator
from tests.conftest import SIM_API_KEY, SIM_CLIENT_ID, SIM_CLIENT_SECRET, SIM_PASSWORD, SIM_USERNAME

TIMEOUT = 5


def token_response(
    sim: Simulator,
    *,
    password: str = SIM_PASSWORD,
    secret: str = SIM_CLIENT_SECRET,
    multipart: bool = True,
) -> requests.Response:
    fields = {"username": SIM_USERNAME, "password": password, "grant_type": "password"}
    if multipart:
        return requests.post(
            f"{sim.url}/api/oauth/token",
            auth=(SIM_CLIENT_ID, secret),
            files={name: (None, value) for name, value in fields.items()},
            timeout=TIMEOUT,
        )
    return requests.post(
        f"{sim.url}/api/oauth/token", auth=(SIM_CLIENT_ID, secret), data=fields, timeout=TIMEOUT
    )


def refresh_response(sim: Simulator, refresh_token: str) -> requests.Response:
    return requests.post(
        f"{sim.url}/api/oauth/token",
        auth=(SIM_CLIENT_ID, SIM_CLIENT_SECRET),
        files={"grant_type": (None, "refresh_token"), "refresh_token": (None, refresh_token)},
        timeout=TIMEOUT,
    )


class Api:
    """Raw HTTP against one simulator with a bearer token."""

    def __init__(self, sim: Simulator, token: str | None = None) -> None:
        self.sim = sim
        self.token = token or token_response(sim).json()["access_token"]

    def call(self, method: str, path: str, body: Any = None, **kwargs: Any) -> requests.Response:
        kwargs.setdefault("timeout", TIMEOUT)
        headers = {"Authorization": f"Bearer {self.token}"}
        return requests.request(method, self.sim.url + path, json=body, headers=headers, **kwargs)

    def create(self, **fields: Any) -> requests.Response:
        if self.sim.flavor == "itsm":
            body = {"subject": "disk full", "requesterEmail": "ops@example.com"}
            body["categoryName"] = "Incident"
            return self.call("POST", "/api/v1/incident", {**body, **fields})
        body = {"subject": "disk full", "requesterEmail": "ops@example.com"}
        return self.call("POST", "/api/v1/request", {**body, **fields})


def wait_for(condition: Callable[[], bool], timeout: float = 3.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError("condition not met in time")
        time.sleep(0.02)


def tag_qualification(*tags: str) -> dict[str, Any]:
    return {
        "qualDetails": {
            "type": "FlatQualificationRest",
            "quals": [
                {
                    "type": "RelationalQualificationRest",
                    "leftOperand": {"type": "PropertyOperandRest", "key": "request.tags"},
                    "operator": "in",
                    "rightOperand": {
                        "type": "ValueOperandRest",
                        "value": {"type": "ListStringValueRest", "value": list(tags)},
                    },
                }
            ],
        }
    }


# ---------------------------------------------------------------- token endpoint


def test_password_grant_returns_a_bearer_token_with_spring_fields(simulator):
    response = token_response(simulator)

    assert response.status_code == 200
    body = response.json()
    assert body["token_type"] == "bearer"
    assert body["expires_in"] == 7199
    assert {"access_token", "refresh_token", "scope", "jti"} <= body.keys()
    assert body["access_token"] != token_response(simulator).json()["access_token"]


def test_password_grant_accepts_urlencoded_form(itsm_sim):
    assert token_response(itsm_sim, multipart=False).status_code == 200


def test_wrong_client_secret_is_401_invalid_client(itsm_sim):
    response = token_response(itsm_sim, secret="wrong")

    assert response.status_code == 401
    assert response.json()["error"] == "invalid_client"


def test_wrong_password_is_400_invalid_grant_bad_credentials(itsm_sim):
    response = token_response(itsm_sim, password="wrong")

    assert response.status_code == 400
    assert response.json() == {"error": "invalid_grant", "error_description": "Bad credentials"}


def test_missing_grant_field_is_400(itsm_sim):
    response = requests.post(
        f"{itsm_sim.url}/api/oauth/token",
        auth=(SIM_CLIENT_ID, SIM_CLIENT_SECRET),
        files={"grant_type": (None, "password"), "username": (None, SIM_USERNAME)},
        timeout=TIMEOUT,
    )

    assert response.status_code == 400
    assert "password" in response.json()["error_description"]


def test_refresh_grant_issues_a_new_working_access_token(serviceops_sim):
    first = token_response(serviceops_sim).json()

    refreshed = refresh_response(serviceops_sim, first["refresh_token"])

    assert refreshed.status_code == 200
    new_token = refreshed.json()["access_token"]
    assert new_token != first["access_token"]
    assert Api(serviceops_sim, new_token).create().status_code == 200
    assert serviceops_sim.calls()["token_refresh"] == 1


def test_unknown_refresh_token_is_400_invalid_grant(itsm_sim):
    response = refresh_response(itsm_sim, "not-a-token")

    assert response.status_code == 400
    assert response.json()["error"] == "invalid_grant"


def test_revoked_tokens_get_401_invalid_token(simulator):
    issued = token_response(simulator).json()
    api = Api(simulator, issued["access_token"])
    simulator.revoke_tokens()

    response = api.create()

    assert response.status_code == 401
    assert response.json()["error"] == "invalid_token"
    assert response.headers["WWW-Authenticate"] == 'Bearer error="invalid_token"'
    assert refresh_response(simulator, issued["refresh_token"]).status_code == 400
    assert simulator.calls()["unauthorized"] == 1


def test_missing_authorization_is_401(simulator):
    path = "/api/v1/incident" if simulator.flavor == "itsm" else "/api/v1/request"

    response = requests.post(simulator.url + path, json={"subject": "x"}, timeout=TIMEOUT)

    assert response.status_code == 401


def test_access_token_expires_after_its_ttl():
    with Simulator(
        "itsm",
        client_id=SIM_CLIENT_ID,
        client_secret=SIM_CLIENT_SECRET,
        username=SIM_USERNAME,
        password=SIM_PASSWORD,
        token_ttl_s=0.3,
    ) as sim:
        api = Api(sim)
        assert api.create().status_code == 200

        wait_for(lambda: api.create().status_code == 401)

        assert sim.calls()["unauthorized"] == 1


def test_apikey_header_authorizes_serviceops(serviceops_sim):
    response = requests.post(
        f"{serviceops_sim.url}/api/v1/request",
        json={"subject": "x", "requesterEmail": "ops@example.com"},
        headers={"Authorization": f"Apikey {SIM_API_KEY}"},
        timeout=TIMEOUT,
    )

    assert response.status_code == 200


def test_apikey_header_is_refused_by_gen_a(itsm_sim):
    response = requests.get(
        f"{itsm_sim.url}/api/v1/incident/60",
        headers={"Authorization": f"Apikey {SIM_API_KEY}"},
        timeout=TIMEOUT,
    )

    assert response.status_code == 401


def test_rotated_password_refuses_the_old_one_but_keeps_issued_tokens(itsm_sim):
    api = Api(itsm_sim)
    itsm_sim.set_credentials(password="new-password")

    assert token_response(itsm_sim).status_code == 400
    assert token_response(itsm_sim, password="new-password").status_code == 200
    assert api.create().status_code == 200


# ---------------------------------------------------------------- Gen A: /api/v1/incident


def test_gen_a_create_answers_only_the_wrapper(itsm_sim):
    response = Api(itsm_sim).create()

    assert response.status_code == 200
    assert response.json() == {"returnCode": "SUCCESS", "status": 0, "userMessage": None, "id": 60}


def test_gen_a_get_returns_the_bare_object_without_id(itsm_sim):
    api = Api(itsm_sim)
    incident_id = api.create(impact="ONUSER", priority="HIGH", tags=["k1"]).json()["id"]

    body = api.call("GET", f"/api/v1/incident/{incident_id}").json()

    assert "id" not in body and "name" not in body
    assert body["status"] == "Open"
    assert (body["impact"], body["priority"], body["urgency"]) == ("ONUSER", "HIGH", "LOW")
    assert body["tags"] == ["k1"]


def test_gen_a_update_with_status_resolves(itsm_sim):
    api = Api(itsm_sim)
    incident_id = api.create().json()["id"]

    response = api.call("POST", f"/api/v1/incident/{incident_id}", {"status": "Resolved"})

    assert response.json()["returnCode"] == "SUCCESS"
    assert api.call("GET", f"/api/v1/incident/{incident_id}").json()["status"] == "Resolved"
    assert itsm_sim.incidents()[0]["status"] == "Resolved"


def test_gen_a_enum_violation_is_400_naming_the_field(itsm_sim):
    response = Api(itsm_sim).create(priority="High")

    assert response.status_code == 400
    body = response.json()
    assert body["returnCode"] == "FAILURE" and body["id"] is None
    assert "priority" in body["userMessage"]
    assert itsm_sim.incidents() == []


def test_gen_a_missing_category_is_400_naming_it(itsm_sim):
    response = Api(itsm_sim).call(
        "POST", "/api/v1/incident", {"subject": "x", "requesterEmail": "ops@example.com"}
    )

    assert response.status_code == 400
    assert "categoryName" in response.json()["userMessage"]


def test_gen_a_unknown_id_is_404_wrapper(itsm_sim):
    response = Api(itsm_sim).call("GET", "/api/v1/incident/999")

    assert response.status_code == 404
    assert response.json()["returnCode"] == "FAILURE"


def test_gen_a_has_no_search_notes_or_delete(itsm_sim):
    api = Api(itsm_sim)
    incident_id = api.create().json()["id"]

    assert api.call("POST", "/api/v1/incident/search/byqual", {}).status_code in (404, 405)
    assert api.call("POST", f"/api/v1/incident/{incident_id}/conversation", {}).status_code == 404
    assert api.call("DELETE", f"/api/v1/incident/{incident_id}").status_code == 405


# ---------------------------------------------------------------- Gen B: /api/v1/request


def test_gen_b_create_returns_the_full_object_with_id_and_display_name(serviceops_sim):
    response = Api(serviceops_sim).create(impactName="On department", customField={"Host": "db1"})

    body = response.json()
    assert response.status_code == 200
    assert body["id"] == 60 and body["name"] == "INC-40"
    assert body["statusName"] == "Open"
    assert body["impactName"] == "On Department"
    assert body["customField"] == {"Host": "db1"}
    assert isinstance(body["createdTime"], int) and body["createdTime"] > 1_600_000_000_000


def test_gen_b_get_returns_the_same_object(serviceops_sim):
    api = Api(serviceops_sim)
    created = api.create().json()

    assert api.call("GET", f"/api/v1/request/{created['id']}").json() == created


def test_gen_b_patch_status_resolves_and_returns_the_object(serviceops_sim):
    api = Api(serviceops_sim)
    request_id = api.create().json()["id"]

    response = api.call("PATCH", f"/api/v1/request/{request_id}", {"statusName": "Resolved"})

    assert response.json()["statusName"] == "Resolved"
    assert response.json()["resolvedTime"] > 0


def test_gen_b_accepts_cancelled_as_a_custom_status(serviceops_sim):
    api = Api(serviceops_sim)
    request_id = api.create().json()["id"]

    response = api.call("PATCH", f"/api/v1/request/{request_id}", {"statusName": "Cancelled"})

    assert response.status_code == 200


def test_gen_b_enum_violation_is_400_naming_the_field(serviceops_sim):
    response = Api(serviceops_sim).create(urgencyName="HIGH")

    assert response.status_code == 400
    assert "urgencyName" in response.json()["userMessage"]
    assert response.json()["errorCode"]


def test_gen_b_delete_removes_the_request(serviceops_sim):
    api = Api(serviceops_sim)
    request_id = api.create().json()["id"]

    assert api.call("DELETE", f"/api/v1/request/{request_id}").status_code == 200
    assert api.call("GET", f"/api/v1/request/{request_id}").status_code == 404


def test_gen_b_search_by_tag_finds_only_tagged_requests(serviceops_sim):
    api = Api(serviceops_sim)
    wanted = api.create(tags=["alert:k1", "env:prod"]).json()["id"]
    api.create(tags=["alert:k2"])

    response = api.call(
        "POST",
        "/api/v1/request/search/byqual?offset=0&size=10&sort_by=createdTime",
        tag_qualification("alert:k1"),
    )

    body = response.json()
    assert body["totalCount"] == 1
    assert [obj["id"] for obj in body["objectList"]] == [wanted]


def test_gen_b_search_with_empty_body_lists_all_and_pages(serviceops_sim):
    api = Api(serviceops_sim)
    ids = [api.create().json()["id"] for _ in range(3)]

    body = api.call("POST", "/api/v1/request/search/byqual?offset=1&size=1", {}).json()

    assert body["totalCount"] == 3
    assert [obj["id"] for obj in body["objectList"]] == ids[1:2]


def test_gen_b_search_by_id_not_in_and_status(serviceops_sim):
    api = Api(serviceops_sim)
    first, second, third = (api.create().json()["id"] for _ in range(3))
    api.call("PATCH", f"/api/v1/request/{third}", {"statusName": "Closed"})
    quals = [
        {
            "type": "RelationalQualificationRest",
            "leftOperand": {"type": "DbOperandRest", "key": "id"},
            "operator": "not_in",
            "rightOperand": {
                "type": "ValueOperandRest",
                "value": {"type": "ListLongValueRest", "value": [first]},
            },
        },
        {
            "type": "RelationalQualificationRest",
            "leftOperand": {"type": "PropertyOperandRest", "key": "statusName"},
            "operator": "not_equal",
            "rightOperand": {
                "type": "ValueOperandRest",
                "value": {"type": "StringValueRest", "value": "Closed"},
            },
        },
    ]
    body = {"qualDetails": {"type": "FlatQualificationRest", "quals": quals}}

    found = api.call("POST", "/api/v1/request/search/byqual", body).json()

    assert [obj["id"] for obj in found["objectList"]] == [second]


def test_gen_b_note_is_stored_and_searchable(serviceops_sim):
    api = Api(serviceops_sim)
    request_id = api.create().json()["id"]

    response = api.call(
        "POST",
        f"/api/v1/request/{request_id}/conversation",
        {"conversationType": "note", "details": "<p>still firing</p>", "subject": "update"},
    )

    assert response.status_code == 200
    note = response.json()
    assert note["details"] == "<p>still firing</p>"
    assert isinstance(note["createdTime"], str)
    listed = api.call("POST", f"/api/v1/request/{request_id}/conversation/search/byqual", {})
    assert [item["id"] for item in listed.json()["objectList"]] == [note["id"]]
    assert serviceops_sim.incidents()[0]["notes"][0]["details"] == "<p>still firing</p>"


def test_gen_b_note_with_empty_details_is_400(serviceops_sim):
    api = Api(serviceops_sim)
    request_id = api.create().json()["id"]

    response = api.call(
        "POST", f"/api/v1/request/{request_id}/conversation", {"conversationType": "note"}
    )

    assert response.status_code == 400
    assert "details" in response.json()["userMessage"]


# ---------------------------------------------------------------- fault injection


def test_fail_next_answers_the_status_with_retry_after_without_applying(simulator):
    api = Api(simulator)
    simulator.fail_next(2, 503, retry_after="2", operations=("create",))

    first, second, third = api.create(), api.create(), api.create()

    assert (first.status_code, second.status_code, third.status_code) == (503, 503, 200)
    assert first.headers["Retry-After"] == "2"
    assert len(simulator.incidents()) == 1
    assert simulator.calls()["injected_fault"] == 2


def test_fail_next_only_matches_the_listed_operations(itsm_sim):
    itsm_sim.fail_next(1, 500, operations=("update",))

    assert token_response(itsm_sim).status_code == 200
    assert Api(itsm_sim).create().status_code == 200


def test_commit_then_fail_stores_the_incident_and_answers_502(simulator):
    api = Api(simulator)
    simulator.commit_then_fail(1)

    response = api.create()

    assert response.status_code == 502
    assert response.headers["Content-Type"].startswith("text/html")
    assert len(simulator.incidents()) == 1
    assert api.create().status_code == 200


def test_hang_next_applies_the_create_but_answers_late(itsm_sim):
    api = Api(itsm_sim)
    itsm_sim.hang_next(1, 1.0)
    body = {"subject": "s", "requesterEmail": "ops@example.com", "categoryName": "Incident"}

    with pytest.raises(requests.ReadTimeout):
        api.call("POST", "/api/v1/incident", body, timeout=0.2)

    wait_for(lambda: len(itsm_sim.incidents()) == 1)
    assert itsm_sim.calls()["hung"] == 1


def test_latency_delays_every_api_call(itsm_sim):
    api = Api(itsm_sim)
    itsm_sim.set_latency(0.1)

    started = time.monotonic()
    api.create()

    assert time.monotonic() - started >= 0.1


def test_person_closing_an_incident_is_visible_over_the_api(serviceops_sim):
    api = Api(serviceops_sim)
    request_id = api.create().json()["id"]

    serviceops_sim.close_incident(request_id)

    body = api.call("GET", f"/api/v1/request/{request_id}").json()
    assert body["statusName"] == "Closed"


# ---------------------------------------------------------------- observation and admin API


def test_call_log_records_each_request(itsm_sim):
    Api(itsm_sim).create()

    log = itsm_sim.call_log()

    assert [(entry["op"], entry["status"]) for entry in log] == [
        ("token_password", 200),
        ("create", 200),
    ]
    assert itsm_sim.calls()["total"] == 2


def test_admin_api_injects_faults_and_reports_state(serviceops_sim):
    url = serviceops_sim.url
    api = Api(serviceops_sim)
    faults = {"fail_next": {"n": 1, "status": 429, "retry_after": "1", "operations": ["create"]}}

    assert requests.post(f"{url}/_sim/faults", json=faults, timeout=TIMEOUT).status_code == 200
    assert api.create().status_code == 429
    assert api.create().status_code == 200

    state = requests.get(f"{url}/_sim/state", timeout=TIMEOUT).json()
    assert len(state["incidents"]) == 1
    assert state["calls"]["injected_fault"] == 1
    assert requests.get(f"{url}/_sim/log", timeout=TIMEOUT).json()[-1]["op"] == "create"


def test_admin_api_closes_incidents_and_resets(serviceops_sim):
    url = serviceops_sim.url
    request_id = Api(serviceops_sim).create().json()["id"]

    close = {"close_incident": {"id": request_id, "status": "Closed"}}
    requests.post(f"{url}/_sim/faults", json=close, timeout=TIMEOUT)
    assert serviceops_sim.incidents()[0]["statusName"] == "Closed"

    requests.post(f"{url}/_sim/reset", timeout=TIMEOUT)
    assert requests.get(f"{url}/_sim/calls", timeout=TIMEOUT).json()["total"] == 0
    assert serviceops_sim.incidents() == []


def test_admin_api_rejects_unknown_fault_keys(itsm_sim):
    response = requests.post(f"{itsm_sim.url}/_sim/faults", json={"explode": 1}, timeout=TIMEOUT)

    assert response.status_code == 400
