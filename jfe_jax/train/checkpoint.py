"""Orbax checkpoints of a training run: train state, data-iterator state and config together.

Saves are asynchronous, the last ``keep`` are kept, and a save happens every ``every_steps``,
every ``every_seconds``, and when the process gets SIGTERM (TPU preemption notices arrive that
way) or a first Ctrl-C. On several hosts the save decision needs no collective between log
steps (see ``Checkpointer.should_save``). A resumed run restores the state into its shardings
and the iterator to the next batch.
"""

from __future__ import annotations

import contextlib
import json
import logging
import signal
import sys
import threading
import time
from typing import Any

import jax
import numpy as np
import orbax.checkpoint as ocp
from etils import epath
from flax import traverse_util
from jax.experimental import multihost_utils

from jfe_jax.errors import CheckpointReadError
from jfe_jax.models.config import ModelConfig
from jfe_jax.paths import absolute
from jfe_jax.workdir import MODEL_CONFIG_FILE, RUN_CONFIG_FILE, Workdir

log = logging.getLogger(__name__)


def checkpoint_dir(workdir: str) -> str:
    """``<workdir>/checkpoints``, absolute (Orbax refuses relative paths)."""
    return Workdir(absolute(workdir)).checkpoints


def latest_step(workdir: str) -> int | None:
    """The newest finished checkpoint step in ``workdir``, or None."""
    directory = checkpoint_dir(workdir)
    if not epath.Path(directory).is_dir():
        return None
    with _reader(directory) as manager:
        return manager.latest_step()


