"""Ahead-of-time TPU estimates of the real-scale stage-2 configs, side by side, one run.

For each config and TPU slice it compiles, on this machine with libtpu, the trainer's step
and the export forward (``jfe_jax.train.aot.estimate``) and prints one table: per-chip memory
against HBM, whether the program fits, model and compiled FLOPs, step-time estimates (the
XLA cost model made loop-aware, the compiler's per-op cycle estimates, and the compute and
ICI floors), the MFU at the first two, the required FLOPs (frozen parts not differentiated,
``train_step_required_flops``) and the MFU at them and the cost-model time, and the compile
time on this machine.

Usage:
  python benchmarks/bench_aot.py --configs configs/stage2_2b.py,configs/stage2_7b.py \
      --topologies v5p-64,v5e-256 [--breakdown N] [--json OUT.json]
"""

from __future__ import annotations

import argparse
import json
import math
import time

from jfe_jax.train.aot import batch_shape_for, estimate, parse_config, report_dict
from jfe_jax.train.topology import GIB, parse_topology

COLUMNS = (
    "config",
    "slice",
    "mesh d/f/t",
    "program",
    "GiB/chip (HBM)",
    "fits",
    "model PFLOP",
    "compiled/model",
    "step s: cost model",
    "per-op cycles",
    "compute floor",
    "ICI floor",
    "MFU cost model",
    "MFU cycles",
    "required PFLOP",
    "MFU required",
    "compile s",
)


def row(config_name, topology, mesh, result) -> list[str]:
    def num(value, fmt):
        return format(value, fmt) if math.isfinite(value) else "-"

    memory = (
        f"{result.total_bytes / GIB:.1f} ({topology.spec.hbm_gib:g})"
        if math.isfinite(result.total_bytes)
        else f"OOM ({topology.spec.hbm_gib:g})"
    )
    compiled = result.compiled_flops * topology.chips
    return [
        config_name,
        f"{topology.accelerator_type} ({topology.chips} chips)",
        "/".join(str(mesh[a]) for a in ("data", "fsdp", "tensor")),
        result.program,
        memory,
        "yes" if result.fits else "NO",
        num(result.model_flops / 1e15, ".2f"),
        num(compiled / result.model_flops, ".2f"),
        num(result.cost_model_seconds, ".3f"),
        num(result.cycles_seconds, ".3f"),
        num(result.compute_floor_seconds, ".3f"),
        num(result.ici_floor_seconds, ".3f"),
        num(100 * result.mfu, ".1f") + "%" if math.isfinite(result.mfu) else "-",
        num(100 * result.mfu_cycles, ".1f") + "%" if math.isfinite(result.mfu_cycles) else "-",
        num(result.required_flops / 1e15, ".2f"),
        num(100 * result.mfu_required, ".1f") + "%" if math.isfinite(result.mfu_required) else "-",
        f"{result.compile_seconds:.0f}",
    ]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--configs", default="configs/stage2_2b.py,configs/stage2_7b.py")
    parser.add_argument("--topologies", default="v5p-64,v5e-256")
    parser.add_argument("--json", default="", help="write every run's numbers here")
    parser.add_argument(
        "--breakdown", type=int, default=0, help="print the N largest ops of each train step"
    )
    args = parser.parse_args()

    rows, runs, breakdowns = [], [], []
    start = time.perf_counter()
    for config_path in args.configs.split(","):
        config = parse_config("bench_aot", ["--config", config_path])
        name = config_path.rsplit("/", 1)[-1].removesuffix(".py")
        shape = batch_shape_for(config)
        for topology_name in args.topologies.split(","):
            topology = parse_topology(topology_name)
            try:
                results = estimate(config, topology)
            except ValueError as e:  # e.g. the config's mesh does not map onto the torus
                cells = [name, f"{topology.accelerator_type} ({topology.chips} chips)"]
                short = str(e).split(". ")[0]  # the whole message goes to --json
                rows.append(cells + ["-", "error: " + short] + ["-"] * (len(COLUMNS) - 4))
                runs.append({"config": name, "error": str(e)})
                print(" | ".join(rows[-1]), flush=True)
                continue
            report = report_dict(results, topology, config, shape)
            runs.append({"config": name, **report})
            for result in results:
                rows.append(row(name, topology, report["mesh"], result))
                print(" | ".join(rows[-1]), flush=True)
                if args.breakdown and result.program == "train":
                    breakdowns.append((rows[-1][:3], result, topology))
    elapsed = time.perf_counter() - start
    print(
        f"\nglobal batch {config.data.global_batch_size}, L={shape.length}, patches "
        f"{shape.query_patches}/{shape.candidate_patches}; total {elapsed:.0f} s"
    )
    print("\n| " + " | ".join(COLUMNS) + " |")
    print("|" + "|".join("---" for _ in COLUMNS) + "|")
    for cells in rows:
        print("| " + " | ".join(cells) + " |")
    for (config_name, slice_name, mesh), result, topology in breakdowns:
        print(f"\n{config_name} on {slice_name}, mesh {mesh}: largest per-op cycle estimates")
        print("\n| s | share | MXU use | op (pass: module path) |\n|---:|---:|---:|---|")
        for label, seconds, flops in result.top_ops[: args.breakdown]:
            mxu = flops / topology.spec.peak_flops / seconds if seconds else 0.0
            print(
                f"| {seconds:.3f} | {seconds / result.cycles_seconds:.1%} | {mxu:.0%} | {label} |"
            )
    if args.json:
        with open(args.json, "w", encoding="utf-8") as f:
            json.dump(runs, f, indent=2)


if __name__ == "__main__":
    main()
