"""A real bridge for end-to-end tests: prefork Celery workers in a subprocess, a real
broker (Redis or RabbitMQ), real Redis state and the ITSM simulator over HTTP."""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
from pathlib import Path
from typing import Any

import redis

from bridge.pipeline import envelope
from bridge.settings import load_settings
from tests.conftest import SIM_CLIENT_ID, SIM_CLIENT_SECRET, SIM_PASSWORD, SIM_USERNAME

ROOT = Path(__file__).resolve().parents[2]


class BridgeStack:
    def __init__(
        self,
        *,
        broker_url: str,
        redis_url: str,
        sim: Any,
        prefix: str,
        log_path: Path,
        extra_env: dict[str, str] | None = None,
        concurrency: int = 2,
        worker_args: tuple[str, ...] = (),
    ) -> None:
        self.sim = sim
        self.broker_url = broker_url
        self.redis_url = redis_url
        self.prefix = prefix
        self.log_path = log_path
        self.env = {
            **os.environ,
            "BRIDGE_BROKER_URL": broker_url,
            "BRIDGE_REDIS_URL": redis_url,
            "BRIDGE_REDIS_PREFIX": prefix,
            "BRIDGE_ITSM_URL": sim.url,
            "BRIDGE_ITSM_FLAVOR": sim.flavor,
            "BRIDGE_ITSM_CLIENT_ID": SIM_CLIENT_ID,
            "BRIDGE_ITSM_CLIENT_SECRET": SIM_CLIENT_SECRET,
            "BRIDGE_ITSM_USERNAME": SIM_USERNAME,
            "BRIDGE_ITSM_PASSWORD": SIM_PASSWORD,
            "BRIDGE_LOG_FORMAT": "json",
            "BRIDGE_RETRY_BASE_DELAY_S": "0.2",
            "BRIDGE_WORKER_METRICS_PORT": "0",
            **(extra_env or {}),
        }
        self.concurrency = concurrency
        self.worker_args = worker_args
        self.settings = load_settings(
            env={k: v for k, v in self.env.items() if k != "BRIDGE_CONFIG"}
        )
        from workers.app import create_app

        self.app = create_app(self.settings)
        self.redis = redis.Redis.from_url(redis_url)
        self.proc: subprocess.Popen[bytes] | None = None

    def start_workers(self) -> None:
        log = self.log_path.open("ab")
        self.proc = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "bridge.cli",
                "worker",
                "--pool",
                "prefork",
                "--concurrency",
                str(self.concurrency),
                "--loglevel",
                "INFO",
                *self.worker_args,
            ],
            cwd=ROOT,
            env=self.env,
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )

    def stop_workers(self) -> None:
        if self.proc is None:
            return
        try:
            os.killpg(self.proc.pid, signal.SIGTERM)
            self.proc.wait(timeout=20)
        except (ProcessLookupError, subprocess.TimeoutExpired):
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait(timeout=10)
        self.proc = None

    def publish(self, fmt: str, payload: Any) -> None:
        from workers.app import publish

        publish(self.app, envelope(fmt, payload), timeout=5)

    def stats(self) -> dict[str, int]:
        raw = self.redis.hgetall(f"{self.prefix}:stats")
        return {k.decode(): int(v) for k, v in raw.items()}

    def processed_alerts(self) -> int:
        return self.stats().get("alerts", 0)

    def dead_letters(self) -> int:
        return int(self.redis.zcard(f"{self.prefix}:dlq:index"))

    def logs(self) -> str:
        return self.log_path.read_text(errors="replace")

    def close(self) -> None:
        self.stop_workers()
        self.app.close()
        self.redis.close()


def am_alert(fingerprint: str, status: str = "firing", severity: str = "warning") -> dict[str, Any]:
    return {
        "status": status,
        "labels": {"alertname": f"Alert-{fingerprint}", "severity": severity, "job": "node"},
        "annotations": {"summary": f"problem {fingerprint}"},
        "startsAt": "2026-11-28T09:14:05.123Z",
        "endsAt": "0001-01-01T00:00:00Z",
        "generatorURL": "http://prometheus.example.com/graph",
        "fingerprint": fingerprint,
    }


def am_payload(alerts: list[dict[str, Any]], status: str = "firing") -> dict[str, Any]:
    return {
        "version": "4",
        "groupKey": '{}:{alertname="x"}',
        "truncatedAlerts": 0,
        "status": status,
        "receiver": "itsm-bridge",
        "groupLabels": {},
        "commonLabels": {},
        "commonAnnotations": {},
        "externalURL": "http://alertmanager.example.com",
        "alerts": alerts,
    }
