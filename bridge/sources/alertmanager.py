"""Alertmanager webhook payloads (version 4).

Every alert of the group becomes one ``Alert`` whose identity is Alertmanager's
fingerprint. An alert without a fingerprint (hand-made payloads; Alertmanager
always sends one) gets a stable one derived from its labels, see
``errors.label_fingerprint``. The group's own fields (receiver, groupKey,
groupLabels, truncatedAlerts) come back from ``parse_group`` as a ``GroupInfo``.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

from bridge.alert import Alert, Severity, Status
from bridge.sources.errors import (
    ROOT,
    InvalidPayload,
    expect_list,
    expect_object,
    label_fingerprint,
    optional_str,
    optional_string_map,
    string_map,
    timestamp,
    type_name,
)

SOURCE = "alertmanager"
_STATUS = {"firing": Status.FIRING, "resolved": Status.RESOLVED}


@dataclass(frozen=True, slots=True)
class GroupInfo:
    """What a webhook says about the whole group rather than one alert.

    ``truncated_alerts`` > 0 means the sender left alerts out (``max_alerts``): an
    alert missing from this delivery is then no sign that it resolved.
    """

    receiver: str = ""
    group_key: str = ""
    group_labels: dict[str, str] = field(default_factory=dict)
    truncated_alerts: int = 0


def parse(payload: Any) -> list[Alert]:
    """The alerts of one Alertmanager webhook; raises InvalidPayload naming the field."""
    return parse_group(payload)[0]


def parse_group(payload: Any) -> tuple[list[Alert], GroupInfo]:
    """The alerts of one Alertmanager webhook and what it says about their group."""
    body = expect_object(payload, ROOT)
    version = body.get("version")
    if version is None:
        raise InvalidPayload("version", 'is required (Alertmanager webhooks send "4")')
    if version != "4":
        shown = repr(version) if type(version) is str else type_name(version)
        raise InvalidPayload("version", f'unsupported version {shown}; expected "4"')
    return alerts_of(body, SOURCE), group_of(body)


def group_of(body: dict[str, Any]) -> GroupInfo:
    truncated = body.get("truncatedAlerts", 0)
    if truncated is None:
        truncated = 0
    if type(truncated) is not int or truncated < 0:
        raise InvalidPayload("truncatedAlerts", "expected a non-negative integer")
    return GroupInfo(
        receiver=optional_str(body, "receiver", ""),
        group_key=optional_str(body, "groupKey", ""),
        group_labels=optional_string_map(body, "groupLabels", ""),
        truncated_alerts=truncated,
    )


def alerts_of(
    body: dict[str, Any],
    source: str,
    extra_links: tuple[str, ...] = (),
    value_annotation: str = "",
) -> list[Alert]:
    """Parse ``body["alerts"]`` in the shape Alertmanager and Grafana share.

    ``extra_links`` names further per-alert URL fields to keep as links, in order;
    a non-empty ``value_annotation`` names a per-alert string field copied into the
    annotations under the same name, unless they already have one.
    """
    if body.get("alerts") is None:
        raise InvalidPayload("alerts", "is required")
    raw_alerts = expect_list(body["alerts"], "alerts")
    # times read once per payload: the alerts of one group often share them
    stamps: dict[str, datetime | None] = {}
    return [
        _alert(raw, f"alerts[{i}]", source, extra_links, value_annotation, stamps)
        for i, raw in enumerate(raw_alerts)
    ]


def _stamp(value: Any, field: str, stamps: dict[str, datetime | None]) -> datetime | None:
    if type(value) is str:
        if value in stamps:
            return stamps[value]
        parsed = stamps[value] = timestamp(value, field)
        return parsed
    return timestamp(value, field)


def _alert(
    raw: Any,
    path: str,
    source: str,
    extra_links: tuple[str, ...],
    value_annotation: str,
    stamps: dict[str, datetime | None],
) -> Alert:
    item = expect_object(raw, path)
    raw_status = item.get("status")
    status = _STATUS.get(raw_status) if type(raw_status) is str else None
    if status is None:
        if raw_status is None:
            raise InvalidPayload(f"{path}.status", "is required (firing or resolved)")
        raise InvalidPayload(f"{path}.status", "must be firing or resolved")
    if item.get("labels") is None:
        raise InvalidPayload(f"{path}.labels", "is required")
    labels = string_map(item["labels"], f"{path}.labels")
    annotations = optional_string_map(item, "annotations", path)
    if value_annotation:
        value = optional_str(item, value_annotation, path)
        if value:
            annotations.setdefault(value_annotation, value)
    fingerprint = optional_str(item, "fingerprint", path)
    if not fingerprint:
        if not labels:
            raise InvalidPayload(
                f"{path}.fingerprint", "is required when the alert has no labels to derive it from"
            )
        fingerprint = label_fingerprint(labels)
    links = [optional_str(item, "generatorURL", path)]
    links += [optional_str(item, name, path) for name in extra_links]
    links.append(annotations.get("runbook_url", ""))
    return Alert(
        source=source,
        identity=fingerprint,
        status=status,
        severity=Severity.parse(labels.get("severity")),
        summary=annotations.get("summary") or labels.get("alertname") or f"alert {fingerprint}",
        description=annotations.get("description", ""),
        labels=labels,
        annotations=annotations,
        starts_at=_stamp(item.get("startsAt"), f"{path}.startsAt", stamps),
        ends_at=_stamp(item.get("endsAt"), f"{path}.endsAt", stamps),
        links=tuple(dict.fromkeys(link for link in links if link)),
    )
