"""``jfe eval``: M-BEIR evaluation of a model (table, results.json, results.png).

``--model`` is a JFE model (a ``jfe train`` workdir or a Hugging Face Qwen2-VL directory:
``jfe_jax.eval.mbeir_eval.evaluate_mbeir``) or a MIRe directory (``MIRe.save_pretrained``'s
``colbert/`` + ``clip/`` [+ ``pooling/``], or ``MIRe.save_checkpoint``'s ``mire_config.json`` +
``params/``: ``jfe_jax.eval.mire_eval.evaluate_mire``, exact MaxSim over each task's local pool,
tasks MIRe does not apply to listed as skipped).
"""

from __future__ import annotations

import logging
import os
from collections.abc import Sequence

from jfe_jax.commands.model_args import (
    cli_remedies,
    instruction_args,
    load_embedder,
    mesh_arg,
    truncate_text_arg,
)
from jfe_jax.errors import ArgumentParser, positive_int


def _eval_parser() -> ArgumentParser:
    parser = ArgumentParser(
        prog="jfe eval",
        description="M-BEIR Recall@k per task (UniIR's hit rate over every positive qrels "
        "line) from exact search on the device mesh: R@1/5/10, and R@10/20/50 for the fashion "
        "tasks; headline column, JFE's five groups, ScaNN's agreement with exact search beside "
        "it; deterministic instructions.",
    )
    parser.add_argument(
        "--model",
        required=True,
        help="jfe train workdir, HF Qwen2-VL dir, or a MIRe save_pretrained/save_checkpoint dir",
    )
    parser.add_argument("--mbeir-root", required=True, help="M-BEIR-layout directory")
    parser.add_argument("--out", required=True, help="output directory (embeddings are cached)")
    parser.add_argument("--split", default="test", help="M-BEIR split")
    parser.add_argument("--tasks", default="", help="comma-separated; default: all in the split")
    parser.add_argument(
        "--pool",
        default="local",
        choices=["local", "global"],
        help="candidates: each task's own pool, or the union of all",
    )
    instruction_args(parser)
    parser.add_argument(
        "--ks",
        default="",
        help="comma-separated k to report for every task (each task's headline k is added); "
        "default: UniIR's, R@1/5/10 and R@10/20/50 for fashion200k_task0/3 and fashioniq_task7",
    )
    parser.add_argument(
        "--index-mode",
        default="auto",
        choices=["auto", "brute_force", "ah", "tree_ah", "none"],
        help="the ScaNN index searched beside exact search, for its agreement (the reported "
        "numbers are always exact); none: no ScaNN index (default: %(default)s)",
    )
    parser.add_argument("--batch-size", type=positive_int, default=64, help="rows per step")
    mesh_arg(parser)
    truncate_text_arg(parser)
    parser.add_argument(
        "--mire-instruction",
        action="store_true",
        help="MIRe only: prefix each query with its task's first instruction (ColBERT queries "
        "are plain text by default)",
    )
    parser.add_argument(
        "--label", default=None, help="the model's name in the table and plot (JFE, or MIRe)"
    )
    parser.add_argument(
        "--no-overwrite",
        dest="overwrite",
        action="store_false",
        help="refuse, rather than rebuild, embeddings or indexes cached in --out by another "
        "model, checkpoint, item format or pool",
    )
    return parser


def _parse_ks(parser: ArgumentParser, text: str) -> list[int] | None:
    """``--ks`` as a list of k (None: UniIR's per task); exits with the parser's error when it
    is not comma-separated positive integers."""
    try:
        ks = [int(k) for k in text.split(",") if k.strip()] or None
    except ValueError:
        parser.error(f"--ks must be comma-separated positive integers, got {text!r}")
    if ks is not None and min(ks) < 1:
        parser.error(f"--ks must be comma-separated positive integers, got {text!r}")
    return ks


def _print_result(result: dict, out: str) -> None:
    """The table, ScaNN's agreement, the queries without qrels and where the files are."""
    from jfe_jax.eval.mbeir_eval import scann_agreement

    print(result["text"])
    agreement = scann_agreement(result["details"])
    if agreement:
        print(
            "\nScaNN's recall@headline-k against exact search: "
            + ", ".join(f"{task} {value:.3f}" for task, value in agreement.items())
        )
    if result["queries_without_qrels"]:
        print(
            f"\n{result['queries_without_qrels']} queries have no positive qrels line and "
            "score 0 (per task in results.json)"
        )
    print(f"results: {out}/results.json and results.png")


def mire_directory(path: str) -> str | None:
    """ "pretrained" or "checkpoint" where ``path`` holds a MIRe model (module docstring), else
    None."""
    from jfe_jax.models.mire.checkpoint import CONFIG_FILE

    if os.path.isdir(os.path.join(path, "colbert")) and os.path.isdir(os.path.join(path, "clip")):
        return "pretrained"
    if os.path.isfile(os.path.join(path, CONFIG_FILE)):
        return "checkpoint"
    return None


def _eval_mire(parser: ArgumentParser, args, kind: str, ks: list[int] | None) -> dict:
    """``evaluate_mire`` of the MIRe directory ``--model``; refuses the options it has none of."""
    if args.pool != "local":
        parser.error("--pool global: MIRe is evaluated on each task's local pool only")
    if args.mesh is not None:
        parser.error("--mesh: MIRe's MaxSim search spreads the pool over every local device")
    from jfe_jax.eval.mire_eval import evaluate_mire
    from jfe_jax.models.mire.model import MIRe

    with cli_remedies():
        if kind == "pretrained":
            pooling = os.path.join(args.model, "pooling")
            model = MIRe.from_pretrained(
                os.path.join(args.model, "colbert"),
                os.path.join(args.model, "clip"),
                pooling if os.path.exists(pooling) else None,
            )
        else:
            model = MIRe.from_checkpoint(args.model)
        return evaluate_mire(
            model,
            args.mbeir_root,
            split=args.split,
            tasks=[t for t in args.tasks.split(",") if t] or None,
            ks=ks,
            batch_size=args.batch_size,
            instruction=args.mire_instruction,
            out_dir=args.out,
        )


def _print_skipped(result: dict) -> None:
    for task, reason in result.get("skipped", {}).items():
        print(f"skipped {task}: {reason}")


def eval_main(argv: Sequence[str]) -> int:
    parser = _eval_parser()
    args = parser.parse_args(argv)
    ks = _parse_ks(parser, args.ks)

    from jfe_jax.eval.mbeir_eval import evaluate_mbeir

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s")
    kind = mire_directory(args.model)
    if kind is not None:
        result = _eval_mire(parser, args, kind, ks)
        _print_result(result, args.out)
        _print_skipped(result)
        return 0
    embedder = load_embedder(args, image_root=args.mbeir_root)
    with cli_remedies():
        result = evaluate_mbeir(
            embedder,
            args.mbeir_root,
            args.out,
            split=args.split,
            tasks=[t for t in args.tasks.split(",") if t] or None,
            pool=args.pool,
            ks=ks,
            instruction_mode=args.instruction_mode,
            instruction_seed=args.seed,
            index_mode=args.index_mode,
            label=args.label or "JFE",
            overwrite=args.overwrite,
        )
    _print_result(result, args.out)
    return 0
