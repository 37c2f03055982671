"""MIRe's offline BERT WordPiece tokenizer (issue 34 item 2): BERT's special-token ids, byte-
identical files for the same texts, no [UNK] on the synthetic world's words, lower-casing, the
Hugging Face layout loaded back, and ColBERT's [Q]/[D] markers and [MASK] query padding."""

import json
import re
from pathlib import Path

import numpy as np
import pytest
import transformers

from jfe_jax.data.mire_tokenizer import (  # noqa: E402
    BERT_HEAD,
    SPECIAL_IDS,
    WORDPIECE_DIR,
    WORDPIECE_FILES,
    build_wordpiece_tokenizer,
    check_wordpiece_layout,
    mire_tokenizer_for,
    synthetic_texts,
    write_wordpiece_tokenizer,
)
from jfe_jax.data.synthetic.generate import SyntheticConfig, generate  # noqa: E402
from jfe_jax.data.synthetic.r2p_write import R2PConfig, generate_r2p  # noqa: E402
from jfe_jax.models.mire.tokens import ColBERTTokenizer  # noqa: E402

BENCH = SyntheticConfig(
    seed=3,
    train_queries_per_task=5,
    val_queries_per_task=2,
    test_queries_per_task=4,
    num_text_triples=6,
    num_image_captions=4,
    tokenizer_vocab_size=0,
)
R2P = R2PConfig(seed=3, num_scenes=12, image_size=(56, 56))
VOCAB_SIZE = 600
# bert-base-uncased's vocab.txt: [PAD] 0, [unused0] 1 ... [unused98] 99, then these.
BERT_IDS = {"[PAD]": 0, "[unused0]": 1, "[unused1]": 2, "[UNK]": 100}
BERT_IDS |= {"[CLS]": 101, "[SEP]": 102, "[MASK]": 103}
QUERIES = ["What is at the TOP of the picture?", "a red circle"]
DOCS = ["There is a small green triangle at the top, alone.", "circle"]


@pytest.fixture(scope="module")
def roots(tmp_path_factory) -> list[Path]:
    base = tmp_path_factory.mktemp("mire_tokenizer_data")
    generate(str(base / "bench"), BENCH, progress=False)
    generate_r2p(base / "r2p", R2P)
    return [base / "bench", base / "r2p"]


@pytest.fixture(scope="module")
def texts(roots) -> list[str]:
    return list(synthetic_texts(roots))


@pytest.fixture(scope="module")
def saved(texts, tmp_path_factory) -> Path:
    directory = tmp_path_factory.mktemp("wordpiece")
    write_wordpiece_tokenizer(directory, build_wordpiece_tokenizer(texts, VOCAB_SIZE))
    return directory


@pytest.fixture(scope="module")
def loaded(saved):
    return transformers.BertTokenizerFast.from_pretrained(saved)


def _files(directory: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(directory.iterdir())}


def _greedy_wordpiece(word: str, vocab: dict[str, int]) -> list[int]:
    """BERT's WordPiece, longest match first, written out: an independent reading of vocab.txt."""
    ids, start = [], 0
    while start < len(word):
        end = len(word)
        while (piece := ("##" if start else "") + word[start:end]) not in vocab:
            end -= 1
            assert end > start, f"{word!r} has no piece at {start}"
        ids.append(vocab[piece])
        start = end
    return ids


# --- layout and ids -------------------------------------------------------------------------


