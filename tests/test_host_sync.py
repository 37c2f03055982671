"""The training loop leaves the device alone between log steps: the host reads no device value
(metrics, batch counts and the non-finite check stay on the device until a log step or a save),
and several hosts agree on saving and stopping without a collective between log steps.

Reads are caught by ``jax.transfer_guard_device_to_host("disallow_explicit")`` (explicit reads
such as ``jax.device_get`` too) where a device array lives apart from the host. On CPU the guard
never fires: an array's value is host memory already, read without a transfer (jax issue
#16602). So on CPU the test also fails any read of a ``jax.Array``'s value
(``ArrayImpl._value``), the path every read of an array spread over several devices takes
(``jax.device_get``, ``np.asarray``, ``float``, ``.item()``, printing), which the trainer's
arrays all are on the 8 test devices.
"""

import contextlib
import functools
import json
import logging
import os
import re
import subprocess
import sys
import time

import jax
import numpy as np
import portpicker
import pytest
from jax._src import array as array_lib
from train_fixtures import ToyPairs

from jfe_jax.models.batches import LateFusionBatch
from jfe_jax.models.flops import train_step_flops
from jfe_jax.models.inputs import prepare_batch
from jfe_jax.models.packing import pack_items
from jfe_jax.models.padding import padding_counts
from jfe_jax.models.sizes import get_size
from jfe_jax.train import checkpoint as ckpt
from jfe_jax.train import mesh as mesh_lib
from jfe_jax.train.accounting import COUNTS, batch_counts
from jfe_jax.train.config_base import base_config
from jfe_jax.train.metrics import first_non_finite, read_window, window_add

HERE = os.path.dirname(__file__)


class DeviceReadsRefused(AssertionError):
    """A device value was read on the host where the loop must not read any."""


class GuardBetweenLogSteps:
    """Wraps the trainer's data iterator: from the batch of each step in ``guarded`` (1-based,
    counted from the first batch drawn) until the next batch is drawn, reading a device value
    raises. Those steps neither log nor save, so the loop has no reason to read anything."""

    def __init__(self, inner, guarded: set[int], monkeypatch):
        self.inner, self.guarded, self.drawn = inner, guarded, 0
        self.guarding = False
        self.stack = contextlib.ExitStack()
        read_value = array_lib.ArrayImpl._value.fget

        def refusing_read(array):
            if self.guarding:
                raise DeviceReadsRefused(
                    f"a jax.Array {array.shape} was read back during step {self.drawn}, "
                    "which neither logs nor saves"
                )
            return read_value(array)

        monkeypatch.setattr(array_lib.ArrayImpl, "_value", property(refusing_read))

    def __next__(self):
        self.release()
        self.drawn += 1
        batch = next(self.inner)
        if self.drawn in self.guarded:
            self.stack.enter_context(jax.transfer_guard_device_to_host("disallow_explicit"))
            self.guarding = True
        return batch

    def release(self):
        self.guarding = False
        self.stack.close()

    def get_state(self):
        return self.inner.get_state()

    def set_state(self, state):
        self.inner.set_state(state)


def _config(**train):
    c = base_config()
    c.data.global_batch_size = 8
    c.mesh.data = 8
    c.optimizer.warmup_steps = 0
    c.train.checkpoint_every_seconds = 1e9
    for name, value in train.items():
        c.train[name] = value
    c.lock()
    return c


@pytest.fixture(scope="module")
def guarded_run(tmp_path_factory):
    """7 steps that log at 3, 6 and 7 (the last step) and save at 5 and 7, with device reads
    refused during steps 1, 2 and 4, which do neither: (workdir, config, summary)."""
    from jfe_jax.train.trainer import train

    workdir = tmp_path_factory.mktemp("guarded")
    c = _config(num_steps=7, log_every=3, checkpoint_every_steps=5)
    with pytest.MonkeyPatch.context() as monkeypatch:
        data = GuardBetweenLogSteps(
            ToyPairs(get_size("tiny"), batch_size=8), guarded={1, 2, 4}, monkeypatch=monkeypatch
        )
        try:
            summary = train(c, str(workdir), data=data)
        finally:
            data.release()
    assert data.drawn == 7
    return workdir, c, summary


def test_steps_between_log_steps_read_nothing_back_from_the_devices(guarded_run):
    workdir, _, summary = guarded_run
    assert summary["step"] == 7 and summary["completed"] is True
    assert ckpt.latest_step(str(workdir)) == 7
    with open(workdir / "metrics.jsonl") as f:
        lines = [json.loads(line) for line in f]
    assert [line["step"] for line in lines] == [3, 6, 7]
    for line in lines:
        assert np.isfinite(line["loss"]) and 0 < line["examples_per_second"]
        assert 0 < line["tokens_per_second"] and 0 < line["flops_per_second"]
        # ToyPairs rows have no padded tokens; half its candidates have no image.
        assert line["token_padding"] == 0 and line["patch_padding"] == 0.5
        assert 0 < line["flops_padding"] < 1


