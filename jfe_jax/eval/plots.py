"""Bar charts of per-task headline recall, one or more systems side by side.

Drawn on a `Figure` with the Agg canvas directly, never through pyplot, so plotting sets no
global matplotlib backend and needs no display.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from typing import Any

import numpy as np

from jfe_jax.data.mbeir import TEST_TASKS, headline_k

# The order M-BEIR papers list the 16 test tasks in; other tasks follow in input order.
MBEIR_TASK_ORDER = TEST_TASKS


def _task_order(tables: Mapping[str, Mapping[str, Any]]) -> list[str]:
    """Every task of any system: M-BEIR's order first, then the rest as first seen."""
    seen: list[str] = []
    for table in tables.values():
        seen += [task for task in table["tasks"] if task not in seen]
    rank = {task: i for i, task in enumerate(MBEIR_TASK_ORDER)}
    return sorted(seen, key=lambda task: (rank.get(task, len(rank)), seen.index(task)))


def plot_headline_recall(
    tables: Mapping[str, Mapping[str, Any]],
    path: str | os.PathLike,
    *,
    title: str = "M-BEIR headline recall per task",
) -> None:
    """Writes a PNG bar chart of each system's headline recall (percent) per task.

    Args:
      tables: {system label: `recall.task_table` output}, e.g. {"early fusion (JFE)": a,
        "late fusion (one tower)": b}; one bar per system per task, plus the overall average.
        A task missing from a system is left without a bar.
        Each "average" bar is over that system's own tasks: compare systems on one task set.
      path: where the PNG goes.
      title: the chart title.
    """
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    if not tables:
        raise ValueError("no systems to plot; expected {label: task table}")
    tasks = _task_order(tables)
    labels = [*tasks, "average"]
    width = 0.8 / len(tables)
    positions = np.arange(len(labels))

    figure = Figure(figsize=(2.0 + 0.35 * len(labels) * (1 + len(tables)), 4.5))
    FigureCanvasAgg(figure)
    axes = figure.add_subplot()
    for i, (system, table) in enumerate(tables.items()):
        values = [
            100 * table["tasks"][task]["headline"] if task in table["tasks"] else np.nan
            for task in tasks
        ]
        values.append(100 * table["average"])
        offsets = positions + (i - (len(tables) - 1) / 2) * width
        axes.bar(offsets, values, width=width, label=system)
    # The headline k varies by task (R@10 for the fashion tasks); say so under each name.
    tick_labels = [f"{task} (R@{headline_k(task)})" for task in tasks]
    axes.set_xticks(
        positions,
        [*tick_labels, "average"],
        rotation=45,
        ha="right",
        rotation_mode="anchor",
        fontsize=7,
    )
    axes.set_ylabel("recall (%)")
    axes.set_ylim(0, 100)
    axes.set_title(title)
    axes.grid(axis="y", alpha=0.3)
    if len(tables) > 1:
        axes.legend(fontsize=8)
    figure.tight_layout()
    figure.savefig(os.fspath(path), format="png", dpi=120)


def plot_study(result: Mapping[str, Any], path: str | os.PathLike) -> None:
    """A study's mean headline recall per task and system with 95% interval error bars
    (``jfe_jax.study``: ``result["statistics"]``)."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    systems = result["statistics"]["systems"]
    tasks = list(result["tasks"])
    labels = [*tasks, "average"]
    width = 0.8 / len(systems)
    positions = np.arange(len(labels))
    figure = Figure(figsize=(2.0 + 0.35 * len(labels) * (1 + len(systems)), 4.5))
    FigureCanvasAgg(figure)
    axes = figure.add_subplot()
    for i, (system, summary) in enumerate(systems.items()):
        cells = [summary["tasks"][t] for t in tasks] + [summary["average"]]
        values = np.array([100 * c["estimate"] for c in cells])
        errors = np.array(
            [
                [100 * (c["estimate"] - c["low"]) for c in cells],
                [100 * (c["high"] - c["estimate"]) for c in cells],
            ]
        )
        offsets = positions + (i - (len(systems) - 1) / 2) * width
        axes.bar(offsets, values, width=width, label=system, yerr=errors, capsize=2)
    axes.set_xticks(
        positions,
        [*(f"{t} (R@{headline_k(t)})" for t in tasks), "average"],
        rotation=45,
        ha="right",
        rotation_mode="anchor",
        fontsize=7,
    )
    seeds = result["settings"]["seeds"]
    axes.set_ylabel("recall (%), mean and 95% interval")
    axes.set_ylim(0, 100)
    axes.set_title(f"Fusion study: {seeds} seed{'s' if seeds > 1 else ''} per system")
    axes.grid(axis="y", alpha=0.3)
    axes.legend(fontsize=8)
    figure.tight_layout()
    figure.savefig(os.fspath(path), format="png", dpi=120)


def plot_need_relation(result: Mapping[str, Any], path: str | os.PathLike) -> None:
    """Each task's early-minus-other difference against its fusion need, both with 95%
    intervals, and the fitted line per compared system."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    need = result["fusion_need"]["tasks"]
    reference = result["statistics"]["reference"]
    figure = Figure(figsize=(6.5, 4.8))
    FigureCanvasAgg(figure)
    axes = figure.add_subplot()
    for system, diff in result["statistics"]["differences"].items():
        tasks = [t for t in result["tasks"] if t in need]
        x = np.array([100 * need[t]["estimate"] for t in tasks])
        # The study's convention: reference minus system (early - late).
        y = np.array([-100 * diff["tasks"][t]["estimate"] for t in tasks])
        xerr = np.array(
            [
                [100 * (need[t]["estimate"] - need[t]["low"]) for t in tasks],
                [100 * (need[t]["high"] - need[t]["estimate"]) for t in tasks],
            ]
        )
        yerr = np.array(
            [
                [100 * (diff["tasks"][t]["high"] - diff["tasks"][t]["estimate"]) for t in tasks],
                [100 * (diff["tasks"][t]["estimate"] - diff["tasks"][t]["low"]) for t in tasks],
            ]
        )
        axes.errorbar(
            x, y, xerr=xerr, yerr=yerr, fmt="o", capsize=2, label=f"{reference} - {system}"
        )
        for t, xi, yi in zip(tasks, x, y):
            axes.annotate(t, (xi, yi), fontsize=6, xytext=(3, 3), textcoords="offset points")
        relation = result["fusion_need"]["relation"].get(system, {})
        if "slope" in relation:
            slope = relation["slope"]
            xs = np.linspace(min(x.min(), 0), x.max(), 2)
            axes.plot(
                xs,
                100 * relation["intercept"] + slope["estimate"] * xs,
                label=f"slope {slope['estimate']:+.2f} [{slope['low']:+.2f}, {slope['high']:+.2f}]",
            )
    axes.axhline(0, color="grey", lw=0.8)
    axes.set_xlabel("fusion need (points of recall lost without image or text)")
    axes.set_ylabel("difference (points)")
    axes.set_title("Early fusion's advantage against each task's fusion need")
    axes.grid(alpha=0.3)
    if axes.get_legend_handles_labels()[0]:  # one system alone has no difference to label
        axes.legend(fontsize=8)
    figure.tight_layout()
    figure.savefig(os.fspath(path), format="png", dpi=120)
