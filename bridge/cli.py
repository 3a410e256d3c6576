"""The ``bridge`` command: a thin layer over library functions."""

from __future__ import annotations

import contextlib
import sys
import time
from typing import Any

import click
import orjson

from bridge.settings import Settings, SettingsError, load_settings

CONTEXT = {"help_option_names": ["-h", "--help"], "max_content_width": 100}


def _settings(ctx: click.Context) -> Settings:
    if "settings" not in ctx.meta:
        try:
            ctx.meta["settings"] = load_settings(ctx.find_root().params.get("config"))
        except SettingsError as exc:
            raise click.ClickException(f"configuration error: {exc}") from None
    settings: Settings = ctx.meta["settings"]
    return settings


def _setup_logging(settings: Settings, *, quiet: bool = False) -> None:
    """Logs through the redacting pipeline; ``quiet`` keeps a one-shot report to warnings."""
    from bridge.logs import configure_logging

    level = "WARNING" if quiet and settings.log_level in {"DEBUG", "INFO"} else settings.log_level
    configure_logging(level, settings.log_format, settings.secret_values())


@click.group(context_settings=CONTEXT)
@click.option(
    "--config",
    type=click.Path(dir_okay=False),
    envvar="BRIDGE_CONFIG",
    help="TOML config file (default: config/bridge.toml, then BRIDGE_* variables).",
)
@click.version_option(package_name="itsm-alert-bridge")
def main(config: str | None) -> None:
    """Alerts in, exactly one ITSM incident per problem out.

    \b
    Example:
      bridge run                      # everything in one process, embedded defaults
      bridge publish --source alertmanager alert.json
      bridge status                   # is everything reachable? what is waiting?
    """


# ------------------------------------------------------------------ run / worker


@main.command(context_settings=CONTEXT)
@click.option("--concurrency", "-c", type=int, default=None, help="Worker threads.")
@click.pass_context
def run(ctx: click.Context, concurrency: int | None) -> None:
    """Run the whole bridge in one process.

    With no URLs configured it uses an in-memory broker, in-process Redis state and the
    built-in ITSM simulator; set BRIDGE_BROKER_URL, BRIDGE_REDIS_URL and BRIDGE_ITSM_URL
    to use real services.

    \b
    Example:
      bridge run
    """
    from bridge.embedded import run_bridge

    settings = _settings(ctx)
    _setup_logging(settings)
    run_bridge(settings, concurrency=concurrency or max(4, settings.worker_concurrency))


@main.command(
    context_settings={**CONTEXT, "ignore_unknown_options": True, "allow_extra_args": True}
)
@click.argument("celery_args", nargs=-1, type=click.UNPROCESSED)
@click.pass_context
def worker(ctx: click.Context, celery_args: tuple[str, ...]) -> None:
    """Start a Celery worker; extra options go to Celery unchanged.

    \b
    Example:
      bridge worker --concurrency 2 --loglevel INFO
    """
    settings = _settings(ctx)
    if settings.worker_metrics_port:
        # Before anything imports prometheus_client: pool children inherit the directory.
        _prepare_metrics_dir()
    from workers.app import INTAKE_QUEUE, UPDATES_QUEUE, URGENT_QUEUE, create_app

    _setup_logging(settings)
    app = create_app(settings)
    if settings.worker_metrics_port:
        from prometheus_client import start_http_server

        from bridge.metrics import exposition_registry
        from bridge.runtime import Runtime
        from workers.app import CelerySink

        dlq = Runtime(settings, sink=CelerySink(app)).dlq
        start_http_server(
            settings.worker_metrics_port, addr=settings.http_host, registry=exposition_registry(dlq)
        )
    argv = ["worker", "--without-gossip", "--without-mingle"]
    if not any(a.startswith(("-Q", "--queues")) for a in celery_args):
        argv += ["-Q", f"{URGENT_QUEUE},{INTAKE_QUEUE},{UPDATES_QUEUE}"]
    if not any(a.startswith(("-c", "--concurrency")) for a in celery_args):
        argv += ["--concurrency", str(settings.worker_concurrency)]
    app.worker_main(argv=[*argv, *celery_args])


