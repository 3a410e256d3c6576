"""The OpenAPI document describes exactly the routes the ingest serves."""

from __future__ import annotations

from importlib import resources

import orjson
import pytest
import requests

from bridge.ingest import IngestApp, create_wsgi_app
from bridge.ingest_openapi import document
from tests.ingest import settings_for

HTTP_METHODS = {"get", "put", "post", "delete", "options", "head", "patch", "trace"}


def _documented() -> set[tuple[str, str]]:
    return {
        (method.upper(), path)
        for path, item in document()["paths"].items()
        for method in item
        if method in HTTP_METHODS
    }


def test_every_served_route_is_documented_and_nothing_else():
    assert set(IngestApp.routes) == _documented()


def test_the_document_is_valid_openapi_3_1():
    validator = pytest.importorskip("openapi_spec_validator")

    validator.validate(document())
    assert document()["openapi"].startswith("3.1")


def test_generic_body_schema_is_the_parsers_schema():
    raw = resources.files("bridge.sources").joinpath("schemas/generic.schema.json").read_bytes()
    schema = orjson.loads(raw)
    embedded = document()["components"]["schemas"]["GenericPayload"]

    for key, value in schema.items():
        if key != "$schema":
            assert embedded[key] == value


def test_alert_routes_reference_their_request_schemas():
    for path, item in document()["paths"].items():
        if "post" in item:
            ref = item["post"]["requestBody"]["content"]["application/json"]["schema"]["$ref"]
            name = ref.rsplit("/", 1)[1]
            assert name in document()["components"]["schemas"], path


def _no_route_wsgi_status(app, method: str, path: str) -> str:
    import io

    statuses: list[str] = []
    environ = {
        "REQUEST_METHOD": method,
        "PATH_INFO": path,
        "CONTENT_TYPE": "application/json",
        "wsgi.input": io.BytesIO(b"{}"),
    }
    app(environ, lambda status, headers: statuses.append(status))
    return statuses[0]


def test_documented_routes_answer_and_others_are_404():
    app = create_wsgi_app(settings_for("memory://"), lambda message: None, lambda: {"broker": "ok"})

    for method, path in _documented():
        status = _no_route_wsgi_status(app, method, path)
        assert not status.startswith(("404", "405")), (method, path, status)
    assert _no_route_wsgi_status(app, "GET", "/nope").startswith("404")
    assert _no_route_wsgi_status(app, "GET", "/api/v1/alerts").startswith("405")


def test_served_document_is_the_document(redis_url):
    from tests.ingest import redis_broker, running_ingest

    broker = redis_broker(redis_url)
    settings = settings_for(broker.url)
    with running_ingest(settings, broker.celery_app(settings)) as server:
        response = requests.get(server.url + "/openapi.json", timeout=5)

    assert response.status_code == 200
    assert response.headers["Content-Type"] == "application/json"
    assert response.json() == orjson.loads(orjson.dumps(document()))
