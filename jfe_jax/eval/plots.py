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
        "late fusion (MIRe)": b}; one bar per system per task, plus the overall average.
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
