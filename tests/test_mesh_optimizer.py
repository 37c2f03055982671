"""Mesh shapes, shardings and sharded train steps; the trainer's initial state and its one
freezing mechanism (the state split); the optimizer's schedule, masks and groups."""

import math

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
import pytest
from jax.sharding import PartitionSpec
from toy_model import ToyEncoder
from train_fixtures import ToyPairs, assert_trees_close

from jfe_jax.models.axes import LOGICAL_RULES
from jfe_jax.models.inputs import dummy_batch
from jfe_jax.train.config_base import base_config
from jfe_jax.train.loss import contrastive_loss
from jfe_jax.train.mesh import (
    batch_sharding,
    check_batch_divisible,
    global_batch_from_host,
    logical_shardings,
    make_mesh,
    replicated_sharding,
    resolve_mesh_shape,
)
from jfe_jax.train.optimizer import (
    decay_mask,
    make_optimizer,
    make_schedule,
    param_labels,
    trainable_mask,
)
from jfe_jax.train.setup import build, make_lr_fn

BATCH, FEATURES, NUM_HARD = 16, 16, 2
MAX_RELATIVE_DIFFERENCE = 1e-5


# ---------------------------------------------------------------------------------------------
# Mesh shapes
# ---------------------------------------------------------------------------------------------


def test_minus_one_axis_takes_the_remaining_devices():
    assert resolve_mesh_shape({"data": -1, "fsdp": 2, "tensor": 2}) == {
        "data": 2,
        "fsdp": 2,
        "tensor": 2,
    }
    config = ml_collections.ConfigDict({"data": 1, "fsdp": -1, "tensor": 1})
    assert resolve_mesh_shape(config) == {"data": 1, "fsdp": 8, "tensor": 1}
    mesh = make_mesh({"data": 2, "fsdp": -1, "tensor": 2})
    assert dict(mesh.shape) == {"data": 2, "fsdp": 2, "tensor": 2}
    assert all(t == jax.sharding.AxisType.Auto for t in mesh.axis_types)


def test_mesh_product_must_equal_device_count():
    with pytest.raises(ValueError, match="has 4 devices but 8 are available"):
        resolve_mesh_shape({"data": 2, "fsdp": 2, "tensor": 1})


def test_mesh_allows_only_one_minus_one():
    with pytest.raises(ValueError, match="at most one mesh axis may be -1"):
        resolve_mesh_shape({"data": -1, "fsdp": -1, "tensor": 2})


def test_mesh_minus_one_must_divide_device_count():
    with pytest.raises(ValueError, match="multiply to 3, which does not divide the device count 8"):
        resolve_mesh_shape({"data": -1, "fsdp": 3, "tensor": 1})


def test_mesh_shape_must_name_every_axis():
    with pytest.raises(ValueError, match=r"missing \['tensor'\], unknown \['model'\]"):
        resolve_mesh_shape({"data": 2, "fsdp": 2, "model": 2})


def test_batch_must_split_over_data_parallel_size():
    mesh = make_mesh({"data": 2, "fsdp": 2, "tensor": 2})
    check_batch_divisible(8, mesh)
    message = (
        r"global batch size 6 is not divisible by the data-parallel size 4 \(data=2 \* fsdp=2\)"
    )
    with pytest.raises(ValueError, match=message):
        check_batch_divisible(6, mesh)
    with pytest.raises(ValueError, match=message):
        global_batch_from_host({"features": np.zeros((6, 3), np.float32)}, mesh)


def test_global_batch_is_split_over_data_and_fsdp_and_replicated_over_tensor():
    mesh = make_mesh({"data": 2, "fsdp": 2, "tensor": 2})
    local = {"features": np.arange(8 * 3, dtype=np.float32).reshape(8, 3), "ids": np.arange(8)}
    batch = global_batch_from_host(local, mesh)
    assert batch["features"].sharding.spec == PartitionSpec(("data", "fsdp"))
    assert batch["features"].addressable_shards[0].data.shape == (2, 3)
    np.testing.assert_array_equal(np.asarray(batch["features"]), local["features"])
    np.testing.assert_array_equal(np.asarray(batch["ids"]), local["ids"])


