"""M-BEIR retrieval metrics, as UniIR defines them, and per-task result tables.

Recall@k on M-BEIR is a hit rate: a query scores 1 when any of its positives is among the
first k candidates retrieved, else 0; the task's Recall@k is the mean over its queries. With
several positives a query still scores at most 1. When the pool holds fewer than k
candidates, the top k is the whole ranking. Ties are whatever the ranker made of them: the
metric reads the ranking as given, and this project's rankers (`exact_search`, ScaNN brute
force) put the lower pool row first among equal scores.

Values are fractions in [0, 1]; the text table prints percentages, as papers do.
"""

from __future__ import annotations

import json
import os
import re
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

from jfe_jax.data.mbeir import TASK_GROUPS, headline_k

_TASK_NAME = re.compile(r"_task(\d+)$")


def recall_at_k(
    retrieved_ids: Sequence[Sequence[str]],
    positives: Sequence[Iterable[str]],
    ks: Sequence[int] = (1, 5, 10),
) -> dict[int, float]:
    """Mean hit rate at each k: {k: fraction of queries with a positive in their first k}.

    retrieved_ids[i] is query i's ranking, best first (it may be shorter than k: a small
    pool); positives[i] its relevant candidate ids. A query without positives scores 0 at
    every k and stays in the mean, as in UniIR's ``compute_recall_at_k``.
    Raises ValueError for mismatched lengths, no queries, a ranking that lists an id twice,
    or a k below 1.
    """
    if len(retrieved_ids) != len(positives):
        raise ValueError(
            f"{len(retrieved_ids)} rankings but {len(positives)} positive sets; "
            "expected one of each per query"
        )
    if not retrieved_ids:
        raise ValueError("no queries; expected at least one ranking")
    for k in ks:
        if not isinstance(k, int) or k < 1:
            raise ValueError(f"every k must be a positive integer, got {k!r}")
    hits = dict.fromkeys(ks, 0)
    for query, (ranking, relevant) in enumerate(zip(retrieved_ids, positives)):
        relevant = set(relevant)
        ranking = list(ranking)
        if len(set(ranking)) != len(ranking):
            raise ValueError(f"query {query}'s ranking lists an id more than once")
        # Rank (0-based) of the best positive; recall@k is 1 exactly when it is below k.
        first_hit = next((rank for rank, cid in enumerate(ranking) if cid in relevant), None)
        for k in ks:
            hits[k] += first_hit is not None and first_hit < k
    return {k: hits[k] / len(retrieved_ids) for k in ks}


def query_hits(
    retrieved_ids: Sequence[Sequence[str]], positives: Sequence[Iterable[str]], k: int
) -> list[int]:
    """Per query, 1 when a positive is among its first ``k`` retrieved, else 0: the terms whose
    mean is ``recall_at_k`` (what a study's bootstrap resamples)."""
    if len(retrieved_ids) != len(positives):
        raise ValueError(f"{len(retrieved_ids)} rankings but {len(positives)} positive sets")
    out = []
    for ranking, relevant in zip(retrieved_ids, positives):
        relevant = set(relevant)
        out.append(int(any(cid in relevant for cid in list(ranking)[:k])))
    return out


def task_id(task: str) -> int:
    """The M-BEIR task id in a name like "webqa_task2" (or "mbeir_webqa_task2")."""
    match = _TASK_NAME.search(task)
    if match is None:
        raise ValueError(f"task name {task!r} does not end in _task<id>, e.g. 'webqa_task2'")
    return int(match.group(1))


def task_table(results: Mapping[str, Mapping[int, float]]) -> dict[str, Any]:
    """Per-task headline recall, JFE's group means and the overall mean.

    Args:
      results: {task name: {k: recall}}, e.g. {"webqa_task1": {1: .4, 5: .7, 10: .8}}.

    Returns:
      {"tasks": {task: {"recall": {k: r}, "headline_k": k, "headline": r}},
       "groups": {group: mean headline of its tasks present}  (groups with none omitted),
       "average": mean headline over all tasks}
    Raises ValueError when a task lacks the recall its headline needs.
    """
    if not results:
        raise ValueError("no task results; expected {task name: {k: recall}}")
    tasks = {}
    for task, recalls in results.items():
        k = headline_k(task)
        if k not in recalls:
            raise ValueError(
                f"task {task!r} has Recall@{sorted(recalls)} but its headline is Recall@{k}"
            )
        tasks[task] = {
            "recall": {int(kk): float(v) for kk, v in sorted(recalls.items())},
            "headline_k": k,
            "headline": float(recalls[k]),
        }
    groups = {}
    for group, ids in TASK_GROUPS.items():
        members = [row["headline"] for task, row in tasks.items() if task_id(task) in ids]
        if members:
            groups[group] = sum(members) / len(members)
    average = sum(row["headline"] for row in tasks.values()) / len(tasks)
    return {"tasks": tasks, "groups": groups, "average": average}


def format_task_table(table: Mapping[str, Any], *, title: str | None = None) -> str:
    """A plain-text table of `task_table` output, recalls in percent."""
    ks = sorted({k for row in table["tasks"].values() for k in row["recall"]})
    name_width = max(12, *(len(task) for task in table["tasks"]))
    header = f"{'task':<{name_width}}" + "".join(f"{'R@' + str(k):>8}" for k in ks)
    header += f"{'headline':>14}"
    lines = [title] if title else []
    lines += [header, "-" * len(header)]
    for task, row in table["tasks"].items():
        cells = "".join(
            f"{100 * row['recall'][k]:>8.1f}" if k in row["recall"] else f"{'-':>8}" for k in ks
        )
        headline = f"{100 * row['headline']:.1f} (R@{row['headline_k']})"
        lines.append(f"{task:<{name_width}}{cells}{headline:>14}")
    lines.append("-" * len(header))
    for group, value in table["groups"].items():
        lines.append(f"{group:<{name_width}}{'':>{8 * len(ks)}}{100 * value:>14.1f}")
    lines.append(f"{'average':<{name_width}}{'':>{8 * len(ks)}}{100 * table['average']:>14.1f}")
    return "\n".join(lines)


def write_table_json(
    table: Mapping[str, Any], path: str | os.PathLike, *, extra: Mapping[str, Any] | None = None
) -> None:
    """Writes `task_table` output (plus `extra`, e.g. the command and checkpoint) as JSON.

    Recall keys become "recall@k" strings, since JSON object keys cannot be integers.
    """
    tasks = {
        task: {
            "recall": {f"recall@{k}": v for k, v in row["recall"].items()},
            "headline_k": row["headline_k"],
            "headline": row["headline"],
        }
        for task, row in table["tasks"].items()
    }
    payload = {"tasks": tasks, "groups": dict(table["groups"]), "average": table["average"]}
    payload.update(extra or {})
    with open(path, "w") as f:
        json.dump(payload, f, indent=2)
        f.write("\n")


def read_table_json(path: str | os.PathLike) -> tuple[dict[str, Any], dict[str, Any]]:
    """Reads what `write_table_json` wrote: (the `task_table` dict, the extra fields)."""
    with open(path) as f:
        payload = json.load(f)
    tasks = {
        task: {
            "recall": {int(k.removeprefix("recall@")): v for k, v in row["recall"].items()},
            "headline_k": row["headline_k"],
            "headline": row["headline"],
        }
        for task, row in payload.pop("tasks").items()
    }
    table = {"tasks": tasks, "groups": payload.pop("groups"), "average": payload.pop("average")}
    return table, payload
