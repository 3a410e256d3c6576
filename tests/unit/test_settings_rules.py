"""Cross-field rules of the settings."""

from __future__ import annotations

import pytest

from bridge.settings import SettingsError, load_settings


def test_a_visibility_timeout_shorter_than_a_retry_delay_is_refused():
    with pytest.raises(SettingsError, match="visibility_timeout_s"):
        load_settings(env={"BRIDGE_BROKER_VISIBILITY_TIMEOUT_S": "100"})


def test_the_defaults_are_consistent():
    load_settings(env={})


def test_passwords_in_the_broker_and_redis_urls_are_secrets_to_redact():
    settings = load_settings(
        env={
            "BRIDGE_BROKER_URL": "amqp://bridge:amqp%2Fpass@rabbit:5672/",
            "BRIDGE_REDIS_URL": "redis://:redis-pass-9f@redis:6379/0",
        }
    )
    secrets = settings.secret_values()
    assert {"amqp%2Fpass", "amqp/pass", "redis-pass-9f"} <= set(secrets)


def test_urls_without_a_password_add_no_secret():
    settings = load_settings(env={"BRIDGE_BROKER_URL": "redis://127.0.0.1:6379/5"})
    assert settings.secret_values() == []
