"""A synthetic M-BEIR: a small rendered world of coloured shapes written in M-BEIR's layout.

`generate(root, SyntheticConfig())` writes queries, candidate pools, qrels, instructions and
PNG images for nine tasks that reuse real M-BEIR task names (so the real task tables apply),
plus stage-1 pair data; `corpus_texts(root)` iterates its texts. `SyntheticConfig.study()`
adds FUSION_TASKS (spatial.py: tasks no sum of image and text embeddings can solve). See
generate.py for the layout and tasks.py for the tasks.
"""

from jfe_jax.data.synthetic.generate import (
    FUSION_TASKS,
    MANIFEST_FILE,
    STUDY_TASKS,
    SYNTHETIC_TASKS,
    VERSION,
    SyntheticConfig,
    chance_at_headline_k,
    corpus_texts,
    generate,
)
from jfe_jax.data.synthetic.pairs import IMAGE_CAPTIONS_FILE, TEXT_TRIPLES_FILE

__all__ = [
    "FUSION_TASKS",
    "IMAGE_CAPTIONS_FILE",
    "MANIFEST_FILE",
    "STUDY_TASKS",
    "SYNTHETIC_TASKS",
    "TEXT_TRIPLES_FILE",
    "VERSION",
    "SyntheticConfig",
    "chance_at_headline_k",
    "corpus_texts",
    "generate",
]
