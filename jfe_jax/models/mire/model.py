"""MIRe's model: the towers, the pooling and the score behind one object.

``MIRe.from_pretrained(colbert_dir, clip_dir, pooling=None)`` reads a ColBERTv2 checkpoint in
Hugging Face layout (``config.json``, ``model.safetensors`` or ``pytorch_model.bin`` holding
``bert.*`` and ``linear.weight``, the BERT tokenizer files; a ``.bin`` is read without running
its pickle), a CLIP checkpoint (``CLIPVisionModel`` or
``CLIPModel``, safetensors) and MIRe's pooling weights (a safetensors file named as the
reference's ``QueryGuidedAttentivePooling`` state dict, ``proj.0.weight`` ..., a directory or
one file); without
``pooling`` the pooling is freshly initialised (stage 1 trains it). ``save_pretrained`` writes
the three back in the same layouts, with MIRe's own settings (pooling sizes, mask mode, maximum
lengths) in ``mire_settings.json`` beside the pooling weights, which ``from_pretrained`` reads.

Embeddings (MIRe paper section 3; reference ``retrievers/mire.py``), all vectors
L2-normalised with a mask:

* query with an image: ``[16 global; 12 query-guided; Lq text]`` vectors (the 28 visual ones
  only with ``stage="alignment"``); without an image: its text vectors (plain ColBERT); in a
  batch that mixes both, a text-only query's visual vectors are masked out;
* document: its text vectors, masked at padding and punctuation; with an image, the global and
  prompt-guided tokens of that image (the fixed prompt "Can you describe the primary elements in
  this image?" as the query text) are prepended.

``score`` is the MaxSim matrix (``score.maxsim_scores``).
"""

from __future__ import annotations

import functools
from collections.abc import Mapping, Sequence
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from jfe_jax.models.mire.checkpoint import (  # noqa: F401  (re-exported: they were defined here)
    CONFIG_FILE,
    SETTINGS_FILE,
    TORCH_FILE,
    pooling_from_torch,
    pooling_to_torch,
    read_checkpoint,
    read_pretrained,
    write_checkpoint,
    write_pretrained,
)
from jfe_jax.models.mire.network import (  # noqa: F401  (re-exported: they were defined here)
    _TOWERS,
    SIZES,
    MIReConfig,
    MIReModel,
    _init,
    get_mire_size,
)
from jfe_jax.models.mire.score import maxsim_scores
from jfe_jax.models.mire.text import BertConfig, token_vectors  # noqa: F401  (re-exported)
from jfe_jax.models.mire.tokens import ColBERTTokenizer
from jfe_jax.models.mire.vision import CLIPImageProcessor, CLIPVisionConfig  # noqa: F401

DOC_IMAGE_PROMPT = "Can you describe the primary elements in this image?"


@functools.partial(jax.jit, static_argnums=(0, 1))
def _apply(model: MIReModel, method: str, params: Any, *args: jax.Array) -> jax.Array:
    """``model``'s ``method`` jitted once per config (models of equal configs share it)."""
    return model.apply(params, *args, method=getattr(MIReModel, method))


