"""jfe-jax: Joint Fusion and Encoding multimodal retrieval in JAX/Flax, TPU-first."""

__version__ = "0.1.0"