# ---------------------------------------------------------------------------------------------
# Sharded init and a sharded train step against one device
# ---------------------------------------------------------------------------------------------


MODEL = ToyEncoder()
SAMPLE = {"features": np.zeros((2, FEATURES), np.float32)}


def init_variables(rng):
    return MODEL.init(rng, SAMPLE)["params"]


def train_step(params, batch):
    """Embeddings of queries, candidates and hard negatives -> InfoNCE -> value_and_grad."""

    def loss_fn(p):
        def embed(features):
            return MODEL.apply({"params": p}, {"features": features})

        return contrastive_loss(
            embed(batch["query"]),
            embed(batch["cand"]),
            temperature=jnp.exp(p["log_temperature"]),
            cand_ids=batch["cand_ids"],
            hard_negatives=embed(batch["hard"].reshape(-1, FEATURES)).reshape(BATCH, NUM_HARD, -1),
            symmetric=True,
        )

    return jax.value_and_grad(loss_fn, has_aux=True)(params)


def make_batch():
    rng = np.random.default_rng(0)
    query = rng.normal(size=(BATCH, FEATURES)).astype(np.float32)
    cand_ids = np.arange(BATCH, dtype=np.int32)
    cand_ids[11] = cand_ids[2]
    return {
        "query": query,
        "cand": (query + 0.5 * rng.normal(size=query.shape)).astype(np.float32),
        "hard": rng.normal(size=(BATCH, NUM_HARD, FEATURES)).astype(np.float32),
        "cand_ids": cand_ids,
    }


def max_relative_difference(actual, expected):
    """Largest over leaves of max|actual - expected| / max|expected|."""
    diffs = jax.tree.map(
        lambda a, e: float(np.max(np.abs(np.asarray(a) - e)) / np.max(np.abs(e))),
        actual,
        jax.tree.map(np.asarray, expected),
    )
    return max(jax.tree.leaves(diffs))


def tiny_config(**fields):
    """The tiny model's training config with ``fields`` ({"a.b": value}) set."""
    config = base_config()
    for dotted, value in fields.items():
        node = config
        *parents, leaf = dotted.split(".")
        for parent in parents:
            node = node[parent]
        node[leaf] = value
    config.lock()
    return config


