"""Plain JSON published by any AMQP 0-9-1 client becomes an intake message.

Monitoring tools that publish to RabbitMQ do not speak Celery's message
protocol. They publish a JSON payload to the exchange ``bridge.alerts`` with the
routing key ``alerts.raw`` (content type ``application/json``) and name its
format in the header ``x-alert-format`` or the ``type`` property (``auto``
when absent). This consumer step, running in each worker's main process,
wraps each such message as an intake task and acks it only once the broker has
taken the task, so nothing is lost between the two.
"""

from __future__ import annotations

import time
from typing import Any

import structlog
from celery import bootsteps
from kombu import Consumer, Exchange, Queue

from bridge.pipeline import envelope

log = structlog.get_logger("workers.raw")

RAW_EXCHANGE = "bridge.alerts"
RAW_QUEUE = "bridge.alerts.raw"
RAW_ROUTING_KEY = "alerts.raw"
FORMAT_HEADER = "x-alert-format"


def raw_queue() -> Queue:
    exchange = Exchange(RAW_EXCHANGE, type="direct", durable=True)
    return Queue(RAW_QUEUE, exchange=exchange, routing_key=RAW_ROUTING_KEY, durable=True)


def format_of(message: Any) -> str:
    headers = message.headers or {}
    fmt = headers.get(FORMAT_HEADER) or message.properties.get("type") or "auto"
    return str(fmt).strip().lower()


def to_intake(body: bytes, fmt: str) -> dict[str, Any]:
    """The intake message for one raw body; undecodable bytes travel as text with a marker."""
    try:
        text = body.decode("utf-8")
    except UnicodeDecodeError:
        return envelope(fmt, {"__undecodable__": body[:65536].hex()}, received_at=time.time())
    return envelope(fmt, text, received_at=time.time())


class RawAlertConsumer(bootsteps.ConsumerStep):
    """Consumes ``bridge.alerts.raw`` and republishes each body as a ``bridge.intake`` task."""

    def get_consumers(self, channel: Any) -> list[Consumer]:
        return [
            Consumer(channel, queues=[raw_queue()], on_message=self.on_message, prefetch_count=16)
        ]

    def on_message(self, message: Any) -> None:
        from workers.app import publish

        body = message.body if isinstance(message.body, bytes) else str(message.body).encode()
        try:
            publish(self._app, to_intake(body, format_of(message)), timeout=5)
        except Exception as exc:  # the broker refused: leave the message for another try
            log.warning("raw message not forwarded; requeued", error=str(exc))
            message.requeue()
            return
        message.ack()

    def start(self, c: Any) -> None:
        self._app = c.app
        super().start(c)
