"""The trainer: resume after SIGKILL, preemption by SIGTERM, and config errors."""

import json
import os
import signal
import subprocess
import sys
import time

import jax
import numpy as np
import pytest
from flax import traverse_util

from jfe_jax.encoder import Encoder
from jfe_jax.train import checkpoint as ckpt
from jfe_jax.train.config_base import base_config
from jfe_jax.train.setup import validate_config

HERE = os.path.dirname(__file__)
SCRIPT = os.path.join(HERE, "resume_script.py")


def _run(workdir, steps, hang=None):
    args = [sys.executable, SCRIPT, str(workdir), str(steps)] + ([str(hang)] if hang else [])
    return subprocess.Popen(args, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)


def _losses(workdir):
    with open(os.path.join(workdir, "metrics.jsonl")) as f:
        return {r["step"]: r["loss"] for r in map(json.loads, f)}


def _params(workdir):
    params, step = ckpt.restore_params(str(workdir))
    flat = traverse_util.flatten_dict(jax.device_get(params))
    return step, {k: np.asarray(v) for k, v in flat.items()}


def test_resume_after_sigkill_reproduces_the_straight_run_bitwise(tmp_path):
    steps = 6
    straight = _run(tmp_path / "straight", steps)
    assert straight.wait(timeout=600) == 0, straight.stdout.read().decode()[-3000:]

    # The second run blocks on batch 4 (after step 3's checkpoint), then gets SIGKILL.
    killed = _run(tmp_path / "resumed", steps, hang=4)
    deadline = time.time() + 600
    while ckpt.latest_step(str(tmp_path / "resumed")) != 3:
        assert killed.poll() is None, killed.stdout.read().decode()[-3000:]
        assert time.time() < deadline, "no checkpoint at step 3"
        time.sleep(1)
    killed.send_signal(signal.SIGKILL)
    killed.wait()
    resumed = _run(tmp_path / "resumed", steps)
    assert resumed.wait(timeout=600) == 0, resumed.stdout.read().decode()[-3000:]

    step_a, params_a = _params(tmp_path / "straight")
    step_b, params_b = _params(tmp_path / "resumed")
    assert step_a == step_b == steps
    assert params_a.keys() == params_b.keys()
    for key in params_a:
        np.testing.assert_array_equal(params_a[key], params_b[key], err_msg=str(key))
    losses_a, losses_b = _losses(tmp_path / "straight"), _losses(tmp_path / "resumed")
    for step in range(4, steps + 1):
        assert losses_a[step] == losses_b[step]

    # The workdir is also a model directory for the public API.
    encoder = Encoder.from_pretrained(str(tmp_path / "resumed"))
    assert encoder.step == steps
    flat = traverse_util.flatten_dict(jax.device_get(encoder.params))
    for key in params_b:
        np.testing.assert_array_equal(np.asarray(flat[key]), params_b[key])


def _config(**overrides):
    c = base_config()
    for dotted, value in overrides.items():
        node = c
        *parents, leaf = dotted.split("__")
        for p in parents:
            node = node[p]
        node[leaf] = value
    c.lock()
    return c


def test_batch_not_divisible_by_data_parallel_size_fails_before_compiling():
    c = _config(data__global_batch_size=12, mesh__data=8)
    with pytest.raises(
        ValueError, match="global batch size 12 is not divisible by the data-parallel size 8"
    ):
        validate_config(c)


def test_mesh_whose_product_is_not_the_device_count_fails():
    c = _config(mesh__data=2, mesh__fsdp=2, mesh__tensor=1)
    with pytest.raises(ValueError, match="8 are available"):
        validate_config(c)


def test_stage2_without_a_stage1_checkpoint_fails(tmp_path):
    c = _config(stage="stage2", data__kind="mbeir", model__init_from=str(tmp_path))
    with pytest.raises(ValueError, match="has no stage-1 checkpoint"):
        validate_config(c)
    c = _config(stage="stage2", data__kind="mbeir")
    with pytest.raises(ValueError, match="stage 2 needs model.init_from"):
        validate_config(c)


def test_unknown_config_key_on_the_command_line_fails(tmp_path, capsys):
    from jfe_jax.cli import main

    config_file = os.path.join(os.path.dirname(HERE), "configs", "stage1_demo.py")
    code = main(
        [
            "train",
            "--config",
            config_file,
            "--workdir",
            str(tmp_path),
            "--config.optimizer.lerning_rate=0.1",
        ]
    )
    assert code == 2
    assert "lerning_rate" in capsys.readouterr().err
    assert not os.path.exists(tmp_path / "config.json")  # failed before anything ran


