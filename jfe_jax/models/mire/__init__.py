"""MIRe (Ju, Kim and Lee, ACL 2025), the late-fusion counterpart of JFE's one tower, in the same
framework: the pieces built so far are its query-guided attentive pooling and its late-interaction
(MaxSim) score. The ColBERT text tower, the CLIP vision tower, checkpoints and the public
``MIRe`` class are issue 17's remaining items."""

from jfe_jax.models.mire.pooling import (
    MASK_MODES,
    MaskMode,
    QueryGuidedAttentivePooling,
    check_mask_mode,
)
from jfe_jax.models.mire.score import maxsim, maxsim_scores

__all__ = [
    "MASK_MODES",
    "MaskMode",
    "QueryGuidedAttentivePooling",
    "check_mask_mode",
    "maxsim",
    "maxsim_scores",
]
