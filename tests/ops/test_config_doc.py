"""The configuration reference is generated from the settings model and kept in sync."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

from bridge import config_doc
from bridge.settings import MappingSettings, RoutingRule, Settings, env_name

ROOT = Path(__file__).resolve().parents[2]
REFERENCE = ROOT / "docs" / "configuration.md"


def test_committed_reference_matches_the_settings_model():
    expected = config_doc.render()
    assert REFERENCE.read_text() == expected, (
        "docs/configuration.md is out of date: run "
        "`python -m bridge.config_doc > docs/configuration.md`"
    )


def test_module_prints_the_reference():
    out = subprocess.run(
        [sys.executable, "-m", "bridge.config_doc"],
        capture_output=True,
        text=True,
        check=True,
        cwd=ROOT,
    ).stdout
    assert out == config_doc.render()


def test_every_field_has_a_description():
    for model in (Settings, MappingSettings, RoutingRule):
        missing = [n for n, f in model.model_fields.items() if not (f.description or "").strip()]
        assert not missing, f"{model.__name__} fields without description=: {missing}"


def test_every_setting_appears_with_its_variable_and_toml_key():
    text = config_doc.render()
    for name in Settings.model_fields:
        if name == "mapping":
            continue
        section, key = config_doc.section_of(name)
        assert f"## [{section}]" in text
        assert f"| `{key}` | `{env_name(name)}`" in text, name
    for name in MappingSettings.model_fields:
        assert f"| `{name}` | — |" in text, name


def test_secrets_are_marked_and_offer_a_file_variable():
    text = config_doc.render()
    for name in ("itsm_client_secret", "itsm_password", "itsm_api_key", "ingest_tokens"):
        line = next(ln for ln in text.splitlines() if f"`{env_name(name)}`" in ln)
        assert f"`{env_name(name)}_FILE`" in line
        assert "*secret*" in line


def test_defaults_and_bounds_are_shown():
    text = config_doc.render()
    line = next(ln for ln in text.splitlines() if "`BRIDGE_ITSM_POOL_SIZE`" in ln)
    assert "`16`" in line
    assert "≥ 1" in line and "≤ 512" in line
    line = next(ln for ln in text.splitlines() if "`BRIDGE_ITSM_FLAVOR`" in ln)
    assert '`"itsm"` \\| `"serviceops"`' in line
