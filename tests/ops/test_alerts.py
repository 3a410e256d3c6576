"""The example alerting rules: well-formed, over metrics the code defines, and they fire."""

from __future__ import annotations

import re
import shutil
import subprocess
from pathlib import Path

import pytest
import yaml

from tests.ops.test_dashboard import defined_metrics, metric_names

ROOT = Path(__file__).resolve().parents[2]
RULES = ROOT / "docs" / "alerts.yml"
RUNBOOK = ROOT / "docs" / "runbook.md"
PROMTOOL = shutil.which("promtool")
needs_promtool = pytest.mark.skipif(
    PROMTOOL is None, reason="promtool is not installed (Debian package prometheus)"
)

# alert -> (evaluation time, input series while it should fire, input series while healthy)
SCENARIOS: dict[str, tuple[str, list[tuple[str, str]], list[tuple[str, str]]]] = {
    "BridgeDeadLettersGrowing": (
        "5m",
        [('bridge_dead_letters_total{reason="itsm_rejected"}', "0 0 0 1 1 1")],
        [('bridge_dead_letters_total{reason="itsm_rejected"}', "3x6")],
    ),
    "BridgeDeadLettersPiling": (
        "5m",
        [('bridge_dead_letters_current{instance="w1"}', "150x6")],
        [('bridge_dead_letters_current{instance="w1"}', "3x6")],
    ),
    "BridgeItsmFailing": (
        "10m",
        [
            ('bridge_itsm_requests_total{operation="create",status="503"}', "0+10x10"),
            ('bridge_itsm_requests_total{operation="create",status="201"}', "0+1x10"),
        ],
        [
            ('bridge_itsm_requests_total{operation="create",status="503"}', "0x10"),
            ('bridge_itsm_requests_total{operation="create",status="201"}', "0+10x10"),
        ],
    ),
    "BridgeItsmNoEffects": (
        "35m",
        [
            ('bridge_decisions_total{decision="create"}', "0+5x40"),
            ('bridge_itsm_effects_total{effect="created"}', "0x40"),
        ],
        [
            ('bridge_decisions_total{decision="create"}', "0+5x40"),
            ('bridge_itsm_effects_total{effect="created"}', "0+5x40"),
        ],
    ),
    "BridgeTokenFailures": (
        "10m",
        [('bridge_itsm_requests_total{operation="token_password",status="401"}', "0+1x10")],
        [('bridge_itsm_requests_total{operation="token_password",status="200"}', "0+1x10")],
    ),
    "BridgeItsmAuthRejected": (
        "10m",
        [('bridge_itsm_failures_total{reason="itsm_auth"}', "0+1x10")],
        [('bridge_itsm_failures_total{reason="itsm_transient"}', "0+1x10")],
    ),
    "BridgeTokenChurn": (
        "65m",
        [('bridge_token_requests_total{grant="password"}', "0+2x70")],
        [('bridge_token_requests_total{grant="password"}', "0+0.1x70")],
    ),
    "BridgeIngestBrokerUnavailable": (
        "5m",
        [
            (
                'bridge_alerts_rejected_total{source="alertmanager",reason="broker_unavailable"}',
                "0+1x6",
            )
        ],
        [('bridge_alerts_rejected_total{source="alertmanager",reason="throttled"}', "0+1x6")],
    ),
    "BridgeSlowToItsm": (
        "20m",
        [
            ('bridge_alert_to_itsm_seconds_bucket{le="60"}', "0x20"),
            ('bridge_alert_to_itsm_seconds_bucket{le="300"}', "0+10x20"),
            ('bridge_alert_to_itsm_seconds_bucket{le="+Inf"}', "0+10x20"),
        ],
        [
            ('bridge_alert_to_itsm_seconds_bucket{le="60"}', "0+10x20"),
            ('bridge_alert_to_itsm_seconds_bucket{le="300"}', "0+10x20"),
            ('bridge_alert_to_itsm_seconds_bucket{le="+Inf"}', "0+10x20"),
        ],
    ),
    "BridgeDown": (
        "5m",
        [('up{job="bridge-worker",instance="w1"}', "0x6")],
        [('up{job="bridge-worker",instance="w1"}', "1x6")],
    ),
}


