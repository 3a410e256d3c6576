"""The Grafana dashboard: the essentials of Grafana's dashboard schema, over metrics that exist."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
from prometheus_client import CollectorRegistry

ROOT = Path(__file__).resolve().parents[2]
DASHBOARD = ROOT / "dashboards" / "bridge.json"
_METRIC = re.compile(r"\b(bridge_[a-z0-9_]+)\b")
_HISTOGRAM_SERIES = ("_bucket", "_count", "_sum")


class _EmptyStore:
    def count(self) -> int:
        return 0


def defined_metrics() -> dict[str, str]:
    """Every series name the code exposes -> its family's type, from the real registries."""
    from bridge.ingest import _IngestMetrics
    from bridge.metrics import DeadLetterGauge, Metrics

    registry = CollectorRegistry()
    Metrics(registry=registry)
    registry.register(DeadLetterGauge(_EmptyStore()))
    names: dict[str, str] = {}
    for source in (registry, _IngestMetrics().registry):
        for family in source.collect():
            # A labelled series appears only once used: name the series from the family.
            series = {
                "counter": [f"{family.name}_total"],
                "histogram": [f"{family.name}{s}" for s in _HISTOGRAM_SERIES],
            }.get(family.type, [family.name])
            for name in series:
                names.setdefault(name, family.type)
    return names


def metric_names(expr: str) -> set[str]:
    """The bridge_* names an expression reads (label values and $variables excluded)."""
    without_strings = re.sub(r'"[^"]*"', '""', expr)
    return set(_METRIC.findall(without_strings))


@pytest.fixture(scope="module")
def dashboard() -> dict:
    return json.loads(DASHBOARD.read_text())


def _panels(dashboard: dict) -> list[dict]:
    found = []
    for panel in dashboard["panels"]:
        found.append(panel)
        found.extend(panel.get("panels", []))
    return found


def test_top_level_fields_of_the_dashboard_schema(dashboard):
    assert isinstance(dashboard["schemaVersion"], int) and dashboard["schemaVersion"] >= 36
    assert dashboard["title"]
    assert re.fullmatch(r"[A-Za-z0-9_-]{1,40}", dashboard["uid"])
    assert dashboard.get("id") is None, "an exported dashboard carries no database id"
    assert {"from", "to"} <= set(dashboard["time"])
    assert isinstance(dashboard["panels"], list) and dashboard["panels"]
    assert isinstance(dashboard["templating"]["list"], list)


def test_a_prometheus_datasource_variable_feeds_every_panel_and_query(dashboard):
    variables = {v["name"]: v for v in dashboard["templating"]["list"]}
    ds = variables["datasource"]
    assert ds["type"] == "datasource" and ds["query"] == "prometheus"
    for panel in _panels(dashboard):
        if panel["type"] == "row":
            continue
        assert panel["datasource"] == {"type": "prometheus", "uid": "${datasource}"}, panel["title"]
        for target in panel["targets"]:
            assert target["datasource"]["uid"] == "${datasource}"
    for var in variables.values():
        if var["type"] == "query":
            assert var["datasource"]["uid"] == "${datasource}"


def test_panels_have_type_targets_and_a_grid_position(dashboard):
    for panel in _panels(dashboard):
        assert panel["type"] in {"row", "timeseries", "stat", "gauge", "table", "bargauge"}
        pos = panel["gridPos"]
        assert set(pos) == {"h", "w", "x", "y"}
        assert all(isinstance(pos[k], int) and pos[k] >= 0 for k in pos)
        assert 1 <= pos["w"] <= 24 and pos["x"] + pos["w"] <= 24 and pos["h"] >= 1
        if panel["type"] == "row":
            continue
        assert panel["title"]
        assert panel["targets"], panel["title"]
        ref_ids = [t["refId"] for t in panel["targets"]]
        assert len(ref_ids) == len(set(ref_ids)), panel["title"]
        assert all(t["expr"].strip() for t in panel["targets"])


def test_panel_ids_are_unique(dashboard):
    ids = [p["id"] for p in _panels(dashboard)]
    assert all(isinstance(i, int) for i in ids)
    assert len(ids) == len(set(ids))


def test_panels_do_not_overlap(dashboard):
    taken: set[tuple[int, int]] = set()
    for panel in _panels(dashboard):
        pos = panel["gridPos"]
        cells = {
            (x, y)
            for x in range(pos["x"], pos["x"] + pos["w"])
            for y in range(pos["y"], pos["y"] + pos["h"])
        }
        assert not cells & taken, f"{panel['title']} overlaps another panel"
        taken |= cells


def test_every_expression_reads_a_metric_the_code_defines(dashboard):
    defined = defined_metrics()
    for panel in _panels(dashboard):
        for target in panel.get("targets", []):
            names = metric_names(target["expr"])
            assert names, f"{panel['title']}: no bridge metric in {target['expr']}"
            unknown = names - set(defined)
            assert not unknown, f"{panel['title']}: {unknown} is not defined by the code"
            for name in names:
                if name.endswith(_HISTOGRAM_SERIES) and defined[name] == "histogram":
                    assert "histogram_quantile" in target["expr"] or name.endswith(
                        ("_count", "_sum")
                    )


def test_the_dashboard_covers_every_metric_family(dashboard):
    exprs = " ".join(t["expr"] for p in _panels(dashboard) for t in p.get("targets", []))
    read = metric_names(exprs)
    uncovered = sorted(
        name
        for name in defined_metrics()
        if name.endswith(("_total", "_bucket")) or name == "bridge_dead_letters"
    )
    uncovered = [n for n in uncovered if n not in read]
    assert not uncovered, f"metrics without a panel: {uncovered}"
