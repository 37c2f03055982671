"""The device mesh, parameter and batch shardings, and host-to-global batches.

The mesh has three axes (``jfe_jax.models.axes.MESH_AXES``): ``data`` (pure data parallelism),
``fsdp`` (data parallelism whose parameters and optimizer state are sharded) and ``tensor``
(tensor parallelism). The batch is split over ``data`` and ``fsdp`` together; parameters are
placed by their logical axis names through ``LOGICAL_RULES``.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any

import flax.linen as nn
import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from jfe_jax.models.axes import LOGICAL_RULES, MESH_AXES
from jfe_jax.models.batches import (
    LateFusionBatch,
    ModelBatch,
    PackedBatch,
    TrainBatch,
    VisionPackedBatch,
)
from jfe_jax.models.packing import MERGED_PATCHES

# The mesh axes the batch (leading) dimension is split over; their product is the
# data-parallel size.
BATCH_AXES = ("data", "fsdp")

Rules = Sequence[tuple[str, str | tuple[str, ...] | None]]


def resolve_mesh_shape(
    shape: Mapping[str, int], *, num_devices: int | None = None
) -> dict[str, int]:
    """Returns ``{"data": d, "fsdp": f, "tensor": t}`` with a ``-1`` entry filled in.

    ``shape`` names every axis of ``MESH_AXES`` exactly once (a dict or an ml_collections
    ConfigDict); at most one axis may be ``-1``, which takes whatever the device count leaves.
    The product must equal ``num_devices`` (default: ``jax.device_count()``).
    """
    num_devices = jax.device_count() if num_devices is None else num_devices
    keys = set(shape.keys())
    if keys != set(MESH_AXES):
        missing = sorted(set(MESH_AXES) - keys)
        unknown = sorted(keys - set(MESH_AXES))
        raise ValueError(
            f"mesh shape must name exactly the axes {MESH_AXES}; "
            f"missing {missing}, unknown {unknown} (got {dict(shape)})"
        )
    sizes = {axis: int(shape[axis]) for axis in MESH_AXES}
    wildcards = [axis for axis, size in sizes.items() if size == -1]
    bad = {axis: size for axis, size in sizes.items() if size != -1 and size < 1}
    if bad:
        raise ValueError(f"mesh axis sizes must be positive or -1, got {bad} in {sizes}")
    if len(wildcards) > 1:
        raise ValueError(
            f"at most one mesh axis may be -1 (filled in from the device count), "
            f"got {len(wildcards)}: {wildcards} in {sizes}"
        )
    known = math.prod(size for size in sizes.values() if size != -1)
    if wildcards:
        if num_devices % known:
            raise ValueError(
                f"mesh axis {wildcards[0]!r}=-1 cannot be filled in: the other axes multiply "
                f"to {known}, which does not divide the device count {num_devices} ({sizes})"
            )
        sizes[wildcards[0]] = num_devices // known
    elif known != num_devices:
        raise ValueError(
            f"mesh shape {sizes} has {known} devices but {num_devices} are available; "
            f"the product of the axis sizes must equal the device count (or set one axis to -1)"
        )
    return sizes


def make_mesh(shape: Mapping[str, int], *, devices: Sequence[jax.Device] | None = None) -> Mesh:
    """Builds the ``(data, fsdp, tensor)`` mesh from a shape mapping (see resolve_mesh_shape).

    Axis types are ``Auto``: shardings are given at the jit boundary and propagated by the
    compiler (JAX 0.10's ``make_mesh`` would otherwise default to explicit axes).
    """
    devices = jax.devices() if devices is None else devices
    sizes = resolve_mesh_shape(shape, num_devices=len(devices))
    return jax.make_mesh(
        tuple(sizes[axis] for axis in MESH_AXES),
        MESH_AXES,
        axis_types=(jax.sharding.AxisType.Auto,) * len(MESH_AXES),
        devices=devices,
    )


def data_parallel_size(mesh: Mesh) -> int:
    """Number of ways the batch is split: the product of the ``data`` and ``fsdp`` axes."""
    return math.prod(mesh.shape[axis] for axis in BATCH_AXES)


def check_batch_divisible(global_batch_size: int, mesh: Mesh) -> None:
    """Raises ValueError unless ``global_batch_size`` splits evenly over data * fsdp."""
    size = data_parallel_size(mesh)
    if global_batch_size % size:
        raise ValueError(
            f"global batch size {global_batch_size} is not divisible by the data-parallel size "
            f"{size} (data={mesh.shape['data']} * fsdp={mesh.shape['fsdp']}); choose a "
            f"multiple of {size}"
        )


def batch_sharding(mesh: Mesh) -> NamedSharding:
    """Sharding of a batch array: leading axis over ``data`` and ``fsdp``, the rest replicated."""
    return NamedSharding(mesh, PartitionSpec(BATCH_AXES))


def replicated_sharding(mesh: Mesh) -> NamedSharding:
    """Sharding of an array held whole on every device (scalars, metrics)."""
    return NamedSharding(mesh, PartitionSpec())


def logical_shardings(tree: Any, mesh: Mesh, rules: Rules = LOGICAL_RULES) -> Any:
    """Maps a tree of ``nn.LogicallyPartitioned`` boxes (abstract or not) to NamedShardings.

    The result has the structure of the unboxed tree. Leaves without logical names (plain
    arrays) are replicated.
    """
    specs = nn.get_partition_spec(tree)
    return nn.logical_to_mesh_sharding(specs, mesh, rules)


def local_data_parallel_shards(mesh: Mesh, process_index: int | None = None) -> int:
    """Number of distinct batch shards whose devices belong to a process (default: this one);
    a per-host batch, and a packed side's rows, must be a multiple of it."""
    names = mesh.axis_names
    batch_dims = [names.index(axis) for axis in BATCH_AXES]
    process = jax.process_index() if process_index is None else process_index
    coords = {
        tuple(index[d] for d in batch_dims)
        for index, device in np.ndenumerate(mesh.devices)
        if device.process_index == process
    }
    return len(coords)


def host_row_positions(shard_starts: Sequence[int], shard_size: int) -> np.ndarray:
    """Global index of each of a host's local batch rows.

    A host's local batch is its batch shards (each ``shard_size`` rows, starting at
    ``shard_starts`` in the global batch) laid end to end in global order, as
    ``jax.make_array_from_process_local_data`` expects; on one host this is ``arange``.
    """
    return np.concatenate([np.arange(s, s + shard_size) for s in sorted(set(shard_starts))])


def globalize_pool_index(pool_index: np.ndarray, row_positions: np.ndarray) -> np.ndarray:
    """A packed side's ``pool_index [N, 2]`` with its host-local rows made global rows."""
    pool_index = np.array(pool_index, np.int32)
    pool_index[:, 0] = row_positions[pool_index[:, 0]]
    return pool_index


def _leading_global_size(name: str, local_size: int, mesh: Mesh, local_shards: int) -> int:
    """The global leading size of a leaf this host feeds ``local_size`` rows of, split over the
    ``local_shards`` batch shards its devices hold (``local_data_parallel_shards``)."""
    if local_size % local_shards:
        if jax.process_count() == 1:
            check_batch_divisible(local_size, mesh)
        raise ValueError(
            f"{name}: this host's {local_size} rows do not split over the {local_shards} "
            f"batch shards its devices hold; the per-host size must be a multiple of "
            f"{local_shards} (data-parallel size {data_parallel_size(mesh)})"
        )
    global_size = local_size // local_shards * data_parallel_size(mesh)
    check_batch_divisible(global_size, mesh)
    return global_size


def _global_row_positions(name: str, local_rows: int, mesh: Mesh, local_shards: int) -> np.ndarray:
    """The global row each of this host's ``local_rows`` rows of a batch leaf lands on."""
    global_rows = _leading_global_size(name, local_rows, mesh, local_shards)
    index_map = batch_sharding(mesh).addressable_devices_indices_map((global_rows,))
    starts = [index[0].start or 0 for index in index_map.values()]
    return host_row_positions(starts, global_rows // data_parallel_size(mesh))


def globalize_image_token_index(
    index: np.ndarray, row_positions: np.ndarray, row_tokens: int
) -> np.ndarray:
    """A vision-packed side's ``image_token_index`` (into this host's vision rows' merged
    tokens, ``row_tokens`` per row, flattened) made an index into the global vision rows'."""
    index = np.asarray(index, np.int64)
    rows, within = np.divmod(index, row_tokens)
    return (row_positions[rows] * row_tokens + within).astype(np.int32)


def _globalize_side(side: ModelBatch, mesh: Mesh, local_shards: int) -> ModelBatch:
    """One side with global row numbers in it: a packed side's ``pool_index``, a vision-packed
    side's ``image_token_index`` (and its text rows'), a late-fusion side's parts."""
    if isinstance(side, LateFusionBatch):
        return side.replace(
            **{
                name: None if part is None else _globalize_side(part, mesh, local_shards)
                for name, part in (("text", side.text), ("image", side.image))
            }
        )
    if isinstance(side, PackedBatch):
        positions = _global_row_positions(
            "packed rows", np.shape(side.input_ids)[0], mesh, local_shards
        )
        return side.replace(pool_index=globalize_pool_index(side.pool_index, positions))
    if not isinstance(side, VisionPackedBatch):
        return side
    side = side.replace(rows=_globalize_side(side.rows, mesh, local_shards))
    if jax.process_count() == 1:  # one host: its vision rows are the global ones
        return side
    # Several: every host feeds the same fixed count of masked vision rows
    # (data.pack_vision_row_fraction), laid out in global order like any batch leaf; the index
    # follows its rows there.
    if side.blocks:
        raise ValueError(
            "a vision-packed side with per-image blocks cannot be fed from several hosts "
            "(each block group's row count follows the host's images); use "
            "data.pack_vision_row_fraction without data.pack_vision_blocks"
        )
    if side.masked is None:
        return side
    local_rows, row_patches = np.shape(side.masked.pixel_values)[:2]
    positions = _global_row_positions("vision rows", local_rows, mesh, local_shards)
    return side.replace(
        image_token_index=globalize_image_token_index(
            side.image_token_index, positions, row_patches // MERGED_PATCHES
        )
    )


def _globalize_packed_sides(batch: Any, mesh: Mesh, local_shards: int) -> Any:
    """A train batch (or one model batch) with every side's host-local row numbers global;
    any other tree (plain arrays) as it is."""
    if isinstance(batch, TrainBatch):
        return batch.replace(
            **{
                name: _globalize_side(side, mesh, local_shards)
                for name, side in batch.named_sides().items()
            }
        )
    return _globalize_side(batch, mesh, local_shards)


def global_batch_from_host(local_batch: Any, mesh: Mesh) -> Any:
    """Assembles this host's rows into global batch arrays sharded by ``batch_sharding``.

    Every leaf of ``local_batch`` (numpy arrays) is split over the batch shards this process's
    devices hold along its leading axis; leaves may differ in leading size (a packed side has
    R rows of tokens but N items of ``pool_index``), each a multiple of the local shard count.
    A packed side's ``pool_index`` names host-local rows; it is rewritten to the global rows
    they land on. On one host the local batch is the global batch.
    """
    local_shards = local_data_parallel_shards(mesh)  # once per batch, not per leaf
    local_batch = _globalize_packed_sides(local_batch, mesh, local_shards)
    sharding = batch_sharding(mesh)

    def to_global(path, leaf):
        name = jax.tree_util.keystr(path)
        global_size = _leading_global_size(name, np.shape(leaf)[0], mesh, local_shards)
        return jax.make_array_from_process_local_data(
            sharding, np.asarray(leaf), (global_size, *np.shape(leaf)[1:])
        )

    return jax.tree_util.tree_map_with_path(to_global, local_batch)