def test_rerunning_a_finished_run_says_so_and_keeps_its_summary(guarded_run, caplog):
    from jfe_jax.train.trainer import train
    from jfe_jax.workdir import TRAIN_SUMMARY_FILE as SUMMARY_FILE

    workdir, c, summary = guarded_run
    before = (workdir / SUMMARY_FILE).read_text()
    with caplog.at_level(logging.INFO, logger="jfe_jax"):
        again = train(c, str(workdir), data=ToyPairs(get_size("tiny"), batch_size=8))
    assert again == summary and np.isfinite(again["loss"])
    assert (workdir / SUMMARY_FILE).read_text() == before
    assert any("nothing to train" in r.getMessage() for r in caplog.records)
    with open(workdir / "metrics.jsonl") as f:
        assert [json.loads(line)["step"] for line in f] == [3, 6, 7]


def test_a_non_finite_loss_stops_before_a_save_between_log_steps(tmp_path):
    from jfe_jax.train.trainer import NonFiniteLossError, train

    c = base_config()
    c.data.global_batch_size = 8
    c.mesh.data = 8
    c.optimizer.learning_rate = 1e30  # the first update blows the parameters up
    c.optimizer.warmup_steps = 0
    c.optimizer.max_grad_norm = 0.0
    c.train.num_steps = 5
    c.train.checkpoint_every_steps = 1
    c.train.log_every = 4  # step 2 saves without logging: the check runs before the save
    c.lock()
    with pytest.raises(
        NonFiniteLossError, match=r"loss is nan at step 2; .* last good checkpoint is step 1"
    ):
        train(c, str(tmp_path), data=ToyPairs(get_size("tiny"), batch_size=8))
    assert ckpt.latest_step(str(tmp_path)) == 1


# ---------------------------------------------------------------------------- the log window


def test_the_log_window_averages_on_the_device_and_keeps_the_first_non_finite_loss():
    rng = np.random.default_rng(0)
    steps = []
    for i in range(5):
        count = np.float32(8)
        loss = np.float32(rng.uniform(1, 3)) * count
        if i == 2:
            loss = np.float32(np.nan)
        if i == 3:
            loss = np.float32(np.inf)
        steps.append(
            {
                "loss": (loss, count),
                "accuracy": (np.float32(rng.integers(0, 9)), count),
                "grad_norm": np.float32(rng.uniform()),
            }
        )
    add = jax.jit(window_add)
    window = None
    for i, metrics in enumerate(steps):
        window = add(window, metrics, {"tokens": np.float32(10 + i)})
        if i == 1:
            assert first_non_finite(window) is None
    summary = read_window(window)
    assert summary.steps == 5
    assert summary.first_non_finite[0] == 2 and np.isnan(summary.first_non_finite[1])
    assert first_non_finite(window)[0] == 2
    assert summary.counts == {"tokens": 60.0}
    accuracy = sum(float(m["accuracy"][0]) for m in steps) / 40
    assert summary.scalars["accuracy"] == pytest.approx(accuracy, rel=1e-6)
    grad_norm = np.mean([float(m["grad_norm"]) for m in steps])
    assert summary.scalars["grad_norm"] == pytest.approx(grad_norm, rel=1e-6)
    assert np.isnan(summary.scalars["loss"])


# ---------------------------------------------------------------------------- batch counts


