"""The training loop of both JFE stages: ``train(config, workdir)``.

One linear function in sections: run record -> model and tokenizer -> mesh and shardings ->
state (restore order: this workdir's latest checkpoint, then ``model.init_from``, then random)
-> compile (memory logged) -> loop with metrics, checkpoints and preemption handling.
"""

from __future__ import annotations

import json
import logging
import math
import platform
import time
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
from etils import epath
from flax import traverse_util

from jfe_jax.data.item_format import ItemFormat
from jfe_jax.encoder import EncoderOptions, dummy_batch
from jfe_jax.models.axes import LOGICAL_RULES
from jfe_jax.models.config import ModelConfig
from jfe_jax.models.hf_io import load_hf_params
from jfe_jax.models.padding import padding_counts
from jfe_jax.models.sizes import get_size
from jfe_jax.paths import absolute, absolute_config_paths
from jfe_jax.progress import progress_bar
from jfe_jax.train import checkpoint as ckpt
from jfe_jax.train import mesh as mesh_lib
from jfe_jax.train.metrics import MetricWriter, peak_flops, reduce_metrics, train_step_flops
from jfe_jax.train.optimizer import make_optimizer, make_schedule, trainable_mask
from jfe_jax.train.run_control import SUMMARY_FILE, TrainingInterrupted, lock_workdir
from jfe_jax.train.step import TrainState, jit_train_step, merge_params, split_params

log = logging.getLogger(__name__)

MODEL_CONFIG_FILE = "model_config.json"  # the architecture, in Hugging Face config format


class NonFiniteLossError(FloatingPointError):
    """The loss became NaN or infinite; the last good checkpoint is left as it was."""


# ============================================================================ config checks


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
        return load_model_config(config.model.init_from)
    return get_size(config.model.size)


def load_model_config(workdir: str) -> ModelConfig:
    path = epath.Path(workdir) / MODEL_CONFIG_FILE
    if not path.is_file():
        raise ValueError(f"{workdir} has no {MODEL_CONFIG_FILE}: not a jfe-jax training workdir")
    return ModelConfig.from_hf_dict(json.loads(path.read_text()))


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


# ============================================================================ run record


def write_run_record(
    workdir: str, config: ml_collections.ConfigDict, model_config: ModelConfig, mesh
) -> None:
    """config.json, model_config.json, jfe_item_format.json (what the model is fed: read back
    by ``embedder_for`` and ``jfe convert``) and run_info.json (versions, devices, mesh)."""
    if jax.process_index() != 0:
        return
    root = epath.Path(workdir)
    root.mkdir(parents=True, exist_ok=True)
    (root / "config.json").write_text(config.to_json_best_effort(indent=2, sort_keys=True))
    ItemFormat.from_train_config(config, model_config.vision).save(workdir)
    (root / MODEL_CONFIG_FILE).write_text(
        json.dumps(model_config.to_hf_dict(), indent=2, sort_keys=True)
    )
    import flax
    import orbax.checkpoint

    info = {
        "started": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "versions": {
            "python": platform.python_version(),
            "jax": jax.__version__,
            "flax": flax.__version__,
            "optax": optax.__version__,
            "orbax-checkpoint": orbax.checkpoint.__version__,
        },
        "devices": {
            "count": jax.device_count(),
            "kind": jax.devices()[0].device_kind,
            "platform": jax.devices()[0].platform,
            "processes": jax.process_count(),
        },
        "mesh": {k: int(v) for k, v in mesh.shape.items()},
    }
    (root / "run_info.json").write_text(json.dumps(info, indent=2))


# ============================================================================ state


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


# ============================================================================ train


def train(config: ml_collections.ConfigDict, workdir: str, *, data=None) -> dict[str, Any]:
    """Runs (or resumes) training to ``train.num_steps``; returns the final metrics.

    ``data`` overrides the pipeline built from ``config.data`` (tests): an iterator of host
    batches with ``get_state()`` / ``set_state(dict)``.

    Raises:
      TrainingInterrupted: SIGTERM or a first Ctrl-C stopped the run; its checkpoint is saved.
      ValueError: a config that cannot work, or a workdir another trainer is using.
    """
    # ---------------------------------------------------------------- setup and checks
    workdir, config = absolute(workdir), absolute_config_paths(config)
    if config.train.distributed:
        jax.distributed.initialize()
    model_config, mesh = validate_config(config)
    with lock_workdir(workdir):
        return _train_locked(config, workdir, model_config, mesh, data)


