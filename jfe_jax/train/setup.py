"""From a training config to everything a step needs, without running one.

``build(config, mesh=...)`` is the one builder: checks (``config_checks.check_config``), model
options and architecture (``encoder_options``, ``model_config_for``), optimizer and trainable
mask (``build_optimizer``), the abstract train state and its shardings, and the jitted step
(``step.jit_train_step``), in a ``TrainSetup``. ``train()`` builds it on its devices and
``jfe aot`` on a TPU slice's, so the program aot compiles is the one the trainer runs. The
trainer's step 0 comes from ``TrainSetup.initial_state`` (``initial_params``: the init_from
weights, or random, in their shards).
"""

from __future__ import annotations

import dataclasses
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import optax
from etils import epath
from flax import traverse_util

from jfe_jax.data.batch_layout import BatchLayout
from jfe_jax.data.item_format import ItemFormat
from jfe_jax.models.axes import LOGICAL_RULES
from jfe_jax.models.config import HF_CONFIG_FILE, ModelConfig
from jfe_jax.models.hf_io import backbone_shapes, load_hf_params
from jfe_jax.models.inputs import dummy_batch
from jfe_jax.models.one_tower import EncoderOptions, _dtype
from jfe_jax.models.sizes import get_size
from jfe_jax.train import checkpoint as ckpt
from jfe_jax.train import mesh as mesh_lib
from jfe_jax.train.config_checks import check_config
from jfe_jax.train.optimizer import make_optimizer, make_schedule, trainable_mask
from jfe_jax.train.step import TrainState, jit_train_step, merge_params, split_params
from jfe_jax.workdir import is_workdir


def encoder_options(config: ml_collections.ConfigDict) -> EncoderOptions:
    """The encoder options of a training config (``EncoderOptions.from_config``)."""
    return EncoderOptions.from_config(config.model)


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
    if not is_workdir(path) and (epath.Path(path) / HF_CONFIG_FILE).is_file():
        return "hf"
    if ckpt.latest_step(path) is None:
        raise ValueError(
            f"model.init_from={path!r} has no stage-1 checkpoint (no finished step under "
            f"{ckpt.checkpoint_dir(path)}) and is not a Hugging Face directory"
        )
    return "workdir"


def model_config_for(config: ml_collections.ConfigDict) -> ModelConfig:
    """The architecture: ``model.init_from``'s when set, else the named ``model.size`` (also
    for a stage-2 config without init_from, which only ``validate_config`` refuses)."""
    if not config.model.init_from:
        return get_size(config.model.size)
    source = init_source(config)
    if source == "hf":
        return ModelConfig.from_pretrained(config.model.init_from)
    if source == "workdir":
        return ckpt.load_model_config(config.model.init_from)
    return get_size(config.model.size)


def validate_config(config: ml_collections.ConfigDict) -> None:
    """Everything ``train`` can check before it builds or writes anything: the config's fields,
    where its weights come from (stage 2 needs ``model.init_from``) and its batch against the
    mesh of this runtime's devices. ValueError names the field."""
    check_config(config, mesh_lib.make_mesh(dict(config.mesh)))
    init_source(config)
    # The item format's own checks (pixel limits, budgets), as the data pipeline builds it.
    ItemFormat.from_train_config(config, model_config_for(config).vision)


def pack_chunk_items(config: ml_collections.ConfigDict, hosts: int | None = None) -> int:
    """Items per gradient-cache chunk on one of ``hosts`` hosts (default: this runtime's) when
    the config packs (``ContrastiveBatcher(pack_chunk_items=)``), else 0."""
    chunk = config.train.grad_cache_chunk
    if not (config.data.pack and chunk):
        return 0
    return chunk // (jax.process_count() if hosts is None else hosts)


def batch_layout(
    config: ml_collections.ConfigDict, local_shards: int, hosts: int | None = None
) -> BatchLayout:
    """How the trainer lays a side's items into rows: ``config.data``'s packing options, rows
    (text and vision) rounded to the ``local_shards`` batch shards this host's devices hold,
    gradient-cache chunks split over ``hosts`` (default: this runtime's); ``pack_length`` 0
    is the largest length bucket (one shape per side)."""
    d = config.data
    return BatchLayout(
        pack_items_per_row=d.pack_items_per_row,
        pack_length=d.pack_length or max(d.length_buckets),
        row_multiple=local_shards if d.pack or d.pack_vision else 1,
        pack_vision=d.pack_vision,
        pack_vision_blocks=tuple(d.pack_vision_blocks),
        pack_vision_row_fraction=d.pack_vision_row_fraction,
        chunk_items=pack_chunk_items(config, hosts),
    )