def _item(config, rng, length, image):
    """(input_ids, pixel_values, image_grid_thw) of one item; an image is 16 patches."""
    ids = rng.integers(0, config.text.vocab_size - 16, size=length)
    if not image:
        return ids, None, None
    merge = config.vision.spatial_merge_size
    ids[1 : 1 + 16 // merge**2] = config.image_token_id
    pixels = rng.normal(size=(16, config.vision.patch_dim)).astype(np.float32)
    return ids, pixels, np.array([[1, 2 * merge, 2 * merge]])


def _packed_side(config, rng):
    lengths = [8, 9, 12, 7, 7, 14, 6, 8, 10, 9, 11, 5, 6, 9, 7, 10]
    items = [_item(config, rng, n, image=i % 3 == 0) for i, n in enumerate(lengths)]
    ids, pixels, grids = zip(*items)
    return pack_items(config, ids, pixels, grids, length=24, num_patches=32, num_rows=8)


def _late_side(config, rng):
    text = prepare_batch(config, rng.integers(0, config.text.vocab_size - 16, size=(8, 10)))
    mask = np.ones((8, 10), np.int32)
    mask[:, 7:] = np.arange(8)[:, None] % 2  # odd rows use every position
    text = text.replace(attention_mask=mask)
    images = [_item(config, rng, 12, image=True) for _ in range(8)]
    image = prepare_batch(
        config,
        np.stack([ids for ids, _, _ in images]),
        None,
        np.concatenate([p for _, p, _ in images]),
        np.concatenate([g for _, _, g in images]),
        num_patches=16,
    )
    return LateFusionBatch(
        text=text,
        image=image,
        has_text=np.array([1, 1, 0, 1, 0, 1, 1, 1], np.float32),
        has_image=np.array([1, 0, 1, 1, 1, 0, 0, 1], np.float32),
    )


def _tokens_seen(side):
    """The trainer's former host count: real tokens of the parts each item has."""
    if isinstance(side, LateFusionBatch):
        pairs = ((side.text, side.has_text), (side.image, side.has_image))
        return sum(float(np.sum(part.attention_mask * has[:, None])) for part, has in pairs)
    return float(np.sum(side.attention_mask))


@pytest.mark.parametrize("kind", ["early_fusion", "packed", "late_fusion"])
def test_device_batch_counts_match_the_host_padding_counts(kind):
    config = get_size("tiny")
    rng = np.random.default_rng(3)
    batch = next(ToyPairs(config, batch_size=8, seed=2))
    if kind == "packed":
        batch = batch.replace(candidate=_packed_side(config, rng))
    elif kind == "late_fusion":
        batch = batch.replace(query=_late_side(config, rng))
    mesh = mesh_lib.make_mesh({"data": 8, "fsdp": 1, "tensor": 1})
    global_batch = mesh_lib.global_batch_from_host(batch, mesh)
    counts = jax.device_get(jax.jit(functools.partial(batch_counts, config))(global_batch))
    assert sorted(counts) == sorted(COUNTS)

    expected = {k: float(v) for k, v in padding_counts(batch, config).items()}
    expected["step_flops"] = train_step_flops(config, batch)
    expected["tokens_seen"] = sum(_tokens_seen(side) for side in (batch.query, batch.candidate))
    for name in COUNTS:
        assert float(counts[name]) == pytest.approx(expected[name], rel=2e-6), name
    assert expected["real_flops"] < expected["flops"] and expected["real_patches"] > 0


# ---------------------------------------------------------------------------- several hosts

MULTIHOST_SCRIPT = os.path.join(HERE, "multihost_script.py")


@pytest.mark.slow
def test_sigterm_on_one_host_stops_both_at_the_same_step_with_a_checkpoint(tmp_path):
    """Process 1 of 2 gets SIGTERM at its second batch. No step before the stop logs, so no
    allgather can carry the notice: JAX's preemption service does, and both processes stop
    after the same step, which is saved and logged."""
    steps, port, workdir = 8, portpicker.pick_unused_port(), tmp_path / "run"
    env = dict(os.environ, JFE_TEST_SIGTERM="1@2", JFE_TEST_LOG_EVERY="100")
    env.pop("XLA_FLAGS", None)  # the script sets its own device count
    logs = [tmp_path / f"process{i}.log" for i in (0, 1)]
    procs = []
    for i in (0, 1):
        with open(logs[i], "wb") as log:
            procs.append(
                subprocess.Popen(
                    [sys.executable, MULTIHOST_SCRIPT, str(workdir), str(steps), "2", str(i)]
                    + [str(port)],
                    stdout=log,
                    stderr=subprocess.STDOUT,
                    env=env,
                )
            )
    deadline = time.monotonic() + 300
    try:
        while any(p.poll() is None for p in procs) and time.monotonic() < deadline:
            if any(p.poll() not in (None, 0) for p in procs):
                break
            time.sleep(0.5)
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
                p.wait(timeout=30)
    outputs = [log.read_text(errors="replace") for log in logs]
    for i, (p, out) in enumerate(zip(procs, outputs)):
        assert p.returncode == 0, f"process {i} exited with {p.returncode}:\n{out[-3000:]}"
    stops = [
        re.findall(rf"process {i} stopped at step (\d+)", out) for i, out in enumerate(outputs)
    ]
    assert all(len(s) == 1 for s in stops), outputs[0][-2000:] + outputs[1][-2000:]
    step = int(stops[0][0])
    assert int(stops[1][0]) == step and 2 <= step < steps
    assert ckpt.latest_step(str(workdir)) == step
    with open(workdir / "metrics.jsonl") as f:
        assert [json.loads(line)["step"] for line in f] == [step]