def test_grad_cache_chunk_must_divide_the_batch():
    c = _config(data__global_batch_size=16, train__grad_cache_chunk=5)
    with pytest.raises(ValueError, match="grad_cache_chunk=5 does not divide"):
        validate_config(c)


def test_non_finite_loss_stops_with_a_clear_error_and_keeps_the_last_checkpoint(tmp_path):
    from train_fixtures import ToyPairs

    from jfe_jax.models.sizes import get_size
    from jfe_jax.train.trainer import NonFiniteLossError, train

    c = base_config()
    c.data.global_batch_size = 8
    c.mesh.data = 8
    c.optimizer.learning_rate = 1e30  # the first update blows the parameters up
    c.optimizer.warmup_steps = 0
    c.optimizer.max_grad_norm = 0.0
    c.train.num_steps = 5
    c.train.checkpoint_every_steps = 1
    c.train.log_every = 1
    c.lock()
    workdir = str(tmp_path / "nan")
    with pytest.raises(
        NonFiniteLossError, match=r"loss is nan at step 2; .* last good checkpoint is step 1"
    ):
        train(c, workdir, data=ToyPairs(get_size("tiny"), batch_size=8))
    assert ckpt.latest_step(workdir) == 1
    params, step = ckpt.restore_params(workdir)
    assert step == 1
    assert all(np.all(np.isfinite(np.asarray(x))) for x in jax.tree_util.tree_leaves(params))


def test_padding_fractions_of_a_train_batch():
    import numpy as np

    from jfe_jax.models.padding import padding_counts, padding_fractions
    from jfe_jax.models.sizes import get_size

    config = get_size("tiny")
    query_mask = np.array([[1, 1, 1, 0], [1, 1, 0, 0]], dtype=np.int32)
    candidate_mask = np.array([[1, 1, 1, 1, 0, 0], [1, 0, 0, 0, 0, 0]], dtype=np.int32)
    side = lambda mask: {  # noqa: E731
        "input_ids": np.ones_like(mask),
        "attention_mask": mask,
        "position_ids": np.zeros((mask.shape[0], 3, mask.shape[1]), np.int32),
    }
    batch = {
        "query": side(query_mask),
        "candidate": side(candidate_mask),
        "query_key": np.arange(2, dtype=np.int32),
    }
    fractions = padding_fractions(padding_counts(batch, config))
    # 5 + 5 real tokens of 8 + 12 positions
    assert fractions["token_padding"] == pytest.approx(1 - 10 / 20)
    assert "patch_padding" not in fractions  # no images in this batch
    assert 0.0 < fractions["flops_padding"] < 1.0


def test_config_overrides_apply_when_main_is_called_from_python():
    from jfe_jax.cli import parse_config_flags

    config_file = os.path.join(os.path.dirname(HERE), "configs", "stage1_demo.py")
    argv = ["--config", config_file, "--workdir", "w", "--config.train.num_steps=7"]
    values = parse_config_flags("jfe train", argv)
    assert values.config.train.num_steps == 7
    with pytest.raises(ValueError, match="unknown config key 'nope'"):
        parse_config_flags("jfe train", argv + ["--config.train.nope=1"])


class _Counter:
    """A stand-in for a grain loader: yields (name, n) with a checkpointable position."""

    def __init__(self, name):
        self.name, self.n = name, 0

    def __iter__(self):
        return self

    def __next__(self):
        self.n += 1
        return (self.name, self.n)

    def get_state(self):
        return str(self.n).encode()

    def set_state(self, state):
        self.n = int(state.decode())


def test_weighted_round_robin_draws_in_proportion_and_resumes_exactly():
    from jfe_jax.train.data import RoundRobin

    def make():
        loaders = {"a": _Counter("a"), "b": _Counter("b"), "c": _Counter("c")}
        return RoundRobin(loaders, weights={"a": 1, "b": 1, "c": 2}, seed=3)

    stream = make()
    first = [next(stream) for _ in range(2000)]
    share = sum(name == "c" for name, _ in first) / len(first)
    assert abs(share - 0.5) < 0.05, share  # c has half the weight
    assert {name for name, _ in first} == {"a", "b", "c"}
    # Same seed -> same draws; a restored state continues with exactly the next batches.
    again = make()
    assert [next(again) for _ in range(2000)] == first
    state = stream.get_state()
    expected = [next(stream) for _ in range(50)]
    resumed = make()
    resumed.set_state(state)
    assert [next(resumed) for _ in range(50)] == expected
    with pytest.raises(ValueError, match="one per stream"):
        RoundRobin({"a": _Counter("a")}, weights={"b": 1})
