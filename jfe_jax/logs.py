"""What the ``jfe`` command prints besides its results: jfe-jax's INFO lines, other
libraries' warnings, and no libtpu start-up noise on a machine without a TPU.

``setup_logging(verbose)`` is called once per command by ``jfe_jax.cli.main``; ``--verbose``
lets the INFO lines of Orbax, absl, JAX, TensorFlow Datasets, grain, ... through too.
``quiet_libtpu()`` runs when the ``jfe`` command starts (``jfe_jax.cli``), before JAX is
imported; importing the library sets nothing.
"""

from __future__ import annotations

import glob
import importlib.util
import logging
import os
import sys

FORMAT = "%(asctime)s %(levelname)s [%(name)s] %(message)s"
# Libraries whose INFO lines are for their developers (Orbax logs through absl).
THIRD_PARTY = (
    "absl",
    "orbax",
    "jax",
    "jaxlib",
    "tensorflow_datasets",
    "tensorflow",
    "grain",
    "etils",
    "tensorstore",
    "flax",
    "transformers",
    "urllib3",
    "PIL",
    "matplotlib",
)
_HANDLER_MARK = "_jfe_handler"
# TensorFlow Datasets' routine messages, logged at WARNING through absl while our builders
# prepare or reopen a dataset: they describe normal operation. Shown with --verbose.
ROUTINE_WARNINGS = (
    "Using custom data configuration",
    "has no dataset_info.json",
)


class _DropRoutineWarnings(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        if record.levelno > logging.WARNING:
            return True
        message = record.getMessage()
        return not any(text in message for text in ROUTINE_WARNINGS)


def setup_logging(verbose: bool = False) -> None:
    """jfe-jax at INFO, others at WARNING (INFO too with ``verbose``), on the current stderr.

    Safe to call again (each ``jfe_jax.cli.main`` call does): the handler it installed before
    is replaced, so the lines go to the ``sys.stderr`` of the moment.
    """
    root = logging.getLogger()
    for handler in list(root.handlers):
        if getattr(handler, _HANDLER_MARK, False) or _made_by_bare_basic_config(handler):
            root.removeHandler(handler)
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter(FORMAT))
    setattr(handler, _HANDLER_MARK, True)
    if not verbose:
        handler.addFilter(_DropRoutineWarnings())
    root.addHandler(handler)
    root.setLevel(logging.INFO if verbose else logging.WARNING)
    logging.getLogger("jfe_jax").setLevel(logging.INFO)
    for name in THIRD_PARTY:
        logging.getLogger(name).setLevel(logging.NOTSET if verbose else logging.WARNING)


def _made_by_bare_basic_config(handler: logging.Handler) -> bool:
    """The stderr handler ``logging.basicConfig()`` installs when a library logs before
    logging is set up (absl does, e.g. as Orbax is imported): it would print every line twice."""
    formatter = handler.formatter
    return (
        type(handler) is logging.StreamHandler
        and handler.stream in (sys.stderr, sys.__stderr__)
        and formatter is not None
        and formatter._fmt == logging.BASIC_FORMAT
    )


def tpu_present() -> bool:
    """Whether this machine may have a TPU (its device files), as libtpu looks for one."""
    return bool(glob.glob("/dev/accel*") or glob.glob("/dev/vfio/[0-9]*"))


def _other_accelerator_plugin() -> bool:
    """Whether a JAX GPU plugin is installed (then JAX picks the platforms, not us)."""
    names = ("jax_cuda12_plugin", "jax_cuda13_plugin", "jax_rocm60_plugin", "jax_rocm7_plugin")
    return any(importlib.util.find_spec(name) is not None for name in names)


def quiet_libtpu() -> bool:
    """``JAX_PLATFORMS=cpu`` when libtpu is installed on a machine without a TPU or GPU.

    There JAX would still load libtpu at its first computation, and libtpu prints lines about
    TPU hosts and workers it cannot find; CPU is all JAX could use anyway. Left alone when the
    user set ``JAX_PLATFORMS``, when JAX is already imported, or when a TPU or a GPU plugin
    may be present. Compiling for a TPU topology (``jfe aot``) loads libtpu explicitly and
    works under it. Returns whether it set the variable.
    """
    if "JAX_PLATFORMS" in os.environ or "jax" in sys.modules:
        return False
    if importlib.util.find_spec("libtpu") is None or tpu_present():
        return False
    if _other_accelerator_plugin():
        return False
    os.environ["JAX_PLATFORMS"] = "cpu"
    return True
