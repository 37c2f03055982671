"""Exact late-interaction (MaxSim) search of a whole document pool, sharded across devices.

``MaxSimIndex`` holds a pool of documents as token vectors ``[D, Ld, dim]`` and masks
``[D, Ld]`` and ranks all of them for each query by ColBERT's score
``sum_i max_j <q_i, d_j>`` (``jfe_jax.models.mire.score.maxsim``: masked document positions
never match, masked query positions add 0). It is the exhaustive ranking of the ColBERT
reference's ``colbert_score`` (``colbert.py``), with no candidate generation, no centroids
and no compression: the ground truth an approximate late-interaction index is measured
against. `jfe eval` of a MIRe model (issue 34 item 3, being built) ranks its pools with it.

It follows `jfe_jax.index.exact.ExactIndex`: the documents are placed on a 1-D mesh once
(padded along D to a multiple of the shard count with fully masked documents that score
-inf and are never returned) and stay there for every search; queries go through in blocks
of one compiled shape; each device scores a block against its documents ``doc_chunk`` at a
time (``score.maxsim_scores``, so memory holds ``[block, chunk, Lq, Ld]`` similarities, not
``[block, D, Lq, Ld]``), keeps its own top k, and the ``k * num_shards`` candidates are
merged into the global top k. A progress bar counts the query blocks.

Tie-breaking, as in ``ExactIndex``: among equal scores the lower document row (its position
in the pool as given) comes first. ``jax.lax.top_k`` keeps the lower index among ties, the
shards hold contiguous row ranges in order, and the candidates are laid out shard by shard,
each in rank order. ``k`` larger than the pool is refused, as ``ExactIndex`` refuses it.
"""

from __future__ import annotations

import functools
from collections.abc import Sequence

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from jfe_jax.index.exact import (
    _check_k,
    default_max_bytes_per_device,
    default_mesh,
    masked_top_k,
)
from jfe_jax.models.mire.score import maxsim_scores
from jfe_jax.progress import progress_bar

# Similarities held per device for one query block and document chunk (float32): 2**26 is
# 256 MiB; and the [block, documents per shard] scores, the same budget.
_MAX_SIMS_PER_BLOCK = 2**26
_MAX_QUERY_BLOCK = 1024
DEFAULT_DOC_CHUNK = 256
STORAGE_DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16}


def _check_pool(doc_vectors, doc_mask, ids) -> None:
    """Raises ValueError when the documents, their mask or their ids cannot form a pool."""
    if doc_vectors.ndim != 3:
        raise ValueError(
            f"document vectors must be 3-D [num_docs, doc_len, dim], got shape {doc_vectors.shape}"
        )
    if doc_vectors.shape[0] == 0:
        raise ValueError("the document pool is empty; expected at least one document")
    if doc_vectors.shape[1] == 0:
        raise ValueError("documents have no token positions (doc_len 0)")
    if tuple(doc_mask.shape) != tuple(doc_vectors.shape[:2]):
        raise ValueError(
            f"document mask has shape {tuple(doc_mask.shape)}; expected [num_docs, doc_len] = "
            f"{tuple(doc_vectors.shape[:2])}"
        )
    if ids is not None and len(ids) != doc_vectors.shape[0]:
        raise ValueError(f"{len(ids)} document ids for {doc_vectors.shape[0]} documents")


def _check_queries(queries, query_mask, dim: int) -> None:
    """Raises ValueError when the queries or their mask do not fit a pool of width ``dim``."""
    if queries.ndim != 3:
        raise ValueError(
            f"query vectors must be 3-D [num_queries, query_len, dim], got shape {queries.shape}"
        )
    if queries.shape[2] != dim:
        raise ValueError(
            f"query vectors have dim {queries.shape[2]} but the documents have dim {dim}"
        )
    if queries.shape[1] == 0:
        raise ValueError("queries have no token positions (query_len 0)")
    if tuple(query_mask.shape) != tuple(queries.shape[:2]):
        raise ValueError(
            f"query mask has shape {tuple(query_mask.shape)}; expected [num_queries, query_len]"
            f" = {tuple(queries.shape[:2])}"
        )


