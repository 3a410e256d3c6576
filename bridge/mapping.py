"""Alert -> incident fields, driven by ``[mapping]`` in the configuration.

Pure: no I/O. A ``Mapper`` is built once from ``MappingSettings`` (templates are
compiled there, so a bad template is a configuration error at start-up) and then
turns each new alert into an ``IncidentDraft`` and each later event into a short
note text.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any, TypeVar

import structlog
from jinja2 import ChainableUndefined, Template, TemplateSyntaxError
from jinja2.sandbox import SandboxedEnvironment

from bridge.alert import Alert, Severity
from bridge.itsm.model import Impact, IncidentDraft, Priority
from bridge.settings import MappingSettings

_log = structlog.get_logger(__name__)
_E = TypeVar("_E", Priority, Impact)

# Last resort when neither the alert's severity nor "warning" has a row in a map.
_FALLBACK_PRIORITY = Priority.MEDIUM
_FALLBACK_URGENCY = Priority.MEDIUM
_FALLBACK_IMPACT = Impact.ON_USER
_FALLBACK_ROW = Severity.WARNING

_LINE_BREAKS = re.compile(r"\s*[\r\n\u2028\u2029]+\s*")


class MappingError(Exception):
    """The mapping configuration is invalid; the message starts with the setting's name."""


@dataclass(frozen=True, slots=True)
class Rendering:
    """A draft plus the templates that failed and were replaced by the plain fallback.

    ``rendering_errors`` holds one ``"<setting>: <error>"`` per failed template;
    the draft is complete either way.
    """

    draft: IncidentDraft
    rendering_errors: tuple[str, ...] = ()


class _LabelView(dict[str, str]):
    """Labels/annotations in templates: ``labels.items`` is the label "items" if there is one."""


class _Environment(SandboxedEnvironment):
    def getattr(self, obj: Any, attribute: str) -> Any:
        # Jinja prefers Python attributes over keys, which would hide labels named
        # like dict methods (``labels.values``); label data wins here.
        if isinstance(obj, _LabelView) and attribute in obj:
            return obj[attribute]
        return super().getattr(obj, attribute)


