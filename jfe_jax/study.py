"""``jfe experiment fusion``: a study that can decide JFE's claim on synthetic M-BEIR.

The claim: early fusion (image and text in one sequence from the first layer) gains more over
late fusion on tasks that need both modalities than on tasks that do not. The study

1. trains every system (``SYSTEMS``: a system is one entry, a name and its config overrides)
   with N seeds (``config.seed``: model initialisation and data order), the same data, steps,
   batch and optimizer for every system, and evaluates all on the same test queries;
2. reports per task, per JFE group and overall the mean headline recall with a 95% interval,
   and the paired difference of every system against the reference (``early``) with its
   interval, calling it a win only when the interval excludes zero (``jfe_jax.eval.stats``);
3. measures each task's *fusion need* with the trained early-fusion models: the drop in
   recall from the full input to the better (by recall, per seed) of the input without images
   and the input without texts (removed from every query and candidate that has both;
   ``evaluate_mbeir(drop=...)``), and fits early-minus-late difference against need over tasks:
   the slope and its interval are the claim as one number, stated (either way) only when
   every compared system is at LEARNED_MULTIPLE x chance or more on every task of the fit in
   every seed; otherwise the study says "no conclusion" and names the tasks (``conclusion``).

Layout of ``<workdir>``: ``data/`` (the preset's synthetic benchmark), ``<system>/seed<k>/``
(``stage1``, ``stage2``, ``eval``, and for early fusion ``eval_no_image``, ``eval_no_text``),
and ``fusion/``: ``study.json`` (settings, every run's per-query hits, the statistics, the
conclusion), ``table.txt``, ``study.png`` (means with intervals) and ``need.png`` (difference
against need).
Every run is resumable: a rerun skips finished stages, so Ctrl-C and a rerun lose little.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import time
from collections.abc import Sequence
from typing import Any

from jfe_jax.data.synthetic import STUDY_TASKS, SyntheticConfig
from jfe_jax.eval import stats
from jfe_jax.paths import absolute
from jfe_jax.study_report import (  # noqa: F401  (re-exported: the study's public names)
    ABLATIONS,
    LEARNED_MULTIPLE,
    REFERENCE,
    STUDY_DIR,
    STUDY_FILE,
    _chance_multiples,
    _results,
    _under_learned,
    collect,
    conclusion,
    learned_lines,
    per_query_hits,
    statement,
    study_table,
    write_study,
)

log = logging.getLogger(__name__)

# A system is a name and the config overrides that make it; the data, the steps, the batch and
# the optimizer are the study's. The first is the reference of the paired differences.
SYSTEMS: dict[str, dict[str, Any]] = {
    "early": {"model.fusion": "early"},
    "late": {"model.fusion": "late"},
}
# A run's wall time against the demo's fitted time at the same steps (estimate_seconds), where
# a preset does not measure its own (Preset.cost). Late fusion embeds an item's image and text
# in separate rows, more rows per step where items have both: session 14's study preset took
# 612 s for an early run (its three evaluations included) and 1052 s for a late one on 2 cores
# at 133 GFLOP/s, where the demo's fit gives 589 s.
SYSTEM_COST = {"early": 1.05, "late": 1.8}
# The study preset's stage-2 batch weights (data.task_weights): every study task, the fusion and
# OVEN tasks above the others.
_STUDY_FOCUS = {"infoseek_task6": 14.0, "oven_task6": 1.5, "oven_task8": 1.5}
STUDY_TASK_WEIGHTS = tuple((task, _STUDY_FOCUS.get(task, 0.2)) for task in STUDY_TASKS)


@dataclasses.dataclass(frozen=True)
class Preset:
    """The data and model a study runs at."""

    name: str
    synthetic: SyntheticConfig
    size: str  # the named model size (jfe_jax.models.sizes)
    steps: tuple[int, int] | None  # (stage 1, stage 2) steps; None: the demo configs'
    # Stage-2 config overrides for every system, ((dotted key, value), ...).
    stage2: tuple[tuple[str, Any], ...] = ()
    # Measured run costs, ((system, multiple of the demo's fitted time), ...); a system not
    # here costs SYSTEM_COST's.
    cost: tuple[tuple[str, float], ...] = ()

    def system_cost(self, system: str) -> float:
        return dict(self.cost).get(system, SYSTEM_COST.get(system, 1.0))


def presets() -> dict[str, Preset]:
    return {
        # The demo's data, model and steps: the cheapest study (60 test queries per task).
        "demo": Preset("demo", SyntheticConfig(), "tiny", None),
        # 240 test queries per task (one query moves a task by 0.42 points), pools that keep
        # chance at or under 4.8%, and the task that needs fusion by construction
        # (infoseek_task6, jfe_jax/data/synthetic/spatial.py) with 9600 training queries and
        # stage-1 captions of its grids (SyntheticConfig.study). The demo's model (`tiny`;
        # `mini` costs four times as much per step, over the study's 90-minute budget) and
        # recipe (stage 1 900 steps, stage 2 with the vision tower frozen), stage 2 3000
        # steps instead of the demo's 2400 (estimate_seconds gives this machine's time).
        #
        # Stage 2 draws each batch from one task, the fusion task most often: alone it needs
        # ~1500 steps of its own before it rises, where the other tasks pass 5x chance with a
        # few dozen batches each after stage 1. Shares: infoseek_task6 76%, the OVEN tasks
        # 8.2% each, the seven others 1.1% each. The learning rate holds its peak after
        # warmup and anneals over the last 20% of the steps (optimizer.decay_fraction). Seed
        # 1, the hardest seen: 3.6x chance on the fusion task at session 14's 69% share and
        # cosine decay, 4.8x at a constant rate, 6.3x with both changes (benchmarks/README.md,
        # "Fusion study"). Session 15's 2 x 3 study at a constant rate: the early-fusion model
        # at 5x chance or more on 29 of the 30 task-seed pairs, oven_task6 on seed 0 at 4.7x
        # (docs/study_history.md). The final anneal lifts the OVEN tasks (seed 0: 4.7x ->
        # 6.3x; seed 1: 6.3x -> 7.2x) at some cost to the fusion task (6.5x -> 5.2x, 6.3x ->
        # 5.5x), every task of both seeds at 5x or more.
        "study": Preset(
            "study",
            SyntheticConfig.study(),
            "tiny",
            (900, 3000),
            stage2=(
                ("data.task_batches", True),
                ("data.task_weights", STUDY_TASK_WEIGHTS),
                # The peak held for 80% of the steps after warmup, then a cosine to zero
                # over the last 20% (warmup-stable-decay).
                ("optimizer.end_learning_rate", 0.0),
                ("optimizer.decay_fraction", 0.2),
            ),
            # Session 16's 2 x 3 study at 135 GFLOP/s, where the demo's fit gives 583 s at
            # these steps: early 702-780 s a run (three evaluations), late 977-1000 s.
            cost=(("early", 1.25), ("late", 1.7)),
        ),
    }


def _set(config, dotted: str, value: Any) -> None:
    *parents, leaf = dotted.split(".")
    node = config
    for name in parents:
        node = node[name]
    node[leaf] = value


def _for_tasks(overrides: tuple[tuple[str, Any], ...], tasks: Sequence[str]):
    """Stage-2 overrides for data holding only ``tasks``: task weights of the others dropped."""
    out = []
    for key, value in overrides:
        if key == "data.task_weights":
            value = tuple((task, weight) for task, weight in value if task in tasks)
        out.append((key, value))
    return tuple(out)


def run_configs(workdir: str, preset: Preset, system: str, seed: int, steps: int | None):
    """The (stage 1, stage 2) configs of one run: the demo's, at the preset's size and steps,
    with the system's overrides and the seed."""
    from jfe_jax.demo import demo_configs, set_steps

    stage1, stage2 = demo_configs(workdir, steps=steps)
    run_dir = os.path.join(workdir, system, f"seed{seed}")
    with stage1.unlocked(), stage2.unlocked():
        for i, config in enumerate((stage1, stage2)):
            config.seed = seed
            config.model.size = preset.size
            if preset.steps is not None and steps is None:
                set_steps(config, preset.steps[i])
            for key, value in SYSTEMS[system].items():
                _set(config, key, value)
        for key, value in preset.stage2:
            _set(stage2, key, value)
        stage2.model.init_from = os.path.join(run_dir, "stage1")
    return stage1, stage2, run_dir


