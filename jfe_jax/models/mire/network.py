"""MIRe's network: its config (the towers' architectures and MIRe's settings), the named
sizes, and the Flax module that holds the ColBERT tower, the CLIP tower and the pooling under
one parameter tree. ``jfe_jax.models.mire.model`` builds the user-facing ``MIRe`` on it."""

from __future__ import annotations

import dataclasses

import flax.linen as nn
import jax
import jax.numpy as jnp

from jfe_jax.models.mire.pooling import QueryGuidedAttentivePooling, check_mask_mode
from jfe_jax.models.mire.text import BertConfig, ColBERTEncoder
from jfe_jax.models.mire.vision import CLIPVision, CLIPVisionConfig, mire_visual_features

_TOWERS = ("text", "vision")  # the MIReConfig fields that hold a tower's architecture


@dataclasses.dataclass(frozen=True)
class MIReConfig:
    """The towers' architectures and MIRe's settings."""

    text: BertConfig = BertConfig()
    vision: CLIPVisionConfig = CLIPVisionConfig()
    num_tokens: int = 16
    num_heads: int = 12
    query_maxlen: int = 64
    doc_maxlen: int = 384
    mask_mode: str = "consistent"

    def __post_init__(self):
        check_mask_mode(self.mask_mode)


_TINY_BERT = BertConfig(
    hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=64, dim=128
)
_TINY_CLIP = CLIPVisionConfig(
    hidden_size=32,
    intermediate_size=64,
    num_hidden_layers=2,
    num_attention_heads=4,
    image_size=32,
    patch_size=8,
)
SIZES: dict[str, MIReConfig] = {
    # Tests and CPU runs.
    "mire-tiny": MIReConfig(text=_TINY_BERT, vision=_TINY_CLIP, num_tokens=4, num_heads=2),
    "mire-small": MIReConfig(
        text=BertConfig(
            hidden_size=256, num_hidden_layers=4, num_attention_heads=4, intermediate_size=1024
        ),
        vision=CLIPVisionConfig(
            hidden_size=256,
            intermediate_size=1024,
            num_hidden_layers=4,
            num_attention_heads=4,
            image_size=64,
            patch_size=16,
        ),
    ),
    # The paper's: BERT-base (colbertv2.0) with CLIP ViT-B/32, or with ViT-L/14-336.
    "mire-base": MIReConfig(),
    "mire-large": MIReConfig(
        vision=CLIPVisionConfig(
            hidden_size=1024,
            intermediate_size=4096,
            num_hidden_layers=24,
            num_attention_heads=16,
            image_size=336,
            patch_size=14,
        )
    ),
}


def get_mire_size(name: str) -> MIReConfig:
    if name not in SIZES:
        raise ValueError(f"unknown MIRe size {name!r}; expected one of {', '.join(SIZES)}")
    return SIZES[name]


class MIReModel(nn.Module):
    """The three modules under one parameter tree: ``colbert``, ``clip`` and ``pooling``."""

    config: MIReConfig

    def setup(self):
        c = self.config
        self.colbert = ColBERTEncoder(c.text)
        self.clip = CLIPVision(c.vision)
        self.pooling = QueryGuidedAttentivePooling(
            num_tokens=c.num_tokens,
            num_heads=c.num_heads,
            out_dim=c.text.dim,
            mask_mode=c.mask_mode,
        )

    def text(self, ids, mask):
        """ColBERT projections times the mask, not normalised: ``[B, L, dim]``."""
        return self.colbert(ids, mask) * mask[..., None].astype(jnp.float32)

    def visual(self, pixel_values):
        return mire_visual_features(self.clip(pixel_values)[0])

    def pooled(self, text, visual, mask):
        return self.pooling(text, visual, mask)

    def __call__(self, ids, mask, pixel_values):  # init: every parameter
        text = self.text(ids, mask)
        return self.pooled(text, self.visual(pixel_values), mask)


def _init(config: MIReConfig, key: jax.Array, *, only: str | None = None) -> dict:
    """Random parameters of the model (or of its ``only`` submodule's tree)."""
    size = config.vision.image_size
    args = (
        jnp.zeros((1, 4), jnp.int32),
        jnp.ones((1, 4), jnp.int32),
        jnp.zeros((1, 3, size, size)),
    )
    params = MIReModel(config).init(key, *args)
    return params if only is None else {"params": {only: params["params"][only]}}
