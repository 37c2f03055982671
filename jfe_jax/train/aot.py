"""``jfe aot``: compile a config's programs for a TPU slice on any machine, before renting it.

    jfe aot --config configs/stage2_2b.py --topology v5p-128 [--config.a.b=value ...]
        [--batch-shape L=512,P=1024] [--batch-mix uniform|mbeir] [--programs train,export]
        [--json OUT]

With libtpu installed (``pip install -e '.[tpu]'``), JAX builds compile-only devices of any
slice (``jfe_jax.train.topology``, which also documents the names: v4/v5p-N count
TensorCores, v5e/v6e-N chips). Two programs are lowered with abstract inputs and compiled by
the TPU compiler:

* ``train``: the trainer's step, from the trainer's own builder (``setup.build``, with the
  config's mesh resolved against the slice's chips), lowered as the trainer lowers it
  (``TrainSetup.lower``: the state in its training shardings and donated) for the data
  pipeline's batch (``aot_batch``: examples collated host by host by the pipeline's own
  ``ContrastiveBatcher``, so packing, late fusion and vision packing are covered), at the
  config's largest length bucket and patch budgets (``--batch-shape``), its examples laid out
  by ``--batch-mix``: ``uniform`` (default: every item as large as its side allows) or
  ``mbeir`` (M-BEIR's training tasks in proportion: text, image and image+text items);
* ``export``: the embedding forward of ``jfe export`` (``ItemEmbedder``): parameters
  replicated on every chip, ``data.global_batch_size`` candidate rows split over all chips,
  every row at the batch shape's length and candidate patch budget.

Per program: per-chip memory (arguments, temporaries, outputs, total) against HBM, model and
compiled FLOPs, step-time estimates and MFU. Exit status 1 when a program does not fit (the
compiler's out-of-memory error, or a total above HBM), 2 on bad input.

How the step time and MFU are estimated from what the compiler gives (XLA's cost model made
loop-aware, the compute and ICI floors, MFU at the model and the required FLOPs):
``jfe_jax.train.aot_analysis``, which reads each compiled program. The train program also
bounds the per-chip memory of restoring a checkpoint into the train state's shardings
(``restore_peak_bytes``); a bound above HBM counts as not fitting.
"""

from __future__ import annotations

import dataclasses
import json
import math
import sys
from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from jax.sharding import NamedSharding, PartitionSpec

from jfe_jax.errors import ArgumentParser
from jfe_jax.models.axes import MESH_AXES
from jfe_jax.models.batches import EarlyBatch
from jfe_jax.models.config import ModelConfig
from jfe_jax.models.flops import batch_forward_flops, train_step_flops
from jfe_jax.train import mesh as mesh_lib
from jfe_jax.train.aot_analysis import ProgramEstimate, analyse
from jfe_jax.train.aot_batch import (
    BATCH_MIXES,
    AotBatch,
    BatchShape,
    batch_shape_for,
    train_batch,
)
from jfe_jax.train.setup import TrainSetup, build
from jfe_jax.train.step import merge_params
from jfe_jax.train.topology import GIB, TpuTopology, parse_topology, require_libtpu

PROGRAMS = ("train", "export")


# ============================================================================ abstract inputs


def _export_side(rows: int, shape: BatchShape, model_config: ModelConfig, sharding) -> EarlyBatch:
    """The embedder's candidate batch: every row at the shape's length and candidate budget."""

    def spec(dims, dtype=jnp.int32):
        return jax.ShapeDtypeStruct(dims, dtype, sharding=sharding)

    side = EarlyBatch(
        input_ids=spec((rows, shape.length)),
        attention_mask=spec((rows, shape.length)),
        position_ids=spec((rows, 3, shape.length)),
    )
    if shape.candidate_patches:
        patches = shape.candidate_patches
        side = side.replace(
            pixel_values=spec((rows, patches, model_config.vision.patch_dim), jnp.float32),
            patch_segment_ids=spec((rows, patches)),
            patch_positions=spec((rows, patches, 2)),
        )
    return side


def lower_train_step(
    setup: TrainSetup, shape: BatchShape, batch_mix: str = "uniform"
) -> tuple[jax.stages.Lowered, AotBatch]:
    """The trainer's step of ``setup`` lowered for the pipeline's batch at ``shape``, laid out
    by ``batch_mix``: what ``train()`` compiles for a batch of that shape."""
    batch = train_batch(setup.config, setup.model_config, setup.mesh, shape, batch_mix)
    return setup.lower(setup.abstract_state(), batch.batch), batch


