"""``bridge itsm check``: prove the ITSM settings work with one token and one read call.

Only documented requests are made: the token grant (unless an API key is used),
then for Gen A ``GET /api/v1/incident/{itsm.check_incident_id}`` (there is no
list call; the default id 0 is never issued, so a not-found answer *in the incident
API's wrapper* proves the API is there and accepted the token), for Gen B
``POST /api/v1/request/search/byqual`` with ``size=1``. Nothing is written. A failure
is one sentence naming the cause.
"""

from __future__ import annotations

import uuid
from dataclasses import dataclass
from typing import Any
from urllib.parse import urlsplit, urlunsplit

import requests

from bridge.itsm.auth import build_auth
from bridge.itsm.errors import (
    AuthError,
    BadClientCredentials,
    BadUserCredentials,
    ItsmError,
    server_message,
)
from bridge.itsm.sessions import new_session, tls_verify


@dataclass(frozen=True, slots=True)
class CheckResult:
    ok: bool
    message: str


def check_itsm(settings: Any, redis: Any = None) -> CheckResult:
    """Get a token (or use the API key) and make one read call; say what is wrong if not."""
    url = _display_url(settings.itsm_url)
    if not settings.itsm_url:
        return CheckResult(False, "itsm.url is not set, so there is no ITSM to check.")
    # Always a fresh grant: a token cached by running workers would hide a wrong password.
    prefix = f"{settings.redis_prefix}:check:{uuid.uuid4().hex[:12]}"
    if redis is None:
        import fakeredis

        redis = fakeredis.FakeRedis()
    session = new_session(settings.itsm_url, tls_verify(settings))
    auth = build_auth(settings.model_copy(update={"redis_prefix": prefix}), redis, session)
    try:
        try:
            authorization = auth.authorization()
        except ItsmError as exc:
            return CheckResult(False, _token_failure(settings, url, exc))
        try:
            response = _probe(settings, session, authorization)
        except requests.RequestException as exc:
            return CheckResult(False, _transport_failure(settings, url, exc))
        with response:
            return _judge(settings, url, response, api_key=not auth.renewable)
    finally:
        redis.delete(f"{prefix}:itsm:token", f"{prefix}:itsm:token:lock")
        session.close()


def _probe(settings: Any, session: requests.Session, authorization: str) -> requests.Response:
    timeout = (settings.itsm_connect_timeout_s, settings.itsm_read_timeout_s)
    headers = {"Authorization": authorization, "Accept": "application/json"}
    base = settings.itsm_url.rstrip("/")
    if settings.itsm_flavor == "serviceops":
        return session.post(
            base + "/api/v1/request/search/byqual",
            params={"offset": "0", "size": "1", "sort_by": "createdTime"},
            json={},
            headers=headers,
            timeout=timeout,
            allow_redirects=False,
        )
    return session.get(
        f"{base}/api/v1/incident/{settings.itsm_check_incident_id}",
        headers=headers,
        timeout=timeout,
        allow_redirects=False,
    )


