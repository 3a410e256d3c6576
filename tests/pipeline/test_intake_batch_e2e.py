"""A prefork worker decides a backlog of one-alert messages in batches
(workers/intake_batch.py), with one incident per key and nothing left unacknowledged."""

from __future__ import annotations

import redis as redis_lib
import requests

from tests.pipeline.stack import am_alert, am_payload
from tests.pipeline.test_metrics_e2e import _sample, metrics_stack
from tests.pipeline.test_pipeline_e2e import BROKER_REDIS_URL
from tests.servers import wait_for

MESSAGES = 300
KEYS = 30


def test_a_backlog_of_one_alert_messages_is_decided_in_batches_with_one_incident_per_key(
    redis_url, itsm_sim, unique, tmp_path
):
    broker = redis_lib.Redis.from_url(BROKER_REDIS_URL)
    broker.flushdb()
    stack, metrics_port = metrics_stack(
        redis_url, itsm_sim, f"batch{unique}", tmp_path, worker_args=("--prefetch-multiplier", "16")
    )
    try:
        # the backlog is there before the worker starts: its processes are busy at once
        for i in range(MESSAGES):
            stack.publish("alertmanager", am_payload([am_alert(f"{i % KEYS:04x}")]))
        stack.start_workers()
        wait_for(lambda: stack.processed_alerts() == MESSAGES, what="every alert decided")
        wait_for(lambda: len(itsm_sim.incidents()) == KEYS, what="one incident per key")
        wait_for(lambda: broker.hlen("unacked") == 0, what="every message acknowledged")

        def batches() -> tuple[float, float]:
            text = requests.get(f"http://127.0.0.1:{metrics_port}/metrics", timeout=5).text
            return (
                _sample(text, "bridge_intake_batch_messages_sum"),
                _sample(text, "bridge_intake_batch_messages_count"),
            )

        wait_for(lambda: batches()[0] == MESSAGES, what="every message counted in a batch")
        messages, calls = batches()
        assert calls < messages, "every message was decided on its own"
        assert itsm_sim.calls()["create"] == KEYS
        assert stack.dead_letters() == 0
        assert broker.llen("bridge.intake") == 0
    finally:
        stack.close()
        broker.flushdb()
        broker.close()