# ============================================================================ compile


def restore_peak_bytes(setup: TrainSetup) -> float:
    """Per-chip bytes a restore holds at most: the whole train state's shards (a resume;
    ``model.init_from`` reads the params only, less) plus the largest leaf's shard, the one
    placement in flight. Checkpoints and Hugging Face weights are restored straight into the
    state's shardings, one device slice at a time (``jfe_jax.train.checkpoint``,
    ``jfe_jax.models.hf_io``): ``tests/test_restore_shards.py`` measures that bound on fsdp=8
    (with scanned layers a leaf stacks every layer: 7b's down_proj is 7 GiB whole, 0.9 GiB
    per chip on fsdp=8)."""
    per_device: dict[Any, float] = {}
    largest = 0.0
    for shape, sharding in zip(
        jax.tree_util.tree_leaves(setup.state_shapes),
        jax.tree_util.tree_leaves(setup.state_shardings),
        strict=True,
    ):
        itemsize = np.dtype(shape.dtype).itemsize
        shard = float(math.prod(sharding.shard_shape(shape.shape)) * itemsize)
        largest = max(largest, shard)
        for device in sharding.devices_indices_map(shape.shape):
            per_device[device] = per_device.get(device, 0.0) + shard
    return max(per_device.values(), default=0.0) + largest


def estimate(
    config: ml_collections.ConfigDict,
    topology: TpuTopology,
    *,
    shape: BatchShape | None = None,
    programs: Sequence[str] = PROGRAMS,
    batch_mix: str = "uniform",
) -> list[ProgramEstimate]:
    """Compiles ``programs`` of ``config`` for ``topology``; one estimate per program.

    The train step is the trainer's (``setup.build`` on the slice's mesh, ``lower_train_step``),
    for the pipeline's batch at ``shape`` (default: the config's) laid out by ``batch_mix``.
    """
    unknown = sorted(set(programs) - set(PROGRAMS))
    if unknown or not programs:
        raise ValueError(f"programs must be some of {PROGRAMS}, got {list(programs)}")
    if batch_mix not in BATCH_MIXES:
        raise ValueError(f"--batch-mix must be one of {BATCH_MIXES}, got {batch_mix!r}")
    shape = shape or batch_shape_for(config)
    try:
        mesh = mesh_lib.make_mesh(dict(config.mesh), devices=topology.devices())
    except NotImplementedError as e:  # jax.make_mesh cannot map an axis onto the torus
        sizes = mesh_lib.resolve_mesh_shape(dict(config.mesh), num_devices=topology.chips)
        raise ValueError(
            f"the mesh {sizes} cannot be laid on the {topology.libtpu_name} torus by "
            f"jax.make_mesh, so the trainer could not build it either: "
            f"{str(e).splitlines()[0]}"
        ) from e
    setup = build(config, mesh=mesh)
    model_config = setup.model_config
    results = []
    if "train" in programs:
        lowered, batch = lower_train_step(setup, shape, batch_mix)
        flops = train_step_flops(model_config, batch.batch)
        results.append(analyse("train", lowered, topology, flops, batch.required_flops))
        results[-1].batch_mix, results[-1].batch_items = batch_mix, batch.modalities
        results[-1].restore_bytes = restore_peak_bytes(setup)
        if results[-1].restore_bytes > topology.hbm_bytes_per_chip:
            results[-1].fits = False
            results[-1].notes.append("the checkpoint restore's bound is above HBM")
        chunk, parallel = config.train.grad_cache_chunk, mesh_lib.data_parallel_size(mesh)
        if chunk and chunk % parallel:
            results[-1].notes.append(
                f"train.grad_cache_chunk={chunk} is not a multiple of the data-parallel size "
                f"{parallel}: chunks do not split evenly over the chips (idle or repeated work)"
            )
    if "export" in programs:
        replicated = mesh_lib.replicated_sharding(mesh)
        params = jax.tree_util.tree_map(
            lambda s: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=replicated),
            merge_params(setup.state_shapes.trainable, setup.state_shapes.frozen),
        )
        every_chip = NamedSharding(mesh, PartitionSpec(MESH_AXES))
        rows = config.data.global_batch_size
        side = _export_side(rows, shape, model_config, every_chip)
        module = setup.module
        embed = jax.jit(lambda p, b: module.apply({"params": p}, b)[0], out_shardings=replicated)
        lowered = embed.lower(params, side)  # as ItemEmbedder: no logical-axis rules
        forward = batch_forward_flops(model_config, side)  # a forward needs all of itself
        results.append(analyse("export", lowered, topology, forward, forward))
    return results