def _judge(settings: Any, url: str, response: requests.Response, *, api_key: bool) -> CheckResult:
    status = response.status_code
    gen_b = settings.itsm_flavor == "serviceops"
    api = "ServiceOps request API (Gen B)" if gen_b else "ITSM incident API (Gen A)"
    how = "the API key" if api_key else "a token for " + settings.itsm_username
    try:
        body = response.json()
    except ValueError:
        body = None
    if gen_b:
        answered = 200 <= status < 300 and isinstance(body, dict) and "objectList" in body
    else:
        # 2xx, or any refusal in the documented wrapper: the incident API itself spoke.
        answered = (200 <= status < 300) or (
            isinstance(body, dict) and "returnCode" in body and status != 401
        )
    if answered:
        return CheckResult(True, f"OK: the {api} at {url} answered a read call using {how}.")
    detail = server_message(response.text, response.headers.get("Content-Type", ""))
    if status == 401:
        if api_key:
            return CheckResult(False, f"The ITSM at {url} rejected the API key (HTTP 401).")
        return CheckResult(
            False,
            f"The ITSM at {url} issued a token but the {api} refused it (HTTP 401); "
            "check the REST client's access level and the user's rights.",
        )
    if status == 404 and not gen_b and not settings.itsm_check_incident_id:
        return CheckResult(
            False,
            f"The ITSM at {url} answered a bare HTTP 404 for incident 0: wrong flavour? try "
            'itsm.flavor = "serviceops". Or the server says not-found without its wrapper: '
            "set itsm.check_incident_id to an existing incident's id to tell the two apart.",
        )
    if status in (404, 405):
        other = "itsm" if gen_b else "serviceops"
        return CheckResult(
            False,
            f"The ITSM at {url} has no {api} (HTTP {status} on its path): "
            f'wrong flavour? try itsm.flavor = "{other}".',
        )
    if status == 403:
        return CheckResult(
            False, f"The user may not read incidents at {url} (HTTP 403): {detail or 'forbidden'}."
        )
    if 300 <= status < 400:
        return CheckResult(
            False, f"The ITSM at {url} redirected the call (HTTP {status}): check itsm.url."
        )
    if status >= 500:
        return CheckResult(
            False, f"The ITSM at {url} failed the read call with HTTP {status}: a server problem."
        )
    return CheckResult(
        False,
        f"The {api} at {url} answered HTTP {status} to a read call"
        + (f": {detail}." if detail else "."),
    )


def _token_failure(settings: Any, url: str, exc: ItsmError) -> str:
    if isinstance(exc, BadClientCredentials):
        return (
            f"The ITSM at {url} rejected the client id or client secret: "
            "check itsm.client_id and itsm.client_secret."
        )
    if isinstance(exc, BadUserCredentials):
        return (
            f"The ITSM at {url} rejected the username or password of "
            f"{settings.itsm_username or '(no username set)'}: "
            "check itsm.username and itsm.password."
        )
    if isinstance(exc, AuthError):
        return (
            f"The ITSM at {url} refused the token request (HTTP {exc.status}): "
            "check itsm.client_id, itsm.client_secret, itsm.username and itsm.password."
        )
    cause = exc.__cause__
    if isinstance(cause, requests.RequestException):
        return _transport_failure(settings, url, cause)
    if exc.status == 404:
        return (
            f"{url} has no token endpoint at /api/oauth/token (HTTP 404): "
            "is itsm.url the ITSM's base URL?"
        )
    if exc.status is not None and exc.status >= 500:
        return f"The ITSM token endpoint at {url} failed with HTTP {exc.status}: a server problem."
    return f"Getting a token from {url} failed: {exc}."


def _transport_failure(settings: Any, url: str, exc: requests.RequestException) -> str:
    if isinstance(exc, requests.exceptions.SSLError):
        return (
            f"TLS failure talking to {url}: the certificate is not trusted or the handshake "
            "failed (set itsm.ca_bundle to the CA file, or check the host name)."
        )
    if isinstance(exc, requests.ConnectTimeout):
        return (
            f"Timed out connecting to {url} after {settings.itsm_connect_timeout_s:g} s: "
            "check the host, the port and any firewall."
        )
    if isinstance(exc, requests.Timeout):
        return (
            f"The ITSM at {url} accepted the connection but did not answer within "
            f"{settings.itsm_read_timeout_s:g} s."
        )
    if isinstance(exc, requests.ConnectionError):
        text = str(exc)
        if any(
            marker in text
            for marker in (
                "NameResolutionError",
                "Name or service not known",
                "nodename nor servname",
                "getaddrinfo failed",
                "Failed to resolve",
                "Temporary failure in name resolution",
            )
        ):
            return f"Cannot resolve the host name of {url}: check itsm.url."
        return (
            f"Cannot connect to {url}: connection refused or host unreachable "
            "(is the ITSM running, and is the port right?)."
        )
    return f"The call to {url} failed: {type(exc).__name__}."


def _display_url(url: str) -> str:
    """The URL without any user:password part."""
    parts = urlsplit(url)
    host = parts.hostname or ""
    if parts.port:
        host += f":{parts.port}"
    return urlunsplit((parts.scheme, host, parts.path, "", ""))
