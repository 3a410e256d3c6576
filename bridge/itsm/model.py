"""Incident values in the bridge's own, flavour-neutral words.

The client translates them to each API generation (Gen A ``impact``/``priority``
UPPERCASE enums, Gen B ``impactName``/``priorityName`` Title-case names).
"""

from __future__ import annotations

import enum
from dataclasses import dataclass, field


class Priority(enum.StrEnum):
    """Used for priority and urgency alike."""

    LOW = "LOW"
    MEDIUM = "MEDIUM"
    HIGH = "HIGH"
    URGENT = "URGENT"

    @property
    def rank(self) -> int:
        return list(Priority).index(self)


class Impact(enum.StrEnum):
    LOW = "LOW"
    ON_USER = "ON_USER"
    ON_DEPARTMENT = "ON_DEPARTMENT"
    ON_BUSINESS = "ON_BUSINESS"


@dataclass(frozen=True, slots=True)
class IncidentDraft:
    """What the bridge wants an incident to say; built by ``bridge.mapping``."""

    subject: str
    description: str
    requester_email: str
    category: str
    priority: Priority
    urgency: Priority
    impact: Impact
    tags: tuple[str, ...] = ()
    technician_group: str | None = None
    custom_fields: dict[str, str] = field(default_factory=dict)


@dataclass(frozen=True, slots=True)
class IncidentRef:
    """How the bridge finds an incident again: numeric id and display number (INC-46)."""

    id: int
    display: str | None = None

    def __str__(self) -> str:
        return self.display or f"#{self.id}"


@dataclass(frozen=True, slots=True)
class Incident:
    """An incident as read back from the ITSM."""

    ref: IncidentRef
    subject: str
    status: str
    priority: Priority | None
    urgency: Priority | None
    tags: tuple[str, ...]
    created_ms: int | None = None
