"""The ``jfe`` command.

    jfe [--debug] [--verbose] COMMAND [options]      jfe COMMAND --help      jfe --version

Subcommands are registered in ``COMMANDS``; each has its own ``--help``, which shows every
option's default. Every command logs through ``jfe_jax.logs.setup_logging``: jfe-jax's INFO
lines, other libraries' warnings (their INFO lines too with ``--verbose``).
"""

from __future__ import annotations

import logging
import os
import sys
from collections.abc import Callable, Sequence

from jfe_jax.logs import quiet_libtpu, setup_logging

# The jfe command's start, before JAX is imported (run_control below imports it): on a machine
# with libtpu installed but no TPU, JAX on the CPU without libtpu's start-up lines. Importing
# the library (``import jfe_jax``) leaves the platform to the user.
quiet_libtpu()

import jfe_jax  # noqa: E402
from jfe_jax.errors import (  # noqa: E402
    ArgumentParser,
    DropBackgroundTracebacks,
    debug_enabled,
    describe_error,
    positive_int,
)
from jfe_jax.train.run_control import TrainingInterrupted  # noqa: E402


def _convert(argv: Sequence[str]) -> int:
    parser = ArgumentParser(
        prog="jfe convert",
        description="Read a Hugging Face Qwen2-VL directory, a jfe-jax export or a jfe train "
        "workdir (its latest checkpoint, LoRA merged) into JAX and write it in Hugging Face "
        "format, optionally in another dtype, with the tokenizer, a preprocessor_config.json "
        "and the item format (jfe_item_format.json) it was trained with.",
    )
    parser.add_argument(
        "--src", required=True, help="Hugging Face model directory or jfe train workdir to read"
    )
    parser.add_argument("--dst", required=True, help="directory to write")
    parser.add_argument(
        "--dtype",
        default="float32",
        choices=["float32", "bfloat16", "float16"],
        help="dtype of the written weights",
    )
    args = parser.parse_args(argv)

    from jfe_jax.encoder import Encoder

    encoder = Encoder.from_pretrained(args.src)
    item_format = encoder.save_pretrained(args.dst, dtype=args.dtype)
    cfg = encoder.config
    print(
        f"wrote {args.dst}: {encoder.num_params():,} backbone parameters in {args.dtype} "
        f"(text layers {cfg.text.num_layers}, vision blocks {cfg.vision.depth})"
    )
    print(f"item format: {item_format.describe()}")
    return 0


def _config_file(argv: Sequence[str]) -> str | None:
    """The ``--config FILE.py[:argument]`` file named on the command line, checked to exist.

    ml_collections reports a missing file only as "failed loading config file".
    """
    for i, arg in enumerate(argv):
        if arg == "--config" and i + 1 < len(argv):
            value = argv[i + 1]
        elif arg.startswith("--config="):
            value = arg.split("=", 1)[1]
        else:
            continue
        path = value.split(":", 1)[0]
        if not os.path.isfile(path):
            raise ValueError(f"config file {path} does not exist (cwd {os.getcwd()})")
        return path
    return None


def _config_load_error(path: str | None, error: Exception) -> ValueError:
    """One line for an exception raised while a config file ran: its file, line and cause."""
    import traceback

    where = path or "(config)"
    if path is not None:
        lines = [
            frame.lineno
            for frame in traceback.extract_tb(error.__traceback__)
            if os.path.abspath(frame.filename) == os.path.abspath(path)
        ]
        if lines:
            where = f"{path} line {lines[-1]}"
    return ValueError(f"config file {where}: {type(error).__name__}: {error}")


