"""ColBERT's query and document layout against a transcription of the reference's tensorize
code, with a BERT WordPiece tokenizer trained here (no download)."""

import string

import numpy as np
import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")
tokenizers = pytest.importorskip("tokenizers")

from jfe_jax.models.mire.tokens import ColBERTTokenizer  # noqa: E402

SPECIAL = ["[PAD]", "[unused0]", "[unused1]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]
TEXTS = [
    "What is the red bird, sitting on the fence?",
    "a dog",
    "Where was this photo taken; in Paris or in Rome? Tell me, please!" * 3,  # truncated
]


@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory):
    corpus = [t.lower() for t in TEXTS] + [
        "the quick brown fox jumps over the lazy dog",
        "photos of birds, dogs and cities: paris, rome, london.",
    ]
    trainer = tokenizers.BertWordPieceTokenizer(lowercase=True)
    trainer.train_from_iterator(corpus, vocab_size=120, special_tokens=SPECIAL)
    directory = tmp_path_factory.mktemp("bert_tokenizer")
    trainer.save_model(str(directory))
    # transformers 5 reads the vocabulary from `vocab` (a `vocab_file` argument is ignored).
    return transformers.BertTokenizerFast(vocab=str(directory / "vocab.txt"))


def _reference_query(tok, texts, maxlen, attend_to_mask_tokens):
    """ColBERT QueryTokenizer.tensorize, transcribed."""
    obj = tok(
        [". " + x for x in texts],
        padding="max_length",
        truncation=True,
        return_tensors="pt",
        max_length=maxlen,
    )
    ids, mask = obj["input_ids"], obj["attention_mask"]
    ids[:, 1] = tok.convert_tokens_to_ids("[unused0]")
    ids[ids == tok.pad_token_id] = tok.mask_token_id
    if attend_to_mask_tokens:
        mask[ids == tok.mask_token_id] = 1
    return ids.numpy(), mask.numpy()


def _reference_documents(tok, texts, maxlen):
    """ColBERT DocTokenizer.tensorize and ColBERT.mask's skiplist, transcribed."""
    obj = tok(
        [". " + x for x in texts],
        padding="longest",
        truncation="longest_first",
        return_tensors="pt",
        max_length=maxlen,
    )
    ids, mask = obj["input_ids"], obj["attention_mask"]
    ids[:, 1] = tok.convert_tokens_to_ids("[unused1]")
    skiplist = {
        w: True
        for symbol in string.punctuation
        for w in [symbol, tok.encode(symbol, add_special_tokens=False)[0]]
    }
    keep = [[(x not in skiplist) and (x != tok.pad_token_id) for x in d] for d in ids.tolist()]
    return ids.numpy(), mask.numpy(), np.asarray(keep, np.int32)


@pytest.mark.parametrize("mask_mode", ["consistent", "reference_train", "reference_eval"])
def test_queries_are_laid_out_as_colbert_does(tokenizer, mask_mode):
    ids, mask = ColBERTTokenizer(tokenizer, query_maxlen=16, mask_mode=mask_mode).queries(TEXTS)
    want_ids, tokenizer_mask = _reference_query(tokenizer, TEXTS, 16, attend_to_mask_tokens=False)
    np.testing.assert_array_equal(ids, want_ids)
    assert ids.shape == (3, 16) and (ids[:, 1] == 1).all()  # [unused0] after [CLS]
    assert (ids[1] == tokenizer.mask_token_id).sum() > 0  # the short query is augmented
    assert ids[2, -1] == tokenizer.sep_token_id  # the long one is truncated, [SEP] kept
    if mask_mode == "reference_eval":
        np.testing.assert_array_equal(mask, tokenizer_mask)  # [MASK] not attended, zeroed
        assert mask[1].sum() < 16
    else:
        # MIRe's training collate: ids != [PAD] after the replacement, i.e. every position.
        _, attended = _reference_query(tokenizer, TEXTS, 16, attend_to_mask_tokens=True)
        np.testing.assert_array_equal(mask, attended)
        assert mask.all()


