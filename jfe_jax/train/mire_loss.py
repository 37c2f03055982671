"""MIRe's contrastive loss over MaxSim scores, and its gradient-cache form.

The reference (MIRe's training code, ``mire.py:183-245`` and ColBERT's
``colbert.py:66-83``): per device, with B queries and their B positives, the B x B matrix
``s_bc = MaxSim(Q_b, D_c)`` (``jfe_jax.models.mire.score.maxsim``: masked document positions
filled with ``MASK_FILL`` before the max, masked query positions summed as 0) and
``L = CE(s / tau, labels=arange(B))`` averaged over the queries; ``tau`` is 0.3 in stage 1
(alignment pretraining) and 0.8 in stage 2 (fine-tuning). No learned scale, no hard negatives,
no distillation.

``maxsim_infonce`` is written on global arrays, as ``jfe_jax.train.loss.contrastive_loss`` is,
and meant to run under ``jax.jit`` with the batch sharded over the mesh's data axes
(``jfe_jax.train.mesh.batch_sharding``) and the logical axis rules in context:

* ``negatives="global"`` (this project's default, like JFE's loss): every query scores every
  document of the global batch. Queries stay split over the batch axes and the documents' token
  vectors are gathered whole (``constrain`` with ``ACT_BATCH`` / ``None``; no explicit
  all-gather), so the loss equals the one-device loss on the whole batch. Each device then holds
  a ``[B / shards, B, Lq, Ld]`` float32 similarity tensor (4x the reference's at 4 devices).
* ``negatives="local"`` (the reference's): the batch is cut into ``shards`` contiguous groups
  (pass the data-parallel size, ``mesh.data_parallel_size(mesh)``: with ``batch_sharding``
  group g is device g's rows) and each query scores only its group's documents. The loss is
  the mean over all queries, which is the mean of the groups' losses (equal group sizes), as
  DDP's averaged gradients make it in the reference.

Duplicates (false negatives) can be masked by keys as JFE's loss does (``query_ids``,
``doc_ids``: an off-diagonal pair sharing either key leaves the denominator; reusing
``loss.false_negative_mask``). The reference masks nothing, so both default to None.

Gradient caching (``jfe_jax.train.grad_cache``): ``cached_vector_grads`` gives the loss and its
gradient with respect to the token vectors ``q`` and ``d``; a trainer embeds the batch in chunks
without gradients, takes these gradients, and re-runs each chunk under ``jax.vjp`` with its
slice as cotangent. ``grad_cache_loss_fn`` wraps the loss in the ``loss_fn(params, q, d)`` form
``grad_cache.grad_cache_loss_and_grad`` takes (the masks come from the batch, not the tower).

Used by the MIRe train step (issue 34, being built); tested in ``tests/test_mire_loss.py``.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, Literal

import jax
import jax.numpy as jnp

from jfe_jax.models.axes import ACT_BATCH, ACT_EMBED, ACT_LENGTH, constrain
from jfe_jax.models.mire.score import maxsim
from jfe_jax.train.loss import Metrics, false_negative_mask

Negatives = Literal["global", "local"]
NEGATIVES: tuple[str, ...] = ("global", "local")
# The reference's temperatures (``mire.py:215-219``).
TEMPERATURE_STAGE1 = 0.3  # alignment pretraining on ViD2R
TEMPERATURE_STAGE2 = 0.8  # per-benchmark fine-tuning


def _check_temperature(temperature: float | jax.Array) -> jax.Array:
    """``1 / temperature`` as a float32 scalar; a concrete temperature must be positive."""
    if jnp.ndim(temperature) != 0:
        raise ValueError(f"temperature must be a scalar, got shape {jnp.shape(temperature)}")
    try:
        value = float(temperature)
    except jax.errors.ConcretizationTypeError:  # traced (e.g. learned): checked by the caller
        value = None
    if value is not None and not value > 0:
        raise ValueError(f"temperature must be positive (scores are s / temperature), got {value}")
    return 1.0 / jnp.asarray(temperature, jnp.float32)


def _check_inputs(
    q: jax.Array,
    q_mask: jax.Array,
    d: jax.Array,
    d_mask: jax.Array,
    query_ids: jax.Array | None,
    doc_ids: jax.Array | None,
) -> None:
    """Raises ValueError naming the first input whose shape does not fit the others."""
    if q.ndim != 3 or d.ndim != 3:
        raise ValueError(
            f"q and d must be token vectors [batch, length, dim]; got q {q.shape}, d {d.shape}"
        )
    if q.shape[0] != d.shape[0]:
        raise ValueError(
            f"q and d must hold the same batch (document i is query i's positive); got q "
            f"{q.shape[0]} queries and d {d.shape[0]} documents"
        )
    if q.shape[-1] != d.shape[-1]:
        raise ValueError(f"q and d vectors differ in dim: q {q.shape}, d {d.shape}")
    for name, mask, vectors in (("q_mask", q_mask, q), ("d_mask", d_mask, d)):
        if mask.shape != vectors.shape[:2]:
            raise ValueError(f"{name} must have shape {vectors.shape[:2]}, got {mask.shape}")
    for name, ids in (("query_ids", query_ids), ("doc_ids", doc_ids)):
        if ids is not None and ids.shape != (q.shape[0],):
            raise ValueError(f"{name} must have shape ({q.shape[0]},), got {ids.shape}")


def _groups(negatives: str, shards: int | None, batch: int) -> int:
    """How many groups the batch's queries score among themselves: 1 (global) or ``shards``."""
    if negatives not in NEGATIVES:
        raise ValueError(f"negatives={negatives!r}; expected one of {', '.join(NEGATIVES)}")
    if negatives == "global":
        return 1
    if shards is None or shards < 1:
        raise ValueError(
            f"negatives='local' needs shards, the data-parallel size (a positive int), "
            f"got shards={shards}"
        )
    if batch % shards:
        raise ValueError(f"negatives='local': batch {batch} does not split into shards={shards}")
    return shards


