"""Offline BERT WordPiece tokenizers for MIRe's ColBERTv2 text tower, trained on the synthetic text.

MIRe's text tower is ColBERTv2 (BERT-base uncased, 30522 WordPiece ids); its tokenizer cannot
be downloaded here, so MIRe runs on the synthetic world (issue 34 item 2) get one trained on
the spot, as the Qwen2-VL models get their byte-level BPE (``jfe_jax.data.tokenizer``). Who
uses it: ``jfe_jax.models.mire.tokens.ColBERTTokenizer`` wraps it (``MIRe.init``,
``MIRe.save_pretrained`` and ``save_checkpoint`` carry it), and the data MIRe trains on keeps
the copy it was trained on (``mire_tokenizer_for(root, save_dir=Path(root) / WORDPIECE_DIR)``).

It tokenizes as ``bert-base-uncased`` does: transformers' ``BertTokenizerFast`` pipeline
(``BertNormalizer``: clean text, CJK characters spaced, lower-casing and accent stripping when
``lowercase``; ``BertPreTokenizer``: whitespace and punctuation; WordPiece with ``##``
continuations, greedy longest match; ``[CLS] ... [SEP]`` post-processing). The vocabulary,
``vocab.txt`` line ``i`` = id ``i``, has exactly ``vocab_size`` ids:

- ``[0, 104)``: the first 104 lines of BERT's uncased vocab, so every id ColBERT uses is
  BERT's: ``[PAD]`` 0, ``[unused0]`` 1 (ColBERT's query marker ``[Q]``), ``[unused1]`` 2 (the
  document marker ``[D]``), ``[unused2]`` ... ``[unused98]`` 3-99, ``[UNK]`` 100, ``[CLS]``
  101, ``[SEP]`` 102, ``[MASK]`` 103 (``SPECIAL_IDS``);
- then the alphabet, every ``##c`` continuation the texts need (sorted) and every character
  of their words (sorted by code point), so that no word of the training texts becomes
  ``[UNK]`` (except a word over WordPiece's 100-character limit);
- then the WordPiece trainer's merges, in the order it learned them;
- then ``[unused99]``, ``[unused100]``, ... fillers (BERT's numbering continued; ordinary
  vocabulary entries, as BERT's unused ids are) when the texts have fewer pieces to learn.

Only ``[PAD] [UNK] [CLS] [SEP] [MASK]`` are special (added) tokens, as in ``bert-base-uncased``;
ColBERT looks its markers up with ``convert_tokens_to_ids``. Training is deterministic: the
``tokenizers`` trainer numbers the ``##`` continuations in hash-map order (a different vocab on
every run), so they are handed to it already numbered, and the same texts give the same files
byte for byte.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterable, Iterator, Sequence
from pathlib import Path

from tokenizers import Tokenizer, models, normalizers, pre_tokenizers, trainers
from transformers import BertTokenizerFast

from jfe_jax.data.tokenizer import save_tokenizer

NUM_BERT_UNUSED = 99  # [unused0] ... [unused98] sit between [PAD] and [UNK] in BERT's vocab
BERT_HEAD: tuple[str, ...] = (
    "[PAD]",
    *(f"[unused{i}]" for i in range(NUM_BERT_UNUSED)),
    "[UNK]",
    "[CLS]",
    "[SEP]",
    "[MASK]",
)
SPECIAL_IDS: dict[str, int] = {
    token: BERT_HEAD.index(token)
    for token in ("[PAD]", "[unused0]", "[unused1]", "[UNK]", "[CLS]", "[SEP]", "[MASK]")
}
FILLER_TOKEN = "[unused{}]"
CONTINUATION = "##"
MODEL_MAX_LENGTH = 512  # bert-base-uncased's, and BertConfig.max_position_embeddings
WORDPIECE_DIR = "wordpiece_tokenizer"  # beside the data it was trained on
WORDPIECE_FILES = (
    "vocab.txt",
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
)
# The default benchmark and R2P set together have ~490 pieces to learn (~600 ids in all).
DEFAULT_VOCAB_SIZE = 1024
# Text fields of M-BEIR-format records, as the synthetic generators write them.
RECORD_FIELDS = ("query_txt", "txt", "sentence", "positive", "hard_negative", "caption")
SRC_FIELDS = ("answer", "distractors")  # R2P's query_src_content: the response R, distractors


def _bert_pipeline(lowercase: bool) -> Tokenizer:
    """An untrained WordPiece with ``BertTokenizerFast``'s normaliser and pre-tokeniser."""
    tokenizer = Tokenizer(models.WordPiece(unk_token="[UNK]", continuing_subword_prefix="##"))
    tokenizer.normalizer = normalizers.BertNormalizer(
        clean_text=True, handle_chinese_chars=True, strip_accents=None, lowercase=lowercase
    )
    tokenizer.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    return tokenizer