@dataclasses.dataclass(frozen=True, eq=False)
class TrainSetup:
    """What ``build`` makes of a config: the train step and everything it is built from."""

    config: ml_collections.ConfigDict
    model_config: ModelConfig
    module: nn.Module  # the OneTowerEncoder with the config's options
    mesh: jax.sharding.Mesh
    optimizer: optax.GradientTransformation  # sees the trainable params only
    mask: Any  # bool tree shaped like the params: True where they train
    state_shapes: TrainState  # of ShapeDtypeStructs
    state_shardings: TrainState  # of NamedShardings
    step: Any  # step.jit_train_step: (state, batch) -> (state, metrics), the state donated

    @property
    def param_shardings(self) -> Any:
        """The shardings of the whole (merged) param tree."""
        return merge_params(self.state_shardings.trainable, self.state_shardings.frozen)

    def abstract_state(self) -> TrainState:
        """The train state as ShapeDtypeStructs in their shardings (what a checkpoint restores
        into, what ``lower`` compiles for)."""
        return jax.tree_util.tree_map(
            lambda s, sharding: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=sharding),
            self.state_shapes,
            self.state_shardings,
        )

    def lower(self, state: TrainState, batch: Any) -> jax.stages.Lowered:
        """The step lowered for ``state`` and ``batch`` (arrays or ShapeDtypeStructs): under the
        mesh and the logical axis rules, so the model's activation sharding constraints apply."""
        with jax.set_mesh(self.mesh), nn.logical_axis_rules(LOGICAL_RULES):
            return self.step.lower(state, batch)

    def random_params(self, seed: int) -> Any:
        """Random params made directly in their shards (no host holds a whole parameter)."""
        batch = dummy_batch(self.model_config)

        def init(rng):
            return nn.meta.unbox(self.module.init(rng, batch)["params"])

        with jax.set_mesh(self.mesh):
            return jax.jit(init, out_shardings=self.param_shardings)(jax.random.key(seed))

    def new_state(self, params: Any) -> TrainState:
        """Step 0 of training ``params`` (placed in ``param_shardings``): split by the mask,
        the optimizer state initialised in its shardings."""
        trainable, frozen = split_params(params, self.mask)
        with jax.set_mesh(self.mesh):
            opt_state = jax.jit(self.optimizer.init, out_shardings=self.state_shardings.opt_state)(
                trainable
            )
        return TrainState(
            step=jax.device_put(jnp.zeros((), jnp.int32), self.state_shardings.step),
            trainable=trainable,
            frozen=frozen,
            opt_state=opt_state,
        )

    def initial_state(self) -> tuple[TrainState, str]:
        """``(step-0 state, where its weights come from)``: ``model.init_from``'s weights, or
        random ones, in their shards (``initial_params``)."""
        params, origin = initial_params(
            self.config, self.module, self.model_config, self.mesh, self.param_shardings
        )
        return self.new_state(params), origin


def build(
    config: ml_collections.ConfigDict, *, mesh: jax.sharding.Mesh | None = None
) -> TrainSetup:
    """The ``TrainSetup`` of ``config`` on ``mesh`` (default: the config's mesh over this
    runtime's devices), after ``check_config``. Nothing is allocated: params and optimizer state
    are abstract until ``initial_state`` (or a checkpoint restore) makes them."""
    mesh = mesh_lib.make_mesh(dict(config.mesh)) if mesh is None else mesh
    check_config(config, mesh)
    model_config = model_config_for(config)
    module = encoder_options(config).module(model_config)
    batch = dummy_batch(model_config)
    boxed = jax.eval_shape(lambda: module.init(jax.random.key(0), batch))["params"]
    params = nn.meta.unbox(boxed)
    optimizer, mask = build_optimizer(config, params)
    param_shardings = mesh_lib.logical_shardings(boxed, mesh, LOGICAL_RULES)
    shapes, shardings = _state_layout(optimizer, mask, params, param_shardings, mesh)
    return TrainSetup(
        config=config,
        model_config=model_config,
        module=module,
        mesh=mesh,
        optimizer=optimizer,
        mask=mask,
        state_shapes=shapes,
        state_shardings=shardings,
        step=jit_train_step(module, optimizer, config, shardings, mesh),
    )