def _infonce(
    scores: jax.Array, scale: jax.Array, duplicates: jax.Array | None
) -> tuple[jax.Array, Metrics]:
    """InfoNCE on ``[..., n, n]`` scores whose diagonal holds the positives; mean over queries.

    ``duplicates``: optional bool mask like ``scores``, True where a pair leaves the softmax.
    """
    logits = scale * scores
    positive = jnp.diagonal(logits, axis1=-2, axis2=-1)
    if duplicates is not None:
        logits = jnp.where(duplicates, -jnp.inf, logits)
    per_query = jax.nn.logsumexp(logits, axis=-1) - positive
    correct = jnp.argmax(logits, axis=-1) == jnp.arange(scores.shape[-1])
    count = jnp.asarray(per_query.size, jnp.float32)
    loss_sum = jnp.sum(per_query)
    metrics = {
        "loss": (loss_sum, count),
        "accuracy": (jnp.sum(correct.astype(jnp.float32)), count),
    }
    return loss_sum / count, metrics


def _local_scores(
    q: jax.Array, q_mask: jax.Array, d: jax.Array, d_mask: jax.Array, groups: int
) -> jax.Array:
    """``[groups, B / groups, B / groups]`` MaxSim within each contiguous group of rows."""

    def split(x: jax.Array, names: tuple[str | None, ...]) -> jax.Array:
        x = x.reshape(groups, x.shape[0] // groups, *x.shape[1:])
        return constrain(x, (ACT_BATCH, None, *names))

    vectors, lengths = (ACT_LENGTH, ACT_EMBED), (ACT_LENGTH,)
    scores = jax.vmap(maxsim)(
        split(q, vectors), split(q_mask, lengths), split(d, vectors), split(d_mask, lengths)
    )
    return constrain(scores, (ACT_BATCH, None, None))


def _local_duplicates(
    query_ids: jax.Array | None, doc_ids: jax.Array | None, groups: int
) -> jax.Array | None:
    """``[groups, n, n]`` false-negative masks, each group's keys against its own."""
    if query_ids is None and doc_ids is None:
        return None

    def split(ids: jax.Array | None) -> jax.Array | None:
        return None if ids is None else ids.reshape(groups, -1)

    return jax.vmap(false_negative_mask)(split(query_ids), split(doc_ids))


def maxsim_infonce(
    q: jax.Array,
    q_mask: jax.Array,
    d: jax.Array,
    d_mask: jax.Array,
    *,
    temperature: float | jax.Array,
    negatives: Negatives = "global",
    shards: int | None = None,
    query_ids: jax.Array | None = None,
    doc_ids: jax.Array | None = None,
) -> tuple[jax.Array, Metrics]:
    """MIRe's InfoNCE over MaxSim scores: query i's positive is document i (module docstring).

    Args:
      q: ``[B, Lq, dim]`` query token vectors (unit or zero; the global batch), any float dtype
        (scored in float32).
      q_mask: ``[B, Lq]``, nonzero at the query positions that count in the MaxSim sum.
      d: ``[B, Ld, dim]`` document token vectors; row i is the positive of query i.
      d_mask: ``[B, Ld]``, nonzero at the document positions a query token may match. A fully
        masked document scores ``MASK_FILL`` per valid query token: never a winning negative.
      temperature: scores are ``s / temperature`` (``TEMPERATURE_STAGE1`` 0.3,
        ``TEMPERATURE_STAGE2`` 0.8); must be positive.
      negatives: ``"global"`` (every document of the batch is a negative for every query) or
        ``"local"`` (the reference's: only the query's own group of ``B / shards`` rows).
      shards: for ``"local"``: the number of groups, the data-parallel size; ignored for
        ``"global"``.
      query_ids, doc_ids: optional ``[B]`` integer keys; off-diagonal pairs (within a group,
        for ``"local"``) sharing either key are false negatives, left out of the softmax.

    Returns:
      ``(loss, metrics)``: the mean loss over the B queries and ``{"loss": (sum, count),
      "accuracy": (sum, count)}``, accuracy being the in-batch (in-group) top-1: the fraction of
      queries whose best-scoring document is their positive (ties go to the lowest index).

    Raises:
      ValueError: a shape that does not fit, a non-positive temperature, an unknown
        ``negatives``, or ``"local"`` without a ``shards`` that divides B.
    """
    _check_inputs(q, q_mask, d, d_mask, query_ids, doc_ids)
    scale = _check_temperature(temperature)
    groups = _groups(negatives, shards, q.shape[0])
    q, d = q.astype(jnp.float32), d.astype(jnp.float32)
    if negatives == "local":
        scores = _local_scores(q, q_mask, d, d_mask, groups)
        return _infonce(scores, scale, _local_duplicates(query_ids, doc_ids, groups))
    # Each device scores its own queries against every document: the documents are gathered
    # whole (a no-op outside a mesh and rules context).
    q = constrain(q, (ACT_BATCH, ACT_LENGTH, ACT_EMBED))
    q_mask = constrain(q_mask, (ACT_BATCH, ACT_LENGTH))
    d = constrain(d, (None, ACT_LENGTH, ACT_EMBED))
    d_mask = constrain(d_mask, (None, ACT_LENGTH))
    scores = constrain(maxsim(q, q_mask, d, d_mask), (ACT_BATCH, None))
    duplicates = None
    if query_ids is not None or doc_ids is not None:
        duplicates = false_negative_mask(query_ids, doc_ids)
    return _infonce(scores, scale, duplicates)


def cached_vector_grads(
    q: jax.Array, q_mask: jax.Array, d: jax.Array, d_mask: jax.Array, **options: Any
) -> tuple[tuple[jax.Array, Metrics], tuple[jax.Array, jax.Array]]:
    """``((loss, metrics), (dL/dq, dL/dd))``: the gradient cache's step 2 for MIRe.

    ``q`` and ``d`` are the token vectors a first, gradient-free pass embedded (chunk by
    chunk); ``options`` are ``maxsim_infonce``'s keywords. The gradients have the shapes and
    dtypes of ``q`` and ``d`` (zero at masked positions); re-running chunk k of the towers under
    ``jax.vjp`` with rows k of them as cotangents, and summing, gives the parameters' gradient
    of the whole-batch loss.
    """

    def loss(q: jax.Array, d: jax.Array) -> tuple[jax.Array, Metrics]:
        return maxsim_infonce(q, q_mask, d, d_mask, **options)

    return jax.value_and_grad(loss, argnums=(0, 1), has_aux=True)(q, d)


def grad_cache_loss_fn(
    q_mask: jax.Array, d_mask: jax.Array, **options: Any
) -> Callable[[Any, jax.Array, jax.Array], tuple[jax.Array, Metrics]]:
    """``loss_fn(params, q, d) -> (loss, metrics)`` for ``grad_cache_loss_and_grad`` (its
    embeddings being the towers' ``[rows, L, dim]`` token vectors, the batches' masks closed
    over here). MIRe's loss reads no parameter (its temperature is fixed): ``params`` is
    unused and gets a zero gradient."""

    def loss_fn(params: Any, q: jax.Array, d: jax.Array) -> tuple[jax.Array, Metrics]:
        del params
        return maxsim_infonce(q, q_mask, d, d_mask, **options)

    return loss_fn
