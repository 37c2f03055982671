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

from jfe_jax.models.batches import LateFusionBatch, TrainBatch
from jfe_jax.train.grad_cache import cached_loss_and_grad
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


def make_loss_and_grad(
    module: flax.linen.Module,
    *,
    learn_temperature: bool,
    symmetric: bool,
    mask_false_negatives: bool,
    grad_cache_chunk: int,
) -> Callable[[TrainState, TrainBatch], tuple[tuple[jax.Array, dict], Any]]:
    """``(state, batch) -> ((loss, metrics), grads of the trainable params)``.

    The batch holds ``query`` and ``candidate`` model batches (row i of each is a positive
    pair), optionally ``hard_negative`` (B*H rows), and int32 keys ``query_key``,
    ``candidate_key`` (and ``hard_negative_key`` [B, H]) identifying duplicates. A side may
    carry its images in vision rows of their own (``jfe_jax.models.packing.pack_vision``);
    with the gradient cache (``grad_cache.cached_loss_and_grad``) the tower then runs once
    over them, outside the text chunks.
    """
    loss_options = dict(
        learn_temperature=learn_temperature,
        symmetric=symmetric,
        mask_false_negatives=mask_false_negatives,
    )

    def loss_and_grad(state: TrainState, batch: TrainBatch):
        sides = batch.sides()
        loss_fn = _embedding_loss(state.frozen, batch, **loss_options)
        embed, image_features = _tower_fns(module, state.frozen)
        if grad_cache_chunk:
            return cached_loss_and_grad(
                embed, image_features, loss_fn, state.trainable, sides, chunk_size=grad_cache_chunk
            )

        def full_loss(trainable):
            return loss_fn(trainable, *(embed(trainable, side) for side in sides))

        return jax.value_and_grad(full_loss, has_aux=True)(state.trainable)

    return loss_and_grad


def _embedding_loss(
    frozen: Mapping[str, Any],
    batch: TrainBatch,
    *,
    learn_temperature: bool,
    symmetric: bool,
    mask_false_negatives: bool,
) -> Callable[..., tuple[jax.Array, dict]]:
    """``loss_fn(trainable, query, candidate[, hard]) -> (loss, metrics)``: the contrastive
    loss of a batch's embeddings (hard negatives flattened to ``[B*H, D]``), the temperature
    read from the merged params and the duplicates masked by the batch's keys."""
    rows = batch.query.num_items
    num_hard = batch.hard_negative.num_items // rows if batch.hard_negative is not None else 0
    ids = {}
    if mask_false_negatives:
        ids = dict(query_ids=batch.query_key, cand_ids=batch.candidate_key)
        if num_hard and batch.hard_negative_key is not None:
            ids["hard_negative_ids"] = batch.hard_negative_key

    def loss_from_embeddings(trainable, query, candidate, *hard):
        logit_scale = merge_params(trainable, frozen)["logit_scale"]
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

    return loss_from_embeddings


def _tower_fns(module: flax.linen.Module, frozen: Mapping[str, Any]) -> tuple[Callable, Callable]:
    """``(embed, image_features)`` of the trainable params, the ``frozen`` ones merged in:
    ``embed(trainable, model_batch[, image_features]) -> [items, D]`` and
    ``image_features(trainable, model_batch)``, the tower's image tokens (None for a late-fusion
    batch, whose parts run the tower themselves)."""

    def embed(trainable, model_batch, image_features=None):
        params = merge_params(trainable, frozen)
        return module.apply({"params": params}, model_batch, image_features)[0]

    def image_features(trainable, model_batch):
        if isinstance(model_batch, LateFusionBatch):
            return None
        params = merge_params(trainable, frozen)
        return module.apply({"params": params}, model_batch, method="image_features")

    return embed, image_features


def make_train_step(
    module: flax.linen.Module,
    optimizer: optax.GradientTransformation,
    **loss_options,
) -> Callable[[TrainState, TrainBatch], tuple[TrainState, dict[str, Any]]]:
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
