"""Gradient caching (Gao et al. 2021, "GradCache") for contrastive batches larger than memory.

Plain gradient accumulation over micro-batches would shrink the negatives to one micro-batch.
Gradient caching keeps the full global batch in the loss and only bounds the activation memory:

1. embed every batch in chunks of ``chunk_size`` rows without gradients (only the [B, D]
   embeddings are kept);
2. compute the loss on the full embeddings and its gradient with respect to the embeddings and
   to the parameters the loss reads directly (e.g. a learnable temperature);
3. re-run each chunk under ``jax.vjp`` with its slice of the embedding gradient as cotangent and
   sum the parameter gradients over the chunks.

The result equals ``jax.value_and_grad`` of the whole-batch loss up to float rounding, at the
cost of one extra forward pass. Step 3 recomputes the forward of step 1, so ``embed_fn`` must be
deterministic (no dropout, or the same randomness in both passes); the encoder here has none.

What does not depend on the differentiated parameters (a frozen vision tower's image tokens)
need not be recomputed in step 3: ``features_fn`` computes it once per chunk in step 1, and
both passes hand it to ``embed_fn``. It is held for the whole batch until step 3 ends.

Features that cannot be computed chunk by chunk (images packed into vision rows of their own,
which do not follow the text rows' chunking) are computed by the caller over the whole batch
and passed in as ``batch_features``: per-row arrays, chunked with the rows. With
``feature_grads=True`` the gradient of the loss with respect to them is returned as well
(summed from each chunk's re-run), so a caller whose features depend on the parameters can
finish the chain rule with one vjp of its feature function: a second level of caching.

``cached_loss_and_grad`` applies it to a train batch's sides (the train step's gradient-cache
branch): which features are cached, which are passed in, and that last vjp.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import jax
import jax.numpy as jnp

from jfe_jax.models.batches import ModelBatch, PackedBatch, VisionPackedBatch

EmbedFn = Callable[..., jax.Array]  # (params, batch[, features]) -> [rows, D]
FeaturesFn = Callable[[Any, Any], Any]  # (params, batch) -> per-row arrays, held constant
LossFn = Callable[..., tuple[jax.Array, Any]]


def _batch_size(batch: Any, name: str) -> int:
    """The common leading size of the leaves of ``batch``."""
    sizes = {
        jax.tree_util.keystr(path): leaf.shape[0]
        for path, leaf in jax.tree_util.tree_leaves_with_path(batch)
    }
    if not sizes:
        raise ValueError(f"{name} has no arrays")
    if len(set(sizes.values())) != 1:
        raise ValueError(f"{name} leaves disagree on their leading (batch) size: {sizes}")
    return next(iter(sizes.values()))


def _to_chunks(x: jax.Array, num_chunks: int) -> jax.Array:
    """[B, ...] -> [num_chunks, B / num_chunks, ...], chunk k holding rows k, k + n, k + 2n, ...

    Strided rather than contiguous chunks: with the batch sharded contiguously over the
    data-parallel devices, every device then holds an equal part of every chunk, so all devices
    work on each chunk (given chunk_size is a multiple of the data-parallel size).
    """
    chunk_size = x.shape[0] // num_chunks
    return jnp.swapaxes(x.reshape(chunk_size, num_chunks, *x.shape[1:]), 0, 1)


def _from_chunks(x: jax.Array) -> jax.Array:
    """Inverse of ``_to_chunks``: [num_chunks, chunk_size, ...] -> [B, ...] in batch order."""
    return jnp.swapaxes(x, 0, 1).reshape(-1, *x.shape[2:])


def _no_features(params: Any, batch: Any) -> None:
    del params, batch


def _ignoring_features(embed_fn: EmbedFn) -> EmbedFn:
    return lambda params, batch, features: embed_fn(params, batch)


def _embed_without_grad(
    embed_fn: EmbedFn,
    features_fn: FeaturesFn,
    params: Any,
    batch: Any,
    num_chunks: int,
    batch_features: Any = None,
) -> tuple[jax.Array, Any]:
    """Embeddings of ``batch`` computed one chunk at a time, holding no activations.

    Also returns the features per chunk (``[num_chunks, chunk_size, ...]`` leaves) for the
    re-run to reuse: ``batch_features`` chunked when given, else ``features_fn``'s output.
    """
    chunks = jax.tree.map(lambda x: _to_chunks(x, num_chunks), batch)
    if batch_features is not None:
        features = jax.tree.map(
            lambda x: _to_chunks(jax.lax.stop_gradient(x), num_chunks), batch_features
        )
        embeddings = jax.lax.map(lambda cf: embed_fn(params, *cf), (chunks, features))
        return jax.lax.stop_gradient(_from_chunks(embeddings)), features

    def embed_chunk(chunk):
        features = jax.lax.stop_gradient(features_fn(params, chunk))
        return embed_fn(params, chunk, features), features

    embeddings, features = jax.lax.map(embed_chunk, chunks)
    return jax.lax.stop_gradient(_from_chunks(embeddings)), features


def _accumulate_param_grads(
    embed_fn: EmbedFn,
    params: Any,
    batch: Any,
    embedding_grad: jax.Array,
    num_chunks: int,
    grads: Any,
    features: Any,
    feature_grads: bool = False,
) -> tuple[Any, Any]:
    """Adds sum over chunks of d(embeddings)/d(params)^T . embedding_grad to ``grads``.

    ``features``: the first pass's features per chunk, a constant here. With
    ``feature_grads`` also returns d(embeddings)/d(features)^T . embedding_grad, shaped like
    the unchunked features (else None).
    """
    chunks = jax.tree.map(lambda x: _to_chunks(x, num_chunks), batch)
    cotangents = _to_chunks(embedding_grad, num_chunks)

    def step(acc, chunk_features_cotangent):
        chunk, chunk_features, cotangent = chunk_features_cotangent
        if not feature_grads:
            _, vjp = jax.vjp(lambda p: embed_fn(p, chunk, chunk_features), params)
            (chunk_grads,) = vjp(cotangent)
            return jax.tree.map(lambda a, g: a + g.astype(a.dtype), acc, chunk_grads), None
        _, vjp = jax.vjp(lambda p, f: embed_fn(p, chunk, f), params, chunk_features)
        chunk_grads, chunk_feature_grads = vjp(cotangent)
        acc = jax.tree.map(lambda a, g: a + g.astype(a.dtype), acc, chunk_grads)
        return acc, chunk_feature_grads

    grads, per_chunk = jax.lax.scan(step, grads, (chunks, features, cotangents))
    return grads, (jax.tree.map(_from_chunks, per_chunk) if feature_grads else None)


def _rerun_batches(
    embed_fn: EmbedFn,
    params: Any,
    batches: Sequence[Any],
    chunk_features: Sequence[Any],
    embedding_grads: Sequence[jax.Array],
    num_chunks: Sequence[int],
    feature_grads: Sequence[bool],
    grads: Any,
) -> tuple[Any, list[Any]]:
    """Step 3 for every batch: the loss's direct ``grads`` plus each batch's chunks' vjps,
    summed in float32 and cast back to the params' dtypes; and per batch its features'
    cotangent where ``feature_grads`` asks for it (else None)."""
    # Accumulate in float32 so many small chunk contributions are not lost in bf16 params.
    grads = jax.tree.map(lambda g: g.astype(jnp.promote_types(g.dtype, jnp.float32)), grads)
    cotangents = []
    for batch, features, embedding_grad, n, want in zip(
        batches, chunk_features, embedding_grads, num_chunks, feature_grads, strict=True
    ):
        grads, cotangent = _accumulate_param_grads(
            embed_fn, params, batch, embedding_grad, n, grads, features, want
        )
        cotangents.append(cotangent)
    return jax.tree.map(lambda g, p: g.astype(jnp.result_type(p)), grads, params), cotangents


def _chunk_counts(
    batches: Sequence[Any],
    batch_features: Sequence[Any],
    sizes: Sequence[int | None],
    chunk_size: int,
) -> list[int]:
    """Per batch, its chunk count: its size (the leaves' common leading size unless ``sizes``
    gives it) over ``chunk_size``.

    Raises:
      ValueError: ``batch_features`` or ``sizes`` has not one entry per batch, or a batch
        (or one of its leaves) does not split into whole chunks.
    """
    if chunk_size < 1:
        raise ValueError(f"chunk_size must be a positive number of rows, got {chunk_size}")
    if len(batch_features) != len(batches):
        raise ValueError(
            f"batch_features has {len(batch_features)} entries for {len(batches)} batches"
        )
    if len(sizes) != len(batches):
        raise ValueError(f"sizes has {len(sizes)} entries for {len(batches)} batches")
    num_chunks = []
    for index, (batch, features, size) in enumerate(zip(batches, batch_features, sizes)):
        what = f"batch {index} (with its batch_features)"
        if size is None:
            size = _batch_size((batch, features), what)
        if size % chunk_size:
            raise ValueError(
                f"batch {index} has {size} rows, which is not divisible by chunk_size="
                f"{chunk_size}; use a chunk_size that divides every batch size"
            )
        count = size // chunk_size
        for path, leaf in jax.tree_util.tree_leaves_with_path((batch, features)):
            if leaf.shape[0] % count:
                raise ValueError(
                    f"{what}: leaf {jax.tree_util.keystr(path)} has {leaf.shape[0]} rows, "
                    f"which do not split into {count} chunks"
                )
        num_chunks.append(count)
    return num_chunks


def grad_cache_loss_and_grad(
    embed_fn: EmbedFn,
    loss_fn: LossFn,
    params: Any,
    *batches: Any,
    chunk_size: int,
    features_fn: FeaturesFn | None = None,
    batch_features: Sequence[Any] | None = None,
    feature_grads: bool = False,
    sizes: Sequence[int | None] | None = None,
) -> tuple[tuple[jax.Array, Any], Any] | tuple[tuple[jax.Array, Any], Any, list[Any]]:
    """``jax.value_and_grad(has_aux=True)`` of a contrastive loss, computed chunk by chunk.

    Args:
      embed_fn: ``embed_fn(params, batch) -> [rows, D]`` embeddings; deterministic. With
        ``features_fn`` or ``batch_features``: ``embed_fn(params, batch, features)``.
      loss_fn: ``loss_fn(params, *embeddings) -> (loss, aux)``, one embedding array per batch
        in ``batches`` order (e.g. queries, candidates, flattened hard negatives). ``params``
        is passed for what the loss reads directly, such as a learnable temperature.
      params: the parameters to differentiate.
      *batches: pytrees of arrays whose leading axis is the batch (each may have its own size,
        e.g. B queries, B candidates and B * H hard negatives).
      chunk_size: rows embedded at once; must divide every batch's size. Memory holds one
        chunk's activations; to keep every device busy, use a multiple of data * fsdp.
      features_fn: optional ``features_fn(params, batch) -> pytree of [rows, ...] arrays``
        (or None) that must not depend on the differentiated ``params``: gradients do not flow
        through it. Computed in the first pass only and reused by the re-run.
      batch_features: optional, one entry per batch: a pytree of ``[rows, ...]`` arrays the
        caller computed over the whole batch, chunked with its rows and handed to
        ``embed_fn`` in both passes (instead of ``features_fn``'s), or None for that batch.
      feature_grads: also return, per batch, the loss's gradient with respect to its
        ``batch_features`` entry (None where the entry is None); ``grads`` then hold only
        what flows through ``embed_fn``'s use of ``params``, not through the features.
      sizes: optional, per batch, the embeddings it gives when that is not the leaves'
        common leading size (a packed batch: R rows, N items), or None for that batch. It
        is cut into ``size / chunk_size`` chunks, every leaf strided along its own leading
        axis, which must divide by the chunk count; ``embed_fn`` must give a chunk's
        embeddings in that chunk's order (``packing.pack_items(chunks=)`` lays rows out so).

    Returns:
      ``((loss, aux), grads)`` with ``grads`` shaped like ``params``; with ``feature_grads``,
      ``((loss, aux), grads, feature_grads)``.
    """
    if not batches:
        raise ValueError("grad_cache_loss_and_grad needs at least one batch to embed")
    batch_features = [None] * len(batches) if batch_features is None else list(batch_features)
    sizes = [None] * len(batches) if sizes is None else list(sizes)
    num_chunks = _chunk_counts(batches, batch_features, sizes, chunk_size)
    if features_fn is None:  # one code path: no features, and an embed_fn that takes none
        features_fn = _no_features
        if all(f is None for f in batch_features):
            embed_fn = _ignoring_features(embed_fn)

    embedded = [
        _embed_without_grad(embed_fn, features_fn, params, batch, n, features)
        for batch, n, features in zip(batches, num_chunks, batch_features, strict=True)
    ]
    embeddings = [embedding for embedding, _ in embedded]
    argnums = tuple(range(len(batches) + 1))
    (loss, aux), (grads, *embedding_grads) = jax.value_and_grad(
        loss_fn, argnums=argnums, has_aux=True
    )(params, *embeddings)

    wanted = [feature_grads and given is not None for given in batch_features]
    chunk_features = [features for _, features in embedded]
    grads, cotangents = _rerun_batches(
        embed_fn, params, batches, chunk_features, embedding_grads, num_chunks, wanted, grads
    )
    if feature_grads:
        return (loss, aux), grads, cotangents
    return (loss, aux), grads


def cached_loss_and_grad(
    embed_fn: EmbedFn,
    image_features_fn: FeaturesFn,
    loss_fn: LossFn,
    params: Any,
    sides: Sequence[ModelBatch],
    *,
    chunk_size: int,
) -> tuple[tuple[jax.Array, Any], Any]:
    """``grad_cache_loss_and_grad`` over a train batch's model-batch ``sides``, the vision
    tower run where it costs least.

    ``embed_fn(params, side[, image_features])`` embeds a side's items and
    ``image_features_fn(params, side)`` runs its vision tower (None where the side runs it
    itself); ``loss_fn(params, *embeddings)`` as in ``grad_cache_loss_and_grad``. A tower not
    in ``params`` (frozen) runs once per text chunk, in the first pass only. Sides whose
    images sit in vision rows of their own (``packing.pack_vision``) chunk their text rows
    only: the tower runs once over the whole side's vision rows, and its tokens, gathered per
    text row, are chunked with the rows; a trained tower then gets its gradient through the
    tokens' cotangents and one vjp over the vision rows (as the re-run does for text rows).

    Raises:
      ValueError: a packed side was not packed in this cache's chunks (see ``_chunk_local``).
    """
    vision_frozen = not params.get("vision")
    packed = [isinstance(side, VisionPackedBatch) for side in sides]
    row_sides = [_chunk_local(s.rows if p else s, chunk_size) for s, p in zip(sides, packed)]
    features = [image_features_fn(params, s) if p else None for s, p in zip(sides, packed)]
    (loss, metrics), grads, *feature_grads = grad_cache_loss_and_grad(
        embed_fn,
        loss_fn,
        params,
        *row_sides,
        chunk_size=chunk_size,
        features_fn=image_features_fn if vision_frozen else None,
        batch_features=features,
        feature_grads=not vision_frozen and any(packed),
        sizes=[side.num_items for side in sides],
    )
    for side, cotangent in zip(sides, feature_grads[0] if feature_grads else ()):
        if cotangent is not None:  # a trained tower: the chain rule through its tokens
            _, vjp = jax.vjp(lambda t, s=side: image_features_fn(t, s), params)
            (vision_grads,) = vjp(cotangent)
            grads = jax.tree.map(jnp.add, grads, vision_grads)
    return (loss, metrics), grads


def _chunk_local(side: ModelBatch, chunk_size: int) -> ModelBatch:
    """A side as the gradient cache's chunks see it: a packed side's ``pool_index`` rows made
    local to their chunk (row g of chunk g mod C is its row g // C), which ``pack_items``
    (``chunks=C``) guarantees by putting item i and its row in the same class mod C.

    Raises:
      ValueError: the side was packed for another chunk count (or not for chunks at all).
    """
    if not isinstance(side, PackedBatch):
        return side
    chunks = side.num_items // chunk_size
    if side.row_chunks != chunks:
        raise ValueError(
            f"a packed side of {side.num_items} items with train.grad_cache_chunk="
            f"{chunk_size} needs packing in {chunks} chunks (ContrastiveBatcher("
            f"pack_chunk_items=), packing.pack_items(chunks=)); this one was packed in "
            f"{side.row_chunks}"
        )
    pool_index = jnp.asarray(side.pool_index)
    return side.replace(pool_index=pool_index.at[:, 0].set(pool_index[:, 0] // chunks))
