"""From a training config to everything a step needs, without running one.

config -> model options and architecture (``model_config_for``), checks (``validate_config``),
optimizer and trainable mask (``build_optimizer``), the abstract train state and its shardings
(``abstract_state``), initial parameters in their shards (``initial_params``). ``train()`` and
``jfe aot`` both build their step from here, so the compiled program is the same by construction.
"""

from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
from etils import epath
from flax import traverse_util

from jfe_jax.models.axes import LOGICAL_RULES
from jfe_jax.models.config import ModelConfig
from jfe_jax.models.hf_io import load_hf_params
from jfe_jax.models.inputs import dummy_batch
from jfe_jax.models.one_tower import EncoderOptions
from jfe_jax.models.sizes import get_size
from jfe_jax.train import checkpoint as ckpt
from jfe_jax.train import mesh as mesh_lib
from jfe_jax.train.optimizer import make_optimizer, make_schedule, trainable_mask
from jfe_jax.train.step import TrainState, split_params


def encoder_options(config: ml_collections.ConfigDict) -> EncoderOptions:
    m = config.model
    return EncoderOptions(
        dtype=m.dtype,
        param_dtype=m.param_dtype,
        scan_layers=m.scan_layers,
        remat=m.remat,
        lora_rank=m.lora_rank,
        lora_alpha=m.lora_alpha,
        lora_targets=tuple(m.lora_targets),
        projection_dim=m.projection_dim,
        temperature=m.temperature,
    )


def init_source(config: ml_collections.ConfigDict) -> str:
    """'hf', 'workdir' or 'scratch': where the initial weights come from."""
    path = config.model.init_from
    if not path:
        if config.stage == "stage2":
            raise ValueError(
                "stage 2 needs model.init_from: a stage-1 workdir (or a Hugging Face directory)"
            )
        return "scratch"
    if not epath.Path(path).is_dir():
        raise ValueError(f"model.init_from={path!r} is not a directory")
    if (epath.Path(path) / "config.json").is_file() and not epath.Path(
        ckpt.checkpoint_dir(path)
    ).is_dir():
        return "hf"
    if ckpt.latest_step(path) is None:
        raise ValueError(
            f"model.init_from={path!r} has no stage-1 checkpoint (no finished step under "
            f"{ckpt.checkpoint_dir(path)}) and is not a Hugging Face directory"
        )
    return "workdir"


def model_config_for(config: ml_collections.ConfigDict) -> ModelConfig:
    source = init_source(config)
    if source == "hf":
        return ModelConfig.from_pretrained(config.model.init_from)
    if source == "workdir":
        return ckpt.load_model_config(config.model.init_from)
    return get_size(config.model.size)


def validate_config(config: ml_collections.ConfigDict) -> tuple[ModelConfig, jax.sharding.Mesh]:
    """Everything that can be checked before compiling; ValueError names the field."""
    if config.stage not in ("stage1", "stage2"):
        raise ValueError(f"stage must be 'stage1' or 'stage2', got {config.stage!r}")
    if config.data.kind not in ("pairs", "mbeir"):
        raise ValueError(f"data.kind must be 'pairs' or 'mbeir', got {config.data.kind!r}")
    if config.train.num_steps < 1:
        raise ValueError(f"train.num_steps must be >= 1, got {config.train.num_steps}")
    if config.train.keep_checkpoints < 1:
        raise ValueError(
            f"train.keep_checkpoints must be >= 1, got {config.train.keep_checkpoints}: the run "
            "would leave no checkpoint to resume from or export"
        )
    if not config.optimizer.learning_rate > 0:
        raise ValueError(
            f"optimizer.learning_rate must be > 0, got {config.optimizer.learning_rate}"
        )
    if config.optimizer.trainable == "lora" and config.model.lora_rank < 1:
        raise ValueError(
            f"optimizer.trainable='lora' needs model.lora_rank >= 1, got "
            f"{config.model.lora_rank}: without adapters nothing would train"
        )
    if not 0 <= config.optimizer.warmup_steps < config.train.num_steps:
        raise ValueError(
            f"optimizer.warmup_steps={config.optimizer.warmup_steps} must be in "
            f"[0, train.num_steps={config.train.num_steps})"
        )
    model_config = model_config_for(config)
    mesh = mesh_lib.make_mesh(dict(config.mesh))
    mesh_lib.check_batch_divisible(config.data.global_batch_size, mesh)
    chunk = config.train.grad_cache_chunk
    if chunk and config.data.global_batch_size % chunk:
        raise ValueError(
            f"train.grad_cache_chunk={chunk} does not divide data.global_batch_size="
            f"{config.data.global_batch_size}"
        )
    if config.data.global_batch_size % jax.process_count():
        raise ValueError(
            f"data.global_batch_size={config.data.global_batch_size} is not divisible by the "
            f"{jax.process_count()} hosts"
        )
    if config.data.pack:
        if chunk:
            raise ValueError(
                f"data.pack with train.grad_cache_chunk={chunk}: gradient caching chunks every "
                "batch leaf along axis 0, which splits a packed side's rows from its items; "
                "set train.grad_cache_chunk=0 or data.pack=False"
            )
        if config.model.fusion != "early":
            raise ValueError(
                f"data.pack packs early-fusion items only, got model.fusion={config.model.fusion!r}"
            )
        if config.data.pack_items_per_row < 1:
            raise ValueError(
                f"data.pack_items_per_row must be >= 1, got {config.data.pack_items_per_row}"
            )
        pack_length = config.data.pack_length or max(config.data.length_buckets)
        if pack_length < config.data.max_length:
            raise ValueError(
                f"data.pack_length={pack_length} is shorter than data.max_length="
                f"{config.data.max_length}: an item of max_length tokens would not fit in a row"
            )
    return model_config, mesh