def _state_layout(optimizer, mask, params, param_shardings, mesh) -> tuple[TrainState, TrainState]:
    """(the TrainState of abstract ``params``, its shardings): Adam's moments sharded as their
    params, the step and the optimizer's counters replicated."""
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


def initial_params(config, module, model_config, mesh, param_shardings):
    """``(params, description)``: the initial params in their shards (``param_shardings``).

    The init_from weights (a Hugging Face directory or a stage-1 workdir) are read straight
    into their shards, each device reading its own slices, one tensor at a time: neither the
    host nor a device ever holds the whole model. The params the source lacks (the head, new
    LoRA adapters; everything when training from scratch) are initialised at random.
    Shapes are checked against the source's metadata before anything is read.
    """
    batch = dummy_batch(model_config)
    source = init_source(config)
    init_from = config.model.init_from
    abstract = jax.eval_shape(
        lambda: nn.meta.unbox(module.init(jax.random.key(0), batch)["params"])
    )
    flat_abstract = traverse_util.flatten_dict(abstract)
    flat_shardings = traverse_util.flatten_dict(param_shardings)
    source_shapes, step = {}, None
    if source == "hf":
        source_shapes = backbone_shapes(model_config, scan_layers=module.options.scan_layers)
    elif source == "workdir":
        saved, step = ckpt.param_shapes(init_from)
        source_shapes = {key: value.shape for key, value in saved.items()}
    loaded_keys = set()
    for key, shape in source_shapes.items():
        if key not in flat_abstract:
            if key[-1] in ("lora_a", "lora_b"):
                continue  # adapters of a previous stage are merged away only on export
            raise ValueError(f"init_from has a parameter {'/'.join(key)} this model does not")
        if tuple(shape) != tuple(flat_abstract[key].shape):
            raise ValueError(
                f"init_from parameter {'/'.join(key)} has shape {tuple(shape)}, the model "
                f"expects {flat_abstract[key].shape} (different model options?)"
            )
        loaded_keys.add(key)

    def random_part(tree):
        flat = traverse_util.flatten_dict(tree)
        return traverse_util.unflatten_dict({k: v for k, v in flat.items() if k not in loaded_keys})

    def init(rng):
        # The loaded params are dead code to XLA here: never computed, never allocated.
        return random_part(nn.meta.unbox(module.init(rng, batch)["params"]))

    with jax.set_mesh(mesh):
        random = jax.jit(init, out_shardings=random_part(param_shardings))(
            jax.random.key(config.seed)
        )
    if source == "scratch":
        return random, "random init of size " + config.model.size
    if source == "hf":
        loaded = load_hf_params(
            init_from,
            model_config,
            scan_layers=module.options.scan_layers,
            dtype=_dtype(module.options.param_dtype),
            shardings=param_shardings,
        )
        what = "Hugging Face weights from " + init_from
    else:
        targets = {
            key: jax.ShapeDtypeStruct(
                flat_abstract[key].shape, flat_abstract[key].dtype, sharding=flat_shardings[key]
            )
            for key in loaded_keys
        }
        loaded, step = ckpt.restore_params(
            init_from, step, abstract_params=traverse_util.unflatten_dict(targets)
        )
        what = f"stage-1 checkpoint step {step} of {init_from}"
    flat = traverse_util.flatten_dict(random)
    for key, value in traverse_util.flatten_dict(loaded).items():
        if value.dtype != flat_abstract[key].dtype:
            value = value.astype(flat_abstract[key].dtype)  # elementwise: keeps the sharding
        flat[key] = value
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
        decay_fraction=config.optimizer.decay_fraction,
    )
    return optimizer, mask


def make_lr_fn(config):
    schedule = make_schedule(
        peak_learning_rate=config.optimizer.learning_rate,
        warmup_steps=config.optimizer.warmup_steps,
        total_steps=config.train.num_steps,
        end_learning_rate=config.optimizer.end_learning_rate,
        decay_fraction=config.optimizer.decay_fraction,
    )
    # The optimizer's count is the number of updates already applied when step `step` runs.
    return lambda step: float(schedule(step - 1))
