"""Statistics of a retrieval study: bootstrap intervals, paired differences, a win rule, a slope.

The unit of evidence is a query's hit (UniIR's Recall@k of one query: 1 when a positive is in
its top k, else 0; any per-query score in [0, 1] works). A study holds, per system, per seed
(model init and data order) and per task, the hits of the same test queries in the same order:
``hits[system][task]`` is an array ``[seeds, queries]``.

Intervals are percentile bootstraps with two stages, so that both sources of variation count:
each replicate draws the seeds with replacement (the training run's luck), then, within each
drawn seed, the task's test queries with replacement (the test set's luck), and averages. With
one seed it is the plain bootstrap over queries. Differences between systems are *paired*: one
replicate draws the same seeds (seed i of one system is paired with seed i of the other: same
data order and initialisation seed) and the same queries for every system, so the variation the
systems share cancels. A group's figure is the mean of its tasks' figures (M-BEIR's convention),
its replicates the mean of the tasks' replicates (queries drawn independently per task).

A difference is a *win* only when its interval excludes zero; otherwise the study says
"no decision", never "a tie" (an interval containing zero does not show equality).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

DEFAULT_REPLICATES = 2000
DEFAULT_LEVEL = 0.95


@dataclasses.dataclass(frozen=True)
class Interval:
    """A point estimate with its (level) percentile-bootstrap interval."""

    estimate: float
    low: float
    high: float
    level: float = DEFAULT_LEVEL

    def excludes_zero(self) -> bool:
        return self.low > 0 or self.high < 0

    def to_dict(self) -> dict[str, float]:
        return {"estimate": self.estimate, "low": self.low, "high": self.high, "level": self.level}


def percentile_interval(
    estimate: float, replicates: np.ndarray, level: float = DEFAULT_LEVEL
) -> Interval:
    """The ``level`` percentile interval of bootstrap ``replicates`` around ``estimate``."""
    if not 0 < level < 1:
        raise ValueError(f"level must be in (0, 1), got {level}")
    replicates = np.asarray(replicates, np.float64)
    if replicates.ndim != 1 or replicates.size < 2:
        raise ValueError(f"expected a 1-D array of replicates, got shape {replicates.shape}")
    alpha = (1 - level) / 2
    low, high = np.quantile(replicates, [alpha, 1 - alpha])
    return Interval(float(estimate), float(low), float(high), level)


def decide(difference: Interval, names: tuple[str, str]) -> str:
    """The win rule: ``"<a> wins"`` / ``"<b> wins"`` when the interval of ``a - b`` lies above /
    below zero, else ``"no decision"``."""
    a, b = names
    if difference.low > 0:
        return f"{a} wins"
    if difference.high < 0:
        return f"{b} wins"
    return "no decision"


def _as_hits(values: Any, what: str) -> np.ndarray:
    array = np.asarray(values, np.float64)
    if array.ndim != 2 or array.shape[0] < 1 or array.shape[1] < 1:
        raise ValueError(f"{what}: expected hits of shape [seeds, queries], got {array.shape}")
    if not np.all(np.isfinite(array)):
        raise ValueError(f"{what}: hits must be finite")
    return array


class Bootstrap:
    """Draws of seeds and queries shared by every system of a study (so differences pair).

    ``draws(task, seeds, queries)`` returns ``(seed_index [B, S], query_index [B, S, Q])`` for a
    task, the same on every call for that task. ``resample_seeds=False`` keeps every seed in
    every replicate (the interval then covers the test queries' variation only).
    """

    def __init__(
        self, replicates: int = DEFAULT_REPLICATES, *, seed: int = 0, resample_seeds: bool = True
    ):
        if replicates < 2:
            raise ValueError(f"replicates must be >= 2, got {replicates}")
        self.replicates = replicates
        self.seed = seed
        self.resample_seeds = resample_seeds
        self._cache: dict[tuple[str, int, int], tuple[np.ndarray, np.ndarray]] = {}

    def draws(self, task: str, seeds: int, queries: int) -> tuple[np.ndarray, np.ndarray]:
        key = (task, seeds, queries)
        if key not in self._cache:
            # One stream per task, independent of the order tasks are asked for.
            entropy = [self.seed, seeds, queries, *task.encode()]
            rng = np.random.default_rng(np.random.SeedSequence(entropy))
            if self.resample_seeds:
                seed_index = rng.integers(0, seeds, size=(self.replicates, seeds))
            else:
                seed_index = np.broadcast_to(np.arange(seeds), (self.replicates, seeds))
            query_index = rng.integers(0, queries, size=(self.replicates, seeds, queries))
            self._cache[key] = (seed_index, query_index)
        return self._cache[key]

    def replicate_means(self, task: str, hits: np.ndarray) -> np.ndarray:
        """``[B]``: the mean over drawn seeds of the mean over drawn queries."""
        seeds, queries = hits.shape
        seed_index, query_index = self.draws(task, seeds, queries)
        drawn = hits[seed_index[:, :, None], query_index]  # [B, S, Q]
        return drawn.mean(axis=(1, 2))


def task_means(
    hits: Mapping[str, Any], boot: Bootstrap
) -> tuple[dict[str, float], dict[str, np.ndarray]]:
    """Per task: the mean hit over seeds and queries, and its bootstrap replicates."""
    means, replicates = {}, {}
    for task, values in hits.items():
        array = _as_hits(values, task)
        means[task] = float(array.mean())
        replicates[task] = boot.replicate_means(task, array)
    return means, replicates


def group_of(
    means: Mapping[str, float], replicates: Mapping[str, np.ndarray], tasks: Sequence[str]
) -> tuple[float, np.ndarray]:
    """A group's figure (mean of its tasks') and replicates."""
    return (
        float(np.mean([means[t] for t in tasks])),
        np.mean([replicates[t] for t in tasks], axis=0),
    )


def check_paired(hits: Mapping[str, Mapping[str, Any]], reference: str) -> list[str]:
    """The reference system's tasks, after checking every system has the same tasks and the
    same hits shape per task (ValueError naming the first that differs)."""
    systems = list(hits)
    if reference not in hits:
        raise ValueError(f"reference system {reference!r} is not one of {systems}")
    tasks = list(hits[reference])
    for name in systems:
        if sorted(hits[name]) != sorted(tasks):
            raise ValueError(
                f"system {name!r} has tasks {sorted(hits[name])}, {reference!r} has "
                f"{sorted(tasks)}: every system must be evaluated on the same tasks"
            )
        for task in tasks:
            shape = np.shape(hits[name][task])
            if shape != np.shape(hits[reference][task]):
                raise ValueError(
                    f"{name!r} {task}: hits of shape {shape}, {reference!r} has "
                    f"{np.shape(hits[reference][task])}: the same seeds and test queries are "
                    "needed to pair the systems"
                )
    return tasks


def summarise_means(
    means: Mapping[str, Any],
    reps: Mapping[str, np.ndarray],
    tasks: Sequence[str],
    groups: Mapping[str, Sequence[str]],
    level: float,
) -> dict[str, Any]:
    """Interval dicts per task, per group and for the average of the tasks."""
    out: dict[str, Any] = {
        "tasks": {t: percentile_interval(means[t], reps[t], level).to_dict() for t in tasks}
    }
    out["groups"] = {
        g: percentile_interval(*group_of(means, reps, members), level).to_dict()
        for g, members in groups.items()
    }
    out["average"] = percentile_interval(*group_of(means, reps, tasks), level).to_dict()
    return out


def compare_systems(
    hits: Mapping[str, Mapping[str, Any]],
    *,
    groups: Mapping[str, Sequence[str]] | None = None,
    reference: str | None = None,
    replicates: int = DEFAULT_REPLICATES,
    level: float = DEFAULT_LEVEL,
    seed: int = 0,
    resample_seeds: bool = True,
) -> dict[str, Any]:
    """Means with intervals per system, and paired differences against ``reference``.

    ``hits[system][task]`` is ``[seeds, queries]``; every system must have the same tasks, the
    same number of seeds and the same queries per task (in the same order). ``groups`` maps a
    group name to its tasks (tasks absent from the study are ignored; empty groups dropped).
    ``reference`` defaults to the first system; every other system is compared with it as
    ``system - reference``.

    Returns ``{"systems": {system: {"tasks": {task: Interval dict}, "groups": ..., "average":
    ...}}, "differences": {system: {"tasks": {task: Interval dict + "decision"}, ...}}}``,
    with the settings.
    """
    systems = list(hits)
    if not systems:
        raise ValueError("no systems to compare")
    reference = reference or systems[0]
    tasks = check_paired(hits, reference)
    groups = {
        g: [t for t in members if t in tasks]
        for g, members in (groups or {}).items()
        if any(t in tasks for t in members)
    }
    boot = Bootstrap(replicates, seed=seed, resample_seeds=resample_seeds)
    stats = {name: task_means(hits[name], boot) for name in systems}
    result: dict[str, Any] = {
        "reference": reference,
        "replicates": replicates,
        "level": level,
        "bootstrap_seed": seed,
        "resample_seeds": resample_seeds,
        "systems": {name: summarise_means(*stats[name], tasks, groups, level) for name in systems},
        "differences": {},
    }
    ref_means, ref_reps = stats[reference]
    for name in systems:
        if name == reference:
            continue
        means, reps = stats[name]
        diff_means = {t: means[t] - ref_means[t] for t in tasks}
        diff_reps = {t: reps[t] - ref_reps[t] for t in tasks}
        diff = summarise_means(diff_means, diff_reps, tasks, groups, level)
        for section in ("tasks", "groups"):
            for interval in diff[section].values():
                interval["decision"] = decide(Interval(**interval), (name, reference))
        diff["average"]["decision"] = decide(Interval(**diff["average"]), (name, reference))
        result["differences"][name] = diff
    return result


def slope_with_interval(
    x: Mapping[str, float],
    y: Mapping[str, float],
    x_replicates: Mapping[str, np.ndarray],
    y_replicates: Mapping[str, np.ndarray],
    *,
    level: float = DEFAULT_LEVEL,
) -> dict[str, Any]:
    """Least-squares fit ``y = intercept + slope * x`` over tasks, with the slope's percentile
    interval from refitting every bootstrap replicate (each task's x and y uncertainty carries
    into the slope; replicates of x and y drawn with the same seeds and queries stay paired).
    Needs at least 3 tasks with different x."""
    tasks = [t for t in x if t in y]
    if len(tasks) < 3:
        raise ValueError(f"a slope needs at least 3 tasks, got {len(tasks)}")
    xs = np.array([x[t] for t in tasks], np.float64)
    ys = np.array([y[t] for t in tasks], np.float64)
    if np.ptp(xs) == 0:
        raise ValueError("every task has the same x: the slope is undefined")
    slope, intercept = np.polyfit(xs, ys, 1)
    xr = np.stack([x_replicates[t] for t in tasks], axis=1)  # [B, T]
    yr = np.stack([y_replicates[t] for t in tasks], axis=1)
    xc = xr - xr.mean(axis=1, keepdims=True)
    yc = yr - yr.mean(axis=1, keepdims=True)
    denom = np.sum(xc * xc, axis=1)
    valid = denom > 0
    slopes = np.sum(xc * yc, axis=1)[valid] / denom[valid]
    interval = percentile_interval(float(slope), slopes, level).to_dict()
    interval["decision"] = (
        "positive" if interval["low"] > 0 else "negative" if interval["high"] < 0 else "no decision"
    )
    return {"tasks": tasks, "intercept": float(intercept), "slope": interval}
