"""Every failure of an ITSM call lands on exactly one class of the error tree, with
what the caller needs (status, Retry-After, the server's words) and no credential."""

from __future__ import annotations

import inspect
import pickle
import socket
import time
from email.utils import formatdate
from typing import Any

import pytest
import requests
import urllib3

from bridge.itsm.client import build_client
from bridge.itsm.errors import (
    AmbiguousError,
    AuthError,
    ItsmError,
    NotSupported,
    PermanentError,
    TransientError,
    error_for_exception,
    error_for_status,
    parse_retry_after,
    server_message,
)
from bridge.itsm.model import Impact, IncidentDraft, IncidentRef, Priority
from bridge.settings import load_settings
from tests.conftest import (
    SIM_API_KEY,
    SIM_CLIENT_ID,
    SIM_CLIENT_SECRET,
    SIM_PASSWORD,
    SIM_USERNAME,
)

LEAVES = (TransientError, AmbiguousError, PermanentError, AuthError)
DRAFT = IncidentDraft(
    subject="disk full",
    description="/var at 99%",
    requester_email="alerts@example.com",
    category="Incident",
    priority=Priority.HIGH,
    urgency=Priority.HIGH,
    impact=Impact.ON_USER,
)


def settings_for(sim: Any = None, url: str | None = None, **overrides: Any) -> Any:
    env = {
        "BRIDGE_ITSM_URL": url or sim.url,
        "BRIDGE_ITSM_FLAVOR": sim.flavor if sim is not None else "serviceops",
        "BRIDGE_ITSM_CLIENT_ID": SIM_CLIENT_ID,
        "BRIDGE_ITSM_CLIENT_SECRET": SIM_CLIENT_SECRET,
        "BRIDGE_ITSM_USERNAME": SIM_USERNAME,
        "BRIDGE_ITSM_PASSWORD": SIM_PASSWORD,
        "BRIDGE_REDIS_PREFIX": "errtest",
    }
    return load_settings(env=env, **overrides)


def one_leaf(error: ItsmError) -> type[ItsmError]:
    hits = [cls for cls in LEAVES if isinstance(error, cls)]
    assert len(hits) == 1, (error, hits)
    return hits[0]


def closed_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


# ---------------------------------------------------------------- the mapping is total

EXPECTED = {
    # status: (class for idempotent calls, class for a create)
    400: (PermanentError, PermanentError),
    401: (AuthError, AuthError),
    403: (PermanentError, PermanentError),
    404: (PermanentError, PermanentError),
    405: (PermanentError, PermanentError),
    408: (TransientError, TransientError),
    409: (PermanentError, PermanentError),
    413: (PermanentError, PermanentError),
    422: (PermanentError, PermanentError),
    429: (TransientError, TransientError),
    500: (TransientError, TransientError),
    501: (PermanentError, PermanentError),
    502: (TransientError, AmbiguousError),
    503: (TransientError, TransientError),
    504: (TransientError, AmbiguousError),
    520: (TransientError, AmbiguousError),
}


@pytest.mark.parametrize("creates", [False, True])
def test_every_status_lands_on_exactly_one_class(creates):
    for status in [*range(100, 600), 600, 999]:
        one_leaf(error_for_status(status, operation="get", creates=creates))
    for status, (idempotent, create) in EXPECTED.items():
        error = error_for_status(status, operation="x", creates=creates)
        assert one_leaf(error) is (create if creates else idempotent), status


def _instances() -> list[requests.RequestException]:
    made: list[requests.RequestException] = []
    for _name, cls in inspect.getmembers(requests.exceptions, inspect.isclass):
        if issubclass(cls, requests.RequestException):
            try:
                made.append(cls("boom"))
            except TypeError:  # JSONDecodeError wants (msg, doc, pos)
                made.append(cls("boom", "doc", 0))
    return made


@pytest.mark.parametrize("creates", [False, True])
def test_every_requests_exception_lands_on_exactly_one_class(creates):
    instances = _instances()
    assert len(instances) >= 20
    for exc in instances:
        error = error_for_exception(exc, operation="create" if creates else "get", creates=creates)
        one_leaf(error)
        assert type(exc).__name__ in str(error)