@main.command(context_settings=CONTEXT)
@click.option(
    "--insecure-no-auth",
    is_flag=True,
    help="Listen beyond loopback without ingest tokens (not for production).",
)
@click.pass_context
def serve(ctx: click.Context, insecure_no_auth: bool) -> None:
    """Run the HTTP ingest: webhooks in, messages on the broker, /healthz /readyz /metrics.

    \b
    Example:
      BRIDGE_INGEST_TOKENS=s3cr3t BRIDGE_HTTP_HOST=0.0.0.0 bridge serve
    """
    from bridge.ingest import serve as serve_ingest

    settings = _settings(ctx)
    _setup_logging(settings)
    try:
        serve_ingest(settings, insecure_no_auth=insecure_no_auth)
    except ValueError as exc:
        raise click.ClickException(str(exc)) from None


def _prepare_metrics_dir() -> None:
    import os
    import shutil
    import tempfile

    path = os.environ.get("PROMETHEUS_MULTIPROC_DIR") or tempfile.mkdtemp(prefix="bridge-metrics-")
    shutil.rmtree(path, ignore_errors=True)
    os.makedirs(path, exist_ok=True)
    os.environ["PROMETHEUS_MULTIPROC_DIR"] = path


# ------------------------------------------------------------------ publish


@main.command(context_settings=CONTEXT)
@click.option(
    "--source",
    "fmt",
    type=click.Choice(["alertmanager", "grafana", "pagerduty", "generic", "auto"]),
    default="auto",
    show_default=True,
    help="Format of the payload; auto detects it from its shape.",
)
@click.argument("file", type=click.File("rb"), default="-")
@click.pass_context
def publish(ctx: click.Context, fmt: str, file: Any) -> None:
    """Put one payload (a file, or - for standard input) on the broker.

    \b
    Example:
      bridge publish --source alertmanager alert.json
      curl -s ... | bridge publish -
    """
    from bridge import sources
    from bridge.pipeline import envelope
    from workers.app import create_app
    from workers.app import publish as publish_message

    settings = _settings(ctx)
    body = file.read()
    try:
        payload = sources.decode(body)
        if fmt == "auto":
            detected = sources.detect(payload)
            if detected is None:
                raise click.ClickException(
                    "cannot tell the payload's format; name it with --source"
                )
            fmt = detected
        count = len(sources.parse(fmt, payload))
    except sources.InvalidPayload as exc:
        raise click.ClickException(f"invalid {fmt} payload: {exc}") from None
    if not settings.broker_url:
        raise click.ClickException(
            "no broker configured: set BRIDGE_BROKER_URL to the broker the workers use"
        )
    app = create_app(settings)
    try:
        publish_message(app, envelope(fmt, payload), timeout=5)
    except Exception as exc:
        raise click.ClickException(f"the broker did not take the message: {exc}") from None
    click.echo(f"published {count} {fmt} alert(s)")


# ------------------------------------------------------------------ dlq


@main.group(context_settings=CONTEXT)
def dlq() -> None:
    """List, inspect, replay, adopt and purge dead letters.

    \b
    Example:
      bridge dlq list --reason itsm_rejected
      bridge dlq replay --all --dry-run
    """


def _runtime(ctx: click.Context) -> Any:
    from bridge.runtime import Runtime
    from workers.app import CelerySink, create_app

    settings = _settings(ctx)
    return Runtime(settings, sink=CelerySink(create_app(settings)))


def _filters(f: Any) -> Any:
    f = click.option("--reason", help="Only entries with this reason.")(f)
    f = click.option("--source", help="Only entries from this source format.")(f)
    f = click.option("--key", help="Only entries for this incident key.")(f)
    f = click.option(
        "--older-than", type=float, default=None, help="Only entries older than N seconds."
    )(f)
    return click.option(
        "--newer-than", type=float, default=None, help="Only entries newer than N seconds."
    )(f)


