"""The real encoder's contrastive loss and gradients: sharded meshes and gradient caching."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from train_fixtures import ToyPairs, assert_trees_close, loss_and_grad

from jfe_jax.models.inputs import dummy_batch
from jfe_jax.models.one_tower import EncoderOptions
from jfe_jax.models.sizes import get_size
from jfe_jax.train import mesh as mesh_lib
from jfe_jax.train.optimizer import trainable_mask
from jfe_jax.train.step import TrainState, split_params

RTOL = 1e-5  # relative to each leaf's max |value|, float32


@pytest.fixture(scope="module")
def setup():
    config = get_size("tiny")
    module = EncoderOptions(lora_rank=4, lora_alpha=8.0).module(config)
    boxed = module.init(jax.random.key(0), dummy_batch(config))["params"]
    params = nn.meta.unbox(boxed)
    # Give LoRA B weight so adapter gradients flow through both factors.
    params = jax.tree_util.tree_map_with_path(
        lambda p, x: (
            0.05 * jax.random.normal(jax.random.key(1), x.shape) if p[-1].key == "lora_b" else x
        ),
        params,
    )
    batch = next(ToyPairs(config, batch_size=16, seed=3))
    return config, module, boxed, params, batch


def _state(params, mode):
    mask = trainable_mask(params, mode)
    trainable, frozen = split_params(params, mask)
    return TrainState(
        step=jnp.zeros((), jnp.int32), trainable=trainable, frozen=frozen, opt_state=None
    )


def _assert_close(a, b):
    assert_trees_close(a, b, RTOL)


@pytest.mark.parametrize(
    "shape",
    [
        dict(data=8, fsdp=1, tensor=1),
        dict(data=2, fsdp=2, tensor=2),
        dict(data=1, fsdp=8, tensor=1),
    ],
)
def test_sharded_loss_and_gradients_equal_single_device(setup, shape):
    config, module, boxed, params, batch = setup
    state = _state(params, "full")
    loss_1, grads_1 = loss_and_grad(module, state, batch)
    loss_n, grads_n = loss_and_grad(module, state, batch, mesh_lib.make_mesh(shape), boxed)
    assert abs(loss_n - loss_1) <= RTOL * abs(loss_1)
    _assert_close(grads_n, grads_1)


@pytest.mark.parametrize("chunk", [4, 16])
def test_gradient_caching_equals_the_full_batch_gradient(setup, chunk):
    config, module, boxed, params, batch = setup
    state = _state(params, "full")
    loss_full, grads_full = loss_and_grad(module, state, batch)
    loss_gc, grads_gc = loss_and_grad(module, state, batch, chunk=chunk)
    assert abs(loss_gc - loss_full) <= RTOL * abs(loss_full)
    _assert_close(grads_gc, grads_full)


def test_lora_mode_differentiates_only_adapters_and_temperature(setup):
    config, module, boxed, params, batch = setup
    mask = trainable_mask(params, "lora", also_trainable=("logit_scale",))
    trainable, frozen = split_params(params, mask)
    state = TrainState(
        step=jnp.zeros((), jnp.int32), trainable=trainable, frozen=frozen, opt_state=None
    )
    _, grads = loss_and_grad(module, state, batch)
    names = {
        jax.tree_util.keystr(p).split("'")[-2]
        for p, _ in jax.tree_util.tree_leaves_with_path(grads)
    }
    assert names == {"lora_a", "lora_b", "logit_scale"}
    assert all(float(np.max(np.abs(g))) > 0 for g in jax.tree_util.tree_leaves(grads))
