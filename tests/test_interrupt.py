"""Stopping and restarting runs: SIGTERM and Ctrl-C, one trainer per workdir, refused configs."""

import json
import logging
import os
import signal
import socket
import subprocess
import sys

import jax
import numpy as np
import pytest
from flax import traverse_util

from jfe_jax.cli import EXIT_INTERRUPTED, main
from jfe_jax.train import checkpoint as ckpt
from jfe_jax.train.run_control import WorkdirLock, training_completed
from jfe_jax.workdir import TRAIN_LOCK_FILE as LOCK_FILE

HERE = os.path.dirname(__file__)
SCRIPT = os.path.join(HERE, "interrupt_script.py")
RESUME_SCRIPT = os.path.join(HERE, "resume_script.py")
STOPPED = "stopped at step {} of {} (checkpoint saved); rerun the same command to resume"


def _jfe(tmp_path, command, workdir, steps, signal_spec=None):
    """Runs interrupt_script.py (``jfe COMMAND`` through cli.main) in ``tmp_path`` with the
    workdir given relative to it, as a user types it; (exit status, output)."""
    env = dict(os.environ)
    env.pop("JFE_TEST_SIGNAL", None)
    if signal_spec:
        env["JFE_TEST_SIGNAL"] = signal_spec
    # No persistent compilation cache: a CPU program with collectives loaded from it hung
    # (all 8 host devices waiting) on the rerun of a demo.
    # Two host devices: stopping and resuming is what these runs test (the sharded step is
    # tested on 8 elsewhere), and they compile and run in about half the time. On a loaded
    # machine one device can reach a collective over 40 s after the other, when XLA would
    # abort the process.
    env["XLA_FLAGS"] = (
        "--xla_force_host_platform_device_count=2"
        " --xla_cpu_collective_call_terminate_timeout_seconds=600 "
        + env.get("JFE_TEST_COMPILE_FLAGS", "")  # conftest.py: faster compiles
    )
    proc = subprocess.run(
        [sys.executable, SCRIPT, command, os.path.relpath(workdir, tmp_path), str(steps)],
        cwd=tmp_path,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        timeout=600,
    )
    return proc.returncode, proc.stdout.decode()


def _stop_lines(output):
    return [line for line in output.splitlines() if "stopped at step" in line]


def _summary(workdir):
    with open(os.path.join(workdir, "train_summary.json")) as f:
        return json.load(f)


def _params(workdir):
    params, step = ckpt.restore_params(str(workdir))
    flat = traverse_util.flatten_dict(jax.device_get(params))
    return step, {k: np.asarray(v) for k, v in flat.items()}


@pytest.mark.slow
def test_sigterm_and_ctrl_c_stop_jfe_train_at_a_checkpoint_and_the_rerun_finishes_bitwise(
    tmp_path,
):
    steps = 6
    straight = tmp_path / "straight"
    code, output = _jfe(tmp_path, "train", straight, steps)
    assert code == 0, output[-3000:]
    assert not os.path.exists(straight / LOCK_FILE)  # released when train returns

    run = tmp_path / "run"
    code, output = _jfe(tmp_path, "train", run, steps, "TERM@2")  # a signal at batch 2
    assert code == EXIT_INTERRUPTED, output[-3000:]
    assert _stop_lines(output) == ["jfe train: " + STOPPED.format(2, steps)], output[-3000:]
    assert "Traceback" not in output
    assert ckpt.latest_step(str(run)) == 2
    assert _summary(run)["completed"] is False
    assert not training_completed(str(run), steps)

    # The same command again resumes at step 2; Ctrl-C at its second batch stops after step 4.
    code, output = _jfe(tmp_path, "train", run, steps, "INT@2")
    assert code == EXIT_INTERRUPTED, output[-3000:]
    assert _stop_lines(output) == ["jfe train: " + STOPPED.format(4, steps)], output[-3000:]
    assert "Traceback" not in output
    assert ckpt.latest_step(str(run)) == 4

    code, output = _jfe(tmp_path, "train", run, steps)
    assert code == 0, output[-3000:]
    assert f"finished step {steps}" in output
    assert training_completed(str(run), steps)
    step_a, params_a = _params(straight)
    step_b, params_b = _params(run)
    assert step_a == step_b == steps
    assert params_a.keys() == params_b.keys()
    for key in params_a:
        np.testing.assert_array_equal(params_a[key], params_b[key], err_msg=str(key))
    with open(run / "metrics.jsonl") as f:
        assert [json.loads(line)["step"] for line in f] == list(range(1, steps + 1))


