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

from jfe_jax.data.item_format import ItemFormat
from jfe_jax.models.axes import LOGICAL_RULES
from jfe_jax.models.config import ModelConfig
from jfe_jax.models.flops import train_step_flops
from jfe_jax.models.inputs import dummy_batch
from jfe_jax.models.padding import padding_counts, padding_fractions
from jfe_jax.paths import absolute, absolute_config_paths
from jfe_jax.progress import progress_bar
from jfe_jax.train import checkpoint as ckpt
from jfe_jax.train import mesh as mesh_lib
from jfe_jax.train.metrics import MetricWriter, accumulate, reduce_metrics
from jfe_jax.train.run_control import SUMMARY_FILE, TrainingInterrupted, lock_workdir
from jfe_jax.train.setup import (
    abstract_state,
    build_optimizer,
    encoder_options,
    initial_params,
    make_lr_fn,
    validate_config,
)
from jfe_jax.train.step import TrainState, jit_train_step, merge_params, split_params
from jfe_jax.train.topology import peak_flops

log = logging.getLogger(__name__)


class NonFiniteLossError(FloatingPointError):
    """The loss became NaN or infinite; the last good checkpoint is left as it was."""


# ============================================================================ config checks


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
    (root / ckpt.MODEL_CONFIG_FILE).write_text(
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
