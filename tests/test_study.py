"""`jfe experiment fusion`: the study end to end at a toy size, its files, and a rerun."""

import dataclasses
import json
import os

import numpy as np
import pytest

from jfe_jax import study
from jfe_jax.cli import main
from jfe_jax.data.synthetic import SyntheticConfig

# Three tasks (one per kind of input: text -> image, image+text -> text, image+text ->
# image) with a few queries each: the statistics need nothing more.
TOY = SyntheticConfig(
    tasks=("mscoco_task0", "oven_task6", "cirr_task7"),
    train_queries_per_task=12,  # 36 in all: one batch of the demo configs' 32
    val_queries_per_task=2,
    test_queries_per_task=6,
    num_text_triples=40,
    num_image_captions=40,
    train_query_multipliers=(),
)


@pytest.mark.slow
def test_study_runs_end_to_end_and_writes_study_json(tmp_path):
    workdir = str(tmp_path / "study")
    result = study.run_fusion_study(
        workdir, seeds=2, steps=1, replicates=200, synthetic=TOY, stages=("stage1",), progress=False
    )
    out = os.path.join(workdir, "fusion")
    for name in ("study.json", "table.txt", "study.png", "need.png"):
        assert os.path.getsize(os.path.join(out, name)) > 0, name
    with open(os.path.join(out, "study.json")) as f:
        saved = json.load(f)
    assert saved["settings"]["seeds"] == 2 and saved["settings"]["systems"] == ["early", "late"]
    tasks = saved["tasks"]
    assert sorted(tasks) == sorted(TOY.tasks)
    # Every seed's per-query hits are kept, so the statistics can be recomputed from the file.
    for system in ("early", "late"):
        for task in tasks:
            hits = np.asarray(saved["hits"][system][task])
            assert hits.shape == (2, len(saved["qids"][task]))
            assert set(np.unique(hits)) <= {0, 1}
            mean = saved["statistics"]["systems"][system]["tasks"][task]["estimate"]
            assert mean == pytest.approx(hits.mean())
    recomputed = study.stats.compare_systems(
        {s: {t: np.asarray(v) for t, v in saved["hits"][s].items()} for s in ("early", "late")},
        reference="early",
        replicates=200,
    )
    for section in ("tasks", "average"):  # (groups: the study passes M-BEIR's, this does not)
        assert (
            recomputed["differences"]["late"][section]
            == saved["statistics"]["differences"]["late"][section]
        )
    # Fusion need: text -> image has no item with both modalities, so dropping one changes
    # nothing and its need is exactly 0.
    assert saved["fusion_need"]["tasks"]["mscoco_task0"]["estimate"] == 0.0
    assert saved["statement"] and ("no decision" in saved["table"] or "wins" in saved["table"])
    # Stage 1 only (the cheapest end-to-end run): no stage 2 was trained.
    assert not os.path.exists(os.path.join(workdir, "early", "seed0", "stage2"))
    # Each seed is its own training run (data order and initialisation differ).
    first = os.path.join(workdir, "early", "seed0", "stage1", "config.json")
    second = os.path.join(workdir, "early", "seed1", "stage1", "config.json")
    assert json.load(open(first))["seed"] == 0 and json.load(open(second))["seed"] == 1
    assert (
        json.load(open(os.path.join(workdir, "late", "seed0", "stage1", "config.json")))["model"][
            "fusion"
        ]
        == "late"
    )

    # A rerun trains nothing and evaluates nothing: the same numbers, from the saved runs.
    again = study.run_fusion_study(
        workdir, seeds=2, steps=1, replicates=200, synthetic=TOY, stages=("stage1",), progress=False
    )
    assert again["hits"] == result["hits"]
    assert again["statistics"]["differences"] == result["statistics"]["differences"]


def test_study_refuses_bad_arguments_with_the_reason(tmp_path, capsys):
    with pytest.raises(ValueError, match="unknown systems"):
        study.run_fusion_study(str(tmp_path), systems=("early", "mire"))
    with pytest.raises(ValueError, match="must include 'early'"):
        study.run_fusion_study(str(tmp_path), systems=("late",))
    with pytest.raises(ValueError, match="unknown preset"):
        study.run_fusion_study(str(tmp_path), preset="huge")
    assert main(["experiment", "fusion", "--workdir", str(tmp_path), "--systems", "late"]) == 2
    assert "must include 'early'" in capsys.readouterr().err


