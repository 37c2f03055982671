"""M-BEIR Recall@k (a hit rate), per-task tables, JSON and the bar chart."""

import json

import numpy as np
import pytest

from jfe_jax.eval.plots import plot_headline_recall
from jfe_jax.eval.recall import (
    format_task_table,
    headline_k,
    recall_at_k,
    task_id,
    task_table,
    write_table_json,
)
from jfe_jax.index.exact import exact_search_numpy


def hit_rate_by_slicing(rankings, positives, k):
    """Independent Recall@k: is any positive in the ranking's first k entries."""
    hits = [any(c in pos for c in ranking[:k]) for ranking, pos in zip(rankings, positives)]
    return sum(hits) / len(hits)


def test_recall_on_hand_fixture_with_several_positives_and_short_pools():
    rankings = [
        ["a", "b", "c", "d", "e", "f"],  # positive at rank 3
        ["x", "y"],  # pool of 2 < k: the top 5 and top 10 are the whole pool
        ["p", "q", "r", "s", "t", "u", "v", "w", "z", "o", "n"],  # positives at ranks 8 and 11
        ["m"],  # two positives, one retrieved: still counts once
        ["g", "h", "i"],  # no positive retrieved
    ]
    positives = [{"c"}, {"y"}, {"n", "w"}, {"m", "zz"}, {"k"}]
    # Hits per query at k=1: 0,0,0,1,0; at 5: 1,1,0,1,0; at 10: 1,1,1,1,0.
    assert recall_at_k(rankings, positives) == {1: 0.2, 5: 0.6, 10: 0.8}
    assert recall_at_k(rankings, positives, ks=(2, 8, 100)) == {2: 0.4, 8: 0.8, 100: 0.8}


def test_recall_reads_ties_as_the_ranker_ordered_them():
    # Scores 0.9, 0.5, 0.9, 0.9, 0.1, 0.5: the ranker puts tied rows lower index first,
    # giving d0 d2 d3 d1 d5 d4, so the positive d3 is third.
    database = np.array([[0.9], [0.5], [0.9], [0.9], [0.1], [0.5]])
    order, _ = exact_search_numpy(np.ones((1, 1)), database, 6)
    ranking = [f"d{i}" for i in order[0]]
    assert ranking == ["d0", "d2", "d3", "d1", "d5", "d4"]
    assert recall_at_k([ranking], [{"d3"}], ks=(1, 2, 3)) == {1: 0.0, 2: 0.0, 3: 1.0}
    assert recall_at_k([ranking], [{"d5", "d1"}], ks=(3, 4)) == {3: 0.0, 4: 1.0}


def test_recall_equals_slicing_implementation_on_random_rankings():
    rng = np.random.default_rng(0)
    rankings, positives = [], []
    for _ in range(300):
        pool = [f"c{i}" for i in range(int(rng.integers(1, 30)))]
        ranking = list(rng.permutation(pool)[: int(rng.integers(1, len(pool) + 1))])
        rankings.append(ranking)
        positives.append(set(rng.choice(pool + ["other"], size=int(rng.integers(1, 4)))))
    ks = (1, 3, 5, 10, 20, 50)
    got = recall_at_k(rankings, positives, ks=ks)
    for k in ks:
        assert got[k] == pytest.approx(hit_rate_by_slicing(rankings, positives, k), abs=1e-12)
    assert 0 < got[1] < got[50] < 1  # the fixture exercises misses and hits


def test_query_without_positives_scores_zero_and_stays_in_the_mean():
    # UniIR's compute_recall_at_k returns 0.0 for a query with no relevant documents.
    assert recall_at_k([["a"], ["b"]], [{"a"}, set()], ks=(1,)) == {1: 0.5}


def test_recall_rejects_inconsistent_input():
    with pytest.raises(ValueError, match="2 rankings but 1 positive sets"):
        recall_at_k([["a"], ["b"]], [{"a"}])
    with pytest.raises(ValueError, match="query 0's ranking lists an id more than once"):
        recall_at_k([["a", "b", "a"]], [{"a"}])
    with pytest.raises(ValueError, match="every k must be a positive integer, got 0"):
        recall_at_k([["a"]], [{"a"}], ks=(0,))
    with pytest.raises(ValueError, match="no queries"):
        recall_at_k([], [])


