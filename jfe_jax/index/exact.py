"""Exact maximum-inner-product search in JAX, with the database sharded across devices.

The database rows are split over the devices of a 1-D mesh. Each device scores a block of
queries against its rows and keeps its own top k; the k * num_shards candidates are then
merged into the global top k. Queries go through in fixed-size blocks so that the score
matrix held at any moment stays bounded, and every block has the same shape, so the search
compiles once per (block shape, database shape, k).

``ExactIndex`` places the database on the devices once and keeps it there: every later
search (every query block, every task sharing a pool) reuses the resident shards. A database
larger than ``max_bytes_per_device`` per device is streamed instead: it is cut into row
blocks that each fit, and each search places one block at a time and merges the blocks'
top k on the host (the same ranking, ties included, at the cost of one transfer per block per
search).

Tie-breaking: among equal scores the lower database row comes first, in `ExactIndex`,
`exact_search` and `exact_search_numpy`. `jax.lax.top_k` keeps the lower index among ties;
shards hold contiguous row ranges in order, so the merge keeps that order across shards, and
streamed blocks are merged with a stable sort in block order.
"""

from __future__ import annotations

import functools
from collections.abc import Callable

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

# Scores held per device for one query block (float32): 2**26 is 256 MiB.
_MAX_SCORES_PER_BLOCK = 2**26
_MAX_QUERY_BLOCK = 1024
# Database bytes per device above which the database is streamed in row blocks, where the
# runtime does not report device memory (CPU): 4 GiB. Otherwise a quarter of the smallest
# device's memory, leaving room for the score blocks and XLA's buffers.
FALLBACK_MAX_BYTES_PER_DEVICE = 4 * 2**30