class Checkpointer:
    """Owns the CheckpointManager and the save triggers of one run."""

    def __init__(
        self,
        workdir: str,
        *,
        every_steps: int,
        every_seconds: float,
        keep: int,
        asynchronous: bool,
    ):
        self.directory = checkpoint_dir(workdir)
        self.every_steps = every_steps
        self.every_seconds = every_seconds
        self._last_save_time = time.monotonic()
        self.stop_requested = False  # SIGTERM or a first Ctrl-C: save after this step and stop
        self.stopping = False  # stop_requested as should_save saw it (agreed between hosts)
        # On several hosts JAX's preemption service (started by jax.distributed.initialize)
        # owns SIGTERM: every host learns of a notice and stops at the same step.
        self.preemption_service = (
            jax.process_count() > 1 and jax.config.jax_enable_preemption_service
        )
        self.manager = ocp.CheckpointManager(
            self.directory,
            options=ocp.CheckpointManagerOptions(
                max_to_keep=keep,
                enable_async_checkpointing=asynchronous,
                create=True,
            ),
        )
        self._previous_handlers: dict[int, Any] = {}

    # ------------------------------------------------------------------ triggers

    def install_stop_handlers(self) -> None:
        """SIGTERM and a first Ctrl-C set ``stop_requested``: the trainer finishes the current
        step, saves and stops (see ``should_save``); a second Ctrl-C raises KeyboardInterrupt.
        ``close`` puts the previous handlers back. Only the main thread can take signals.

        Where JAX's preemption service runs (several hosts), SIGTERM is left to it: a Python
        handler would replace the one it installed, and no host would hear of the notice."""
        if threading.current_thread() is not threading.main_thread():
            log.debug("not in the main thread: SIGTERM and Ctrl-C keep their handlers")
            return
        when = "at the next log step" if jax.process_count() > 1 else "after this step"

        def handler(signum, frame):
            if signum == signal.SIGINT and self.stop_requested:
                raise KeyboardInterrupt
            log.warning(
                "%s received: saving a checkpoint %s, then stopping%s",
                signal.Signals(signum).name,
                when,
                " (Ctrl-C again to abort at once)" if signum == signal.SIGINT else "",
            )
            self.stop_requested = True

        signals = (signal.SIGINT,) if self.preemption_service else (signal.SIGTERM, signal.SIGINT)
        for signum in signals:
            if signum == signal.SIGINT and signal.getsignal(signum) == signal.SIG_IGN:
                continue  # e.g. a background job of a shell: Ctrl-C is not for it
            self._previous_handlers[signum] = signal.signal(signum, handler)

    def should_save(self, step: int, *, last_step: bool, log_step: bool = True) -> bool:
        """Whether to save after ``step``; on several hosts, the same answer on every host.

        Also sets ``stopping``: whether the run stops after this step (and so saves it). A
        signal arriving after this call counts for a later step.

        One host acts on every trigger at once. Several hosts must agree (Orbax saves are
        collective: one host saving while another steps on hangs both), and do so without a
        collective between log steps: a save by step count is decided alike on every host; a
        preemption notice (SIGTERM) through JAX's preemption sync point, which every host
        reaches at the same step (a local read, called at every step as it requires); the
        timer and a Ctrl-C (or SIGTERM, without the preemption service) by one allgather at
        log steps (``log_step``) only, so they take effect at the next log step.
        """
        by_count = last_step or (self.every_steps > 0 and step % self.every_steps == 0)
        timer = time.monotonic() - self._last_save_time >= self.every_seconds
        stop = self.stop_requested  # read once, so the save and the stop agree
        if jax.process_count() > 1:
            preempted = self.preemption_service and multihost_utils.reached_preemption_sync_point(
                step
            )
            if log_step:
                flags = multihost_utils.process_allgather(np.array([timer, stop]))
                timer, stop = bool(flags[..., 0].any()), bool(flags[..., 1].any())
            else:
                timer = stop = False
            stop = stop or preempted
        self.stopping = stop
        self.stop_requested = self.stop_requested or stop
        return by_count or stop or timer

    # ------------------------------------------------------------------ save / restore

    def save(self, step: int, state: Any, *, data_state: dict, config: dict) -> None:
        self.manager.save(
            step,
            args=ocp.args.Composite(
                state=ocp.args.StandardSave(state),
                data=ocp.args.JsonSave(data_state),
                config=ocp.args.JsonSave(config),
            ),
            force=True,
        )
        self._last_save_time = time.monotonic()

    def latest_step(self) -> int | None:
        return self.manager.latest_step()

    def restore(self, step: int, abstract_state: Any) -> tuple[Any, dict]:
        """(state placed as ``abstract_state``'s shardings, data-iterator state)."""
        with _explain_read_errors(self.directory, step):
            restored = self.manager.restore(
                step,
                args=ocp.args.Composite(
                    state=ocp.args.StandardRestore(abstract_state),
                    data=ocp.args.JsonRestore(),
                ),
            )
        return restored["state"], restored["data"]

    def wait(self) -> None:
        self.manager.wait_until_finished()

    def close(self) -> None:
        """Waits for the last save, then puts back the signal handlers found at install."""
        try:
            self.manager.wait_until_finished()
            self.manager.close()
        finally:
            for signum, previous in self._previous_handlers.items():
                # None: a handler not installed from Python; the default is the closest.
                signal.signal(signum, signal.SIG_DFL if previous is None else previous)
            self._previous_handlers.clear()


# How readers open each item. The state is written by StandardCheckpointHandler, which is a
# PyTreeCheckpointHandler on disk; reading it with the latter allows a partial restore (the
# params without the optimizer state).
ITEM_HANDLERS = {
    "state": ocp.PyTreeCheckpointHandler,
    "data": ocp.JsonCheckpointHandler,
    "config": ocp.JsonCheckpointHandler,
}


def _is_closed_loop_noise(error: BaseException | None, origin: Any = None) -> bool:
    """Whether ``error`` is a report of a checkpoint read abandoned after the restore failed:
    "Event loop is closed" anywhere in its chain, or an Orbax read coroutine's own error."""
    code = getattr(origin, "cr_code", None)
    if code is not None and "orbax" in code.co_filename:
        return True
    seen = set()
    while error is not None and id(error) not in seen:
        seen.add(id(error))
        if isinstance(error, RuntimeError) and str(error) == "Event loop is closed":
            return True
        error = error.__cause__ or error.__context__
    return False