def parse_config_flags(prog: str, argv: Sequence[str], *, extra: Sequence[str] = ("workdir",)):
    """``--config FILE.py [--config.a.b=value ...]`` plus ``--workdir``, via ml_collections.

    The config is locked: an override of a key that does not exist is an error.
    """
    from absl import flags
    from ml_collections import config_flags

    values = flags.FlagValues()
    config_flags.DEFINE_config_file(
        "config",
        None,
        "ml_collections config file (get_config())",
        flag_values=values,
        lock_config=True,
        # ml_collections reads the --config.a.b overrides from sys_argv (default: sys.argv,
        # which is not what is parsed when main(argv) is called from Python).
        sys_argv=[prog, *argv],
    )
    for name in extra:
        flags.DEFINE_string(name, None, name, flag_values=values)
    config_file = _config_file(argv)
    try:
        values([prog, *argv])
    except SyntaxError as e:
        raise ValueError(f"config file {e.filename} line {e.lineno}: {e.msg}") from e
    except (flags.Error, AttributeError, KeyError) as e:
        cause = e.args[0] if isinstance(e, AttributeError) and e.args else e
        if isinstance(cause, KeyError):  # a locked config refusing a key it does not have
            raise ValueError(
                f"unknown config key {cause.args[0]} in a --config.* override (see "
                "jfe_jax/train/config_base.py for the keys)"
            ) from e
        if isinstance(e, AttributeError):
            raise _config_load_error(config_file, e) from e
        raise ValueError(str(e)) from e
    except Exception as e:  # anything get_config() raised
        raise _config_load_error(config_file, e) from e
    if values.config is None:
        raise ValueError("--config FILE.py is required")
    missing = [f"--{name}" for name in extra if values[name].value is None]
    if missing:
        raise ValueError(f"missing {', '.join(missing)}")
    return values


def config_files() -> list[str]:
    """The config files a user can pass to ``--config``: ``configs/*.py`` of the working
    directory, else of the source checkout next to the package."""
    here = os.path.join(os.getcwd(), "configs")
    beside = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "configs")
    for directory in (here, beside):
        if os.path.isdir(directory):
            names = sorted(n for n in os.listdir(directory) if n.endswith(".py"))
            rel = os.path.relpath(directory)
            shown = rel if not rel.startswith("..") else directory
            return [os.path.join(shown, n) for n in names if not n.startswith("_")]
    return []


def _summary_line(path: str) -> str:
    """The first line of a config file's docstring ("" if it has none)."""
    import ast

    try:
        with open(path, encoding="utf-8") as f:
            doc = ast.get_docstring(ast.parse(f.read())) or ""
    except (OSError, SyntaxError):
        return ""
    return doc.strip().splitlines()[0] if doc.strip() else ""


def _train_help() -> str:
    configs = config_files()
    lines = [
        "usage: jfe train --config configs/FILE.py --workdir DIR [--config.a.b=value ...]",
        "",
        "Runs (or resumes) a training stage (stage 1 or stage 2) from a config file.",
        "",
        "options:",
        "  -h, --help            show this help message and exit",
        "  --config FILE.py[:ARG]",
        "                        ml_collections config file (its get_config(ARG)) (required)",
        "  --workdir DIR         where checkpoints, metrics and the run record go; an existing",
        "                        one is resumed from its latest checkpoint (required)",
        "  --config.a.b=value    override one config field; every field, with its default and",
        "                        comment, is in jfe_jax/train/config_base.py (default: none)",
        "",
        "configs:" if configs else "configs: none found (no configs/ folder here)",
        *(f"  {path:26s}{_summary_line(path)}".rstrip() for path in configs),
        "",
        "SIGTERM or a first Ctrl-C saves a checkpoint after the current step and stops; "
        "rerunning the same command resumes.",
        f"Exit status: 0 finished; {EXIT_ERROR} bad config or input; {EXIT_INTERRUPTED} "
        f"stopped by SIGTERM or Ctrl-C (checkpoint saved); {EXIT_ABORTED} a second Ctrl-C.",
    ]
    return "\n".join(lines)


def _train(argv: Sequence[str]) -> int:
    if argv and argv[0] in ("-h", "--help"):
        print(_train_help())
        return 0
    values = parse_config_flags("jfe train", argv)

    from jfe_jax.train.trainer import train

    summary = train(values.config, values.workdir)
    print(
        f"finished step {summary.get('step')}: loss {summary.get('loss', float('nan')):.4f}, "
        f"in-batch accuracy {summary.get('accuracy', float('nan')):.3f}; workdir {values.workdir}"
    )
    return 0