def test_special_ids_are_bert_uncased_ones(saved, loaded):
    assert SPECIAL_IDS == BERT_IDS
    lines = (saved / "vocab.txt").read_text(encoding="utf-8").splitlines()
    assert len(lines) == len(loaded) == VOCAB_SIZE
    assert tuple(lines[:104]) == BERT_HEAD
    assert lines[:3] == ["[PAD]", "[unused0]", "[unused1]"] and lines[99] == "[unused98]"
    assert lines[100:104] == ["[UNK]", "[CLS]", "[SEP]", "[MASK]"]
    for token, token_id in BERT_IDS.items():
        assert loaded.convert_tokens_to_ids(token) == token_id
    assert (loaded.pad_token_id, loaded.unk_token_id, loaded.mask_token_id) == (0, 100, 103)
    assert (loaded.cls_token_id, loaded.sep_token_id) == (101, 102)
    # Only BERT's five specials are added tokens; the [unused] markers are plain vocab entries.
    assert sorted(loaded.get_added_vocab().values()) == [0, 100, 101, 102, 103]
    # The synthetic world has fewer pieces than VOCAB_SIZE: fillers continue BERT's numbering.
    assert lines[-1].startswith("[unused") and "[unused99]" in lines[104:]
    check_wordpiece_layout(loaded, VOCAB_SIZE)
    with pytest.raises(ValueError, match="vocab_size=601"):
        check_wordpiece_layout(loaded, VOCAB_SIZE + 1)


