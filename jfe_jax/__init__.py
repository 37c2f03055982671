"""jfe-jax: Joint Fusion and Encoding multimodal retrieval in JAX/Flax, TPU-first.

from jfe_jax import Encoder, ImageProcessor, Index, MIRe

The names are imported on first use (PEP 562), so ``import jfe_jax`` (and the ``jfe``
command, and a model run) loads only what it touches: neither the data pipeline's grain and
TensorFlow Datasets nor ScaNN come with it.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

__version__ = "0.1.0"

# Public name -> the module that defines it.
_EXPORTS = {
    "Encoder": "jfe_jax.encoder",
    "EncoderOptions": "jfe_jax.encoder",
    "ImageProcessor": "jfe_jax.data.image_processor",
    "Index": "jfe_jax.index.scann_index",
    "MIRe": "jfe_jax.models.mire.model",
}

__all__ = ["Encoder", "EncoderOptions", "ImageProcessor", "Index", "MIRe", "__version__"]

if TYPE_CHECKING:  # what linters and IDEs see
    from jfe_jax.data.image_processor import ImageProcessor
    from jfe_jax.encoder import Encoder, EncoderOptions
    from jfe_jax.index.scann_index import Index
    from jfe_jax.models.mire.model import MIRe


def __getattr__(name: str) -> Any:
    if name in _EXPORTS:
        value = getattr(importlib.import_module(_EXPORTS[name]), name)
        globals()[name] = value  # later lookups skip this function
        return value
    raise AttributeError(f"module 'jfe_jax' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_EXPORTS))
