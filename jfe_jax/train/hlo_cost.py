"""Loop-aware matmul FLOPs and collective bytes of a compiled (optimized) HLO module.

XLA's ``compiled.cost_analysis()`` visits every computation once: the body of a ``while`` loop
(``lax.scan`` over layers, ``lax.map`` over gradient-cache chunks) is counted for one
iteration, whatever its trip count. A train step with scanned layers inside chunk loops is
then under-counted by one to three orders of magnitude. ``hlo_costs`` walks the HLO text of
``compiled.as_text()`` and multiplies what each computation does by how often it runs:

* FLOPs of ``dot`` and ``convolution`` instructions (2 x output elements x contraction size),
  wherever they sit (inside fusions, loop bodies, called computations);
* bytes moved by collectives (all-gather, all-reduce, reduce-scatter, all-to-all,
  collective-permute), per device: the larger of operands and result;
* the TPU compiler's own per-op time estimates (``"estimated_cycles"`` in the backend config
  of fusions and other top-level ops; what a fusion calls is not counted again);
* trip counts from the loop's ``known_trip_count`` when the compiler recorded it, else from its
  condition (``counter < N`` with the counter's start value read from the loop's init tuple).

The numbers are per device: the HLO is the SPMD-partitioned program one device runs. Loops
whose trip count cannot be read are counted once and listed in ``unknown_trip_loops``.
"""

from __future__ import annotations

import dataclasses
import functools
import math
import re
from collections.abc import Sequence

_DTYPE_BITS = {
    "pred": 8,
    "s4": 4,
    "u4": 4,
    "s8": 8,
    "u8": 8,
    "s16": 16,
    "u16": 16,
    "f16": 16,
    "bf16": 16,
    "s32": 32,
    "u32": 32,
    "f32": 32,
    "s64": 64,
    "u64": 64,
    "f64": 64,
    "c64": 64,
    "c128": 128,
}
_COLLECTIVES = (
    "all-gather",
    "all-gather-start",
    "all-reduce",
    "all-reduce-start",
    "reduce-scatter",
    "all-to-all",
    "collective-permute",
    "collective-permute-start",
)
_HEADER = re.compile(r"^(ENTRY\s+)?%?([\w.\-]+)\s+\(.*\)\s+->\s+.*\{\s*$")
_INSTRUCTION = re.compile(r"^\s*(?:ROOT\s+)?%?([\w.\-]+)\s+=\s+(.*)$")
_CYCLES = re.compile(r'"estimated_cycles":"(\d+)"')
# Custom calls that cost_analysis()["optimal_seconds"] counts as -1 s each (measured with
# libtpu 0.0.42.1: a program's negative total equals minus their count plus its real time).
UNKNOWN_COST_TARGETS = (
    "ConcatBitcast",
    "ZeroCrop",
    "PrepareAsyncCallStart",
    "PrepareAsyncCallDone",
)
_ARRAY = re.compile(r"^(\w+)\[([\d,]*)\]")


@dataclasses.dataclass(frozen=True)
class Instruction:
    """One HLO instruction: its result type text, opcode, operand names and attributes."""

    name: str
    type_text: str
    opcode: str
    operands: tuple[str, ...]
    attributes: str


@dataclasses.dataclass(frozen=True)
class HloCosts:
    """Per-device costs of one compiled module (see the module docstring)."""

    matmul_flops: float  # dot + convolution FLOPs, loop bodies times their trip counts
    matmul_flops_once: float  # the same with every loop body counted once (as cost_analysis)
    collective_bytes: float  # bytes through collectives, loop-aware
    estimated_cycles: float  # sum of the compiler's per-op "estimated_cycles", loop-aware
    estimated_cycles_once: float  # the same with every loop body counted once
    unknown_cost_ops: int  # custom calls XLA's TPU cost model prices at -1 s each
    loops: tuple[tuple[str, int], ...]  # (while instruction, trip count) of every loop found
    unknown_trip_loops: tuple[str, ...]  # loops counted once: trip count not readable

    @property
    def loop_factor(self) -> float:
        """How much the loop-aware matmul FLOPs exceed the counted-once ones."""
        return self.matmul_flops / self.matmul_flops_once if self.matmul_flops_once else 1.0


