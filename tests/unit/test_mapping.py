"""How an alert becomes incident fields and note texts."""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any

import pytest

from bridge.alert import Alert, Severity, Status
from bridge.itsm.model import Impact, Priority
from bridge.mapping import Mapper, MappingError
from bridge.settings import MappingSettings, RoutingRule

T0 = datetime(2024, 5, 1, 10, 2, tzinfo=UTC)


def _alert(**changes: Any) -> Alert:
    values: dict[str, Any] = {
        "source": "alertmanager",
        "identity": "fp-1",
        "status": Status.FIRING,
        "severity": Severity.CRITICAL,
        "summary": "Disk almost full on db-1",
        "description": "Only 3% left on /var",
        "labels": {"alertname": "DiskFull", "team": "storage", "instance": "db-1"},
        "annotations": {"runbook": "https://runbooks/disk"},
        "starts_at": T0,
        "key": "k-abc",
    }
    values.update(changes)
    return Alert(**values)


def _mapper(**settings: Any) -> Mapper:
    return Mapper(MappingSettings(**settings))


# -- templates ----------------------------------------------------------------------


def test_default_subject_is_severity_and_summary() -> None:
    assert _mapper().draft(_alert()).subject == "[CRITICAL] Disk almost full on db-1"


def test_templates_render_labels_and_annotations() -> None:
    mapper = _mapper(
        subject_template="{{ labels.alertname }} on {{ labels['instance'] }}",
        description_template="Runbook: {{ annotations.runbook }}",
    )
    draft = mapper.draft(_alert())
    assert draft.subject == "DiskFull on db-1"
    assert draft.description == "Runbook: https://runbooks/disk"


def test_label_named_like_a_dict_method_renders_the_label() -> None:
    mapper = _mapper(subject_template="{{ labels.values }}")
    assert mapper.draft(_alert(labels={"values": "v1"})).subject == "v1"


def test_missing_label_renders_empty() -> None:
    mapper = _mapper(subject_template="x{{ labels.nope }}{{ labels.nope.deeper }}y")
    assert mapper.draft(_alert()).subject == "xy"


def test_default_description_lists_description_key_and_labels() -> None:
    description = _mapper().draft(_alert()).description
    assert description.startswith("Only 3% left on /var\n")
    assert "Key: k-abc" in description
    assert "team=storage" in description


def test_custom_fields_are_rendered_templates() -> None:
    mapper = _mapper(custom_fields={"alert_key": "{{ key }}", "host": "{{ labels.instance }}"})
    assert mapper.draft(_alert()).custom_fields == {"alert_key": "k-abc", "host": "db-1"}


# -- severity -----------------------------------------------------------------------


@pytest.mark.parametrize(
    ("severity", "priority", "impact"),
    [
        (Severity.CRITICAL, Priority.URGENT, Impact.ON_BUSINESS),
        (Severity.ERROR, Priority.HIGH, Impact.ON_DEPARTMENT),
        (Severity.WARNING, Priority.MEDIUM, Impact.ON_USER),
        (Severity.INFO, Priority.LOW, Impact.LOW),
    ],
)
def test_severity_maps_to_priority_urgency_and_impact(
    severity: Severity, priority: Priority, impact: Impact
) -> None:
    draft = _mapper().draft(_alert(severity=severity))
    assert (draft.priority, draft.urgency, draft.impact) == (priority, priority, impact)


def test_severity_missing_from_map_uses_the_warning_row() -> None:
    mapper = _mapper(severity_priority={"warning": "HIGH"})
    assert mapper.draft(_alert(severity=Severity.CRITICAL)).priority is Priority.HIGH


def test_severity_map_without_warning_row_falls_back_to_medium_on_user() -> None:
    mapper = _mapper(severity_priority={}, severity_urgency={}, severity_impact={})
    draft = mapper.draft(_alert())
    assert (draft.priority, draft.urgency, draft.impact) == (
        Priority.MEDIUM,
        Priority.MEDIUM,
        Impact.ON_USER,
    )


def test_priority_for_accepts_severity_spellings() -> None:
    mapper = _mapper()
    assert mapper.priority_for(Severity.ERROR) is Priority.HIGH
    assert mapper.priority_for("crit") is Priority.URGENT


def test_unknown_priority_value_in_config_raises_naming_the_key() -> None:
    with pytest.raises(MappingError, match=r"^mapping\.severity_priority\.critical: "):
        _mapper(severity_priority={"critical": "SEVERE"})


def test_unknown_severity_in_config_raises_naming_the_key() -> None:
    with pytest.raises(MappingError, match=r"^mapping\.severity_impact\.sev1: "):
        _mapper(severity_impact={"sev1": "LOW"})


# -- routing and tags -----------------------------------------------------------------


def test_first_matching_route_sets_category_group_and_requester() -> None:
    mapper = _mapper(
        routes=(
            RoutingRule(match={"team": "network"}, category="Network"),
            RoutingRule(
                match={"team": "storage", "instance": "db-1"},
                category="Storage",
                technician_group="Storage Team",
                requester_email="storage@example.com",
            ),
            RoutingRule(match={"team": "storage"}, category="Later rule"),
        )
    )
    draft = mapper.draft(_alert())
    assert (draft.category, draft.technician_group, draft.requester_email) == (
        "Storage",
        "Storage Team",
        "storage@example.com",
    )