def _demo(argv: Sequence[str]) -> int:
    parser = ArgumentParser(
        prog="jfe demo",
        description="Generate the synthetic M-BEIR benchmark, train both JFE stages on a tiny "
        "model, export, index with ScaNN and evaluate; finished stages are skipped on rerun.",
        epilog=STOP_HELP,
    )
    parser.add_argument("--workdir", required=True, help="where everything is written")
    parser.add_argument("--fresh", action="store_true", help="redo every stage")
    parser.add_argument(
        "--steps", type=positive_int, default=None, help="steps per stage; default: the configs'"
    )
    args = parser.parse_args(argv)

    from jfe_jax.demo import run_demo
    from jfe_jax.eval.recall import format_task_table

    results = run_demo(args.workdir, fresh=args.fresh, steps=args.steps)
    title = "JFE demo: synthetic M-BEIR test split, local pools (Recall, %)"
    print(format_task_table(results["table"], title=title))
    print("\nHeadline recall against a random ranking of the same pool (chance), and ScaNN's")
    print("recall@headline-k against exact search:")
    for task, d in results["details"].items():
        row = results["table"]["tasks"][task]
        recall, chance = row["headline"], d["chance_recall"][str(row["headline_k"])]
        agreement = next(
            (v for key, v in (d.get("scann") or {}).items() if key.startswith("agreement")), None
        )
        line = f"  {task:<18}R@{row['headline_k']:<3}{100 * recall:6.1f} vs {100 * chance:4.1f}"
        line += f"  ({recall / chance:.1f}x)"
        if agreement is not None:
            line += f"   ScaNN {agreement:.3f}"
        print(line)
    summary = results["demo_summary"]
    print(
        f"stages (seconds when they ran): {summary['seconds']}; total {summary['total_seconds']} s"
    )
    if summary["reused"]:
        print(
            f"this run reused {', '.join(summary['reused'])} (use --fresh to redo) and took "
            f"{summary['run_seconds']} s"
        )
    print(f"results: {args.workdir}/eval/results.json and results.png")
    return 0


EXPERIMENT_USAGE = (
    "usage: jfe experiment {fusion} ...\n\n"
    "  fusion   early vs late fusion over seeds, per task and against fusion need "
    "(jfe experiment fusion --help)"
)


def _experiment(argv: Sequence[str]) -> int:
    if argv and argv[0] in ("-h", "--help"):
        print(EXPERIMENT_USAGE)
        return 0
    if not argv or argv[0] != "fusion":
        print(EXPERIMENT_USAGE, file=sys.stderr)
        return EXIT_ERROR
    return _experiment_fusion(argv[1:])


def _experiment_fusion(argv: Sequence[str]) -> int:
    # A description is %-formatted only when it holds "%(prog)": "95%" is written as is.
    parser = ArgumentParser(
        prog="jfe experiment fusion",
        description="Train every system (early fusion, late fusion) with several seeds on the "
        "same data, steps, batch and optimizer; compare them per task and per JFE group with "
        "95% bootstrap intervals and paired differences (a win only when the interval "
        "excludes zero), and relate each task's early-minus-late difference to its measured "
        "fusion need (the claim, stated only when both systems reach 5x chance on every task). "
        "Writes WORKDIR/fusion/study.json, table.txt, study.png and need.png.",
        epilog=STOP_HELP,
    )
    parser.add_argument("--workdir", required=True, help="the study's folder (made if missing)")
    parser.add_argument("--seeds", type=positive_int, default=3, help="seeds per system")
    parser.add_argument(
        "--systems",
        default="early,late",
        help="comma-separated systems to compare; 'early' (the reference) is required",
    )
    parser.add_argument(
        "--preset",
        choices=["demo", "study"],
        default="demo",
        help="demo: the demo's data and tiny model; study: 200+ test queries per task and the "
        "task that needs fusion by construction, with the demo's tiny model and steps",
    )
    parser.add_argument(
        "--steps", type=positive_int, default=None, help="steps per stage; default: the preset's"
    )
    parser.add_argument(
        "--replicates", type=positive_int, default=2000, help="bootstrap replicates"
    )
    args = parser.parse_args(argv)
    systems = [s.strip() for s in args.systems.split(",") if s.strip()]

    from jfe_jax.study import run_fusion_study

    try:
        result = run_fusion_study(
            args.workdir,
            seeds=args.seeds,
            systems=systems,
            preset=args.preset,
            steps=args.steps,
            replicates=args.replicates,
        )
    except ValueError as e:
        parser.error(str(e))
    print("Headline recall (%), mean [95% interval] over seeds and test queries")
    print(result["table"])
    print()
    print(result["statement"])
    print(f"results: {args.workdir}/fusion/study.json, table.txt, study.png, need.png")
    return 0


def _lazy(module: str, name: str) -> Callable[[Sequence[str]], int]:
    def run(argv: Sequence[str]) -> int:
        import importlib

        return getattr(importlib.import_module(module), name)(argv)

    return run


