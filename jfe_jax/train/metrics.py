"""Step metrics: how (sum, count) pairs are reduced, and where metrics are written (TensorBoard
event files and ``metrics.jsonl``). Model FLOPs live in ``jfe_jax.models.flops``, device peaks in
``jfe_jax.train.topology``.
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping
from typing import Any

import numpy as np
from etils import epath


class MetricWriter:
    """Writes scalars to TensorBoard event files and to ``metrics.jsonl`` in the workdir.

    The workdir may be local or a ``gs://`` path. Object stores cannot append, so the jsonl is
    rewritten whole at each write (a few thousand short lines over a run).
    """

    def __init__(self, workdir: str, *, enabled: bool = True):
        self.enabled = enabled
        self._tb = None
        self._path = epath.Path(workdir) / "metrics.jsonl"
        self._lines: list[str] = []
        if enabled:
            epath.Path(workdir).mkdir(parents=True, exist_ok=True)
            if self._path.exists():  # a resumed run continues the same file
                self._lines = self._path.read_text().splitlines(keepends=True)
            from tensorboardX import SummaryWriter

            self._tb = SummaryWriter(os.fspath(epath.Path(workdir) / "tensorboard"))

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
