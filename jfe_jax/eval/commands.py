"""``jfe eval``: M-BEIR evaluation of a model (table, results.json, results.png)."""

from __future__ import annotations

import logging
from collections.abc import Sequence

from jfe_jax.errors import ArgumentParser, positive_int


def eval_main(argv: Sequence[str]) -> int:
    parser = ArgumentParser(
        prog="jfe eval",
        description="M-BEIR Recall@1/5/10 per task (UniIR's hit rate), headline column, JFE's "
        "five groups, ScaNN beside exact search; deterministic instructions.",
    )
    parser.add_argument("--model", required=True, help="jfe train workdir or HF Qwen2-VL dir")
    parser.add_argument("--mbeir-root", required=True)
    parser.add_argument("--out", required=True, help="output directory (embeddings are cached)")
    parser.add_argument("--split", default="test")
    parser.add_argument("--tasks", default="", help="comma-separated; default: all in the split")
    parser.add_argument("--pool", default="local", choices=["local", "global"])
    parser.add_argument("--instruction-mode", default="fixed", choices=["fixed", "seeded"])
    parser.add_argument("--seed", type=int, default=0, help="seed of seeded instructions")
    parser.add_argument(
        "--index-mode", default="auto", choices=["auto", "brute_force", "ah", "tree_ah"]
    )
    parser.add_argument("--batch-size", type=positive_int, default=64)
    parser.add_argument("--label", default="JFE")
    parser.add_argument(
        "--no-overwrite",
        dest="overwrite",
        action="store_false",
        help="refuse, rather than rebuild, embeddings or indexes cached in --out by another "
        "model, checkpoint, item format or pool",
    )
    args = parser.parse_args(argv)

    from jfe_jax.eval.mbeir_eval import evaluate_mbeir
    from jfe_jax.index.embedder import embedder_for

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s")
    embedder = embedder_for(args.model, batch_size=args.batch_size, image_root=args.mbeir_root)
    result = evaluate_mbeir(
        embedder,
        args.mbeir_root,
        args.out,
        split=args.split,
        tasks=[t for t in args.tasks.split(",") if t] or None,
        pool=args.pool,
        instruction_mode=args.instruction_mode,
        instruction_seed=args.seed,
        index_mode=args.index_mode,
        label=args.label,
        overwrite=args.overwrite,
    )
    print(result["text"])
    print(
        "\nScaNN recall@10 against exact search per task: "
        + ", ".join(
            f"{task} {d[next(k for k in d if k.startswith('scann_recall'))]:.3f}"
            for task, d in result["details"].items()
        )
    )
    print(f"results: {args.out}/results.json and results.png")
    return 0
