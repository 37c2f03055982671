"""Every command as a user types it: from another directory, with relative paths.

Orbax refuses relative checkpoint paths and a relative M-BEIR root used to be joined twice;
these tests run in a working directory that is neither the repository nor the data's, and
name every input and output relative to it. ``jfe train`` and ``jfe demo`` into relative
workdirs, stopped and resumed, are in test_interrupt.py.
"""

import json
import os

import jax
import numpy as np
import pytest
from bench_fixtures import make_bench, small_synthetic, tiny_model

from jfe_jax.cli import main
from jfe_jax.encoder import Encoder

SMALL = small_synthetic(
    ("mscoco_task0", "webqa_task1"), train_queries_per_task=16, test_queries_per_task=4
)

# A stage config file as a user writes one: the demo's stage 1, made small.
CONFIG_FILE = """
from jfe_jax.train.config_base import demo_stage1_config


def get_config():
    c = demo_stage1_config()
    c.data.global_batch_size = 8
    c.optimizer.warmup_steps = 0
    c.train.num_steps = 2
    c.train.log_every = 1
    c.train.checkpoint_every_steps = 1
    c.lock()
    return c
"""


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    """``<base>/bench`` (data), ``<base>/model`` (a tiny HF dir) and ``<base>/cwd``, empty."""
    base = tmp_path_factory.mktemp("paths")
    tiny_model(base / "model", make_bench(base / "bench", SMALL), seed=3)
    (base / "cwd").mkdir()
    return base


def test_train_from_a_relative_init_from_and_data_root_then_load_it_relative(world, monkeypatch):
    # Saving into a relative workdir and resuming from it through `jfe train`: test_interrupt.py.
    monkeypatch.chdir(world / "cwd")
    with open("stage2_small.py", "w") as f:
        f.write(CONFIG_FILE)
    args = ["train", "--config", "stage2_small.py", "--workdir", "runs/s2"]
    stage2 = [
        "--config.stage=stage2",
        "--config.data.kind=mbeir",
        "--config.model.init_from=../model",
        "--config.data.root=../bench",
        "--config.train.num_steps=1",
    ]
    assert main([*args, *stage2]) == 0
    assert os.path.isdir("runs/s2/checkpoints/1") and os.path.isdir("runs/s2/tfds")
    encoder = Encoder.from_pretrained("runs/s2")
    assert encoder.step == 1 and encoder.source_dir == os.path.abspath("runs/s2")


def test_export_index_search_eval_and_convert_with_relative_paths(world, monkeypatch, capsys):
    monkeypatch.chdir(world / "cwd")
    common = ["--model", "../model", "--mbeir-root", "../bench"]
    assert main(["export", *common, "--pool", "mscoco_task0", "--out", "out/pool"]) == 0
    assert main(["export", *common, "--queries", "mscoco_task0", "--out", "out/q"]) == 0
    assert main(["index", "build", "--embeddings", "out/pool", "--out", "out/index"]) == 0
    assert (
        main(["index", "search", "--index", "out/index", "--queries", "out/q", "--out", "h.jsonl"])
        == 0
    )
    with open("h.jsonl") as f:
        assert len([json.loads(line) for line in f]) == SMALL.test_queries_per_task

    image = os.path.relpath(next((world / "bench" / "mbeir_images").rglob("*.png")))
    capsys.readouterr()
    search = ["search", "--model", "../model", "--index", "out/index", "--json"]
    assert main([*search, "--text", "a red circle", "--image", image]) == 0
    hits = json.loads(capsys.readouterr().out)["hits"]
    assert hits and all(os.path.isfile(h["image"]) for h in hits)

    assert main(["eval", *common, "--out", "out/eval", "--tasks", "mscoco_task0"]) == 0
    with open("out/eval/results.json") as f:
        assert set(json.load(f)["tasks"]) == {"mscoco_task0"}

    assert main(["convert", "--src", "../model", "--dst", "converted"]) == 0
    original, converted = Encoder.from_pretrained("../model"), Encoder.from_pretrained("converted")
    assert converted.source_dir == os.path.abspath("converted")
    for a, b in zip(
        jax.tree_util.tree_leaves(original.params), jax.tree_util.tree_leaves(converted.params)
    ):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
