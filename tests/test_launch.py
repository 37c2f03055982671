"""launch/tpu.py: the gcloud commands it prints, its input errors, and its remote scripts.

Nothing here reaches the network: dry runs only print; ``--yes`` runs against a fake
``gcloud`` on PATH; the remote shell scripts run locally with HOME in a temporary directory
and a fake ``jfe`` that records its arguments and waits for SIGTERM.
"""

import importlib.util
import os
import shlex
import subprocess
import sys
import time

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SCRIPT = os.path.join(ROOT, "launch", "tpu.py")
CONFIG = os.path.join(ROOT, "configs", "stage1_2b.py")
WHERE = ["--name", "jfe-v5p", "--zone", "us-east5-a", "--project", "my-proj"]

_spec = importlib.util.spec_from_file_location("launch_tpu", SCRIPT)
tpu = importlib.util.module_from_spec(_spec)
sys.modules[_spec.name] = tpu  # dataclasses look their module up there
_spec.loader.exec_module(tpu)


def dry(capsys, *argv):
    """Runs the CLI without --yes; returns the printed commands, each split into argv."""
    assert tpu.main(list(argv)) == 0
    out = capsys.readouterr().out.splitlines()
    assert out[0].startswith(f"# {argv[0]}: ") and "not run" in out[0]
    return [shlex.split(line) for line in out[1:]]


def remote_script(command):
    (script,) = [a[len("--command=") :] for a in command if a.startswith("--command=")]
    return script


def fails(capsys, *argv, match):
    assert tpu.main(list(argv)) == 2
    err = capsys.readouterr().err
    assert match in err, err
    return err


def check_shell_syntax(script):
    result = subprocess.run(["sh", "-n", "-c", script], capture_output=True, text=True, timeout=30)
    assert result.returncode == 0, result.stderr


# ============================================================================ dry runs


def test_create_prints_a_tpu_vm_create_with_type_zone_and_runtime(capsys):
    (command,) = dry(capsys, "create", *WHERE, "--accelerator-type", "v5p-64", "--spot")
    assert command[:6] == ["gcloud", "compute", "tpus", "tpu-vm", "create", "jfe-v5p"]
    for flag in (
        "--accelerator-type=v5p-64",
        "--zone=us-east5-a",
        "--project=my-proj",
        "--version=v2-alpha-tpuv5",
        "--spot",
    ):
        assert flag in command


def test_create_queued_prints_a_queued_resource_with_its_node(capsys):
    argv = ["create", *WHERE, "--accelerator-type", "v4-32", "--queued", "--runtime-version"]
    (command,) = dry(capsys, *argv, "tpu-ubuntu2204-base", "--valid-until-duration", "6h")
    assert command[:6] == ["gcloud", "compute", "tpus", "queued-resources", "create", "jfe-v5p"]
    for flag in (
        "--node-id=jfe-v5p",
        "--accelerator-type=v4-32",
        "--runtime-version=tpu-ubuntu2204-base",
        "--valid-until-duration=6h",
    ):
        assert flag in command
    assert "--spot" not in command and "--preemptible" not in command


def test_setup_from_git_installs_the_tpu_extra_on_every_worker(capsys):
    repo = "https://github.com/example/jfe-jax.git"
    (command,) = dry(capsys, "setup", *WHERE, "--repo", repo, "--ref", "v0.1")
    assert command[:6] == ["gcloud", "compute", "tpus", "tpu-vm", "ssh", "jfe-v5p"]
    assert "--worker=all" in command and "--zone=us-east5-a" in command
    script = remote_script(command)
    assert f"git clone --quiet {repo}" in script
    assert f"fetch --quiet {repo} v0.1" in script
    assert 'pip" install --quiet -e "$HOME/jfe-jax[tpu]" gcsfs' in script
    assert "jax.distributed.initialize()" in script
    check_shell_syntax(script)


def test_setup_from_a_wheel_copies_it_to_every_worker(capsys, tmp_path):
    wheel = tmp_path / "jfe_jax-0.1.0-py3-none-any.whl"
    wheel.write_bytes(b"")
    copy, install = dry(capsys, "setup", *WHERE, "--wheel", str(wheel))
    assert copy[:5] == ["gcloud", "compute", "tpus", "tpu-vm", "scp"]
    assert copy[5:7] == [str(wheel), f"jfe-v5p:{wheel.name}"] and "--worker=all" in copy
    assert "--worker=all" in install
    assert f'install --quiet "$HOME/{wheel.name}[tpu]" gcsfs' in remote_script(install)
    check_shell_syntax(remote_script(install))


