"""jfe-jax: Joint Fusion and Encoding multimodal retrieval in JAX/Flax, TPU-first.

from jfe_jax import Encoder, ImageProcessor, Index
"""

__version__ = "0.1.0"

from jfe_jax.data.image_processor import ImageProcessor  # noqa: E402
from jfe_jax.encoder import Encoder, EncoderOptions  # noqa: E402
from jfe_jax.index.scann_index import Index  # noqa: E402

__all__ = ["Encoder", "EncoderOptions", "ImageProcessor", "Index", "__version__"]