def test_a_failure_once_the_request_may_have_been_sent_is_ambiguous_only_for_create():
    sent = [
        requests.ReadTimeout("read"),
        requests.ConnectionError(urllib3.exceptions.ProtocolError("Connection aborted.")),
        requests.exceptions.ChunkedEncodingError("cut"),
        ValueError("not json"),
    ]
    for exc in sent:
        assert one_leaf(error_for_exception(exc, operation="create", creates=True)) is (
            AmbiguousError
        )
        assert one_leaf(error_for_exception(exc, operation="get")) is TransientError
    not_sent = [
        requests.ConnectTimeout("connect"),
        requests.ConnectionError(urllib3.exceptions.NewConnectionError(None, "refused")),  # type: ignore[arg-type]
        requests.exceptions.SSLError("bad cert"),
    ]
    for exc in not_sent:
        assert one_leaf(error_for_exception(exc, operation="create", creates=True)) is (
            TransientError
        )


def test_errors_survive_pickling_with_their_fields():
    error = error_for_status(429, operation="create", server_message="slow down", retry_after=7)
    copy = pickle.loads(pickle.dumps(error))
    assert type(copy) is TransientError
    assert (copy.status, copy.server_message, copy.retry_after, copy.operation) == (
        429,
        "slow down",
        7,
        "create",
    )
    assert issubclass(NotSupported, PermanentError)


# ---------------------------------------------------------------- Retry-After


def test_retry_after_in_seconds_or_http_date_or_garbage():
    now = time.time()
    assert parse_retry_after("120") == 120.0
    assert parse_retry_after(" 0 ") == 0.0
    assert parse_retry_after(formatdate(now + 30, usegmt=True), now=now) == pytest.approx(30, 1)
    assert parse_retry_after(formatdate(now - 30, usegmt=True), now=now) == 0.0
    for garbage in (None, "", "soon", "-5", "nan", "inf", "Mon, 99 Foo 2020"):
        assert parse_retry_after(garbage) is None


# ---------------------------------------------------------------- server messages


def test_server_message_is_scrubbed_and_truncated():
    jwt = "eyJhbGciOiJub25lIn0.eyJzdWIiOiJ4In0.c2lnbmF0dXJl"
    body = '{"userMessage": "token ' + jwt + ' rejected; Authorization: Bearer abcdefgh123"}'
    text = server_message(body, "application/json") or ""
    assert jwt not in text and "abcdefgh123" not in text
    assert "rejected" in text
    assert len(server_message("x " * 2000) or "") <= 500
    assert server_message("<html><body><h1>502 Bad Gateway</h1></body></html>") == (
        "502 Bad Gateway"
    )
    assert server_message('{"error":"invalid_token","error_description":"expired"}') == "expired"


# ---------------------------------------------------------------- over real HTTP

STATUSES = [400, 401, 403, 404, 408, 409, 422, 429, 500, 502, 503, 504]


@pytest.mark.parametrize("status", STATUSES)
def test_http_statuses_from_the_server_map_as_documented(simulator, fake_redis, status):
    client = build_client(settings_for(simulator), fake_redis)
    ref = client.create(DRAFT, "k0")
    # 401 twice: the first is answered by a new token, the second is the verdict.
    n = 2 if status == 401 else 1
    simulator.fail_next(n, status, operations=("get",), body='{"userMessage":"nope"}')
    with pytest.raises(ItsmError) as got:
        client.get(ref)
    assert one_leaf(got.value) is EXPECTED[status][0]
    assert got.value.status == status
    assert got.value.server_message == "nope"
    simulator.fail_next(n, status, operations=("create",))
    with pytest.raises(ItsmError) as created:
        client.create(DRAFT, "k1")
    assert one_leaf(created.value) is EXPECTED[status][1]
    client.close()


