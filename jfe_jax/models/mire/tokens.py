"""ColBERT's tokenizer conventions, as MIRe's query and document encoders use them.

From the reference (ColBERT's ``query_tokenization.py`` and ``doc_tokenization.py``, as
MIRe's ``retrievers/mire.py`` calls them):

* Markers: every text is prefixed with ``". "`` and the ``"."`` token (position 1, after
  ``[CLS]``) is overwritten by the query marker ``[unused0]`` or the document marker
  ``[unused1]``: ``[CLS] [Q] tokens... [SEP]``.
* Queries are padded to ``query_maxlen`` and every ``[PAD]`` becomes ``[MASK]`` (query
  augmentation); documents are padded to the longest in the batch with ``[PAD]`` and truncated
  at ``doc_maxlen``.
* A document's vectors are masked at padding and at punctuation: the skiplist holds every
  ``string.punctuation`` symbol's first wordpiece id.

Which query positions count (BERT's attention mask and the vectors kept) is where training and
evaluation differ in the reference; ``mask_mode`` (``pooling.MASK_MODES``) decides:

* ``"reference_train"`` and ``"consistent"``: every position counts, ``[MASK]`` ones included
  (the training collate's ``ids != PAD`` after the replacement is all ones);
* ``"reference_eval"``: the tokenizer's mask, 0 at the ``[MASK]`` positions, so BERT does not
  attend to them and their vectors are zeroed (no query augmentation at search).

``mask_punctuation=False`` keeps punctuation vectors, as an index built from a MIRe checkpoint
does in the reference (it passes the attention mask as the document mask).
"""

from __future__ import annotations

import dataclasses
import string
from collections.abc import Sequence
from typing import Any

import numpy as np

from jfe_jax.models.mire.pooling import check_mask_mode

QUERY_MARKER = "[unused0]"
DOC_MARKER = "[unused1]"


@dataclasses.dataclass
class ColBERTTokenizer:
    """Queries and documents as ColBERT lays them out (module docstring), from a BERT
    WordPiece tokenizer (a transformers ``BertTokenizerFast``, or any tokenizer with the same
    special tokens and ``__call__``)."""

    tokenizer: Any
    query_maxlen: int = 64
    doc_maxlen: int = 384
    mask_mode: str = "consistent"
    mask_punctuation: bool = True

    def __post_init__(self):
        check_mask_mode(self.mask_mode)
        if self.query_maxlen < 3 or self.doc_maxlen < 3:
            raise ValueError(
                f"query_maxlen={self.query_maxlen} and doc_maxlen={self.doc_maxlen}: each needs "
                "room for [CLS], the marker and [SEP] (at least 3)"
            )
        vocab = self.tokenizer.get_vocab()
        needed = (QUERY_MARKER, DOC_MARKER, "[MASK]", "[PAD]", "[CLS]", "[SEP]")
        missing = [t for t in needed if t not in vocab]
        if missing:
            raise ValueError(
                f"the tokenizer has no {', '.join(missing)}; ColBERT needs BERT's special tokens "
                "and the [unused0]/[unused1] markers"
            )
        self.query_marker_id = vocab[QUERY_MARKER]
        self.doc_marker_id = vocab[DOC_MARKER]
        self.mask_id = vocab["[MASK]"]
        self.pad_id = vocab["[PAD]"]
        self.skiplist = frozenset(
            ids[0]
            for ids in (
                self.tokenizer(symbol, add_special_tokens=False)["input_ids"]
                for symbol in string.punctuation
            )
            if ids
        )

    def _encode(self, texts: Sequence[str], **kwargs) -> tuple[np.ndarray, np.ndarray]:
        if isinstance(texts, str):
            raise TypeError("expected a list of texts, got one string")
        if not len(texts):
            raise ValueError("no texts to tokenize")
        out = self.tokenizer(
            [". " + t for t in texts], truncation=True, return_tensors="np", **kwargs
        )
        return out["input_ids"].astype(np.int32), out["attention_mask"].astype(np.int32)

    def queries(self, texts: Sequence[str]) -> tuple[np.ndarray, np.ndarray]:
        """``(ids, mask)``, each ``[n, query_maxlen]``: the marker after ``[CLS]``, ``[MASK]``
        in place of padding, the mask as ``mask_mode`` says (module docstring)."""
        ids, mask = self._encode(texts, padding="max_length", max_length=self.query_maxlen)
        ids[:, 1] = self.query_marker_id
        ids[ids == self.pad_id] = self.mask_id
        if self.mask_mode != "reference_eval":
            mask = np.ones_like(mask)
        return ids, mask

    def documents(self, texts: Sequence[str]) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """``(ids, attention_mask, vector_mask)``, each ``[n, longest <= doc_maxlen]``: the
        marker after ``[CLS]``; the vector mask drops padding and (``mask_punctuation``)
        punctuation."""
        ids, mask = self._encode(texts, padding="longest", max_length=self.doc_maxlen)
        ids[:, 1] = self.doc_marker_id
        keep = ids != self.pad_id
        if self.mask_punctuation:
            keep &= ~np.isin(ids, list(self.skiplist))
        return ids, mask, keep.astype(np.int32)
