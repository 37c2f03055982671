"""Gradient caching equals the full-batch value_and_grad, on one device and on a mesh."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import PartitionSpec
from toy_model import ToyEncoder

from jfe_jax.models.axes import LOGICAL_RULES
from jfe_jax.train.grad_cache import grad_cache_loss_and_grad
from jfe_jax.train.loss import contrastive_loss
from jfe_jax.train.mesh import batch_sharding, logical_shardings, make_mesh, replicated_sharding

BATCH, FEATURES, NUM_HARD = 16, 16, 2
MAX_RELATIVE_DIFFERENCE = 1e-5


MODEL = ToyEncoder()


def embed_fn(params, batch):
    return MODEL.apply({"params": params}, batch)


def make_loss_fn(cand_ids):
    def loss_fn(params, query_emb, cand_emb, hard_emb):
        return contrastive_loss(
            query_emb,
            cand_emb,
            temperature=jnp.exp(params["log_temperature"]),
            cand_ids=cand_ids,
            hard_negatives=hard_emb.reshape(query_emb.shape[0], NUM_HARD, -1),
            symmetric=True,
        )

    return loss_fn


def full_batch_step(params, batch):
    loss_fn = make_loss_fn(batch["cand_ids"])

    def loss_of_params(p):
        hard = batch["hard"].reshape(-1, FEATURES)
        embeddings = [embed_fn(p, {"features": x}) for x in (batch["query"], batch["cand"], hard)]
        return loss_fn(p, *embeddings)

    return jax.value_and_grad(loss_of_params, has_aux=True)(params)


def grad_cache_step(params, batch, *, chunk_size):
    return grad_cache_loss_and_grad(
        embed_fn,
        make_loss_fn(batch["cand_ids"]),
        params,
        {"features": batch["query"]},
        {"features": batch["cand"]},
        {"features": batch["hard"].reshape(-1, FEATURES)},
        chunk_size=chunk_size,
    )


def make_batch(seed=0):
    rng = np.random.default_rng(seed)
    query = rng.normal(size=(BATCH, FEATURES)).astype(np.float32)
    cand_ids = np.arange(BATCH, dtype=np.int32)
    cand_ids[9] = cand_ids[3]
    return {
        "query": query,
        "cand": (query + 0.5 * rng.normal(size=query.shape)).astype(np.float32),
        "hard": rng.normal(size=(BATCH, NUM_HARD, FEATURES)).astype(np.float32),
        "cand_ids": cand_ids,
    }


def init_params():
    sample = {"features": np.zeros((2, FEATURES), np.float32)}
    return nn.meta.unbox(MODEL.init(jax.random.key(0), sample)["params"])


def max_relative_difference(actual, expected):
    """Largest over leaves of max|actual - expected| / max|expected|."""
    diffs = jax.tree.map(
        lambda a, e: float(np.max(np.abs(np.asarray(a) - e)) / np.max(np.abs(e))),
        actual,
        jax.tree.map(np.asarray, expected),
    )
    return max(jax.tree.leaves(diffs))


@pytest.fixture(scope="module")
def reference():
    params, batch = init_params(), make_batch()
    return params, batch, jax.jit(full_batch_step)(params, batch)


@pytest.mark.parametrize("chunk_size", [1, 2, 4, 8, 16])
def test_grad_cache_equals_full_batch_gradient(reference, chunk_size):
    params, batch, ((loss, metrics), grads) = reference
    step = jax.jit(lambda p, b: grad_cache_step(p, b, chunk_size=chunk_size))
    (cached_loss, cached_metrics), cached_grads = step(params, batch)

    assert max_relative_difference(cached_loss, loss) <= MAX_RELATIVE_DIFFERENCE
    assert max_relative_difference(cached_metrics, metrics) <= MAX_RELATIVE_DIFFERENCE
    assert max_relative_difference(cached_grads, grads) <= MAX_RELATIVE_DIFFERENCE
    # The temperature gradient comes from the loss itself, not from the chunk re-runs.
    assert abs(float(cached_grads["log_temperature"])) > 0


@pytest.mark.parametrize("chunk_size", [4, 8])
def test_grad_cache_on_data_fsdp_tensor_mesh_equals_single_device(reference, chunk_size):
    params, batch, ((loss, _), grads) = reference
    mesh = make_mesh({"data": 2, "fsdp": 2, "tensor": 2})
    # The reference's values, placed by their logical axes as the trainer places params.
    sample = {"features": np.zeros((2, FEATURES), np.float32)}
    boxed = jax.eval_shape(lambda: MODEL.init(jax.random.key(0), sample)["params"])
    shardings = logical_shardings(boxed, mesh)
    sharded_params = jax.device_put(params, shardings)
    with jax.set_mesh(mesh), nn.logical_axis_rules(LOGICAL_RULES):
        step = jax.jit(
            lambda p, b: grad_cache_step(p, b, chunk_size=chunk_size),
            in_shardings=(shardings, batch_sharding(mesh)),
            out_shardings=(replicated_sharding(mesh), shardings),
        )
        sharded_batch = jax.device_put(batch, batch_sharding(mesh))
        (sharded_loss, _), sharded_grads = step(sharded_params, sharded_batch)

    assert sharded_grads["up"]["kernel"].sharding.spec == PartitionSpec("fsdp", "tensor")
    assert max_relative_difference(sharded_loss, loss) <= MAX_RELATIVE_DIFFERENCE
    assert max_relative_difference(sharded_grads, grads) <= MAX_RELATIVE_DIFFERENCE


def test_batch_not_divisible_by_chunk_size_is_rejected():
    params, batch = init_params(), make_batch()
    with pytest.raises(ValueError, match="16 rows, which is not divisible by chunk_size=5"):
        grad_cache_step(params, batch, chunk_size=5)


def test_batches_with_ragged_leaves_are_rejected():
    params = init_params()
    ragged = {"features": np.zeros((4, FEATURES), np.float32), "mask": np.zeros((3,))}
    with pytest.raises(ValueError, match="disagree on their leading"):
        grad_cache_loss_and_grad(embed_fn, make_loss_fn(None), params, ragged, chunk_size=1)


# ---------------------------------------------------------------- features computed once


def test_features_fn_runs_in_the_first_pass_only_and_gradients_match(reference):
    params, batch, ((loss, metrics), grads) = reference
    traced = []

    def features_fn(p, chunk):  # the frozen part: the first dense layer's input, rescaled
        traced.append(chunk["features"].shape)
        return {"scaled": 2.0 * chunk["features"]}

    def embed_with_features(p, chunk, features):
        return embed_fn(p, {"features": 0.5 * features["scaled"]})

    def step(p, b):
        return grad_cache_loss_and_grad(
            embed_with_features,
            make_loss_fn(b["cand_ids"]),
            p,
            {"features": b["query"]},
            {"features": b["cand"]},
            {"features": b["hard"].reshape(-1, FEATURES)},
            chunk_size=4,
            features_fn=features_fn,
        )

    (cached_loss, cached_metrics), cached_grads = jax.jit(step)(params, batch)
    assert len(traced) == 3  # once per batch, in the no-grad pass; the re-run reuses them
    assert max_relative_difference(cached_loss, loss) <= MAX_RELATIVE_DIFFERENCE
    assert max_relative_difference(cached_metrics, metrics) <= MAX_RELATIVE_DIFFERENCE
    assert max_relative_difference(cached_grads, grads) <= MAX_RELATIVE_DIFFERENCE


@pytest.fixture(scope="module")
def encoder_setup():
    """The real tiny encoder (LoRA adapters with non-zero B) and a batch whose candidates carry
    images (queries are text only)."""
    from train_fixtures import ToyPairs

    from jfe_jax.models.inputs import dummy_batch
    from jfe_jax.models.one_tower import EncoderOptions
    from jfe_jax.models.sizes import get_size

    config = get_size("tiny")
    module = EncoderOptions(lora_rank=4, lora_alpha=8.0).module(config)
    params = nn.meta.unbox(module.init(jax.random.key(0), dummy_batch(config))["params"])
    params = jax.tree_util.tree_map_with_path(
        lambda p, x: (
            0.05 * jax.random.normal(jax.random.key(1), x.shape) if p[-1].key == "lora_b" else x
        ),
        params,
    )
    batch = next(ToyPairs(config, batch_size=16, seed=3))
    assert batch.candidate.pixel_values.shape[1] > 0
    return module, params, batch


def _encoder_loss_and_grad(module, params, mode, chunk):
    from train_fixtures import contrastive_loss_and_grad_fn

    from jfe_jax.train.optimizer import trainable_mask
    from jfe_jax.train.step import TrainState, split_params

    trainable, frozen = split_params(
        params, trainable_mask(params, mode, also_trainable=("logit_scale",))
    )
    state = TrainState(
        step=jnp.zeros((), jnp.int32), trainable=trainable, frozen=frozen, opt_state=None
    )
    return contrastive_loss_and_grad_fn(module, chunk), state


@pytest.mark.parametrize("mode", ["freeze_vision", "lora"])
@pytest.mark.parametrize("chunk", [4, 16])
def test_grad_cache_reusing_frozen_vision_features_equals_full_batch_gradient(
    encoder_setup, mode, chunk
):
    module, params, batch = encoder_setup
    fn_full, state = _encoder_loss_and_grad(module, params, mode, chunk=0)
    fn_cached, _ = _encoder_loss_and_grad(module, params, mode, chunk=chunk)
    (loss, metrics), grads = jax.jit(fn_full)(state, batch)
    (cached_loss, cached_metrics), cached_grads = jax.jit(fn_cached)(state, batch)

    assert "vision" not in state.trainable
    assert max_relative_difference(cached_loss, loss) <= MAX_RELATIVE_DIFFERENCE
    assert max_relative_difference(cached_metrics, metrics) <= MAX_RELATIVE_DIFFERENCE
    assert max_relative_difference(cached_grads, grads) <= MAX_RELATIVE_DIFFERENCE
    assert all(float(np.max(np.abs(g))) > 0 for g in jax.tree.leaves(cached_grads))


def test_grad_cache_runs_a_frozen_vision_tower_once_and_a_trainable_one_twice(encoder_setup):
    from train_fixtures import count_forward_dots

    module, params, batch = encoder_setup
    runs = {}
    for mode in ("freeze_vision", "full"):
        fn, state = _encoder_loss_and_grad(module, params, mode, chunk=4)
        jaxpr = jax.make_jaxpr(fn)(state, batch).jaxpr
        # The patch embedding's forward matmul: one per pass over the candidates' images.
        runs[mode] = count_forward_dots(jaxpr, "vision/patch_embed")
    assert runs == {"freeze_vision": 1, "full": 2}