def estimate_seconds(preset: Preset, systems: Sequence[str], seeds: int, gflops: float) -> float:
    """Rough wall time of the study's runs plus their evaluations on this machine: the demo's
    fitted time (``jfe_jax.demo``) scaled by the size's FLOPs per token against tiny's, by the
    preset's steps and by each system's cost (``Preset.system_cost``)."""
    from jfe_jax.demo import _DEMO_DEFAULT_STEPS, _DEMO_FIXED_S, _DEMO_GFLOP
    from jfe_jax.models.flops import text_forward_flops
    from jfe_jax.models.sizes import get_size

    scale = text_forward_flops(get_size(preset.size), 1, 128) / text_forward_flops(
        get_size("tiny"), 1, 128
    )
    steps = sum(preset.steps) if preset.steps else _DEMO_DEFAULT_STEPS
    # The demo's step is bound by memory traffic as much as by matmuls: all of it scales.
    demo = _DEMO_FIXED_S + _DEMO_GFLOP / gflops
    per_run = demo * scale * steps / _DEMO_DEFAULT_STEPS
    return seeds * per_run * sum(preset.system_cost(system) for system in systems)


def resolve_preset(
    preset: str,
    systems: Sequence[str],
    seeds: int,
    *,
    steps: int | tuple[int, int] | None,
    synthetic: SyntheticConfig | None,
    size: str | None,
    stages: Sequence[str],
) -> tuple[list[str], Preset, int | None]:
    """(the systems, reference first; the preset with the study's overrides; the steps left to
    override both stages), after checking the study's arguments."""
    if tuple(stages) not in (("stage1", "stage2"), ("stage1",)):
        raise ValueError(f"stages must be ('stage1', 'stage2') or ('stage1',), got {stages}")
    all_presets = presets()
    if preset not in all_presets:
        raise ValueError(f"unknown preset {preset!r}; expected one of {sorted(all_presets)}")
    unknown = [s for s in systems if s not in SYSTEMS]
    if unknown or not systems:
        raise ValueError(f"unknown systems {unknown} (or none); expected some of {list(SYSTEMS)}")
    if REFERENCE not in systems:
        raise ValueError(f"systems must include {REFERENCE!r}: fusion need is measured with it")
    if seeds < 1:
        raise ValueError(f"seeds must be >= 1, got {seeds}")
    systems = [REFERENCE, *[s for s in systems if s != REFERENCE]]
    chosen = all_presets[preset]
    if synthetic is not None:
        chosen = dataclasses.replace(
            chosen, synthetic=synthetic, stage2=_for_tasks(chosen.stage2, synthetic.tasks)
        )
    if size is not None:
        from jfe_jax.models.sizes import get_size

        get_size(size)  # an unknown name fails here, before any data is generated
        chosen = dataclasses.replace(chosen, size=size)
    if isinstance(steps, (tuple, list)):
        if len(steps) != 2 or min(steps) < 1:
            raise ValueError(f"steps must be an int or (stage 1, stage 2) >= 1, got {steps}")
        chosen, steps = dataclasses.replace(chosen, steps=tuple(int(n) for n in steps)), None
    return systems, chosen, steps