def _train_locked(config, workdir, model_config, mesh, data) -> dict[str, Any]:
    """``train`` once this run holds the workdir."""
    write_run_record(workdir, config, model_config, mesh)
    log.info(
        "mesh: %s over %d devices (%s) in %d processes",
        " x ".join(f"{name}={size}" for name, size in mesh.shape.items()),
        mesh.devices.size,
        mesh.devices.flat[0].device_kind,
        jax.process_count(),
    )
    options = encoder_options(config)
    module = options.module(model_config)

    # ---------------------------------------------------------------- optimizer and state
    abstract_params = nn.meta.unbox(
        jax.eval_shape(lambda: module.init(jax.random.key(0), dummy_batch(model_config)))["params"]
    )
    total_steps = config.train.num_steps
    optimizer, mask = build_optimizer(config, abstract_params)
    shapes, shardings = abstract_state(module, optimizer, mask, mesh)
    checkpointer = ckpt.Checkpointer(
        workdir,
        every_steps=config.train.checkpoint_every_steps,
        every_seconds=config.train.checkpoint_every_seconds,
        keep=config.train.keep_checkpoints,
        asynchronous=config.train.async_checkpointing,
    )
    if data is None:
        from jfe_jax.train.data import make_train_data

        data = make_train_data(config, workdir, model_config)

    resume_step = checkpointer.latest_step()
    if resume_step is not None:
        abstract = jax.tree_util.tree_map(
            lambda s, sh: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=sh), shapes, shardings
        )
        state, data_state = checkpointer.restore(resume_step, abstract)
        data.set_state(data_state)
        log.info("resumed from %s at step %d", checkpointer.directory, resume_step)
        origin = f"resumed at step {resume_step}"
    else:
        param_shardings = merge_params(shardings.trainable, shardings.frozen)
        params, origin = initial_params(config, module, model_config, mesh, param_shardings)
        trainable, frozen = split_params(params, mask)
        with jax.set_mesh(mesh):
            opt_state = jax.jit(optimizer.init, out_shardings=shardings.opt_state)(trainable)
        state = TrainState(
            step=jax.device_put(jnp.zeros((), jnp.int32), shardings.step),
            trainable=trainable,
            frozen=frozen,
            opt_state=opt_state,
        )
    log.info("initial weights: %s", origin)

    # ---------------------------------------------------------------- compile
    jitted = jit_train_step(module, optimizer, config, shardings, mesh)
    compiled: dict[Any, Any] = {}
    peak, peak_source = peak_flops()

    def compiled_for(batch):
        key = jax.tree_util.tree_map(lambda x: (x.shape, x.dtype), batch)
        key = str(key)
        if key not in compiled:
            with jax.set_mesh(mesh), nn.logical_axis_rules(LOGICAL_RULES):
                lowered = jitted.lower(state, batch)
                compiled[key] = lowered.compile()
            memory = compiled[key].memory_analysis()
            if memory is not None:
                log.info(
                    "compiled step for %s: arguments %.1f MiB, temporaries %.1f MiB, "
                    "outputs %.1f MiB per device",
                    {k: _side_shape(v) for k, v in batch.items() if isinstance(v, dict)},
                    memory.argument_size_in_bytes / 2**20,
                    memory.temp_size_in_bytes / 2**20,
                    memory.output_size_in_bytes / 2**20,
                )
        return compiled[key]

    # ---------------------------------------------------------------- loop
    writer = MetricWriter(workdir, enabled=jax.process_index() == 0)
    checkpointer.install_stop_handlers()
    schedule_lr = make_lr_fn(config)
    start_step = int(jax.device_get(state.step))
    last_good = resume_step
    stopped_at = None  # the step after which SIGTERM / Ctrl-C stopped the run
    warned_zero_grad = False
    final: dict[str, Any] = {"step": start_step}
    pending: list[tuple[int, Any]] = []
    window_start, window_examples, window_tokens, window_flops = time.perf_counter(), 0, 0, 0.0
    window_padding: dict[str, int] = {}
    bar = progress_bar(
        total=total_steps,
        initial=start_step,
        desc=f"{config.stage}",
        unit="step",
        disable=jax.process_index() != 0,
        dynamic_ncols=True,
    )
    try:
        for step in range(start_step + 1, total_steps + 1):
            host_batch = next(data)
            batch = mesh_lib.global_batch_from_host(host_batch, mesh)
            state, metrics = compiled_for(batch)(state, batch)
            window_examples += config.data.global_batch_size
            window_tokens += (
                sum(_side_tokens(v) for v in host_batch.values() if isinstance(v, dict))
                * jax.process_count()
            )
            window_flops += train_step_flops(model_config, host_batch) * jax.process_count()
            for name, value in padding_counts(host_batch, model_config).items():
                window_padding[name] = window_padding.get(name, 0) + value
            # The loss is read back only to log or save: meanwhile the host prepares the next
            # batch while the device runs this step.
            pending.append((step, metrics))
            last_step = step == total_steps
            save = checkpointer.should_save(step, last_step=last_step)  # sets .stopping too
            log_now = step % config.train.log_every == 0 or last_step or checkpointer.stopping
            if log_now or save:
                bad = _first_non_finite_loss(pending)
                if bad is not None:
                    bad_step, loss = bad
                    raise NonFiniteLossError(
                        f"loss is {loss} at step {bad_step}; stopping. The last good checkpoint "
                        f"is step {last_good} in {checkpointer.directory}"
                        if last_good is not None
                        else f"loss is {loss} at step {bad_step}; stopping before any checkpoint "
                        "was saved"
                    )
            if log_now:
                elapsed = time.perf_counter() - window_start
                scalars = reduce_metrics(accumulate(jax.device_get([m for _, m in pending])))
                scalars.update(
                    learning_rate=schedule_lr(step),
                    examples_per_second=window_examples / elapsed,
                    tokens_per_second=window_tokens / elapsed,
                    flops_per_second=window_flops / elapsed,
                    mfu=window_flops / elapsed / peak,
                )
                scalars.update(padding_fractions(window_padding))
                writer.write(step, scalars)
                bar.set_postfix(
                    loss=f"{scalars['loss']:.3f}",
                    acc=f"{scalars['accuracy']:.2f}",
                    ex_s=f"{scalars['examples_per_second']:.1f}",
                    mfu=f"{scalars['mfu']:.1%}",
                )
                final = dict(scalars, step=step)
                if scalars.get("grad_norm") == 0.0 and not warned_zero_grad:
                    log.warning(
                        "the gradient norm was exactly 0 at every step of the log window ending "
                        "at step %d: nothing is training (every parameter frozen?)",
                        step,
                    )
                    warned_zero_grad = True
                pending.clear()
                window_start, window_examples, window_tokens, window_flops = (
                    time.perf_counter(),
                    0,
                    0,
                    0.0,
                )
                window_padding = {}
            if save:
                checkpointer.save(step, state, data_state=data.get_state(), config=config.to_dict())
                last_good = step
            bar.update(1)
            if checkpointer.stopping and not last_step:
                log.warning("stopping after step %d of %d (checkpoint saved)", step, total_steps)
                stopped_at = step
                break
    finally:
        bar.close()
        checkpointer.close()
        writer.close()
    final.update(
        peak_flops_source=peak_source, total_steps=total_steps, completed=stopped_at is None
    )
    if jax.process_index() == 0:
        (epath.Path(workdir) / SUMMARY_FILE).write_text(json.dumps(final, indent=2))
    if stopped_at is not None:  # after the checkpoint is closed: rerunning resumes from it
        raise TrainingInterrupted(stopped_at, total_steps, checkpointer.directory)
    return final


