"""MIRe (Ju, Kim and Lee, ACL 2025), the late-fusion counterpart of JFE's one tower, in the same
framework. Built so far: the ColBERT text tower (BERT + linear head, with its checkpoint name
map), the query-guided attentive pooling and the late-interaction (MaxSim) score. The CLIP
vision tower, ColBERT's tokenizer conventions, checkpoint files and the public ``MIRe`` class
are issue 17's remaining items."""

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

__all__ = [
    "MASK_MODES",
    "Bert",
    "BertConfig",
    "ColBERTEncoder",
    "MaskMode",
    "QueryGuidedAttentivePooling",
    "check_mask_mode",
    "colbert_from_torch",
    "colbert_to_torch",
    "maxsim",
    "maxsim_scores",
    "token_vectors",
]
