"""A fault scenario run with distinctive secrets; then every log line, metric, dead-letter
entry and CLI output is scanned for them: zero hits."""

from __future__ import annotations

import time

import pytest
import requests

from tests.chaos.conftest import FIGURES, am_alert, am_payload, record, storm
from tests.servers import free_port, redis_servers_running, wait_for

CLIENT_SECRET = "chaosCLIENTsecret-3f9d2a71"
PASSWORD = "chaosPASSWORD-8b1e4c06"
ROTATED = "chaosROTATEDpw-5d7a9e22"
INGEST_TOKEN = "chaosINGESTtok-1c2b3a4d"
REDIS_PASSWORD = "chaosREDISpass-77aa6e10"
SECRETS = (CLIENT_SECRET, PASSWORD, ROTATED, INGEST_TOKEN, REDIS_PASSWORD)


@pytest.fixture
def locked_redis(chaos_dir):
    with redis_servers_running(chaos_dir, "broker-auth", "state-auth", password=REDIS_PASSWORD) as (
        broker,
        state,
    ):
        yield broker, state


def _hits(text: str, secrets: tuple[str, ...]) -> list[str]:
    return [s for s in secrets if s and s in text]


@pytest.mark.timeout(180)
def test_no_secret_leaks_through_logs_dead_letters_or_cli_output(
    locked_redis, sim_factory, stack_factory
):
    broker, state = locked_redis
    sim = sim_factory("itsm", client_secret=CLIENT_SECRET, password=PASSWORD)
    metrics_port = free_port()
    stack = stack_factory(
        instances=1,  # one metrics port to scrape
        broker_url=broker.url(),
        redis_url=state.url(),
        sim=sim,
        client_secret=CLIENT_SECRET,
        password=PASSWORD,
        extra_env={
            "BRIDGE_INGEST_TOKENS": f"{INGEST_TOKEN}:alertmanager",
            "BRIDGE_LOG_LEVEL": "DEBUG",
            "BRIDGE_WORKER_METRICS_PORT": str(metrics_port),
        },
    )
    stack.start()
    payloads = storm(20, 2, 2, seed=41)
    # an error answer that echoes the credentials back, a 401 storm, a rotation, a kill
    sim.fail_next(
        2,
        400,
        operations=("create",),
        body=f'{{"userMessage":"rejected for {PASSWORD} / {CLIENT_SECRET}"}}',
    )
    for i, payload in enumerate(payloads):
        if i == 4:
            sim.revoke_tokens()
        if i == 8:
            stack.kill_child()
            sim.fail_next(3, 503, retry_after="1", operations=("create", "update"))
        if i == 12:
            sim.set_credentials(password=ROTATED)
            sim.revoke_tokens()
        stack.publish_until_accepted("alertmanager", payload)
        time.sleep(0.15)
    wait_for(lambda: sim.calls()["unauthorized"] >= 1, timeout=30, what="auth failures")
    time.sleep(2)
    stack.restart_with(BRIDGE_ITSM_PASSWORD=ROTATED)
    stack.publish_until_accepted("alertmanager", am_payload([am_alert("5ec0000f")]))
    acc = stack.settle(timeout=120)
    assert not acc.missing
    assert len(stack.dead_letters()) >= 2, "the echoing 400s were dead-lettered"

    # the tokens the bridge was granted are secrets too
    token = {
        k.decode(): v.decode() for k, v in stack.redis.hgetall(f"{stack.prefix}:itsm:token").items()
    }
    secrets = (*SECRETS, token.get("access_token", ""), token.get("refresh_token", ""))

    outputs: dict[str, str] = {"worker logs": stack.logs()}
    metrics = requests.get(f"http://127.0.0.1:{metrics_port}/metrics", timeout=10)
    outputs["worker /metrics"] = metrics.text
    raw_entries = []
    for key in stack.redis.scan_iter(f"{stack.prefix}:dlq:*"):
        if stack.redis.type(key) == b"hash":
            raw_entries.append(repr(stack.redis.hgetall(key)))
    outputs["dead-letter hashes"] = "\n".join(raw_entries)
    for args in (
        ("dlq", "list", "--json"),
        ("dlq", "list"),
        ("config", "show"),
        ("config", "show", "--json"),
        ("config", "check"),
    ):
        done = stack.cli(*args)
        outputs[" ".join(args)] = done.stdout + done.stderr
    for entry in stack.dead_letters():
        done = stack.cli("dlq", "show", entry.id)
        outputs[f"dlq show {entry.id}"] = done.stdout + done.stderr
    done = stack.cli("dlq", "replay", "--all")
    outputs["dlq replay --all"] = done.stdout + done.stderr
    outputs["worker logs after replay"] = stack.logs()

    assert "dead-lettered" in outputs["worker logs"], "the scan looked at real log lines"
    assert outputs["dlq list --json"].strip(), "the scan looked at real entries"
    assert "bridge_dead_letters_total" in outputs["worker /metrics"], "real metrics"
    assert "[REDACTED]" in outputs["dlq list --json"], "the echoed credentials were scrubbed"
    leaks = {where: _hits(text, secrets) for where, text in outputs.items()}
    leaks = {where: found for where, found in leaks.items() if found}
    FIGURES["secrets_leaked"] += sum(len(v) for v in leaks.values())
    FIGURES["secret_scan_lines"] = FIGURES.get("secret_scan_lines", 0) + sum(
        text.count("\n") + 1 for text in outputs.values()
    )
    assert not leaks, f"secrets found in: {sorted(leaks)}"
    record(acc, stack, itsm_outages=1)
