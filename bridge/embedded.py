"""``bridge run``: the whole bridge in one process.

Missing URLs are filled with embedded stand-ins: the built-in ITSM simulator,
in-process fakeredis state and Celery's in-memory broker. With URLs configured,
the same process uses the real services.
"""

from __future__ import annotations

import secrets
import sys
from typing import Any

import structlog

from bridge.settings import Settings

log = structlog.get_logger("bridge.run")


def with_embedded_itsm(settings: Settings) -> tuple[Settings, Any]:
    """Start the simulator when no ITSM URL is set; return the settings that point at it."""
    if settings.itsm_url:
        return settings, None
    from pydantic import SecretStr

    from bridge.itsm.simulator import Simulator

    secret, password = secrets.token_urlsafe(16), secrets.token_urlsafe(16)
    sim = Simulator(
        flavor=settings.itsm_flavor,
        client_id="bridge-embedded",
        client_secret=secret,
        username="bridge@example.com",
        password=password,
    )
    url = sim.start()
    updated = settings.model_copy(
        update={
            "itsm_url": url,
            "itsm_client_id": "bridge-embedded",
            "itsm_client_secret": SecretStr(secret),
            "itsm_username": "bridge@example.com",
            "itsm_password": SecretStr(password),
        }
    )
    return updated, sim


def run_bridge(settings: Settings, *, concurrency: int = 4) -> None:
    from bridge.logs import redactor
    from workers.app import INTAKE_QUEUE, UPDATES_QUEUE, URGENT_QUEUE, create_app

    settings, sim = with_embedded_itsm(settings)
    redactor.set_secrets(settings.secret_values())
    app = create_app(settings)
    ingest = None
    try:
        from bridge.ingest import start_ingest

        ingest = start_ingest(settings, app)
    except ImportError:
        pass
    log.info(
        "bridge running",
        itsm=settings.itsm_url + (" (built-in simulator)" if sim else ""),
        broker=settings.broker_url or "in-memory",
        redis=settings.redis_url or "in-process",
        ingest=f"http://{settings.http_host}:{settings.http_port}" if ingest else "off",
    )
    if ingest is not None:
        base = f"http://{settings.http_host}:{settings.http_port}"
        print(
            "\nThe bridge is running. Send it an alert:\n"
            f"  curl -H 'Content-Type: application/json' --data @alert.json "
            f"{base}/api/v1/alerts/alertmanager\n"
            + (
                f"Incidents (built-in ITSM simulator): {settings.itsm_url}/_sim/state\n"
                if sim
                else ""
            )
            + "Stop with Ctrl-C.\n",
            file=sys.stderr,
            flush=True,
        )
    try:
        app.worker_main(
            argv=[
                "worker",
                "--pool",
                "threads",
                "--concurrency",
                str(concurrency),
                "--without-gossip",
                "--without-mingle",
                "--without-heartbeat",
                "-Q",
                f"{URGENT_QUEUE},{INTAKE_QUEUE},{UPDATES_QUEUE}",
                "--loglevel",
                settings.log_level,
            ]
        )
    finally:
        if ingest is not None:
            ingest.stop()
        if sim is not None:
            sim.stop()
