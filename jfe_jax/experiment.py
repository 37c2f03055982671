"""``jfe experiment fusion``: early fusion (JFE) against late fusion on the same data and budget.

The early-fusion system is the demo's (``<workdir>/stage1``, ``stage2``, ``eval``); the
late-fusion baseline trains the same tower with the same data, steps, batch and optimizer,
but embeds text and image apart and adds the embeddings (``jfe_jax.data.late_fusion``), into
``<workdir>/late``. Both are evaluated on the synthetic test split and compared per task and
per JFE group, with a plain statement of where early fusion wins and by how much.
"""

from __future__ import annotations

import json
import os
from typing import Any

from jfe_jax.demo import demo_configs, run_demo, train_stage
from jfe_jax.eval.plots import plot_headline_recall
from jfe_jax.eval.recall import TASK_GROUPS, read_table_json, task_id
from jfe_jax.paths import absolute
from jfe_jax.train.run_control import training_completed

# Tasks whose queries or candidates combine an image and a text: where fusion can matter.
BOTH_MODALITIES = (2, 6, 7, 8)
ONE_MODALITY = (0, 1, 3, 4)


def _mean(table: dict, ids: tuple[int, ...]) -> float | None:
    values = [row["headline"] for task, row in table["tasks"].items() if task_id(task) in ids]
    return sum(values) / len(values) if values else None


def fusion_statement(early: dict, late: dict) -> str:
    """One paragraph: early vs late on tasks needing both modalities and on the others."""
    lines = []
    for name, ids in (
        ("combine image and text", BOTH_MODALITIES),
        ("use one modality", ONE_MODALITY),
    ):
        e, l_ = _mean(early, ids), _mean(late, ids)
        if e is None:
            continue
        verdict = "early fusion wins" if e > l_ else "late fusion wins" if l_ > e else "a tie"
        lines.append(
            f"On the tasks whose queries or candidates {name} (tasks "
            f"{', '.join(map(str, ids))}), {verdict}: {100 * e:.1f} vs {100 * l_:.1f} "
            f"headline recall ({100 * (e - l_):+.1f} points)."
        )
    return " ".join(lines)


def comparison_table(early: dict, late: dict) -> str:
    """Per task and per group, early vs late headline recall (percent) and the difference."""
    header = f"{'':<18}{'early (JFE)':>12}{'late':>8}{'diff':>8}"
    lines = [header, "-" * len(header)]
    for task in early["tasks"]:
        e, l_ = early["tasks"][task]["headline"], late["tasks"][task]["headline"]
        lines.append(f"{task:<18}{100 * e:>12.1f}{100 * l_:>8.1f}{100 * (e - l_):>+8.1f}")
    lines.append("-" * len(header))
    for group in TASK_GROUPS:
        if group in early["groups"]:
            e, l_ = early["groups"][group], late["groups"][group]
            lines.append(f"{group:<18}{100 * e:>12.1f}{100 * l_:>8.1f}{100 * (e - l_):>+8.1f}")
    e, l_ = early["average"], late["average"]
    lines.append(f"{'average':<18}{100 * e:>12.1f}{100 * l_:>8.1f}{100 * (e - l_):>+8.1f}")
    return "\n".join(lines)


def run_fusion_experiment(
    workdir: str, *, steps: int | None = None, progress: bool = True
) -> dict[str, Any]:
    """Runs (or finishes) both systems and writes ``fusion/`` results; returns them."""
    workdir = absolute(workdir)
    run_demo(workdir, steps=steps, progress=progress)  # the early-fusion system
    late_dir = os.path.join(workdir, "late")
    stage1, stage2 = demo_configs(workdir, steps=steps)
    with stage1.unlocked(), stage2.unlocked():
        stage1.model.fusion = stage2.model.fusion = "late"
        stage2.model.init_from = os.path.join(late_dir, "stage1")
    for name, config in (("stage1", stage1), ("stage2", stage2)):
        run_dir = os.path.join(late_dir, name)
        if not training_completed(run_dir, config.train.num_steps):
            train_stage(config, run_dir, f"late-fusion {name}")
    late_eval = os.path.join(late_dir, "eval")
    if not os.path.isfile(os.path.join(late_eval, "results.json")):
        from jfe_jax.eval.mbeir_eval import evaluate_mbeir
        from jfe_jax.index.embedder import embedder_for

        # The late workdir's item format says fusion="late".
        root = stage2.data.root
        embedder = embedder_for(os.path.join(late_dir, "stage2"), image_root=root, batch_size=64)
        evaluate_mbeir(embedder, root, late_eval, label="late fusion", progress=progress)
    early, _ = read_table_json(os.path.join(workdir, "eval", "results.json"))
    late, _ = read_table_json(os.path.join(late_eval, "results.json"))
    out = os.path.join(workdir, "fusion")
    os.makedirs(out, exist_ok=True)
    statement = fusion_statement(early, late)
    table = comparison_table(early, late)
    plot_headline_recall(
        {"early fusion (JFE)": early, "late fusion": late},
        os.path.join(out, "fusion.png"),
        title="Early vs late fusion, synthetic M-BEIR (same tower, data and budget)",
    )
    result = {"early": early, "late": late, "statement": statement, "table": table}
    with open(os.path.join(out, "fusion.json"), "w", encoding="utf-8") as f:
        json.dump(result, f, indent=2)
    return result