@functools.partial(jax.jit, static_argnames=("k", "doc_chunk", "mesh"))
def _search_block(
    queries: jax.Array,
    query_mask: jax.Array,
    docs: jax.Array,
    doc_mask: jax.Array,
    num_valid: jax.Array,
    *,
    k: int,
    doc_chunk: int,
    mesh: Mesh,
) -> tuple[jax.Array, jax.Array]:
    """(rows int32, scores float32), ``[block, k]``: one query block against the sharded pool,
    whose documents per shard are a multiple of ``doc_chunk``."""
    (axis,) = mesh.axis_names
    rows_per_shard = docs.shape[0] // mesh.shape[axis]
    k_local = min(k, rows_per_shard)

    def shard_top_k(q, q_mask, d, d_mask, n_valid):
        scores = maxsim_scores(q, q_mask, d, d_mask, doc_chunk=doc_chunk)
        # Padding documents score -inf and come after every real document among the
        # candidates (a real one scores at least MASK_FILL per valid query position).
        return masked_top_k(scores, axis, rows_per_shard, n_valid, k_local)

    cand_scores, cand_rows = jax.shard_map(
        shard_top_k,
        mesh=mesh,
        in_specs=(P(), P(), P(axis, None, None), P(axis, None), P()),
        out_specs=(P(None, axis), P(None, axis)),
        check_vma=False,
    )(queries, query_mask, docs, doc_mask, num_valid)
    # Shard by shard, each in rank order: top_k's lower-position rule is the lower-row rule.
    top_scores, positions = jax.lax.top_k(cand_scores, k)
    return jnp.take_along_axis(cand_rows, positions, axis=1), top_scores


def _place(array, mesh: Mesh, padded_rows: int, dtype) -> jax.Array:
    """``array`` ([D, ...]) as ``dtype``, zero-padded to ``padded_rows`` along D and sharded
    along D over the mesh. A host array goes device by device (the host holds one device's
    padded block at a time, never a padded copy of the whole pool)."""
    (axis,) = mesh.axis_names
    shape = (padded_rows, *array.shape[1:])
    sharding = NamedSharding(mesh, P(axis, *([None] * (array.ndim - 1))))
    if not isinstance(array, np.ndarray):
        padding = ((0, padded_rows - array.shape[0]),) + ((0, 0),) * (array.ndim - 1)
        return jax.device_put(jnp.pad(jnp.asarray(array).astype(dtype), padding), sharding)
    num_rows = array.shape[0]

    def device_block(index) -> np.ndarray:
        start, stop = index[0].start or 0, index[0].stop or padded_rows
        block = np.zeros((stop - start, *array.shape[1:]), dtype)
        real = max(0, min(stop, num_rows) - start)
        block[:real] = array[start : start + real]
        return block

    return jax.make_array_from_callback(shape, sharding, device_block)


