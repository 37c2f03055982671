"""The trainer's overhead: ``train()``'s steady-state time per step against the bare step.

Both run the same batches in one process: the real data pipeline's batches for the config
(on a small synthetic benchmark), collected once into memory and cycled, so neither waits on
data. The bare loop does what any loop must (put the host batch on the mesh, run the compiled
step, the very program ``train()`` compiles: ``TrainSetup.lower``) and nothing else.
``train()`` adds the rest: the device-side log window (metrics and batch counts), the log
lines and the metrics file at log steps, the save and stop checks, the progress bar.

Order: bare, trainer, ..., bare again (``--repeats`` pairs: the machine is shared and its
speed drifts), each after a warm-up over every batch shape. The trainer's time per step comes
from its own log windows
(``examples_per_second`` of each window after the first, which holds the compiles; a window is
one cycle of the batches, as a bare round is). Load from other work on a shared machine only
adds time, so the table compares the best round of each (the steady state least disturbed);
the medians are printed beside. Overhead = trainer / bare - 1.

Usage:
  python benchmarks/bench_trainer_overhead.py [--configs demo,small] [--cycles 4] [--batches 20]
      [--repeats 3]
    demo: the demo's stage-2 config (tiny, 32 rows, length buckets 64-128, 64 patches a side),
      batches from the data pipeline on a synthetic benchmark
    small: the same config with the `small` model at 8 rows (a step is seconds on 2 cores);
      its 8192-token vocabulary does not match the synthetic tokenizer, so its batches are the
      tests' ToyPairs (8 rows of 64 tokens, every other candidate with a 16-patch image)
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time

os.environ.setdefault("JAX_PLATFORMS", "cpu")

import jax  # noqa: E402

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "tests"))
from train_fixtures import ToyPairs  # noqa: E402

from jfe_jax.data.synthetic import SyntheticConfig, generate  # noqa: E402
from jfe_jax.models.sizes import get_size  # noqa: E402
from jfe_jax.train import mesh as mesh_lib  # noqa: E402
from jfe_jax.train.config_base import demo_stage2_config  # noqa: E402
from jfe_jax.train.data import make_train_data  # noqa: E402
from jfe_jax.train.setup import build  # noqa: E402
from jfe_jax.train.topology import time_matmul  # noqa: E402
from jfe_jax.train.trainer import train  # noqa: E402

SMALL_BATCH = 8


def make_config(name: str, root: str):
    c = demo_stage2_config()
    c.data.root = root
    # Random weights: stage 1 is the stage that may start from them (the timing is the same).
    c.stage, c.model.init_from = "stage1", ""
    if name == "small":
        c.model.size = "small"
        c.data.global_batch_size = SMALL_BATCH
    elif name != "demo":
        raise SystemExit(f"unknown config {name!r}; expected demo or small")
    return c


class Cycle:
    """The trainer's data: the collected batches, round and round."""

    def __init__(self, batches):
        self.batches, self.position = batches, 0

    def __iter__(self):
        return self

    def __next__(self):
        batch = self.batches[self.position % len(self.batches)]
        self.position += 1
        return batch

    def get_state(self):
        return {"position": self.position}

    def set_state(self, state):
        self.position = int(state["position"])


def bare_seconds_per_step(config, batches, cycles: int) -> list[float]:
    """The bare loop's time per step in each of ``cycles`` rounds over the batches."""
    setup = build(config)
    state, _ = setup.initial_state()
    keys = [str(jax.tree_util.tree_map(lambda x: x.shape, b)) for b in batches]
    compiled = {}
    for batch, key in zip(batches, keys):
        if key not in compiled:
            device_batch = mesh_lib.global_batch_from_host(batch, setup.mesh)
            compiled[key] = setup.lower(setup.abstract_state(), device_batch).compile()
    for batch, key in zip(batches, keys):  # warm-up: every shape runs once
        state, _ = compiled[key](state, mesh_lib.global_batch_from_host(batch, setup.mesh))
    jax.block_until_ready(state)
    rounds = []
    for _ in range(cycles):
        start = time.perf_counter()
        for batch, key in zip(batches, keys):
            state, metrics = compiled[key](
                state, mesh_lib.global_batch_from_host(batch, setup.mesh)
            )
        jax.block_until_ready((state, metrics))
        rounds.append((time.perf_counter() - start) / len(batches))
    return rounds


