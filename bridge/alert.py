"""The canonical alert every input format is turned into."""

from __future__ import annotations

import enum
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any


class Status(enum.StrEnum):
    FIRING = "firing"
    RESOLVED = "resolved"
    ACKNOWLEDGED = "acknowledged"


class Severity(enum.StrEnum):
    """Ordered from least to most severe; ``rank`` compares them."""

    INFO = "info"
    WARNING = "warning"
    ERROR = "error"
    CRITICAL = "critical"

    @property
    def rank(self) -> int:
        return _RANK[self]

    @classmethod
    def parse(cls, raw: str | None, default: Severity | None = None) -> Severity:
        """Map the many spellings monitoring tools use onto four levels."""
        if raw is None:
            return default or cls.WARNING
        value = _ALIASES.get(str(raw).strip().lower())
        if value is None:
            return default or cls.WARNING
        return value


_RANK = {Severity.INFO: 0, Severity.WARNING: 1, Severity.ERROR: 2, Severity.CRITICAL: 3}
_ALIASES = {
    "info": Severity.INFO,
    "informational": Severity.INFO,
    "information": Severity.INFO,
    "low": Severity.INFO,
    "none": Severity.INFO,
    "ok": Severity.INFO,
    "warning": Severity.WARNING,
    "warn": Severity.WARNING,
    "medium": Severity.WARNING,
    "minor": Severity.WARNING,
    "average": Severity.WARNING,
    "error": Severity.ERROR,
    "err": Severity.ERROR,
    "high": Severity.ERROR,
    "major": Severity.ERROR,
    "critical": Severity.CRITICAL,
    "crit": Severity.CRITICAL,
    "fatal": Severity.CRITICAL,
    "disaster": Severity.CRITICAL,
    "page": Severity.CRITICAL,
    "emergency": Severity.CRITICAL,
}


@dataclass(frozen=True, slots=True)
class Alert:
    """One alert, whatever format it arrived in.

    ``identity`` is the source's own identity of the alert (Alertmanager/Grafana
    fingerprint, PagerDuty dedup_key, generic key); the incident key is derived
    from it (or from labels) by ``bridge.keys``.
    """

    source: str
    identity: str
    status: Status
    severity: Severity
    summary: str
    description: str = ""
    labels: dict[str, str] = field(default_factory=dict)
    annotations: dict[str, str] = field(default_factory=dict)
    starts_at: datetime | None = None
    ends_at: datetime | None = None
    links: tuple[str, ...] = ()
    key: str = ""  # filled in by bridge.keys once the configured key rule is applied

    def to_dict(self) -> dict[str, Any]:
        return {
            "source": self.source,
            "identity": self.identity,
            "status": self.status.value,
            "severity": self.severity.value,
            "summary": self.summary,
            "description": self.description,
            "labels": dict(self.labels),
            "annotations": dict(self.annotations),
            "starts_at": self.starts_at.isoformat() if self.starts_at else None,
            "ends_at": self.ends_at.isoformat() if self.ends_at else None,
            "links": list(self.links),
            "key": self.key,
        }

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Alert:
        return cls(
            source=data["source"],
            identity=data["identity"],
            status=Status(data["status"]),
            severity=Severity(data["severity"]),
            summary=data["summary"],
            description=data.get("description", ""),
            labels=dict(data.get("labels") or {}),
            annotations=dict(data.get("annotations") or {}),
            starts_at=datetime.fromisoformat(data["starts_at"]) if data.get("starts_at") else None,
            ends_at=datetime.fromisoformat(data["ends_at"]) if data.get("ends_at") else None,
            links=tuple(data.get("links") or ()),
            key=data.get("key", ""),
        )