class MaxSimIndex:
    """Exact top-k by MaxSim over a document pool held on a 1-D device mesh.

    Args:
      doc_vectors: ``[num_docs, doc_len, dim]`` float array (finite values), numpy or jax.
      doc_mask: ``[num_docs, doc_len]`` (bool, or 0/1): False positions never match.
      ids: one id per document (any values numpy can index, e.g. strings); default: the rows.
      mesh: a 1-D mesh whose devices share the documents; default: all devices.
      storage_dtype: how the vectors are stored on the devices, "float32" or "bfloat16" (scores are
        computed in float32 either way).
      doc_chunk: documents scored at once per device (fewer if a shard holds fewer).
      max_bytes_per_device: stored pool bytes per device above which the pool is refused
        (default: `jfe_jax.index.exact.default_max_bytes_per_device`); unlike ``ExactIndex``
        it is not streamed.
    """

    def __init__(
        self,
        doc_vectors: np.ndarray | jax.Array,
        doc_mask: np.ndarray | jax.Array,
        ids: Sequence | np.ndarray | None = None,
        *,
        mesh: Mesh | None = None,
        storage_dtype: str = "float32",
        doc_chunk: int = DEFAULT_DOC_CHUNK,
        max_bytes_per_device: int | None = None,
    ):
        _check_pool(doc_vectors, doc_mask, ids)
        if storage_dtype not in STORAGE_DTYPES:
            raise ValueError(
                f"storage_dtype={storage_dtype!r}; expected one of {sorted(STORAGE_DTYPES)}"
            )
        if not isinstance(doc_chunk, int | np.integer) or doc_chunk < 1:
            raise ValueError(f"doc_chunk must be a positive integer, got {doc_chunk!r}")
        mesh = default_mesh() if mesh is None else mesh
        if len(mesh.axis_names) != 1:
            raise ValueError(f"mesh must be 1-D, got axes {mesh.axis_names}")
        (axis,) = mesh.axis_names
        self.mesh, self.storage_dtype = mesh, storage_dtype
        self.num_docs, self.doc_len, self.dim = (int(n) for n in doc_vectors.shape)
        self.ids = np.arange(self.num_docs) if ids is None else np.asarray(ids)
        num_shards = mesh.shape[axis]
        per_shard = -(-self.num_docs // num_shards)
        self.doc_chunk = int(min(doc_chunk, per_shard))
        # Each shard holds whole chunks, so maxsim_scores never pads (copies) a shard.
        self.rows_per_shard = -(-per_shard // self.doc_chunk) * self.doc_chunk
        item_bytes = jnp.dtype(STORAGE_DTYPES[storage_dtype]).itemsize
        shard_bytes = self.rows_per_shard * self.doc_len * (self.dim * item_bytes + 1)
        limit = max_bytes_per_device
        limit = default_max_bytes_per_device(mesh) if limit is None else limit
        if shard_bytes > limit:
            raise ValueError(
                f"the pool needs {shard_bytes} bytes per device, over the {limit} allowed: use "
                "storage_dtype='bfloat16', more devices, or split the pool"
            )
        padded = self.rows_per_shard * num_shards
        self._docs = _place(doc_vectors, mesh, padded, STORAGE_DTYPES[storage_dtype])
        self._doc_mask = _place(doc_mask, mesh, padded, jnp.bool_)
        self._num_valid = jax.device_put(jnp.int32(self.num_docs), NamedSharding(mesh, P()))

    def query_block_size(self, num_queries: int, query_len: int) -> int:
        """Queries scored at once by default: one block's ``[block, chunk, Lq, Ld]``
        similarities and its ``[block, documents per shard]`` scores each stay within 2**26
        floats per device (at most 1024 queries)."""
        sims = self.doc_chunk * query_len * self.doc_len
        budget = _MAX_SIMS_PER_BLOCK // max(sims, self.rows_per_shard, 1)
        return max(1, min(num_queries, _MAX_QUERY_BLOCK, budget))

    def lower_block(self, query_block: int, query_len: int, k: int) -> jax.stages.Lowered:
        """The lowered program that scores one query block (for its memory analysis)."""
        replicated = NamedSharding(self.mesh, P())
        shape = (query_block, query_len)
        return _search_block.lower(
            jax.ShapeDtypeStruct((*shape, self.dim), jnp.float32, sharding=replicated),
            jax.ShapeDtypeStruct(shape, jnp.bool_, sharding=replicated),
            self._docs,
            self._doc_mask,
            self._num_valid,
            k=k,
            doc_chunk=self.doc_chunk,
            mesh=self.mesh,
        )

    def search(
        self,
        query_vectors: np.ndarray | jax.Array,
        query_mask: np.ndarray | jax.Array,
        k: int,
        *,
        query_block: int | None = None,
        progress: bool = True,
    ) -> tuple[np.ndarray, np.ndarray]:
        """(document ids [num_queries, k], scores float32 [num_queries, k]) as numpy arrays,
        best first; equal scores are ordered by lower document row. See `search_rows`."""
        rows, scores = self.search_rows(
            query_vectors, query_mask, k, query_block=query_block, progress=progress
        )
        return self.ids[rows], scores

    def search_rows(
        self,
        query_vectors: np.ndarray | jax.Array,
        query_mask: np.ndarray | jax.Array,
        k: int,
        *,
        query_block: int | None = None,
        progress: bool = True,
    ) -> tuple[np.ndarray, np.ndarray]:
        """(document rows int32 [num_queries, k], scores float32 [num_queries, k]).

        ``query_vectors`` ``[num_queries, query_len, dim]`` and ``query_mask``
        ``[num_queries, query_len]`` (False positions add 0). ``query_block``: queries scored
        at once (default `query_block_size`); the last block is padded to the same shape, so
        one search compiles once. ``progress``: a bar over the query blocks."""
        _check_queries(query_vectors, query_mask, self.dim)
        _check_k(k, self.num_docs)
        if query_block is not None and (
            not isinstance(query_block, int | np.integer) or query_block < 1
        ):
            raise ValueError(f"query_block must be a positive integer, got {query_block!r}")
        num_queries, query_len = query_vectors.shape[:2]
        rows = np.empty((num_queries, k), dtype=np.int32)
        scores = np.empty((num_queries, k), dtype=np.float32)
        if num_queries == 0:
            return rows, scores
        size = min(query_block or self.query_block_size(num_queries, query_len), num_queries)
        replicated = NamedSharding(self.mesh, P())
        starts = range(0, num_queries, size)
        bar = progress_bar(starts, desc="maxsim search", unit="block", disable=not progress)
        for start in bar:
            chunk, mask = query_vectors[start : start + size], query_mask[start : start + size]
            n = chunk.shape[0]
            # Host blocks are padded on the host and placed explicitly; padded queries are
            # fully masked and their rows dropped.
            xp = np if isinstance(chunk, np.ndarray) else jnp
            chunk = xp.pad(xp.asarray(chunk, dtype=xp.float32), ((0, size - n), (0, 0), (0, 0)))
            mask = xp.pad(xp.asarray(mask).astype(bool), ((0, size - n), (0, 0)))
            block_rows, block_scores = _search_block(
                jax.device_put(chunk, replicated),
                jax.device_put(mask, replicated),
                self._docs,
                self._doc_mask,
                self._num_valid,
                k=k,
                doc_chunk=self.doc_chunk,
                mesh=self.mesh,
            )
            rows[start : start + n] = np.asarray(block_rows)[:n]
            scores[start : start + n] = np.asarray(block_scores)[:n]
        return rows, scores
