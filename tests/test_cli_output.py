"""What ``jfe`` prints: its own INFO lines and no one else's, help that shows every default,
its version, progress bars that suit a log file, and no libtpu noise without a TPU."""

import argparse
import importlib.metadata
import io
import os
import re
import subprocess
import sys

import pytest
import tqdm.std
from train_fixtures import ToyPairs

import jfe_jax
import jfe_jax.train.data
from jfe_jax.cli import COMMANDS, main
from jfe_jax.errors import ArgumentParser
from jfe_jax.progress import progress_bar

HERE = os.path.dirname(os.path.abspath(__file__))
TOY_CONFIG = os.path.join(HERE, "resume_script.py")  # get_config(): the toy training config


def test_jfe_train_logs_what_it_loaded_resumed_and_compiled_and_no_third_party_info(
    tmp_path, capsys, monkeypatch
):
    monkeypatch.setattr(
        jfe_jax.train.data,
        "make_train_data",
        lambda config, workdir, model, item_format=None: ToyPairs(model, batch_size=8, seed=1),
    )
    workdir = str(tmp_path / "run")
    argv = ["train", "--config", TOY_CONFIG, "--workdir", workdir, "--config.train.num_steps=1"]
    argv += ["--config.optimizer.warmup_steps=0", "--config.mesh.data=-1"]
    argv += ["--config.mesh.fsdp=1", "--config.mesh.tensor=1"]
    assert main(argv) == 0
    first = capsys.readouterr().err
    assert main(argv) == 0  # resumes at its last step: nothing left to run
    second = capsys.readouterr().err

    assert "initial weights: random init of size tiny" in first
    assert "mesh: data=8 x fsdp=1 x tensor=1 over 8 devices (cpu) in 1 processes" in first
    assert re.search(r"compiled step for .*: arguments [\d.]+ MiB, temporaries [\d.]+ MiB", first)
    assert re.search(r"resumed from \S+ at step 1", second)
    assert "initial weights: resumed at step 1" in second
    for err in (first, second):
        info = [line for line in err.splitlines() if " INFO " in line]
        assert info and all(" INFO [jfe_jax." in line for line in info), info
        assert "\r" not in err  # the progress bar writes lines into a non-terminal
    assert len([line for line in first.splitlines() if line.startswith("stage1:")]) <= 3


def test_a_progress_bar_into_a_log_writes_a_few_lines_a_minute(monkeypatch):
    now = [1000.0]
    monkeypatch.setattr(tqdm.std, "time", lambda: now[0])
    log = io.StringIO()
    bar = progress_bar(total=20_000, desc="stage2", unit="step", file=log, dynamic_ncols=True)
    for _ in range(20_000):  # 10 minutes of work at 20 ms a step
        now[0] += 0.03
        bar.update(1)
    bar.close()
    lines = log.getvalue().splitlines()
    assert "\r" not in log.getvalue()
    assert 10 <= len(lines) <= 10 * 2 + 2  # one per 30 s, and the last
    assert lines[-1].startswith("stage2: 100%") and "20000/20000" in lines[-1]

    class Terminal(io.StringIO):
        def isatty(self):
            return True

    screen = Terminal()
    with progress_bar(range(3), file=screen, mininterval=0) as steps:
        list(steps)
    assert "\r" in screen.getvalue()  # redrawn in place on a terminal


def _help_parsers(argv, monkeypatch, capsys) -> tuple[str, list[argparse.ArgumentParser]]:
    """The help ``jfe ARGV --help`` prints, and the parsers that made it."""
    parsers = []
    real = ArgumentParser.parse_known_args

    def recording(self, *args, **kwargs):
        parsers.append(self)
        return real(self, *args, **kwargs)

    monkeypatch.setattr(ArgumentParser, "parse_known_args", recording)
    with pytest.raises(SystemExit) as exit_:
        main([*argv, "--help"])
    assert exit_.value.code == 0
    return capsys.readouterr().out, parsers


def _entries(help_text: str) -> dict[str, str]:
    """Option string -> its whole help entry (continuation lines joined)."""
    entries, current = {}, None
    for line in help_text.splitlines():
        match = re.match(r"^  (-{1,2}[\w.=-]+)", line)
        if match:
            current = match.group(1)
            entries[current] = line
        elif current and line.startswith("      "):
            entries[current] += " " + line.strip()
        else:
            current = None
    return {name: " ".join(text.split()) for name, text in entries.items()}


