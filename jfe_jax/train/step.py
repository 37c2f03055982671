"""The train state and the pure, jitted contrastive train step.

``make_train_step(...)(state, batch) -> (state, metrics)``. Only trainable parameters are
differentiated and carry optimizer state; frozen ones (the base weights under LoRA, or the
vision tower) ride along untouched, so they cost neither gradient nor Adam memory.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

import flax
import jax
import jax.numpy as jnp
import optax
from flax import traverse_util

from jfe_jax.models.batches import (
    LateFusionBatch,
    PackedBatch,
    TrainBatch,
    VisionPackedBatch,
    as_batch,
)
from jfe_jax.train.grad_cache import grad_cache_loss_and_grad
from jfe_jax.train.loss import contrastive_loss


@flax.struct.dataclass
class TrainState:
    """Everything a step reads and writes; a pytree Orbax saves whole."""

    step: jax.Array
    trainable: Any  # the parameters being trained (nested dict)
    frozen: Any  # the rest of the parameters (nested dict, possibly empty)
    opt_state: Any

    @property
    def params(self) -> dict[str, Any]:
        return merge_params(self.trainable, self.frozen)


def split_params(params: Mapping[str, Any], mask: Any) -> tuple[dict, dict]:
    """Splits a param tree by a same-shaped bool tree into (trainable, frozen) nested dicts."""
    flat = traverse_util.flatten_dict(params)
    flat_mask = traverse_util.flatten_dict(mask)
    trainable = {k: v for k, v in flat.items() if flat_mask[k]}
    frozen = {k: v for k, v in flat.items() if not flat_mask[k]}
    return traverse_util.unflatten_dict(trainable), traverse_util.unflatten_dict(frozen)


def merge_params(trainable: Mapping[str, Any], frozen: Mapping[str, Any]) -> dict[str, Any]:
    flat = traverse_util.flatten_dict(dict(frozen))
    flat.update(traverse_util.flatten_dict(dict(trainable)))
    return traverse_util.unflatten_dict(flat)


def side_rows(side: Any) -> int:
    """Items of one side's model batch (early fusion, packed, vision-packed, or late fusion's
    text/image pair): the rows of its embeddings. Vision rows (``pack_vision``) are not items."""
    return as_batch(side).num_items


def make_loss_and_grad(
    module: flax.linen.Module,
    *,
    learn_temperature: bool,
    symmetric: bool,
    mask_false_negatives: bool,
    grad_cache_chunk: int,
) -> Callable[[TrainState, dict[str, Any]], tuple[tuple[jax.Array, dict], Any]]:
    """``(state, batch) -> ((loss, metrics), grads of the trainable params)``.

    The batch holds ``query`` and ``candidate`` model batches (row i of each is a positive
    pair), optionally ``hard_negative`` (B*H rows), and int32 keys ``query_key``,
    ``candidate_key`` (and ``hard_negative_key`` [B, H]) identifying duplicates. A side may
    carry its images in vision rows of their own (``jfe_jax.models.packing.pack_vision``);
    with the gradient cache the tower then runs once over them, outside the text chunks.
    """

    def loss_and_grad(state: TrainState, batch: TrainBatch):
        batch = as_batch(batch)
        sides = batch.sides()
        rows = batch.query.num_items
        num_hard = batch.hard_negative.num_items // rows if batch.hard_negative is not None else 0
        ids = {}
        if mask_false_negatives:
            ids = dict(query_ids=batch.query_key, cand_ids=batch.candidate_key)
            if num_hard and batch.hard_negative_key is not None:
                ids["hard_negative_ids"] = batch.hard_negative_key

        def loss_from_embeddings(trainable, query, candidate, *hard):
            logit_scale = merge_params(trainable, state.frozen)["logit_scale"]
            if not learn_temperature:
                logit_scale = jax.lax.stop_gradient(logit_scale)
            hard_negatives = hard[0].reshape(rows, num_hard, -1) if hard else None
            return contrastive_loss(
                query,
                candidate,
                logit_scale=jnp.exp(logit_scale),
                hard_negatives=hard_negatives,
                symmetric=symmetric,
                **ids,
            )

        def embed(trainable, model_batch, image_features=None):
            params = merge_params(trainable, state.frozen)
            return module.apply({"params": params}, model_batch, image_features)[0]

        def image_features(trainable, model_batch):
            if isinstance(model_batch, LateFusionBatch):  # its parts run the tower themselves
                return None
            params = merge_params(trainable, state.frozen)
            return module.apply({"params": params}, model_batch, method="image_features")

        if grad_cache_chunk:
            # A frozen vision tower's output is the same in both passes: compute it once.
            vision_frozen = not state.trainable.get("vision")
            # Sides whose images sit in vision rows of their own (packing.pack_vision): the
            # chunks split the text rows only; the tower runs once over the whole side's vision
            # rows here and its tokens, gathered per text row, are chunked with the rows.
            packed = [isinstance(side, VisionPackedBatch) for side in sides]
            row_sides = [
                _chunk_local(s.rows if p else s, grad_cache_chunk) for s, p in zip(sides, packed)
            ]
            features = [
                image_features(state.trainable, s) if p else None for s, p in zip(sides, packed)
            ]
            (loss, metrics), grads, *feature_grads = grad_cache_loss_and_grad(
                embed,
                loss_from_embeddings,
                state.trainable,
                *row_sides,
                chunk_size=grad_cache_chunk,
                features_fn=image_features if vision_frozen else None,
                batch_features=features,
                feature_grads=not vision_frozen and any(packed),
                sizes=[side.num_items for side in sides],
            )
            for side, cotangent in zip(sides, feature_grads[0] if feature_grads else ()):
                if cotangent is not None:
                    # A trained tower: the chain rule through the cached image tokens, one
                    # vjp that reruns the side's vision rows (as the re-run pass does for
                    # the text rows).
                    _, vjp = jax.vjp(lambda t, s=side: image_features(t, s), state.trainable)
                    (vision_grads,) = vjp(cotangent)
                    grads = jax.tree.map(jnp.add, grads, vision_grads)
            return (loss, metrics), grads

        def full_loss(trainable):
            return loss_from_embeddings(trainable, *(embed(trainable, side) for side in sides))

        return jax.value_and_grad(full_loss, has_aux=True)(state.trainable)

    return loss_and_grad


def _chunk_local(side: Any, chunk_size: int) -> Any:
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


def make_train_step(
    module: flax.linen.Module,
    optimizer: optax.GradientTransformation,
    **loss_options,
) -> Callable[[TrainState, dict[str, Any]], tuple[TrainState, dict[str, Any]]]:
    """Builds ``step(state, batch) -> (state, metrics)``; jit it with shardings and donation.

    ``loss_options`` are those of ``make_loss_and_grad``.
    """
    loss_and_grad = make_loss_and_grad(module, **loss_options)

    def step(state: TrainState, batch: TrainBatch):
        (_, metrics), grads = loss_and_grad(state, batch)
        updates, opt_state = optimizer.update(grads, state.opt_state, state.trainable)
        trainable = optax.apply_updates(state.trainable, updates)
        metrics = dict(metrics)
        metrics["grad_norm"] = optax.tree.norm(grads)
        metrics["temperature"] = jnp.exp(-merge_params(trainable, state.frozen)["logit_scale"])
        new_state = state.replace(step=state.step + 1, trainable=trainable, opt_state=opt_state)
        return new_state, metrics

    return step


def jit_train_step(
    module: flax.linen.Module,
    optimizer: optax.GradientTransformation,
    config: Any,
    shardings: Any,
    mesh: jax.sharding.Mesh,
) -> Any:
    """The trainer's jitted step for a training ``config`` (loss options and
    ``train.grad_cache_chunk`` from it): state sharded by ``shardings`` and donated, the batch
    split over the mesh's data axes, metrics replicated. ``setup.build`` makes it, and
    ``train()``, ``jfe aot`` and the device benchmark all compile it from there (lowered by
    ``TrainSetup.lower``, under the mesh and the logical axis rules)."""
    from jfe_jax.train import mesh as mesh_lib

    step = make_train_step(
        module,
        optimizer,
        learn_temperature=config.model.learn_temperature,
        symmetric=config.loss.symmetric,
        mask_false_negatives=config.loss.mask_false_negatives,
        grad_cache_chunk=config.train.grad_cache_chunk,
    )
    return jax.jit(
        step,
        in_shardings=(shardings, mesh_lib.batch_sharding(mesh)),
        out_shardings=(shardings, mesh_lib.replicated_sharding(mesh)),
        donate_argnums=0,
    )
