"""The OpenAPI 3.1 document of the ingest, served at ``/openapi.json``.

Built here rather than stored as JSON so the generic format's schema is the very
file the parser validates against (``bridge/sources/schemas/generic.schema.json``),
embedded, not copied. A test checks that every route the app serves is described
here and nothing else is.
"""

from __future__ import annotations

import copy
import functools
from importlib import resources
from typing import Any

import orjson

_GENERIC_SCHEMA = ("bridge.sources", "schemas/generic.schema.json")

_LABELS = {
    "type": "object",
    "propertyNames": {"minLength": 1},
    "additionalProperties": {"type": "string"},
}
# Not blank: at least one character that is not white space.
_NOT_BLANK = {"type": "string", "pattern": "\\S"}

_ALERTMANAGER: dict[str, Any] = {
    "type": "object",
    "description": "Alertmanager webhook payload (version 4); every delivery is a full "
    "snapshot of the group.",
    "required": ["version", "alerts"],
    "properties": {
        "version": {"const": "4"},
        "groupKey": {"type": "string"},
        # Alertmanager's own type is uint64.
        "truncatedAlerts": {"type": "integer", "minimum": 0, "maximum": 2**64 - 1},
        "status": {"enum": ["firing", "resolved"]},
        "receiver": {"type": "string"},
        "groupLabels": _LABELS,
        "commonLabels": _LABELS,
        "commonAnnotations": _LABELS,
        "externalURL": {"type": "string"},
        "alerts": {
            "type": "array",
            "items": {
                "type": "object",
                "description": "An alert without labels needs a fingerprint (its identity).",
                "required": ["status", "labels"],
                "anyOf": [
                    {"properties": {"labels": {"minProperties": 1}}},
                    {"required": ["fingerprint"], "properties": {"fingerprint": {"minLength": 1}}},
                ],
                "properties": {
                    "status": {"enum": ["firing", "resolved"]},
                    "labels": _LABELS,
                    "annotations": _LABELS,
                    "startsAt": {"type": "string", "format": "date-time"},
                    "endsAt": {"type": "string", "format": "date-time"},
                    "generatorURL": {"type": "string"},
                    "fingerprint": {"type": "string"},
                },
            },
        },
    },
}

_GRAFANA = copy.deepcopy(_ALERTMANAGER)
_GRAFANA["description"] = (
    "Grafana webhook contact point payload: the Alertmanager shape plus Grafana's fields."
)
_GRAFANA["required"] = ["alerts"]
_GRAFANA["properties"] |= {
    "version": {"type": "string", "description": 'Not checked (Grafana sends "1").'},
    "orgId": {"type": "integer"},
    "title": {"type": "string"},
    "state": {"type": "string"},
    "message": {"type": "string"},
}
_GRAFANA["properties"]["alerts"]["items"]["properties"] |= {
    "values": {"type": ["object", "null"]},
    "valueString": {"type": "string"},
    "silenceURL": {"type": "string"},
    "dashboardURL": {"type": "string"},
    "panelURL": {"type": "string"},
}

_PAGERDUTY = {
    "type": "object",
    "description": "PagerDuty Events API v2 event. Without an Authorization header the "
    "routing_key must be one of the ingest tokens.",
    "required": ["routing_key", "event_action"],
    "allOf": [
        {
            "if": {
                "required": ["event_action"],
                "properties": {"event_action": {"const": "trigger"}},
            },
            "then": {"required": ["payload"]},
        },
        {
            "if": {
                "required": ["event_action"],
                "properties": {"event_action": {"enum": ["acknowledge", "resolve"]}},
            },
            "then": {"required": ["dedup_key"], "properties": {"dedup_key": {"minLength": 1}}},
        },
    ],
    "properties": {
        "routing_key": _NOT_BLANK,
        "event_action": {"enum": ["trigger", "acknowledge", "resolve"]},
        "dedup_key": {"type": "string", "maxLength": 255},
        "payload": {
            "type": "object",
            "required": ["summary", "source", "severity"],
            "properties": {
                "summary": {**_NOT_BLANK, "maxLength": 1024},
                "source": _NOT_BLANK,
                "severity": {"enum": ["critical", "error", "warning", "info"]},
                "timestamp": {"type": "string", "format": "date-time"},
                "component": {"type": "string"},
                "group": {"type": "string"},
                "class": {"type": "string"},
                "custom_details": {},
            },
        },
        "images": {
            "type": "array",
            "items": {
                "type": "object",
                "required": ["src"],
                "properties": {
                    "src": _NOT_BLANK,
                    "href": {"type": "string"},
                    "alt": {"type": "string"},
                },
            },
        },
        "links": {
            "type": "array",
            "items": {
                "type": "object",
                "required": ["href"],
                "properties": {"href": _NOT_BLANK, "text": {"type": "string"}},
            },
        },
        "client": {"type": "string"},
        "client_url": {"type": "string"},
    },
}