def _select(
    rt: Any, reason: Any, source: Any, key: Any, older: Any, newer: Any, limit: int | None = None
) -> list[Any]:
    entries: list[Any] = rt.dlq.list(
        reason=reason, source=source, key=key, older_than_s=older, newer_than_s=newer, limit=limit
    )
    return entries


def _age(seconds: float) -> str:
    for unit, size in (("d", 86400), ("h", 3600), ("m", 60)):
        if seconds >= size:
            return f"{seconds / size:.0f}{unit}"
    return f"{seconds:.0f}s"


@dlq.command("list", context_settings=CONTEXT)
@_filters
@click.option(
    "--limit",
    type=click.IntRange(min=1),
    default=None,
    help="Show at most N entries (the oldest).",
)
@click.option("--json", "as_json", is_flag=True, help="One JSON object per line.")
@click.pass_context
def dlq_list(
    ctx: click.Context, reason, source, key, older_than, newer_than, limit, as_json
) -> None:
    """List dead letters, oldest first, as a table (or JSON lines).

    \b
    Example:
      bridge dlq list --reason itsm_rejected --older-than 3600
      bridge dlq list --limit 20
      bridge dlq list --json | jq -r .key
    """
    rt = _runtime(ctx)
    entries = _select(rt, reason, source, key, older_than, newer_than, limit)
    if as_json:
        for entry in entries:
            click.echo(orjson.dumps(entry.to_dict()).decode())
        return
    if not entries:
        click.echo("no dead letters")
        return
    now = time.time()
    rows = [("ID", "AGE", "REASON", "SOURCE", "ACTION", "TRIES", "DETAIL")]
    for e in entries:
        detail = e.detail if len(e.detail) <= 60 else e.detail[:57] + "..."
        rows.append(
            (
                e.id,
                _age(now - e.failed_at),
                e.reason,
                e.source,
                e.action or e.kind,
                str(e.attempts),
                detail,
            )
        )
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]) - 1)]
    for row in rows:
        cells = [c.ljust(w) for c, w in zip(row, widths, strict=False)]
        click.echo("  ".join([*cells, row[-1]]))
    total = rt.dlq.count()
    if limit is not None and len(entries) == limit and total > limit:
        click.echo(f"\n{len(entries)} of {total} dead letter(s) in the store shown (--limit)")
    else:
        click.echo(f"\n{len(entries)} dead letter(s)")


@dlq.command("show", context_settings=CONTEXT)
@click.argument("entry_id")
@click.pass_context
def dlq_show(ctx: click.Context, entry_id: str) -> None:
    """Show one dead letter in full.

    \b
    Example:
      bridge dlq show 1764384000000-1a2b3c4d
    """
    entry = _runtime(ctx).dlq.get(entry_id)
    if entry is None:
        raise click.ClickException(f"no dead letter {entry_id} (see `bridge dlq list`)")
    data = entry.to_dict()
    with contextlib.suppress(orjson.JSONDecodeError):
        data["payload"] = orjson.loads(data["payload"])
    click.echo(orjson.dumps(data, option=orjson.OPT_INDENT_2).decode())