def test_same_texts_give_byte_identical_files_and_other_texts_other_ones(texts, saved, tmp_path):
    # The tokenizers trainer alone numbers ## pieces in hash-map order, different every call.
    for attempt in range(3):
        again = tmp_path / f"again{attempt}"
        write_wordpiece_tokenizer(again, build_wordpiece_tokenizer(texts, VOCAB_SIZE))
        assert _files(again) == _files(saved)
    assert sorted(_files(saved)) == sorted(WORDPIECE_FILES)
    other = tmp_path / "other"
    write_wordpiece_tokenizer(other, build_wordpiece_tokenizer(texts[: len(texts) // 2], 300))
    assert _files(other)["vocab.txt"] != _files(saved)["vocab.txt"]


# --- tokenising -----------------------------------------------------------------------------


@pytest.mark.parametrize("vocab_size", [None, VOCAB_SIZE])  # None: the alphabet alone
def test_every_training_word_tokenises_without_unk(texts, vocab_size):
    if vocab_size is None:
        with pytest.raises(ValueError, match=r"at least (\d+)") as error:
            build_wordpiece_tokenizer(texts, 1)
        vocab_size = int(re.search(r"at least (\d+)", str(error.value)).group(1))
    tokenizer = build_wordpiece_tokenizer(texts, vocab_size)
    ids = tokenizer(texts, add_special_tokens=False)["input_ids"]
    unknown = [t for t, row in zip(texts, ids) if tokenizer.unk_token_id in row]
    assert not unknown
    assert sum(map(len, ids)) >= sum(len(t.split()) for t in texts)


def test_the_saved_tokenizer_is_bert_wordpiece_on_its_vocab_txt(saved, loaded, texts):
    lines = (saved / "vocab.txt").read_text(encoding="utf-8").splitlines()
    vocab = {token: i for i, token in enumerate(lines)}
    basic = transformers.BertTokenizerFast(vocab=vocab).backend_tokenizer
    for text in texts[:50] + QUERIES + DOCS:
        words = [
            w for w, _ in basic.pre_tokenizer.pre_tokenize_str(basic.normalizer.normalize_str(text))
        ]
        want = [101] + [i for w in words for i in _greedy_wordpiece(w, vocab)] + [102]
        assert loaded(text)["input_ids"] == want, text


def test_lower_casing(texts):
    lower = build_wordpiece_tokenizer(texts + ["Café au lait"], VOCAB_SIZE)
    assert lower("A RED Circle")["input_ids"] == lower("a red circle")["input_ids"]
    assert lower("Café")["input_ids"] == lower("cafe")["input_ids"]  # accents stripped
    assert not any(t != t.lower() for t in lower.get_vocab() if not t.startswith("["))
    cased = build_wordpiece_tokenizer(texts + ["Café au lait"], VOCAB_SIZE, lowercase=False)
    assert cased("Red")["input_ids"] != cased("red")["input_ids"]
    assert cased.unk_token_id not in cased("Café What")["input_ids"]
    assert {"R", "é", "##é"} & set(cased.get_vocab())


# --- ColBERT --------------------------------------------------------------------------------


def test_colbert_wraps_it_with_the_markers_and_mask_padding(saved, loaded):
    colbert = ColBERTTokenizer(loaded, query_maxlen=16, doc_maxlen=24)
    ids, mask = colbert.queries(QUERIES)
    assert ids.shape == (2, 16) and (mask == 1).all()
    assert (ids[:, 0] == 101).all() and (ids[:, 1] == 1).all()  # [CLS] [Q]
    words = loaded(QUERIES[1], add_special_tokens=False)["input_ids"]
    assert ids[1].tolist() == [101, 1, *words, 102] + [103] * (16 - 3 - len(words))
    assert 0 not in ids  # every [PAD] became [MASK]
    doc_ids, doc_mask, keep = colbert.documents(DOCS)
    assert (doc_ids[:, 1] == 2).all()  # [D]
    assert doc_ids[1, doc_mask[1] == 0].tolist() == [0] * int((doc_mask[1] == 0).sum()) != []
    comma, period = loaded.convert_tokens_to_ids([",", "."])
    assert not keep[doc_ids == comma].any() and not keep[doc_ids == period].any()
    # The same as for a BERT tokenizer built by hand from the saved vocab.txt.
    by_hand = transformers.BertTokenizerFast(
        vocab={t: i for i, t in enumerate((saved / "vocab.txt").read_text().splitlines())}
    )
    reference = ColBERTTokenizer(by_hand, query_maxlen=16, doc_maxlen=24)
    np.testing.assert_array_equal(reference.queries(QUERIES)[0], ids)
    for got, want in zip(colbert.documents(DOCS), reference.documents(DOCS)):
        np.testing.assert_array_equal(got, want)


# --- the synthetic text and writing it with the data ----------------------------------------


def test_synthetic_texts_hold_every_kind_of_text(roots, texts):
    assert len(texts) == len(set(texts)) and texts == list(synthetic_texts(roots))
    bench, r2p = roots
    query = json.loads((r2p / f"query/train/mbeir_{R2P.task}_train.jsonl").open().readline())
    src = json.loads(query["query_src_content"])
    passage = json.loads(
        (r2p / "cand_pool/global/mbeir_union_train_cand_pool.jsonl").open().readline()
    )
    caption = json.loads((bench / "pairs/image_captions.jsonl").open().readline())
    prompt = (bench / "instructions/query_instructions.tsv").read_text().splitlines()[1]
    wanted = [query["query_txt"], src["answer"], *src["distractors"], passage["txt"]]
    wanted += [caption["caption"], prompt.split("\t")[4]]
    assert set(wanted) <= set(texts)
    assert set(synthetic_texts(r2p)) < set(texts)


def test_mire_tokenizer_for_writes_it_with_the_data(roots, texts, saved):
    save_dir = roots[1] / WORDPIECE_DIR
    tokenizer = mire_tokenizer_for(roots, VOCAB_SIZE, save_dir=save_dir)
    assert _files(save_dir) == _files(saved)
    assert transformers.BertTokenizerFast.from_pretrained(save_dir).get_vocab() == (
        tokenizer.get_vocab()
    )


def test_bad_input_is_refused(texts, tmp_path):
    for empty in ([], ["", "  \n"]):
        with pytest.raises(ValueError, match="texts is empty"):
            build_wordpiece_tokenizer(empty, VOCAB_SIZE)
    with pytest.raises(TypeError, match="one string"):
        build_wordpiece_tokenizer("a red circle", VOCAB_SIZE)
    with pytest.raises(ValueError, match="strings; got int"):
        build_wordpiece_tokenizer(["a", 3], VOCAB_SIZE)
    with pytest.raises(ValueError, match=r"vocab_size=106 is too small.*at least 107 \(104 BERT"):
        build_wordpiece_tokenizer(["ab ab"], 106)  # 104 BERT ids + ##b, a, b
    tokenizer = build_wordpiece_tokenizer(["ab ab"], 108)
    assert tokenizer.convert_ids_to_tokens([104, 105, 106, 107]) == ["##b", "a", "b", "ab"]
    with pytest.raises(FileNotFoundError, match="data root not found"):
        list(synthetic_texts(tmp_path / "missing"))
    with pytest.raises(ValueError, match="no M-BEIR"):
        list(synthetic_texts(tmp_path))