_ERROR = {
    "type": "object",
    "required": ["error"],
    "properties": {
        "error": {"type": "string", "description": "What is wrong; names the field if any."},
        "field": {"type": "string", "description": "Path of the offending field."},
    },
}
_ACCEPTED = {
    "type": "object",
    "required": ["status", "alerts", "id"],
    "properties": {
        "status": {"const": "accepted"},
        "alerts": {"type": "integer", "description": "Alerts in the request."},
        "id": {"type": "string", "description": "Id of the broker message."},
    },
}
_PD_SUCCESS = {
    "type": "object",
    "required": ["status", "message", "dedup_key"],
    "properties": {
        "status": {"const": "success"},
        "message": {"const": "Event processed"},
        "dedup_key": {"type": "string"},
    },
}
_PD_INVALID = {
    "type": "object",
    "required": ["status", "message", "errors"],
    "properties": {
        "status": {"const": "invalid event"},
        "message": {"const": "Event object is invalid"},
        "errors": {"type": "array", "items": {"type": "string"}},
    },
}
_PD_THROTTLED = {
    "type": "object",
    "required": ["status", "message"],
    "properties": {
        "status": {"const": "throttle event"},
        "message": {"type": "string"},
    },
}
_READY = {
    "type": "object",
    "required": ["status", "checks"],
    "properties": {
        "status": {"enum": ["ready", "unavailable"]},
        "reason": {"type": "string"},
        "checks": {"type": "object", "additionalProperties": {"type": "string"}},
        "warnings": {"type": "array", "items": {"type": "string"}},
    },
}

_RETRY_AFTER = {
    "Retry-After": {
        "description": "Seconds to wait before retrying.",
        "schema": {"type": "integer"},
    }
}


def _ref(name: str) -> dict[str, str]:
    return {"$ref": f"#/components/schemas/{name}"}


def _json_response(description: str, schema: str, *, retry_after: bool = False) -> dict[str, Any]:
    response: dict[str, Any] = {
        "description": description,
        "content": {"application/json": {"schema": _ref(schema)}},
    }
    if retry_after:
        response["headers"] = _RETRY_AFTER
    return response


def _alert_operation(source: str, summary: str, schema: str, *, pagerduty: bool = False) -> dict:
    invalid = "PagerDutyInvalid" if pagerduty else "Error"
    responses = {
        "202": _json_response(
            "The broker confirmed the message; the alerts will be processed.",
            "PagerDutySuccess" if pagerduty else "Accepted",
        ),
        "400": _json_response("Malformed JSON, a schema error or a limit exceeded.", invalid),
        "401": _json_response(
            "Missing or wrong token, or a token bound to another source.", "Error"
        ),
        "413": _json_response("The body is larger than [http] max_body_bytes.", "Error"),
        "415": _json_response("The Content-Type is not application/json.", "Error"),
        "503": _json_response(
            "The broker did not confirm the message; retry later.", "Error", retry_after=True
        ),
    }
    if pagerduty:
        responses["429"] = _json_response(
            "Throttled; retry later.", "PagerDutyThrottled", retry_after=True
        )
    elif source == "generic":
        responses["429"] = _json_response("Throttled; retry later.", "Error", retry_after=True)
    return {
        "operationId": f"post_{source}_alerts",
        "summary": summary,
        "tags": ["alerts"],
        "requestBody": {
            "required": True,
            "content": {"application/json": {"schema": _ref(schema)}},
        },
        "responses": responses,
    }


