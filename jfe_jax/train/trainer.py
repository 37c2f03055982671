"""The training loop of both JFE stages: ``train(config, workdir)``.

Checks and setup (``setup.build``: model, mesh, optimizer, abstract state and the jitted step,
the same as ``jfe aot`` compiles), then, holding the workdir, ``_train_locked`` runs the
sections in order, one function each: run record -> state (restore order: this workdir's
latest checkpoint, then ``model.init_from``, then random) -> compile (memory logged) -> loop
with metrics, checkpoints and preemption handling -> end (``train_summary.json``).
"""

from __future__ import annotations

import json
import logging
import platform
import time
from typing import Any

import jax
import ml_collections
import optax
from etils import epath

from jfe_jax.data.item_format import ItemFormat
from jfe_jax.models.batches import LateFusionBatch, text_rows
from jfe_jax.models.config import ModelConfig
from jfe_jax.models.padding import padding_fractions
from jfe_jax.paths import absolute, absolute_config_paths
from jfe_jax.progress import progress_bar
from jfe_jax.train import checkpoint as ckpt
from jfe_jax.train import mesh as mesh_lib
from jfe_jax.train.accounting import batch_counts
from jfe_jax.train.metrics import (
    MetricWriter,
    WindowSummary,
    first_non_finite,
    read_window,
    window_add,
)
from jfe_jax.train.run_control import TrainingInterrupted, lock_workdir
from jfe_jax.train.setup import TrainSetup, build, make_lr_fn, validate_config
from jfe_jax.train.topology import peak_flops
from jfe_jax.workdir import Workdir

log = logging.getLogger(__name__)


class NonFiniteLossError(FloatingPointError):
    """The loss became NaN or infinite; the last good checkpoint is left as it was."""


# ============================================================================ run record


