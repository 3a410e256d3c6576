"""``bridge itsm check`` and the client against an ITSM that knows only the published docs.

The server (tests/itsm/strict_server.py) shares no code with the bridge or its
simulator and records every request, so these tests also prove the bridge makes no
request the documentation does not describe.
"""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Iterator

import pytest

from bridge.itsm.client import build_client
from bridge.itsm.model import IncidentRef
from bridge.settings import load_settings
from tests.itsm.strict_server import GEN_A, GEN_B, StrictItsm


@pytest.fixture(params=[GEN_A, GEN_B])
def strict(request) -> Iterator[StrictItsm]:
    server = StrictItsm(request.param)
    server.url = server.start()  # type: ignore[attr-defined]
    yield server
    server.stop()
    assert server.undocumented() == [], "the bridge made a request the docs do not describe"


def _env(server: StrictItsm, **overrides: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("BRIDGE_")}
    env.update(
        BRIDGE_ITSM_URL=server.url,  # type: ignore[attr-defined]
        BRIDGE_ITSM_FLAVOR=server.flavor,
        BRIDGE_ITSM_CLIENT_ID=server.client_id,
        BRIDGE_ITSM_CLIENT_SECRET=server.client_secret,
        BRIDGE_ITSM_USERNAME=server.username,
        BRIDGE_ITSM_PASSWORD=server.password,
    )
    if server.flavor == GEN_A:
        env["BRIDGE_ITSM_CHECK_INCIDENT_ID"] = str(server.add_incident("disk full on db1"))
    env.update(overrides)
    return env


def _check(env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "bridge.cli", "itsm", "check"],
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
    )


def test_check_passes_with_the_right_settings(strict):
    done = _check(_env(strict))
    assert done.returncode == 0, done.stderr
    assert "OK" in done.stdout


def test_check_names_a_wrong_client_secret(strict):
    done = _check(_env(strict, BRIDGE_ITSM_CLIENT_SECRET="not-the-secret"))
    assert done.returncode != 0
    assert "client id or client secret" in done.stderr
    assert "not-the-secret" not in done.stdout + done.stderr


def test_check_names_a_wrong_password(strict):
    done = _check(_env(strict, BRIDGE_ITSM_PASSWORD="not-the-password"))
    assert done.returncode != 0
    assert "username or password" in done.stderr
    assert "not-the-password" not in done.stdout + done.stderr


def test_check_with_an_api_key_on_serviceops():
    server = StrictItsm(GEN_B)
    server.url = server.start()  # type: ignore[attr-defined]
    try:
        done = _check(_env(server, BRIDGE_ITSM_API_KEY=server.api_key))
    finally:
        server.stop()
    assert done.returncode == 0, done.stderr
    assert [s.path for s in server.seen] == ["/api/v1/request/search/byqual"], "no token grant"


def test_check_on_the_2018_api_without_a_known_incident_says_what_to_set():
    server = StrictItsm(GEN_A)
    server.url = server.start()  # type: ignore[attr-defined]
    try:
        env = _env(server)
        del env["BRIDGE_ITSM_CHECK_INCIDENT_ID"]
        done = _check(env)
    finally:
        server.stop()
    assert done.returncode != 0
    assert "itsm.check_incident_id" in done.stderr


def test_the_client_reads_an_incident_with_documented_requests_only(strict, redis_client):
    env = _env(strict)
    number = strict.add_incident("cpu hot on web3")
    settings = load_settings(env=env, redis_prefix="strict")
    client = build_client(settings, redis_client)
    incident = client.get(IncidentRef(number))
    assert incident.subject == "cpu hot on web3"
    assert incident.status == "Open"
