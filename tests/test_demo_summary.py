"""``demo_summary.json`` across reruns: each stage keeps the time it took when it ran."""

from jfe_jax.demo import STAGES, merge_summary

FRESH = {"data": 3.2, "stage1": 180.5, "stage2": 200.1, "eval": 40.0}


def test_a_fresh_run_records_every_stage_and_its_wall_time():
    summary = merge_summary(None, FRESH, [], 431.0)
    assert summary == {
        "seconds": FRESH,
        "reused": [],
        "total_seconds": 431.0,
        "run_seconds": 431.0,
    }


def test_a_rerun_that_reuses_every_stage_keeps_the_original_times():
    first = merge_summary(None, FRESH, [], 431.0)
    again = merge_summary(first, {}, list(STAGES), 0.7)
    assert again["seconds"] == FRESH
    assert again["reused"] == list(STAGES)
    assert again["total_seconds"] == 431.0 and again["run_seconds"] == 0.7
    # and so does the rerun after it
    assert merge_summary(again, {}, list(STAGES), 0.6)["seconds"] == FRESH


def test_a_resumed_run_keeps_the_finished_stages_times_and_adds_its_own():
    # An interrupted run wrote its summary after data and stage 1; the resume runs the rest.
    partial = merge_summary(None, {"data": 3.2, "stage1": 180.5}, [], 190.0)
    resumed = merge_summary(partial, {"stage2": 200.1, "eval": 40.0}, ["data", "stage1"], 245.0)
    assert resumed["seconds"] == FRESH
    assert resumed["reused"] == ["data", "stage1"]
    assert resumed["total_seconds"] == 435.0 and resumed["run_seconds"] == 245.0


def test_times_no_summary_recorded_are_unknown_not_skipped():
    old_format = {"seconds": dict.fromkeys(STAGES, "skipped"), "total_seconds": 0.7}
    summary = merge_summary(old_format, {"eval": 40.0}, ["data", "stage1", "stage2"], 41.0)
    assert summary["seconds"] == {"data": None, "stage1": None, "stage2": None, "eval": 40.0}
    assert merge_summary(None, {}, list(STAGES), 0.5)["seconds"] == dict.fromkeys(STAGES)