def test_route_needs_every_match_label() -> None:
    mapper = _mapper(routes=(RoutingRule(match={"team": "storage", "env": "prod"}, category="S"),))
    assert mapper.draft(_alert()).category == "Incident"


def test_without_matching_route_defaults_apply() -> None:
    mapper = _mapper(technician_group="NOC", routes=(RoutingRule(match={"team": "x"}),))
    draft = mapper.draft(_alert())
    assert (draft.category, draft.technician_group, draft.requester_email) == (
        "Incident",
        "NOC",
        "alerts@example.com",
    )


def test_tags_are_defaults_then_route_tags_without_duplicates() -> None:
    mapper = _mapper(
        tags=("alert-bridge", "prod"),
        routes=(RoutingRule(match={"team": "storage"}, tags=("storage", "prod", "disk")),),
    )
    assert mapper.draft(_alert()).tags == ("alert-bridge", "prod", "storage", "disk")


# -- field limits ---------------------------------------------------------------------


def test_over_long_annotation_is_truncated_with_marker_within_limit() -> None:
    mapper = _mapper(description_template="{{ annotations.dump }}", description_max_chars=500)
    description = mapper.draft(_alert(annotations={"dump": "x" * 5000})).description
    assert len(description) <= 500
    assert description.endswith(" …[truncated]")


def test_over_long_subject_is_truncated_with_marker_within_limit() -> None:
    mapper = _mapper(subject_max_chars=40)
    subject = mapper.draft(_alert(summary="s" * 100)).subject
    assert len(subject) <= 40
    assert subject.endswith(" …[truncated]")


def test_newlines_in_subject_are_flattened_to_spaces() -> None:
    subject = _mapper().draft(_alert(summary="Disk full\r\n  on db-1\n")).subject
    assert subject == "[CRITICAL] Disk full on db-1"


# -- template errors ------------------------------------------------------------------


def test_subject_runtime_error_falls_back_to_plain_complete_subject() -> None:
    rendering = _mapper(subject_template="{{ 1 / 0 }}").render(_alert())
    assert rendering.draft.subject == "[CRITICAL] Disk almost full on db-1"
    assert rendering.rendering_errors[0].startswith("mapping.subject_template: ZeroDivisionError")


def test_description_filter_error_falls_back_to_plain_description() -> None:
    rendering = _mapper(description_template="{{ summary | round }}").render(_alert())
    assert rendering.draft.description.startswith("Only 3% left on /var\n")
    assert "team=storage" in rendering.draft.description
    assert rendering.rendering_errors[0].startswith("mapping.description_template: ")


def test_clean_render_reports_no_errors() -> None:
    assert _mapper().render(_alert()).rendering_errors == ()


def test_subject_syntax_error_raises_mapping_error_naming_the_setting() -> None:
    with pytest.raises(MappingError, match=r"^mapping\.subject_template: "):
        _mapper(subject_template="{{ summary ")


def test_custom_field_syntax_error_raises_mapping_error_naming_the_field() -> None:
    with pytest.raises(MappingError, match=r"^mapping\.custom_fields\.host: "):
        _mapper(custom_fields={"host": "{% if %}"})


# -- notes --------------------------------------------------------------------------


def test_note_for_occurrences_counts_since_a_utc_time() -> None:
    assert _mapper().note_for_occurrences(41, T0) == "41 more occurrences since 10:02 UTC."


def test_note_for_occurrences_names_the_date_when_since_is_another_day() -> None:
    note = _mapper().note_for_occurrences(1, T0, now=datetime(2024, 5, 2, 8, 0, tzinfo=UTC))
    assert note == "1 more occurrence since 2024-05-01 10:02 UTC."


def test_note_for_severity_rise_names_the_raised_priority() -> None:
    note = _mapper().note_for_severity_change(Severity.WARNING, Severity.CRITICAL)
    assert note == "Severity rose from warning to critical; priority raised from MEDIUM to URGENT."


def test_note_for_severity_fall_says_priority_is_kept() -> None:
    note = _mapper().note_for_severity_change(Severity.CRITICAL, Severity.INFO)
    assert note == "Severity fell from critical to info; priority is not lowered automatically."


def test_note_for_relapse_says_when_it_fired_again() -> None:
    note = _mapper().note_for_relapse(
        _alert(starts_at=T0), resolved_at=datetime(2024, 5, 1, 9, 40, tzinfo=UTC)
    )
    assert note == (
        "Alert firing again at 10:02 UTC (resolved at 09:40 UTC); "
        "incident reopened: Disk almost full on db-1"
    )


def test_note_for_flapping_names_cycles_and_window() -> None:
    note = _mapper().note_for_flapping(4, 1800)
    assert note.startswith("Alert is flapping: 4 firing/resolved cycles within 30 min.")


def test_note_for_resolution_says_when_and_after_how_long() -> None:
    alert = _alert(status=Status.RESOLVED, ends_at=datetime(2024, 5, 1, 11, 32, tzinfo=UTC))
    assert _mapper().note_for_resolution(alert) == (
        "Alert resolved at 11:32 UTC after 1 h 30 min (source: alertmanager): "
        "Disk almost full on db-1"
    )