def _first_non_finite_loss(pending: list[tuple[int, Any]]) -> tuple[int, float] | None:
    """``(step, loss)`` of the first of the pending steps whose loss is not finite, or None."""
    losses = jax.device_get([metrics["loss"] for _, metrics in pending])
    for (step, _), (total, count) in zip(pending, losses):
        loss = float(total / count)
        if not math.isfinite(loss):
            return step, loss
    return None


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


def padding_fractions(counts: dict[str, int]) -> dict[str, float]:
    """Padding shares logged with the metrics (see ``jfe_jax.models.padding``): of the token
    positions, of the image-patch positions, and of the forward model FLOPs."""
    out = {}
    for name, total, real in (
        ("token_padding", "tokens", "real_tokens"),
        ("patch_padding", "patches", "real_patches"),
        ("flops_padding", "flops", "real_flops"),
    ):
        if counts.get(total):
            out[name] = 1.0 - counts[real] / counts[total]
    return out


def _side_shape(side: dict[str, Any]) -> Any:
    if "has_text" in side:
        return {part: side[part]["input_ids"].shape for part in ("text", "image")}
    return side["input_ids"].shape


def _side_tokens(side: dict[str, Any]) -> int:
    """Real (unpadded) tokens of one side; late fusion counts only the parts present."""
    if "has_text" in side:
        return sum(
            int(np.sum(np.asarray(side[part]["attention_mask"]) * side[mask][:, None]))
            for part, mask in (("text", "has_text"), ("image", "has_image"))
        )
    return int(np.sum(side["attention_mask"]))


def accumulate(metrics: list[dict[str, Any]]) -> dict[str, Any]:
    """Adds (sum, count) pairs over steps; plain scalars are averaged."""
    out: dict[str, Any] = {}
    for name, value in metrics[0].items():
        if isinstance(value, tuple):
            out[name] = tuple(
                sum(np.asarray(m[name][i], np.float64) for m in metrics) for i in (0, 1)
            )
        else:
            out[name] = float(np.mean([np.asarray(m[name], np.float64) for m in metrics]))
    return out


def make_lr_fn(config):
    schedule = make_schedule(
        peak_learning_rate=config.optimizer.learning_rate,
        warmup_steps=config.optimizer.warmup_steps,
        total_steps=config.train.num_steps,
        end_learning_rate=config.optimizer.end_learning_rate,
    )
    # The optimizer's count is the number of updates already applied when step `step` runs.
    return lambda step: float(schedule(step - 1))