class Mapper:
    """Builds incident drafts and note texts from alerts, per ``MappingSettings``."""

    def __init__(self, settings: MappingSettings) -> None:
        self._settings = settings
        env = _Environment(
            autoescape=False, undefined=ChainableUndefined, keep_trailing_newline=True
        )
        self._subject = _compile(env, "mapping.subject_template", settings.subject_template)
        self._description = _compile(
            env, "mapping.description_template", settings.description_template
        )
        self._custom_fields = {
            name: _compile(env, f"mapping.custom_fields.{name}", source)
            for name, source in settings.custom_fields.items()
        }
        self._priority = _severity_map(
            "mapping.severity_priority", settings.severity_priority, Priority
        )
        self._urgency = _severity_map(
            "mapping.severity_urgency", settings.severity_urgency, Priority
        )
        self._impact = _severity_map("mapping.severity_impact", settings.severity_impact, Impact)

    def draft(self, alert: Alert) -> IncidentDraft:
        """The incident fields for a new incident; never fails on a template error."""
        return self.render(alert).draft

    def render(self, alert: Alert) -> Rendering:
        """Like ``draft``, also naming each template that failed and fell back to plain text."""
        s = self._settings
        context = _context(alert)
        errors: list[str] = []

        subject = self._render(self._subject, "mapping.subject_template", context, errors)
        subject = _single_line(subject) if subject is not None else ""
        if not subject:
            if not errors:
                errors.append("mapping.subject_template: rendered an empty subject")
            subject = _single_line(_plain_subject(alert))
        description = self._render(
            self._description, "mapping.description_template", context, errors
        )
        # Outer blank lines (an empty alert description in the default template) carry nothing.
        description = (
            description if description is not None else _plain_description(alert)
        ).strip()

        custom_fields: dict[str, str] = {}
        for name, template in self._custom_fields.items():
            value = self._render(template, f"mapping.custom_fields.{name}", context, errors)
            custom_fields[name] = value if value is not None else ""

        rule = next((r for r in s.routes if _matches(r.match, alert.labels)), None)
        tags = _unique((*s.tags, *(rule.tags if rule else ())))
        draft = IncidentDraft(
            subject=_truncate(subject, s.subject_max_chars, s.truncation_marker),
            description=_truncate(description, s.description_max_chars, s.truncation_marker),
            requester_email=(rule.requester_email if rule else None) or s.requester_email,
            category=(rule.category if rule else None) or s.category,
            priority=self.priority_for(alert.severity),
            urgency=_lookup(self._urgency, alert.severity, _FALLBACK_URGENCY),
            impact=_lookup(self._impact, alert.severity, _FALLBACK_IMPACT),
            tags=tags,
            technician_group=(rule.technician_group if rule else None) or s.technician_group,
            custom_fields=custom_fields,
        )
        if errors:
            _log.warning(
                "mapping_fallback", key=alert.key, source=alert.source, errors=list(errors)
            )
        return Rendering(draft=draft, rendering_errors=tuple(errors))

    def priority_for(self, severity: Severity | str) -> Priority:
        """The configured priority for a severity (unknown -> the "warning" row -> MEDIUM)."""
        return _lookup(self._priority, Severity.parse(str(severity)), _FALLBACK_PRIORITY)

    # -- notes ------------------------------------------------------------------------

    def note_for_occurrences(
        self, count: int, since: datetime, *, now: datetime | None = None
    ) -> str:
        """``"41 more occurrences since 10:02 UTC."`` (dated when ``now`` is another day)."""
        noun = "occurrence" if count == 1 else "occurrences"
        return f"{count} more {noun} since {_when(since, now)}."

    def note_for_severity_change(self, old: Severity, new: Severity) -> str:
        """Whether severity rose or fell, and the effect on priority (raised, never lowered)."""
        if new.rank == old.rank:
            return f"Severity unchanged ({new.value})."
        old_p, new_p = self.priority_for(old), self.priority_for(new)
        if new.rank > old.rank:
            text = f"Severity rose from {old.value} to {new.value}"
            if new_p.rank > old_p.rank:
                return f"{text}; priority raised from {old_p.value} to {new_p.value}."
            return f"{text}; priority stays {old_p.value}."
        return (
            f"Severity fell from {old.value} to {new.value}; priority is not lowered automatically."
        )

    def note_for_relapse(
        self,
        alert: Alert,
        resolved_at: datetime | None = None,
        *,
        now: datetime | None = None,
    ) -> str:
        """The alert fired again after it had been resolved; the incident is reopened."""
        fired = f" at {_when(alert.starts_at, now)}" if alert.starts_at else ""
        was = f" (resolved at {_when(resolved_at, now)})" if resolved_at else ""
        return f"Alert firing again{fired}{was}; incident reopened: {self._note_summary(alert)}"

    def note_for_flapping(self, cycles: int, window_s: int) -> str:
        """The alert keeps switching between firing and resolved; updates are held."""
        noun = "cycle" if cycles == 1 else "cycles"
        return (
            f"Alert is flapping: {cycles} firing/resolved {noun} within "
            f"{_duration(window_s)}. Holding the incident open and pausing updates "
            "until the alert settles."
        )

    def note_for_resolution(self, alert: Alert, *, now: datetime | None = None) -> str:
        """The alert recovered: when, after how long, and what it was."""
        text = "Alert resolved"
        if alert.ends_at:
            text += f" at {_when(alert.ends_at, now)}"
            if alert.starts_at and alert.ends_at > alert.starts_at:
                seconds = int((alert.ends_at - alert.starts_at).total_seconds())
                text += f" after {_duration(seconds)}"
        return f"{text} (source: {alert.source}): {self._note_summary(alert)}"

    # -- internals --------------------------------------------------------------------

    def _note_summary(self, alert: Alert) -> str:
        s = self._settings
        summary = _single_line(alert.summary) or alert.identity or alert.key
        return _truncate(summary, s.subject_max_chars, s.truncation_marker)

    @staticmethod
    def _render(
        template: Template, setting: str, context: Mapping[str, Any], errors: list[str]
    ) -> str | None:
        try:
            return template.render(context)
        except Exception as exc:  # any template failure falls back; the alert is never dropped
            errors.append(f"{setting}: {type(exc).__name__}: {exc}")
            return None


