"""The layout of a ``jfe train`` workdir, spelled once.

    <workdir>/
      config.json            the training config (ml_collections JSON), written at start
      model_config.json      the architecture, in Hugging Face config format
      jfe_item_format.json   what the model is fed (also beside the weights of an HF directory)
      run_info.json          versions, devices, mesh of the run
      tokenizer/             a copy of the tokenizer trained with (so is a demo data root's)
      checkpoints/<step>/    Orbax checkpoints; jfe_fingerprint.json beside each step's state
      metrics.jsonl          one line of scalars per log step
      tensorboard/           the same scalars as TensorBoard event files
      train_summary.json     final metrics, ``completed``, ``step``, ``total_steps``
      .jfe-train.lock        held by the one trainer using the workdir
      tfds/                  the prepared datasets, unless ``data.tfds_dir`` says elsewhere

A Hugging Face directory also has a ``config.json`` (another format: the architecture), so a
workdir is told apart by its ``checkpoints/`` folder (``is_workdir``). Paths are joined as
strings, so ``gs://...`` workdirs keep working through ``etils.epath``.
"""

from __future__ import annotations

import dataclasses
import os

from etils import epath

CHECKPOINT_DIR = "checkpoints"
TOKENIZER_DIR = "tokenizer"
TENSORBOARD_DIR = "tensorboard"
TFDS_DIR = "tfds"
RUN_CONFIG_FILE = "config.json"
MODEL_CONFIG_FILE = "model_config.json"
ITEM_FORMAT_FILE = "jfe_item_format.json"
RUN_INFO_FILE = "run_info.json"
METRICS_FILE = "metrics.jsonl"
TRAIN_SUMMARY_FILE = "train_summary.json"
TRAIN_LOCK_FILE = ".jfe-train.lock"
FINGERPRINT_FILE = "jfe_fingerprint.json"  # in each checkpoint step, and in HF directories

# Every file and folder name above (the layout test keeps them out of other modules).
LAYOUT_NAMES = (
    CHECKPOINT_DIR,
    TOKENIZER_DIR,
    TENSORBOARD_DIR,
    TFDS_DIR,
    RUN_CONFIG_FILE,
    MODEL_CONFIG_FILE,
    ITEM_FORMAT_FILE,
    RUN_INFO_FILE,
    METRICS_FILE,
    TRAIN_SUMMARY_FILE,
    TRAIN_LOCK_FILE,
    FINGERPRINT_FILE,
)


@dataclasses.dataclass(frozen=True)
class Workdir:
    """The paths inside one training workdir (as given: local, relative or ``gs://``)."""

    path: str

    def __init__(self, path: str | os.PathLike):
        object.__setattr__(self, "path", os.fspath(path))

    def _join(self, *names: str) -> str:
        return os.path.join(self.path, *names)

    @property
    def checkpoints(self) -> str:
        return self._join(CHECKPOINT_DIR)

    def step_dir(self, step: int) -> str:
        """The folder of checkpoint ``step``."""
        return self._join(CHECKPOINT_DIR, str(step))

    def fingerprint(self, step: int) -> str:
        """Where the fingerprint of checkpoint ``step``'s weights is stored."""
        return os.path.join(self.step_dir(step), FINGERPRINT_FILE)

    @property
    def tokenizer(self) -> str:
        return self._join(TOKENIZER_DIR)

    @property
    def run_config(self) -> str:
        return self._join(RUN_CONFIG_FILE)

    @property
    def model_config(self) -> str:
        return self._join(MODEL_CONFIG_FILE)

    @property
    def item_format(self) -> str:
        return self._join(ITEM_FORMAT_FILE)

    @property
    def run_info(self) -> str:
        return self._join(RUN_INFO_FILE)

    @property
    def metrics(self) -> str:
        return self._join(METRICS_FILE)

    @property
    def tensorboard(self) -> str:
        return self._join(TENSORBOARD_DIR)

    @property
    def train_summary(self) -> str:
        return self._join(TRAIN_SUMMARY_FILE)

    @property
    def lock(self) -> str:
        return self._join(TRAIN_LOCK_FILE)

    @property
    def tfds(self) -> str:
        """The default ``data.tfds_dir``."""
        return self._join(TFDS_DIR)


def is_workdir(path: str | os.PathLike) -> bool:
    """Whether ``path`` is a ``jfe train`` workdir: it has a ``checkpoints/`` folder, which a
    Hugging Face directory never has (both have a ``config.json``)."""
    return epath.Path(Workdir(path).checkpoints).is_dir()
