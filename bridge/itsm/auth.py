"""Credentials for ITSM calls: one OAuth2 token shared by every process, or an API key.

The token lives in a Redis hash (``{prefix}:itsm:token``) so that all worker
processes use one token, and in memory so the hot path does not touch Redis.
Renewal is single-flight across processes (a Redis ``SET NX PX`` lock) and
threads (a ``threading.Lock``): an empty cache under 400 threads costs one grant.
A 401 drops the cached token only if it is still the one that failed, so many
concurrent 401s cost one new token, not one each.

Tokens are never logged, never put in exception text and never shown by repr.
"""

from __future__ import annotations

import base64
import hashlib
import os
import threading
import time
import uuid
from collections import Counter, deque
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Protocol

import requests
import structlog

from bridge.itsm.errors import (
    AuthError,
    BadClientCredentials,
    BadUserCredentials,
    ItsmError,
    TransientError,
    error_for_exception,
    error_for_status,
    parse_retry_after,
    server_message,
)
from bridge.itsm.sessions import fresh_copy

log = structlog.get_logger(__name__)

OnRequest = Callable[[str, "int | None", float], None]

# Share of a token's life kept as the renewal margin when the configured margin
# would eat more of it (short-lived tokens, tests).
_MAX_MARGIN_SHARE = 0.2
_POLL_S = 0.025
# A failed grant is remembered this long so threads queued behind it fail at once
# instead of each asking the token endpoint again with the same bad credentials.
_FAILURE_HOLD_S = 1.0

# Compare-and-delete: release the lock only if we still own it.
_RELEASE = """
if redis.call('GET', KEYS[1]) == ARGV[1] then
  return redis.call('DEL', KEYS[1])
end
return 0
"""
# Drop the shared token only if it is still the one a resource call found invalid;
# a newer token written meanwhile by another process must survive.
_INVALIDATE = """
if redis.call('HGET', KEYS[1], 'id') == ARGV[1] then
  return redis.call('DEL', KEYS[1])
end
return 0
"""


class Credentials(Protocol):
    """What the incident client needs from either kind of credential."""

    renewable: bool

    def authorization(self) -> str:
        """The ``Authorization`` header value for the next call."""
        ...

    def invalidate(self, authorization: str) -> bool:
        """Forget this credential if it is still current; True when something was dropped."""
        ...

    def close(self) -> None: ...


@dataclass(frozen=True, slots=True)
class _Token:
    id: str  # a digest of the access token: what invalidate() compares
    jti: str
    access_token: str = field(repr=False)
    refresh_token: str = field(repr=False)
    expires_at: float
    renew_at: float
    owner: str

    @property
    def header(self) -> str:
        return f"Bearer {self.access_token}"


class ApiKeyAuth:
    """``Authorization: Apikey <key>`` (ServiceOps only): nothing to fetch or renew."""

    renewable = False

    def __init__(self, api_key: str) -> None:
        self.__header = f"Apikey {api_key}"

    def authorization(self) -> str:
        return self.__header

    def invalidate(self, authorization: str) -> bool:
        return False

    def close(self) -> None:
        pass

    def __repr__(self) -> str:
        return "ApiKeyAuth(api_key=[REDACTED])"


