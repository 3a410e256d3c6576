"""The ITSM client reads the environment once, and the environment never overrides the
settings: proxies and a CA bundle from the environment apply, an explicit TLS setting wins
over them, and a ``.netrc`` entry never replaces the token."""

from __future__ import annotations

import contextlib
import multiprocessing
import socket
import ssl
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import certifi
import pytest
import trustme

from bridge.itsm.client import build_client
from bridge.itsm.errors import ItsmError
from bridge.itsm.sessions import fresh_copy, new_session
from tests.itsm.test_client import DRAFT, settings_for

ENVIRONMENT = (
    "HTTP_PROXY",
    "HTTPS_PROXY",
    "ALL_PROXY",
    "NO_PROXY",
    "REQUESTS_CA_BUNDLE",
    "CURL_CA_BUNDLE",
    "NETRC",
)


@pytest.fixture(autouse=True)
def clean_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in ENVIRONMENT:
        monkeypatch.delenv(name, raising=False)
        monkeypatch.delenv(name.lower(), raising=False)


def _splice(client: socket.socket, upstream: socket.socket) -> None:
    """Copy bytes both ways until the client is done, then close both."""
    done = threading.Event()

    def pump(src: socket.socket, dst: socket.socket) -> None:
        with contextlib.suppress(OSError):
            while data := src.recv(65536):
                dst.sendall(data)
        done.set()

    threading.Thread(target=pump, args=(upstream, client), daemon=True).start()
    pump(client, upstream)
    with contextlib.suppress(OSError):
        upstream.shutdown(socket.SHUT_WR)  # the client is gone: let the server close
    done.wait(timeout=10)
    for sock in (client, upstream):
        with contextlib.suppress(OSError):
            sock.close()


class Listener:
    """A local TCP server handing every connection to ``handle`` in its own thread."""

    def __init__(self) -> None:
        self._listener = socket.create_server(("127.0.0.1", 0))
        self.port = int(self._listener.getsockname()[1])
        threading.Thread(target=self._accept, daemon=True).start()

    def close(self) -> None:
        self._listener.close()

    def _accept(self) -> None:
        while True:
            try:
                conn, _ = self._listener.accept()
            except OSError:
                return  # closed
            threading.Thread(target=self.handle, args=(conn,), daemon=True).start()

    def handle(self, conn: socket.socket) -> None:
        raise NotImplementedError


class TlsFront(Listener):
    """TLS in front of the simulator, as a load balancer with a private CA's certificate."""

    def __init__(self, upstream_port: int, context: ssl.SSLContext) -> None:
        self._upstream_port = upstream_port
        self._context = context
        super().__init__()
        self.url = f"https://localhost:{self.port}"

    def handle(self, conn: socket.socket) -> None:
        try:
            tls = self._context.wrap_socket(conn, server_side=True)
        except (ssl.SSLError, OSError):
            conn.close()  # the client did not trust the certificate
            return
        _splice(tls, socket.create_connection(("127.0.0.1", self._upstream_port)))


class ConnectProxy(Listener):
    """An HTTPS proxy: it opens a tunnel for every CONNECT and records its target."""

    def __init__(self) -> None:
        super().__init__()
        self.url = f"http://127.0.0.1:{self.port}"
        self.tunnels: list[str] = []

    def handle(self, conn: socket.socket) -> None:
        request = b""
        while b"\r\n\r\n" not in request:
            chunk = conn.recv(4096)
            if not chunk:
                conn.close()
                return
            request += chunk
        method, target, _ = request.split(b"\r\n", 1)[0].decode().split(" ", 2)
        if method != "CONNECT":
            conn.sendall(b"HTTP/1.1 405 Method Not Allowed\r\nContent-Length: 0\r\n\r\n")
            conn.close()
            return
        self.tunnels.append(target)
        host, port = target.rsplit(":", 1)
        upstream = socket.create_connection((host, int(port)))
        conn.sendall(b"HTTP/1.1 200 Connection established\r\n\r\n")
        _splice(conn, upstream)


@pytest.fixture
def private_ca(tmp_path: Path) -> tuple[trustme.CA, Path]:
    ca = trustme.CA()
    bundle = tmp_path / "private-ca.pem"
    ca.cert_pem.write_to_path(str(bundle))
    return ca, bundle


@pytest.fixture
def tls_front(itsm_sim: Any, private_ca: tuple[trustme.CA, Path]) -> Iterator[TlsFront]:
    ca, _ = private_ca
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    ca.issue_cert("localhost").configure_cert(context)
    front = TlsFront(itsm_sim.port, context)
    yield front
    front.close()


@pytest.fixture
def connect_proxy() -> Iterator[ConnectProxy]:
    proxy = ConnectProxy()
    yield proxy
    proxy.close()


def _client(sim: Any, redis_client: Any, **overrides: Any) -> Any:
    return build_client(settings_for(sim, **overrides), redis_client)


