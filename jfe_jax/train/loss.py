"""InfoNCE over the global batch, with optional hard negatives and false-negative masking.

The loss is written on global arrays and meant to run under ``jax.jit``: when the embeddings
are sharded over the batch axes, XLA gathers the candidates for the similarity matrix, so every
candidate on every device is a negative for every query (no explicit all-gather in our code).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from jfe_jax.models.axes import ACT_BATCH, ACT_EMBED, constrain

Metrics = dict[str, tuple[jax.Array, jax.Array]]


def _logit_scale(
    temperature: float | jax.Array | None, logit_scale: float | jax.Array | None
) -> jax.Array:
    """The factor applied to cosine similarities, from exactly one of the two settings."""
    if (temperature is None) == (logit_scale is None):
        raise ValueError(
            "contrastive_loss needs exactly one of temperature (scores = sim / temperature) or "
            f"logit_scale (scores = sim * logit_scale); got temperature={temperature}, "
            f"logit_scale={logit_scale}"
        )
    if temperature is not None:
        return 1.0 / jnp.asarray(temperature, jnp.float32)
    return jnp.asarray(logit_scale, jnp.float32)


def _check_shapes(
    query_emb: jax.Array,
    cand_emb: jax.Array,
    query_ids: jax.Array | None,
    cand_ids: jax.Array | None,
    hard_negatives: jax.Array | None,
    hard_negative_ids: jax.Array | None,
) -> None:
    """Raises ValueError naming the first input whose shape does not fit the others."""
    if query_emb.ndim != 2 or cand_emb.shape != query_emb.shape:
        raise ValueError(
            f"query_emb and cand_emb must both be [batch, dim] with the positive of query i at "
            f"candidate i; got {query_emb.shape} and {cand_emb.shape}"
        )
    batch, dim = query_emb.shape
    for name, ids in (("query_ids", query_ids), ("cand_ids", cand_ids)):
        if ids is not None and ids.shape != (batch,):
            raise ValueError(f"{name} must have shape ({batch},), got {ids.shape}")
    if hard_negatives is not None:
        if hard_negatives.ndim != 3 or hard_negatives.shape[::2] != (batch, dim):
            raise ValueError(
                f"hard_negatives must be [batch={batch}, num_hard, dim={dim}], "
                f"got {hard_negatives.shape}"
            )
    if hard_negative_ids is not None:
        if hard_negatives is None or cand_ids is None:
            raise ValueError("hard_negative_ids needs both hard_negatives and cand_ids")
        if hard_negative_ids.shape != hard_negatives.shape[:2]:
            raise ValueError(
                f"hard_negative_ids must have shape {hard_negatives.shape[:2]} (one id per hard "
                f"negative), got {hard_negative_ids.shape}"
            )


def false_negative_mask(query_ids: jax.Array | None, cand_ids: jax.Array | None) -> jax.Array:
    """[B, B] bool: True where off-diagonal pair (i, j) shares a query id or a candidate id.

    Such a candidate j is also a correct answer for query i (and query j for candidate i), so
    it is left out of the softmax denominator instead of being pushed away.
    """
    if query_ids is None and cand_ids is None:
        raise ValueError("false_negative_mask needs query_ids, cand_ids or both; got neither")
    ids = query_ids if query_ids is not None else cand_ids
    batch = ids.shape[0]
    same = jnp.zeros((batch, batch), bool)
    for group in (query_ids, cand_ids):
        if group is not None:
            same = same | (group[:, None] == group[None, :])
    return same & ~jnp.eye(batch, dtype=bool)


def contrastive_loss(
    query_emb: jax.Array,
    cand_emb: jax.Array,
    *,
    temperature: float | jax.Array | None = None,
    logit_scale: float | jax.Array | None = None,
    query_ids: jax.Array | None = None,
    cand_ids: jax.Array | None = None,
    hard_negatives: jax.Array | None = None,
    hard_negative_ids: jax.Array | None = None,
    symmetric: bool = False,
) -> tuple[jax.Array, Metrics]:
    """InfoNCE: query i's positive is candidate i; all other candidates are negatives.

    Args:
      query_emb: [B, D] L2-normalised query embeddings (the global batch).
      cand_emb: [B, D] L2-normalised candidate embeddings; row i is the positive of query i.
      temperature: scores are ``sim / temperature`` (e.g. 0.05, or a learnable scalar).
      logit_scale: alternatively, scores are ``sim * logit_scale``. Give exactly one.
      query_ids, cand_ids: optional [B] integer ids. Off-diagonal pairs sharing either id are
        false negatives and are masked out of the denominators (see false_negative_mask).
      hard_negatives: optional [B, H, D] embeddings. Like in-batch candidates, every hard
        negative in the batch (not only the query's own H) is a negative for every query: the
        B * H of them are gathered and appended as extra columns (the common choice, as in
        E5-V / LamRA / SimCSE: more negatives for the same embedding work).
      hard_negative_ids: optional [B, H] ids; a hard negative whose id equals cand_ids[i] is
        masked for query i (a hard negative of another query can be query i's positive).
      symmetric: also add the candidate -> query direction (over in-batch queries only) and
        average the two directions.

    Returns:
      ``(loss, metrics)``: the mean loss and ``{"loss": (sum, count), "accuracy": (sum,
      count)}``, where accuracy is the fraction of queries whose top-scoring column (in-batch
      candidates and hard negatives) is their positive.
    """
    _check_shapes(query_emb, cand_emb, query_ids, cand_ids, hard_negatives, hard_negative_ids)
    scale = _logit_scale(temperature, logit_scale)
    batch, dim = query_emb.shape
    # Each device scores its own queries against every candidate: queries stay split over the
    # batch axes, candidates are gathered whole (a no-op outside a mesh and rules context).
    query = constrain(query_emb.astype(jnp.float32), (ACT_BATCH, ACT_EMBED))

    # Scores are multiplied by 1/temperature (20 at 0.05): a bf16-pass matmul would put
    # percent-level noise on the logits, and this matmul is tiny next to the encoder.
    def scores(cands: jax.Array) -> jax.Array:
        cands = constrain(cands.astype(jnp.float32), (None, ACT_EMBED))
        logits = jnp.einsum("qd,cd->qc", query, cands, precision=jax.lax.Precision.HIGHEST)
        return constrain(scale * logits, (ACT_BATCH, None))

    in_batch = scores(cand_emb)  # [B, B]
    positive = jnp.diagonal(in_batch)
    if query_ids is not None or cand_ids is not None:
        in_batch_masked = jnp.where(false_negative_mask(query_ids, cand_ids), -jnp.inf, in_batch)
    else:
        in_batch_masked = in_batch

    logits = in_batch_masked
    if hard_negatives is not None:
        hard = scores(hard_negatives.reshape(-1, dim))  # [B, B * H]
        if hard_negative_ids is not None:
            same = cand_ids[:, None] == hard_negative_ids.reshape(-1)[None, :]
            hard = jnp.where(same, -jnp.inf, hard)
        logits = jnp.concatenate([logits, hard], axis=1)

    per_query = jax.nn.logsumexp(logits, axis=1) - positive
    if symmetric:
        # The mask is symmetric, so its transpose masks the same pairs seen from the candidates.
        per_cand = jax.nn.logsumexp(in_batch_masked.T, axis=1) - positive
        per_query = 0.5 * (per_query + per_cand)

    correct = jnp.argmax(logits, axis=1) == jnp.arange(batch)
    count = jnp.asarray(batch, jnp.float32)
    loss_sum = jnp.sum(per_query)
    metrics = {
        "loss": (loss_sum, count),
        "accuracy": (jnp.sum(correct.astype(jnp.float32)), count),
    }
    return loss_sum / count, metrics
