"""Can the early-fusion model learn the fusion task? infoseek_task6 trained alone, evaluated.

    python benchmarks/bench_fusion_task.py --workdir /tmp/jfe_fusion_task \
        [--size tiny] [--train-queries 9600] [--steps 300,4800] [--test-queries 240]

One early-fusion run (one seed) of `jfe experiment fusion` on synthetic data holding only
infoseek_task6 (jfe_jax/data/synthetic/spatial.py: a 3x3 grid of objects on fixed cell tints,
a question naming a cell, the answer the selected object), then the study's three evaluations
of it: the full input, the image removed, the text removed. Prints one table: Recall at the
headline k for each, chance (k over the pool), the multiple of chance, the fusion need (full
minus the better ablation), the last logged in-batch accuracy, the wall time and this machine's
matmul rate. Issue 16's bar for the study is 5x chance. A rerun into the same workdir reuses
what finished.
"""

import argparse
import json
import os
import time

from jfe_jax import study
from jfe_jax.data.synthetic import SyntheticConfig, chance_at_headline_k
from jfe_jax.train.topology import measured_cpu_peak

TASK = "infoseek_task6"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--workdir", default="/tmp/jfe_fusion_task")
    parser.add_argument("--size", default="tiny", help="a named model size (jfe_jax.models.sizes)")
    parser.add_argument("--train-queries", type=int, default=9600)
    parser.add_argument("--test-queries", type=int, default=240, help="a multiple of 4")
    parser.add_argument("--steps", default="300,4800", help="stage-1,stage-2 steps")
    parser.add_argument("--seed", type=int, default=0, help="the synthetic data's seed")
    args = parser.parse_args()
    steps = tuple(int(n) for n in args.steps.split(","))
    if len(steps) != 2:
        parser.error(f"--steps takes two numbers, stage 1 and stage 2, got {args.steps!r}")

    synthetic = SyntheticConfig(
        seed=args.seed,
        tasks=(TASK,),
        train_queries_per_task=args.train_queries,
        train_query_multipliers=(),
        val_queries_per_task=40,
        test_queries_per_task=args.test_queries,
    )
    start = time.perf_counter()
    study.run_fusion_study(
        args.workdir,
        seeds=1,
        systems=("early",),
        preset="study",
        synthetic=synthetic,
        size=args.size,
        steps=steps,
    )
    wall = time.perf_counter() - start
    gflops = measured_cpu_peak() / 1e9

    run_dir = os.path.join(os.path.abspath(args.workdir), "early", "seed0")
    with open(os.path.join(args.workdir, "data", "synthetic_manifest.json")) as f:
        chance = chance_at_headline_k(json.load(f))[TASK]
    recall = {}
    for name in ("eval", "eval_no_image", "eval_no_text"):
        with open(os.path.join(run_dir, name, "results.json")) as f:
            _, hits = study.per_query_hits(json.load(f))[TASK]
        recall[name] = 100 * hits.mean()
    with open(os.path.join(run_dir, "stage2", "metrics.jsonl")) as f:
        logged = [json.loads(line) for line in f if line.strip()]
    accuracy = [m["accuracy"] for m in logged if "accuracy" in m]

    print(
        f"\n{TASK} alone: model {args.size}, {args.train_queries} training queries, "
        f"steps {steps[0]} + {steps[1]}, {args.test_queries} test queries; matmul "
        f"{gflops:.0f} GFLOP/s; {wall:.0f} s (this call: a rerun reuses what finished)"
    )
    print(f"{'input':<16}{'recall %':>10}{'x chance':>10}")
    print("-" * 36)
    for name, label in (
        ("eval", "full"),
        ("eval_no_image", "no image"),
        ("eval_no_text", "no text"),
    ):
        print(f"{label:<16}{recall[name]:>10.1f}{recall[name] / (100 * chance):>10.1f}")
    need = recall["eval"] - max(recall["eval_no_image"], recall["eval_no_text"])
    print(f"chance {100 * chance:.1f}%, fusion need {need:.1f} points")
    if accuracy:
        last = accuracy[-5:]
        mean = sum(last) / len(last)
        print(f"in-batch accuracy, mean of the last {len(last)} log windows: {mean:.3f}")


if __name__ == "__main__":
    main()
