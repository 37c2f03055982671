"""TPU slices by name, their chips' figures, and their compile-only devices (through libtpu).

Names. ``GEN:AxB[xC]`` gives the chips along each torus axis (``v5p:4x4x4``, ``v5e:16x16``).
``GEN-N`` follows Google's accelerator types: for v4 and v5p, N counts TensorCores (two per
chip); for v5e (also written ``v5litepod-N``) and v6e, N counts chips:

    v4-8   = 4 chips   = 2x2x1      v5p-8   = 4 chips  = 2x2x1     v5e-8 = v5litepod-8 = 2x4
    v4-16  = 8 chips   = 2x2x2      v5p-64  = 32 chips = 2x4x4     v5e-256 = 16x16
    v4-128 = 64 chips  = 4x4x4      v5p-128 = 64 chips = 4x4x4     v6e-16  = 4x4

Slices of N chips take Google's default shapes: 3-D tori grow 2x2x2 -> 2x2x4 -> 2x4x4 ->
4x4x4 -> 4x4x8 ...; 2-D slices are as square as a power of two allows (8 = 2x4, 32 = 4x8).
v4 and v5p devices are built "megacore" (one JAX device per chip, as on a real slice).
"""

from __future__ import annotations

import dataclasses
import functools
import importlib.metadata
import importlib.util
import math
import os
import re
import time
from typing import Any

import jax
import jax.numpy as jnp

from jfe_jax.logs import tpu_present

GIB = 2**30

# Peak dense bf16 FLOP/s per chip (the vendors' published figures for each TPU generation).
PEAK_FLOPS = {
    "tpu v4": 275e12,
    "tpu v5 lite": 197e12,  # v5e
    "tpu v5e": 197e12,
    "tpu v5p": 459e12,
    "tpu v5": 459e12,
    "tpu v6 lite": 918e12,  # v6e (Trillium)
    "tpu v6e": 918e12,
    "nvidia h100": 989e12,
    "nvidia h200": 989e12,
    "nvidia a100": 312e12,
}


@dataclasses.dataclass(frozen=True)
class Generation:
    """What a TPU generation's chips offer and how its slices are named."""

    peak_flops: float  # dense bf16 FLOP/s per chip (vendor figure)
    hbm_gib: float  # HBM per chip (vendor figure)
    ici_gbps: float  # inter-chip interconnect per chip, all links (Cloud TPU docs)
    clock_hz: float  # peak / (2 x MXU multiply-adds per cycle)
    cores_in_name: int  # TensorCores per chip that the GEN-N accelerator type counts
    axes: int  # torus dimensions
    chip_config: str  # libtpu chip config: "megacore" = one device per chip
    max_chips: int  # largest slice handled here


GENERATIONS = {
    "v4": Generation(PEAK_FLOPS["tpu v4"], 32, 2400, 1.05e9, 2, 3, "megacore", 4096),
    "v5e": Generation(PEAK_FLOPS["tpu v5e"], 16, 1600, 1.5e9, 1, 2, "default", 256),
    "v5p": Generation(PEAK_FLOPS["tpu v5p"], 95, 4800, 1.75e9, 2, 3, "megacore", 4096),
    "v6e": Generation(PEAK_FLOPS["tpu v6e"], 32, 3584, 1.75e9, 1, 2, "default", 256),
}
_ALIASES = {"v5litepod": "v5e", "v5lite": "v5e"}
_EXAMPLES = "e.g. v5p-128, v5e-256, v4-16, v6e-16, v5p:4x4x4, v5e:16x16"


