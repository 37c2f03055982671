"""``jfe aot``'s report says plainly what XLA's cost model gave, never its -1 s sentinels."""

import math
import re

import pytest

from jfe_jax.train.aot import format_report
from jfe_jax.train.aot_analysis import ProgramEstimate, known_cost_seconds
from jfe_jax.train.topology import parse_topology


def test_unknown_cost_ops_are_taken_out_of_xlas_time():
    # One custom call priced at -1 s beside 0.2 ms of real work: -0.9998 as returned.
    seconds, unknown, note = known_cost_seconds(-0.9998, 1)
    assert seconds == pytest.approx(2e-4) and unknown == 1 and note == ""
    assert known_cost_seconds(0.5, 3) == (0.5, 0, "")  # none priced at -1 s: nothing to undo
    # Lower than the custom calls explain: every whole second below zero is one more op.
    seconds, unknown, note = known_cost_seconds(-2.9, 1)
    assert seconds == pytest.approx(0.1) and unknown == 3 and "no cost for 3 ops" in note
    # No estimate: none returned, or nothing left once the unknown ops are out.
    assert math.isnan(known_cost_seconds(math.nan, 0)[0])
    assert math.isnan(known_cost_seconds(-1.0, 1)[0])


def _report(**fields) -> str:
    estimate = ProgramEstimate("train", True, 1.0, 16e9, 1e12, required_flops=5e11, **fields)
    return format_report([estimate], parse_topology("v5e-4"))


def test_the_report_prints_xlas_time_without_sentinels_or_says_there_is_none():
    text = _report(xla_optimal_seconds=-0.9998, xla_known_seconds=2e-4, unknown_cost_ops=1)
    assert "XLA optimal_seconds (loop bodies once)" in text and "0.0002" in text
    assert "ops XLA gives no cost for" in text and "1 (left out of its time)" in text
    assert "-0.9998" not in text and "-1 s" not in text
    text = _report()
    assert "no estimate (XLA returned none)" in text
    assert re.search(r"ops XLA gives no cost for +none$", text, flags=re.M)
    text = _report(xla_optimal_seconds=-1.0, unknown_cost_ops=1)
    assert "no estimate (XLA gives no cost for any op that takes time)" in text
