"""The ``jfe`` command.

    jfe convert --src HF_DIR --dst OUT_DIR [--dtype bfloat16] [--check]

Subcommands are registered in ``COMMANDS``; each has its own ``--help``.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable, Sequence


def _convert(argv: Sequence[str]) -> int:
    parser = argparse.ArgumentParser(
        prog="jfe convert",
        description="Read a Hugging Face Qwen2-VL directory (or a jfe-jax export) into JAX and "
        "write it back in Hugging Face format, optionally in another dtype.",
    )
    parser.add_argument("--src", required=True, help="Hugging Face model directory to read")
    parser.add_argument("--dst", required=True, help="directory to write")
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    args = parser.parse_args(argv)

    from jfe_jax.encoder import Encoder

    encoder = Encoder.from_pretrained(args.src)
    encoder.save_pretrained(args.dst, dtype=args.dtype)
    cfg = encoder.config
    print(
        f"wrote {args.dst}: {encoder.num_params():,} backbone parameters in {args.dtype} "
        f"(text layers {cfg.text.num_layers}, vision blocks {cfg.vision.depth})"
    )
    return 0


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
    try:
        values([prog, *argv])
    except (flags.Error, AttributeError, KeyError) as e:
        cause = e.args[0] if isinstance(e, AttributeError) and e.args else e
        if isinstance(cause, KeyError):  # a locked config refusing a key it does not have
            raise ValueError(
                f"unknown config key {cause.args[0]} in a --config.* override (see "
                "jfe_jax/train/config_base.py for the keys)"
            ) from e
        raise ValueError(str(e)) from e
    if values.config is None:
        raise ValueError("--config FILE.py is required")
    missing = [f"--{name}" for name in extra if values[name].value is None]
    if missing:
        raise ValueError(f"missing {', '.join(missing)}")
    return values


def _train(argv: Sequence[str]) -> int:
    if argv and argv[0] in ("-h", "--help"):
        print(
            "usage: jfe train --config configs/FILE.py --workdir DIR [--config.a.b=value ...]\n"
            "Runs (or resumes) a training stage; see configs/ and jfe_jax/train/config_base.py."
        )
        return 0
    values = parse_config_flags("jfe train", argv)
    import logging

    from jfe_jax.train.trainer import train

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s")
    summary = train(values.config, values.workdir)
    print(
        f"finished step {summary.get('step')}: loss {summary.get('loss', float('nan')):.4f}, "
        f"in-batch accuracy {summary.get('accuracy', float('nan')):.3f}; workdir {values.workdir}"
    )
    return 0


def _demo(argv: Sequence[str]) -> int:
    parser = argparse.ArgumentParser(
        prog="jfe demo",
        description="Generate the synthetic M-BEIR benchmark, train both JFE stages on a tiny "
        "model, export, index with ScaNN and evaluate; finished stages are skipped on rerun.",
    )
    parser.add_argument("--workdir", required=True, help="where everything is written")
    parser.add_argument("--fresh", action="store_true", help="redo every stage")
    parser.add_argument("--steps", type=int, default=None, help="override steps per stage")
    args = parser.parse_args(argv)
    import logging

    from jfe_jax.demo import run_demo
    from jfe_jax.eval.recall import format_task_table

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s")
    for noisy in ("absl", "jax._src.xla_bridge", "tensorflow_datasets"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    results = run_demo(args.workdir, fresh=args.fresh, steps=args.steps)
    title = "JFE demo: synthetic M-BEIR test split, local pools (Recall, %)"
    print(format_task_table(results["table"], title=title))
    print("\nRecall@5 against a random ranking of the same pool (chance):")
    for task, d in results["details"].items():
        recall, chance = results["table"]["tasks"][task]["recall"][5], d["chance_recall"]["5"]
        print(f"  {task:<18}{100 * recall:6.1f} vs {100 * chance:4.1f}  ({recall / chance:.1f}x)")
    summary = results["demo_summary"]
    print(f"stages (seconds): {summary['seconds']}; total {summary['total_seconds']} s")
    print(f"results: {args.workdir}/eval/results.json and results.png")
    return 0


def _experiment(argv: Sequence[str]) -> int:
    parser = argparse.ArgumentParser(
        prog="jfe experiment",
        description="fusion: train the late-fusion baseline beside the demo's early-fusion "
        "model (same data, steps, tower) and compare them per task and per JFE group.",
    )
    parser.add_argument("name", choices=["fusion"])
    parser.add_argument("--workdir", required=True, help="a demo workdir (made if missing)")
    parser.add_argument("--steps", type=int, default=None, help="override steps per stage")
    args = parser.parse_args(argv)
    import logging

    from jfe_jax.experiment import run_fusion_experiment

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s")
    for noisy in ("absl", "jax._src.xla_bridge", "tensorflow_datasets"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    result = run_fusion_experiment(args.workdir, steps=args.steps)
    print("Headline recall (%), synthetic M-BEIR test split, local pools")
    print(result["table"])
    print()
    print(result["statement"])
    print(f"results: {args.workdir}/fusion/fusion.json and fusion.png")
    return 0


def _lazy(module: str, name: str) -> Callable[[Sequence[str]], int]:
    def run(argv: Sequence[str]) -> int:
        import importlib

        return getattr(importlib.import_module(module), name)(argv)

    return run


COMMANDS: dict[str, tuple[Callable[[Sequence[str]], int], str]] = {
    "experiment": (_experiment, "early vs late fusion on the same data and budget"),
    "demo": (_demo, "the whole pipeline end to end on the embedded synthetic benchmark"),
    "train": (_train, "train a stage from a config file (stage 1 or stage 2)"),
    "export": (
        _lazy("jfe_jax.index.commands", "export_main"),
        "embed a pool or queries into shards",
    ),
    "index": (_lazy("jfe_jax.index.commands", "index_main"), "build or search a ScaNN index"),
    "search": (_lazy("jfe_jax.index.commands", "search_main"), "query an index by text/image"),
    "eval": (_lazy("jfe_jax.eval.commands", "eval_main"), "M-BEIR evaluation of a model"),
    "aot": (_lazy("jfe_jax.train.aot", "aot_main"), "compile for a TPU topology: fit, speed"),
    "convert": (_convert, "re-save a Hugging Face Qwen2-VL checkpoint through JAX"),
}


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``jfe`` console script."""
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help") or argv[0] not in COMMANDS:
        lines = ["usage: jfe COMMAND [options]", "", "commands:"]
        lines += [f"  {name:12s} {help_}" for name, (_, help_) in COMMANDS.items()]
        print("\n".join(lines))
        if argv and argv[0] not in ("-h", "--help"):
            print(f"\njfe: unknown command {argv[0]!r}", file=sys.stderr)
            return 2
        return 0
    command, _ = COMMANDS[argv[0]]
    try:
        return command(argv[1:])
    except ValueError as e:  # bad input: one clear line, no traceback
        print(f"jfe {argv[0]}: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
