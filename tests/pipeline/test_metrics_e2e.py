"""/metrics of the ingest and of a 2-process prefork worker match what the ITSM recorded."""

from __future__ import annotations

import socket

import redis as redis_lib
import requests
from prometheus_client.parser import text_string_to_metric_families

from bridge.ingest import start_ingest
from tests.pipeline.stack import BridgeStack, am_alert, am_payload
from tests.pipeline.test_pipeline_e2e import BROKER_REDIS_URL
from tests.servers import wait_for

TOKEN = "metrics-e2e-token-0b7e"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _sample(text: str, name: str, **labels: str) -> float:
    total = 0.0
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if sample.name == name and all(sample.labels.get(k) == v for k, v in labels.items()):
                total += sample.value
    return total


def metrics_stack(redis_url: str, sim, prefix: str, tmp_path, **kwargs) -> tuple[BridgeStack, int]:
    """A stack whose prefork worker serves /metrics (summed over its processes), and the port."""
    port = _free_port()
    stack = BridgeStack(
        broker_url=BROKER_REDIS_URL,
        redis_url=redis_url,
        sim=sim,
        prefix=prefix,
        log_path=tmp_path / "workers.log",
        extra_env={
            "BRIDGE_INGEST_TOKENS": TOKEN,
            "BRIDGE_WORKER_METRICS_PORT": str(port),
            "PROMETHEUS_MULTIPROC_DIR": str(tmp_path / "prom"),
        },
        **kwargs,
    )
    return stack, port


def test_ingest_and_prefork_worker_metrics_match_the_itsm(redis_url, itsm_sim, unique, tmp_path):
    broker = redis_lib.Redis.from_url(BROKER_REDIS_URL)
    broker.flushdb()
    stack, metrics_port = metrics_stack(redis_url, itsm_sim, f"met{unique}", tmp_path)
    ingest = None
    try:
        stack.start_workers()
        settings = stack.settings.model_copy(update={"http_port": _free_port()})
        ingest = start_ingest(settings, stack.app)
        for i in range(4):
            payload = am_payload([am_alert(f"{k:04x}", severity="warning") for k in range(5)])
            payload["alerts"] = [
                {**a, "annotations": {"summary": f"round {i}"}} for a in payload["alerts"]
            ]
            answer = requests.post(
                f"{ingest.url}/api/v1/alerts/alertmanager",
                json=payload,
                headers={"Authorization": f"Bearer {TOKEN}"},
                timeout=5,
            )
            assert answer.status_code == 202
        wait_for(lambda: stack.processed_alerts() >= 20, what="20 alerts processed")
        wait_for(lambda: len(itsm_sim.incidents()) == 5, what="five incidents")

        def worker_metrics() -> str:
            return requests.get(f"http://127.0.0.1:{metrics_port}/metrics", timeout=5).text

        creates = itsm_sim.calls()["create"]
        wait_for(
            lambda: (
                _sample(worker_metrics(), "bridge_itsm_effects_total", effect="created") == creates
            ),
            what="the worker's created count to match the ITSM",
        )
        text = worker_metrics()
        assert _sample(text, "bridge_decisions_total") == 20
        assert (
            _sample(text, "bridge_itsm_requests_total", operation="create", status="200") == creates
        )
        ingest_text = requests.get(f"{ingest.url}/metrics", timeout=5).text
        assert _sample(ingest_text, "bridge_alerts_received_total", source="alertmanager") == 20
    finally:
        if ingest is not None:
            ingest.stop()
        stack.close()
        broker.flushdb()
        broker.close()
