"""``check_itsm``: one token, one documented read call, one sentence naming the cause."""

from __future__ import annotations

import socket
import threading
from typing import Any

from bridge.itsm.check import check_itsm
from bridge.settings import load_settings
from tests.conftest import (
    SIM_API_KEY,
    SIM_CLIENT_ID,
    SIM_CLIENT_SECRET,
    SIM_PASSWORD,
    SIM_USERNAME,
)

WRITES = ("create", "update", "note", "delete")


def settings_for(sim: Any = None, url: str | None = None, **overrides: Any) -> Any:
    env = {
        "BRIDGE_ITSM_URL": url or sim.url,
        "BRIDGE_ITSM_FLAVOR": sim.flavor if sim is not None else "itsm",
        "BRIDGE_ITSM_CLIENT_ID": SIM_CLIENT_ID,
        "BRIDGE_ITSM_CLIENT_SECRET": SIM_CLIENT_SECRET,
        "BRIDGE_ITSM_USERNAME": SIM_USERNAME,
        "BRIDGE_ITSM_PASSWORD": SIM_PASSWORD,
        "BRIDGE_REDIS_PREFIX": "checktest",
    }
    return load_settings(env=env, **overrides)


def closed_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def test_ok_in_each_flavour_with_one_token_and_one_read(simulator):
    result = check_itsm(settings_for(simulator))
    assert result.ok, result.message
    assert simulator.url in result.message
    calls = simulator.calls()
    assert calls["token_password"] == 1
    assert calls["get" if simulator.flavor == "itsm" else "search"] == 1
    assert calls["total"] == 2
    assert not any(calls[op] for op in WRITES)


def test_ok_with_an_api_key_makes_no_token_request(serviceops_sim):
    result = check_itsm(settings_for(serviceops_sim, itsm_api_key=SIM_API_KEY))
    assert result.ok, result.message
    assert "API key" in result.message
    assert serviceops_sim.calls()["token_password"] == 0


def test_always_a_fresh_grant_and_nothing_left_in_redis(itsm_sim, redis_client):
    settings = settings_for(itsm_sim)
    assert check_itsm(settings, redis_client).ok
    assert check_itsm(settings, redis_client).ok
    assert itsm_sim.calls()["token_password"] == 2
    assert redis_client.keys("*") == []


def test_wrong_client_secret(simulator):
    result = check_itsm(settings_for(simulator, itsm_client_secret="wrong-secret"))
    assert not result.ok
    assert "client id or client secret" in result.message
    assert "wrong-secret" not in result.message


def test_wrong_password(simulator):
    result = check_itsm(settings_for(simulator, itsm_password="wrong-password"))
    assert not result.ok
    assert "username or password" in result.message
    assert SIM_USERNAME in result.message
    assert "wrong-password" not in result.message


def test_wrong_api_key(serviceops_sim):
    result = check_itsm(settings_for(serviceops_sim, itsm_api_key="wrong%40key"))
    assert not result.ok
    assert "rejected the API key" in result.message


def test_unreachable_host():
    url = f"http://127.0.0.1:{closed_port()}"
    result = check_itsm(settings_for(url=url))
    assert not result.ok
    assert result.message.startswith("Cannot connect to " + url)


def test_unresolvable_host():
    result = check_itsm(settings_for(url="http://no-such-host.invalid"))
    assert not result.ok
    assert "resolve" in result.message


def test_tls_failure():
    # A server that answers a TLS hello with plain HTTP: the handshake fails at once.
    with socket.socket() as server:
        server.bind(("127.0.0.1", 0))
        server.listen(4)
        port = server.getsockname()[1]

        def answer() -> None:
            for _ in range(2):
                try:
                    conn, _ = server.accept()
                except OSError:
                    return
                with conn:
                    conn.sendall(b"HTTP/1.1 400 Bad Request\r\nContent-Length: 0\r\n\r\n")

        thread = threading.Thread(target=answer, daemon=True)
        thread.start()
        result = check_itsm(settings_for(url=f"https://127.0.0.1:{port}"))
    assert not result.ok
    assert result.message.startswith("TLS failure")


def test_wrong_flavour_is_named(simulator):
    other = "serviceops" if simulator.flavor == "itsm" else "itsm"
    result = check_itsm(settings_for(simulator, itsm_flavor=other))
    assert not result.ok
    assert "wrong flavour" in result.message
    assert f'itsm.flavor = "{simulator.flavor}"' in result.message


def test_timeout(simulator):
    simulator.hang_next(1, 1.0)
    result = check_itsm(settings_for(simulator, itsm_read_timeout_s=0.3))
    assert not result.ok
    assert "did not answer within 0.3 s" in result.message


def test_server_error_on_the_token_endpoint(itsm_sim):
    itsm_sim.fail_next(1, 503, operations=("token",))
    result = check_itsm(settings_for(itsm_sim))
    assert not result.ok
    assert "HTTP 503" in result.message


def test_messages_carry_no_secret(simulator):
    for overrides in ({"itsm_client_secret": "wrong"}, {"itsm_password": "wrong"}, {}):
        simulator.fail_next(1, 500, operations=("get", "search"))
        message = check_itsm(settings_for(simulator, **overrides)).message
        for secret in (SIM_CLIENT_SECRET, SIM_PASSWORD, SIM_API_KEY):
            assert secret not in message
