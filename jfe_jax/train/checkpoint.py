"""Orbax checkpoints of a training run: train state, data-iterator state and config together.

Saves are asynchronous, the last ``keep`` are kept, and a save happens every ``every_steps``,
every ``every_seconds``, and when the process gets SIGTERM (TPU preemption notices arrive that
way). A resumed run restores the state into its shardings and the iterator to the next batch.
"""

from __future__ import annotations

import json
import logging
import os
import signal
import time
from typing import Any

import jax
import numpy as np
import orbax.checkpoint as ocp
from etils import epath
from jax.experimental import multihost_utils

log = logging.getLogger(__name__)

CHECKPOINT_DIR = "checkpoints"


def checkpoint_dir(workdir: str) -> str:
    return os.path.join(workdir, CHECKPOINT_DIR)


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
        self.preempted = False
        self.manager = ocp.CheckpointManager(
            self.directory,
            options=ocp.CheckpointManagerOptions(
                max_to_keep=keep,
                enable_async_checkpointing=asynchronous,
                create=True,
            ),
        )
        self._previous_handler = None

    # ------------------------------------------------------------------ triggers

    def install_sigterm_handler(self) -> None:
        """On SIGTERM, finish the current step, save, and stop (see ``should_save``)."""

        def handler(signum, frame):
            log.warning("SIGTERM received: saving a checkpoint after this step, then stopping")
            self.preempted = True

        self._previous_handler = signal.signal(signal.SIGTERM, handler)

    def should_save(self, step: int, *, last_step: bool) -> bool:
        """Whether to save after ``step``; on several hosts, the same answer on every host."""
        local = (
            last_step
            or self.preempted
            or (self.every_steps > 0 and step % self.every_steps == 0)
            or (time.monotonic() - self._last_save_time >= self.every_seconds)
        )
        if jax.process_count() > 1:
            # Orbax saves are collective and a SIGTERM or the timer may reach one host only:
            # agree, or one host saves while another steps on and both hang.
            flags = multihost_utils.process_allgather(np.array([local, self.preempted]))
            local, self.preempted = bool(flags[..., 0].any()), bool(flags[..., 1].any())
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
        self.manager.wait_until_finished()
        self.manager.close()
        if self._previous_handler is not None:
            signal.signal(signal.SIGTERM, self._previous_handler)


ITEM_HANDLERS = {
    "state": ocp.StandardCheckpointHandler,
    "data": ocp.JsonCheckpointHandler,
    "config": ocp.JsonCheckpointHandler,
}


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
    with _reader(directory) as manager:
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
