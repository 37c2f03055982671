"""What the TPU compiler says about one compiled program: its per-chip memory, FLOPs, step-time
estimates and MFU (``ProgramEstimate``, read by ``analyse``), and the arithmetic that turns
XLA's cost model into a step time. ``jfe aot`` (``jfe_jax.train.aot.estimate``) analyses the
programs it compiles for a TPU slice; ``benchmarks/device/bench_device.py`` the one that ran
on a GPU.

How the time is estimated. XLA's ``cost_analysis()`` visits a loop body once, and the train
step is loops (layers scanned inside gradient-cache chunks); its ``optimal_seconds`` also
counts every op the TPU cost model does not know (some custom calls) as -1 s. So:

* compiled FLOPs: loop-aware dot/convolution FLOPs of the compiled HLO (``hlo_cost``);
* cost-model time (the headline): ``optimal_seconds`` plus 1 s per op of unknown cost (the
  custom calls in ``hlo_cost.UNKNOWN_COST_TARGETS``; ``known_cost_seconds``, which the report
  prints, or "no estimate" where nothing is left), times the loop factor: the compiler's
  per-op ``estimated_cycles`` summed with trip counts over the same sum with loops once,
  and never below the compute floor (``cost_model_time``);
* per-op cycles time: the compiler's ``estimated_cycles`` with trip counts / the chip clock,
  a less optimistic figure than ``optimal_seconds`` (which is a roofline);
* compute floor: compiled FLOPs / peak; ICI floor: loop-aware collective bytes / the chip's
  whole ICI bandwidth. ``optimal_seconds`` treats collectives as HBM traffic, so a step whose
  ICI floor exceeds its cost-model time is bound by communication the estimate does not see.

MFU = model FLOPs (``jfe_jax.models.flops``: 3 x forward of every side, padded shapes; remat,
the gradient-cache re-forward and frozen-weight savings excluded) / (chips x peak x time). That
convention credits padding and gradients a step with frozen parts never computes, so the train
program also reports the required FLOPs (``flops.batch_required_flops`` of each item alone at
its real tokens and patches: a frozen vision tower 1x forward, a decoder with frozen base
weights 2x, adapters 3x) and the MFU at them (at the cost-model and the per-op cycles times),
the stricter figure.
"""

from __future__ import annotations

import dataclasses
import math
import sys
import time

from jfe_jax.train.hlo_cost import hlo_costs, time_by_op, time_by_pass
from jfe_jax.train.topology import TpuTopology


@dataclasses.dataclass
class ProgramEstimate:
    """What the compiler says about one program on one slice (bytes, FLOPs per chip)."""

    program: str  # train | export
    fits: bool
    compile_seconds: float
    hbm_bytes: float  # per chip
    model_flops: float  # one step, all chips (jfe_jax.models.flops, 3 x forward convention)
    required_flops: float = math.nan  # what the trained parts need (train_step_required_flops)
    oom_error: str = ""  # the compiler's out-of-memory message, when it refused
    argument_bytes: float = math.nan
    temp_bytes: float = math.nan
    output_bytes: float = math.nan
    alias_bytes: float = math.nan  # donated arguments reused as outputs
    code_bytes: float = math.nan
    total_bytes: float = math.nan  # arguments + temporaries + outputs - aliased + code
    compiled_flops: float = math.nan  # loop-aware dot/convolution FLOPs per chip
    xla_flops: float = math.nan  # cost_analysis()["flops"] per chip, loop bodies once
    # cost_analysis()["optimal_seconds"] as returned: -1 s in it per op of unknown cost.
    xla_optimal_seconds: float = math.nan
    # The same without the unknown-cost ops' -1 s each; nan: XLA gave no estimate.
    xla_known_seconds: float = math.nan
    unknown_cost_ops: int = 0  # ops the cost model gives no cost for (counted -1 s each)
    loop_factor: float = math.nan  # estimated cycles with trip counts / with loops once
    collective_bytes: float = math.nan  # per chip, loop-aware
    cost_model_seconds: float = math.nan  # the headline step time (module docstring)
    cycles_seconds: float = math.nan
    compute_floor_seconds: float = math.nan
    ici_floor_seconds: float = math.nan
    mfu: float = math.nan  # at cost_model_seconds
    mfu_cycles: float = math.nan  # at cycles_seconds
    mfu_required: float = math.nan  # required_flops at cost_model_seconds
    mfu_required_cycles: float = math.nan  # required_flops at cycles_seconds
    restore_bytes: float = math.nan  # train: per-chip bound while a checkpoint restores
    batch_mix: str = ""  # train: --batch-mix
    batch_items: dict = dataclasses.field(default_factory=dict)  # train: side -> modality: items
    loops: list = dataclasses.field(default_factory=list)  # [while name, trip count]
    top_ops: list = dataclasses.field(default_factory=list)  # [label, seconds, matmul FLOPs]
    passes: list = dataclasses.field(default_factory=list)  # the same by pass and top module
    notes: list = dataclasses.field(default_factory=list)