class TokenProvider:
    """OAuth2 password grant (refresh grant first when renewing), cached in Redis and memory."""

    renewable = True

    def __init__(
        self,
        session: requests.Session,
        redis: Any,
        *,
        url: str,
        client_id: str,
        client_secret: str,
        username: str,
        password: str,
        margin_s: float,
        prefix: str,
        clock: Callable[[], float] = time.time,
        timeout: tuple[float, float] = (3.05, 30.0),
        on_request: OnRequest | None = None,
    ) -> None:
        self._session = session
        self._redis = redis
        self._token_url = url.rstrip("/") + "/api/oauth/token"
        self.__secret = client_secret
        self.__basic = "Basic " + base64.b64encode(f"{client_id}:{client_secret}".encode()).decode()
        self.__username = username
        self.__password = password
        self._margin_s = margin_s
        self._clock = clock
        self._timeout = timeout
        self._on_request = on_request
        self._key = f"{prefix}:itsm:token"
        self._lock_key = f"{prefix}:itsm:token:lock"
        # The lock outlives one token request; losers wait a little longer than that.
        self._lock_ms = int((timeout[0] + timeout[1]) * 1000) + 2000
        self._wait_s = self._lock_ms / 1000 + 1.0
        # A token cached for another server or user is not ours (config changed).
        self._owner = hashlib.sha256(f"{url}|{client_id}|{username}".encode()).hexdigest()[:16]
        self._release = redis.register_script(_RELEASE)
        self._invalidate = redis.register_script(_INVALIDATE)
        self._thread_lock = threading.Lock()
        self._pid = os.getpid()
        self._local: _Token | None = None
        # Ids of tokens the ITSM refused in this process. A thread that read the shared
        # token just before another thread dropped it could otherwise put the refused
        # token back in memory and hand it to a retry.
        self._rejected: deque[str] = deque(maxlen=8)
        self._failure: tuple[float, ItsmError] | None = None
        self.token_requests: Counter[str] = Counter()  # by grant: "password", "refresh"

    def __repr__(self) -> str:
        return f"TokenProvider(url={self._token_url!r}, key={self._key!r})"

    # ------------------------------------------------------------ public

    def authorization(self) -> str:
        """``Bearer <token>``, renewing ahead of expiry (single flight)."""
        return self._get().header

    def token(self) -> str:
        """The current access token, renewing ahead of expiry (single flight)."""
        return self._get().access_token

    def invalidate(self, authorization: str) -> bool:
        """Drop the cached token if it is still ``authorization`` (a token or its header).

        Only the token that failed is dropped: a newer one written meanwhile by another
        thread or process survives, so N concurrent 401s lead to one new token.
        """
        token_id = _token_id(authorization.removeprefix("Bearer ").strip())
        self._rejected.append(token_id)
        local = self._local
        if local is not None and local.id == token_id:
            self._local = None
        dropped = bool(self._invalidate(keys=[self._key], args=[token_id]))
        if dropped:
            log.info("itsm token invalidated after 401")
        return dropped

    def close(self) -> None:
        self._session.close()

    # ------------------------------------------------------------ renewal

    def _get(self) -> _Token:
        token = self._local
        if token is not None and self._clock() < token.renew_at and token.id not in self._rejected:
            return token  # the hot path: no lock, no Redis
        return self._current()

    def _current(self) -> _Token:
        if os.getpid() != self._pid:
            self._after_fork()
        local = self._usable(self._local)
        if not self._thread_lock.acquire(blocking=False):
            # Another thread is renewing. A token still inside its life is good enough
            # meanwhile; only an expired or missing one makes us wait for the result.
            if local is not None and self._clock() < local.expires_at:
                return local
            self._thread_lock.acquire()
        try:
            return self._current_locked()
        finally:
            self._thread_lock.release()

    def _after_fork(self) -> None:
        # Inherited through fork: the parent's sockets and a lock some parent thread
        # may have held at fork time must not be used here.
        self._pid = os.getpid()
        self._thread_lock = threading.Lock()
        self._session = fresh_copy(self._session)

    def _current_locked(self) -> _Token:
        now = self._clock()
        local = self._usable(self._local)
        if local is not None and now < local.renew_at:
            return local  # renewed by the thread we waited for
        shared = self._read()
        if shared is not None and now < shared.renew_at:
            self._local = shared
            return shared
        valid = next((t for t in (shared, local) if t is not None and now < t.expires_at), None)
        try:
            return self._renew(local)
        except ItsmError as exc:
            if valid is None:
                raise
            # Renewing ahead failed but the token has life left: use it, try again later.
            log.warning(
                "itsm token renewal failed; the current token is still valid", error=str(exc)
            )
            return valid

    def _renew(self, local: _Token | None) -> _Token:
        if self._failure is not None and self._clock() - self._failure[0] < _FAILURE_HOLD_S:
            rebuild, args = self._failure[1].__reduce__()
            raise rebuild(*args)
        deadline = self._clock() + self._wait_s
        while True:
            owner = uuid.uuid4().hex
            if self._redis.set(self._lock_key, owner, nx=True, px=self._lock_ms):
                try:
                    return self._renew_as_owner(local)
                finally:
                    self._release(keys=[self._lock_key], args=[owner])
            # Another process is renewing.
            shared = self._read()
            now = self._clock()
            if shared is not None and now < shared.renew_at:
                self._local = shared
                return shared
            usable = shared or local
            if usable is not None and now < usable.expires_at:
                return usable  # refresh-ahead in progress elsewhere: keep the valid one
            if now >= deadline:
                raise TransientError(
                    "timed out waiting for another process to obtain an ITSM token",
                    operation="token",
                )
            time.sleep(_POLL_S)

    def _renew_as_owner(self, local: _Token | None) -> _Token:
        shared = self._read()
        if shared is not None and self._clock() < shared.renew_at:
            self._local = shared  # written between our read and our lock
            return shared
        previous = shared or local
        try:
            token = self._request_token(previous)
        except ItsmError as exc:
            self._failure = (self._clock(), exc)
            raise
        self._failure = None
        self._write(token)
        self._local = token
        return token

    def _request_token(self, previous: _Token | None) -> _Token:
        if previous is not None and previous.refresh_token:
            try:
                return self._grant(
                    "refresh",
                    {"grant_type": "refresh_token", "refresh_token": previous.refresh_token},
                )
            except ItsmError as exc:
                # Refresh is undocumented: any failure falls back to the password grant.
                log.info("itsm refresh grant failed; using the password grant", error=str(exc))
        return self._grant(
            "password",
            {
                "username": self.__username,
                "password": self.__password,
                "grant_type": "password",
            },
        )

    def _grant(self, grant: str, form: dict[str, str]) -> _Token:
        self.token_requests[grant] += 1
        started = time.monotonic()
        status: int | None = None
        try:
            response = self._session.post(
                self._token_url,
                # (None, value) tuples make requests send multipart/form-data, as documented.
                files={name: (None, value) for name, value in form.items()},
                headers={"Authorization": self.__basic, "Accept": "application/json"},
                timeout=self._timeout,
                allow_redirects=False,
            )
            status = response.status_code
        except requests.RequestException as exc:
            log.warning("itsm token request failed", grant=grant, error=type(exc).__name__)
            # A token grant changes nothing we rely on: never ambiguous.
            raise error_for_exception(exc, operation="token", creates=False) from exc
        finally:
            if self._on_request is not None:
                self._on_request(f"token_{grant}", status, time.monotonic() - started)
        with response:
            if status != 200:
                error = self._grant_error(grant, response)
                log.warning("itsm token request refused", grant=grant, status=status)
                raise error
            try:
                body = response.json()
                access = str(body["access_token"])
                expires_in = float(body.get("expires_in") or 0)
            except (ValueError, KeyError, TypeError):
                raise TransientError(
                    "ITSM token answer is not a token (HTTP 200 without access_token)",
                    status=200,
                    operation="token",
                ) from None
        now = self._clock()
        if expires_in <= 0:
            expires_in = 60.0  # undocumented absence: assume short and renew soon
        margin = min(self._margin_s, _MAX_MARGIN_SHARE * expires_in)
        token = _Token(
            id=_token_id(access),
            jti=str(body.get("jti") or ""),
            access_token=access,
            refresh_token=str(body.get("refresh_token") or ""),
            expires_at=now + expires_in,
            renew_at=now + expires_in - margin,
            owner=self._owner,
        )
        log.info("itsm token obtained", grant=grant, expires_in_s=int(expires_in))
        return token

    def _grant_error(self, grant: str, response: requests.Response) -> ItsmError:
        status = response.status_code
        secrets = (self.__password, self.__secret)
        message = server_message(response.text, response.headers.get("Content-Type", ""), secrets)
        code = ""
        try:
            body = response.json()
            code = str(body.get("error") or "") if isinstance(body, dict) else ""
        except ValueError:
            pass
        if not code and status == 401 and grant == "password":
            # No error body (what a live server was seen to send for a wrong password).
            # RFC 6749 5.2: a client that authenticated with Basic and failed gets a Basic
            # challenge back; without one, the client was accepted and the user was not.
            challenge = response.headers.get("WWW-Authenticate", "").strip().lower()
            code = "invalid_client" if challenge.startswith("basic") else "invalid_grant"
        if code in ("invalid_client", "unauthorized_client"):
            return BadClientCredentials(
                f"ITSM token endpoint rejected the client id or client secret ({code})",
                status=status,
                server_message=message,
                operation="token",
            )
        if code in ("invalid_grant", "unauthorized", "access_denied"):
            if grant == "refresh":
                return AuthError(
                    f"ITSM token endpoint rejected the refresh token ({code})",
                    status=status,
                    server_message=message,
                    operation="token",
                )
            return BadUserCredentials(
                f"ITSM token endpoint rejected the username or password ({code})",
                status=status,
                server_message=message,
                operation="token",
            )
        if status in (400, 401, 403):
            return AuthError(
                f"ITSM token request refused: HTTP {status}" + (f" ({code})" if code else ""),
                status=status,
                server_message=message,
                operation="token",
            )
        # 5xx, 429, an unexpected 404: the grant itself is safe to repeat.
        return error_for_status(
            status,
            operation="token",
            server_message=message,
            retry_after=parse_retry_after(response.headers.get("Retry-After")),
        )

    # ------------------------------------------------------------ the shared copy

    def _read(self) -> _Token | None:
        raw = self._redis.hgetall(self._key)
        if not raw:
            return None
        fields = {_text(k): _text(v) for k, v in raw.items()}
        try:
            token = _Token(
                id=fields["id"],
                jti=fields.get("jti", ""),
                access_token=fields["access_token"],
                refresh_token=fields.get("refresh_token", ""),
                expires_at=float(fields["expires_at"]),
                renew_at=float(fields["renew_at"]),
                owner=fields.get("owner", ""),
            )
        except (KeyError, ValueError):
            return None
        if token.owner != self._owner or self._clock() >= token.expires_at:
            return None
        return self._usable(token)

    def _usable(self, token: _Token | None) -> _Token | None:
        if token is None or token.id in self._rejected:
            return None
        return token

    def _write(self, token: _Token) -> None:
        ttl_ms = max(1, int((token.expires_at - self._clock()) * 1000))
        with self._redis.pipeline(transaction=True) as pipe:
            pipe.delete(self._key)
            pipe.hset(
                self._key,
                mapping={
                    "id": token.id,
                    "jti": token.jti,
                    "access_token": token.access_token,
                    "refresh_token": token.refresh_token,
                    "expires_at": repr(token.expires_at),
                    "renew_at": repr(token.renew_at),
                    "owner": token.owner,
                },
            )
            pipe.pexpire(self._key, ttl_ms)
            pipe.execute()


def _token_id(access_token: str) -> str:
    return "sha256:" + hashlib.sha256(access_token.encode()).hexdigest()[:24]


def _text(value: Any) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)


def build_auth(
    settings: Any,
    redis: Any,
    session: requests.Session,
    *,
    on_request: OnRequest | None = None,
    clock: Callable[[], float] = time.time,
) -> TokenProvider | ApiKeyAuth:
    """The configured credentials: an API key on ServiceOps when one is set, else OAuth2."""
    api_key = settings.itsm_api_key.get_secret_value()
    if api_key and settings.itsm_flavor == "serviceops":
        return ApiKeyAuth(api_key)
    return TokenProvider(
        session,
        redis,
        url=settings.itsm_url,
        client_id=settings.itsm_client_id,
        client_secret=settings.itsm_client_secret.get_secret_value(),
        username=settings.itsm_username,
        password=settings.itsm_password.get_secret_value(),
        margin_s=settings.itsm_token_margin_s,
        prefix=settings.redis_prefix,
        clock=clock,
        timeout=(settings.itsm_connect_timeout_s, settings.itsm_read_timeout_s),
        on_request=on_request,
    )