@dlq.command("replay", context_settings=CONTEXT)
@click.argument("entry_ids", nargs=-1)
@click.option("--all", "everything", is_flag=True, help="Every entry matching the filters.")
@_filters
@click.option("--dry-run", is_flag=True, help="Say what would be replayed; change nothing.")
@click.pass_context
def dlq_replay(ctx, entry_ids, everything, reason, source, key, older_than, newer_than, dry_run):
    """Replay dead letters through the normal pipeline (never a duplicate incident).

    An entry that succeeds is removed; one that fails again stays, with the new reason.

    \b
    Example:
      bridge dlq replay --all --reason itsm_rejected
      bridge dlq replay 1764384000000-1a2b3c4d
    """
    rt = _runtime(ctx)
    _setup_logging(rt.settings)
    filtered = any(v is not None for v in (reason, source, key, older_than, newer_than))
    if entry_ids:
        entries = [rt.dlq.get(i) for i in entry_ids]
        missing = [i for i, e in zip(entry_ids, entries, strict=True) if e is None]
        for i in missing:
            click.echo(f"{i}: not found (already replayed?)")
        entries = [e for e in entries if e is not None]
    elif everything or filtered:
        entries = _select(rt, reason, source, key, older_than, newer_than)
    else:
        raise click.UsageError("name entry ids, or use --all (optionally with filters)")
    if dry_run:
        for e in entries:
            click.echo(f"would replay {e.id} ({e.reason}, {e.action or e.kind}, key {e.key})")
        click.echo(f"{len(entries)} entr{'y' if len(entries) == 1 else 'ies'} would be replayed")
        return
    succeeded = failed = 0
    with click.progressbar(entries, label="replaying", file=sys.stderr) as bar:
        for entry in bar:
            result = rt.pipeline.replay(entry)
            if result.status in {"done", "stale"}:
                rt.dlq.remove(entry.id)
                succeeded += 1
            else:
                rt.dlq.mark_replayed(entry.id, result.detail)
                failed += 1
                click.echo(f"\n{entry.id}: failed again: {result.detail}", err=True)
    click.echo(f"replayed {len(entries)}, succeeded {succeeded}, failed again {failed}")
    if failed:
        sys.exit(1)


@dlq.command("adopt", context_settings=CONTEXT)
@click.argument("entry_id")
@click.option(
    "--incident", "incident_id", type=int, required=True, help="Numeric id of the incident."
)
@click.pass_context
def dlq_adopt(ctx, entry_id, incident_id):
    """Tell the bridge a dead-lettered create did land, as incident ID.

    For `ambiguous_create` entries on an ITSM that cannot be searched: the key waits
    for this answer, so no second incident is created. What the key saw meanwhile
    (occurrences, a resolve) is written to the adopted incident; the entry is removed.
    If you found no incident, replay the entry instead.

    \b
    Example:
      bridge dlq adopt 1764384000000-1a2b3c4d --incident 4711
    """
    rt = _runtime(ctx)
    _setup_logging(rt.settings)
    entry = rt.dlq.get(entry_id)
    if entry is None:
        raise click.ClickException(f"{entry_id}: no such dead letter (see `bridge dlq list`)")
    result = rt.pipeline.adopt(entry, incident_id)
    if result.status != "done":
        raise click.ClickException(f"{entry_id}: {result.detail}")
    rt.dlq.remove(entry.id)
    click.echo(f"{entry_id}: {result.detail} for key {entry.key}")


@dlq.command("purge", context_settings=CONTEXT)
@_filters
@click.option("--yes", is_flag=True, help="Do not ask for confirmation.")
@click.pass_context
def dlq_purge(ctx, reason, source, key, older_than, newer_than, yes):
    """Delete dead letters matching the filters (all of them without filters).

    \b
    Example:
      bridge dlq purge --older-than 604800 --yes
    """
    rt = _runtime(ctx)
    entries = _select(rt, reason, source, key, older_than, newer_than)
    if not entries:
        click.echo("nothing to purge")
        return
    if not yes:
        click.confirm(f"delete {len(entries)} dead letter(s)?", abort=True)
    for entry in entries:
        rt.dlq.remove(entry.id)
    click.echo(f"purged {len(entries)} dead letter(s)")


# ------------------------------------------------------------------ itsm


@main.group(context_settings=CONTEXT)
def itsm() -> None:
    """Talk to the ITSM.

    \b
    Example:
      bridge itsm check
    """


@itsm.command("check", context_settings=CONTEXT)
@click.pass_context
def itsm_check(ctx: click.Context) -> None:
    """Prove the ITSM settings work: get a token and make one read call.

    \b
    Example:
      BRIDGE_ITSM_URL=https://sd.example.com bridge itsm check
    """
    from bridge.itsm.check import check_itsm

    settings = _settings(ctx)
    _setup_logging(settings)
    if not settings.itsm_url:
        raise click.ClickException("BRIDGE_ITSM_URL is not set: there is no ITSM to check")
    result = check_itsm(settings)
    if not result.ok:
        raise click.ClickException(result.message)
    click.echo(result.message)


