"""Grafana unified-alerting webhook payloads.

The alert list has Alertmanager's shape plus Grafana's extras: ``silenceURL``,
``dashboardURL`` and ``panelURL`` become links (after ``generatorURL``), and
``valueString`` (the query values that fired) is kept as the annotation
``valueString`` unless the rule already defines one of that name. The numeric
``values`` object is not kept: ``valueString`` carries the same numbers as text.
Grafana's ``version`` ("1") is not checked; ``alerts`` is what matters.
"""

from __future__ import annotations

from typing import Any

from bridge.alert import Alert
from bridge.sources.alertmanager import GroupInfo, alerts_of, group_of
from bridge.sources.errors import ROOT, expect_object

SOURCE = "grafana"
_LINKS = ("silenceURL", "dashboardURL", "panelURL")


def parse(payload: Any) -> list[Alert]:
    """The alerts of one Grafana webhook; raises InvalidPayload naming the field."""
    return parse_group(payload)[0]


def parse_group(payload: Any) -> tuple[list[Alert], GroupInfo]:
    """The alerts of one Grafana webhook and what it says about their group."""
    body = expect_object(payload, ROOT)
    return alerts_of(body, SOURCE, _LINKS, "valueString"), group_of(body)
