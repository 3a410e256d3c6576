"""The Celery app: broker, queues and the settings that make delivery at-least-once.

``celery -A workers.app worker`` and ``bridge worker`` both start it. The app is
built from ``bridge.settings`` at import time of this module only (Celery needs a
module-level app for ``-A``); everything else receives it as an argument.
"""

from __future__ import annotations

import os
import ssl
from typing import Any

from celery import Celery
from kombu import Queue
from kombu.serialization import register

from bridge.pipeline import URGENT, Action
from bridge.settings import Settings, load_settings
from workers import wire_json

INTAKE_QUEUE = "bridge.intake"
URGENT_QUEUE = "bridge.urgent"
UPDATES_QUEUE = "bridge.updates"
QUEUE_FOR_LANE = {URGENT: URGENT_QUEUE, "updates": UPDATES_QUEUE}


SERIALIZER = "bridge-json"


# The same JSON on the wire as kombu's ``json`` (content type application/json, so
# workers and producers of either kind read each other's messages), written and read
# with orjson: a 100-alert task body is read ~3x faster.
register(
    SERIALIZER,
    wire_json.dumps,
    wire_json.loads,
    content_type="application/json",
    content_encoding="utf-8",
)


def broker_url(settings: Settings) -> str:
    return settings.broker_url or "memory://"


def configure(app: Celery, settings: Settings) -> Celery:
    url = broker_url(settings)
    transport_options: dict[str, Any] = {}
    extra: dict[str, Any] = {}
    if url.startswith(("redis://", "rediss://", "unix://")):
        # An unacked message comes back after the visibility timeout; it must exceed the
        # longest task and the longest retry countdown, or work runs twice. The restore
        # sweep runs every 10 s instead of kombu's ~100 s, so a killed worker's message
        # returns promptly once the timeout has passed.
        transport_options = {
            "visibility_timeout": settings.broker_visibility_timeout_s,
            "unacked_restore_interval": 10,
            "unacked_restore_throttle": 1,
            # a worker killed during a sweep leaves kombu's sweep lock behind; by default
            # no one restores anything for 5 minutes after that
            "unacked_mutex_expire": 30,
        }
        if url.startswith(("redis://", "rediss://")):
            # kombu's fetch can drop a message when a worker dies mid-fetch; ours cannot
            extra["broker_transport"] = "workers.redis_transport:Transport"
        if url.startswith("rediss://"):
            # kombu's own default for rediss:// is not to verify the server's certificate
            extra["broker_use_ssl"] = {"ssl_cert_reqs": ssl.CERT_REQUIRED}
    elif url.startswith(("amqp://", "amqps://", "pyamqp://")):
        transport_options = {"confirm_publish": True}
    elif url.startswith("memory://"):
        transport_options = {"polling_interval": 0.001}
    app.conf.update(
        broker_url=url,
        broker_transport_options=transport_options,
        broker_connection_retry_on_startup=True,
        task_acks_late=True,
        task_reject_on_worker_lost=True,
        worker_prefetch_multiplier=1,
        task_serializer=SERIALIZER,
        accept_content=["json"],
        result_backend=None,
        task_ignore_result=True,
        task_store_errors_even_if_ignored=False,
        worker_cancel_long_running_tasks_on_connection_loss=True,
        worker_hijack_root_logger=False,
        worker_send_task_events=False,
        task_default_queue=INTAKE_QUEUE,
        task_queues=[
            Queue(INTAKE_QUEUE, routing_key=INTAKE_QUEUE),
            Queue(URGENT_QUEUE, routing_key=URGENT_QUEUE),
            Queue(UPDATES_QUEUE, routing_key=UPDATES_QUEUE),
        ],
        task_routes={
            "bridge.intake": {"queue": INTAKE_QUEUE},
            "bridge.settle": {"queue": URGENT_QUEUE},
        },
        worker_soft_shutdown_timeout=10.0,
        **extra,
    )
    app.conf.bridge_settings = settings
    return app


def create_app(settings: Settings | None = None) -> Celery:
    settings = settings or load_settings()
    app = Celery("bridge", set_as_current=False)
    configure(app, settings)
    url = broker_url(settings)
    from workers import tasks

    tasks.register(app)
    if url.startswith(("amqp://", "amqps://", "pyamqp://")):
        from workers.raw import RawAlertConsumer

        app.steps["consumer"].add(RawAlertConsumer)
    return app


class CelerySink:
    """Hands actions to the broker: creates and resolves on one queue, updates on another."""

    def __init__(self, app: Celery) -> None:
        self._app = app

    def submit(self, action: Action, countdown: float = 0.0) -> None:
        name = "bridge.settle" if action.decision == "settle" else "bridge.act"
        self._app.send_task(
            name,
            args=[action.to_dict()],
            # Celery otherwise writes a repr of the whole action (the alert's labels and
            # annotations) into the message headers: a third of the cost of a submit
            argsrepr=f"({action.decision}, key={action.key}, gen={action.gen})",
            kwargsrepr="{}",
            queue=QUEUE_FOR_LANE[action.lane],
            countdown=countdown or None,
        )


def intake_argsrepr(message: Any) -> str:
    """What an intake message's headers say of it: its format, not a repr of its payload,
    which would cost more than the publish and carry whatever the annotations hold."""
    fmt = message.get("format") if isinstance(message, dict) else None
    return f"({fmt or 'unknown'} message)"


def publish(app: Celery, message: dict[str, Any], *, timeout: float | None = None) -> None:
    """Put one intake message on the broker; raises when the broker does not take it."""
    app.send_task(
        "bridge.intake",
        args=[message],
        argsrepr=intake_argsrepr(message),
        kwargsrepr="{}",
        queue=INTAKE_QUEUE,
        retry=timeout is not None,
        retry_policy={"max_retries": 2, "interval_start": 0.1, "interval_step": 0.2}
        if timeout
        else None,
    )


app = create_app() if os.environ.get("BRIDGE_NO_APP") != "1" else Celery("bridge")
