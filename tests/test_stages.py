"""Both JFE stages on the synthetic benchmark with shortened demo configs: they learn."""

import importlib.util
import json
import os

import pytest

from jfe_jax.data.synthetic import SyntheticConfig, generate
from jfe_jax.train.trainer import train

CONFIGS = os.path.join(os.path.dirname(os.path.dirname(__file__)), "configs")


def _config(name, **fields):
    spec = importlib.util.spec_from_file_location(name, os.path.join(CONFIGS, f"{name}.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    config = module.get_config()
    with config.unlocked():
        for dotted, value in fields.items():
            node = config
            *parents, leaf = dotted.split(".")
            for p in parents:
                node = node[p]
            node[leaf] = value
    return config


def _windows(workdir):
    with open(os.path.join(workdir, "metrics.jsonl")) as f:
        return [json.loads(line) for line in f]


@pytest.fixture(scope="module")
def bench(tmp_path_factory):
    root = tmp_path_factory.mktemp("bench") / "synthetic"
    generate(str(root), SyntheticConfig(seed=1), progress=False)  # with its tokenizer
    return str(root)


@pytest.mark.slow
def test_stage1_then_stage2_loss_falls_and_accuracy_beats_chance(bench, tmp_path):
    batch = 16
    chance = 1.0 / batch
    stage1 = _config(
        "stage1_demo",
        **{
            "data.root": bench,
            "data.global_batch_size": batch,
            "train.num_steps": 60,
            "train.log_every": 10,
            "optimizer.warmup_steps": 5,
        },
    )
    train(stage1, str(tmp_path / "s1"))
    logs = _windows(tmp_path / "s1")
    assert logs[-1]["loss"] < 0.75 * logs[0]["loss"], logs
    assert logs[-1]["accuracy"] > 5 * chance, logs

    stage2 = _config(
        "stage2_demo",
        **{
            "data.root": bench,
            "data.global_batch_size": batch,
            "model.init_from": str(tmp_path / "s1"),
            "train.num_steps": 100,
            "train.log_every": 10,
            "optimizer.warmup_steps": 5,
        },
    )
    train(stage2, str(tmp_path / "s2"))
    logs = _windows(tmp_path / "s2")
    assert logs[-1]["loss"] < 0.8 * logs[0]["loss"], logs
    assert logs[-1]["accuracy"] > 4 * chance, logs
    # padding waste is logged: text is padded to length buckets, images to the patch budget
    for window in logs:
        assert 0.0 < window["token_padding"] < 1.0, window
        assert 0.0 < window["patch_padding"] < 1.0, window
        assert 0.0 < window["flops_padding"] < 1.0, window
    # stage 2 started from stage 1's weights, and its workdir carries the tokenizer
    with open(tmp_path / "s2" / "config.json") as f:
        assert json.load(f)["model"]["init_from"] == str(tmp_path / "s1")
    assert os.path.isfile(tmp_path / "s2" / "tokenizer" / "tokenizer.json")