def _rules() -> list[dict]:
    doc = yaml.safe_load(RULES.read_text())
    return [rule for group in doc["groups"] for rule in group["rules"]]


def _anchor(heading: str) -> str:
    """GitHub's anchor for a Markdown heading."""
    slug = re.sub(r"[^\w\- ]", "", heading.strip().lower())
    return slug.replace(" ", "-")


def test_rules_file_has_the_shape_prometheus_loads():
    doc = yaml.safe_load(RULES.read_text())
    assert set(doc) == {"groups"}
    names = [g["name"] for g in doc["groups"]]
    assert len(names) == len(set(names))
    for group in doc["groups"]:
        assert set(group) <= {"name", "interval", "rules", "limit"}
        for rule in group["rules"]:
            assert set(rule) <= {"alert", "expr", "for", "labels", "annotations"}
            assert re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]*", rule["alert"])
            assert isinstance(rule["expr"], str) and rule["expr"].strip()
            if "for" in rule:
                assert re.fullmatch(r"\d+[smhd]", rule["for"])
            assert rule["labels"]["severity"] in {"warning", "critical"}
            assert {"summary", "description", "runbook"} <= set(rule["annotations"])


def test_the_rules_the_operators_asked_for_exist():
    alerts = {rule["alert"] for rule in _rules()}
    assert {"BridgeDeadLettersGrowing", "BridgeItsmFailing", "BridgeTokenFailures"} <= alerts


def test_every_rule_reads_metrics_the_code_defines():
    defined = set(defined_metrics()) | {"up"}
    for rule in _rules():
        names = metric_names(rule["expr"]) | ({"up"} if "up{" in rule["expr"] else set())
        assert names, rule["alert"]
        assert names <= defined, f"{rule['alert']}: {names - defined} is not defined by the code"


def test_every_rule_has_a_runbook_section():
    anchors = {
        _anchor(line.lstrip("#"))
        for line in RUNBOOK.read_text().splitlines()
        if line.startswith("#")
    }
    for rule in _rules():
        target = rule["annotations"]["runbook"]
        assert target.startswith("docs/runbook.md#"), rule["alert"]
        assert target.split("#", 1)[1] in anchors, f"{rule['alert']}: no heading for {target}"


def test_every_rule_has_a_firing_scenario():
    assert {rule["alert"] for rule in _rules()} == set(SCENARIOS)


@needs_promtool
def test_promtool_accepts_the_rules():
    done = subprocess.run(
        [PROMTOOL, "check", "rules", str(RULES)], capture_output=True, text=True, timeout=60
    )
    assert done.returncode == 0, done.stdout + done.stderr


def _series(items: list[tuple[str, str]]) -> list[dict[str, str]]:
    return [{"series": s, "values": v} for s, v in items]


@needs_promtool
def test_each_rule_fires_on_its_failure_and_stays_quiet_when_healthy(tmp_path):
    tests = []
    for rule in _rules():
        at, firing, healthy = SCENARIOS[rule["alert"]]
        expr = f"count({rule['expr']})"
        for series, expected in ((firing, [{"labels": "{}", "value": 1}]), (healthy, [])):
            tests.append(
                {
                    "name": f"{rule['alert']} {'fires' if expected else 'quiet'}",
                    "interval": "1m",
                    "input_series": _series(series),
                    "promql_expr_test": [{"expr": expr, "eval_time": at, "exp_samples": expected}],
                }
            )
    spec = tmp_path / "alerts_test.yml"
    spec.write_text(yaml.safe_dump({"rule_files": [str(RULES)], "tests": tests}))
    done = subprocess.run(
        [PROMTOOL, "test", "rules", str(spec)], capture_output=True, text=True, timeout=120
    )
    assert done.returncode == 0, done.stdout + done.stderr
