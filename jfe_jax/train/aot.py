"""``jfe aot``: compile a config's programs for a TPU slice on any machine, before renting it.

    jfe aot --config configs/stage2_2b.py --topology v5p-128 [--config.a.b=value ...]
        [--batch-shape L=512,P=1024] [--programs train,export] [--json OUT.json]

With libtpu installed (``pip install -e '.[tpu]'``) JAX builds compile-only devices of any
slice (``jax.experimental.topologies``). Two programs are lowered with abstract inputs and
compiled by the real TPU compiler:

* ``train``: the trainer's jitted step (``make_train_step``) with the config's mesh resolved
  against the slice's chip count, the state in its training shardings and donated, and a
  batch of ``data.global_batch_size`` rows at the largest length bucket and the config's patch
  budgets (hard negatives included), laid out as the data pipeline makes it;
* ``export``: the embedding forward of ``jfe export`` (``ItemEmbedder``): parameters
  replicated on every chip, ``data.global_batch_size`` candidate rows split over all chips.

For each: per-chip memory (arguments, temporaries, outputs, total) against the chip's HBM,
compiled FLOPs, a step-time estimate and the MFU it implies. Exit status 1 when a program
does not fit (the compiler's out-of-memory error, or a total above HBM), 2 on bad input.

Topology names. ``GEN:AxB[xC]`` names chips along each axis (``v5p:4x4x4``, ``v5e:16x16``).
``GEN-N`` follows Google's accelerator types: for v4 and v5p, N counts TensorCores (two per
chip), for v5e (also ``v5litepod-N``) and v6e, chips. So v5p-128 = 64 chips = 4x4x4,
v5p-64 = 32 chips = 2x4x4, v4-16 = 8 chips = 2x2x2, v5e-256 = 256 chips = 16x16. v4 and v5p
devices are megacore (one JAX device per chip, as on a real slice).

Time and FLOPs. XLA's ``cost_analysis()`` counts every loop body once, and the train step is
loops (layers scanned inside gradient-cache chunks), so its raw ``flops`` and
``optimal_seconds`` are printed but not used. ``jfe_jax.train.hlo_cost`` re-counts the
compiled HLO with trip counts: "compiled FLOPs" are its loop-aware dot/convolution FLOPs.
The step time is XLA's ``optimal_seconds`` scaled by the same loop factor (loop-aware over
counted-once matmul FLOPs): the cost model's time per FLOP, assumed equal inside and outside
loops. It does not model collectives that fail to overlap with compute; their loop-aware bytes
are shown beside it. MFU = model FLOPs (``jfe_jax.train.metrics``: 3 x forward of every side,
remat, gradient-cache re-forward and frozen-weight savings excluded) / (chips x peak x time).
"""

from __future__ import annotations

import argparse
import dataclasses
import importlib.metadata
import importlib.util
import json
import math
import os
import re
import sys
import time
from collections.abc import Sequence
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
from flax import traverse_util
from jax.sharding import NamedSharding, PartitionSpec

from jfe_jax.models.axes import LOGICAL_RULES, MESH_AXES
from jfe_jax.models.config import ModelConfig
from jfe_jax.models.sizes import get_size
from jfe_jax.train import mesh as mesh_lib
from jfe_jax.train.hlo_cost import hlo_costs
from jfe_jax.train.metrics import PEAK_FLOPS, batch_forward_flops, train_step_flops
from jfe_jax.train.optimizer import make_optimizer, trainable_mask
from jfe_jax.train.step import make_train_step, merge_params
from jfe_jax.train.trainer import abstract_state, encoder_options, model_config_for

GIB = 2**30
PROGRAMS = ("train", "export")


# ============================================================================ topologies