COMMANDS: dict[str, tuple[Callable[[Sequence[str]], int], str]] = {
    "experiment": (_experiment, "the fusion study: early vs late fusion, seeds and intervals"),
    "demo": (_demo, "the whole pipeline end to end on the embedded synthetic benchmark"),
    "train": (_train, "train a stage from a config file (stage 1 or stage 2)"),
    "export": (
        _lazy("jfe_jax.commands.index", "export_main"),
        "embed a pool or queries into shards",
    ),
    "index": (_lazy("jfe_jax.commands.index", "index_main"), "build or search a ScaNN index"),
    "search": (_lazy("jfe_jax.commands.index", "search_main"), "query an index by text/image"),
    "eval": (_lazy("jfe_jax.commands.eval", "eval_main"), "M-BEIR evaluation of a model"),
    "aot": (_lazy("jfe_jax.train.aot", "aot_main"), "compile for a TPU topology: fit, speed"),
    "convert": (_convert, "re-save a Hugging Face Qwen2-VL checkpoint through JAX"),
}


def _close_progress_bars() -> None:
    """Ends the progress bars a failure left open, so the error starts on its own line."""
    tqdm = sys.modules.get("tqdm")
    for bar in list(getattr(tqdm, "tqdm", None) and tqdm.tqdm._instances or ()):
        bar.close()


EXIT_ERROR = 2  # bad input or an expected failure (one line on stderr naming the cause)
EXIT_INTERRUPTED = 3  # SIGTERM or a first Ctrl-C stopped training; its checkpoint is saved
EXIT_ABORTED = 130  # a second Ctrl-C (or one outside training): stopped at once
STOP_HELP = (
    f"SIGTERM or a first Ctrl-C during training saves a checkpoint after the current step and "
    f"exits {EXIT_INTERRUPTED}; rerunning the same command resumes the stopped stage. A second "
    f"Ctrl-C exits {EXIT_ABORTED} at once."
)


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``jfe`` console script.

    Expected failures (bad input, a missing or unreadable file, a full disk, a checkpoint
    that cannot be read) print one line and return ``EXIT_ERROR``; ``--debug`` anywhere on
    the command line, or ``JFE_DEBUG=1``, shows the traceback instead.
    """
    argv = list(sys.argv[1:] if argv is None else argv)
    debug = "--debug" in argv or debug_enabled()
    verbose = "--verbose" in argv
    argv = [a for a in argv if a not in ("--debug", "--verbose")]
    if argv and argv[0] == "--version":
        print(f"jfe-jax {jfe_jax.__version__}")
        return 0
    if not argv or argv[0] in ("-h", "--help") or argv[0] not in COMMANDS:
        lines = ["usage: jfe [--debug] [--verbose] COMMAND [options]", "", "commands:"]
        lines += [f"  {name:12s} {help_}" for name, (_, help_) in COMMANDS.items()]
        lines += [
            "",
            "options:",
            "  --debug       show the traceback of a failure (also JFE_DEBUG=1) (default: off)",
            "  --verbose     other libraries' INFO lines too (Orbax, absl, JAX, TensorFlow "
            "Datasets) (default: off)",
            "  --version     print the version and exit",
            "",
            "jfe COMMAND --help: the command's options, each with its default",
        ]
        print("\n".join(lines))
        if argv and argv[0] not in ("-h", "--help"):
            print(f"\njfe: unknown command {argv[0]!r}", file=sys.stderr)
            return EXIT_ERROR
        return 0
    setup_logging(verbose=verbose)
    command, _ = COMMANDS[argv[0]]
    background = DropBackgroundTracebacks()
    if not debug:
        logging.getLogger("absl").addFilter(background)
    try:
        return command(argv[1:])
    except TrainingInterrupted as e:  # not a failure: the run is resumable
        _close_progress_bars()
        print(f"jfe {argv[0]}: {e}", file=sys.stderr)
        return EXIT_INTERRUPTED
    except KeyboardInterrupt:
        if debug:
            raise
        _close_progress_bars()
        print(f"jfe {argv[0]}: aborted by Ctrl-C", file=sys.stderr)
        return EXIT_ABORTED
    except Exception as e:
        message = None if debug else describe_error(e)
        if message is None:
            raise
        _close_progress_bars()
        print(f"jfe {argv[0]}: error: {message}", file=sys.stderr)
        # Reads still in flight when a checkpoint restore failed are reported as the process
        # ends ("Task exception was never retrieved"); the line above said what went wrong.
        logging.getLogger("asyncio").disabled = True
        return EXIT_ERROR
    finally:
        logging.getLogger("absl").removeFilter(background)


if __name__ == "__main__":
    sys.exit(main())
