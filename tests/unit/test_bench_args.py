"""``bridge bench`` measures the layout the runbook deploys unless told otherwise."""

from __future__ import annotations

import pytest

from bridge.bench import INTAKE_PREFETCH, parse_args


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