def test_run_starts_jfe_train_distributed_with_the_gs_workdir_on_every_worker(capsys):
    copy, start = dry(
        capsys,
        "run",
        *WHERE,
        "--config",
        CONFIG,
        "--workdir",
        "gs://my-bucket/jfe/stage1_2b",
        "--data",
        "gs://my-bucket/pairs",
        "--init-from",
        "gs://my-bucket/Qwen2-VL-2B-Instruct",
        "--",
        "--config.train.num_steps=10",
    )
    assert copy[:5] == ["gcloud", "compute", "tpus", "tpu-vm", "scp"]
    assert copy[5:7] == [CONFIG, "jfe-v5p:jfe-run/config/stage1_2b.py"]
    assert "--worker=all" in copy and "--worker=all" in start
    script = remote_script(start)
    for part in (
        '"$HOME/jfe-venv/bin/jfe" train --config="$HOME/jfe-run/config/stage1_2b.py"',
        "--workdir=gs://my-bucket/jfe/stage1_2b",
        "--config.train.distributed=True",
        "--config.train.num_steps=10",
        "gcloud storage rsync --recursive gs://my-bucket/pairs",
        "nohup sh -c",
        '> "$HOME/jfe-run/logs/stage1_2b.log" 2>&1',
    ):
        assert part in script, part
    check_shell_syntax(script)


def test_logs_stop_and_delete_print_their_commands(capsys):
    (logs,) = dry(capsys, "logs", *WHERE, "--worker", "3", "--follow", "--lines", "50")
    assert "--worker=3" in logs
    assert remote_script(logs) == 'tail -n 50 -F "$HOME/jfe-run/logs/latest.log"'
    (stop,) = dry(capsys, "stop", *WHERE)
    assert "--worker=all" in stop and 'kill -TERM "$(cat' in remote_script(stop)
    (kill,) = dry(capsys, "stop", *WHERE, "--force")
    assert 'kill -KILL "$(cat' in remote_script(kill)
    (delete,) = dry(capsys, "delete", *WHERE)
    assert delete[:6] == ["gcloud", "compute", "tpus", "tpu-vm", "delete", "jfe-v5p"]
    assert "--quiet" in delete and "--zone=us-east5-a" in delete
    (queued,) = dry(capsys, "delete", *WHERE, "--queued")
    assert queued[:5] == ["gcloud", "compute", "tpus", "queued-resources", "delete"]
    assert "--force" in queued
    for command in (logs, stop, kill):
        check_shell_syntax(remote_script(command))


def test_slice_sizes_map_to_host_counts():
    hosts = {"v5p-8": 1, "v5p-64": 8, "v4-32": 4, "v5litepod-8": 1, "v5litepod-16": 4}
    hosts.update({"v6e-256": 64, "v3-32": 4, "v2-8": 1})
    assert {name: tpu.parse_accelerator(name).hosts for name in hosts} == hosts


# ============================================================================ bad input


def test_unknown_accelerator_type_is_an_error(capsys):
    fails(capsys, "create", *WHERE, "--accelerator-type", "v9-8", match="unknown accelerator")
    fails(capsys, "create", *WHERE, "--accelerator-type", "v5p-12", match="no slice of size 12")
    fails(capsys, "create", *WHERE, "--accelerator-type", "v6e-3", match="1, 4, 8, 16")


def test_missing_required_arguments_exit_with_usage(capsys):
    for argv, missing in (
        (["create", "--name", "x", "--zone", "us-east5-a"], "--accelerator-type"),
        (["run", *WHERE, "--config", CONFIG], "--workdir"),
        (["stop", "--name", "x"], "--zone"),
        ([], "COMMAND"),
    ):
        with pytest.raises(SystemExit) as exit_info:
            tpu.main(argv)
        assert exit_info.value.code == 2
        assert missing in capsys.readouterr().err
    fails(capsys, "setup", *WHERE, match="exactly one of --repo URL")


def test_non_gs_workdir_for_a_multi_host_run_is_an_error(capsys):
    run = ["run", *WHERE, "--config", CONFIG]
    fails(capsys, *run, "--workdir", "/tmp/run", match="not a gs://BUCKET/PATH location")
    err = fails(
        capsys, *run, "--workdir", "/tmp/run", "--accelerator-type", "v5p-64", match="8 hosts"
    )
    assert "same place" in err
    fails(capsys, *run, "--workdir", "s3://bucket/run", match="not a gs://BUCKET/PATH")
    # One host may keep its workdir on its own disk.
    (_, start) = dry(capsys, *run, "--workdir", "/tmp/run", "--accelerator-type", "v5p-8")
    assert "--workdir=/tmp/run" in remote_script(start)


def test_other_bad_run_arguments_are_errors(capsys):
    run = ["run", *WHERE, "--config", CONFIG, "--workdir", "gs://b-1/run"]
    fails(capsys, *run, "--bogus", match="unrecognized argument '--bogus'")
    fails(capsys, *run, "--config.train.distributed=False", match="always True")
    fails(capsys, *run, "--data", "gs://b-1/d", "--config.data.root=/x", match="set by --data")
    fails(capsys, *run, "--data", "data/", match="--data 'data/' must be gs://")
    fails(capsys, "run", *WHERE, "--config", "nope.py", "--workdir", "gs://b-1/r", match="nope.py")
    bad_name = ["create", "--name", "Bad_Name", "--zone", "us-east5-a"]
    fails(capsys, *bad_name, "--accelerator-type", "v4-8", match="not a valid TPU name")
    argv = ["create", *WHERE, "--accelerator-type", "v4-8", "--queued", "--preemptible"]
    fails(capsys, *argv, match="use --spot")