@pytest.mark.parametrize(
    "argv",
    [
        ["export"],
        ["index", "build"],
        ["index", "search"],
        ["search"],
        ["eval"],
        ["aot"],
        ["convert"],
        ["demo"],
        ["experiment", "fusion"],
    ],
)
def test_every_option_has_help_and_its_default(argv, monkeypatch, capsys):
    text, parsers = _help_parsers(argv, monkeypatch, capsys)
    assert len(parsers) == 1
    entries = _entries(text)
    for action in parsers[0]._actions:
        if isinstance(action, argparse._HelpAction):
            continue
        if not action.option_strings:  # a positional: named with its choices
            assert action.help and action.help in " ".join(text.split())
            continue
        name = (
            action.option_strings[-1]
            if action.option_strings[-1].startswith("--")
            else (action.option_strings[0])
        )
        entry = entries.get(action.option_strings[0]) or entries[name]
        assert len(entry.split(None, 1)) > 1 and action.help, f"{argv} {name}: no help"
        if action.required:
            assert "(required)" in entry, entry
        elif isinstance(action, argparse._StoreConstAction):
            assert "(default: off)" in entry, entry
        elif action.default in (None, ""):
            assert "(default: none)" in entry or "default: " in entry, entry
        else:
            assert f"default: {action.default}" in entry, entry


def test_experiment_fusion_help_names_its_own_command_and_prints_percent_once(monkeypatch, capsys):
    text, _ = _help_parsers(["experiment", "fusion"], monkeypatch, capsys)
    assert text.startswith("usage: jfe experiment fusion ")
    assert "95% bootstrap intervals" in " ".join(text.split()) and "%%" not in text
    assert main(["experiment", "--help"]) == 0
    assert "jfe experiment fusion --help" in capsys.readouterr().out
    assert main(["experiment", "nothing"]) == 2
    assert "usage: jfe experiment {fusion}" in capsys.readouterr().err


def test_train_help_names_its_options_and_lists_the_configs(capsys):
    assert main(["train", "--help"]) == 0
    text = capsys.readouterr().out
    entries = _entries(text)
    assert "(required)" in entries["--config"] and "(required)" in entries["--workdir"]
    assert "config_base.py" in entries["--config.a.b=value"]
    configs = sorted(
        f for f in os.listdir(os.path.join(HERE, "..", "configs")) if f.endswith(".py")
    )
    assert configs and all(f"configs/{name}" in text for name in configs)


def test_version_and_top_level_help(capsys):
    assert main(["--version"]) == 0
    assert capsys.readouterr().out.strip() == f"jfe-jax {jfe_jax.__version__}"
    assert importlib.metadata.version("jfe-jax") == jfe_jax.__version__  # setup.py agrees
    assert main(["--help"]) == 0
    text = capsys.readouterr().out
    assert all(name in text for name in COMMANDS)
    assert "--verbose" in text and "--debug" in text and "--version" in text
    assert main(["index", "--help"]) == 0
    assert "build" in capsys.readouterr().out


def test_no_libtpu_lines_without_a_tpu():
    """libtpu is installed (the tpu extra) but this machine has no TPU: the jfe command's
    start (importing jfe_jax.cli) keeps JAX on the CPU, with nothing on stderr."""
    env = {k: v for k, v in os.environ.items() if k not in ("JAX_PLATFORMS", "XLA_FLAGS")}
    code = "import jfe_jax.cli, jax; print(jax.numpy.ones(2).sum())"
    done = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True)
    assert done.returncode == 0 and done.stdout.strip() == "2.0"
    if not os.path.exists("/dev/accel0") and not os.path.isdir("/dev/vfio"):
        assert done.stderr == ""


def test_importing_the_library_leaves_the_jax_platform_alone():
    env = {k: v for k, v in os.environ.items() if k not in ("JAX_PLATFORMS", "XLA_FLAGS")}
    code = "import os, jfe_jax; jfe_jax.Encoder; print(os.environ.get('JAX_PLATFORMS'))"
    done = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True)
    assert done.returncode == 0 and done.stdout.strip() == "None", done.stderr


def test_verbose_lets_third_party_info_through(capsys):
    import logging

    from jfe_jax.logs import setup_logging

    try:
        setup_logging(verbose=False)
        setup_logging(verbose=False)  # again (each jfe call does): still one handler
        logging.getLogger("absl").info("orbax says hi")
        logging.getLogger("jfe_jax.test").info("ours")
        err = capsys.readouterr().err
        assert "orbax says hi" not in err and err.count("INFO [jfe_jax.test] ours") == 1
        setup_logging(verbose=True)
        logging.getLogger("absl").info("orbax says hi")
        assert "INFO [absl] orbax says hi" in capsys.readouterr().err
    finally:
        setup_logging(verbose=False)
