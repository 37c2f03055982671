"""Orbax checkpoints of a training run: train state, data-iterator state and config together.

Saves are asynchronous, the last ``keep`` are kept, and a save happens every ``every_steps``,
every ``every_seconds``, and when the process gets SIGTERM (TPU preemption notices arrive that
way) or a first Ctrl-C. A resumed run restores the state into its shardings and the iterator to
the next batch.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import signal
import sys
import threading
import time
from typing import Any

import jax
import numpy as np
import orbax.checkpoint as ocp
from etils import epath
from jax.experimental import multihost_utils

from jfe_jax.errors import CheckpointReadError
from jfe_jax.models.config import ModelConfig
from jfe_jax.paths import absolute

log = logging.getLogger(__name__)

CHECKPOINT_DIR = "checkpoints"


def checkpoint_dir(workdir: str) -> str:
    """``<workdir>/checkpoints``, absolute (Orbax refuses relative paths)."""
    return os.path.join(absolute(workdir), CHECKPOINT_DIR)


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
        ``close`` puts the previous handlers back. Only the main thread can take signals."""
        if threading.current_thread() is not threading.main_thread():
            log.debug("not in the main thread: SIGTERM and Ctrl-C keep their handlers")
            return

        def handler(signum, frame):
            if signum == signal.SIGINT and self.stop_requested:
                raise KeyboardInterrupt
            log.warning(
                "%s received: saving a checkpoint after this step, then stopping%s",
                signal.Signals(signum).name,
                " (Ctrl-C again to abort at once)" if signum == signal.SIGINT else "",
            )
            self.stop_requested = True

        for signum in (signal.SIGTERM, signal.SIGINT):
            if signum == signal.SIGINT and signal.getsignal(signum) == signal.SIG_IGN:
                continue  # e.g. a background job of a shell: Ctrl-C is not for it
            self._previous_handlers[signum] = signal.signal(signum, handler)

    def should_save(self, step: int, *, last_step: bool) -> bool:
        """Whether to save after ``step``; on several hosts, the same answer on every host.

        Also sets ``stopping``: whether the run stops after this step (and so saves it). A
        signal arriving after this call counts for the next step.
        """
        stop = self.stop_requested  # read once, so the save and the stop agree
        local = (
            last_step
            or stop
            or (self.every_steps > 0 and step % self.every_steps == 0)
            or (time.monotonic() - self._last_save_time >= self.every_seconds)
        )
        if jax.process_count() > 1:
            # Orbax saves are collective and a SIGTERM or the timer may reach one host only:
            # agree, or one host saves while another steps on and both hang.
            flags = multihost_utils.process_allgather(np.array([local, stop]))
            local, stop = bool(flags[..., 0].any()), bool(flags[..., 1].any())
        self.stopping = stop
        self.stop_requested = self.stop_requested or stop
        return local

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


ITEM_HANDLERS = {
    "state": ocp.StandardCheckpointHandler,
    "data": ocp.JsonCheckpointHandler,
    "config": ocp.JsonCheckpointHandler,
}


def _quiet_closed_loop_reports() -> None:
    """After a failed restore, TensorStore reads still in flight report "Event loop is closed"
    from their own threads (through ``sys.excepthook``), one traceback each; drop those."""
    previous = sys.excepthook
    if getattr(previous, "jfe_quiet", False):
        return

    def hook(kind, value, traceback):
        if kind is RuntimeError and str(value) == "Event loop is closed":
            return
        previous(kind, value, traceback)

    hook.jfe_quiet = True
    sys.excepthook = hook


@contextlib.contextmanager
def _explain_read_errors(directory: str, step: int):
    """Any failure to read checkpoint ``step`` becomes one CheckpointReadError naming it.

    Orbax and TensorStore report a truncated file as a bare Exception with a page of
    TensorStore spec (or "Event loop is closed"); the innermost cause is the useful line.
    """
    try:
        yield
    except CheckpointReadError:
        raise
    except Exception as e:
        _quiet_closed_loop_reports()
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


def restore_params(workdir: str, step: int | None = None, *, sharding=None):
    """Params (trainable and frozen merged) of a training workdir's checkpoint.

    Restores onto ``sharding`` (default: the first local device), whatever mesh the run used;
    used to start stage 2 from stage 1 and by ``Encoder.from_pretrained(workdir)``.

    Raises:
      ValueError: when the workdir holds no finished checkpoint.
    """
    directory = checkpoint_dir(workdir)
    step = latest_step(workdir) if step is None else step
    if step is None:
        raise ValueError(
            f"{workdir} holds no finished training checkpoint (expected {directory}/<step>); "
            "train stage 1 there first or point init_from at a Hugging Face directory"
        )
    sharding = sharding or jax.sharding.SingleDeviceSharding(jax.local_devices()[0])
    with _reader(directory) as manager, _explain_read_errors(directory, step):
        metadata = manager.item_metadata(step)["state"]
        abstract = jax.tree_util.tree_map(
            lambda m: jax.ShapeDtypeStruct(m.shape, m.dtype, sharding=sharding), metadata
        )
        restored = manager.restore(
            step, args=ocp.args.Composite(state=ocp.args.StandardRestore(abstract))
        )
    state = restored["state"]
    from jfe_jax.train.step import merge_params

    return merge_params(state["trainable"], state["frozen"]), step


def read_run_config(workdir: str) -> dict:
    """The config a workdir was trained with (``config.json`` written at start)."""
    path = epath.Path(workdir) / "config.json"
    if not path.is_file():
        raise ValueError(f"{workdir} has no config.json: not a jfe-jax training workdir")
    return json.loads(path.read_text())


MODEL_CONFIG_FILE = "model_config.json"  # the architecture, in Hugging Face config format


def load_model_config(workdir: str) -> ModelConfig:
    path = epath.Path(workdir) / MODEL_CONFIG_FILE
    if not path.is_file():
        raise ValueError(f"{workdir} has no {MODEL_CONFIG_FILE}: not a jfe-jax training workdir")
    return ModelConfig.from_hf_dict(json.loads(path.read_text()))