# -- task tables -------------------------------------------------------------------------------

RESULTS = {
    "visualnews_task0": {1: 0.10, 5: 0.30, 10: 0.40},
    "fashion200k_task0": {1: 0.05, 5: 0.20, 10: 0.35},  # headline R@10
    "mscoco_task3": {1: 0.40, 5: 0.70, 10: 0.80},
    "webqa_task1": {1: 0.50, 5: 0.80, 10: 0.90},
    "nights_task4": {1: 0.10, 5: 0.30, 10: 0.50},
    "fashioniq_task7": {5: 0.15, 10: 0.25},  # headline R@10
    "cirr_task7": {1: 0.20, 5: 0.55, 10: 0.60},
}


def test_task_table_headlines_groups_and_average():
    table = task_table(RESULTS)
    headlines = {task: row["headline"] for task, row in table["tasks"].items()}
    assert headlines == {
        "visualnews_task0": 0.30,
        "fashion200k_task0": 0.35,
        "mscoco_task3": 0.70,
        "webqa_task1": 0.80,
        "nights_task4": 0.30,
        "fashioniq_task7": 0.25,
        "cirr_task7": 0.55,
    }
    # cross-modal (0, 3): (0.30 + 0.35 + 0.70) / 3; single-modal (1, 4): (0.80 + 0.30) / 2;
    # conditional (7): (0.25 + 0.55) / 2; no task 2, 6 or 8, so those groups are absent.
    assert table["groups"] == pytest.approx(
        {"cross-modal": 0.45, "single-modal": 0.55, "conditional": 0.40}
    )
    assert table["average"] == pytest.approx(3.25 / 7)


def test_headline_k_and_task_id_read_the_task_name():
    assert headline_k("fashion200k_task3") == 10 and headline_k("mbeir_fashioniq_task7") == 10
    assert headline_k("cirr_task7") == 5
    assert task_id("mbeir_oven_task8") == 8
    with pytest.raises(ValueError, match="does not end in _task<id>"):
        task_id("oven")


def test_task_table_rejects_a_task_without_its_headline_recall():
    with pytest.raises(ValueError, match=r"'fashioniq_task7' has Recall@\[1, 5\] but its headline"):
        task_table({"fashioniq_task7": {1: 0.1, 5: 0.2}})


def test_format_task_table_prints_percentages_and_groups():
    text = format_task_table(task_table(RESULTS), title="demo")
    lines = text.splitlines()
    assert lines[0] == "demo"
    assert lines[1].split() == ["task", "R@1", "R@5", "R@10", "headline"]
    row = next(line for line in lines if line.startswith("fashioniq_task7"))
    assert row.split() == ["fashioniq_task7", "-", "15.0", "25.0", "25.0", "(R@10)"]
    assert next(line for line in lines if line.startswith("conditional")).split() == [
        "conditional",
        "40.0",
    ]
    assert lines[-1].split() == ["average", "46.4"]


def test_write_table_json_round_trips(tmp_path):
    write_table_json(task_table(RESULTS), tmp_path / "r.json", extra={"command": "jfe eval"})
    payload = json.loads((tmp_path / "r.json").read_text())
    assert payload["tasks"]["cirr_task7"] == {
        "recall": {"recall@1": 0.2, "recall@5": 0.55, "recall@10": 0.6},
        "headline_k": 5,
        "headline": 0.55,
    }
    assert payload["groups"]["conditional"] == pytest.approx(0.40)
    assert payload["command"] == "jfe eval"


def test_plot_writes_a_png_with_two_systems_side_by_side(tmp_path):
    late = {task: {k: v / 2 for k, v in recalls.items()} for task, recalls in RESULTS.items()}
    path = tmp_path / "recall.png"
    plot_headline_recall({"early": task_table(RESULTS), "late": task_table(late)}, path)
    data = path.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 10_000
