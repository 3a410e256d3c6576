"""The ops command line: help, config check/show, dead-letter listing and replay."""

from __future__ import annotations

import logging
import os
import subprocess
import sys
import time
from pathlib import Path

import click
import orjson
import pytest
import structlog
from click.testing import CliRunner

from bridge.cli import main
from bridge.dlq import DeadLetterStore, Reason
from tests.pipeline.stack import am_alert, am_payload

ROOT = Path(__file__).resolve().parents[2]
# Commands whose help is another program's (Celery's, the benchmark's).
_DELEGATED = {("bench",)}


@pytest.fixture(autouse=True)
def restore_logging():
    """Commands configure logging on the runner's streams: put the test process's back."""
    root = logging.getLogger()
    saved = (root.handlers[:], root.level)
    yield
    root.handlers[:], level = saved
    root.setLevel(level)
    structlog.reset_defaults()


def _clean_env(**extra: str) -> dict[str, str | None]:
    """Unset every BRIDGE_* variable of the surrounding shell, then set ``extra``."""
    env: dict[str, str | None] = {k: None for k in os.environ if k.startswith("BRIDGE_")}
    env.update(extra)
    return env


def invoke(*args: str, **env: str):
    return CliRunner().invoke(main, list(args), env=_clean_env(**env), catch_exceptions=False)


def _commands(group: click.Group, path: tuple[str, ...] = ()):
    for name, command in group.commands.items():
        yield (*path, name), command
        if isinstance(command, click.Group):
            yield from _commands(command, (*path, name))


ALL_COMMANDS = [path for path, _ in _commands(main)]


@pytest.mark.parametrize("path", [(), *ALL_COMMANDS], ids=lambda p: " ".join(p) or "bridge")
def test_every_command_help_says_what_it_does_with_an_example(path):
    if path in _DELEGATED:  # --help is the delegated program's; the listing shows ours
        command = dict(_commands(main))[path]
        assert "Example:" in (command.help or "")
        return
    result = invoke(*path, "--help")
    assert result.exit_code == 0, result.output
    assert "Example:" in result.output
    example = result.output.split("Example:", 1)[1]
    assert "bridge" in example, "the example shows a command line"
    summary = result.output.split("\n\n")[1].strip()
    assert len(summary) > 15, "the first help line says what the command does"


def test_status_and_config_commands_exist():
    for path in [("status",), ("config", "check"), ("config", "show"), ("dlq", "list")]:
        assert path in ALL_COMMANDS


# ------------------------------------------------------------------ config check