def _compile(env: SandboxedEnvironment, setting: str, source: str) -> Template:
    try:
        return env.from_string(source)
    except TemplateSyntaxError as exc:
        raise MappingError(f"{setting}: {exc.message} (line {exc.lineno})") from None


def _severity_map(setting: str, raw: Mapping[str, str], kind: type[_E]) -> dict[Severity, _E]:
    allowed = ", ".join(m.value for m in kind)
    levels = ", ".join(s.value for s in Severity)
    table: dict[Severity, _E] = {}
    for name, value in raw.items():
        try:
            severity = Severity(name.strip().lower())
        except ValueError:
            raise MappingError(
                f"{setting}.{name}: unknown severity {name!r} (expected one of {levels})"
            ) from None
        try:
            table[severity] = kind(value.strip().upper())
        except ValueError:
            raise MappingError(
                f"{setting}.{name}: unknown value {value!r} (expected one of {allowed})"
            ) from None
    return table


def _lookup(table: Mapping[Severity, _E], severity: Severity, last: _E) -> _E:
    return table.get(severity) or table.get(_FALLBACK_ROW) or last


def _context(alert: Alert) -> dict[str, Any]:
    return {
        "source": alert.source,
        "identity": alert.identity,
        "key": alert.key,
        "status": alert.status.value,
        "severity": alert.severity.value,
        "summary": alert.summary,
        "description": alert.description,
        "labels": _LabelView(alert.labels),
        "annotations": _LabelView(alert.annotations),
        "starts_at": alert.starts_at,
        "ends_at": alert.ends_at,
        "links": list(alert.links),
    }


def _plain_subject(alert: Alert) -> str:
    what = alert.summary.strip() or alert.labels.get("alertname") or alert.identity or alert.key
    return f"[{alert.severity.value.upper()}] {what}"


def _plain_description(alert: Alert) -> str:
    lines = [alert.description, "", f"Source: {alert.source}", f"Key: {alert.key}"]
    lines += [f"{k}={v}" for k, v in sorted(alert.labels.items())]
    lines += list(alert.links)
    return "\n".join(lines)


def _matches(match: Mapping[str, str], labels: Mapping[str, str]) -> bool:
    return all(labels.get(name) == value for name, value in match.items())


def _unique(items: tuple[str, ...]) -> tuple[str, ...]:
    return tuple(dict.fromkeys(items))


def _single_line(text: str) -> str:
    return _LINE_BREAKS.sub(" ", text).strip()


def _truncate(text: str, limit: int, marker: str) -> str:
    """Cut ``text`` so that it plus ``marker`` fits in ``limit`` characters."""
    if len(text) <= limit:
        return text
    if len(marker) >= limit:
        return text[:limit]
    return text[: limit - len(marker)].rstrip() + marker


def _when(moment: datetime, now: datetime | None) -> str:
    moment = _utc(moment)
    if now is not None and _utc(now).date() != moment.date():
        return moment.strftime("%Y-%m-%d %H:%M UTC")
    return moment.strftime("%H:%M UTC")


def _utc(moment: datetime) -> datetime:
    # Naive datetimes are taken to be UTC, as every source adapter produces them.
    return moment.replace(tzinfo=UTC) if moment.tzinfo is None else moment.astimezone(UTC)


def _duration(seconds: int) -> str:
    if seconds < 60:
        return f"{seconds} s"
    minutes = seconds // 60
    if minutes < 60:
        return f"{minutes} min"
    hours, minutes = divmod(minutes, 60)
    if hours < 48:
        return f"{hours} h {minutes} min" if minutes else f"{hours} h"
    days, hours = divmod(hours, 24)
    return f"{days} d {hours} h" if hours else f"{days} d"