# ============================================================================ report


def _gib(value: float) -> str:
    return f"{value / GIB:.2f}" if math.isfinite(value) else "-"


def _seconds(value: float) -> str:
    return f"{value:.3g}" if math.isfinite(value) else "-"


def _xla_seconds(r: ProgramEstimate) -> str:
    if math.isfinite(r.xla_known_seconds):
        return f"{r.xla_known_seconds:.4g}"
    if not math.isfinite(r.xla_optimal_seconds):
        return "no estimate (XLA returned none)"
    return "no estimate (XLA gives no cost for any op that takes time)"


def _unknown_ops(r: ProgramEstimate) -> str:
    return f"{r.unknown_cost_ops} (left out of its time)" if r.unknown_cost_ops else "none"


def format_report(results: Sequence[ProgramEstimate], topology: TpuTopology) -> str:
    """One table per program: memory against HBM, FLOPs, step-time estimates and MFU."""
    lines = [f"{topology.name}: {topology.describe()}"]
    for r in results:
        lines += ["", f"{r.program} program (compiled in {r.compile_seconds:.0f} s)"]
        if r.oom_error:
            lines.append(f"  DOES NOT FIT (the compiler ran out of HBM): {r.oom_error}")
            continue
        chips = topology.chips
        rows = [
            ("per-chip memory, GiB: arguments", _gib(r.argument_bytes)),
            ("  temporaries", _gib(r.temp_bytes)),
            ("  outputs", _gib(r.output_bytes)),
            ("  aliased (donated, not counted twice)", _gib(r.alias_bytes)),
            ("  total / HBM", f"{_gib(r.total_bytes)} / {topology.spec.hbm_gib:g}"),
            ("  fits", "yes" if r.fits else "NO"),
            ("model FLOPs per step (all chips, 3 x forward)", f"{r.model_flops:.4g}"),
            ("  required FLOPs (real tokens and patches only)", f"{r.required_flops:.4g}"),
            ("compiled FLOPs (loop-aware matmuls, all chips)", f"{r.compiled_flops * chips:.4g}"),
            ("  compiled / model", f"{r.compiled_flops * chips / r.model_flops:.2f}"),
            ("XLA flops (per chip, loop bodies once)", f"{r.xla_flops:.4g}"),
            ("XLA optimal_seconds (loop bodies once)", _xla_seconds(r)),
            ("  ops XLA gives no cost for", _unknown_ops(r)),
            ("  loop factor (cycles with trips / once)", f"{r.loop_factor:.1f}"),
            ("step time, s: cost model (optimal, loop-aware)", _seconds(r.cost_model_seconds)),
            ("  per-op cycle estimates", _seconds(r.cycles_seconds)),
            ("  compute floor (compiled FLOPs / peak)", _seconds(r.compute_floor_seconds)),
            ("  ICI floor (collective bytes / ICI bw)", _seconds(r.ici_floor_seconds)),
            ("collective traffic per chip, GiB", _gib(r.collective_bytes)),
            ("MFU at cost-model time", f"{r.mfu:.1%}"),
            ("MFU at per-op cycles time", f"{r.mfu_cycles:.1%}"),
            ("MFU of required FLOPs at cost-model time", f"{r.mfu_required:.1%}"),
            ("  at per-op cycles time", f"{r.mfu_required_cycles:.1%}"),
        ]
        if math.isfinite(r.restore_bytes):
            rows.append(
                (
                    "restore peak per chip, GiB (bound)",
                    f"{_gib(r.restore_bytes)} / {topology.spec.hbm_gib:g}",
                )
            )
        width = max(len(name) for name, _ in rows)
        if r.batch_items:
            items = "; ".join(
                f"{side} " + ", ".join(f"{n} {modality}" for modality, n in counts.items())
                for side, counts in r.batch_items.items()
            )
            lines.append(f"  batch ({r.batch_mix} mix), items: {items}")
        lines += [f"  {name:<{width}}  {value}" for name, value in rows]
        for title, entries in (
            ("per-op cycle estimates by pass and tower (s, share, MXU use):", r.passes),
            ("largest per-op cycle estimates (s, share, MXU use of their FLOPs):", r.top_ops),
        ):
            if entries:
                lines.append(f"  {title}")
            for label, seconds, flops in entries:
                share = seconds / r.cycles_seconds if r.cycles_seconds else math.nan
                mxu = flops / topology.spec.peak_flops / seconds if seconds else 0.0
                lines.append(f"    {seconds:9.3g} {share:6.1%} {mxu:5.0%}  {label}")
        lines += [f"  note: {note}" for note in r.notes]
    return "\n".join(lines)