def _train_and_evaluate(
    workdir: str,
    data_dir: str,
    chosen: Preset,
    runs: Sequence[tuple[str, int]],
    steps: int | None,
    stages: Sequence[str],
    progress: bool,
):
    """Trains (or finishes) and evaluates every (system, seed) run; returns the last run's
    (stage 1, stage 2) configs (every run has the same steps and batch)."""
    from jfe_jax.demo import train_stage
    from jfe_jax.progress import progress_bar
    from jfe_jax.train.run_control import training_completed

    bar = progress_bar(total=len(runs), desc="study runs", unit="run", disable=not progress)
    try:
        for system, seed in runs:
            stage1, stage2, run_dir = run_configs(workdir, chosen, system, seed, steps)
            for name, config in (("stage1", stage1), ("stage2", stage2))[: len(stages)]:
                path = os.path.join(run_dir, name)
                if not training_completed(path, config.train.num_steps):
                    train_stage(config, path, f"{system} seed {seed} {name}")
            drops = (None, *ABLATIONS) if system == REFERENCE else (None,)
            _evaluate(
                os.path.join(run_dir, stages[-1]),
                data_dir,
                drops,
                label=f"{system} seed {seed}",
                progress=progress,
            )
            bar.update(1)
    finally:
        bar.close()
    return stage1, stage2