def abstract_state(module, optimizer, mask, mesh):
    """(abstract TrainState, its shardings) without allocating anything."""
    batch = dummy_batch(module.config)
    boxed = jax.eval_shape(lambda: module.init(jax.random.key(0), batch))["params"]
    param_shardings = mesh_lib.logical_shardings(boxed, mesh, LOGICAL_RULES)
    params = nn.meta.unbox(boxed)
    trainable, frozen = split_params(params, mask)
    t_shard, f_shard = split_params(param_shardings, mask)
    opt_state = jax.eval_shape(optimizer.init, trainable)
    replicated = mesh_lib.replicated_sharding(mesh)
    opt_shardings = optax.tree_map_params(
        optimizer,
        lambda _, sharding: sharding,
        opt_state,
        t_shard,
        transform_non_params=lambda _: replicated,
        is_leaf=lambda x: isinstance(x, jax.sharding.Sharding),
    )
    shapes = TrainState(
        step=jax.ShapeDtypeStruct((), jnp.int32),
        trainable=trainable,
        frozen=frozen,
        opt_state=opt_state,
    )
    shardings = TrainState(
        step=replicated, trainable=t_shard, frozen=f_shard, opt_state=opt_shardings
    )
    return shapes, shardings


def _place(host_tree, shardings):
    """Host numpy arrays -> global arrays in ``shardings`` (each host reads its slices)."""

    def place(x, sharding):
        x = np.asarray(x)
        return jax.make_array_from_callback(x.shape, sharding, lambda index: x[index])

    return jax.tree_util.tree_map(place, host_tree, shardings)


def initial_params(config, module, model_config, mesh, param_shardings):
    """Random params in their shards, then the init_from weights placed over them."""
    batch = dummy_batch(model_config)

    def init(rng):
        return nn.meta.unbox(module.init(rng, batch)["params"])

    with jax.set_mesh(mesh):
        params = jax.jit(init, out_shardings=param_shardings)(jax.random.key(config.seed))
    source = init_source(config)
    if source == "scratch":
        return params, "random init of size " + config.model.size
    if source == "hf":
        loaded = load_hf_params(
            config.model.init_from,
            model_config,
            scan_layers=module.scan_layers,
            dtype=module.param_dtype,
        )
        what = "Hugging Face weights from " + config.model.init_from
    else:
        loaded, step = ckpt.restore_params(config.model.init_from)
        loaded = jax.device_get(loaded)
        what = f"stage-1 checkpoint step {step} of {config.model.init_from}"
    flat = traverse_util.flatten_dict(params)
    flat_loaded = traverse_util.flatten_dict(loaded)
    flat_shardings = traverse_util.flatten_dict(param_shardings)
    for key, value in flat_loaded.items():
        if key not in flat:
            if key[-1] in ("lora_a", "lora_b"):
                continue  # adapters of a previous stage are merged away only on export
            raise ValueError(f"init_from has a parameter {'/'.join(key)} this model does not")
        if tuple(value.shape) != tuple(flat[key].shape):
            raise ValueError(
                f"init_from parameter {'/'.join(key)} has shape {value.shape}, the model "
                f"expects {flat[key].shape} (different model options?)"
            )
        flat[key] = _place(value.astype(flat[key].dtype), flat_shardings[key])
    return traverse_util.unflatten_dict(flat), what


def build_optimizer(config: ml_collections.ConfigDict, abstract_params: Any) -> tuple[Any, Any]:
    """``(optimizer, trainable mask)`` of a config: what ``train`` (and ``jfe aot``) use."""
    also = ("logit_scale",) if config.model.learn_temperature else ()
    also += ("projection",) if config.model.projection_dim else ()
    mask = trainable_mask(abstract_params, config.optimizer.trainable, also_trainable=also)
    if not config.model.learn_temperature:
        flat_mask = traverse_util.flatten_dict(mask)
        flat_mask[("logit_scale",)] = False
        mask = traverse_util.unflatten_dict(flat_mask)
    optimizer = make_optimizer(
        learning_rate=config.optimizer.learning_rate,
        warmup_steps=config.optimizer.warmup_steps,
        total_steps=config.train.num_steps,
        end_learning_rate=config.optimizer.end_learning_rate,
        weight_decay=config.optimizer.weight_decay,
        max_grad_norm=config.optimizer.max_grad_norm or None,
        b1=config.optimizer.b1,
        b2=config.optimizer.b2,
        eps=config.optimizer.eps,
        lr_multipliers=dict(config.optimizer.lr_multipliers),
    )
    return optimizer, mask


def make_lr_fn(config):
    schedule = make_schedule(
        peak_learning_rate=config.optimizer.learning_rate,
        warmup_steps=config.optimizer.warmup_steps,
        total_steps=config.train.num_steps,
        end_learning_rate=config.optimizer.end_learning_rate,
    )
    # The optimizer's count is the number of updates already applied when step `step` runs.
    return lambda step: float(schedule(step - 1))