def test_one_401_is_answered_with_one_new_token(simulator, fake_redis):
    client = build_client(settings_for(simulator), fake_redis)
    ref = client.create(DRAFT, "k0")
    simulator.fail_next(1, 401, operations=("get",))
    assert client.get(ref).subject == "disk full"
    assert simulator.calls()["token_password"] == 2
    client.close()


def test_a_second_401_is_an_auth_error_after_exactly_one_new_token(simulator, fake_redis):
    client = build_client(settings_for(simulator), fake_redis)
    ref = client.create(DRAFT, "k0")
    simulator.fail_next(2, 401, operations=("update",))
    with pytest.raises(AuthError):
        client.resolve(ref)
    calls = simulator.calls()
    assert calls["token_password"] == 2
    assert calls["update"] == 2
    client.close()


def test_retry_after_from_the_server_is_carried(serviceops_sim, fake_redis):
    client = build_client(settings_for(serviceops_sim), fake_redis)
    serviceops_sim.fail_next(1, 429, retry_after="7", operations=("create",))
    with pytest.raises(TransientError) as seconds:
        client.create(DRAFT, "k1")
    assert seconds.value.retry_after == 7.0
    serviceops_sim.fail_next(
        1, 503, retry_after=formatdate(time.time() + 60, usegmt=True), operations=("create",)
    )
    with pytest.raises(TransientError) as dated:
        client.create(DRAFT, "k1")
    assert 55 <= (dated.value.retry_after or 0) <= 61
    serviceops_sim.fail_next(1, 503, retry_after="whenever", operations=("create",))
    with pytest.raises(TransientError) as garbage:
        client.create(DRAFT, "k1")
    assert garbage.value.retry_after is None
    client.close()


def test_gen_a_refusal_inside_a_200_wrapper_is_permanent(itsm_sim, fake_redis):
    client = build_client(settings_for(itsm_sim), fake_redis)
    itsm_sim.fail_next(
        1,
        200,
        operations=("create",),
        body='{"returnCode":"FAILURE","status":1,"userMessage":"location unknown","id":null}',
    )
    with pytest.raises(PermanentError) as got:
        client.create(DRAFT, "k1")
    assert got.value.server_message == "location unknown"
    client.close()


def test_connection_refused_is_transient_even_for_create(fake_redis):
    url = f"http://127.0.0.1:{closed_port()}"
    client = build_client(settings_for(url=url, itsm_api_key=SIM_API_KEY), fake_redis)
    with pytest.raises(TransientError):
        client.create(DRAFT, "k1")
    with pytest.raises(TransientError):
        client.get(IncidentRef(60))
    client.close()


def test_token_endpoint_unreachable_is_transient(fake_redis):
    client = build_client(settings_for(url=f"http://127.0.0.1:{closed_port()}"), fake_redis)
    with pytest.raises(TransientError) as got:
        client.get(IncidentRef(60))
    assert got.value.operation == "token"
    client.close()


def test_read_timeout_is_ambiguous_for_create_and_transient_for_reads(simulator, fake_redis):
    client = build_client(settings_for(simulator, itsm_read_timeout_s=0.3), fake_redis)
    ref = client.create(DRAFT, "k0")  # the token is in hand
    simulator.hang_next(1, 1.0, operations=("create",))
    with pytest.raises(AmbiguousError):
        client.create(DRAFT, "k1")
    simulator.hang_next(1, 1.0, operations=("get",))
    with pytest.raises(TransientError):
        client.get(ref)
    simulator.hang_next(1, 1.0, operations=("update",))
    with pytest.raises(TransientError):
        client.resolve(ref)
    # The create answered too late was applied all the same: that is why it is ambiguous.
    assert len(simulator.incidents()) == 2
    client.close()


def test_gateway_error_after_a_committed_create_is_ambiguous(simulator, fake_redis):
    client = build_client(settings_for(simulator), fake_redis)
    simulator.commit_then_fail(1, 502)
    with pytest.raises(AmbiguousError):
        client.create(DRAFT, "k1")
    assert len(simulator.incidents()) == 1
    client.close()