def _toml(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "bridge.toml"
    path.write_text(text)
    return path


def test_config_check_accepts_the_defaults():
    result = invoke("config", "check")
    assert result.exit_code == 0, result.output
    assert "configuration is valid" in result.output


def test_config_check_names_a_typoed_key_in_the_file_given_by_option(tmp_path):
    path = _toml(tmp_path, '[itsm]\nurl = "https://sd.example.com"\nflavour = "serviceops"\n')
    result = invoke("--config", str(path), "config", "check")
    assert result.exit_code != 0
    assert "[itsm] flavour" in result.output
    assert str(path) in result.output


def test_config_check_names_a_typoed_key_in_the_file_named_by_bridge_config(tmp_path):
    path = _toml(tmp_path, "[dedup]\nreopen_windows_s = 60\n")
    result = invoke("config", "check", BRIDGE_CONFIG=str(path))
    assert result.exit_code != 0
    assert "[dedup] reopen_windows_s" in result.output


def test_config_check_names_a_bad_url_and_its_variable():
    result = invoke("config", "check", BRIDGE_ITSM_URL="servicedesk.example.com")
    assert result.exit_code != 0
    assert "[itsm] url (BRIDGE_ITSM_URL)" in result.output
    assert "not a URL" in result.output


def test_config_check_names_a_url_with_the_wrong_scheme(tmp_path):
    path = _toml(tmp_path, '[itsm]\nurl = "ftp://sd.example.com"\n')
    result = invoke("--config", str(path), "config", "check")
    assert result.exit_code != 0
    assert "[itsm] url" in result.output
    assert "http://" in result.output


def test_config_check_names_an_invalid_mapping_template(tmp_path):
    path = _toml(tmp_path, '[mapping]\nsubject_template = "{{ summary "\n')
    result = invoke("--config", str(path), "config", "check")
    assert result.exit_code != 0
    assert "subject_template" in result.output


def test_config_check_names_an_invalid_custom_field_template(tmp_path):
    path = _toml(tmp_path, '[mapping.custom_fields]\nTeam = "{% if %}"\n')
    result = invoke("--config", str(path), "config", "check")
    assert result.exit_code != 0
    assert "mapping.custom_fields.Team" in result.output


def test_config_check_names_an_unknown_severity_in_a_mapping_table(tmp_path):
    path = _toml(tmp_path, '[mapping]\nseverity_priority = { critcal = "URGENT" }\n')
    result = invoke("--config", str(path), "config", "check")
    assert result.exit_code != 0
    assert "severity_priority.critcal" in result.output


def test_config_check_names_an_unknown_environment_variable():
    result = invoke("config", "check", BRIDGE_ITSM_PASSWROD="x")
    assert result.exit_code != 0
    assert "BRIDGE_ITSM_PASSWROD" in result.output


def test_config_check_names_a_value_out_of_bounds():
    result = invoke("config", "check", BRIDGE_ITSM_POOL_SIZE="0")
    assert result.exit_code != 0
    assert "[itsm] pool_size (BRIDGE_ITSM_POOL_SIZE)" in result.output


def test_config_check_names_an_ingest_token_bound_to_an_unknown_source():
    result = invoke("config", "check", BRIDGE_INGEST_TOKENS="tok-123456:grafanna")
    assert result.exit_code != 0
    assert "BRIDGE_INGEST_TOKENS" in result.output
    assert "grafanna" in result.output
    assert "tok-123456" not in result.output


def test_config_check_refuses_a_lock_lease_shorter_than_an_itsm_call():
    result = invoke("config", "check", BRIDGE_ITSM_READ_TIMEOUT_S="120")
    assert result.exit_code != 0
    assert "[dedup] lock_lease_s" in result.output


def test_config_check_as_a_real_process_exits_non_zero(tmp_path):
    path = _toml(tmp_path, "[retry]\nmax_atempts = 3\n")
    env = {k: v for k, v in os.environ.items() if not k.startswith("BRIDGE_")}
    env["BRIDGE_CONFIG"] = str(path)
    done = subprocess.run(
        [sys.executable, "-m", "bridge", "config", "check"],
        capture_output=True,
        text=True,
        env=env,
        cwd=ROOT,
        timeout=60,
    )
    assert done.returncode != 0
    assert "[retry] max_atempts" in done.stderr


# ------------------------------------------------------------------ config show

SECRETS = {
    "BRIDGE_ITSM_CLIENT_SECRET": "cl1ent-S3CRET-show",
    "BRIDGE_ITSM_PASSWORD": "p4ss-S3CRET-show",
    "BRIDGE_ITSM_API_KEY": "ap1key-S3CRET-show",
    "BRIDGE_INGEST_TOKENS": "ingest-S3CRET-show,other-S3CRET-show:grafana",
}


@pytest.mark.parametrize("as_json", [False, True], ids=["toml", "json"])
def test_config_show_prints_no_secret(tmp_path, as_json):
    secret_file = tmp_path / "password"
    secret_file.write_text("f1le-S3CRET-show\n")
    env = {
        **SECRETS,
        "BRIDGE_ITSM_PASSWORD_FILE": str(secret_file),
        "BRIDGE_BROKER_URL": "amqp://bridge:brok3r-S3CRET@rabbitmq:5672/prod",
        "BRIDGE_REDIS_URL": "redis://:red1s-S3CRET@redis:6379/0",
    }
    del env["BRIDGE_ITSM_PASSWORD"]
    result = invoke("config", "show", *(["--json"] if as_json else []), **env)
    assert result.exit_code == 0, result.output
    for secret in [
        *SECRETS.values(),
        "f1le-S3CRET-show",
        "brok3r-S3CRET",
        "red1s-S3CRET",
        "ingest-S3CRET-show",
        "other-S3CRET-show",
    ]:
        assert secret not in result.output
    assert "S3CRET" not in result.output
    assert "********" in result.output
    assert "rabbitmq:5672/prod" in result.output


def test_config_show_prints_effective_values_by_section(tmp_path):
    path = _toml(tmp_path, "[dedup]\nreopen_window_s = 77\n")
    result = invoke("--config", str(path), "config", "show", BRIDGE_ITSM_FLAVOR="serviceops")
    assert result.exit_code == 0, result.output
    text = result.output
    assert "[dedup]" in text and "reopen_window_s = 77" in text
    assert "[itsm]" in text and 'flavor = "serviceops"' in text
    assert "[mapping]" in text
    assert 'client_secret = ""' in text  # an unset secret shows as empty, not as a mask


def test_config_show_json_is_one_object_with_every_setting():
    result = invoke("config", "show", "--json", BRIDGE_ITSM_CLIENT_SECRET="x-S3CRET-y")
    data = orjson.loads(result.output)
    assert data["itsm_client_secret"] == "********"
    assert data["mapping"]["category"] == "Incident"


# ------------------------------------------------------------------ dlq


@pytest.fixture
def dead_letters(redis_url):
    import redis

    client = redis.Redis.from_url(redis_url)
    store = DeadLetterStore(client, prefix="opscli", clock=time.time)
    yield store
    client.close()


def _add(store: DeadLetterStore, payload: str, reason=Reason.INVALID_PAYLOAD) -> str:
    return store.add(
        reason=reason,
        detail="a detail",
        kind="intake",
        source="alertmanager",
        key="",
        fmt="alertmanager",
        payload=payload,
        attempts=1,
        first_seen=time.time(),
    )


def _dlq_env(redis_url: str) -> dict[str, str]:
    return {"BRIDGE_REDIS_URL": redis_url, "BRIDGE_REDIS_PREFIX": "opscli"}


def test_dlq_list_shows_a_table_and_limit_keeps_the_oldest(dead_letters, redis_url):
    ids = [_add(dead_letters, "{}") for _ in range(5)]
    result = invoke("dlq", "list", "--limit", "2", **_dlq_env(redis_url))
    assert result.exit_code == 0, result.output
    lines = result.output.splitlines()
    assert lines[0].split()[:4] == ["ID", "AGE", "REASON", "SOURCE"]
    assert ids[0] in result.output and ids[1] in result.output
    assert ids[2] not in result.output
    assert "2 of 5" in result.output


def test_dlq_list_json_with_limit(dead_letters, redis_url):
    for _ in range(3):
        _add(dead_letters, "{}")
    result = invoke("dlq", "list", "--json", "--limit", "2", **_dlq_env(redis_url))
    rows = [orjson.loads(line) for line in result.output.splitlines()]
    assert len(rows) == 2
    assert rows[0]["reason"] == "invalid_payload"


def test_dlq_replay_reports_progress_and_a_summary(dead_letters, redis_url):
    good = _add(dead_letters, orjson.dumps(am_payload([am_alert("ops-1")])).decode())
    bad = _add(dead_letters, '{"not": "an alertmanager payload"}')
    result = CliRunner().invoke(
        main, ["dlq", "replay", "--all"], env=_clean_env(**_dlq_env(redis_url))
    )
    assert result.exit_code == 1, result.output  # one failed again
    assert "replaying" in result.output  # the progress bar's label
    assert "replayed 2, succeeded 1, failed again 1" in result.output
    assert dead_letters.get(good) is None
    assert dead_letters.get(bad) is not None
    assert dead_letters.get(bad).replays == 1


def test_dlq_replay_dry_run_changes_nothing(dead_letters, redis_url):
    entry = _add(dead_letters, "{}")
    result = invoke("dlq", "replay", "--all", "--dry-run", **_dlq_env(redis_url))
    assert result.exit_code == 0
    assert f"would replay {entry}" in result.output
    assert dead_letters.get(entry) is not None