@main.command("itsm-sim", context_settings=CONTEXT)
@click.option("--host", default="127.0.0.1", show_default=True)
@click.option("--port", type=int, default=8090, show_default=True)
@click.option("--flavor", type=click.Choice(["itsm", "serviceops"]), default="itsm")
@click.option("--latency", type=float, default=0.0, help="Seconds added to every call.")
@click.option("--client-id", default="bridge-client", show_default=True)
@click.option("--client-secret", envvar="BRIDGE_SIM_CLIENT_SECRET", default="sim-secret")
@click.option("--username", default="bridge@example.com", show_default=True)
@click.option("--password", envvar="BRIDGE_SIM_PASSWORD", default="sim-password")
def itsm_sim(host, port, flavor, latency, client_id, client_secret, username, password):
    """Run the ITSM simulator (a stand-in ITSM with fault injection).

    \b
    Example:
      bridge itsm-sim --port 8090 --flavor serviceops
    """
    from bridge.itsm.simulator import serve_forever

    click.echo(f"ITSM simulator ({flavor}) on http://{host}:{port}  admin: /_sim/state")
    serve_forever(
        flavor,
        host,
        port,
        latency_s=latency,
        client_id=client_id,
        client_secret=client_secret,
        username=username,
        password=password,
    )


@main.command(
    "bench",
    context_settings={**CONTEXT, "ignore_unknown_options": True, "allow_extra_args": True},
    add_help_option=False,
)
@click.argument("bench_args", nargs=-1, type=click.UNPROCESSED)
def bench(bench_args: tuple[str, ...]) -> None:
    """Measure the bridge against its own limits (see `bridge bench --help`).

    \b
    Example:
      bridge bench --quick --json bench.json
    """
    from bridge.bench import main as bench_main

    sys.exit(bench_main(list(bench_args)))


# ------------------------------------------------------------------ config


@main.group(context_settings=CONTEXT)
def config() -> None:
    """Validate and show the effective configuration.

    \b
    Example:
      bridge config check
    """


@config.command("check", context_settings=CONTEXT)
@click.pass_context
def config_check(ctx: click.Context) -> None:
    """Validate the configuration; exit non-zero naming the key at fault.

    Reads the same sources as every other command (config/bridge.toml, the file given
    by --config or BRIDGE_CONFIG, BRIDGE_* variables and *_FILE secrets), then checks
    the mapping templates, the ingest tokens and the timeouts against each other.
    Nothing is contacted: use `bridge itsm check` and `bridge status` for that.

    \b
    Example:
      bridge --config /etc/bridge.toml config check
      BRIDGE_CONFIG=/etc/bridge.toml bridge config check
    """
    settings = _settings(ctx)
    problems = _config_problems(settings)
    if problems:
        for problem in problems:
            click.echo(f"configuration error: {problem}", err=True)
        ctx.exit(1)
    click.echo("configuration is valid")


def _config_problems(settings: Settings) -> list[str]:
    """What the settings model alone cannot see: templates, token sources, lease vs timeouts."""
    from bridge.mapping import Mapper, MappingError

    problems = []
    try:
        Mapper(settings.mapping)
    except MappingError as exc:
        problems.append(f"[mapping] {exc}")
    from bridge.ingest import SOURCES
    from bridge.settings import parse_ingest_tokens

    sources = {src for _, src in parse_ingest_tokens(settings.ingest_tokens.get_secret_value())}
    unknown = sorted(src for src in sources if src is not None and src not in SOURCES)
    if unknown:
        problems.append(
            f"[ingest] tokens (BRIDGE_INGEST_TOKENS): unknown source {', '.join(unknown)}"
            f" (expected one of {', '.join(SOURCES)})"
        )
    longest_call = settings.itsm_connect_timeout_s + settings.itsm_read_timeout_s
    if settings.dedup_lock_lease_s <= longest_call:
        # A lease shorter than one ITSM call lets a second action on the key start meanwhile.
        problems.append(
            f"[dedup] lock_lease_s (BRIDGE_DEDUP_LOCK_LEASE_S): {settings.dedup_lock_lease_s} s"
            f" must exceed itsm.connect_timeout_s + itsm.read_timeout_s ({longest_call:g} s)"
        )
    return problems