@pytest.mark.slow
def test_ctrl_c_and_sigterm_during_jfe_demo_leave_the_stage_unfinished_and_reruns_finish_bitwise(
    tmp_path,
):
    demo = tmp_path / "demo"
    code, output = _jfe(tmp_path, "demo", demo, 4, "stage1:INT@2")
    assert code == EXIT_INTERRUPTED, output[-3000:]
    assert _stop_lines(output) == ["jfe demo: stage1 " + STOPPED.format(2, 4)], output[-3000:]
    assert "Traceback" not in output
    assert not training_completed(str(demo / "stage1"), 4)
    assert ckpt.latest_step(str(demo / "stage1")) == 2
    assert not os.path.exists(demo / "stage2")

    code, output = _jfe(tmp_path, "demo", demo, 4, "stage2:TERM@2")
    assert code == EXIT_INTERRUPTED, output[-3000:]
    assert _stop_lines(output) == ["jfe demo: stage2 " + STOPPED.format(2, 4)], output[-3000:]
    assert "Traceback" not in output
    assert training_completed(str(demo / "stage1"), 4)
    assert not training_completed(str(demo / "stage2"), 4)
    assert ckpt.latest_step(str(demo / "stage2")) == 2
    assert not os.path.exists(demo / "eval")  # the demo went no further

    code, output = _jfe(tmp_path, "demo", demo, 4)
    assert code == 0, output[-3000:]
    assert "average" in output
    with open(demo / "demo_summary.json") as f:
        summary = json.load(f)
    # Reused this time, with the times the interrupted runs recorded when they finished them.
    assert summary["reused"] == ["data", "stage1"]
    assert all(isinstance(summary["seconds"][s], float) for s in ("data", "stage1", "stage2"))
    assert training_completed(str(demo / "stage2"), 4)
    for stage in ("stage1", "stage2"):
        with open(demo / stage / "metrics.jsonl") as f:  # steps 3 and 4 only were run again
            assert [json.loads(line)["step"] for line in f] == [1, 2, 3, 4]

    # The same demo, never interrupted: both stages end with the same parameters, bitwise.
    straight = tmp_path / "straight"
    code, output = _jfe(tmp_path, "demo", straight, 4)
    assert code == 0, output[-3000:]
    for stage in ("stage1", "stage2"):
        (step_a, params_a), (step_b, params_b) = _params(straight / stage), _params(demo / stage)
        assert step_a == step_b == 4 and params_a.keys() == params_b.keys()
        for key in params_a:
            np.testing.assert_array_equal(params_a[key], params_b[key], err_msg=f"{stage} {key}")


def test_a_second_trainer_on_a_workdir_is_refused_with_one_line(tmp_path, capsys):
    workdir = tmp_path / "run"
    with WorkdirLock(str(workdir)):
        code = main(["train", "--config", RESUME_SCRIPT, "--workdir", str(workdir)])
    assert code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1
    assert err[0].startswith(
        f"jfe train: error: workdir {workdir} is in use by jfe train pid {os.getpid()} on host "
        f"{socket.gethostname()} since "
    )
    assert err[0].endswith("; wait for it or stop it")
    assert not os.path.exists(workdir / "config.json")  # refused before writing anything
    assert not os.path.exists(workdir / LOCK_FILE)  # and the holder removed it on release


def test_a_lock_left_by_a_dead_trainer_is_taken_over_with_a_warning(tmp_path, caplog):
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    record = {"host": socket.gethostname(), "pid": dead.pid, "started": "2024-01-01T00:00:00"}
    (tmp_path / LOCK_FILE).write_text(json.dumps(record))
    with caplog.at_level(logging.WARNING), WorkdirLock(str(tmp_path)):
        with open(tmp_path / LOCK_FILE) as f:
            assert json.load(f)["pid"] == os.getpid()
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1 and f"pid {dead.pid}" in warnings[0], warnings
    assert not os.path.exists(tmp_path / LOCK_FILE)