def cost_model_time(optimal: float, loop_factor: float, compute_floor: float) -> tuple[float, str]:
    """``(seconds, note)``: the cost model's step time, ``optimal`` (one pass of the loop
    bodies, unknown-cost ops already corrected) times ``loop_factor``, never below
    ``compute_floor`` (the compiled matmuls at peak, which no step can beat: the loop
    correction, a factor from the per-op cycles, can land under it when a program has few
    loops); the note says when the floor was taken instead."""
    seconds = optimal * loop_factor
    if not math.isfinite(seconds) or seconds <= 0:
        return compute_floor, "no usable optimal_seconds: cost-model time is the compute floor"
    if seconds < compute_floor:
        return compute_floor, (
            f"cost-model time {seconds:.3g} s is below the compute floor: taken as the "
            "compute floor"
        )
    return seconds, ""


def known_cost_seconds(optimal: float, unknown_found: int) -> tuple[float, int, str]:
    """``(seconds, unknown ops, note)`` from XLA's ``optimal_seconds``, which prices each op it
    has no cost for at -1 s: ``optimal`` with those taken out (``unknown_found``: the custom
    calls ``hlo_cost`` counts; more when the total is lower still), nan when XLA gave no
    estimate (none returned, or nothing left once they are out)."""
    if not math.isfinite(optimal):
        return math.nan, 0, ""
    unknown, note = 0, ""
    if optimal < 0:
        unknown = unknown_found
        if optimal + unknown < 0:
            unknown = math.ceil(-optimal)
            note = (
                f"XLA gives no cost for {unknown} ops, more than the {unknown_found} custom "
                "calls known to have none"
            )
        optimal += unknown
    return (optimal if optimal > 0 else math.nan), unknown, note


def _is_out_of_memory(error: Exception) -> bool:
    text = str(error)
    return "RESOURCE_EXHAUSTED" in text or "Ran out of memory" in text


def analyse(
    program: str,
    lowered,
    topology: TpuTopology,
    model_flops: float,
    required_flops: float = math.nan,
) -> ProgramEstimate:
    """Compiles ``lowered`` for ``topology`` and reads its memory and cost analyses."""
    gen = topology.spec
    est = ProgramEstimate(program, True, 0.0, topology.hbm_bytes_per_chip, model_flops)
    est.required_flops = required_flops
    start = time.perf_counter()
    try:
        compiled = lowered.compile()
    except Exception as e:  # JaxRuntimeError; only running out of memory is a result
        if not _is_out_of_memory(e):
            raise
        est.fits, est.oom_error = False, str(e).strip().splitlines()[0]
        est.compile_seconds = time.perf_counter() - start
        return est
    est.compile_seconds = time.perf_counter() - start
    memory = compiled.memory_analysis()
    if memory is not None:
        est.argument_bytes = float(memory.argument_size_in_bytes)
        est.temp_bytes = float(memory.temp_size_in_bytes)
        est.output_bytes = float(memory.output_size_in_bytes)
        est.alias_bytes = float(memory.alias_size_in_bytes)
        est.code_bytes = float(memory.generated_code_size_in_bytes)
        est.total_bytes = (
            est.argument_bytes + est.temp_bytes + est.output_bytes - est.alias_bytes
        ) + est.code_bytes
        est.fits = est.total_bytes <= est.hbm_bytes
    cost = compiled.cost_analysis()
    cost = (cost[0] if isinstance(cost, (list, tuple)) else cost) or {}
    text = compiled.as_text()
    hlo = hlo_costs(text)
    ops = time_by_op(text, top=sys.maxsize)  # parsed once: the top ops and their totals
    est.top_ops = [[label, cycles / gen.clock_hz, flops] for label, cycles, flops in ops[:12]]
    est.passes = [
        [label, cycles / gen.clock_hz, flops] for label, cycles, flops in time_by_pass(ops)
    ]
    est.compiled_flops = hlo.matmul_flops
    est.xla_flops = float(cost.get("flops", math.nan))
    est.xla_optimal_seconds = float(cost.get("optimal_seconds", math.nan))
    est.collective_bytes = hlo.collective_bytes
    est.loops = [list(loop) for loop in hlo.loops]
    if hlo.estimated_cycles_once > 0:
        est.loop_factor = hlo.estimated_cycles / hlo.estimated_cycles_once
    else:
        est.loop_factor = hlo.loop_factor
        est.notes.append("no per-op cycle estimates: loop factor from matmul FLOPs")
    est.xla_known_seconds, est.unknown_cost_ops, note = known_cost_seconds(
        est.xla_optimal_seconds, hlo.unknown_cost_ops
    )
    if note:
        est.notes.append(note)
    est.cycles_seconds = hlo.estimated_cycles / gen.clock_hz
    est.compute_floor_seconds = hlo.matmul_flops / gen.peak_flops
    est.ici_floor_seconds = hlo.collective_bytes / (gen.ici_gbps * 1e9 / 8)
    est.cost_model_seconds, note = cost_model_time(
        est.xla_known_seconds, est.loop_factor, est.compute_floor_seconds
    )
    if note:
        est.notes.append(note)
    peak = topology.chips * gen.peak_flops
    est.mfu = model_flops / (peak * est.cost_model_seconds)
    est.mfu_cycles = model_flops / (peak * est.cycles_seconds) if est.cycles_seconds else math.nan
    est.mfu_required = required_flops / (peak * est.cost_model_seconds)
    if est.cycles_seconds:
        est.mfu_required_cycles = required_flops / (peak * est.cycles_seconds)
    if hlo.unknown_trip_loops:
        est.notes.append(f"loops counted once (trip count unread): {hlo.unknown_trip_loops}")
    if est.ici_floor_seconds > est.cost_model_seconds:
        est.notes.append("ICI floor above the cost-model time: communication-bound")
    return est