def _masked(name: str, value: Any, settings: Settings) -> Any:
    from bridge.settings import SECRET_FIELDS
    from bridge.status import display_url

    if name in SECRET_FIELDS:
        return "********" if getattr(settings, name).get_secret_value() else ""
    if name.endswith("_url") and isinstance(value, str):
        return display_url(value)  # a broker URL may carry a password
    return value


@config.command("show", context_settings=CONTEXT)
@click.option("--json", "as_json", is_flag=True, help="One JSON object instead of TOML.")
@click.pass_context
def config_show(ctx: click.Context, as_json: bool) -> None:
    """Print the effective settings as TOML, secrets and URL passwords masked.

    \b
    Example:
      bridge config show
      BRIDGE_CONFIG=/etc/bridge.toml bridge config show --json
    """
    from bridge.config_doc import section_of

    settings = _settings(ctx)
    values = {
        name: _masked(name, value, settings)
        for name, value in settings.model_dump(exclude={"mapping"}).items()
    }
    mapping = settings.mapping.model_dump()
    if as_json:
        click.echo(orjson.dumps({**values, "mapping": mapping}, default=str).decode())
        return
    current = None
    for name, value in values.items():
        section, key = section_of(name)
        if section != current:
            click.echo(f"{'' if current is None else chr(10)}[{section}]")
            current = section
        click.echo(f"{key} = {_toml(value)}")
    click.echo("\n[mapping]")
    for key, value in mapping.items():
        if key != "routes":
            click.echo(f"{key} = {_toml(value)}")
    for route in mapping.get("routes", ()):
        click.echo("\n[[mapping.routes]]")
        for key, value in route.items():
            if value not in (None, (), []):
                click.echo(f"{key} = {_toml(value)}")


def _toml(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, dict):
        return "{ " + ", ".join(f"{k} = {_toml(v)}" for k, v in value.items()) + " }"
    if isinstance(value, (list, tuple)):
        return "[" + ", ".join(_toml(v) for v in value) + "]"
    if value is None:
        return '""'
    return orjson.dumps(value).decode()


# ------------------------------------------------------------------ status


@main.command(context_settings=CONTEXT)
@click.option("--json", "as_json", is_flag=True, help="One JSON object instead of text.")
@click.option(
    "--timeout",
    type=click.FloatRange(min=0.1),
    default=3.0,
    show_default=True,
    help="Seconds each broker and Redis probe may take.",
)
@click.pass_context
def status(ctx: click.Context, as_json: bool, timeout: float) -> None:
    """Check the broker, Redis and the ITSM; show queue depths and dead letters.

    Exits 1 when any of them is unreachable (or not configured), 0 otherwise; waiting
    messages and dead letters are reported, not judged.

    \b
    Example:
      bridge status
      bridge status --json | jq .queues
    """
    import redis as redis_lib

    from bridge.dlq import DeadLetterStore
    from bridge.itsm.check import check_itsm
    from bridge.status import collect_status, render_text
    from workers.app import INTAKE_QUEUE, UPDATES_QUEUE, URGENT_QUEUE

    settings = _settings(ctx)
    _setup_logging(settings, quiet=True)  # the ITSM check may log: redact it
    redis: Any = None
    if settings.redis_url:
        redis = redis_lib.Redis.from_url(
            settings.redis_url, socket_timeout=timeout, socket_connect_timeout=timeout
        )
    dlq = DeadLetterStore(redis, prefix=settings.redis_prefix, clock=time.time)
    result = collect_status(
        settings,
        queues=(INTAKE_QUEUE, URGENT_QUEUE, UPDATES_QUEUE),
        redis=redis,
        dlq=dlq,
        itsm_check=check_itsm,
        timeout=timeout,
    )
    if redis is not None:
        redis.close()
    if as_json:
        click.echo(orjson.dumps(result.to_dict()).decode())
    else:
        click.echo(render_text(result))
    ctx.exit(0 if result.ok else 1)


if __name__ == "__main__":
    main()