def slice_shape(generation: str, chips: int) -> tuple[int, ...]:
    """Google's default shape of a ``generation`` slice of ``chips`` chips."""
    gen = GENERATIONS[generation]
    if chips < 1 or chips & (chips - 1) or chips > gen.max_chips or chips == 2:
        raise ValueError(
            f"no {generation} slice has {chips} chips (1, 4, 8, ... {gen.max_chips} are)"
        )
    if gen.axes == 2:
        rows = 2 ** (int(math.log2(chips)) // 2)
        return (rows, chips // rows)
    if chips <= 4:
        return (1, 1, 1) if chips == 1 else (2, 2, 1)
    shape = [2, 2, 2]
    while math.prod(shape) < chips:  # double the last of the smallest axes
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
    def spec(self) -> Generation:
        return GENERATIONS[self.generation]

    @property
    def chips(self) -> int:
        return math.prod(self.shape)

    @property
    def libtpu_name(self) -> str:
        return f"{self.generation}:{'x'.join(map(str, self.shape))}"

    @property
    def accelerator_type(self) -> str:
        prefix = "v5litepod" if self.generation == "v5e" else self.generation
        return f"{prefix}-{self.chips * self.spec.cores_in_name}"

    @property
    def hbm_bytes_per_chip(self) -> float:
        return self.spec.hbm_gib * GIB

    def describe(self) -> str:
        gen = self.spec
        return (
            f"{self.accelerator_type} = {self.libtpu_name}: {self.chips} chips, "
            f"{gen.hbm_gib:g} GiB HBM, {gen.peak_flops / 1e12:g} TFLOP/s bf16 and "
            f"{gen.ici_gbps:g} Gbps ICI per chip"
        )

    def devices(self) -> list[jax.Device]:
        """Compile-only devices of the slice (needs libtpu; no TPU is touched)."""
        require_libtpu()
        from jax.experimental import topologies

        kwargs: dict[str, Any] = {"chip_config_name": self.spec.chip_config}
        if self.chips < 4:  # libtpu's default host holds 2x2x1 chips
            kwargs["chips_per_host_bounds"] = (*self.shape, 1, 1)[:3]
        # libtpu takes /tmp/libtpu_lockfile unless several processes may load it; a
        # compile-only topology opens no chip, so it must not wait for other JAX processes.
        os.environ.setdefault("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")
        if not tpu_present():
            # Without these, libtpu prints that it cannot find this host's TPU type and
            # workers; they do not change the compile-only topology (same programs, tested).
            os.environ.setdefault("TPU_ACCELERATOR_TYPE", self.accelerator_type)
            os.environ.setdefault("TPU_WORKER_HOSTNAMES", "localhost")
        try:
            devices = topologies.get_topology_desc(
                platform="tpu", topology_name=self.libtpu_name, **kwargs
            ).devices
        except Exception as e:  # JaxRuntimeError from libtpu
            raise ValueError(f"libtpu cannot build topology {self.libtpu_name!r}: {e}") from e
        if len(devices) != self.chips:
            raise ValueError(
                f"libtpu built {len(devices)} devices for {self.libtpu_name}, expected one per "
                f"chip ({self.chips})"
            )
        return list(devices)


def parse_topology(name: str) -> TpuTopology:
    """``v5p-128`` / ``v5litepod-256`` / ``v6e-16`` or ``v5p:4x4x4`` / ``v5e:16x16``."""
    match = re.fullmatch(r"([a-z0-9]+)(?:-(\d+)|:(\d+(?:x\d+)*))", name.strip().lower())
    if not match:
        raise ValueError(f"topology {name!r} is neither GEN-N nor GEN:AxBxC ({_EXAMPLES})")
    generation = _ALIASES.get(match.group(1), match.group(1))
    if generation not in GENERATIONS:
        raise ValueError(
            f"unknown TPU generation {match.group(1)!r} in {name!r}; known: "
            f"{', '.join(sorted(GENERATIONS))} ({_EXAMPLES})"
        )
    gen = GENERATIONS[generation]
    if match.group(2) is not None:
        count = int(match.group(2))
        unit = "TensorCores (2 per chip)" if gen.cores_in_name == 2 else "chips"
        if count % gen.cores_in_name:
            raise ValueError(f"{name!r}: {generation}-N counts {unit}, so N must be even")
        try:
            shape = slice_shape(generation, count // gen.cores_in_name)
        except ValueError as e:
            raise ValueError(f"{name!r}: {e}; {generation}-N counts {unit}") from e
    else:
        shape = tuple(int(v) for v in match.group(3).split("x"))
        if len(shape) != gen.axes or min(shape) < 1:
            raise ValueError(
                f"{name!r}: a {generation} slice has {gen.axes} axes of chips (positive), got "
                f"{match.group(3)}"
            )
    return TpuTopology(name=name, generation=generation, shape=shape)


def require_libtpu() -> str:
    """libtpu's version; ValueError with the install command when it is missing."""
    if importlib.util.find_spec("libtpu") is None:
        raise ValueError(
            "compiling for a TPU topology needs libtpu, which is not installed: "
            "pip install -e '.[tpu]' (jax[tpu]==0.10.2 brings libtpu 0.0.42.1)"
        )
    try:
        return importlib.metadata.version("libtpu")
    except importlib.metadata.PackageNotFoundError:
        return "unknown"


@functools.cache
def measured_cpu_peak(size: int = 2048, repeats: int = 5) -> float:
    """FLOP/s of a jitted float32 matmul on this host's CPU backend (the whole machine),
    measured once per (``size``, ``repeats``)."""
    return time_matmul(jax.devices("cpu")[0], size, repeats)


def time_matmul(device: jax.Device, size: int = 2048, repeats: int = 5) -> float:
    """FLOP/s of a jitted float32 ``size`` x ``size`` matmul on ``device``, best of ``repeats``
    (measured afresh on every call; ``measured_cpu_peak`` keeps one per argument)."""
    a = jax.device_put(jnp.ones((size, size), jnp.float32), device)
    matmul = jax.jit(lambda x: x @ x)
    matmul(a).block_until_ready()
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        matmul(a).block_until_ready()
        best = min(best, time.perf_counter() - start)
    return 2 * size**3 / best


def peak_flops(devices: list[jax.Device] | None = None) -> tuple[float, str]:
    """Total peak FLOP/s of ``devices`` and where the figure comes from."""
    devices = devices or jax.devices()
    kind = devices[0].device_kind.lower()
    if devices[0].platform == "cpu":
        # Fake CPU devices share the host's cores: the measured machine peak is the total.
        return measured_cpu_peak(), "measured f32 matmul on this host"
    for name, peak in PEAK_FLOPS.items():
        if kind.startswith(name):
            return peak * len(devices), f"{name} bf16 peak x {len(devices)}"
    return float("nan"), f"unknown device kind {kind!r}"