class MIRe:
    """MIRe for inference: ``encode_queries``, ``encode_documents`` and ``score`` (module
    docstring). Build with ``from_pretrained`` or ``MIRe(config, params, tokenizer)``."""

    def __init__(self, config: MIReConfig, params: Mapping[str, Any], tokenizer: Any):
        self.config = config
        self.params = params
        self.model = MIReModel(config)
        self.tokens = ColBERTTokenizer(
            tokenizer,
            query_maxlen=config.query_maxlen,
            doc_maxlen=config.doc_maxlen,
            mask_mode=config.mask_mode,
        )
        self.processor = CLIPImageProcessor(
            size=config.vision.image_size, crop_size=config.vision.image_size
        )
        self._text = functools.partial(_apply, self.model, "text")
        self._visual = functools.partial(_apply, self.model, "visual")
        self._pooled = functools.partial(_apply, self.model, "pooled")

    @classmethod
    def init(cls, config: MIReConfig, tokenizer: Any, seed: int = 0) -> MIRe:
        """Random parameters (tests, and stage 1's freshly initialised pooling)."""
        params = jax.jit(functools.partial(_init, config))(jax.random.key(seed))
        return cls(config, nn.meta.unbox(params), tokenizer)

    @classmethod
    def from_pretrained(
        cls,
        colbert_dir: str,
        clip_dir: str,
        pooling: str | None = None,
        *,
        num_tokens: int | None = None,
        num_heads: int | None = None,
        query_maxlen: int | None = None,
        doc_maxlen: int | None = None,
        mask_mode: str | None = None,
        seed: int = 0,
    ) -> MIRe:
        """Reads the three checkpoints (module docstring); ValueError naming the file and every
        missing, extra or mis-shaped tensor.

        MIRe's settings (``num_tokens`` ... ``mask_mode``) come from the ``mire_settings.json``
        that ``save_pretrained`` writes beside the pooling weights; a setting given here that
        differs from the saved one is refused. Without that file (the reference's weights, one
        safetensors file, or no pooling) a setting not given is ``MIReConfig``'s default."""
        given = dict(
            num_tokens=num_tokens,
            num_heads=num_heads,
            query_maxlen=query_maxlen,
            doc_maxlen=doc_maxlen,
            mask_mode=mask_mode,
        )
        return cls(*read_pretrained(colbert_dir, clip_dir, pooling, given, seed))

    def save_pretrained(self, directory: str) -> None:
        """``colbert/``, ``clip/`` (safetensors with their config.json; the tokenizer next to
        ColBERT) and ``pooling/`` (with MIRe's settings, ``mire_settings.json``) under
        ``directory``: ``from_pretrained`` reads them back, every config field included."""
        write_pretrained(self.config, self.params, self.tokens.tokenizer, directory)

    def save_checkpoint(self, directory: str) -> None:
        """The whole model for training: parameters as an Orbax checkpoint (``params/``), the
        config (``mire_config.json``) and the tokenizer; ``from_checkpoint`` restores it."""
        write_checkpoint(self.config, self.params, self.tokens.tokenizer, directory)

    @classmethod
    def from_checkpoint(cls, directory: str, *, shardings: Any = None) -> MIRe:
        """A ``save_checkpoint`` directory back; ``shardings`` (a tree like the parameters')
        restores each array straight into its devices."""
        return cls(*read_checkpoint(directory, shardings))

    # --- embeddings ------------------------------------------------------------------------------

    def _pixels(self, images: Sequence[Any]) -> jax.Array:
        return jnp.asarray(self.processor(list(images)))

    def _visual_tokens(
        self, text: jax.Array, mask: jax.Array, images: Sequence[Any]
    ) -> tuple[jax.Array, np.ndarray]:
        """The pooling's ``[n, T + H, dim]`` tokens (not normalised) and their mask: 1 for an
        item with an image, 0 (zero vectors) for one without (``images[i] is None``), whose
        text alone is then what it is scored by."""
        rows = [i for i, image in enumerate(images) if image is not None]
        visual = self._visual(self.params, self._pixels([images[i] for i in rows]))
        pooled = self._pooled(self.params, text[np.asarray(rows)], visual, mask[np.asarray(rows)])
        if len(rows) == len(images):
            return pooled, np.ones(pooled.shape[:2], np.int32)
        tokens = jnp.zeros((len(images), *pooled.shape[1:]), pooled.dtype)
        tokens_mask = np.zeros((len(images), pooled.shape[1]), np.int32)
        tokens_mask[rows] = 1
        return tokens.at[np.asarray(rows)].set(pooled), tokens_mask

    def encode_queries(
        self, texts: Sequence[str], images: Sequence[Any] | None = None, *, stage: str = "search"
    ) -> tuple[np.ndarray, np.ndarray]:
        """``(vectors [n, V, dim], mask [n, V])``: with images, V = tokens + heads + Lq
        (``stage="alignment"``: the visual ones only); without, V = Lq. ``images`` may mix
        images and ``None`` (a text-only query): the text-only queries' visual tokens are
        masked, so every query scores as it would alone."""
        if stage not in ("search", "alignment"):
            raise ValueError(f"stage={stage!r}; expected 'search' or 'alignment'")
        if images is not None and len(images) != len(texts):
            raise ValueError(f"{len(texts)} query texts but {len(images)} images")
        if images is not None and all(image is None for image in images):
            images = None
        if stage == "alignment" and images is not None and None in images:
            raise ValueError(
                f"stage='alignment' embeds image queries only; query {list(images).index(None)} "
                "has no image"
            )
        ids, mask = self.tokens.queries(texts)
        text = self._text(self.params, jnp.asarray(ids), jnp.asarray(mask))
        if images is None:
            return np.asarray(token_vectors(text, jnp.asarray(mask))), mask
        tokens, tokens_mask = self._visual_tokens(text, jnp.asarray(mask), images)
        if stage == "alignment":
            return np.asarray(token_vectors(tokens, jnp.asarray(tokens_mask))), tokens_mask
        vectors = jnp.concatenate([tokens, text], axis=1)
        full = np.concatenate([tokens_mask, mask], axis=1)
        return np.asarray(token_vectors(vectors, jnp.asarray(full))), full

    def encode_documents(
        self, texts: Sequence[str], images: Sequence[Any] | None = None
    ) -> tuple[np.ndarray, np.ndarray]:
        """``(vectors [n, V, dim], mask [n, V])``: the text vectors (padding and punctuation
        masked), after the image's global and prompt-guided tokens when images are given
        (masked for a document whose image is ``None``)."""
        if images is not None and len(images) != len(texts):
            raise ValueError(f"{len(texts)} document texts but {len(images)} images")
        ids, attention, keep = self.tokens.documents(texts)
        text = self._text(self.params, jnp.asarray(ids), jnp.asarray(attention))
        vectors, mask = token_vectors(text, jnp.asarray(keep)), keep
        if images is None or all(image is None for image in images):
            return np.asarray(vectors), mask
        p_ids, p_mask = self.tokens.queries([DOC_IMAGE_PROMPT] * len(texts))
        prompt = self._text(self.params, jnp.asarray(p_ids), jnp.asarray(p_mask))
        tokens, tokens_mask = self._visual_tokens(prompt, jnp.asarray(p_mask), images)
        tokens = token_vectors(tokens, jnp.asarray(tokens_mask))
        return (
            np.asarray(jnp.concatenate([tokens, vectors], axis=1)),
            np.concatenate([tokens_mask, mask], axis=1),
        )

    def score(
        self,
        queries: tuple[np.ndarray, np.ndarray],
        documents: tuple[np.ndarray, np.ndarray],
        *,
        doc_chunk: int = 256,
    ) -> np.ndarray:
        """The ``[queries, documents]`` MaxSim matrix of two ``encode_*`` results."""
        (q, q_mask), (d, d_mask) = queries, documents
        return np.asarray(maxsim_scores(q, q_mask, d, d_mask, doc_chunk=doc_chunk))
