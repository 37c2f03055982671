"""Step metrics: the log window they are added into on the device, how (sum, count) pairs are
reduced, and where metrics are written (TensorBoard event files and ``metrics.jsonl``). Model
FLOPs live in ``jfe_jax.models.flops``, device peaks in ``jfe_jax.train.topology``, the batch
counts added with the metrics in ``jfe_jax.train.accounting``.
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Mapping
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from etils import epath

from jfe_jax.workdir import Workdir


class MetricWriter:
    """Writes scalars to TensorBoard event files and to ``metrics.jsonl`` in the workdir.

    The workdir may be local or a ``gs://`` path. Object stores cannot append, so the jsonl is
    rewritten whole at each write (a few thousand short lines over a run).
    """

    def __init__(self, workdir: str, *, enabled: bool = True):
        self.enabled = enabled
        self._tb = None
        self._path = epath.Path(Workdir(workdir).metrics)
        self._lines: list[str] = []
        if enabled:
            epath.Path(workdir).mkdir(parents=True, exist_ok=True)
            if self._path.exists():  # a resumed run continues the same file
                self._lines = self._path.read_text().splitlines(keepends=True)
            from tensorboardX import SummaryWriter

            self._tb = SummaryWriter(Workdir(workdir).tensorboard)

    def write(self, step: int, scalars: Mapping[str, float]) -> None:
        if not self.enabled:
            return
        clean = {k: float(v) for k, v in scalars.items()}
        for name, value in clean.items():
            self._tb.add_scalar(name, value, step)
        self._lines.append(json.dumps({"step": step, **clean}) + "\n")
        self._path.write_text("".join(self._lines))
        self._tb.flush()

    def close(self) -> None:
        if self.enabled:
            self._tb.close()


def reduce_metrics(metrics: Mapping[str, Any]) -> dict[str, float]:
    """(sum, count) pairs -> means; plain scalars as they are."""
    out = {}
    for name, value in metrics.items():
        if isinstance(value, tuple):
            total, count = (np.asarray(v, dtype=np.float64) for v in value)
            out[name] = float(total / max(count, 1.0))
        else:
            out[name] = float(np.asarray(value))
    return out


# ---------------------------------------------------------------------------- log window
# Between log steps the metrics stay on the device: each step is added into a window by a small
# jitted update, and the host reads the window back once per log step (or before a save).


def window_add(
    window: dict[str, Any] | None, metrics: Mapping[str, Any], counts: Mapping[str, Any]
) -> dict[str, Any]:
    """One step's ``metrics`` and batch ``counts`` added into a log ``window`` (None: a new
    one); trace it under ``jax.jit``, so that nothing leaves the device.

    (sum, count) pairs are added pairwise, plain scalars and counts summed (``read_window``
    divides the plain scalars by the steps). The first step whose loss (sum / count) is not
    finite is kept by its index in the window and its loss, so the error can name it.
    """
    loss = metrics["loss"][0] / metrics["loss"][1]
    if window is None:
        window = {
            "metrics": jax.tree_util.tree_map(jnp.zeros_like, dict(metrics)),
            "counts": {name: jnp.zeros((), jnp.float32) for name in counts},
            "steps": jnp.zeros((), jnp.int32),
            "bad_index": jnp.full((), -1, jnp.int32),
            "bad_loss": jnp.zeros((), loss.dtype),
        }
    first_bad = ~jnp.isfinite(loss) & (window["bad_index"] < 0)
    return {
        "metrics": jax.tree_util.tree_map(jnp.add, window["metrics"], dict(metrics)),
        "counts": {k: v + jnp.asarray(counts[k], jnp.float32) for k, v in window["counts"].items()},
        "steps": window["steps"] + 1,
        "bad_index": jnp.where(first_bad, window["steps"], window["bad_index"]),
        "bad_loss": jnp.where(first_bad, loss, window["bad_loss"]),
    }


@dataclasses.dataclass(frozen=True)
class WindowSummary:
    """A log window read back to the host."""

    steps: int
    scalars: dict[str, float]  # means over the window's steps (``reduce_metrics``)
    counts: dict[str, float]  # sums over the window's steps
    first_non_finite: tuple[int, float] | None  # (index in the window, loss) of the first bad


def read_window(window: dict[str, Any]) -> WindowSummary:
    """The window's means, count sums and first non-finite loss: one device-to-host read."""
    host = jax.device_get(window)
    steps = int(host["steps"])
    scalars = {}
    for name, value in host["metrics"].items():
        if isinstance(value, tuple):
            scalars[name] = reduce_metrics({name: value})[name]
        else:
            scalars[name] = float(np.asarray(value, np.float64) / max(steps, 1))
    return WindowSummary(
        steps=steps,
        scalars=scalars,
        counts={name: float(v) for name, v in host["counts"].items()},
        first_non_finite=_first_bad(host["bad_index"], host["bad_loss"]),
    )


def first_non_finite(window: dict[str, Any] | None) -> tuple[int, float] | None:
    """``(index in the window, loss)`` of its first step whose loss is not finite, or None;
    reads back two scalars only (the check before a checkpoint is saved)."""
    if window is None:
        return None
    return _first_bad(*jax.device_get((window["bad_index"], window["bad_loss"])))


def _first_bad(index, loss) -> tuple[int, float] | None:
    index, loss = int(index), float(loss)
    if index < 0:
        return None
    return index, loss
