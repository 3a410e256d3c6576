"""What the bridge's messages say about their arguments in Celery's headers.

Celery writes a repr of every task's arguments into the message headers (``argsrepr``),
which events, ``celery inspect`` and monitoring tools show. The bridge writes a short
description instead: the repr of a whole payload costs more than the publish, and it
would copy whatever the alert's annotations hold into places no redaction reaches.
"""

from __future__ import annotations

import os
import time

os.environ.setdefault("BRIDGE_NO_APP", "1")

import pytest
from celery.signals import before_task_publish

from bridge.bench import am_payload, storm_alert
from bridge.pipeline import Action, envelope
from bridge.settings import load_settings
from workers.app import CelerySink, create_app, publish

SECRET = "annotation-secret-7f3a"


@pytest.fixture
def published():
    seen: list[dict] = []

    def on_publish(headers: dict | None = None, **_: object) -> None:
        seen.append(dict(headers or {}))

    before_task_publish.connect(on_publish, weak=False)
    app = create_app(load_settings(env={}))  # the in-memory broker
    try:
        yield app, seen
    finally:
        before_task_publish.disconnect(on_publish)
        app.close()


def _alert_with_secret() -> dict:
    alert = storm_alert(1, "h")
    alert["annotations"]["runbook_token"] = SECRET
    return alert


def test_an_intake_message_names_its_format_not_its_payload(published):
    app, headers = published
    publish(app, envelope("alertmanager", am_payload([_alert_with_secret()])))
    assert headers[-1]["argsrepr"] == "(alertmanager message)"
    assert SECRET not in repr(headers[-1])


def test_an_action_names_its_decision_and_key_not_its_alert(published):
    app, headers = published
    action = Action(
        decision="create",
        key="k1",
        token="m:0",
        gen=1,
        alert={"annotations": {"runbook_token": SECRET}},
        first_seen=time.time(),
    )
    CelerySink(app).submit(action)
    assert headers[-1]["argsrepr"] == "(create, key=k1, gen=1)"
    assert SECRET not in repr(headers[-1])