def test_steps_per_stage_and_size_override_the_preset_and_bad_ones_are_refused(tmp_path):
    preset = study.Preset("study", TOY, "mini", (3, 40))
    stage1, stage2, _ = study.run_configs(str(tmp_path), preset, "early", 0, None)
    assert (stage1.train.num_steps, stage2.train.num_steps) == (3, 40)
    assert stage1.model.size == stage2.model.size == "mini"
    # Warmup and logging fit a short run, as with one number of steps for both stages.
    assert stage1.optimizer.warmup_steps == 0 and stage1.train.log_every == 3
    assert stage2.optimizer.warmup_steps == 4
    workdir = tmp_path / "refused"
    with pytest.raises(ValueError, match="unknown model size 'huge'"):
        study.run_fusion_study(str(workdir), synthetic=TOY, size="huge", progress=False)
    with pytest.raises(ValueError, match=r"steps must be an int or \(stage 1, stage 2\)"):
        study.run_fusion_study(str(workdir), synthetic=TOY, steps=(1, 2, 3), progress=False)
    assert not workdir.exists()  # refused before any data was generated


def test_study_data_of_another_config_is_refused_and_older_data_is_reused(tmp_path):
    data_dir = str(tmp_path / "data")
    preset = study.Preset("toy", TOY, "tiny", (2, 2))
    study._prepare_data(data_dir, preset, progress=False)
    manifest_path = os.path.join(data_dir, "synthetic_manifest.json")
    # Data written before a config field existed (here num_grid_captions) holds its default:
    # reused as it is, not regenerated.
    with open(manifest_path) as f:
        manifest = json.load(f)
    del manifest["config"]["num_grid_captions"]
    with open(manifest_path, "w") as f:
        json.dump(manifest, f)
    before = os.stat(manifest_path).st_mtime_ns
    study._prepare_data(data_dir, preset, progress=False)
    assert os.stat(manifest_path).st_mtime_ns == before
    other = study.Preset("toy", dataclasses.replace(TOY, num_grid_captions=4), "tiny", (2, 2))
    with pytest.raises(ValueError, match="holds synthetic data of another config than preset"):
        study._prepare_data(data_dir, other, progress=False)


def test_study_preset_weighs_stage_2_batches_toward_the_fusion_task(tmp_path):
    from jfe_jax.data.synthetic import STUDY_TASKS
    from jfe_jax.train.data import task_weights
    from jfe_jax.train.setup import make_lr_fn

    preset = study.presets()["study"]
    for system in study.SYSTEMS:
        stage1, stage2, _ = study.run_configs(str(tmp_path), preset, system, 0, None)
        assert not stage1.data.task_batches and not stage1.data.task_weights
        assert stage2.data.task_batches
        assert {task for task, _ in stage2.data.task_weights} == set(STUDY_TASKS)
        weights = task_weights(stage2.data.task_weights, dict.fromkeys(STUDY_TASKS, 300))
        share = weights["infoseek_task6"] / sum(weights.values())
        assert share > 0.7, share
        # The peak held until the last fifth of the steps (the fusion task is still rising
        # when a cosine over all of them would end), then annealed to zero.
        lr, steps = make_lr_fn(stage2), stage2.train.num_steps
        peak = stage2.optimizer.learning_rate
        assert lr(stage2.optimizer.warmup_steps + 1) == pytest.approx(peak)
        assert lr(int(0.75 * steps)) == pytest.approx(peak)
        assert lr(int(0.9 * steps)) < 0.7 * peak
        assert lr(steps) < 1e-3 * peak
    assert preset.synthetic.num_grid_captions > 0
    assert preset.synthetic.queries_per_task("train", "infoseek_task6") == 9600


def _write_hits(path, hits):
    os.makedirs(path, exist_ok=True)
    details = {
        task: {"per_query": {"qids": [f"q{i}" for i in range(len(h))], "hit_at_5": list(h)}}
        for task, h in hits.items()
    }
    with open(os.path.join(path, "results.json"), "w") as f:
        json.dump({"details": details}, f)


