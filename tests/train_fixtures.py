"""In-memory contrastive batches for trainer tests (no tokenizer, no files)."""

from __future__ import annotations

import numpy as np

from jfe_jax.models.config import ModelConfig
from jfe_jax.models.inputs import prepare_batch


class ToyPairs:
    """Deterministic query/candidate batches with a learnable signal.

    Query i and candidate i share a random 'topic' token run, so a model can learn to match
    them; some candidates carry an image. Implements the iterator protocol of the trainer
    (``next``, ``get_state``, ``set_state``).
    """

    def __init__(self, config: ModelConfig, *, batch_size: int, seed: int = 0, length: int = 16):
        self.config, self.batch_size, self.seed, self.length = config, batch_size, seed, length
        self.position = 0

    def _side(self, rng, topics, with_images):
        cfg = self.config
        merge = cfg.vision.spatial_merge_size
        ids = rng.integers(0, cfg.text.vocab_size - 16, size=(self.batch_size, self.length))
        ids[:, 2:6] = topics
        pixels, grids = [], []
        if with_images:
            for row in range(self.batch_size):
                if row % 2 == 0:
                    ids[row, 8 : 8 + 4] = cfg.image_token_id
                    grids.append([1, 2 * merge, 2 * merge])
                    pixels.append(rng.normal(size=(16, cfg.vision.patch_dim)).astype(np.float32))
            return prepare_batch(
                cfg, ids, None, np.concatenate(pixels), np.array(grids), num_patches=16
            )
        return prepare_batch(cfg, ids)

    def __next__(self):
        rng = np.random.default_rng([self.seed, self.position])
        self.position += 1
        topics = rng.integers(0, self.config.text.vocab_size - 16, size=(self.batch_size, 4))
        keys = rng.integers(0, 2**31 - 1, size=self.batch_size).astype(np.int32)
        return {
            "query": self._side(rng, topics, with_images=False),
            "candidate": self._side(rng, topics, with_images=True),
            "query_key": keys,
            "candidate_key": keys,
        }

    def get_state(self) -> dict:
        return {"position": self.position}

    def set_state(self, state: dict) -> None:
        self.position = int(state["position"])