def _checked_texts(texts: Iterable[str]) -> list[str]:
    if isinstance(texts, str):
        raise TypeError("texts must be a list of texts, got one string")
    texts = list(texts)
    bad = [type(t).__name__ for t in texts if not isinstance(t, str)]
    if bad:
        raise ValueError(f"texts must all be strings; got {', '.join(sorted(set(bad)))}")
    if not any(t.strip() for t in texts):
        raise ValueError(f"texts is empty ({len(texts)} texts, none with a word to train on)")
    return texts


def alphabet(texts: Sequence[str], tokenizer: Tokenizer) -> tuple[list[str], list[str]]:
    """(``##c`` continuations, characters) of the words of ``texts`` as ``tokenizer``
    normalises and pre-tokenises them, each sorted: the pieces every word can be spelled with
    (the trainer keeps every character of the words, not only their first ones)."""
    characters: set[str] = set()
    continuations: set[str] = set()
    for text in texts:
        normalized = tokenizer.normalizer.normalize_str(text)
        for word, _ in tokenizer.pre_tokenizer.pre_tokenize_str(normalized):
            characters.update(word)
            continuations.update(CONTINUATION + c for c in word[1:])
    return sorted(continuations), sorted(characters)


def build_wordpiece_tokenizer(
    texts: Iterable[str], vocab_size: int, *, lowercase: bool = True
) -> BertTokenizerFast:
    """Train a BERT WordPiece on ``texts`` with exactly ``vocab_size`` ids (the module
    docstring's layout); the same texts give the same vocabulary. ValueError when ``texts``
    has no word, or ``vocab_size`` is under BERT's 104 head ids plus the texts' alphabet."""
    texts = _checked_texts(texts)
    pipeline = _bert_pipeline(lowercase)
    continuations, characters = alphabet(texts, pipeline)
    minimum = len(BERT_HEAD) + len(continuations) + len(characters)
    if vocab_size < minimum:
        raise ValueError(
            f"vocab_size={vocab_size} is too small for these texts; expected at least {minimum}"
            f" ({len(BERT_HEAD)} BERT special and unused ids + an alphabet of {len(characters)}"
            f" characters and {len(continuations)} ## continuations)"
        )
    trainer = trainers.WordPieceTrainer(
        vocab_size=vocab_size,
        min_frequency=0,
        special_tokens=[*BERT_HEAD, *continuations],  # numbered here: see the module docstring
        continuing_subword_prefix=CONTINUATION,
        show_progress=False,
    )
    pipeline.train_from_iterator(texts, trainer=trainer)
    learned = pipeline.get_vocab()
    tokens = sorted(learned, key=learned.__getitem__)
    if [learned[t] for t in tokens] != list(range(len(tokens))) or len(tokens) > vocab_size:
        raise RuntimeError(f"the WordPiece trainer gave {len(tokens)} ids, not 0..{vocab_size}")
    first_filler = NUM_BERT_UNUSED
    tokens += [FILLER_TOKEN.format(first_filler + i) for i in range(vocab_size - len(tokens))]
    tokenizer = BertTokenizerFast(
        vocab={token: i for i, token in enumerate(tokens)},
        do_lower_case=lowercase,
        model_max_length=MODEL_MAX_LENGTH,
    )
    check_wordpiece_layout(tokenizer, vocab_size)
    return tokenizer


