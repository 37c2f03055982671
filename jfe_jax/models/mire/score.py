"""ColBERT's late-interaction score (MaxSim), as MIRe ranks with it.

``r(Q, D) = sum_i max_j <q_i, d_j>`` over the query's vectors i and the document's vectors j
(ColBERTv2 paper; reference ``colbert.py`` ``colbert_score``). Masked
document positions (padding, punctuation) are filled with -9999 before the max, as the
reference does, so they never match; masked query positions contribute exactly 0 (the reference
zeroes those vectors, so their best dot product is 0 whenever the document has a valid
position; here they are masked out of the sum, which is also 0 for a document with none).
There is no learned scale and no per-token weight: with unit vectors every term is a cosine.

``maxsim_scores`` computes the whole ``[queries, documents]`` matrix as one jitted computation,
chunked over the documents (``doc_chunk``) so that the ``[Q, chunk, Lq, Ld]`` similarities, not
``[Q, D, Lq, Ld]``, are what memory holds. Under a mesh, shard the documents' leading axis over
devices and the score matrix comes out sharded over its columns.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

from jfe_jax.models.mire.pooling import MASK_FILL


def maxsim(
    queries: jax.Array, query_mask: jax.Array, docs: jax.Array, doc_mask: jax.Array
) -> jax.Array:
    """``[Q, Lq, d]`` and ``[Q, Lq]``, ``[D, Ld, d]`` and ``[D, Ld]`` -> scores ``[Q, D]``."""
    sims = jnp.einsum("qid,njd->qnij", queries, docs, precision=jax.lax.Precision.HIGHEST).astype(
        jnp.float32
    )
    sims = jnp.where(doc_mask.astype(bool)[None, :, None, :], sims, MASK_FILL)
    best = sims.max(axis=-1)  # [Q, D, Lq]
    return (best * query_mask.astype(best.dtype)[:, None, :]).sum(axis=-1)


@functools.partial(jax.jit, static_argnames=("doc_chunk",))
def maxsim_scores(
    queries: jax.Array,
    query_mask: jax.Array,
    docs: jax.Array,
    doc_mask: jax.Array,
    *,
    doc_chunk: int = 256,
) -> jax.Array:
    """The ``[Q, D]`` MaxSim matrix, ``doc_chunk`` documents at a time (module docstring).

    D need not divide by ``doc_chunk``: the last chunk is padded with fully masked documents,
    whose columns are dropped.
    """
    if queries.ndim != 3 or docs.ndim != 3 or queries.shape[-1] != docs.shape[-1]:
        raise ValueError(
            f"queries {queries.shape} and docs {docs.shape}: expected [Q, Lq, d] and [D, Ld, d]"
        )
    if query_mask.shape != queries.shape[:2] or doc_mask.shape != docs.shape[:2]:
        raise ValueError(
            f"masks {query_mask.shape}, {doc_mask.shape} do not match queries "
            f"{queries.shape[:2]} and docs {docs.shape[:2]}"
        )
    if doc_chunk < 1:
        raise ValueError(f"doc_chunk={doc_chunk}; expected a positive number of documents")
    num_docs = docs.shape[0]
    chunk = min(doc_chunk, num_docs)
    num_chunks = -(-num_docs // chunk)
    pad = num_chunks * chunk - num_docs
    docs = jnp.pad(docs, ((0, pad), (0, 0), (0, 0)))
    doc_mask = jnp.pad(doc_mask, ((0, pad), (0, 0)))
    chunks = (
        docs.reshape(num_chunks, chunk, *docs.shape[1:]),
        doc_mask.reshape(num_chunks, chunk, doc_mask.shape[1]),
    )
    scores = jax.lax.map(lambda c: maxsim(queries, query_mask, c[0], c[1]), chunks)
    # [chunks, Q, chunk] -> [Q, D]
    return jnp.moveaxis(scores, 0, 1).reshape(queries.shape[0], -1)[:, :num_docs]