def report_dict(
    results: Sequence[ProgramEstimate],
    topology: TpuTopology,
    config: ml_collections.ConfigDict,
    shape: BatchShape,
) -> dict[str, Any]:
    """The numbers of a run for ``--json`` (NaN written as null)."""

    def clean(value):
        return None if isinstance(value, float) and not math.isfinite(value) else value

    return {
        "topology": {
            "name": topology.name,
            "accelerator_type": topology.accelerator_type,
            "libtpu_name": topology.libtpu_name,
            "chips": topology.chips,
            **{k: v for k, v in dataclasses.asdict(topology.spec).items()},
        },
        "mesh": mesh_lib.resolve_mesh_shape(dict(config.mesh), num_devices=topology.chips),
        "global_batch_size": config.data.global_batch_size,
        "batch_shape": dataclasses.asdict(shape),
        "versions": {"jax": jax.__version__, "libtpu": require_libtpu()},
        "fits": all(r.fits for r in results),
        "programs": {
            r.program: {k: clean(v) for k, v in dataclasses.asdict(r).items()} for r in results
        },
    }


# ============================================================================ command


def parse_config(prog: str, argv: Sequence[str]) -> ml_collections.ConfigDict:
    """``--config FILE.py [--config.a.b=value ...]`` (locked: unknown keys are errors)."""
    from absl import flags
    from ml_collections import config_flags

    values = flags.FlagValues()
    # ml_collections finds the overrides in sys_argv (default: sys.argv, not what is parsed).
    config_flags.DEFINE_config_file(
        "config", None, "config file", flag_values=values, sys_argv=[prog, *argv]
    )
    try:
        values([prog, *argv])
    except (flags.Error, AttributeError, KeyError) as e:
        raise ValueError(str(e)) from e
    if values.config is None:
        raise ValueError("--config FILE.py is required")
    return values.config


def aot_main(argv: Sequence[str]) -> int:
    """``jfe aot``: 0 when every program fits, 1 when one does not, 2 on bad input."""
    parser = ArgumentParser(
        prog="jfe aot",
        allow_abbrev=False,
        description="Compile a config's train step and export forward for a TPU slice on this "
        "machine (libtpu); print per-chip memory, FLOPs, estimated step time and MFU.",
        epilog="The config: --config FILE.py [--config.a.b=value ...] (required).",
    )
    parser.add_argument(
        "--topology",
        required=True,
        help="v5p-128, v5e-256, v4-16, v6e-16 (v4/v5p-N count TensorCores, v5e/v6e-N chips) "
        "or v5p:4x4x4, v5e:16x16 (chips per axis)",
    )
    parser.add_argument(
        "--batch-shape", default="", help="L=512,P=1024 (also QP=, CP=); default: the config's"
    )
    parser.add_argument(
        "--batch-mix",
        default="uniform",
        choices=BATCH_MIXES,
        help="the train batch's items: uniform (every item as large as its side allows: text "
        "and one image of the patch budget) or mbeir (M-BEIR's training tasks in proportion: "
        "text, image and image+text items, images at data.image_max_pixels)",
    )
    parser.add_argument("--programs", default=",".join(PROGRAMS), help="train,export")
    parser.add_argument("--json", default="", help="also write the numbers to this file")
    try:
        args, rest = parser.parse_known_args(list(argv))
        config = parse_config("jfe aot", rest)
        topology = parse_topology(args.topology)
        shape = batch_shape_for(config, args.batch_shape)
        programs = [p.strip() for p in args.programs.split(",") if p.strip()]
        results = estimate(
            config, topology, shape=shape, programs=programs, batch_mix=args.batch_mix
        )
    except ValueError as e:
        print(f"jfe aot: error: {e}", file=sys.stderr)
        return 2
    print(format_report(results, topology))
    if args.json:
        with open(args.json, "w", encoding="utf-8") as f:
            json.dump(report_dict(results, topology, config, shape), f, indent=2)
    for r in results:
        if not r.fits:
            need = r.oom_error or f"it needs {r.total_bytes / GIB:.2f} GiB per chip"
            print(
                f"jfe aot: the {r.program} program does not fit in HBM on {topology.name} "
                f"({topology.spec.hbm_gib:g} GiB per chip): {need}",
                file=sys.stderr,
            )
    return 0 if all(r.fits for r in results) else 1


if __name__ == "__main__":
    sys.exit(aot_main(sys.argv[1:]))
