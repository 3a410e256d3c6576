"""Cross-field rules of the settings."""

from __future__ import annotations

import pytest

from bridge.settings import SettingsError, load_settings


def test_a_visibility_timeout_shorter_than_a_retry_delay_is_refused():
    with pytest.raises(SettingsError, match="visibility_timeout_s"):
        load_settings(env={"BRIDGE_BROKER_VISIBILITY_TIMEOUT_S": "100"})


def test_the_defaults_are_consistent():
    load_settings(env={})