def check_wordpiece_layout(tokenizer: BertTokenizerFast, vocab_size: int | None = None) -> None:
    """Raise ValueError unless ``tokenizer`` has ``SPECIAL_IDS`` (and ``vocab_size`` ids)."""
    if vocab_size is not None and len(tokenizer) != vocab_size:
        raise ValueError(f"tokenizer has {len(tokenizer)} ids; expected vocab_size={vocab_size}")
    vocab = tokenizer.get_vocab()
    wrong = {t: vocab.get(t) for t, i in SPECIAL_IDS.items() if vocab.get(t) != i}
    if wrong:
        raise ValueError(f"tokenizer maps {wrong}; expected BERT's ids {SPECIAL_IDS}")


def write_wordpiece_tokenizer(directory: str | os.PathLike, tokenizer: BertTokenizerFast) -> None:
    """Save in Hugging Face's layout (``WORDPIECE_FILES``), for
    ``BertTokenizerFast.from_pretrained(directory)``."""
    save_tokenizer(tokenizer, directory)
    vocab_file = Path(directory) / "vocab.txt"
    if not vocab_file.is_file():  # transformers 5 may write tokenizer.json only
        vocab = tokenizer.get_vocab()
        with open(vocab_file, "w", encoding="utf-8", newline="\n") as f:
            f.writelines(token + "\n" for token in sorted(vocab, key=vocab.__getitem__))


def _record_texts(record: dict) -> Iterator[str]:
    for field in RECORD_FIELDS:
        yield record.get(field)
    src = record.get("query_src_content")
    try:
        src = json.loads(src) if isinstance(src, str) else None
    except json.JSONDecodeError:
        src = None
    if isinstance(src, dict):
        for field in SRC_FIELDS:
            value = src.get(field)
            yield from value if isinstance(value, list) else [value]


def _root_files(root: Path) -> list[Path]:
    if not root.is_dir():
        raise FileNotFoundError(f"data root not found: {root}")
    records = sorted(root.glob("query/*/*.jsonl")) + sorted(root.glob("cand_pool/*/*.jsonl"))
    if not records:
        raise ValueError(f"{root} holds no M-BEIR query/*/*.jsonl or cand_pool/*/*.jsonl files")
    return records + sorted(root.glob("pairs/*.jsonl"))


def synthetic_texts(roots: str | os.PathLike | Sequence[str | os.PathLike]) -> Iterator[str]:
    """Every distinct text of M-BEIR-format data roots (a synthetic benchmark from
    ``synthetic.generate``, an R2P set from ``synthetic.r2p_write``), in a fixed order: query
    texts, candidate texts, R2P answers and distractors, stage-1 pair texts, instruction
    prompts. FileNotFoundError for a missing root, ValueError for one without records."""
    if isinstance(roots, (str, os.PathLike)):
        roots = [roots]
    seen: set[str] = set()
    for root in map(Path, roots):
        texts: list = []
        for path in _root_files(root):
            with open(path, encoding="utf-8") as f:
                texts += [t for line in f for t in _record_texts(json.loads(line))]
        instructions = root / "instructions" / "query_instructions.tsv"
        if instructions.is_file():
            lines = instructions.read_text(encoding="utf-8").splitlines()[1:]
            texts += [prompt for line in lines for prompt in line.split("\t")[4:]]
        for text in texts:
            if isinstance(text, str) and text.strip() and text not in seen:
                seen.add(text)
                yield text


def mire_tokenizer_for(
    roots: str | os.PathLike | Sequence[str | os.PathLike],
    vocab_size: int = DEFAULT_VOCAB_SIZE,
    *,
    lowercase: bool = True,
    save_dir: str | os.PathLike | None = None,
) -> BertTokenizerFast:
    """The WordPiece tokenizer of the data under ``roots`` (``synthetic_texts``), written to
    ``save_dir`` when given: ``Path(root) / WORDPIECE_DIR`` keeps it with the data."""
    tokenizer = build_wordpiece_tokenizer(
        list(synthetic_texts(roots)), vocab_size, lowercase=lowercase
    )
    if save_dir is not None:
        write_wordpiece_tokenizer(save_dir, tokenizer)
    return tokenizer