def trainer_seconds_per_step(config, batches, cycles: int, workdir: str) -> list[float]:
    """``train()``'s time per step in each log window after the first (one cycle each)."""
    with config.unlocked():
        config.train.log_every = len(batches)
        config.train.num_steps = len(batches) * (cycles + 1)
        config.train.checkpoint_every_steps = config.train.num_steps  # the final save only
    train(config, workdir, data=Cycle(batches))
    with open(os.path.join(workdir, "metrics.jsonl"), encoding="utf-8") as f:
        windows = [json.loads(line) for line in f]
    batch = config.data.global_batch_size
    return [batch / w["examples_per_second"] for w in windows[1:]]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--configs", default="demo,small")
    parser.add_argument("--batches", type=int, default=20, help="batches collected and cycled")
    parser.add_argument("--cycles", type=int, default=4, help="timed rounds over the batches")
    parser.add_argument(
        "--repeats", type=int, default=3, help="bare and trainer runs, alternated (then bare)"
    )
    parser.add_argument("--json", default="", help="write the rows here too")
    args = parser.parse_args()
    gflops = time_matmul(jax.devices()[0]) / 1e9
    print(f"JAX float32 2048x2048 matmul: {gflops:.0f} GFLOP/s; {jax.device_count()} device(s)")
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        root = os.path.join(tmp, "bench")
        generate(root, SyntheticConfig(train_queries_per_task=40), progress=False)
        for name in args.configs.split(","):
            config = make_config(name, root)
            if name == "demo":
                data = make_train_data(
                    config, os.path.join(tmp, f"{name}_data"), build(config).model_config
                )
            if name == "small":
                data = ToyPairs(get_size("small"), batch_size=SMALL_BATCH, length=64)
            batches = [next(data) for _ in range(args.batches)]
            bare, windows = [], []
            for repeat in range(args.repeats):
                bare += bare_seconds_per_step(config, batches, args.cycles)
                windows += trainer_seconds_per_step(
                    config, batches, args.cycles, os.path.join(tmp, f"{name}_train{repeat}")
                )
            bare += bare_seconds_per_step(config, batches, args.cycles)
            rows.append(
                dict(
                    config=name,
                    model=config.model.size,
                    batch=config.data.global_batch_size,
                    bare_ms=1e3 * min(bare),
                    bare_median_ms=1e3 * statistics.median(bare),
                    bare_rounds_ms=[1e3 * b for b in bare],
                    trainer_ms=1e3 * min(windows),
                    trainer_median_ms=1e3 * statistics.median(windows),
                    trainer_windows_ms=[1e3 * w for w in windows],
                    overhead=min(windows) / min(bare) - 1,
                    overhead_median=statistics.median(windows) / statistics.median(bare) - 1,
                )
            )
            print(
                f"{name}: bare rounds "
                + ", ".join(f"{1e3 * b:.1f}" for b in bare)
                + " ms; trainer windows "
                + ", ".join(f"{1e3 * w:.1f}" for w in windows)
                + " ms",
                flush=True,
            )
    print()
    print(
        "| config | model | batch | bare step ms (best / median) | train() step ms "
        "(best / median) | overhead (best / median) |"
    )
    print("|---|---|---|---|---|---|")
    for r in rows:
        print(
            f"| {r['config']} | {r['model']} | {r['batch']} | {r['bare_ms']:.1f} / "
            f"{r['bare_median_ms']:.1f} | {r['trainer_ms']:.1f} / {r['trainer_median_ms']:.1f} | "
            f"{100 * r['overhead']:+.1f}% / {100 * r['overhead_median']:+.1f}% |"
        )
    if args.json:
        with open(args.json, "w", encoding="utf-8") as f:
            json.dump({"matmul_gflops": gflops, "rows": rows}, f, indent=2)


if __name__ == "__main__":
    sys.exit(main())