@pytest.mark.parametrize("mask_punctuation", [True, False])
def test_documents_mask_padding_and_punctuation_as_colbert_does(tokenizer, mask_punctuation):
    colbert = ColBERTTokenizer(tokenizer, doc_maxlen=20, mask_punctuation=mask_punctuation)
    ids, attention, keep = colbert.documents(TEXTS)
    want_ids, want_attention, want_keep = _reference_documents(tokenizer, TEXTS, 20)
    np.testing.assert_array_equal(ids, want_ids)
    np.testing.assert_array_equal(attention, want_attention)
    assert (ids[:, 1] == 2).all()  # [unused1] after [CLS]
    if mask_punctuation:
        np.testing.assert_array_equal(keep, want_keep)
        comma = tokenizer.convert_tokens_to_ids(",")
        assert (ids == comma).any() and not keep[ids == comma].any()
    else:  # a MIRe-checkpoint index: the attention mask is the document mask
        np.testing.assert_array_equal(keep, want_attention)


def test_bad_settings_are_refused(tokenizer):
    with pytest.raises(ValueError, match="mask_mode='train'"):
        ColBERTTokenizer(tokenizer, mask_mode="train")
    with pytest.raises(ValueError, match="query_maxlen=2"):
        ColBERTTokenizer(tokenizer, query_maxlen=2)
    with pytest.raises(TypeError, match="one string"):
        ColBERTTokenizer(tokenizer).queries("a dog")
    plain = transformers.PreTrainedTokenizerFast(
        tokenizer_object=tokenizer.backend_tokenizer, pad_token="[PAD]"
    )
    vocab = {k: v for k, v in tokenizer.get_vocab().items() if k != "[unused1]"}
    plain.get_vocab = lambda: vocab
    with pytest.raises(ValueError, match=r"has no \[unused1\]"):
        ColBERTTokenizer(plain)


@pytest.mark.parametrize("mask_mode", ["reference_eval", "consistent"])
def test_query_and_document_vectors_equal_pytorch_colbert_on_these_inputs(tokenizer, mask_mode):
    import jax.numpy as jnp

    from jfe_jax.models.mire.text import (
        BertConfig,
        ColBERTEncoder,
        colbert_from_torch,
        token_vectors,
    )

    torch.manual_seed(0)
    hf = transformers.BertConfig(
        vocab_size=len(tokenizer.get_vocab()),
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=4,
        intermediate_size=37,
        max_position_embeddings=32,
        attn_implementation="eager",
    )
    bert, linear = transformers.BertModel(hf).eval(), torch.nn.Linear(32, 16, bias=False)
    state = {f"bert.{k}": v for k, v in bert.state_dict().items()}
    state["linear.weight"] = linear.weight.detach()
    encoder = ColBERTEncoder(BertConfig.from_hf(hf.to_dict(), dim=16))
    params = colbert_from_torch(state, encoder.config)
    colbert = ColBERTTokenizer(tokenizer, query_maxlen=16, doc_maxlen=20, mask_mode=mask_mode)

    def reference(ids, attention, keep):  # ColBERT.query / ColBERT.doc as MIRe calls them
        with torch.no_grad():
            out = linear(bert(torch.tensor(ids), attention_mask=torch.tensor(attention))[0])
            out = out * torch.tensor(keep)[..., None].float()
            return torch.nn.functional.normalize(out, p=2, dim=2).numpy()

    q_ids, q_mask = colbert.queries(TEXTS)
    got = token_vectors(encoder.apply(params, jnp.asarray(q_ids), jnp.asarray(q_mask)), q_mask)
    assert np.abs(np.asarray(got) - reference(q_ids, q_mask, q_mask)).max() <= 1e-4
    d_ids, attention, keep = colbert.documents(TEXTS)
    got = token_vectors(encoder.apply(params, jnp.asarray(d_ids), jnp.asarray(attention)), keep)
    assert np.abs(np.asarray(got) - reference(d_ids, attention, keep)).max() <= 1e-4