def _balanced(text: str, start: int) -> int:
    """Index just past the bracket group opening at ``text[start]``."""
    pairs = {"(": ")", "{": "}", "[": "]"}
    stack = []
    for i in range(start, len(text)):
        c = text[i]
        if c in pairs:
            stack.append(pairs[c])
        elif stack and c == stack[-1]:
            stack.pop()
            if not stack:
                return i + 1
    raise ValueError(f"unbalanced brackets in HLO text: {text[start : start + 80]!r}")


def _split_top_level(text: str) -> list[str]:
    parts, depth, current = [], 0, []
    for c in text:
        if c in "([{":
            depth += 1
        elif c in ")]}":
            depth -= 1
        if c == "," and depth == 0:
            parts.append("".join(current).strip())
            current = []
        else:
            current.append(c)
    if "".join(current).strip():
        parts.append("".join(current).strip())
    return parts


def _parse_instruction(line: str) -> Instruction | None:
    match = _INSTRUCTION.match(line)
    if not match:
        return None
    name, rest = match.groups()
    if rest.startswith("("):
        end = _balanced(rest, 0)
    else:
        end = rest.find(" ")
    type_text, rest = rest[:end], rest[end:].lstrip()
    op = re.match(r"([\w\-]+)\(", rest)
    if not op:
        return None
    close = _balanced(rest, op.end() - 1)
    operands = tuple(
        part.split()[-1].lstrip("%") for part in _split_top_level(rest[op.end() : close - 1])
    )
    return Instruction(name, type_text, op.group(1), operands, rest[close:])


def parse_hlo(text: str) -> tuple[dict[str, dict[str, Instruction]], str]:
    """``({computation: {instruction name: Instruction}}, entry computation name)``."""
    computations: dict[str, dict[str, Instruction]] = {}
    entry, current = "", None
    for line in text.splitlines():
        header = _HEADER.match(line)
        if header:
            current = computations.setdefault(header.group(2), {})
            if header.group(1):
                entry = header.group(2)
            continue
        if current is None:
            continue
        if line.startswith("}"):
            current = None
            continue
        instruction = _parse_instruction(line)
        if instruction is not None:
            current[instruction.name] = instruction
    if not entry:
        raise ValueError("HLO text has no ENTRY computation")
    return computations, entry


def _array(type_text: str) -> tuple[str, tuple[int, ...]] | None:
    match = _ARRAY.match(type_text)
    if not match:
        return None
    dims = tuple(int(d) for d in match.group(2).split(",") if d)
    return match.group(1), dims


def _bytes(type_text: str) -> float:
    """Bytes of an array type, or of the largest array in a tuple type."""
    arrays = re.findall(r"(\w+)\[([\d,]*)\]", type_text)
    sizes = [
        _DTYPE_BITS.get(dtype, 32) / 8 * math.prod(int(d) for d in dims.split(",") if d)
        for dtype, dims in arrays
    ]
    return max(sizes, default=0.0)


def _attribute(instruction: Instruction, key: str) -> str | None:
    match = re.search(rf"\b{key}=%?([\w.\-]+)", instruction.attributes)
    return match.group(1) if match else None