def _creates(sim: Any, redis_client: Any, **overrides: Any) -> bool:
    client = _client(sim, redis_client, **overrides)
    try:
        ref = client.create(DRAFT, "session-test")
        return client.get(ref).subject == DRAFT.subject
    finally:
        client.close()


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def test_a_netrc_entry_for_the_itsm_host_does_not_replace_the_token(
    itsm_sim, redis_client, tmp_path, monkeypatch
):
    netrc = tmp_path / "netrc"
    netrc.write_text("machine 127.0.0.1 login someone-else password not-our-credentials\n")
    netrc.chmod(0o600)
    monkeypatch.setenv("NETRC", str(netrc))
    assert _creates(itsm_sim, redis_client)


def test_a_configured_ca_bundle_wins_over_REQUESTS_CA_BUNDLE(
    itsm_sim, redis_client, tls_front, private_ca, monkeypatch
):
    monkeypatch.setenv("REQUESTS_CA_BUNDLE", certifi.where())  # public CAs only
    _, bundle = private_ca
    assert _creates(itsm_sim, redis_client, itsm_url=tls_front.url, itsm_ca_bundle=str(bundle))


@pytest.mark.filterwarnings("ignore::urllib3.exceptions.InsecureRequestWarning")
def test_verification_switched_off_stays_off_when_REQUESTS_CA_BUNDLE_is_set(
    itsm_sim, redis_client, tls_front, monkeypatch
):
    monkeypatch.setenv("REQUESTS_CA_BUNDLE", certifi.where())
    assert _creates(itsm_sim, redis_client, itsm_url=tls_front.url, itsm_verify_tls=False)


@pytest.mark.parametrize("variable", ["REQUESTS_CA_BUNDLE", "CURL_CA_BUNDLE"])
def test_a_ca_bundle_from_the_environment_applies_when_none_is_configured(
    itsm_sim, redis_client, tls_front, private_ca, monkeypatch, variable
):
    _, bundle = private_ca
    monkeypatch.setenv(variable, str(bundle))
    assert _creates(itsm_sim, redis_client, itsm_url=tls_front.url)


def test_a_certificate_from_an_unknown_ca_is_refused(itsm_sim, redis_client, tls_front):
    with pytest.raises(ItsmError, match=r"(?i)certificate"):
        _creates(itsm_sim, redis_client, itsm_url=tls_front.url)


@pytest.mark.parametrize("variable", ["HTTP_PROXY", "http_proxy", "ALL_PROXY"])
def test_the_proxy_named_in_the_environment_carries_the_calls(
    itsm_sim, redis_client, monkeypatch, variable
):
    # The simulator answers requests sent to it as a proxy: the ITSM's own name is
    # never resolved, so only a call through the proxy can reach it.
    monkeypatch.setenv(variable, itsm_sim.url)
    assert _creates(itsm_sim, redis_client, itsm_url="http://itsm.invalid")


def test_an_https_itsm_is_reached_through_the_https_proxy_named_in_the_environment(
    itsm_sim, redis_client, tls_front, private_ca, connect_proxy, monkeypatch
):
    monkeypatch.setenv("HTTPS_PROXY", connect_proxy.url)
    _, bundle = private_ca
    assert _creates(itsm_sim, redis_client, itsm_url=tls_front.url, itsm_ca_bundle=str(bundle))
    assert set(connect_proxy.tunnels) == {tls_front.url.removeprefix("https://")}


def test_no_proxy_sends_the_calls_to_the_itsm_directly(itsm_sim, redis_client, monkeypatch):
    monkeypatch.setenv("HTTP_PROXY", f"http://127.0.0.1:{_free_port()}")  # nothing listens
    monkeypatch.setenv("NO_PROXY", "127.0.0.1")
    assert _creates(itsm_sim, redis_client)


def _grant_in_child(client: Any, results: Any) -> None:
    try:
        auth = client._auth
        auth.invalidate(auth.authorization())  # the next call needs a new token
        results.put(client.get(client.create(DRAFT, "forked")).subject)
    except BaseException as exc:
        results.put(repr(exc))


def test_a_forked_process_asks_for_its_token_through_the_same_proxy(
    itsm_sim, redis_client, monkeypatch
):
    monkeypatch.setenv("HTTP_PROXY", itsm_sim.url)
    client = _client(itsm_sim, redis_client, itsm_url="http://itsm.invalid")
    client.create(DRAFT, "parent")
    results = multiprocessing.get_context("fork").Queue()
    child = multiprocessing.get_context("fork").Process(
        target=_grant_in_child, args=(client, results)
    )
    child.start()
    try:
        assert results.get(timeout=30) == DRAFT.subject
    finally:
        child.join(timeout=10)
        if child.is_alive():
            child.kill()
    assert itsm_sim.calls()["token_password"] == 2


def test_a_fresh_copy_keeps_every_setting_on_new_connections(monkeypatch):
    monkeypatch.setenv("HTTPS_PROXY", "http://proxy.example:3128")
    original = new_session("https://itsm.example", "/etc/itsm/private-ca.pem", pool_size=7)
    copy = fresh_copy(original)
    assert copy is not original
    assert copy.get_adapter("https://itsm.example") is not original.get_adapter(
        "https://itsm.example"
    )
    assert (copy.verify, copy.proxies.get("https"), copy.trust_env) == (
        "/etc/itsm/private-ca.pem",
        "http://proxy.example:3128",
        False,
    )
    assert copy.get_adapter("https://itsm.example")._pool_maxsize == 7