def run_fusion_study(
    workdir: str,
    *,
    seeds: int = 3,
    systems: Sequence[str] = ("early", "late"),
    preset: str = "demo",
    steps: int | tuple[int, int] | None = None,
    replicates: int = stats.DEFAULT_REPLICATES,
    synthetic: SyntheticConfig | None = None,
    size: str | None = None,
    stages: Sequence[str] = ("stage1", "stage2"),
    progress: bool = True,
) -> dict[str, Any]:
    """Runs (or finishes) the study in ``workdir``; returns what ``study.json`` holds.

    ``steps`` overrides the preset's steps (an int: both stages; a pair: stage 1, stage 2),
    ``synthetic`` its data and ``size`` its model size; ``stages`` ("stage1",) trains and
    evaluates stage 1 only (the machinery at the least cost: tests)."""
    from jfe_jax.train.topology import measured_cpu_peak

    systems, chosen, steps = resolve_preset(
        preset, systems, seeds, steps=steps, synthetic=synthetic, size=size, stages=stages
    )
    workdir = absolute(workdir)
    data_dir = os.path.join(workdir, "data")
    _prepare_data(data_dir, chosen, progress)

    runs = [(system, seed) for seed in range(seeds) for system in systems]
    gflops = measured_cpu_peak() / 1e9
    log.info(
        "study: %d runs (%s x %d seeds), preset %r (model %s); this machine's JAX float32 "
        "matmul runs at %.0f GFLOP/s: about %.0f minutes from scratch",
        len(runs),
        ", ".join(systems),
        seeds,
        preset,
        chosen.size,
        gflops,
        estimate_seconds(chosen, systems, seeds, gflops) / 60,
    )
    start = time.perf_counter()
    stage1, stage2 = _train_and_evaluate(workdir, data_dir, chosen, runs, steps, stages, progress)
    result = collect(workdir, systems, seeds, replicates=replicates)
    result["settings"].update(
        preset=preset,
        model_size=chosen.size,
        synthetic=dataclasses.asdict(chosen.synthetic),
        stage2_overrides=[list(pair) for pair in chosen.stage2],
        steps={"stage1": stage1.train.num_steps, "stage2": stage2.train.num_steps}
        if len(stages) == 2
        else {"stage1": stage1.train.num_steps},
        batch=stage2.data.global_batch_size,
        matmul_gflops=round(gflops, 1),
        seconds=round(time.perf_counter() - start, 1),
    )
    write_study(workdir, result)
    return result


def _prepare_data(data_dir: str, preset: Preset, progress: bool) -> None:
    """Generates the preset's data once; refuses data of another preset in the workdir."""
    from jfe_jax.data.synthetic import generate
    from jfe_jax.data.synthetic.generate import MANIFEST_FILE

    manifest_path = os.path.join(data_dir, MANIFEST_FILE)
    wanted = json.loads(json.dumps(dataclasses.asdict(preset.synthetic)))
    if os.path.isfile(manifest_path):
        have = _results(manifest_path).get("config")
        if have is not None:
            # Data written before a config field existed holds that field's default.
            defaults = json.loads(json.dumps(dataclasses.asdict(type(preset.synthetic)())))
            have = {**{k: v for k, v in defaults.items() if k not in have}, **have}
        if have is not None and have != wanted:
            raise ValueError(
                f"{data_dir} holds synthetic data of another config than preset "
                f"{preset.name!r}; use another --workdir"
            )
        return
    generate(data_dir, preset.synthetic, overwrite=True, progress=progress)


def _evaluate(
    model_dir: str, data_dir: str, drops: Sequence[str | None], *, label: str, progress: bool
) -> None:
    """The run's evaluations not yet done (beside its stage folders): the full input, and each
    ablation in ``drops``."""
    run_dir = os.path.dirname(model_dir)
    todo = [
        (drop, os.path.join(run_dir, "eval" if drop is None else f"eval_no_{drop}"))
        for drop in drops
    ]
    todo = [(d, out) for d, out in todo if not os.path.isfile(os.path.join(out, "results.json"))]
    if not todo:
        return
    from jfe_jax.encoder import embedder_for
    from jfe_jax.eval.mbeir_eval import evaluate_mbeir

    # One embedder (one model load, one compilation per shape) for all of the run's evaluations.
    embedder = embedder_for(model_dir, image_root=data_dir, batch_size=64)
    for drop, out in todo:
        evaluate_mbeir(
            embedder,
            data_dir,
            out,
            label=label if drop is None else f"{label}, no {drop}",
            index_mode="none",  # exact search gives the numbers; no ScaNN index needed
            drop=drop,
            progress=progress,
        )