def write_run_record(
    workdir: str,
    config: ml_collections.ConfigDict,
    model_config: ModelConfig,
    mesh,
    item_format: ItemFormat | None = None,
) -> None:
    """config.json, model_config.json, jfe_item_format.json (``item_format``, what the model is
    fed, default ``ItemFormat.from_train_config``: read back by ``embedder_for`` and ``jfe
    convert``) and run_info.json (versions, devices, mesh)."""
    if jax.process_index() != 0:
        return
    paths = Workdir(workdir)
    epath.Path(workdir).mkdir(parents=True, exist_ok=True)
    epath.Path(paths.run_config).write_text(config.to_json_best_effort(indent=2, sort_keys=True))
    if item_format is None:
        item_format = ItemFormat.from_train_config(config, model_config.vision)
    item_format.save(workdir)
    epath.Path(paths.model_config).write_text(
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
    epath.Path(paths.run_info).write_text(json.dumps(info, indent=2))


def _record_run(config, workdir, setup: TrainSetup) -> ItemFormat:
    """Writes the run record and logs the mesh; returns what every item becomes (saved in the
    record and fed by the data pipeline)."""
    model_config, mesh = setup.model_config, setup.mesh
    item_format = ItemFormat.from_train_config(config, model_config.vision)
    write_run_record(workdir, config, model_config, mesh, item_format)
    log.info(
        "mesh: %s over %d devices (%s) in %d processes",
        " x ".join(f"{name}={size}" for name, size in mesh.shape.items()),
        mesh.devices.size,
        mesh.devices.flat[0].device_kind,
        jax.process_count(),
    )
    return item_format


# ============================================================================ train


def train(config: ml_collections.ConfigDict, workdir: str, *, data=None) -> dict[str, Any]:
    """Runs (or resumes) training to ``train.num_steps``; returns the final metrics.

    ``data`` overrides the pipeline built from ``config.data`` (tests): an iterator of host
    ``TrainBatch``es with ``get_state()`` / ``set_state(dict)``.

    Raises:
      TrainingInterrupted: SIGTERM or a first Ctrl-C stopped the run; its checkpoint is saved.
      ValueError: a config that cannot work, or a workdir another trainer is using.
    """
    # ---------------------------------------------------------------- setup and checks
    workdir, config = absolute(workdir), absolute_config_paths(config)
    if config.train.distributed:
        jax.distributed.initialize()
    validate_config(config)  # before anything is built or written
    setup = build(config)  # model, mesh, optimizer, abstract state and the jitted step
    with lock_workdir(workdir):
        return _train_locked(config, workdir, setup, data)


def _train_locked(config, workdir, setup: TrainSetup, data) -> dict[str, Any]:
    """``train`` once this run holds the workdir: the sections of the module docstring in
    order."""
    item_format = _record_run(config, workdir, setup)
    checkpointer = ckpt.Checkpointer(
        workdir,
        every_steps=config.train.checkpoint_every_steps,
        every_seconds=config.train.checkpoint_every_seconds,
        keep=config.train.keep_checkpoints,
        asynchronous=config.train.async_checkpointing,
    )
    if data is None:
        from jfe_jax.train.data import make_train_data

        data = make_train_data(config, workdir, setup.model_config, item_format)
    state = _restore_or_init(setup, checkpointer, data)
    compiled_for = _step_compiler(setup)
    peak, peak_source = peak_flops()  # the loop's MFU
    start_step, total_steps = int(jax.device_get(state.step)), config.train.num_steps
    if start_step >= total_steps:
        checkpointer.close()
        return _nothing_to_train(workdir, start_step, total_steps)
    final, stopped_at = _run_steps(
        config, workdir, setup, data, state, checkpointer, compiled_for, start_step, peak
    )
    return _end_of_run(workdir, final, stopped_at, total_steps, peak_source, checkpointer)


# ============================================================================ state


def _restore_or_init(setup: TrainSetup, checkpointer: ckpt.Checkpointer, data) -> Any:
    """The state to start from: this workdir's latest checkpoint (``data`` set to its place
    in the stream), else ``setup.initial_state`` (``model.init_from``, then random)."""
    resume_step = checkpointer.latest_step()
    if resume_step is not None:
        state, data_state = checkpointer.restore(resume_step, setup.abstract_state())
        data.set_state(data_state)
        log.info("resumed from %s at step %d", checkpointer.directory, resume_step)
        origin = f"resumed at step {resume_step}"
    else:
        state, origin = setup.initial_state()
    log.info("initial weights: %s", origin)
    return state


# ============================================================================ compile


def _step_compiler(setup: TrainSetup):
    """``compiled_for(batch)``: the step compiled for the batch's shapes, once per shape (from
    shapes, as ``jfe aot`` compiles it), its memory logged."""
    compiled: dict[str, Any] = {}

    def compiled_for(batch):
        key = str(jax.tree_util.tree_map(lambda x: (x.shape, x.dtype), batch))
        if key not in compiled:
            compiled[key] = setup.lower(setup.abstract_state(), batch).compile()
            memory = compiled[key].memory_analysis()
            if memory is not None:
                log.info(
                    "compiled step for %s: arguments %.1f MiB, temporaries %.1f MiB, "
                    "outputs %.1f MiB per device",
                    {name: _side_shape(side) for name, side in batch.named_sides().items()},
                    memory.argument_size_in_bytes / 2**20,
                    memory.temp_size_in_bytes / 2**20,
                    memory.output_size_in_bytes / 2**20,
                )
        return compiled[key]

    return compiled_for


def _side_shape(side: Any) -> Any:
    if isinstance(side, LateFusionBatch):
        return {
            name: None if part is None else _side_shape(part)
            for name, part in (("text", side.text), ("image", side.image))
        }
    return text_rows(side).input_ids.shape


# ============================================================================ loop


def _run_steps(
    config, workdir, setup: TrainSetup, data, state, checkpointer, compiled_for, start_step, peak
) -> tuple[dict[str, Any], int | None]:
    """Steps ``start_step + 1`` to ``train.num_steps``: metrics at log steps, checkpoints, and
    a stop after a saved checkpoint on SIGTERM / Ctrl-C. Returns (the last log step's metrics,
    the step the run stopped after or None); the checkpointer is closed either way."""
    total_steps, model_config, mesh = config.train.num_steps, setup.model_config, setup.mesh
    writer = MetricWriter(workdir, enabled=jax.process_index() == 0)
    checkpointer.install_stop_handlers()
    schedule_lr = make_lr_fn(config)

    # Between log steps nothing comes back to the host: each step's metrics and batch counts
    # are added into the log window on the device, read back at log steps and before saves.
    @jax.jit
    def add_to_window(window, metrics, batch):
        return window_add(window, metrics, batch_counts(model_config, batch))

    window, window_first_step, window_start = None, start_step + 1, time.perf_counter()
    last_good = start_step or None  # the newest checkpoint of this run: none before step 1
    stopped_at = None  # the step after which SIGTERM / Ctrl-C stopped the run
    warned_zero_grad = False
    final: dict[str, Any] = {"step": start_step}
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
            batch = mesh_lib.global_batch_from_host(next(data), mesh)
            state, metrics = compiled_for(batch)(state, batch)
            window = add_to_window(window, metrics, batch)
            last_step = step == total_steps
            log_step = step % config.train.log_every == 0 or last_step
            # Sets .stopping too; on several hosts it talks to the others at log steps only.
            save = checkpointer.should_save(step, last_step=last_step, log_step=log_step)
            if log_step or checkpointer.stopping:
                summary = read_window(window)
                _raise_if_non_finite(
                    summary.first_non_finite, window_first_step, last_good, checkpointer
                )
                scalars = _window_scalars(
                    summary,
                    seconds=time.perf_counter() - window_start,
                    learning_rate=schedule_lr(step),
                    examples=summary.steps * config.data.global_batch_size,
                    peak=peak,
                )
                warned_zero_grad = _report(step, scalars, writer, bar, warned_zero_grad)
                final = dict(scalars, step=step)
                window, window_first_step, window_start = None, step + 1, time.perf_counter()
            elif save:  # no non-finite loss may reach a checkpoint
                _raise_if_non_finite(
                    first_non_finite(window), window_first_step, last_good, checkpointer
                )
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
    return final, stopped_at


def _raise_if_non_finite(
    bad: tuple[int, float] | None, window_first_step: int, last_good: int | None, checkpointer
) -> None:
    """``bad``: (index in the log window, loss) of its first non-finite loss, or None."""
    if bad is None:
        return
    index, loss = bad
    bad_step = window_first_step + index
    raise NonFiniteLossError(
        f"loss is {loss} at step {bad_step}; stopping. The last good checkpoint "
        f"is step {last_good} in {checkpointer.directory}"
        if last_good is not None
        else f"loss is {loss} at step {bad_step}; stopping before any checkpoint was saved"
    )


def _window_scalars(
    summary: WindowSummary, *, seconds: float, learning_rate: float, examples: int, peak: float
) -> dict[str, float]:
    """What a log line holds: the window's metric means, the learning rate, throughput over
    the window's ``seconds`` and the padding shares (``padding_fractions``)."""
    counts = summary.counts
    scalars = dict(summary.scalars)
    scalars.update(
        learning_rate=learning_rate,
        examples_per_second=examples / seconds,
        tokens_per_second=counts["tokens_seen"] / seconds,
        flops_per_second=counts["step_flops"] / seconds,
        mfu=counts["step_flops"] / seconds / peak,
    )
    scalars.update(padding_fractions(counts))
    return scalars


def _report(step: int, scalars: dict[str, float], writer, bar, warned_zero_grad: bool) -> bool:
    """A log step's output: the metrics file, the progress bar's figures, and (once a run) a
    warning when the gradient norm was exactly 0 throughout. Returns whether it has warned."""
    writer.write(step, scalars)
    bar.set_postfix(
        loss=f"{scalars['loss']:.3f}",
        acc=f"{scalars['accuracy']:.2f}",
        ex_s=f"{scalars['examples_per_second']:.1f}",
        mfu=f"{scalars['mfu']:.1%}",
    )
    if scalars.get("grad_norm") == 0.0 and not warned_zero_grad:
        log.warning(
            "the gradient norm was exactly 0 at every step of the log window ending "
            "at step %d: nothing is training (every parameter frozen?)",
            step,
        )
        return True
    return warned_zero_grad


# ============================================================================ end


def _end_of_run(
    workdir: str,
    final: dict[str, Any],
    stopped_at: int | None,
    total_steps: int,
    peak_source: str,
    checkpointer,
) -> dict[str, Any]:
    """Writes ``train_summary.json`` (``final`` with the totals) and returns it; a run that
    ``stopped_at`` a step raises TrainingInterrupted instead."""
    final.update(
        peak_flops_source=peak_source, total_steps=total_steps, completed=stopped_at is None
    )
    if jax.process_index() == 0:
        epath.Path(Workdir(workdir).train_summary).write_text(json.dumps(final, indent=2))
    if stopped_at is not None:  # after the checkpoint is closed: rerunning resumes from it
        raise TrainingInterrupted(stopped_at, total_steps, checkpointer.directory)
    return final


def _nothing_to_train(workdir: str, step: int, total_steps: int) -> dict[str, Any]:
    """A rerun of a finished run: says so and returns the summary of the run that got there
    (written anew only where it is missing)."""
    log.info(
        "nothing to train: %s already holds step %d (train.num_steps is %d); "
        "the summary below is that of the run that reached it",
        workdir,
        step,
        total_steps,
    )
    path = epath.Path(Workdir(workdir).train_summary)
    if path.is_file():
        return json.loads(path.read_text())
    summary = {"step": step, "total_steps": total_steps, "completed": step == total_steps}
    if jax.process_index() == 0:
        path.write_text(json.dumps(summary, indent=2))
    return summary
