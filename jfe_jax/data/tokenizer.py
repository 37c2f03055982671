"""Offline byte-level BPE tokenizers laid out like Qwen2-VL's, for tiny models and tests.

No tokenizer can be downloaded here, so small models get one trained on the spot. It
tokenizes as Qwen2 does (NFC, Qwen2's pre-tokenisation regex, byte-level BPE) and has
exactly ``vocab_size`` ids, laid out so that ``jfe_jax.models.sizes.special_token_ids``
holds:

- ``[0, n)``: the learned BPE vocabulary (the 256 byte symbols, then merges);
- ``[n, vocab_size - 16)``: ``<|reserved_i|>`` fillers, only when the corpus is too small
  to learn ``vocab_size - 16`` tokens;
- ``[vocab_size - 16, vocab_size - 2)``: Qwen2-VL's 14 special tokens in the order of
  ``SPECIAL_TOKENS`` (``<|endoftext|>`` first, ``<|video_pad|>`` last);
- ``[vocab_size - 2, vocab_size)``: two more ``<|reserved_i|>`` tokens, so that the special
  block ends where it does in ``special_token_ids`` (Qwen2-VL's own vocabulary also ends in
  unused ids).

Every added token is special: ordinary text never encodes to it, and
``decode(..., skip_special_tokens=True)`` drops it. Padding uses ``<|endoftext|>`` and the
end of sequence is ``<|im_end|>``, as in Qwen2-VL-Instruct.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterable

from tokenizers import (
    AddedToken,
    Regex,
    Tokenizer,
    decoders,
    models,
    normalizers,
    pre_tokenizers,
    processors,
    trainers,
)
from transformers import AutoTokenizer, PreTrainedTokenizerBase, PreTrainedTokenizerFast

from jfe_jax.models.sizes import SPECIAL_TOKENS, special_token_ids

PAD_TOKEN = "<|endoftext|>"
EOS_TOKEN = "<|im_end|>"
RESERVED_TOKEN = "<|reserved_{}|>"
NUM_TRAILING_RESERVED = 2
# Special block size: SPECIAL_TOKENS plus the trailing reserved ids.
NUM_TAIL_IDS = len(SPECIAL_TOKENS) + NUM_TRAILING_RESERVED
NUM_BYTE_SYMBOLS = 256
MIN_VOCAB_SIZE = NUM_BYTE_SYMBOLS + NUM_TAIL_IDS

# Qwen2's pre-tokenisation pattern (from its tokenizer.json): contractions, letter runs with
# one leading non-letter, single digits, punctuation runs, newlines, other whitespace.
QWEN2_PRETOKENIZE_PATTERN = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*"
    r"|\s*[\r\n]+|\s+(?!\S)|\s+"
)
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "vocab.json", "tokenizer.model")


def _empty_qwen2_style_tokenizer() -> Tokenizer:
    """An untrained byte-level BPE with Qwen2's normaliser, pre-tokeniser and decoder."""
    tokenizer = Tokenizer(models.BPE())
    tokenizer.normalizer = normalizers.NFC()
    tokenizer.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Split(Regex(QWEN2_PRETOKENIZE_PATTERN), behavior="isolated"),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
        ]
    )
    tokenizer.decoder = decoders.ByteLevel()
    tokenizer.post_processor = processors.ByteLevel(trim_offsets=False)
    return tokenizer


def _special(content: str) -> AddedToken:
    """An added token matched verbatim (no normalisation, no whitespace stripping)."""
    return AddedToken(content, special=True, normalized=False, lstrip=False, rstrip=False)


