"""MIRe (Ju, Kim and Lee, ACL 2025), the late-fusion counterpart of JFE's one tower, in the same
framework. Built so far: the ColBERT text tower (BERT + linear head) with ColBERT's tokenizer
conventions (markers, [MASK] augmentation, punctuation), the CLIP vision tower with its image
processor, each tower with its checkpoint name map both ways; the query-guided attentive
pooling; the late-interaction (MaxSim) score; the model object ``MIRe`` (``from jfe_jax import
MIRe``) with named sizes and checkpoints in and out. Training, indexing and evaluating MIRe are
the next issue's."""

from jfe_jax.models.mire.model import (
    SIZES,
    MIRe,
    MIReConfig,
    MIReModel,
    get_mire_size,
    pooling_from_torch,
    pooling_to_torch,
)
from jfe_jax.models.mire.pooling import (
    MASK_MODES,
    MaskMode,
    QueryGuidedAttentivePooling,
    check_mask_mode,
)
from jfe_jax.models.mire.score import maxsim, maxsim_scores
from jfe_jax.models.mire.text import (
    Bert,
    BertConfig,
    ColBERTEncoder,
    colbert_from_torch,
    colbert_to_torch,
    token_vectors,
)
from jfe_jax.models.mire.tokens import ColBERTTokenizer
from jfe_jax.models.mire.vision import (
    CLIPImageProcessor,
    CLIPVision,
    CLIPVisionConfig,
    clip_from_torch,
    clip_to_torch,
    mire_visual_features,
)

__all__ = [
    "SIZES",
    "MIRe",
    "MIReConfig",
    "MIReModel",
    "get_mire_size",
    "pooling_from_torch",
    "pooling_to_torch",
    "MASK_MODES",
    "Bert",
    "BertConfig",
    "CLIPImageProcessor",
    "CLIPVision",
    "CLIPVisionConfig",
    "ColBERTEncoder",
    "ColBERTTokenizer",
    "MaskMode",
    "QueryGuidedAttentivePooling",
    "check_mask_mode",
    "clip_from_torch",
    "clip_to_torch",
    "colbert_from_torch",
    "colbert_to_torch",
    "maxsim",
    "maxsim_scores",
    "mire_visual_features",
    "token_vectors",
]
