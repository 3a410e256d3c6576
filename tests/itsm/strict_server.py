"""An ITSM that knows only what the published documentation says (../docs/itsm-api-notes.md).

Deliberately separate from ``bridge.itsm.simulator``: it shares no code with the
bridge, implements each documented request literally and answers everything else
with a bare 404, so a request the documentation does not describe cannot pass
unnoticed. Where the documentation is silent it answers as plainly as it can: an
unknown incident is a bare 404, a wrong password a bare 401 (as seen on a live
server), a wrong client a 401 with the Basic challenge RFC 6749 section 5.2 requires.
Every request is recorded with whether it was a documented one.
"""

from __future__ import annotations

import base64
import json
import re
import threading
import uuid
from dataclasses import dataclass, field
from email.parser import BytesParser
from email.policy import HTTP
from typing import Any

from waitress.server import create_server

GEN_A = "itsm"
GEN_B = "serviceops"

# (method, path pattern) of every documented request, by generation
DOCUMENTED = {
    GEN_A: [
        ("POST", r"/api/oauth/token"),
        ("POST", r"/api/v1/incident"),
        ("GET", r"/api/v1/incident/\d+"),
        ("POST", r"/api/v1/incident/\d+"),
        ("POST", r"/api/oprfile"),
    ],
    GEN_B: [
        ("POST", r"/api/oauth/token"),
        ("POST", r"/api/v1/request"),
        ("GET", r"/api/v1/request/\d+"),
        ("PATCH", r"/api/v1/request/\d+"),
        ("POST", r"/api/v1/request/search/byqual"),
        ("POST", r"/api/v1/request/\d+/conversation"),
        ("DELETE", r"/api/v1/request/\d+"),
    ],
}


@dataclass
class Seen:
    method: str
    path: str
    documented: bool
    content_type: str


@dataclass
class StrictItsm:
    flavor: str
    client_id: str = "strict-client"
    client_secret: str = "strict-secret"
    username: str = "alerts@example.com"
    password: str = "strict-password"
    api_key: str = "strict%2Fkey%3D"
    seen: list[Seen] = field(default_factory=list)
    incidents: dict[int, dict[str, Any]] = field(default_factory=dict)
    _tokens: set[str] = field(default_factory=set)
    _lock: threading.Lock = field(default_factory=threading.Lock)

    # ------------------------------------------------------------------ serving

    def start(self) -> str:
        self._server = create_server(self, host="127.0.0.1", port=0, threads=4)
        self._thread = threading.Thread(target=self._server.run, daemon=True)
        self._thread.start()
        return f"http://127.0.0.1:{self._server.effective_port}"

    def stop(self) -> None:
        self._server.close()

    def undocumented(self) -> list[Seen]:
        return [s for s in self.seen if not s.documented]

    def __call__(self, environ: dict[str, Any], start_response: Any) -> list[bytes]:
        method, path = environ["REQUEST_METHOD"], environ.get("PATH_INFO", "")
        ctype = environ.get("CONTENT_TYPE", "")
        documented = any(method == m and re.fullmatch(p, path) for m, p in DOCUMENTED[self.flavor])
        with self._lock:
            self.seen.append(Seen(method, path, documented, ctype))
        if not documented:
            return _answer(start_response, 404, b"")
        if path == "/api/oauth/token":
            return self._token(environ, start_response)
        if not self._authorized(environ.get("HTTP_AUTHORIZATION", "")):
            body = {"error": "invalid_token", "error_description": "Invalid access token"}
            return _answer(start_response, 401, body)
        if method == "GET":
            number = int(path.rsplit("/", 1)[1])
            with self._lock:
                incident = self.incidents.get(number)
            return _answer(start_response, 200 if incident else 404, incident or b"")
        if path.endswith("/search/byqual"):
            with self._lock:
                found = list(self.incidents.values())
            return _answer(start_response, 200, {"objectList": found, "totalCount": len(found)})
        return _answer(start_response, 404, b"")  # writes are not what this server is for

    def add_incident(self, subject: str) -> int:
        with self._lock:
            number = len(self.incidents) + 1
            status = "status" if self.flavor == GEN_A else "statusName"
            self.incidents[number] = {"subject": subject, status: "Open"}
            if self.flavor == GEN_B:
                self.incidents[number].update(id=number, name=f"INC-{number}")
            return number

    # ------------------------------------------------------------------ auth

    def _token(self, environ: dict[str, Any], start_response: Any) -> list[bytes]:
        expected = base64.b64encode(f"{self.client_id}:{self.client_secret}".encode()).decode()
        if environ.get("HTTP_AUTHORIZATION", "") != f"Basic {expected}":
            return _answer(start_response, 401, b"", [("WWW-Authenticate", 'Basic realm="oauth"')])
        if not environ.get("CONTENT_TYPE", "").startswith("multipart/form-data"):
            return _answer(start_response, 400, b"")  # only multipart is documented
        fields = _multipart(environ)
        if fields.get("grant_type") != "password" or set(fields) != {
            "username",
            "password",
            "grant_type",
        }:
            return _answer(start_response, 400, b"")
        if (fields["username"], fields["password"]) != (self.username, self.password):
            return _answer(start_response, 401, b"")  # as seen on a live server: no body
        token = uuid.uuid4().hex
        with self._lock:
            self._tokens.add(token)
        body = {
            "access_token": token,
            "token_type": "bearer",
            "refresh_token": uuid.uuid4().hex,
            "expires_in": 7199,
            "scope": "main-web-app-scope",
            "jti": str(uuid.uuid4()),
        }
        return _answer(start_response, 200, body)

    def _authorized(self, header: str) -> bool:
        scheme, _, credential = header.partition(" ")
        if scheme == "Bearer":
            with self._lock:
                return credential in self._tokens
        return self.flavor == GEN_B and scheme == "Apikey" and credential == self.api_key


def _multipart(environ: dict[str, Any]) -> dict[str, str]:
    body = environ["wsgi.input"].read(int(environ.get("CONTENT_LENGTH") or 0))
    head = f"Content-Type: {environ['CONTENT_TYPE']}\r\n\r\n".encode()
    message = BytesParser(policy=HTTP).parsebytes(head + body)
    fields = {}
    for part in message.iter_parts():
        name = part.get_param("name", header="content-disposition")
        fields[str(name)] = part.get_payload(decode=True).decode()
    return fields


def _answer(
    start_response: Any, status: int, body: Any, headers: list[tuple[str, str]] | None = None
) -> list[bytes]:
    payload = body if isinstance(body, bytes) else json.dumps(body).encode()
    reason = {200: "OK", 400: "Bad Request", 401: "Unauthorized", 404: "Not Found"}[status]
    head = [("Content-Length", str(len(payload)))] + (headers or [])
    if payload:
        head.append(("Content-Type", "application/json"))
    start_response(f"{status} {reason}", head)
    return [payload]