@functools.cache
def _generic_schema() -> dict[str, Any]:
    package, name = _GENERIC_SCHEMA
    schema = orjson.loads(resources.files(package).joinpath(name).read_bytes())
    # Embedded under components, the schema's own "#/..." references must resolve
    # against itself, which an "$id" of its own makes so (OpenAPI 3.1 = JSON Schema 2020-12).
    schema.setdefault("$id", "urn:alert-bridge:schemas:generic")
    schema.pop("$schema", None)
    return schema


def document() -> dict[str, Any]:
    """The OpenAPI 3.1 description of every route the ingest serves."""
    text_ok = {"description": "OK", "content": {"text/plain": {"schema": {"type": "string"}}}}
    return {
        "openapi": "3.1.0",
        "info": {
            "title": "ITSM alert bridge ingest",
            "version": "1",
            "description": "Webhooks in; one broker message per accepted request. 202 means "
            "the broker confirmed the message; 503 means retry later.",
        },
        "components": {
            "securitySchemes": {"bearer": {"type": "http", "scheme": "bearer"}},
            "schemas": {
                "AlertmanagerPayload": _ALERTMANAGER,
                "GrafanaPayload": _GRAFANA,
                "GenericPayload": _generic_schema(),
                "PagerDutyEvent": _PAGERDUTY,
                "Accepted": _ACCEPTED,
                "Error": _ERROR,
                "PagerDutySuccess": _PD_SUCCESS,
                "PagerDutyInvalid": _PD_INVALID,
                "PagerDutyThrottled": _PD_THROTTLED,
                "Readiness": _READY,
                "Health": {"type": "object", "properties": {"status": {"const": "ok"}}},
            },
        },
        "security": [{"bearer": []}],
        "paths": {
            "/api/v1/alerts/alertmanager": {
                "post": _alert_operation(
                    "alertmanager", "Alertmanager webhook receiver", "AlertmanagerPayload"
                )
            },
            "/api/v1/alerts/grafana": {
                "post": _alert_operation(
                    "grafana", "Grafana webhook contact point", "GrafanaPayload"
                )
            },
            "/api/v1/alerts": {
                "post": _alert_operation(
                    "generic", "Alerts in the generic format", "GenericPayload"
                )
            },
            "/v2/enqueue": {
                "post": _alert_operation(
                    "pagerduty",
                    "PagerDuty Events API v2 compatible enqueue",
                    "PagerDutyEvent",
                    pagerduty=True,
                )
            },
            "/healthz": {
                "get": {
                    "operationId": "healthz",
                    "summary": "The process is alive.",
                    "security": [],
                    "responses": {"200": _json_response("Alive.", "Health")},
                }
            },
            "/readyz": {
                "get": {
                    "operationId": "readyz",
                    "summary": "Broker and Redis reachable.",
                    "security": [],
                    "responses": {
                        "200": _json_response("Ready.", "Readiness"),
                        "503": _json_response(
                            "A dependency is unreachable; reason says which.",
                            "Readiness",
                            retry_after=True,
                        ),
                    },
                }
            },
            "/metrics": {
                "get": {
                    "operationId": "metrics",
                    "summary": "Prometheus metrics of the ingest.",
                    "security": [],
                    "responses": {"200": text_ok},
                }
            },
            "/openapi.json": {
                "get": {
                    "operationId": "openapi",
                    "summary": "This document.",
                    "security": [],
                    "responses": {
                        "200": {
                            "description": "OK",
                            "content": {"application/json": {"schema": {"type": "object"}}},
                        }
                    },
                }
            },
        },
    }