# ============================================================================ execution


@pytest.fixture
def fake_gcloud(tmp_path, monkeypatch):
    """A ``gcloud`` on PATH that appends its arguments (one per line) to a file."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    calls = tmp_path / "gcloud.calls"
    gcloud = bin_dir / "gcloud"
    gcloud.write_text(
        f'#!/bin/sh\nfor a in "$@"; do printf "%s\\n" "$a"; done >> {shlex.quote(str(calls))}\n'
        f"echo ---- >> {shlex.quote(str(calls))}\n"
    )
    gcloud.chmod(0o755)
    monkeypatch.setenv("PATH", f"{bin_dir}{os.pathsep}{os.environ['PATH']}")
    return calls


def _recorded(calls):
    if not calls.exists():
        return []
    return [block.strip("\n").split("\n") for block in calls.read_text().split("----\n")[:-1]]


def test_yes_runs_exactly_the_printed_commands(capsys, fake_gcloud):
    argv = ["create", *WHERE, "--accelerator-type", "v5p-64", "--spot"]
    printed = dry(capsys, *argv)
    assert _recorded(fake_gcloud) == []  # printing ran nothing
    assert tpu.main([*argv, "--yes", "--dry-run"]) == 0
    assert _recorded(fake_gcloud) == []  # --dry-run wins over --yes
    assert tpu.main([*argv, "--yes"]) == 0
    assert _recorded(fake_gcloud) == [command[1:] for command in printed]


def test_run_and_stop_scripts_start_and_signal_the_trainer(capsys, tmp_path, fake_gcloud):
    """The remote scripts, run here with HOME in tmp_path and a fake jfe."""
    home = tmp_path / "home"
    jfe = home / "jfe-venv" / "bin" / "jfe"
    jfe.parent.mkdir(parents=True)
    jfe.write_text(
        "#!/bin/sh\n"
        'for a in "$@"; do printf "arg: %s\\n" "$a"; done\n'
        "trap 'echo jfe got SIGTERM; exit 0' TERM\n"
        "i=0; while [ $i -lt 300 ]; do sleep 0.1; i=$((i + 1)); done\n"  # gives up after 30 s
    )
    jfe.chmod(0o755)
    prompt = "--config.data.prompt=Summarize it in 'one' word:"
    argv = ["run", *WHERE, "--config", CONFIG, "--workdir", "gs://my-bucket/run-1"]
    argv += ["--data", "gs://my-bucket/pairs", "--env", "JAX_TRACEBACK_FILTERING=off", prompt]
    _, start = dry(capsys, *argv)
    (stop,) = dry(capsys, "stop", *WHERE)
    (logs,) = dry(capsys, "logs", *WHERE)
    env = dict(os.environ, HOME=str(home))
    pid_file, log = home / "jfe-run" / "train.pid", home / "jfe-run" / "logs" / "run-1.log"

    def remote(command):
        return subprocess.run(
            ["sh", "-c", remote_script(command)],
            env=env,
            capture_output=True,
            text=True,
            timeout=30,
        )

    def wait_for(text):
        deadline = time.monotonic() + 20
        while not (log.exists() and text in log.read_text()):
            assert time.monotonic() < deadline, f"no {text!r} in the log"
            time.sleep(0.1)

    pid = None
    try:
        started = remote(start)
        assert started.returncode == 0, started.stderr
        assert "started jfe train on" in started.stdout
        pid = int(pid_file.read_text())
        wait_for("arg: ")
        time.sleep(0.3)  # the fake prints all its arguments at once
        args = [line[len("arg: ") :] for line in log.read_text().splitlines()]
        run = home / "jfe-run"
        assert args == [
            "train",
            f"--config={run}/config/stage1_2b.py",
            "--workdir=gs://my-bucket/run-1",
            "--config.train.distributed=True",
            f"--config.data.root={run}/data",
            f"--config.data.tfds_dir={run}/tfds",
            prompt,
        ]
        rsync = ["storage", "rsync", "--recursive", "gs://my-bucket/pairs", f"{run}/data"]
        assert rsync in _recorded(fake_gcloud)

        again = remote(start)
        assert again.returncode == 1 and "already going" in again.stderr

        shown = remote(logs)
        assert shown.returncode == 0 and "arg: train" in shown.stdout

        stopped = remote(stop)
        assert stopped.returncode == 0 and "sent SIGTERM" in stopped.stdout
        wait_for("jfe got SIGTERM")
    finally:
        if pid is not None:
            try:
                os.kill(pid, 9)
            except ProcessLookupError:
                pass


def test_the_cli_runs_as_a_script():
    result = subprocess.run(
        [sys.executable, SCRIPT, "delete", *WHERE], capture_output=True, text=True, timeout=60
    )
    assert result.returncode == 0, result.stderr
    assert "gcloud compute tpus tpu-vm delete jfe-v5p" in result.stdout
    bad = subprocess.run(
        [sys.executable, SCRIPT, "create", *WHERE, "--accelerator-type", "tpu-64"],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert bad.returncode == 2 and "unknown accelerator type 'tpu-64'" in bad.stderr