def _quiet_closed_loop_reports() -> None:
    """When a restore fails, the TensorStore reads still in flight are abandoned: Orbax's
    read coroutines are garbage-collected unfinished ("Exception ignored in: <coroutine
    _read_array_index_and_device_put>", through ``sys.unraisablehook``) and their threads
    report "Event loop is closed" (through ``sys.excepthook`` or ``threading.excepthook``),
    each with a traceback below the one error line. Drop exactly those reports; any other
    goes to the previous hook."""
    previous = sys.excepthook
    if not getattr(previous, "jfe_quiet", False):

        def hook(kind, value, traceback):
            if _is_closed_loop_noise(value):
                return
            previous(kind, value, traceback)

        hook.jfe_quiet = True
        sys.excepthook = hook
    previous_unraisable = sys.unraisablehook
    if not getattr(previous_unraisable, "jfe_quiet", False):

        def unraisable_hook(report):
            if _is_closed_loop_noise(report.exc_value, report.object):
                return
            previous_unraisable(report)

        unraisable_hook.jfe_quiet = True
        sys.unraisablehook = unraisable_hook
    previous_thread = threading.excepthook
    if not getattr(previous_thread, "jfe_quiet", False):

        def thread_hook(report):
            if _is_closed_loop_noise(report.exc_value):
                return
            previous_thread(report)

        thread_hook.jfe_quiet = True
        threading.excepthook = thread_hook


@contextlib.contextmanager
def _explain_read_errors(directory: str, step: int):
    """Any failure to read checkpoint ``step`` becomes one CheckpointReadError naming it.

    Orbax and TensorStore report a truncated file as a bare Exception with a page of
    TensorStore spec (or "Event loop is closed"); the innermost cause is the useful line.
    """
    # Before the read: TensorStore threads report the loop closed while the error unwinds.
    _quiet_closed_loop_reports()
    try:
        yield
    except CheckpointReadError:
        raise
    except Exception as e:
        cause = e
        while cause.__cause__ is not None:
            cause = cause.__cause__
        detail = (str(cause).strip().splitlines() or [type(cause).__name__])[0][:300]
        raise CheckpointReadError(
            f"checkpoint {directory}/{step} cannot be read ({detail}); it is truncated or "
            f"corrupt: restore it from a copy, or delete {directory}/{step} to use the "
            "previous one"
        ) from e


def _reader(directory: str) -> ocp.CheckpointManager:
    return ocp.CheckpointManager(
        directory, item_handlers={name: cls() for name, cls in ITEM_HANDLERS.items()}
    )


def _step_or_latest(workdir: str, step: int | None) -> int:
    step = latest_step(workdir) if step is None else step
    if step is None:
        raise ValueError(
            f"{workdir} holds no finished training checkpoint (expected "
            f"{checkpoint_dir(workdir)}/<step>); train stage 1 there first or point init_from at "
            "a Hugging Face directory"
        )
    return step


def _saved_params(directory: str, step: int) -> dict[tuple[str, ...], Any]:
    """``(subtree, *path) -> array metadata`` of the params in a checkpoint's state, subtree
    being 'trainable' or 'frozen'; read from the metadata only."""
    with _reader(directory) as manager, _explain_read_errors(directory, step):
        state = manager.item_metadata(step)["state"]
    state = getattr(state, "tree", state)
    flat = {}
    for subtree in ("trainable", "frozen"):
        for path, value in traverse_util.flatten_dict(dict(state.get(subtree) or {})).items():
            flat[(subtree, *path)] = value
    return flat


def param_shapes(
    workdir: str, step: int | None = None
) -> tuple[dict[tuple[str, ...], jax.ShapeDtypeStruct], int]:
    """``({path: ShapeDtypeStruct}, step)``: every param (trainable and frozen) of a workdir's
    checkpoint (default the latest), from its metadata; no array is read."""
    step = _step_or_latest(workdir, step)
    saved = _saved_params(checkpoint_dir(workdir), step)
    return {key[1:]: jax.ShapeDtypeStruct(m.shape, m.dtype) for key, m in saved.items()}, step