@pytest.mark.parametrize(
    "override, field",
    [
        ("train.keep_checkpoints=0", "train.keep_checkpoints"),
        ("optimizer.trainable=lora", "model.lora_rank"),  # the config's lora_rank is 0
        ("optimizer.learning_rate=-0.001", "optimizer.learning_rate"),
        ("optimizer.learning_rate=0", "optimizer.learning_rate"),
    ],
)
def test_a_config_that_cannot_be_meant_is_refused_naming_the_field(
    override, field, tmp_path, capsys
):
    argv = ["train", "--config", RESUME_SCRIPT, "--workdir", str(tmp_path), f"--config.{override}"]
    assert main(argv) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and field in err[0], err
    assert not os.path.exists(tmp_path / "config.json")


def test_a_log_window_of_zero_gradients_warns_once(tmp_path, caplog):
    from train_fixtures import ToyPairs

    from jfe_jax.models.sizes import get_size
    from jfe_jax.train.config_base import base_config
    from jfe_jax.train.trainer import train

    c = base_config()
    c.data.global_batch_size = 8
    c.mesh.data = 8
    c.optimizer.trainable = "lora"
    c.model.lora_rank = 1
    c.model.lora_targets = ()  # no adapters anywhere: nothing is trainable
    c.optimizer.warmup_steps = 0
    c.train.num_steps = 2
    c.train.log_every = 1
    c.lock()
    with caplog.at_level(logging.WARNING):
        train(c, str(tmp_path / "run"), data=ToyPairs(get_size("tiny"), batch_size=8))
    warnings = [r.getMessage() for r in caplog.records if "gradient norm" in r.getMessage()]
    assert warnings == [
        "the gradient norm was exactly 0 at every step of the log window ending at step 1: "
        "nothing is training (every parameter frozen?)"
    ]


def test_first_ctrl_c_asks_to_stop_the_second_aborts_and_close_restores_the_handlers(tmp_path):
    # Python's own Ctrl-C handler, as in a terminal (a test run started as a background job
    # inherits SIGINT ignored; the next test covers that case).
    inherited = signal.signal(signal.SIGINT, signal.default_int_handler)
    try:
        before = signal.getsignal(signal.SIGINT), signal.getsignal(signal.SIGTERM)
        checkpointer = ckpt.Checkpointer(
            str(tmp_path), every_steps=0, every_seconds=1e9, keep=1, asynchronous=False
        )
        checkpointer.install_stop_handlers()
        try:
            os.kill(os.getpid(), signal.SIGINT)
            assert checkpointer.stop_requested
            assert checkpointer.should_save(1, last_step=False) and checkpointer.stopping
            with pytest.raises(KeyboardInterrupt):
                os.kill(os.getpid(), signal.SIGINT)
        finally:
            checkpointer.close()
        assert (signal.getsignal(signal.SIGINT), signal.getsignal(signal.SIGTERM)) == before
    finally:
        signal.signal(signal.SIGINT, inherited)


def test_an_ignored_ctrl_c_stays_ignored_as_for_a_background_job(tmp_path):
    inherited = signal.signal(signal.SIGINT, signal.SIG_IGN)
    try:
        checkpointer = ckpt.Checkpointer(
            str(tmp_path), every_steps=0, every_seconds=1e9, keep=1, asynchronous=False
        )
        checkpointer.install_stop_handlers()
        try:
            assert signal.getsignal(signal.SIGINT) == signal.SIG_IGN
            os.kill(os.getpid(), signal.SIGINT)
            assert not checkpointer.stop_requested
            os.kill(os.getpid(), signal.SIGTERM)  # SIGTERM still stops the run
            assert checkpointer.stop_requested
        finally:
            checkpointer.close()
        assert signal.getsignal(signal.SIGINT) == signal.SIG_IGN
    finally:
        signal.signal(signal.SIGINT, inherited)


def test_jfe_exits_130_with_one_line_on_a_keyboard_interrupt(monkeypatch, capsys):
    import jfe_jax.cli as cli

    def interrupted(argv):
        raise KeyboardInterrupt

    monkeypatch.setitem(cli.COMMANDS, "train", (interrupted, "train"))
    assert cli.main(["train"]) == cli.EXIT_ABORTED == 130
    assert capsys.readouterr().err.strip().splitlines() == ["jfe train: aborted by Ctrl-C"]
