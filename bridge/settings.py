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

from pydantic import BaseModel, ConfigDict, Field, SecretStr, ValidationError, field_validator

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
    match: dict[str, str]
    category: str | None = None
    technician_group: str | None = None
    requester_email: str | None = None
    tags: tuple[str, ...] = ()


class MappingSettings(BaseModel):
    """How an alert becomes incident fields (see ``bridge/mapping.py``)."""

    model_config = ConfigDict(extra="forbid", frozen=True)
    subject_template: str = "[{{ severity | upper }}] {{ summary }}"
    description_template: str = (
        "{{ description }}\n\nSource: {{ source }}\nKey: {{ key }}\n"
        "{% for k, v in labels|dictsort %}{{ k }}={{ v }}\n{% endfor %}"
        "{% for link in links %}{{ link }}\n{% endfor %}"
    )
    subject_max_chars: int = Field(default=250, ge=20)
    description_max_chars: int = Field(default=32000, ge=100)
    truncation_marker: str = " …[truncated]"
    category: str = "Incident"
    requester_email: str = "alerts@example.com"
    technician_group: str | None = None
    tags: tuple[str, ...] = ("alert-bridge",)
    # severity -> (priority, urgency, impact) in the bridge's flavour-neutral words
    # LOW | MEDIUM | HIGH | URGENT and LOW | ON_USER | ON_DEPARTMENT | ON_BUSINESS.
    severity_priority: dict[str, str] = Field(
        default_factory=lambda: {
            "critical": "URGENT",
            "error": "HIGH",
            "warning": "MEDIUM",
            "info": "LOW",
        }
    )
    severity_urgency: dict[str, str] = Field(
        default_factory=lambda: {
            "critical": "URGENT",
            "error": "HIGH",
            "warning": "MEDIUM",
            "info": "LOW",
        }
    )
    severity_impact: dict[str, str] = Field(
        default_factory=lambda: {
            "critical": "ON_BUSINESS",
            "error": "ON_DEPARTMENT",
            "warning": "ON_USER",
            "info": "LOW",
        }
    )
    custom_fields: dict[str, str] = Field(default_factory=dict)
    routes: tuple[RoutingRule, ...] = ()


class Settings(BaseModel):
    """Every setting of the bridge; field names are the flattened TOML keys."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    # [itsm]
    itsm_url: str = ""
    itsm_flavor: Literal["itsm", "serviceops"] = "itsm"
    itsm_client_id: str = ""
    itsm_client_secret: SecretStr = SecretStr("")
    itsm_username: str = ""
    itsm_password: SecretStr = SecretStr("")
    itsm_api_key: SecretStr = SecretStr("")
    itsm_connect_timeout_s: float = Field(default=3.05, gt=0)
    itsm_read_timeout_s: float = Field(default=30.0, gt=0)
    itsm_verify_tls: bool = True
    itsm_ca_bundle: str = ""
    itsm_pool_size: int = Field(default=16, ge=1, le=512)
    itsm_token_margin_s: float = Field(default=60.0, ge=0)
    itsm_resolved_status: str = "Resolved"
    itsm_reopen_status: str = "Open"
    itsm_closed_statuses: tuple[str, ...] = ("Closed", "Cancelled", "Won't Fix")
    itsm_key_custom_field: str = ""
    itsm_ambiguous_create: Literal["search", "dead-letter", "create"] = "search"

    # [redis] / [broker]
    redis_url: str = ""
    redis_prefix: str = "bridge"
    broker_url: str = ""
    broker_visibility_timeout_s: int = Field(default=3600, ge=60)

    # [dedup]
    dedup_key_mode: Literal["identity", "group_by"] = "identity"
    dedup_group_by: tuple[str, ...] = ("alertname",)
    dedup_tenant: str = "default"
    dedup_update_interval_s: int = Field(default=300, ge=0)
    dedup_reopen_window_s: int = Field(default=3600, ge=0)
    dedup_on_resolve: Literal["resolve", "note", "nothing"] = "resolve"
    dedup_flap_threshold: int = Field(default=4, ge=2)
    dedup_flap_window_s: int = Field(default=1800, ge=1)
    dedup_flap_quiet_s: int = Field(default=600, ge=1)
    dedup_state_ttl_s: int = Field(default=7 * 86400, ge=60)
    dedup_claim_lease_s: int = Field(default=120, ge=5)
    dedup_lock_lease_s: int = Field(default=90, ge=5)
    dedup_note_occurrences: bool = True

    # [retry]
    retry_max_attempts: int = Field(default=8, ge=1)
    retry_max_age_s: int = Field(default=3600, ge=1)
    retry_base_delay_s: float = Field(default=1.0, gt=0)
    retry_max_delay_s: float = Field(default=300.0, gt=0)
    retry_after_cap_s: float = Field(default=300.0, gt=0)

    # [dlq]
    dlq_max_entries: int = Field(default=100_000, ge=100)

    # [http]
    http_host: str = "127.0.0.1"
    http_port: int = Field(default=8080, ge=0, le=65535)
    ingest_tokens: SecretStr = SecretStr("")
    http_max_body_bytes: int = Field(default=1024 * 1024, ge=1024)
    http_max_alerts: int = Field(default=1000, ge=1)

    # [worker]
    worker_concurrency: int = Field(default=2, ge=1)
    worker_metrics_port: int = Field(default=9808, ge=0, le=65535)

    # [log]
    log_format: Literal["auto", "json", "console"] = "auto"
    log_level: Literal["DEBUG", "INFO", "WARNING", "ERROR"] = "INFO"

    mapping: MappingSettings = Field(default_factory=MappingSettings)

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
        secrets = [self.itsm_client_secret, self.itsm_password, self.itsm_api_key]
        values = [s.get_secret_value() for s in secrets]
        values += [tok for tok, _ in parse_ingest_tokens(self.ingest_tokens.get_secret_value())]
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
    return f"{where}: {err['msg']}"


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