def restore_params(
    workdir: str, step: int | None = None, *, sharding: Any = None, abstract_params: Any = None
) -> tuple[dict[str, Any], int]:
    """``(params, step)``: the params (trainable and frozen merged) of a training workdir's
    checkpoint (default the latest), whatever mesh the run used.

    Only the params are read, never the optimizer state, and each straight into its place:
    every device reads its own slices. Where they go:

    - ``abstract_params``: a nested dict of ``jax.ShapeDtypeStruct`` with shardings (the
      model's): exactly these params are read, cast to their dtypes; checkpoint params it
      lacks are skipped (a partial restore).
    - else ``sharding``: one ``Sharding`` for every param (default: whole, on the first local
      device), or a nested dict of them over the param paths; every param of the checkpoint is
      read in its saved dtype.

    Used to start stage 2 from stage 1 and by ``Encoder.from_workdir`` (eval, export, search).

    Raises:
      ValueError: the workdir holds no finished checkpoint, ``abstract_params`` names a param
        the checkpoint lacks or shapes it differently, or ``sharding`` has no place for one.
    """
    directory = checkpoint_dir(workdir)
    step = _step_or_latest(workdir, step)
    saved = _saved_params(directory, step)
    where = {key[1:]: key[0] for key in saved}  # path -> 'trainable' or 'frozen'
    targets: dict[tuple[str, ...], jax.ShapeDtypeStruct] = {}
    if abstract_params is not None:
        for path, target in traverse_util.flatten_dict(dict(abstract_params)).items():
            if path not in where:
                raise ValueError(f"{directory}/{step} has no parameter {'/'.join(path)}")
            shape = tuple(saved[(where[path], *path)].shape)
            if shape != tuple(target.shape):
                raise ValueError(
                    f"{directory}/{step} holds parameter {'/'.join(path)} with shape {shape}, "
                    f"expected {tuple(target.shape)}"
                )
            targets[path] = target
    else:
        sharding = sharding or jax.sharding.SingleDeviceSharding(jax.local_devices()[0])
        per_path = None
        if not isinstance(sharding, jax.sharding.Sharding):
            per_path = traverse_util.flatten_dict(dict(sharding))
        for path, subtree in where.items():
            leaf_sharding = sharding if per_path is None else per_path.get(path)
            if leaf_sharding is None:
                raise ValueError(
                    f"{directory}/{step} holds parameter {'/'.join(path)}, which sharding has "
                    "no place for (a model built with other options?)"
                )
            m = saved[(subtree, *path)]
            targets[path] = jax.ShapeDtypeStruct(m.shape, m.dtype, sharding=leaf_sharding)
    item: dict[str, Any] = {}
    for path, target in targets.items():
        item.setdefault(where[path], {})[path] = target
    item = {subtree: traverse_util.unflatten_dict(flat) for subtree, flat in item.items()}
    with _reader(directory) as manager, _explain_read_errors(directory, step):
        restored = manager.restore(
            step,
            args=ocp.args.Composite(
                state=ocp.args.PyTreeRestore(
                    item=item,
                    restore_args=ocp.checkpoint_utils.construct_restore_args(item),
                    partial_restore=True,  # the params only: no optimizer state, no step
                )
            ),
        )
    state = restored["state"]
    from jfe_jax.train.step import merge_params

    return merge_params(state.get("trainable", {}), state.get("frozen", {})), step


def read_run_config(workdir: str) -> dict:
    """The config a workdir was trained with (``config.json`` written at start)."""
    path = epath.Path(Workdir(workdir).run_config)
    if not path.is_file():
        raise ValueError(f"{workdir} has no {RUN_CONFIG_FILE}: not a jfe-jax training workdir")
    return json.loads(path.read_text())


def load_model_config(workdir: str) -> ModelConfig:
    path = epath.Path(Workdir(workdir).model_config)
    if not path.is_file():
        raise ValueError(f"{workdir} has no {MODEL_CONFIG_FILE}: not a jfe-jax training workdir")
    return ModelConfig.from_hf_dict(json.loads(path.read_text()))