def build_tokenizer(
    texts: Iterable[str], vocab_size: int, save_dir: str | os.PathLike | None = None
) -> PreTrainedTokenizerFast:
    """Train a Qwen2-style byte-level BPE on ``texts`` with exactly ``vocab_size`` ids.

    The id layout is the module docstring's. With ``save_dir``, the tokenizer is also
    written there in Hugging Face format (tokenizer.json, tokenizer_config.json,
    special_tokens_map.json), loadable offline by ``AutoTokenizer.from_pretrained``.
    Training is deterministic for a given list of texts.
    """
    if vocab_size < MIN_VOCAB_SIZE:
        raise ValueError(
            f"vocab_size={vocab_size} is too small; expected at least {MIN_VOCAB_SIZE}"
            f" ({NUM_BYTE_SYMBOLS} byte symbols + {NUM_TAIL_IDS} special and reserved ids)"
        )
    num_regular = vocab_size - NUM_TAIL_IDS
    tokenizer = _empty_qwen2_style_tokenizer()
    trainer = trainers.BpeTrainer(
        vocab_size=num_regular,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        special_tokens=[],  # added afterwards: the trainer would put them at ids 0..13
        show_progress=False,
    )
    tokenizer.train_from_iterator(texts, trainer=trainer)
    num_learned = tokenizer.get_vocab_size()

    # add_special_tokens appends ids in order, which is what puts the specials at the end.
    num_fillers = num_regular - num_learned
    reserved = [RESERVED_TOKEN.format(i) for i in range(num_fillers + NUM_TRAILING_RESERVED)]
    tokenizer.add_special_tokens([_special(token) for token in reserved[:num_fillers]])
    tokenizer.add_special_tokens([_special(token) for token in SPECIAL_TOKENS])
    tokenizer.add_special_tokens([_special(token) for token in reserved[num_fillers:]])

    wrapped = PreTrainedTokenizerFast(
        tokenizer_object=tokenizer,
        pad_token=PAD_TOKEN,
        eos_token=EOS_TOKEN,
        extra_special_tokens=[t for t in SPECIAL_TOKENS if t not in (PAD_TOKEN, EOS_TOKEN)],
    )
    check_tokenizer_layout(wrapped, vocab_size)
    if save_dir is not None:
        save_tokenizer(wrapped, save_dir)
    return wrapped


def check_tokenizer_layout(tokenizer: PreTrainedTokenizerBase, vocab_size: int) -> None:
    """Raise ValueError unless ``tokenizer`` has ``vocab_size`` ids and the specials where
    ``jfe_jax.models.sizes.special_token_ids(vocab_size)`` expects them."""
    if len(tokenizer) != vocab_size:
        raise ValueError(f"tokenizer has {len(tokenizer)} ids; expected vocab_size={vocab_size}")
    base = vocab_size - NUM_TAIL_IDS
    for offset, token in enumerate(SPECIAL_TOKENS):
        token_id = tokenizer.convert_tokens_to_ids(token)
        if token_id != base + offset:
            raise ValueError(f"tokenizer maps {token} to id {token_id}; expected {base + offset}")
    model_ids = special_token_ids(vocab_size)
    for field, token in (
        ("vision_start_token_id", "<|vision_start|>"),
        ("vision_end_token_id", "<|vision_end|>"),
        ("image_token_id", "<|image_pad|>"),
        ("video_token_id", "<|video_pad|>"),
    ):
        if tokenizer.convert_tokens_to_ids(token) != model_ids[field]:
            raise ValueError(
                f"tokenizer maps {token} to {tokenizer.convert_tokens_to_ids(token)} but the"
                f" model config's {field} is {model_ids[field]}"
            )


def save_tokenizer(tokenizer: PreTrainedTokenizerBase, save_dir: str | os.PathLike) -> None:
    """Save in Hugging Face format, adding the legacy special_tokens_map.json.

    transformers 5 no longer writes special_tokens_map.json; older loaders and other tools
    still read it, and transformers 5 merges it into the config on load.
    """
    tokenizer.save_pretrained(save_dir)
    path = os.path.join(os.fspath(save_dir), "special_tokens_map.json")
    special_tokens_map = dict(tokenizer.special_tokens_map)
    extra = list(getattr(tokenizer, "extra_special_tokens", None) or [])
    if extra:
        special_tokens_map["additional_special_tokens"] = extra
    with open(path, "w", encoding="utf-8") as f:
        json.dump(special_tokens_map, f, indent=2, sort_keys=True, ensure_ascii=False)
        f.write("\n")


def load_tokenizer(directory: str | os.PathLike) -> PreTrainedTokenizerBase:
    """Load a Hugging Face tokenizer from a local directory, offline.

    Raises FileNotFoundError naming the directory when it is missing or holds no tokenizer
    file (tokenizer.json, tokenizer_config.json, vocab.json or tokenizer.model).
    """
    directory = os.fspath(directory)
    if not os.path.isdir(directory):
        raise FileNotFoundError(f"tokenizer directory not found: {directory}")
    if not any(os.path.isfile(os.path.join(directory, name)) for name in TOKENIZER_FILES):
        raise FileNotFoundError(
            f"no tokenizer in {directory}; expected one of {', '.join(TOKENIZER_FILES)}"
        )
    return AutoTokenizer.from_pretrained(directory, local_files_only=True)