def test_initial_state_places_params_by_logical_axes_and_matches_plain_init():
    config = tiny_config(
        **{"mesh.data": 2, "mesh.fsdp": 2, "mesh.tensor": 2, "optimizer.trainable": "freeze_vision"}
    )
    setup = build(config)
    state, origin = setup.initial_state()
    assert origin == "random init of size tiny"
    assert set(state.frozen) == {"vision", "logit_scale"}  # a fixed temperature is frozen too
    assert set(state.trainable) == {"text"}
    up = state.trainable["text"]["layers_0"]["up_proj"]["kernel"]  # (embed, mlp)
    assert up.sharding.spec == PartitionSpec("fsdp", "tensor")
    assert up.addressable_shards[0].data.shape == (64 // 2, 128 // 2)
    qkv = state.frozen["vision"]["blocks_0"]["qkv"]["kernel"]  # (vision_embed, vision_qkv)
    assert qkv.sharding.spec == PartitionSpec("fsdp", "tensor")
    # Adam's moments lie as their params; the step is replicated.
    ((_, mu),) = optax.tree_utils.tree_get_all_with_path(state.opt_state, "mu")
    assert mu["text"]["layers_0"]["up_proj"]["kernel"].sharding == up.sharding
    assert state.step.sharding.spec == PartitionSpec()
    # Same random bits as a plain init (partitionable threefry); only float fusion may differ.
    plain = nn.meta.unbox(
        setup.module.init(jax.random.key(config.seed), dummy_batch(setup.model_config))["params"]
    )
    assert_trees_close(state.params, plain, rtol=1e-6)


@pytest.mark.parametrize(
    "shape",
    [
        {"data": 8, "fsdp": 1, "tensor": 1},
        {"data": 2, "fsdp": 2, "tensor": 2},
        {"data": 1, "fsdp": 8, "tensor": 1},
    ],
    ids=["data8", "data2_fsdp2_tensor2", "fsdp8"],
)
def test_sharded_train_step_equals_single_device(shape):
    host_batch = make_batch()
    host_params = jax.device_get(nn.meta.unbox(init_variables(jax.random.key(0))))
    one_device = jax.devices()[0]
    (loss, metrics), grads = jax.jit(train_step)(
        jax.device_put(host_params, one_device), jax.device_put(host_batch, one_device)
    )

    mesh = make_mesh(shape)
    # The same parameter values as the single-device run, placed by their logical axes.
    shardings = logical_shardings(jax.eval_shape(init_variables, jax.random.key(0)), mesh)
    params = jax.device_put(host_params, shardings)
    with jax.set_mesh(mesh), nn.logical_axis_rules(LOGICAL_RULES):
        step = jax.jit(
            train_step,
            in_shardings=(shardings, batch_sharding(mesh)),
            out_shardings=(replicated_sharding(mesh), shardings),
        )
        (sharded_loss, sharded_metrics), sharded_grads = step(
            params, global_batch_from_host(host_batch, mesh)
        )

    assert sharded_grads["up"]["kernel"].sharding == shardings["up"]["kernel"]
    assert max_relative_difference(sharded_loss, loss) <= MAX_RELATIVE_DIFFERENCE
    assert max_relative_difference(sharded_metrics, metrics) <= MAX_RELATIVE_DIFFERENCE
    assert max_relative_difference(sharded_grads, grads) <= MAX_RELATIVE_DIFFERENCE


# ---------------------------------------------------------------------------------------------
# Optimizer
# ---------------------------------------------------------------------------------------------


def model_like_params():
    """Paths shaped like the encoder's: a vision tower, scanned text layers with LoRA, norms."""
    rng = np.random.default_rng(0)

    def normal(*shape):
        return jnp.asarray(rng.normal(size=shape).astype(np.float32))

    return {
        "vision": {"patch_embed": {"kernel": normal(6, 4)}, "norm1": {"scale": normal(4)}},
        "text": {
            "layers": {
                "attn": {"q": {"kernel": normal(2, 4, 4), "lora_a": normal(2, 4, 2)}},
                "mlp": {"up": {"bias": normal(2, 4), "lora_b": normal(2, 2, 4)}},
                "input_layernorm": {"scale": normal(2, 4)},
            },
            "norm": {"scale": normal(4)},
        },
        "projection": {"kernel": normal(4, 4)},
        "log_temperature": jnp.float32(-3.0),
    }


def flat(tree):
    return {
        jax.tree_util.keystr(path, simple=True, separator="/"): leaf
        for path, leaf in jax.tree_util.tree_leaves_with_path(tree)
    }


def test_schedule_warms_up_linearly_then_decays_by_cosine():
    peak, end, warmup, total = 1e-3, 1e-5, 10, 110
    schedule = make_schedule(
        peak_learning_rate=peak, warmup_steps=warmup, total_steps=total, end_learning_rate=end
    )

    def expected(step):
        if step < warmup:
            return peak * step / warmup
        progress = min(step - warmup, total - warmup) / (total - warmup)
        return end + (peak - end) * 0.5 * (1 + math.cos(math.pi * progress))

    for step in [0, 1, 5, 10, 35, 60, 109, 110, 500]:
        assert float(schedule(step)) == pytest.approx(expected(step), rel=1e-5, abs=1e-12)
    with pytest.raises(ValueError, match="warmup_steps < total_steps"):
        make_schedule(peak_learning_rate=1.0, warmup_steps=5, total_steps=5, end_learning_rate=0)


def test_schedule_holds_the_peak_before_a_late_cosine_with_decay_fraction():
    peak, end, warmup, total = 1e-3, 1e-5, 10, 110
    settings = dict(
        peak_learning_rate=peak, warmup_steps=warmup, total_steps=total, end_learning_rate=end
    )
    schedule = make_schedule(**settings, decay_fraction=0.25)
    decay = 25  # a quarter of the 100 steps after warmup, the last ones: 85..110

    def expected(step):
        if step < warmup:
            return peak * step / warmup
        if step < total - decay:
            return peak
        progress = min(step - (total - decay), decay) / decay
        return end + (peak - end) * 0.5 * (1 + math.cos(math.pi * progress))

    for step in [0, 1, 5, 10, 11, 50, 84, 85, 86, 97, 109, 110, 500]:
        assert float(schedule(step)) == pytest.approx(expected(step), rel=1e-5, abs=1e-12)
    # 1.0 is the plain warmup + cosine, value for value.
    plain = make_schedule(**settings)
    full = make_schedule(**settings, decay_fraction=1.0)
    assert all(float(plain(t)) == float(full(t)) for t in range(0, 120, 7))
    for bad in (0.0, 1.5, -0.1):
        with pytest.raises(ValueError, match="decay_fraction must be in"):
            make_schedule(**settings, decay_fraction=bad)


def test_config_decay_fraction_reaches_the_trainer_schedule():
    config = base_config()
    config.train.num_steps = 100
    config.optimizer.warmup_steps = 0
    config.optimizer.learning_rate = 1e-3
    assert make_lr_fn(config)(51) < 0.6e-3  # the plain cosine is halfway down at step 51
    config.optimizer.decay_fraction = 0.2
    assert make_lr_fn(config)(51) == pytest.approx(1e-3)  # held at the peak until step 80
    # Step 100 runs the 100th update: the cosine over steps 80..100 at 19 of 20.
    last = 1e-3 * 0.5 * (1 + math.cos(math.pi * 19 / 20))
    assert make_lr_fn(config)(100) == pytest.approx(last, rel=1e-5)


def test_trainable_mask_modes():
    params = model_like_params()
    assert all(flat(trainable_mask(params, "full")).values())
    freeze_vision = flat(trainable_mask(params, "freeze_vision"))
    assert {p for p, t in freeze_vision.items() if not t} == {
        "vision/patch_embed/kernel",
        "vision/norm1/scale",
    }
    lora = flat(trainable_mask(params, "lora", also_trainable=("log_temperature",)))
    assert {p for p, t in lora.items() if t} == {
        "text/layers/attn/q/lora_a",
        "text/layers/mlp/up/lora_b",
        "log_temperature",
    }
    with pytest.raises(ValueError, match="unknown trainable mode 'lorra'"):
        trainable_mask(params, "lorra")


def optimizer(**overrides):
    settings = dict(
        learning_rate=1e-2,
        warmup_steps=0,
        total_steps=100,
        end_learning_rate=0.0,
        weight_decay=0.0,
        max_grad_norm=None,
    )
    return make_optimizer(**(settings | overrides))


@pytest.mark.slow
def test_train_step_changes_only_trainable_params_and_keeps_adam_state_for_them_alone():
    # The one freezing mechanism: the state split (lora: base weights and vision frozen).
    config = tiny_config(
        **{
            "model.lora_rank": 4,
            "model.lora_alpha": 8.0,
            "optimizer.trainable": "lora",
            "optimizer.warmup_steps": 0,
        }
    )
    setup = build(config)
    state, _ = setup.initial_state()
    batch = global_batch_from_host(next(ToyPairs(setup.model_config, batch_size=16)), setup.mesh)
    step = setup.lower(setup.abstract_state(), batch).compile()
    before = jax.device_get(state)  # the step donates the state's buffers
    for _ in range(2):
        state, metrics = step(state, batch)
    after = jax.device_get(state)

    assert {path.split("/")[-1] for path in flat(before.trainable)} == {"lora_a", "lora_b"}
    assert float(metrics["grad_norm"]) > 0
    for path, leaf in flat(before.frozen).items():
        np.testing.assert_array_equal(flat(after.frozen)[path], leaf, err_msg=path)
    # lora_b starts at zero, so after two steps every adapter has moved.
    for path, leaf in flat(before.trainable).items():
        assert np.any(flat(after.trainable)[path] != leaf), path
    adam_moments = optax.tree_utils.tree_get_all_with_path(after.opt_state, "mu")
    moment_size = sum(leaf.size for _, mu in adam_moments for leaf in jax.tree.leaves(mu))
    assert moment_size == sum(leaf.size for leaf in jax.tree.leaves(before.trainable))
    assert moment_size < sum(leaf.size for leaf in jax.tree.leaves(before.frozen)) / 10


def test_weight_decay_skips_norms_biases_and_scalars():
    params = model_like_params()
    assert {p for p, d in flat(decay_mask(params)).items() if d} == {
        "vision/patch_embed/kernel",
        "text/layers/attn/q/kernel",
        "text/layers/attn/q/lora_a",
        "text/layers/mlp/up/lora_b",
        "projection/kernel",
    }
    lr, weight_decay = 1e-2, 0.1
    tx = optimizer(learning_rate=lr, weight_decay=weight_decay)
    zero_grads = jax.tree.map(jnp.zeros_like, params)
    updates, _ = tx.update(zero_grads, tx.init(params), params)
    for path, update in flat(updates).items():
        if flat(decay_mask(params))[path]:
            expected = -lr * weight_decay * np.asarray(flat(params)[path])
            np.testing.assert_allclose(np.asarray(update), expected, rtol=1e-6, err_msg=path)
        else:
            np.testing.assert_array_equal(np.asarray(update), 0.0, err_msg=path)


def test_lr_multipliers_scale_each_group_and_first_match_wins():
    params = model_like_params()
    multipliers = {"lora": 10.0, "vision": 0.1, "temperature": 0.0, "lora_b": 123.0}
    labels = flat(param_labels(params, lr_multipliers=multipliers))
    assert labels["text/layers/mlp/up/lora_b"] == "lr group lora"
    assert labels["projection/kernel"] == "default"

    lr = 1e-2
    tx = optimizer(learning_rate=lr, lr_multipliers=multipliers)
    grads = jax.tree.map(
        lambda x: jnp.asarray(np.random.default_rng(1).normal(size=x.shape), x.dtype), params
    )
    updates, _ = tx.update(grads, tx.init(params), params)
    expected_multiplier = {
        "lr group lora": 10.0,
        "lr group vision": 0.1,
        "lr group temperature": 0.0,
        "default": 1.0,
    }
    for path, update in flat(updates).items():
        # The same leaf alone under plain Adam at the scaled learning rate.
        plain = optax.adam(lr * expected_multiplier[labels[path]])
        leaf, grad = flat(params)[path], flat(grads)[path]
        expected, _ = plain.update(grad, plain.init(leaf), leaf)
        np.testing.assert_allclose(
            np.asarray(update), np.asarray(expected), rtol=1e-6, err_msg=path
        )
    assert np.any(np.asarray(updates["projection"]["kernel"]) != 0)
    np.testing.assert_array_equal(np.asarray(updates["log_temperature"]), 0.0)


def test_clipping_scales_gradients_to_the_max_global_norm_before_adam():
    params = model_like_params()
    tx = optimizer(max_grad_norm=1.0)
    grads = jax.tree.map(lambda x: jnp.full(x.shape, 0.5, x.dtype), params)
    grads["vision"] = jax.tree.map(lambda x: jnp.full(x.shape, 3.0, x.dtype), grads["vision"])
    _, state = tx.update(grads, tx.init(params), params)

    norm = math.sqrt(sum(float(np.sum(np.asarray(g) ** 2)) for g in jax.tree.leaves(grads)))
    assert norm > 1.0
    ((_, mu),) = optax.tree_utils.tree_get_all_with_path(state, "mu")
    b1 = 0.9
    # After one step Adam's first moment is (1 - b1) times the clipped gradient.
    np.testing.assert_allclose(
        np.asarray(mu["projection"]["kernel"]), (1 - b1) * 0.5 / norm, rtol=1e-6
    )
    np.testing.assert_allclose(
        np.asarray(mu["vision"]["patch_embed"]["kernel"]), (1 - b1) * 3.0 / norm, rtol=1e-6
    )