@dataclasses.dataclass(frozen=True)
class Generation:
    """What a TPU generation's chips offer and how its slices are named."""

    peak_flops: float  # dense bf16 FLOP/s per chip
    hbm_gib: float  # HBM per chip
    cores_in_name: int  # TensorCores per chip counted by the GEN-N accelerator type
    axes: int  # torus dimensions
    chip_config: str  # libtpu chip config: megacore = one device per chip
    max_chips: int


GENERATIONS = {
    "v4": Generation(PEAK_FLOPS["tpu v4"], 32, 2, 3, "megacore", 4096),
    "v5e": Generation(PEAK_FLOPS["tpu v5e"], 16, 1, 2, "default", 256),
    "v5p": Generation(PEAK_FLOPS["tpu v5p"], 95, 2, 3, "megacore", 4096),
    "v6e": Generation(PEAK_FLOPS["tpu v6e"], 32, 1, 2, "default", 256),
}
_ALIASES = {"v5litepod": "v5e", "v5lite": "v5e"}


def slice_shape(generation: str, chips: int) -> tuple[int, ...]:
    """Google's default shape of a slice: 2-D for v5e/v6e, 3-D tori for v4/v5p."""
    gen = GENERATIONS[generation]
    if chips < 1 or chips & (chips - 1) or chips > gen.max_chips or chips == 2:
        raise ValueError(f"no {generation} slice has {chips} chips")
    if gen.axes == 2:
        rows = 2 ** (int(math.log2(chips)) // 2)
        return (rows, chips // rows)
    if chips == 1:
        return (1, 1, 1)
    if chips == 4:
        return (2, 2, 1)
    shape = [2, 2, 2]
    while math.prod(shape) < chips:  # 2x2x2 -> 2x2x4 -> 2x4x4 -> 4x4x4 -> 4x4x8 ...
        smallest = min(shape)
        shape[max(i for i, size in enumerate(shape) if size == smallest)] *= 2
    return tuple(shape)


@dataclasses.dataclass(frozen=True)
class TpuTopology:
    """A TPU slice: its generation and chips along each torus axis."""

    name: str  # as given on the command line
    generation: str  # v4 | v5e | v5p | v6e
    shape: tuple[int, ...]

    @property
    def chips(self) -> int:
        return math.prod(self.shape)

    @property
    def libtpu_name(self) -> str:
        return f"{self.generation}:{'x'.join(map(str, self.shape))}"

    @property
    def accelerator_type(self) -> str:
        gen = GENERATIONS[self.generation]
        prefix = "v5litepod" if self.generation == "v5e" else self.generation
        return f"{prefix}-{self.chips * gen.cores_in_name}"

    @property
    def peak_flops_per_chip(self) -> float:
        return GENERATIONS[self.generation].peak_flops

    @property
    def hbm_bytes_per_chip(self) -> float:
        return GENERATIONS[self.generation].hbm_gib * GIB

    def devices(self) -> list[jax.Device]:
        """Compile-only devices of the slice (needs libtpu; no TPU is touched)."""
        require_libtpu()
        from jax.experimental import topologies

        kwargs: dict[str, Any] = {"chip_config_name": GENERATIONS[self.generation].chip_config}
        if self.chips < 4:  # libtpu's default host is 2x2x1 chips
            kwargs["chips_per_host_bounds"] = (*self.shape, 1)[:3]
        # libtpu takes /tmp/libtpu_lockfile unless told several processes may load it; a
        # compile-only topology never opens a chip, so it must not block (or be blocked by)
        # other JAX processes on this machine.
        os.environ.setdefault("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")
        try:
            devices = topologies.get_topology_desc(
                platform="tpu", topology_name=self.libtpu_name, **kwargs
            ).devices
        except Exception as e:  # JaxRuntimeError: libtpu rejects the shape
            raise ValueError(f"libtpu cannot build topology {self.libtpu_name!r}: {e}") from e
        if len(devices) != self.chips:
            raise ValueError(
                f"libtpu built {len(devices)} devices for {self.libtpu_name}, expected "
                f"{self.chips} (one per chip)"
            )
        return list(devices)


def parse_topology(name: str) -> TpuTopology:
    """``v5p-128`` / ``v5litepod-256`` / ``v6e-16`` or ``v5p:4x4x4`` / ``v5e:16x16``."""
    known = ", ".join(sorted(GENERATIONS))
    examples = "e.g. v5p-128, v5e-256, v4-16, v6e-16, v5p:4x4x4, v5e:16x16"
    text = name.strip().lower()
    match = re.fullmatch(r"([a-z0-9]+)(?:-(\d+)|:(\d+(?:x\d+)*))", text)
    if not match:
        raise ValueError(f"topology {name!r} is neither GEN-N nor GEN:AxBxC ({examples})")
    generation = _ALIASES.get(match.group(1), match.group(1))
    if generation not in GENERATIONS:
        raise ValueError(f"unknown TPU generation {match.group(1)!r} in {name!r}; known: {known}")
    gen = GENERATIONS[generation]
    if match.group(2) is not None:
        count = int(match.group(2))
        if count % gen.cores_in_name:
            raise ValueError(
                f"{name!r}: {generation}-N counts TensorCores, {gen.cores_in_name} per chip, so "
                f"N must be even"
            )
        try:
            shape = slice_shape(generation, count // gen.cores_in_name)
        except ValueError as e:
            unit = "TensorCores (2 per chip)" if gen.cores_in_name == 2 else "chips"
            raise ValueError(
                f"{name!r}: {e}; {generation}-N counts {unit} and takes a power-of-two slice "
                f"({examples})"
            ) from e
    else:
        shape = tuple(int(v) for v in match.group(3).split("x"))
        if len(shape) != gen.axes or min(shape) < 1:
            raise ValueError(
                f"{name!r}: a {generation} slice has {gen.axes} positive axes (chips along "
                f"each), got {match.group(3)}"
            )
    return TpuTopology(name=name, generation=generation, shape=shape)


def require_libtpu() -> str:
    """libtpu's version; ValueError with the install command when it is missing."""
    if importlib.util.find_spec("libtpu") is None:
        raise ValueError(
            "jfe aot compiles with the TPU compiler in libtpu, which is not installed: "
            "pip install -e '.[tpu]' (jax[tpu]==0.10.2, libtpu 0.0.42.1)"
        )
    try:
        return importlib.metadata.version("libtpu")
    except importlib.metadata.PackageNotFoundError:
        return "unknown"


# ============================================================================ abstract inputs


@dataclasses.dataclass(frozen=True)
class BatchShape:
    """Padded sizes of one step's rows: sequence length and patch budgets per side."""

    length: int
    query_patches: int
    candidate_patches: int


def batch_shape_for(config: ml_collections.ConfigDict, spec: str = "") -> BatchShape:
    """The config's largest length bucket and patch budgets, overridden by ``L=..,P=..``."""
    shape = {
        "L": max(config.data.length_buckets),
        "QP": config.data.query_patch_budget,
        "CP": config.data.candidate_patch_budget,
    }
    for part in filter(None, (p.strip() for p in spec.split(","))):
        key, _, value = part.partition("=")
        key = key.strip().upper()
        if key not in ("L", "P", "QP", "CP") or not value.strip().isdigit():
            raise ValueError(
                f"--batch-shape part {part!r} is not KEY=INT with KEY one of L (length), "
                f"P (patches, both sides), QP, CP (query / candidate patches)"
            )
        for k in ("QP", "CP") if key == "P" else (key,):
            shape[k] = int(value)
    if shape["L"] < 1:
        raise ValueError(f"--batch-shape L must be positive, got {shape['L']}")
    return BatchShape(shape["L"], shape["QP"], shape["CP"])


def _side(rows: int, shape: BatchShape, patches: int, model_config: ModelConfig, sharding):
    def spec(dims, dtype=jnp.int32):
        return jax.ShapeDtypeStruct(dims, dtype, sharding=sharding)

    side = {
        "input_ids": spec((rows, shape.length)),
        "attention_mask": spec((rows, shape.length)),
        "position_ids": spec((rows, 3, shape.length)),
    }
    if patches:
        side.update(
            pixel_values=spec((rows, patches, model_config.vision.patch_dim), jnp.float32),
            patch_segment_ids=spec((rows, patches)),
            patch_positions=spec((rows, patches, 2)),
        )
    return side


def train_batch(config, model_config: ModelConfig, shape: BatchShape, sharding) -> dict:
    """The data pipeline's batch (``jfe_jax.data.pipeline``) as sharded ShapeDtypeStructs."""
    rows, hard = config.data.global_batch_size, config.data.num_hard_negatives
    keys = lambda *dims: jax.ShapeDtypeStruct(dims, jnp.int32, sharding=sharding)  # noqa: E731
    batch = {
        "query": _side(rows, shape, shape.query_patches, model_config, sharding),
        "candidate": _side(rows, shape, shape.candidate_patches, model_config, sharding),
        "query_key": keys(rows),
        "candidate_key": keys(rows),
        "hard_negative_key": keys(rows, hard),
        "hard_negative_count": keys(rows),
        "skipped_records": keys(rows),
    }
    if hard:
        batch["hard_negative"] = _side(
            rows * hard, shape, shape.candidate_patches, model_config, sharding
        )
    return batch


def optimizer_and_mask(config: ml_collections.ConfigDict, abstract_params: Any):
    """The optimizer and trainable mask exactly as ``trainer.train`` builds them."""
    also = ("logit_scale",) if config.model.learn_temperature else ()
    also += ("projection",) if config.model.projection_dim else ()
    mask = trainable_mask(abstract_params, config.optimizer.trainable, also_trainable=also)
    if not config.model.learn_temperature:
        flat_mask = traverse_util.flatten_dict(mask)
        flat_mask[("logit_scale",)] = False
        mask = traverse_util.unflatten_dict(flat_mask)
    optimizer = make_optimizer(
        learning_rate=config.optimizer.learning_rate,
        warmup_steps=config.optimizer.warmup_steps,
        total_steps=config.train.num_steps,
        end_learning_rate=config.optimizer.end_learning_rate,
        weight_decay=config.optimizer.weight_decay,
        max_grad_norm=config.optimizer.max_grad_norm or None,
        b1=config.optimizer.b1,
        b2=config.optimizer.b2,
        eps=config.optimizer.eps,
        lr_multipliers=dict(config.optimizer.lr_multipliers),
    )
    return optimizer, mask


def model_config_of(config: ml_collections.ConfigDict) -> ModelConfig:
    """The architecture: ``model.init_from``'s when set, else the named ``model.size``."""
    if config.model.init_from:
        return model_config_for(config)
    return get_size(config.model.size)


# ============================================================================ compile


@dataclasses.dataclass
class ProgramEstimate:
    """What the compiler says about one program on one slice (bytes and FLOPs per chip)."""

    program: str
    fits: bool
    compile_seconds: float
    hbm_bytes: float
    model_flops: float  # whole step, all chips (jfe_jax.train.metrics)
    error: str = ""  # the compiler's out-of-memory message
    argument_bytes: float = math.nan
    temp_bytes: float = math.nan
    output_bytes: float = math.nan
    alias_bytes: float = math.nan
    code_bytes: float = math.nan
    total_bytes: float = math.nan  # arguments + temporaries + outputs - aliased + code
    compiled_flops: float = math.nan  # loop-aware dot/convolution FLOPs per chip
    xla_flops: float = math.nan  # cost_analysis()["flops"] per chip (loop bodies once)
    xla_optimal_seconds: float = math.nan  # cost_analysis()["optimal_seconds"] (loops once)
    loop_factor: float = math.nan
    collective_bytes: float = math.nan  # loop-aware, per chip
    step_seconds: float = math.nan  # optimal_seconds x loop_factor
    compute_bound_seconds: float = math.nan  # compiled FLOPs / chip peak
    mfu: float = math.nan
    loops: list = dataclasses.field(default_factory=list)


def _is_out_of_memory(error: Exception) -> bool:
    text = str(error)
    return "RESOURCE_EXHAUSTED" in text or "Ran out of memory" in text


def analyse(program: str, lowered, topology: TpuTopology, model_flops: float) -> ProgramEstimate:
    """Compiles ``lowered`` and reads its memory and cost analyses."""
    hbm = topology.hbm_bytes_per_chip
    start = time.perf_counter()
    try:
        compiled = lowered.compile()
    except Exception as e:  # JaxRuntimeError; only out-of-memory is a result
        if not _is_out_of_memory(e):
            raise
        first = str(e).strip().splitlines()[0]
        return ProgramEstimate(
            program, False, time.perf_counter() - start, hbm, model_flops, error=first
        )
    seconds = time.perf_counter() - start
    memory = compiled.memory_analysis()
    cost = compiled.cost_analysis()
    cost = cost[0] if isinstance(cost, (list, tuple)) else (cost or {})
    loops = hlo_costs(compiled.as_text())
    est = ProgramEstimate(program, True, seconds, hbm, model_flops)
    if memory is not None:
        est.argument_bytes = float(memory.argument_size_in_bytes)
        est.temp_bytes = float(memory.temp_size_in_bytes)
        est.output_bytes = float(memory.output_size_in_bytes)
        est.alias_bytes = float(memory.alias_size_in_bytes)
        est.code_bytes = float(memory.generated_code_size_in_bytes)
        est.total_bytes = (
            est.argument_bytes
            + est.temp_bytes
            + est.output_bytes
            - est.alias_bytes
            + est.code_bytes
        )
        est.fits = est.total_bytes <= hbm
    est.compiled_flops = loops.matmul_flops
    est.xla_flops = float(cost.get("flops", math.nan))
    est.xla_optimal_seconds = float(cost.get("optimal_seconds", math.nan))
    est.loop_factor = loops.loop_factor
    est.collective_bytes = loops.collective_bytes
    est.compute_bound_seconds = loops.matmul_flops / topology.peak_flops_per_chip
    est.step_seconds = est.xla_optimal_seconds * loops.loop_factor
    if not math.isfinite(est.step_seconds) or est.step_seconds <= 0:
        est.step_seconds = est.compute_bound_seconds  # no cost-model time: the roofline floor
    est.mfu = model_flops / (topology.chips * topology.peak_flops_per_chip * est.step_seconds)
    est.loops = [list(loop) for loop in loops.loops]
    if loops.unknown_trip_loops:
        est.error = f"loops counted once (trip count unknown): {list(loops.unknown_trip_loops)}"
    return est


def estimate(
    config: ml_collections.ConfigDict,
    topology: TpuTopology,
    *,
    shape: BatchShape | None = None,
    programs: Sequence[str] = PROGRAMS,
) -> list[ProgramEstimate]:
    """Compiles ``programs`` of ``config`` for ``topology``; one estimate per program."""
    unknown = sorted(set(programs) - set(PROGRAMS))
    if unknown or not programs:
        raise ValueError(f"programs must be some of {PROGRAMS}, got {list(programs)}")
    shape = shape or batch_shape_for(config)
    devices = topology.devices()
    model_config = model_config_of(config)
    mesh = mesh_lib.make_mesh(dict(config.mesh), devices=devices)
    rows = config.data.global_batch_size
    mesh_lib.check_batch_divisible(rows, mesh)
    chunk = config.train.grad_cache_chunk
    if chunk and rows % chunk:
        raise ValueError(
            f"train.grad_cache_chunk={chunk} does not divide data.global_batch_size={rows}"
        )
    module = encoder_options(config).module(model_config)
    abstract_params = nn.meta.unbox(
        jax.eval_shape(lambda: module.init(jax.random.key(0), _init_batch(model_config)))["params"]
    )
    optimizer, mask = optimizer_and_mask(config, abstract_params)
    shapes, shardings = abstract_state(module, optimizer, mask, mesh)
    results = []
    if "train" in programs:
        batch_sharding = mesh_lib.batch_sharding(mesh)
        batch = train_batch(config, model_config, shape, batch_sharding)
        state = jax.tree_util.tree_map(
            lambda s, sh: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=sh), shapes, shardings
        )
        step = make_train_step(
            module,
            optimizer,
            learn_temperature=config.model.learn_temperature,
            symmetric=config.loss.symmetric,
            mask_false_negatives=config.loss.mask_false_negatives,
            grad_cache_chunk=chunk,
        )
        jitted = jax.jit(
            step,
            in_shardings=(shardings, batch_sharding),
            out_shardings=(shardings, mesh_lib.replicated_sharding(mesh)),
            donate_argnums=0,
        )
        with mesh, nn.logical_axis_rules(LOGICAL_RULES):
            lowered = jitted.lower(state, batch)
            results.append(
                analyse("train", lowered, topology, train_step_flops(model_config, batch))
            )
    if "export" in programs:
        every_chip = NamedSharding(mesh, PartitionSpec(MESH_AXES))
        replicated = mesh_lib.replicated_sharding(mesh)
        params = jax.tree_util.tree_map(
            lambda s: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=replicated),
            merge_params(shapes.trainable, shapes.frozen),
        )
        side = _side(rows, shape, shape.candidate_patches, model_config, every_chip)
        embed = jax.jit(lambda p, b: module.apply({"params": p}, b)[0], out_shardings=replicated)
        # As ItemEmbedder: no logical-axis rules, so the model's activation constraints are off.
        lowered = embed.lower(params, side)
        results.append(
            analyse("export", lowered, topology, batch_forward_flops(model_config, side))
        )
    return results


def _init_batch(model_config: ModelConfig):
    from jfe_jax.encoder import dummy_batch

    return dummy_batch(model_config)


# ============================================================================ report


def _gib(value: float) -> str:
    return "-" if not math.isfinite(value) else f"{value / GIB:.2f}"


def format_report(
    results: Sequence[ProgramEstimate], topology: TpuTopology, title: str = ""
) -> str:
    """One table per program: memory against HBM, FLOPs, time and MFU."""
    gen = GENERATIONS[topology.generation]
    lines = [
        title
        or f"{topology.name}: {topology.accelerator_type} = {topology.libtpu_name}, "
        f"{topology.chips} chips, {gen.hbm_gib:g} GiB HBM and "
        f"{gen.peak_flops / 1e12:g} TFLOP/s bf16 per chip"
    ]
    for r in results:
        lines += ["", f"{r.program} (compiled in {r.compile_seconds:.0f} s)"]
        if not math.isfinite(r.total_bytes):
            lines.append(f"  DOES NOT FIT: {r.error}")
            continue
        rows = [
            ("per-chip memory (GiB)", ""),
            ("  arguments", _gib(r.argument_bytes)),
            ("  temporaries", _gib(r.temp_bytes)),
            ("  outputs", _gib(r.output_bytes)),
            ("  aliased (donated)", _gib(r.alias_bytes)),
            ("  total / HBM", f"{_gib(r.total_bytes)} / {gen.hbm_gib:g}"),
            ("  fits", "yes" if r.fits else "NO"),
            ("model FLOPs per step (all chips)", f"{r.model_flops:.4g}"),
            ("compiled FLOPs (loop-aware, all chips)", f"{r.compiled_flops * topology.chips:.4g}"),
            ("  compiled / model", f"{r.compiled_flops * topology.chips / r.model_flops:.2f}"),
            ("XLA cost_analysis flops (per chip, loops once)", f"{r.xla_flops:.4g}"),
            ("XLA optimal_seconds (loops once)", f"{r.xla_optimal_seconds:.4g}"),
            ("loop factor", f"{r.loop_factor:.1f}"),
            ("collective traffic per chip (GiB)", _gib(r.collective_bytes)),
            ("step time: compute-bound floor (s)", f"{r.compute_bound_seconds:.4g}"),
            ("step time: cost model, loop-scaled (s)", f"{r.step_seconds:.4g}"),
            ("MFU estimate", f"{r.mfu:.1%}"),
        ]
        width = max(len(name) for name, _ in rows)
        lines += [f"  {name:<{width}}  {value}" for name, value in rows]
        if r.error:
            lines.append(f"  note: {r.error}")
    return "\n".join(lines)


def report_dict(results, topology: TpuTopology, config, shape: BatchShape) -> dict[str, Any]:
    """The numbers of a run, for ``--json`` (NaN becomes null)."""

    def clean(value):
        return None if isinstance(value, float) and not math.isfinite(value) else value

    return {
        "topology": {
            "name": topology.name,
            "accelerator_type": topology.accelerator_type,
            "libtpu_name": topology.libtpu_name,
            "chips": topology.chips,
            "hbm_bytes_per_chip": topology.hbm_bytes_per_chip,
            "peak_flops_per_chip": topology.peak_flops_per_chip,
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


def aot_main(argv: Sequence[str]) -> int:
    """``jfe aot``: 0 when every program fits, 1 when one does not, 2 on bad input."""
    parser = argparse.ArgumentParser(
        prog="jfe aot",
        allow_abbrev=False,
        description="Compile a config's train step and export forward for a TPU slice on this "
        "machine (libtpu); print per-chip memory, FLOPs, estimated step time and MFU.",
        epilog="--config FILE.py [--config.a.b=value ...] and --topology (v5p-128, v5e-256, "
        "v4-16, v6e-16: v4/v5p count TensorCores, v5e/v6e chips; or v5p:4x4x4, v5e:16x16) are "
        "required.",
    )
    parser.add_argument("--batch-shape", default="", help="L=512,P=1024 (also QP=, CP=)")
    parser.add_argument("--programs", default=",".join(PROGRAMS), help="train,export")
    parser.add_argument("--json", default="", help="write the numbers to this file")
    try:
        args, rest = parser.parse_known_args(list(argv))
        from jfe_jax.cli import parse_config_flags

        values = parse_config_flags("jfe aot", rest, extra=("topology",))
        config, topology = values.config, parse_topology(values.topology)
        shape = batch_shape_for(config, args.batch_shape)
        programs = [p.strip() for p in args.programs.split(",") if p.strip()]
        results = estimate(config, topology, shape=shape, programs=programs)
    except ValueError as e:
        print(f"jfe aot: error: {e}", file=sys.stderr)
        return 2
    print(format_report(results, topology))
    if args.json:
        with open(args.json, "w", encoding="utf-8") as f:
            json.dump(report_dict(results, topology, config, shape), f, indent=2)
    failed = [r for r in results if not r.fits]
    for r in failed:
        need = (
            f"needs {r.total_bytes / GIB:.2f} GiB per chip"
            if math.isfinite(r.total_bytes)
            else r.error
        )
        print(
            f"jfe aot: the {r.program} program does not fit in HBM on {topology.name} "
            f"({GENERATIONS[topology.generation].hbm_gib:g} GiB per chip): {need}",
            file=sys.stderr,
        )
    return 1 if failed else 0


__all__ = [
    "BatchShape",
    "GENERATIONS",
    "ProgramEstimate",
    "TpuTopology",
    "aot_main",
    "batch_shape_for",
    "estimate",
    "format_report",
    "parse_topology",
    "report_dict",
    "slice_shape",
]