def test_the_estimate_uses_the_presets_measured_costs_and_the_default_elsewhere():
    base = study.Preset("toy", TOY, "tiny", (100, 200))
    measured = dataclasses.replace(base, cost=(("late", 3.0),))
    assert measured.system_cost("late") == 3.0
    assert measured.system_cost("early") == study.SYSTEM_COST["early"]
    for systems, ratio in ((("late",), 3.0 / study.SYSTEM_COST["late"]), (("early",), 1.0)):
        assert study.estimate_seconds(measured, systems, 2, 150.0) == pytest.approx(
            ratio * study.estimate_seconds(base, systems, 2, 150.0)
        )
    # seeds and steps scale it
    longer = dataclasses.replace(base, steps=(200, 400))
    assert study.estimate_seconds(longer, ("early",), 3, 150.0) == pytest.approx(
        6.0 * study.estimate_seconds(base, ("early",), 1, 150.0)
    )


def test_fusion_need_is_the_drop_to_the_better_ablation_by_recall(tmp_path):
    # Full input 3 of 6; without the text 2 of 6 and without the image 2 of 6, on different
    # queries: their union (4 of 6) is above the full input, but either ablation alone is
    # below it, so the need is 3/6 - 2/6, not 3/6 - 4/6.
    full = [1, 1, 1, 0, 0, 0]
    no_text = [1, 0, 0, 1, 0, 0]
    no_image = [0, 1, 0, 0, 1, 0]
    run = tmp_path / "early" / "seed0"
    _write_hits(run / "eval", {"oven_task6": full})
    _write_hits(run / "eval_no_text", {"oven_task6": no_text})
    _write_hits(run / "eval_no_image", {"oven_task6": no_image})
    _write_hits(tmp_path / "late" / "seed0" / "eval", {"oven_task6": [0, 1, 0, 0, 0, 0]})
    result = study.collect(str(tmp_path), ["early", "late"], 1, replicates=200)
    assert result["fusion_need"]["tasks"]["oven_task6"]["estimate"] == pytest.approx(1 / 6)


def test_study_preset_on_data_with_fewer_tasks_weighs_only_those(tmp_path):
    # benchmarks/bench_fusion_task.py runs the study preset on infoseek_task6 alone.
    preset = study.presets()["study"]
    only = study._for_tasks(preset.stage2, ("infoseek_task6",))
    assert dict(only)["data.task_weights"] == (
        ("infoseek_task6", dict(study.STUDY_TASK_WEIGHTS)["infoseek_task6"]),
    )
    assert dict(only)["data.task_batches"] is True


def test_study_says_which_tasks_a_system_has_not_learned(tmp_path):
    from jfe_jax.data.synthetic.generate import MANIFEST_FILE, chance_at_headline_k

    manifest = {"tasks": {"oven_task6": {"test": {"pool": 160}}}}
    os.makedirs(tmp_path / "data")
    with open(tmp_path / "data" / MANIFEST_FILE, "w") as f:
        json.dump(manifest, f)
    chance = chance_at_headline_k(manifest)["oven_task6"]
    early = {0: [1] * 20 + [0] * 80, 1: [1] * 10 + [0] * 90}  # 20% and 10% recall
    for seed, full in early.items():
        run = tmp_path / "early" / f"seed{seed}"
        for name in ("eval", "eval_no_text", "eval_no_image"):
            _write_hits(run / name, {"oven_task6": full})
        _write_hits(tmp_path / "late" / f"seed{seed}" / "eval", {"oven_task6": [1] * 30 + [0] * 70})
    result = study.collect(str(tmp_path), ["early", "late"], 2, replicates=50)
    multiples = result["chance_multiples"]
    assert multiples["early"]["oven_task6"] == pytest.approx([0.2 / chance, 0.1 / chance], abs=1e-3)
    assert 0.1 / chance < study.LEARNED_MULTIPLE < 0.2 / chance < 0.3 / chance
    lines = study.learned_lines(result)
    assert lines[0] == f"early is under 5x chance on: oven_task6 seed 1 ({0.1 / chance:.1f}x)."
    assert lines[1].startswith("late reaches 5x chance or more on every task in every seed")
    assert lines[0] in study.statement(result)
    # Hits written without the data's manifest: no multiples, no such line.
    assert study.learned_lines({"statistics": {}}) == []