def _matmul_flops(instruction: Instruction, scope: dict[str, Instruction]) -> float:
    out = _array(instruction.type_text)
    if out is None or len(instruction.operands) < 2:
        return 0.0
    out_elements = math.prod(out[1])
    if instruction.opcode == "dot":
        lhs = scope.get(instruction.operands[0])
        dims = re.search(r"lhs_contracting_dims=\{([\d,]*)\}", instruction.attributes)
        lhs_shape = _array(lhs.type_text) if lhs else None
        if lhs_shape is None or dims is None:
            return 0.0
        contraction = math.prod(lhs_shape[1][int(d)] for d in dims.group(1).split(",") if d)
        return 2.0 * out_elements * contraction
    kernel = scope.get(instruction.operands[1])
    labels = re.search(r"dim_labels=[^_]+_([^-]+)->", instruction.attributes)
    kernel_shape = _array(kernel.type_text) if kernel else None
    if kernel_shape is None or labels is None:
        return 0.0
    # Each output element reads (input features per group) x (window taps that land on real
    # input) kernel values; XLA writes batched matmuls as convolutions whose batch is a window
    # dimension over an lhs-dilated input, where only one tap in ``lhs_dilate`` is real.
    features = math.prod(
        size for label, size in zip(labels.group(1), kernel_shape[1], strict=False) if label == "i"
    )
    window = re.search(r"window=\{([^}]*)\}", instruction.attributes)
    taps = 1
    if window:
        sizes = _window_field(window.group(1), "size")
        dilations = _window_field(window.group(1), "lhs_dilate") or [1] * len(sizes)
        taps = math.prod(-(-size // dilation) for size, dilation in zip(sizes, dilations))
    return 2.0 * out_elements * features * taps


def _window_field(window: str, key: str) -> list[int]:
    match = re.search(rf"\b{key}=([\dx]+)", window)
    return [int(v) for v in match.group(1).split("x")] if match else []


def _constant_value(name: str, scope: dict[str, Instruction]) -> int | None:
    """The integer a scalar constant holds, following copies and bitcasts."""
    for _ in range(8):
        instruction = scope.get(name)
        if instruction is None:
            return None
        if instruction.opcode == "constant":
            try:
                return int(instruction.operands[0])
            except (IndexError, ValueError):
                return None
        if instruction.opcode not in ("copy", "bitcast", "convert") or not instruction.operands:
            return None
        name = instruction.operands[0]
    return None


def _trip_count(
    loop: Instruction,
    scope: dict[str, Instruction],
    computations: dict[str, dict[str, Instruction]],
) -> int | None:
    known = re.search(r'"known_trip_count":\{"n":"(\d+)"\}', loop.attributes)
    if known:
        return int(known.group(1))
    condition = computations.get(_attribute(loop, "condition") or "")
    if not condition:
        return None
    compare = next((i for i in condition.values() if i.opcode == "compare"), None)
    if compare is None or len(compare.operands) != 2:
        return None
    direction = re.search(r"direction=(\w+)", compare.attributes)
    counter = condition.get(compare.operands[0])
    limit = _constant_value(compare.operands[1], condition)
    if direction is None or counter is None or limit is None:
        return None
    if counter.opcode != "get-tuple-element":
        return None
    start = 0
    index = re.search(r"index=(\d+)", counter.attributes)
    init = scope.get(loop.operands[0]) if loop.operands else None
    if index and init is not None and init.opcode == "tuple":
        value = _constant_value(init.operands[int(index.group(1))], scope)
        start = 0 if value is None else value
    trips = {
        "LT": limit - start,
        "LE": limit - start + 1,
        "GT": start - limit,
        "GE": start - limit + 1,
    }.get(direction.group(1))
    return max(trips, 0) if trips is not None else None


def _callees(
    instruction: Instruction,
    scope: dict[str, Instruction],
    computations: dict[str, dict[str, Instruction]],
) -> list[tuple[str, int | None, bool]]:
    """(computation, times it runs per execution or None if unknown, entered via a fusion)."""
    if instruction.opcode == "while":
        body = _attribute(instruction, "body")
        return [(body, _trip_count(instruction, scope, computations), False)] if body else []
    if instruction.opcode in ("fusion", "call", "async-start", "custom-call"):
        called = _attribute(instruction, "calls") or _attribute(instruction, "to_apply")
        return [(called, 1, instruction.opcode == "fusion")] if called else []
    if instruction.opcode == "conditional":  # every branch counted: an upper bound
        branches = re.search(r"branch_computations=\{([^}]*)\}", instruction.attributes)
        names = branches.group(1).split(",") if branches else []
        names += [
            _attribute(instruction, k) or "" for k in ("true_computation", "false_computation")
        ]
        return [(n.strip().lstrip("%"), 1, False) for n in names if n.strip()]
    return []


def hlo_costs(text: str) -> HloCosts:
    """Loop-aware per-device matmul FLOPs, collective bytes and cycles of an HLO module."""
    computations, entry = parse_hlo(text)
    loops: dict[str, int] = {}
    unknown: set[str] = set()

    @functools.cache
    def cost(name: str, loop_aware: bool, fused: bool) -> tuple[float, float, float]:
        scope = computations.get(name, {})
        flops, moved, cycles = 0.0, 0.0, 0.0
        for instruction in scope.values():
            if instruction.opcode in ("dot", "convolution"):
                flops += _matmul_flops(instruction, scope)
            elif instruction.opcode in _COLLECTIVES:
                operand_bytes = sum(
                    _bytes(scope[o].type_text) for o in instruction.operands if o in scope
                )
                moved += max(operand_bytes, _bytes(instruction.type_text))
            estimated = _CYCLES.search(instruction.attributes)
            if estimated and not fused:  # a fusion's estimate covers what it calls
                cycles += float(estimated.group(1))
            for callee, trips, enters_fusion in _callees(instruction, scope, computations):
                if instruction.opcode == "while":
                    loops[instruction.name] = trips if trips is not None else 1
                    if trips is None:
                        unknown.add(instruction.name)
                factor = float(trips or 1) if loop_aware else 1.0
                callee_cost = cost(callee, loop_aware, fused or enters_fusion)
                flops += factor * callee_cost[0]
                moved += factor * callee_cost[1]
                cycles += factor * callee_cost[2]
        return flops, moved, cycles

    flops, moved, cycles = cost(entry, True, False)
    flops_once, _, cycles_once = cost(entry, False, False)
    return HloCosts(
        matmul_flops=flops,
        matmul_flops_once=flops_once,
        collective_bytes=moved,
        estimated_cycles=cycles,
        estimated_cycles_once=cycles_once,
        unknown_cost_ops=sum(
            1
            for target in re.findall(r'custom_call_target="([^"]*)"', text)
            if target in UNKNOWN_COST_TARGETS
        ),
        loops=tuple(sorted(loops.items())),
        unknown_trip_loops=tuple(sorted(unknown)),
    )


def _op_label(op_name: str) -> str:
    """A short label of an op from its ``op_name`` metadata: pass, then the module path."""
    if "transpose(jvp(" in op_name:
        step = "backward"
    elif "jvp(" in op_name:
        step = "forward (differentiated)"
    else:
        step = "forward"
    parts = [
        part
        for part in re.sub(r"(transpose|jvp|jit)\(([^()]*)\)+", r"\2", op_name).split("/")
        if part
        and part not in _NOISE
        and not part.startswith(("jit(", "jvp(", "transpose(", "branch_"))
        and not part[0].isupper()  # Flax module classes; instance names are lower case
    ]
    return f"{step}: {'/'.join(parts)}"


_NOISE = {"while", "body", "cond", "closed_call", "checkpoint", "rematted_computation", "step"}


def time_by_op(text: str, top: int = 20) -> list[tuple[str, float, float]]:
    """The ops that take the most of the compiler's loop-aware cycle estimates.

    Returns ``(label, estimated cycles, matmul FLOPs)`` per device, summed over instructions
    with the same label (pass + module path from the ``op_name`` metadata), largest first.
    """
    computations, entry = parse_hlo(text)

    @functools.cache
    def flops_of(name: str) -> float:
        scope = computations.get(name, {})
        total = 0.0
        for instruction in scope.values():
            if instruction.opcode in ("dot", "convolution"):
                total += _matmul_flops(instruction, scope)
            for callee, trips, _ in _callees(instruction, scope, computations):
                total += float(trips or 1) * flops_of(callee)
        return total

    totals: dict[str, list[float]] = {}

    def visit(name: str, multiplier: float) -> None:
        scope = computations.get(name, {})
        for instruction in scope.values():
            estimated = _CYCLES.search(instruction.attributes)
            if estimated:
                op_name = re.search(r'op_name="([^"]*)"', instruction.attributes)
                label = _op_label(op_name.group(1) if op_name else instruction.opcode)
                entry_ = totals.setdefault(label, [0.0, 0.0])
                entry_[0] += multiplier * float(estimated.group(1))
                if instruction.opcode == "fusion":
                    called = _attribute(instruction, "calls")
                    entry_[1] += multiplier * flops_of(called) if called else 0.0
            for callee, trips, enters_fusion in _callees(instruction, scope, computations):
                if not enters_fusion:
                    visit(callee, multiplier * float(trips or 1))

    visit(entry, 1.0)
    ranked = sorted(totals.items(), key=lambda item: -item[1][0])
    return [(label, cycles, flops) for label, (cycles, flops) in ranked[:top]]


def time_by_pass(ops: Sequence[tuple[str, float, float]]) -> list[tuple[str, float, float]]:
    """``time_by_op``'s entries (all of them, for totals) summed by pass and top module
    (``"backward: text"``, ``"forward: vision"``; ops outside any module path are
    ``"other"``): ``(label, estimated cycles, matmul FLOPs)`` per device, largest first."""
    totals: dict[str, list[float]] = {}
    for label, cycles, flops in ops:
        step, _, path = label.partition(": ")
        module, slash, _ = path.partition("/")  # ops outside any module path: "other"
        key = f"{step}: {module if slash else 'other'}"
        entry = totals.setdefault(key, [0.0, 0.0])
        entry[0] += cycles
        entry[1] += flops
    ranked = sorted(totals.items(), key=lambda item: -item[1][0])
    return [(label, cycles, flops) for label, (cycles, flops) in ranked]
