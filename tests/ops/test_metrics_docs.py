"""The metrics documentation names every metric the code defines; the exposition parses."""

from __future__ import annotations

from pathlib import Path

from prometheus_client import CollectorRegistry

from tests.ops.test_dashboard import defined_metrics

ROOT = Path(__file__).resolve().parents[2]


def _families() -> set[str]:
    names = set()
    for name, kind in defined_metrics().items():
        if kind == "histogram":
            name = name.rsplit("_", 1)[0]
        names.add(name)
    return names


def test_every_metric_is_documented():
    text = (ROOT / "docs" / "metrics.md").read_text()
    missing = sorted(name for name in _families() if f"`{name}`" not in text)
    assert not missing, f"docs/metrics.md does not describe {missing}"


def test_the_readme_points_to_the_metrics_and_rules():
    readme = (ROOT / "README.md").read_text()
    assert "## Metrics and alerting rules" in readme
    assert "docs/metrics.md" in readme and "docs/alerts.yml" in readme
    assert "## Operating the bridge" in readme and "docs/runbook.md" in readme


class _Store:
    def count(self) -> int:
        return 4


def test_worker_metrics_parse_in_the_openmetrics_format_prometheus_asks_for():
    from prometheus_client.openmetrics.exposition import generate_latest
    from prometheus_client.openmetrics.parser import text_string_to_metric_families

    from bridge.metrics import DeadLetterGauge, Metrics

    registry = CollectorRegistry()
    Metrics(registry=registry)
    registry.register(DeadLetterGauge(_Store()))
    families = list(text_string_to_metric_families(generate_latest(registry).decode()))
    assert any(f.name == "bridge_decisions" for f in families)