THREE_TASKS = ("mscoco_task0", "oven_task6", "cirr_task7")


def _hand_study(tmp_path, late_recall, seeds=2):
    """A study's evaluations written by hand on a 1000-item pool per task (chance 0.5%): early
    fusion at 50% recall on every task, with fusion needs 0, 0.25 and 0.4; late fusion at
    ``late_recall[task]``."""
    from jfe_jax.data.synthetic.generate import MANIFEST_FILE

    os.makedirs(tmp_path / "data")
    with open(tmp_path / "data" / MANIFEST_FILE, "w") as f:
        json.dump({"tasks": {t: {"test": {"pool": 1000}} for t in THREE_TASKS}}, f)
    full = [1] * 10 + [0] * 10
    ablated = {"mscoco_task0": full, "oven_task6": [1] * 5 + [0] * 15, "cirr_task7": [0] * 20}
    for seed in range(seeds):
        run = tmp_path / "early" / f"seed{seed}"
        _write_hits(run / "eval", dict.fromkeys(THREE_TASKS, full))
        _write_hits(run / "eval_no_text", ablated)
        _write_hits(run / "eval_no_image", ablated)
        late = {t: [1] * round(20 * r) + [0] * (20 - round(20 * r)) for t, r in late_recall.items()}
        _write_hits(tmp_path / "late" / f"seed{seed}" / "eval", late)
    return study.collect(str(tmp_path), ["early", "late"], seeds, replicates=50)


def test_a_study_whose_systems_did_not_learn_states_no_conclusion(tmp_path):
    # Late fusion at 0% (under 5x chance) on two tasks: the slope is computed, but its verdict
    # is not stated, whatever its sign, and study.json records why.
    result = _hand_study(tmp_path, {"mscoco_task0": 0.5, "oven_task6": 0.0, "cirr_task7": 0.0})
    assert "slope" in result["fusion_need"]["relation"]["late"]
    reason = "late under 5x chance on oven_task6, cirr_task7"
    assert result["conclusion"] == {"late": {"stated": False, "reason": reason}}
    text = study.statement(result)
    assert f"no conclusion: {reason}." in text
    assert "JFE claims" not in text and "against JFE's claim" not in text
    assert "not decided by these runs" not in text
    study.write_study(str(tmp_path), result)
    with open(tmp_path / "fusion" / "study.json") as f:
        assert json.load(f)["conclusion"]["late"] == {"stated": False, "reason": reason}


def test_no_conclusion_names_every_system_under_the_bar(tmp_path):
    _hand_study(tmp_path, {"mscoco_task0": 0.5, "oven_task6": 0.5, "cirr_task7": 0.0})
    # Early fusion's seed 1 at 0% on oven_task6: one seed under the bar is enough.
    hits = {**dict.fromkeys(THREE_TASKS, [1] * 10 + [0] * 10), "oven_task6": [0] * 20}
    _write_hits(tmp_path / "early" / "seed1" / "eval", hits)
    result = study.collect(str(tmp_path), ["early", "late"], 2, replicates=50)
    assert result["conclusion"]["late"]["reason"] == (
        "early under 5x chance on oven_task6; late under 5x chance on cirr_task7"
    )
    # Without the data's manifest chance is unknown: no conclusion either.
    os.remove(tmp_path / "data" / "synthetic_manifest.json")
    result = study.collect(str(tmp_path), ["early", "late"], 2, replicates=50)
    assert not result["conclusion"]["late"]["stated"]
    assert "chance recall unknown" in study.statement(result)


def test_a_study_whose_systems_learned_states_the_claim(tmp_path):
    # Late fusion at 50% where fusion is not needed, 10% (20x chance) where it is: early
    # fusion's advantage grows with the need.
    result = _hand_study(tmp_path, {"mscoco_task0": 0.5, "oven_task6": 0.3, "cirr_task7": 0.1})
    assert result["conclusion"] == {"late": {"stated": True, "reason": None}}
    assert result["fusion_need"]["relation"]["late"]["slope"]["decision"] == "positive"
    assert "early fusion's advantage grows with the task's fusion need, as JFE claims" in (
        study.statement(result)
    )
