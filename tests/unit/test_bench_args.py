"""``bridge bench`` measures the layout the runbook deploys unless told otherwise."""

from __future__ import annotations

import pytest

from bridge.bench import INTAKE_PREFETCH, parse_args, render


def test_intake_only_workers_prefetch_as_deployed_by_default():
    assert parse_args([]).intake_prefetch == INTAKE_PREFETCH


def test_workers_taking_every_queue_prefetch_one_by_default():
    assert parse_args(["--act-pool", "none"]).intake_prefetch == 1


def test_an_explicit_prefetch_wins_in_either_layout():
    assert parse_args(["--intake-prefetch", "1"]).intake_prefetch == 1
    assert parse_args(["--act-pool", "none", "--intake-prefetch", "3"]).intake_prefetch == 3


def test_a_prefetch_below_one_is_refused_with_the_option_named(capsys):
    with pytest.raises(SystemExit):
        parse_args(["--intake-prefetch", "0"])
    assert "--intake-prefetch must be at least 1" in capsys.readouterr().err


def _header(**overrides: object) -> str:
    out: dict[str, object] = {
        "broker": "redis",
        "workers": 2,
        "prefetch_multiplier": 2,
        "act_pool": "threads:16",
        "itsm_flavor": "itsm",
        "itsm_latency_ms": 5.0,
        "quick": False,
        "scale": 1.0,
        "git_commit": "abc123",
        "git_dirty": False,
        "cpus": 2,
    }
    out.update(overrides)
    return render(out).splitlines()[0]


def test_the_table_header_says_when_the_sizes_were_scaled():
    assert "full sizes x 0.3," in _header(scale=0.3)
    assert "full sizes," in _header()
