"""One typed settings object for the whole bridge.

Sources, later ones winning: the commented defaults in ``config/bridge.toml``, the
file named by ``BRIDGE_CONFIG`` (or passed explicitly), then ``BRIDGE_*`` environment
variables. A secret may also come from ``BRIDGE_<NAME>_FILE``, as container platforms mount them.

TOML sections are flattened: ``[itsm] client_id`` is the field ``itsm_client_id``
and the variable ``BRIDGE_ITSM_CLIENT_ID``. Every validation error names the key.
"""

from __future__ import annotations

import os
import tomllib
from collections.abc import Mapping
from pathlib import Path
from typing import Any, Literal
from urllib.parse import unquote, urlsplit

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    SecretStr,
    ValidationError,
    field_validator,
    model_validator,
)

ENV_PREFIX = "BRIDGE_"
_NOT_SETTINGS = {"BRIDGE_CONFIG", "BRIDGE_NO_APP"}
# The commented default file; when the package is installed without the project tree
# the model's own defaults (kept equal to that file by a test) apply.
DEFAULT_CONFIG = Path(__file__).resolve().parent.parent / "config" / "bridge.toml"


class SettingsError(Exception):
    """The configuration is invalid; the message names every key at fault."""


class RoutingRule(BaseModel):
    """Alerts whose labels match every ``match`` entry (exact) get these fields."""

    model_config = ConfigDict(extra="forbid", frozen=True)
    match: dict[str, str] = Field(
        description="Labels the alert must carry, each with exactly this value."
    )
    category: str | None = Field(
        default=None, description="Category of matching alerts' incidents."
    )
    technician_group: str | None = Field(
        default=None, description="Technician group matching alerts' incidents are assigned to."
    )
    requester_email: str | None = Field(
        default=None, description="Requester of matching alerts' incidents."
    )
    tags: tuple[str, ...] = Field(
        default=(), description="Tags added to matching alerts' incidents."
    )


class MappingSettings(BaseModel):
    """How an alert becomes incident fields (see ``bridge/mapping.py``)."""

    model_config = ConfigDict(extra="forbid", frozen=True)
    subject_template: str = Field(
        default="[{{ severity | upper }}] {{ summary }}",
        description="Jinja2 template of the incident subject (sandboxed).",
    )
    description_template: str = Field(
        default=(
            "{{ description }}\n\nSource: {{ source }}\nKey: {{ key }}\n"
            "{% for k, v in labels|dictsort %}{{ k }}={{ v }}\n{% endfor %}"
            "{% for link in links %}{{ link }}\n{% endfor %}"
        ),
        description="Jinja2 template of the incident description (sandboxed).",
    )
    subject_max_chars: int = Field(
        default=250, ge=20, description="Subjects are cut to this many characters."
    )
    description_max_chars: int = Field(
        default=32000, ge=100, description="Descriptions are cut to this many characters."
    )
    truncation_marker: str = Field(
        default=" …[truncated]", description="Appended where a subject or description was cut."
    )
    category: str = Field(default="Incident", description="Incident category.")
    requester_email: str = Field(
        default="alerts@example.com", description="Requester of every incident (an ITSM user)."
    )
    technician_group: str | None = Field(
        default=None,
        description="Technician group incidents are assigned to; empty = the ITSM's default.",
    )
    tags: tuple[str, ...] = Field(
        default=("alert-bridge",),
        description="Tags on every incident (the bridge adds bridge-key:<key> itself).",
    )
    # severity -> (priority, urgency, impact) in the bridge's flavour-neutral words
    # LOW | MEDIUM | HIGH | URGENT and LOW | ON_USER | ON_DEPARTMENT | ON_BUSINESS.
    severity_priority: dict[str, str] = Field(
        default_factory=lambda: {
            "critical": "URGENT",
            "error": "HIGH",
            "warning": "MEDIUM",
            "info": "LOW",
        },
        description="severity -> priority: LOW | MEDIUM | HIGH | URGENT.",
    )
    severity_urgency: dict[str, str] = Field(
        default_factory=lambda: {
            "critical": "URGENT",
            "error": "HIGH",
            "warning": "MEDIUM",
            "info": "LOW",
        },
        description="severity -> urgency: LOW | MEDIUM | HIGH | URGENT.",
    )
    severity_impact: dict[str, str] = Field(
        default_factory=lambda: {
            "critical": "ON_BUSINESS",
            "error": "ON_DEPARTMENT",
            "warning": "ON_USER",
            "info": "LOW",
        },
        description="severity -> impact: LOW | ON_USER | ON_DEPARTMENT | ON_BUSINESS.",
    )
    custom_fields: dict[str, str] = Field(
        default_factory=dict, description="Custom field label -> Jinja2 template of its value."
    )
    routes: tuple[RoutingRule, ...] = Field(
        default=(),
        description=(
            "Routing rules ([[mapping.routes]]): the first whose labels all match sets its fields."
        ),
    )