def default_max_bytes_per_device(mesh: Mesh) -> int:
    """A quarter of the smallest device memory in ``mesh``, or 4 GiB if none is reported."""
    limits = []
    for device in mesh.devices.flat:
        stats = device.memory_stats() if hasattr(device, "memory_stats") else None
        if stats and stats.get("bytes_limit"):
            limits.append(int(stats["bytes_limit"]) // 4)
    return min(limits) if limits else FALLBACK_MAX_BYTES_PER_DEVICE


def _check_inputs(queries: np.ndarray, database: np.ndarray, k: int) -> None:
    """Raises ValueError when the shapes or k cannot describe a search."""
    if queries.ndim != 2:
        raise ValueError(f"queries must be 2-D [num_queries, dim], got shape {queries.shape}")
    _check_database(database)
    if queries.shape[1] != database.shape[1]:
        raise ValueError(
            f"queries have dim {queries.shape[1]} but the database has dim {database.shape[1]}"
        )
    _check_k(k, database.shape[0])


def _check_database(database) -> None:
    if database.ndim != 2:
        raise ValueError(f"database must be 2-D [num_rows, dim], got shape {database.shape}")
    if database.shape[0] == 0:
        raise ValueError("database is empty; expected at least one row")


def _check_k(k, num_rows: int) -> None:
    if not isinstance(k, int | np.integer) or k < 1:
        raise ValueError(f"k must be a positive integer, got {k!r}")
    if k > num_rows:
        raise ValueError(f"k={k} is larger than the database ({num_rows} rows)")


def default_mesh() -> Mesh:
    """A 1-D mesh named "db" over every device of the runtime."""
    return jax.make_mesh((jax.device_count(),), ("db",), axis_types=(jax.sharding.AxisType.Auto,))


def query_block_size(num_queries: int, rows_per_shard: int) -> int:
    """The number of queries scored at once, so one block's scores stay within a fixed budget."""
    budget = max(1, _MAX_SCORES_PER_BLOCK // max(rows_per_shard, 1))
    return max(1, min(num_queries, _MAX_QUERY_BLOCK, budget))


def masked_top_k(
    scores: jax.Array, axis: str, rows_per_shard: int, num_valid: jax.Array, k: int
) -> tuple[jax.Array, jax.Array]:
    """Inside ``shard_map`` over ``axis``: the top ``k`` of one shard's ``[queries,
    rows_per_shard]`` scores as (scores, global rows int32), equal scores by lower row. Rows at
    or past ``num_valid`` (padding) score -inf and come after every real row among the
    candidates. Used by ``ExactIndex`` and ``maxsim_search.MaxSimIndex``."""
    first_row = jax.lax.axis_index(axis) * rows_per_shard
    rows = first_row + jnp.arange(rows_per_shard, dtype=jnp.int32)
    scores = jnp.where(rows[None, :] < num_valid, scores, -jnp.inf)
    top_scores, top_local = jax.lax.top_k(scores, k)
    return top_scores, (top_local + first_row).astype(jnp.int32)


@functools.partial(jax.jit, static_argnames=("k", "mesh"))
def _search_block(
    queries: jax.Array, database: jax.Array, num_valid: jax.Array, *, k: int, mesh: Mesh
) -> tuple[jax.Array, jax.Array]:
    """Top k of one query block against the sharded (row-padded) database."""
    (axis,) = mesh.axis_names
    num_shards = mesh.shape[axis]
    rows_per_shard = database.shape[0] // num_shards
    k_local = min(k, rows_per_shard)

    def shard_top_k(q, db_shard, n_valid):
        # HIGHEST so TPUs do not drop to bf16 passes: exact search is the reference.
        scores = jnp.dot(
            q, db_shard.T, precision=jax.lax.Precision.HIGHEST, preferred_element_type=jnp.float32
        )
        return masked_top_k(scores, axis, rows_per_shard, n_valid, k_local)

    cand_scores, cand_rows = jax.shard_map(
        shard_top_k,
        mesh=mesh,
        in_specs=(P(), P(axis, None), P()),
        out_specs=(P(None, axis), P(None, axis)),
        check_vma=False,
    )(queries, database, num_valid)
    # Candidates are laid out shard by shard, each in rank order, so top_k's lower-position
    # rule on ties is the lower-row rule.
    top_scores, positions = jax.lax.top_k(cand_scores, k)
    return jnp.take_along_axis(cand_rows, positions, axis=1), top_scores


# Fills ``out`` (float32 [m, dim], C-contiguous) with database rows [start, start + m).
RowReader = Callable[[int, np.ndarray], None]


def _place_blocks(
    mesh: Mesh, num_rows: int, dim: int, rows_per_shard: int, device_block
) -> tuple[jax.Array, jax.Array]:
    """(the rows sharded over the mesh, padded to ``rows_per_shard`` per device; their valid
    count, replicated). ``device_block(start, stop)`` gives one device's block on the host
    (float32 [rows_per_shard, dim]: rows [start, stop), then zeros); each block goes to its
    own device and is done before the next is made, so the host never holds a padded copy
    of the whole database, only one device's block at a time."""
    (axis,) = mesh.axis_names
    shape = (rows_per_shard * mesh.shape[axis], dim)
    sharding = NamedSharding(mesh, P(axis, None))
    by_row = sorted(
        sharding.addressable_devices_indices_map(shape).items(),
        key=lambda item: item[1][0].start or 0,
    )
    placed = []
    for device, (rows, _) in by_row:
        start = rows.start or 0
        stop = max(start, min(start + rows_per_shard, num_rows))
        # A copy (may_alias=False), finished before the next block is made: a block may be a
        # view of the caller's array or a staging buffer that is then refilled.
        block = jax.device_put(device_block(start, stop), device, may_alias=False)
        placed.append(block.block_until_ready())
    database = jax.make_array_from_single_device_arrays(shape, sharding, placed)
    num_valid = jax.device_put(jnp.int32(num_rows), NamedSharding(mesh, P()))
    return database, num_valid


def _array_blocks(rows: np.ndarray, rows_per_shard: int):
    """``device_block`` over a float32 host array: views of it, only a short block copied."""

    def device_block(start: int, stop: int) -> np.ndarray:
        if stop - start == rows_per_shard:
            return rows[start:stop]
        padded = np.zeros((rows_per_shard, rows.shape[1]), np.float32)
        padded[: stop - start] = rows[start:stop]
        return padded

    return device_block


def _reader_blocks(read_rows: RowReader, rows_per_shard: int, dim: int):
    """``device_block`` that reads each device's rows into a fresh zero-padded buffer, never
    one reused buffer: a CPU device can keep the host buffer as its array's memory even with
    ``may_alias=False`` (seen on jax 0.10 after earlier ``device_put`` calls), and every
    device's block was then the last one read. An accelerator frees each after its copy."""

    def device_block(start: int, stop: int) -> np.ndarray:
        staging = np.empty((rows_per_shard, dim), np.float32)
        read_rows(start, staging[: stop - start])
        staging[stop - start :] = 0
        return staging

    return device_block


class _Shards:
    """One row block of the database, padded to a multiple of the shard count when placed.

    ``rows`` is the block (a host array, or a device array), or None once the devices hold
    it for good (a resident index keeps no host copy)."""

    def __init__(self, rows, first_row: int, num_rows: int, mesh: Mesh):
        (axis,) = mesh.axis_names
        num_shards = mesh.shape[axis]
        self.first_row = first_row
        self.num_rows = num_rows
        self.rows_per_shard = -(-self.num_rows // num_shards)
        self._host = rows
        self._mesh = mesh

    def place(self) -> tuple[jax.Array, jax.Array]:
        """(the padded block sharded over the mesh, its valid row count, replicated)."""
        if isinstance(self._host, np.ndarray):
            dim = self._host.shape[1]
            blocks = _array_blocks(self._host, self.rows_per_shard)
            return _place_blocks(self._mesh, self.num_rows, dim, self.rows_per_shard, blocks)
        (axis,) = self._mesh.axis_names
        num_shards = self._mesh.shape[axis]
        padding = ((0, self.rows_per_shard * num_shards - self.num_rows), (0, 0))
        padded = jnp.pad(jnp.asarray(self._host, dtype=jnp.float32), padding)
        placed = jax.device_put(padded, NamedSharding(self._mesh, P(axis, None)))
        num_valid = jax.device_put(jnp.int32(self.num_rows), NamedSharding(self._mesh, P()))
        return placed, num_valid


class ExactIndex:
    """Exact top-k by dot product over a database held on a 1-D device mesh.

    The database is placed on the devices once, when the index is made, and stays there for
    every `search` (``placements`` counts the transfers); the index keeps no host copy of it.
    If one device's share would exceed ``max_bytes_per_device``, the database is kept on the
    host in row blocks that fit and streamed block by block on each search (``streamed`` is
    True). `from_rows` builds one from a reader (an export on disk, ``jfe_jax.index.pool``)
    without a full host copy.

    Args:
      database: [num_rows, dim] float array (finite values); any num_rows, divisible by the
        device count or not.
      mesh: a 1-D mesh whose devices share the rows; default: all devices.
      max_bytes_per_device: float32 database bytes per device above which it is streamed
        (default: `default_max_bytes_per_device`).
    """

    def __init__(
        self,
        database: np.ndarray | jax.Array,
        *,
        mesh: Mesh | None = None,
        max_bytes_per_device: int | None = None,
    ):
        if isinstance(database, np.ndarray) and database.dtype != np.float32:
            database = database.astype(np.float32)
        _check_database(database)
        max_rows = self._setup(*database.shape, mesh, max_bytes_per_device)
        self._blocks = [
            _Shards(
                database[start : start + max_rows],
                start,
                min(max_rows, self.num_rows - start),
                self.mesh,
            )
            for start in range(0, self.num_rows, max_rows)
        ]
        self.streamed = len(self._blocks) > 1
        self._resident = None
        if not self.streamed:
            self._resident = self._place(self._blocks[0])
            self._blocks = [_Shards(None, 0, self.num_rows, self.mesh)]

    @classmethod
    def from_rows(
        cls,
        read_rows: RowReader,
        num_rows: int,
        dim: int,
        *,
        mesh: Mesh | None = None,
        max_bytes_per_device: int | None = None,
    ) -> ExactIndex:
        """An index over the ``num_rows`` x ``dim`` float32 rows that ``read_rows(start, out)``
        writes into ``out``. Rows are read straight into each device's block (the host holds
        one block at a time), or, for a streamed index, into one host array with no padding.
        """
        if num_rows == 0:
            raise ValueError("database is empty; expected at least one row")
        index = cls.__new__(cls)
        max_rows = index._setup(num_rows, dim, mesh, max_bytes_per_device)
        index.streamed = num_rows > max_rows
        index._resident = None
        if index.streamed:
            host = np.empty((num_rows, dim), np.float32)
            read_rows(0, host)
            index._blocks = [
                _Shards(
                    host[start : start + max_rows],
                    start,
                    min(max_rows, num_rows - start),
                    index.mesh,
                )
                for start in range(0, num_rows, max_rows)
            ]
            return index
        block = _Shards(None, 0, num_rows, index.mesh)
        index.placements = 1
        index._resident = _place_blocks(
            index.mesh,
            num_rows,
            dim,
            block.rows_per_shard,
            _reader_blocks(read_rows, block.rows_per_shard, dim),
        )
        index._blocks = [block]
        return index

    def _setup(
        self, num_rows: int, dim: int, mesh: Mesh | None, max_bytes_per_device: int | None
    ) -> int:
        """Sets the mesh, shape and counters; returns the most rows one placed block holds."""
        mesh = default_mesh() if mesh is None else mesh
        if len(mesh.axis_names) != 1:
            raise ValueError(f"mesh must be 1-D, got axes {mesh.axis_names}")
        (axis,) = mesh.axis_names
        self.mesh = mesh
        if max_bytes_per_device is None:
            max_bytes_per_device = default_max_bytes_per_device(mesh)
        self.num_rows, self.dim = int(num_rows), int(dim)
        num_shards = mesh.shape[axis]
        self.placements = 0
        return max(num_shards, (max_bytes_per_device // (4 * self.dim)) * num_shards)

    def _place(self, block: _Shards) -> tuple[jax.Array, jax.Array]:
        self.placements += 1
        return block.place()

    def search(
        self, queries: np.ndarray | jax.Array, k: int, *, query_block: int | None = None
    ) -> tuple[np.ndarray, np.ndarray]:
        """(indices int32 [num_queries, k], scores float32 [num_queries, k]) as numpy arrays,
        best first; equal scores are ordered by lower row index.

        ``query_block``: queries scored at once; default: as many as keep one block's scores
        within 2**26 floats per device (at most 1024)."""
        if queries.ndim != 2:
            raise ValueError(f"queries must be 2-D [num_queries, dim], got shape {queries.shape}")
        if queries.shape[1] != self.dim:
            raise ValueError(
                f"queries have dim {queries.shape[1]} but the database has dim {self.dim}"
            )
        _check_k(k, self.num_rows)
        if query_block is not None and query_block < 1:
            raise ValueError(f"query_block must be a positive integer, got {query_block}")
        if isinstance(queries, np.ndarray):
            queries = queries.astype(np.float32, copy=False)
        if not self.streamed:
            return self._search_resident(self._resident, self._blocks[0], queries, k, query_block)
        found_rows, found_scores = [], []
        for block in self._blocks:
            block_k = min(k, block.num_rows)
            rows, scores = self._search_resident(
                self._place(block), block, queries, block_k, query_block
            )
            found_rows.append(rows + block.first_row)
            found_scores.append(scores)
        rows = np.concatenate(found_rows, axis=1)
        scores = np.concatenate(found_scores, axis=1)
        # Blocks are in row order and each is in rank order: a stable sort keeps lower rows
        # first among equal scores.
        order = np.argsort(-scores, axis=1, kind="stable")[:, :k]
        return (
            np.take_along_axis(rows, order, axis=1).astype(np.int32),
            np.take_along_axis(scores, order, axis=1),
        )

    def _search_resident(self, placed, block: _Shards, queries, k: int, query_block):
        database, num_valid = placed
        replicated = NamedSharding(self.mesh, P())
        num_queries = queries.shape[0]
        block_size = min(
            query_block or query_block_size(num_queries, block.rows_per_shard), num_queries
        )
        indices = np.empty((num_queries, k), dtype=np.int32)
        scores = np.empty((num_queries, k), dtype=np.float32)
        for start in range(0, num_queries, block_size):
            chunk = queries[start : start + block_size]
            size = chunk.shape[0]
            # The last block is zero-padded to the common shape so it reuses the compiled search;
            # host queries are padded on the host and placed explicitly.
            xp = np if isinstance(chunk, np.ndarray) else jnp
            chunk = xp.pad(xp.asarray(chunk, dtype=xp.float32), ((0, block_size - size), (0, 0)))
            block_indices, block_scores = _search_block(
                jax.device_put(chunk, replicated), database, num_valid, k=k, mesh=self.mesh
            )
            indices[start : start + size] = np.asarray(block_indices)[:size]
            scores[start : start + size] = np.asarray(block_scores)[:size]
        return indices, scores


def exact_search(
    queries: np.ndarray | jax.Array,
    database: np.ndarray | jax.Array,
    k: int,
    *,
    mesh: Mesh | None = None,
    query_block: int | None = None,
    max_bytes_per_device: int | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    """Exact top-k by dot product, database rows sharded over a 1-D mesh: a one-off
    `ExactIndex` (use the class to search one database several times).

    Args:
      queries: [num_queries, dim] float array (finite values).
      database: [num_rows, dim] float array (finite values); any num_rows >= k, divisible by
        the device count or not.
      k: how many neighbours per query.
      mesh: a 1-D mesh whose devices share the database rows; default: all devices.
      query_block: queries scored at once; default: as many as keep one block's scores
        within 2**26 floats per device (at most 1024).
      max_bytes_per_device: above this the database is streamed in row blocks.

    Returns:
      (indices int32 [num_queries, k], scores float32 [num_queries, k]) as numpy arrays,
      best first; equal scores are ordered by lower row index.
    """
    queries = np.asarray(queries, dtype=np.float32) if isinstance(queries, np.ndarray) else queries
    _check_inputs(queries, database, k)
    index = ExactIndex(database, mesh=mesh, max_bytes_per_device=max_bytes_per_device)
    return index.search(queries, k, query_block=query_block)


def exact_search_numpy(
    queries: np.ndarray, database: np.ndarray, k: int, *, query_block: int = 256
) -> tuple[np.ndarray, np.ndarray]:
    """Float64 numpy reference for `exact_search`: (indices int32, scores float64), [Q, k].

    A stable sort of the negated scores orders ties by lower row index, the same rule as
    `exact_search`. Slow (a full sort per query); meant for tests and ground truth.
    """
    queries = np.asarray(queries)
    database = np.asarray(database)
    _check_inputs(queries, database, k)
    database64 = database.astype(np.float64)
    indices = np.empty((queries.shape[0], k), dtype=np.int32)
    scores = np.empty((queries.shape[0], k), dtype=np.float64)
    for start in range(0, queries.shape[0], query_block):
        block_scores = queries[start : start + query_block].astype(np.float64) @ database64.T
        order = np.argsort(-block_scores, axis=1, kind="stable")[:, :k]
        indices[start : start + query_block] = order
        scores[start : start + query_block] = np.take_along_axis(block_scores, order, axis=1)
    return indices, scores
