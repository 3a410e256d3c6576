"""bridge.keys: incident keys, specified (properties with hypothesis)."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from bridge.alert import Alert, Severity, Status
from bridge.keys import incident_key, with_key
from bridge.settings import Settings

EXAMPLES = int(os.environ.get("HYPOTHESIS_EXAMPLES", "300"))
text = st.text(max_size=12)


def alert(source: str = "alertmanager", identity: str = "3f9a1c22be04d7e1", **labels: str) -> Alert:
    return Alert(
        source=source,
        identity=identity,
        status=Status.FIRING,
        severity=Severity.WARNING,
        summary="s",
        labels=labels,
    )


def identity_key(a: Alert, tenant: str = "prod") -> str:
    return incident_key(a, mode="identity", group_by=(), tenant=tenant)


def group_key(a: Alert, group_by: tuple[str, ...] = ("alertname",), tenant: str = "prod") -> str:
    return incident_key(a, mode="group_by", group_by=group_by, tenant=tenant)


def test_key_is_32_lowercase_hex_digits():
    key = identity_key(alert())
    assert len(key) == 32
    assert set(key) <= set("0123456789abcdef")


def test_keys_are_pinned_across_releases():
    # A new value here would orphan every open incident (bridge/keys.py): never re-pin
    # without a migration.
    assert identity_key(alert()) == "416268e3ffbde943ac5f5de214d28f43"
    assert group_key(alert(alertname="DiskFull")) == "e08e46f74f7d35d04b65faf736cdad74"


def test_key_is_the_same_in_another_process():
    code = (
        "from bridge.alert import Alert, Severity, Status\n"
        "from bridge.keys import incident_key\n"
        "a = Alert('alertmanager', '3f9a1c22be04d7e1', Status.FIRING, Severity.WARNING, 's',"
        " labels={'alertname': 'DiskFull'})\n"
        "print(incident_key(a, mode='identity', group_by=(), tenant='prod'))\n"
        "print(incident_key(a, mode='group_by', group_by=('alertname',), tenant='prod'))\n"
    )
    env = {**os.environ, "PYTHONHASHSEED": "12345"}
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, env=env, check=True
    ).stdout.split()
    local = alert(alertname="DiskFull")
    assert out == [identity_key(local), group_key(local)]


def test_status_and_details_do_not_change_the_key():
    fired = alert()
    resolved = Alert(
        source=fired.source,
        identity=fired.identity,
        status=Status.RESOLVED,
        severity=Severity.CRITICAL,
        summary="other",
        labels={"x": "y"},
    )
    assert identity_key(fired) == identity_key(resolved)


def test_group_mode_ignores_labels_outside_group_by():
    a = alert(identity="1", alertname="DiskFull", instance="db-01")
    b = alert(identity="2", alertname="DiskFull", instance="db-02")
    assert group_key(a) == group_key(b)


def test_group_mode_is_independent_of_the_source():
    a = alert(source="alertmanager", alertname="DiskFull")
    b = alert(source="grafana", alertname="DiskFull")
    assert group_key(a) == group_key(b)


def test_group_mode_order_and_repeats_of_group_by_do_not_matter():
    a = alert(alertname="DiskFull", team="storage")
    assert group_key(a, ("alertname", "team")) == group_key(a, ("team", "alertname", "team"))


def test_group_mode_without_any_group_label_falls_back_to_identity():
    a = alert(identity="1", team="storage")
    b = alert(identity="2", team="storage")
    assert group_key(a) == identity_key(a)
    assert group_key(a) != group_key(b)


def test_group_mode_absent_label_differs_from_empty_label():
    assert group_key(alert(alertname="A"), ("alertname", "team")) != group_key(
        alert(alertname="A", team=""), ("alertname", "team")
    )


def test_unknown_mode_is_refused():
    with pytest.raises(ValueError, match="unknown key mode"):
        incident_key(alert(), mode="fingerprint", group_by=(), tenant="prod")


def test_with_key_uses_the_dedup_settings():
    settings_ = Settings(dedup_key_mode="group_by", dedup_group_by=("alertname",), dedup_tenant="t")
    a = alert(alertname="DiskFull")
    keyed = with_key(a, settings_)
    assert keyed.key == group_key(a, tenant="t")
    assert keyed.identity == a.identity
    assert a.key == ""


def test_with_key_takes_explicit_values():
    a = alert()
    assert with_key(a, mode="identity", group_by=(), tenant="prod").key == identity_key(a)


def test_with_key_needs_settings_or_all_values():
    with pytest.raises(TypeError):
        with_key(alert(), mode="identity")


@settings(max_examples=EXAMPLES)
@given(st.tuples(text, text, text), st.tuples(text, text, text))
def test_identity_keys_differ_whenever_the_parts_differ(first, second):
    tenant_a, source_a, identity_a = first
    tenant_b, source_b, identity_b = second
    key_a = identity_key(alert(source_a, identity_a), tenant_a)
    key_b = identity_key(alert(source_b, identity_b), tenant_b)
    assert (key_a == key_b) == (first == second)


@settings(max_examples=EXAMPLES)
@given(st.lists(text, min_size=1, max_size=4), st.integers(min_value=0, max_value=3))
def test_moving_a_delimiter_between_parts_changes_the_key(parts, cut):
    # ("a|b", "c") and ("a", "b|c"): the same characters, split differently.
    joined = "|".join(parts)
    cut = min(cut, len(joined))
    left, right = joined[:cut], joined[cut:]
    other_left, other_right = joined[: cut + 1], joined[cut + 1 :]
    if (left, right) == (other_left, other_right):
        return
    assert identity_key(alert(left, right)) != identity_key(alert(other_left, other_right))
    assert identity_key(alert("s", right), left) != identity_key(
        alert("s", other_right), other_left
    )


@settings(max_examples=EXAMPLES)
@given(st.dictionaries(text, text, max_size=4), st.dictionaries(text, text, max_size=4))
def test_group_keys_differ_whenever_the_grouped_labels_differ(labels_a, labels_b):
    group_by = tuple(sorted(set(labels_a) | set(labels_b))) or ("alertname",)
    a = Alert("x", "same", Status.FIRING, Severity.INFO, "s", labels=labels_a)
    b = Alert("x", "same", Status.FIRING, Severity.INFO, "s", labels=labels_b)
    assert (group_key(a, group_by) == group_key(b, group_by)) == (labels_a == labels_b)


@settings(max_examples=EXAMPLES)
@given(text, text, text, st.sampled_from(["identity", "group_by"]))
def test_different_tenants_never_share_a_key(tenant_a, tenant_b, value, mode):
    a = alert(identity=value, alertname=value)
    key_a = incident_key(a, mode=mode, group_by=("alertname",), tenant=tenant_a)
    key_b = incident_key(a, mode=mode, group_by=("alertname",), tenant=tenant_b)
    assert (key_a == key_b) == (tenant_a == tenant_b)


@settings(max_examples=EXAMPLES)
@given(text, text, st.sampled_from(["identity", "group_by"]))
def test_key_is_a_pure_function_of_its_inputs(identity, value, mode):
    first = incident_key(
        alert(identity=identity, alertname=value), mode=mode, group_by=("alertname",), tenant="t"
    )
    again = incident_key(
        alert(identity=identity, alertname=value), mode=mode, group_by=("alertname",), tenant="t"
    )
    assert first == again


def test_lone_surrogates_still_hash():
    assert len(identity_key(alert(identity="\ud800"))) == 32


@settings(max_examples=EXAMPLES, deadline=None)
@given(
    st.lists(
        st.tuples(
            st.sampled_from(["alertmanager", "grafana", "generic"]),
            text,
            st.dictionaries(st.sampled_from(["alertname", "job", "team"]), text, max_size=3),
        ),
        max_size=6,
    ),
    st.sampled_from(["identity", "group_by"]),
    text,
)
def test_keys_set_once_per_payload_equal_with_key(specs, mode, tenant):
    from bridge.keys import key_parsed

    alerts = [alert(source, identity, **labels) for source, identity, labels in specs]
    group_by = ("job", "alertname")
    want = [with_key(a, mode=mode, group_by=group_by, tenant=tenant).key for a in alerts]
    got = key_parsed(alerts, mode=mode, group_by=group_by, tenant=tenant)
    assert got is alerts
    assert [a.key for a in got] == want