class Settings(BaseModel):
    """Every setting of the bridge; field names are the flattened TOML keys."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    # [itsm]
    itsm_url: str = Field(
        default="",
        description=(
            "Base URL of the ITSM (https://servicedesk.example.com); empty = the built-in "
            "simulator (bridge run)."
        ),
    )
    itsm_flavor: Literal["itsm", "serviceops"] = Field(
        default="itsm",
        description=(
            'API generation: "itsm" (the 2018 /api/v1/incident API) or "serviceops" '
            "(/api/v1/request)."
        ),
    )
    itsm_client_id: str = Field(
        default="", description='OAuth2 client id of the ITSM\'s "Rest API Client" registration.'
    )
    itsm_client_secret: SecretStr = Field(
        default=SecretStr(""),
        description="OAuth2 client secret; set through the environment or *_FILE, never in a file.",
    )
    itsm_username: str = Field(
        default="", description="ITSM user the bridge acts as (a dedicated user is best)."
    )
    itsm_password: SecretStr = Field(
        default=SecretStr(""),
        description="Password of that user; used only when a new token is granted.",
    )
    itsm_api_key: SecretStr = Field(
        default=SecretStr(""),
        description="API key used instead of OAuth2 tokens, where the ITSM issues one.",
    )
    itsm_connect_timeout_s: float = Field(
        default=3.05, gt=0, description="TCP connect timeout of every ITSM call, in seconds."
    )
    itsm_read_timeout_s: float = Field(
        default=30.0,
        gt=0,
        description="Read timeout of every ITSM call; a create that times out here is ambiguous.",
    )
    itsm_verify_tls: bool = Field(
        default=True,
        description=(
            "Verify the ITSM's TLS certificate (switching it off is logged at every start)."
        ),
    )
    itsm_ca_bundle: str = Field(
        default="",
        description=(
            "Path of a PEM bundle for a private CA; set, it verifies the ITSM's certificate "
            "even with `verify_tls = false`. Unset, with `verify_tls` true, `REQUESTS_CA_BUNDLE` "
            "or `CURL_CA_BUNDLE` apply when set."
        ),
    )
    itsm_check_incident_id: int = Field(
        default=0,
        ge=0,
        description=(
            "An existing incident id that `bridge itsm check` reads on the 2018 API, which has no "
            "list call; 0 = read id 0 and take the API's not-found wrapper as proof."
        ),
    )
    itsm_pool_size: int = Field(
        default=16, ge=1, le=512, description="HTTP keep-alive connections kept per worker process."
    )
    itsm_token_margin_s: float = Field(
        default=60.0, ge=0, description="Renew the access token this long before it expires."
    )
    itsm_resolved_status: str = Field(
        default="Resolved", description="Status written when an alert recovers."
    )
    itsm_reopen_status: str = Field(
        default="Open",
        description="Status written when an alert relapses inside the reopen window.",
    )
    itsm_closed_statuses: tuple[str, ...] = Field(
        default=("Closed", "Cancelled", "Won't Fix"),
        description="Statuses that mean a person closed the incident: never reopened.",
    )
    itsm_key_custom_field: str = Field(
        default="",
        description="serviceops: label of a custom field that also stores the incident key.",
    )
    itsm_ambiguous_create: Literal["search", "dead-letter", "create"] = Field(
        default="search",
        description=(
            'When a create may have been applied: "search" by key tag first (dead-letter where the'
            ' API cannot search), "dead-letter" for an operator, or "create" (may duplicate).'
        ),
    )
    # Protection of the ITSM, shared by every worker through Redis (bridge/itsm/guard.py).
    itsm_rate_limit_per_s: float = Field(
        default=0.0,
        ge=0,
        description=(
            "ITSM calls per second for all workers together, shared through Redis; 0 = no limit."
        ),
    )
    itsm_rate_limit_burst: int = Field(
        default=10, ge=1, description="ITSM calls allowed at once before the per-second rate."
    )
    itsm_rate_limit_max_wait_s: float = Field(
        default=2.0,
        ge=0,
        le=60,
        description="A call waits at most this long for a rate slot, else it is rescheduled.",
    )
    itsm_breaker_failures: int = Field(
        default=10,
        ge=0,
        description=(
            "Consecutive ITSM failures (timeouts, refused connections, 5xx, 429) that open the "
            "circuit breaker shared by all workers; 0 = off."
        ),
    )
    itsm_breaker_open_s: float = Field(
        default=30.0,
        gt=0,
        description="How long the circuit stays open (calls fail fast) before one probe call.",
    )

    # [redis] / [broker]
    redis_url: str = Field(
        default="",
        description=(
            "Redis for state, token cache and dead letters; empty = in-process fakeredis (bridge "
            "run)."
        ),
    )
    redis_prefix: str = Field(
        default="bridge", description="Prefix of every Redis key the bridge writes."
    )
    broker_url: str = Field(
        default="",
        description=(
            "Celery broker: redis://... or amqp://user:pass@host:5672/vhost; empty = in-memory."
        ),
    )
    broker_visibility_timeout_s: int = Field(
        default=3600,
        ge=60,
        description=(
            "Redis broker: an unacked message returns after this long; must exceed the longest "
            "task and retry delay."
        ),
    )

    # [dedup]
    dedup_key_mode: Literal["identity", "group_by"] = Field(
        default="identity",
        description=(
            '"identity": the source\'s own id (fingerprint, dedup_key, key); "group_by": a hash of '
            "dedup.group_by labels."
        ),
    )
    dedup_group_by: tuple[str, ...] = Field(
        default=("alertname",),
        description="Labels whose values make the key in group_by mode (one incident per group).",
    )
    dedup_tenant: str = Field(
        default="default",
        description=(
            "Environment or tenant name; part of every key, so TEST and PROD never share an "
            "incident."
        ),
    )
    dedup_update_interval_s: int = Field(
        default=300,
        ge=0,
        description='At most one "N more occurrences" update per incident per interval.',
    )
    dedup_reopen_window_s: int = Field(
        default=3600,
        ge=0,
        description="A relapse within this time of resolution reopens the same incident.",
    )
    dedup_on_resolve: Literal["resolve", "note", "nothing"] = Field(
        default="resolve",
        description='What a recovery does: "resolve", "note" (a note only) or "nothing".',
    )
    dedup_flap_threshold: int = Field(
        default=4,
        ge=2,
        description="This many resolve/relapse cycles within flap_window_s count as flapping.",
    )
    dedup_flap_window_s: int = Field(
        default=1800, ge=1, description="Window in which flap_threshold cycles mean flapping."
    )
    dedup_flap_quiet_s: int = Field(
        default=600,
        ge=1,
        description="A flapping incident is resolved once it stays resolved this long.",
    )
    dedup_state_ttl_s: int = Field(
        default=7 * 86400,
        ge=60,
        description="Per-key state expires after this long without activity.",
    )
    dedup_claim_lease_s: int = Field(
        default=120,
        ge=5,
        description="A create claim older than this is presumed dead and taken over.",
    )
    dedup_lock_lease_s: int = Field(
        default=90,
        ge=5,
        description=(
            "One ITSM action per key at a time; the lock lease must exceed connect + read timeout."
        ),
    )
    dedup_note_occurrences: bool = Field(
        default=True,
        description='Write "N more occurrences" notes (at most one per update interval).',
    )

    # [retry]
    retry_max_attempts: int = Field(
        default=8, ge=1, description="Attempts per ITSM action before it is dead-lettered."
    )
    retry_max_age_s: int = Field(
        default=3600, ge=1, description="... or once the alert is this old, in seconds."
    )
    retry_base_delay_s: float = Field(
        default=1.0,
        gt=0,
        description="Exponential backoff with full jitter: up to base * 2^attempt seconds.",
    )
    retry_max_delay_s: float = Field(
        default=300.0, gt=0, description="Longest backoff between two attempts, in seconds."
    )
    retry_after_cap_s: float = Field(
        default=300.0, gt=0, description="Never wait longer than this for a server's Retry-After."
    )

    # [dlq]
    dlq_max_entries: int = Field(
        default=100_000,
        ge=100,
        description="The dead-letter store is trimmed, oldest first, beyond this many entries.",
    )

    # [http]
    http_host: str = Field(
        default="127.0.0.1",
        description=(
            "Ingest listen address (also the worker's /metrics); anything but loopback requires "
            "ingest tokens."
        ),
    )
    http_port: int = Field(default=8080, ge=0, le=65535, description="Ingest listen port.")
    ingest_tokens: SecretStr = Field(
        default=SecretStr(""),
        description=(
            "Bearer tokens of the ingest, comma-separated; token:source binds a token to one "
            "source."
        ),
    )
    ingest_grafana_hmac_secret: SecretStr = Field(
        default=SecretStr(""),
        description=(
            "Shared secret of Grafana's webhook HMAC signature; when set, Grafana requests "
            "must carry a valid X-Grafana-Alerting-Signature."
        ),
    )
    http_max_body_bytes: int = Field(
        default=1024 * 1024, ge=1024, description="Largest request body the ingest accepts."
    )
    http_max_alerts: int = Field(default=1000, ge=1, description="Most alerts in one request.")

    # [worker]
    worker_concurrency: int = Field(
        default=2, ge=1, description="Pool processes per bridge worker."
    )
    worker_intake_batch: int = Field(
        default=32,
        ge=1,
        description=(
            "Most intake messages one prefork pool process decides together while every "
            "process is busy (one Redis round trip for all); 1 = one message at a time."
        ),
    )
    worker_metrics_port: int = Field(
        default=9808,
        ge=0,
        le=65535,
        description="Port of the worker's /metrics (summed over its processes); 0 = off.",
    )

    # [log]
    log_every_decision: bool = Field(
        default=True,
        description=(
            "One INFO line per alert's decision (with its key), so one grep follows an alert; "
            "switch off to save CPU in very large storms (actions are always logged)."
        ),
    )
    log_format: Literal["auto", "json", "console"] = Field(
        default="auto",
        description='"json", "console", or "auto" (console on a terminal, JSON otherwise).',
    )
    log_level: Literal["DEBUG", "INFO", "WARNING", "ERROR"] = Field(
        default="INFO", description="Lowest level logged."
    )

    mapping: MappingSettings = Field(
        default_factory=MappingSettings,
        description="How an alert becomes incident fields (the [mapping] section).",
    )

    @model_validator(mode="after")
    def _visibility_timeout_outlasts_every_delay(self) -> Settings:
        # On a Redis broker an unacked message (a task waiting for its countdown included)
        # is handed to another worker after the visibility timeout: any delay longer than
        # that would run the same action twice.
        longest = max(self.retry_max_delay_s, self.retry_after_cap_s, self.dedup_flap_quiet_s)
        if self.broker_visibility_timeout_s <= longest:
            raise ValueError(
                f"broker.visibility_timeout_s ({self.broker_visibility_timeout_s}) must exceed "
                f"the longest retry or settle delay ({longest:g} s)"
            )
        return self

    @field_validator("itsm_url", "redis_url", "broker_url")
    @classmethod
    def _url_has_scheme(cls, value: str, info: Any) -> str:
        if value and "://" not in value:
            raise ValueError(f"{value!r} is not a URL (expected scheme://host...)")
        if (
            info.field_name == "itsm_url"
            and value
            and not value.startswith(("http://", "https://"))
        ):
            raise ValueError("must start with http:// or https://")
        return value.rstrip("/") if info.field_name == "itsm_url" else value

    @property
    def embedded(self) -> bool:
        """True when no external service is configured at all (``bridge run`` defaults)."""
        return not (self.itsm_url or self.redis_url or self.broker_url)

    def secret_values(self) -> list[str]:
        """The configured secret strings, for log redaction and leak tests."""
        secrets = [
            self.itsm_client_secret,
            self.itsm_password,
            self.itsm_api_key,
            self.ingest_grafana_hmac_secret,
        ]
        values = [s.get_secret_value() for s in secrets]
        values += [tok for tok, _ in parse_ingest_tokens(self.ingest_tokens.get_secret_value())]
        for url in (self.broker_url, self.redis_url):
            # a password written into a broker or Redis URL, as written and decoded
            password = urlsplit(url).password if url else None
            if password:
                values += [password, unquote(password)]
        return [v for v in values if v]


def parse_ingest_tokens(raw: str) -> list[tuple[str, str | None]]:
    """``tok1,tok2:grafana`` -> [("tok1", None), ("tok2", "grafana")]."""
    pairs: list[tuple[str, str | None]] = []
    for item in raw.split(","):
        item = item.strip()
        if not item:
            continue
        token, _, source = item.partition(":")
        pairs.append((token, source or None))
    return pairs


FIELD_NAMES = frozenset(Settings.model_fields)
SECRET_FIELDS = frozenset(
    name for name, f in Settings.model_fields.items() if f.annotation is SecretStr
)


def _flatten(doc: Mapping[str, Any], origin: str) -> dict[str, Any]:
    flat: dict[str, Any] = {}
    for section, body in doc.items():
        if section == "mapping" or not isinstance(body, Mapping):
            flat[section] = body
            continue
        for key, value in body.items():
            name = f"{section}_{key}"
            if name not in FIELD_NAMES:
                raise SettingsError(f"{origin}: unknown key [{section}] {key}")
            flat[name] = value
    return flat


def _read_toml(path: Path) -> dict[str, Any]:
    try:
        with path.open("rb") as fh:
            return _flatten(tomllib.load(fh), str(path))
    except FileNotFoundError as exc:
        raise SettingsError(f"config file {path} does not exist (BRIDGE_CONFIG)") from exc
    except tomllib.TOMLDecodeError as exc:
        raise SettingsError(f"{path}: not valid TOML: {exc}") from exc


def _from_env(env: Mapping[str, str]) -> dict[str, Any]:
    values: dict[str, Any] = {}
    for var, raw in env.items():
        if not var.startswith(ENV_PREFIX) or var in _NOT_SETTINGS:
            continue
        name = var[len(ENV_PREFIX) :].lower()
        if name.endswith("_file") and name[: -len("_file")] in FIELD_NAMES:
            name = name[: -len("_file")]
            try:
                raw = Path(raw).read_text().strip()
            except OSError as exc:
                raise SettingsError(f"{var}: cannot read {raw}: {exc.strerror}") from exc
        if name not in FIELD_NAMES or name == "mapping":
            raise SettingsError(f"unknown environment variable {var}")
        field = Settings.model_fields[name]
        values[name] = raw.split(",") if "tuple" in str(field.annotation) and raw else raw
    return values


def env_name(field: str) -> str:
    return ENV_PREFIX + field.upper()


def _describe(err: Mapping[str, Any]) -> str:
    loc = [str(p) for p in err["loc"]]
    if loc and loc[0] in FIELD_NAMES and loc[0] != "mapping":
        section, _, key = loc[0].partition("_")
        where = f"[{section}] {key} ({env_name(loc[0])})"
    else:
        where = ".".join(loc)
    message = str(err["msg"]).removeprefix("Value error, ")
    return f"{where}: {message}" if where else message


def load_settings(
    path: str | Path | None = None,
    env: Mapping[str, str] | None = None,
    **overrides: Any,
) -> Settings:
    """Build and validate the settings; raise SettingsError naming each bad key."""
    env = os.environ if env is None else env
    merged = _read_toml(DEFAULT_CONFIG) if DEFAULT_CONFIG.exists() else {}
    path = path or env.get("BRIDGE_CONFIG")
    if path:
        file_values = _read_toml(Path(path))
        if "mapping" in file_values and "mapping" in merged:
            file_values["mapping"] = {**merged["mapping"], **file_values["mapping"]}
        merged.update(file_values)
    merged.update(_from_env(env))
    merged.update(overrides)
    try:
        return Settings.model_validate(merged)
    except ValidationError as exc:
        raise SettingsError("; ".join(_describe(e) for e in exc.errors())) from None
