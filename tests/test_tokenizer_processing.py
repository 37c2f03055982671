"""The offline Qwen2-style tokenizer and the item encoding (chat layout, image tokens)."""

import json

import numpy as np
import pytest
from PIL import Image
from transformers import AutoTokenizer

from jfe_jax.data.image_processor import ImageProcessor
from jfe_jax.data.processing import (
    DEFAULT_EMBED_PROMPT,
    ProcessedItem,
    build_text,
    encode_item,
)
from jfe_jax.data.tokenizer import build_tokenizer, check_tokenizer_layout, load_tokenizer
from jfe_jax.models.sizes import SPECIAL_TOKENS, special_token_ids

VOCAB_SIZE = 512
ASSISTANT_TAIL = "<|im_end|>\n<|im_start|>assistant\n"


def _corpus(num_sentences: int = 400, seed: int = 0) -> list[str]:
    """Sentences of random lowercase words: enough distinct pairs to learn 500 merges."""
    rng = np.random.default_rng(seed)
    letters = np.array(list("abcdefghijklmnopqrstuvwxyz"))
    words = ["".join(rng.choice(letters, rng.integers(3, 10))) for _ in range(300)]
    return [" ".join(rng.choice(words, rng.integers(4, 12))) + "." for _ in range(num_sentences)]


@pytest.fixture(scope="module")
def tokenizer():
    return build_tokenizer(_corpus(), VOCAB_SIZE)


@pytest.fixture(scope="module")
def image_processor():
    # Small pixel bounds keep the image-token counts (and the test) small.
    return ImageProcessor(min_pixels=28 * 28 * 4, max_pixels=28 * 28 * 16)


def _image(height=100, width=150, seed=0):
    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 256, (height, width, 3), dtype=np.uint8))


# ----------------------------------------------------------------------------- tokenizer


def _assert_layout(tokenizer, vocab_size):
    assert len(tokenizer) == vocab_size
    for offset, token in enumerate(SPECIAL_TOKENS):
        assert tokenizer.convert_tokens_to_ids(token) == vocab_size - 16 + offset
    for field, token_id in special_token_ids(vocab_size).items():
        token = {
            "vision_start_token_id": "<|vision_start|>",
            "vision_end_token_id": "<|vision_end|>",
            "image_token_id": "<|image_pad|>",
            "video_token_id": "<|video_pad|>",
        }[field]
        assert tokenizer.convert_tokens_to_ids(token) == token_id
    tail = tokenizer.convert_ids_to_tokens([vocab_size - 2, vocab_size - 1])
    assert all(token.startswith("<|reserved_") for token in tail)
    assert tokenizer.pad_token == "<|endoftext|>" and tokenizer.pad_token_id == vocab_size - 16
    assert tokenizer.eos_token == "<|im_end|>" and tokenizer.eos_token_id == vocab_size - 14


def test_tokenizer_has_exact_vocab_size_and_qwen_special_ids(tokenizer):
    _assert_layout(tokenizer, VOCAB_SIZE)
    check_tokenizer_layout(tokenizer, VOCAB_SIZE)
    # The corpus is rich enough: every id below the special block is a learned BPE token.
    regular = tokenizer.convert_ids_to_tokens(list(range(VOCAB_SIZE - 16)))
    assert not any(token.startswith("<|") for token in regular)


def test_small_corpus_is_padded_with_reserved_tokens_to_the_exact_size():
    tokenizer = build_tokenizer(["a cat.", "a dog."], 400)
    _assert_layout(tokenizer, 400)
    assert tokenizer.convert_ids_to_tokens(400 - 17).startswith("<|reserved_")
    assert tokenizer.convert_ids_to_tokens(0) == "!"  # byte symbols first, as in GPT-2/Qwen2


def test_tokenizer_refuses_a_vocabulary_too_small_for_bytes_and_specials():
    with pytest.raises(ValueError, match="at least 272"):
        build_tokenizer(["a"], 271)


def test_tokenizer_training_is_deterministic(tokenizer):
    again = build_tokenizer(_corpus(), VOCAB_SIZE)
    assert again.get_vocab() == tokenizer.get_vocab()


def test_any_text_round_trips_through_byte_level_bpe(tokenizer):
    text = "Ünïcödé, 日本語 and emoji 🐱 — unseen in training!\n\ttabs"
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    assert max(ids) < VOCAB_SIZE - 16
    assert tokenizer.decode(ids) == text


def test_tokenizer_saves_and_loads_through_autotokenizer(tokenizer, tmp_path):
    build_tokenizer(_corpus(), VOCAB_SIZE, save_dir=tmp_path)
    for name in ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json"):
        assert (tmp_path / name).is_file()
    special_map = json.loads((tmp_path / "special_tokens_map.json").read_text())
    assert special_map["pad_token"] == "<|endoftext|>" and special_map["eos_token"] == "<|im_end|>"

    loaded = AutoTokenizer.from_pretrained(tmp_path, local_files_only=True)
    _assert_layout(loaded, VOCAB_SIZE)
    text = build_text("a photo of a cat.", has_image=True, instruction="Find the image.")
    assert loaded(text)["input_ids"] == tokenizer(text)["input_ids"]
    assert load_tokenizer(tmp_path).get_vocab() == tokenizer.get_vocab()


def test_load_tokenizer_names_a_directory_without_tokenizer(tmp_path):
    with pytest.raises(FileNotFoundError, match="no tokenizer in .*expected one of tokenizer.json"):
        load_tokenizer(tmp_path)
    with pytest.raises(FileNotFoundError, match="tokenizer directory not found"):
        load_tokenizer(tmp_path / "missing")


# ----------------------------------------------------------------------------- layout


def test_build_text_layouts():
    prompt = DEFAULT_EMBED_PROMPT
    assert build_text("a dog", has_image=False) == (
        f"<|im_start|>user\na dog\n{prompt}{ASSISTANT_TAIL}"
    )
    assert build_text(None, has_image=True) == (
        f"<|im_start|>user\n<|vision_start|><|image_pad|><|vision_end|>\n{prompt}{ASSISTANT_TAIL}"
    )
    assert build_text("  a dog ", True, instruction=" Find it. ", prompt="One word:") == (
        "<|im_start|>user\nFind it. <|vision_start|><|image_pad|><|vision_end|>a dog\n"
        f"One word:{ASSISTANT_TAIL}"
    )
    assert build_text("a dog", False, instruction="Find it.") == (
        f"<|im_start|>user\nFind it. a dog\n{prompt}{ASSISTANT_TAIL}"
    )


def test_build_text_treats_blank_text_with_an_image_as_image_only():
    assert build_text("   ", has_image=True) == build_text(None, has_image=True)


# ----------------------------------------------------------------------------- encode_item


def _decode(tokenizer, item: ProcessedItem) -> str:
    return tokenizer.decode(item.input_ids.tolist())


def test_encode_text_only(tokenizer, image_processor):
    item = encode_item(tokenizer, image_processor, text="a red car on a road")
    assert item.input_ids.dtype == np.int32 and item.input_ids.ndim == 1
    assert item.pixel_values is None and item.image_grid_thw is None
    assert _decode(tokenizer, item) == build_text("a red car on a road", has_image=False)
    assert item.input_ids[-1] == tokenizer("\n")["input_ids"][0]


def _check_image_tokens(tokenizer, item: ProcessedItem) -> int:
    """Asserts the image block is contiguous and sized prod(grid) / 4; returns its size."""
    grid = item.image_grid_thw
    assert grid.dtype == np.int64 and grid.shape == (1, 3)
    assert item.pixel_values.dtype == np.float32
    assert item.pixel_values.shape == (int(np.prod(grid)), 3 * 2 * 14 * 14)
    ids = special_token_ids(VOCAB_SIZE)
    num_image_tokens = int(np.prod(grid)) // 4
    positions = np.flatnonzero(item.input_ids == ids["image_token_id"])
    assert len(positions) == num_image_tokens
    assert item.input_ids[positions[0] - 1] == ids["vision_start_token_id"]
    assert item.input_ids[positions[-1] + 1] == ids["vision_end_token_id"]
    assert np.all(np.diff(positions) == 1)
    return num_image_tokens


def _collapse_image_tokens(text: str, count: int) -> str:
    return text.replace("<|image_pad|>" * count, "<|image_pad|>")


def test_encode_image_only(tokenizer, image_processor):
    item = encode_item(tokenizer, image_processor, image=_image())
    count = _check_image_tokens(tokenizer, item)
    np.testing.assert_array_equal(item.image_grid_thw, [[1, 6, 8]])
    assert count == 12
    assert _collapse_image_tokens(_decode(tokenizer, item), count) == build_text(None, True)


def test_encode_image_text_and_instruction(tokenizer, image_processor):
    kwargs = dict(text="a cat on a sofa.", instruction="Retrieve a matching caption.")
    item = encode_item(tokenizer, image_processor, image=_image(300, 200), **kwargs)
    count = _check_image_tokens(tokenizer, item)
    expected = build_text(kwargs["text"], True, kwargs["instruction"])
    assert _collapse_image_tokens(_decode(tokenizer, item), count) == expected
    pixel_values, grid = image_processor([_image(300, 200)])
    np.testing.assert_array_equal(item.pixel_values, pixel_values)
    np.testing.assert_array_equal(item.image_grid_thw, grid)


def test_encode_reads_an_image_path_under_a_root(tokenizer, image_processor, tmp_path):
    _image().save(tmp_path / "cat.png")
    item = encode_item(tokenizer, image_processor, image="cat.png", image_root=tmp_path)
    direct = encode_item(tokenizer, image_processor, image=_image())
    np.testing.assert_array_equal(item.input_ids, direct.input_ids)
    np.testing.assert_array_equal(item.pixel_values, direct.pixel_values)


def test_encode_rejects_an_item_without_content(tokenizer, image_processor):
    with pytest.raises(ValueError, match="has neither text nor image"):
        encode_item(tokenizer, image_processor)
    with pytest.raises(ValueError, match="empty or whitespace-only"):
        encode_item(tokenizer, image_processor, text=" \n\t")


def test_encode_rejects_special_tokens_inside_user_text(tokenizer, image_processor):
    with pytest.raises(ValueError, match=r"text contains the special token '<\|image_pad\|>'"):
        encode_item(tokenizer, image_processor, text="a <|image_pad|> b", image=_image())
    with pytest.raises(ValueError, match="instruction contains the special token"):
        encode_item(tokenizer, image_processor, text="a", instruction="x<|im_end|>")


def test_encode_over_max_length_raises_naming_the_lengths(tokenizer, image_processor):
    text = "a very long caption " * 20
    full = encode_item(tokenizer, image_processor, text=text, image=_image())
    limit = len(full.input_ids) - 5
    with pytest.raises(ValueError, match=rf"{len(full.input_ids)} tokens .* max_length is {limit}"):
        encode_item(tokenizer, image_processor, text=text, image=_image(), max_length=limit)
    with pytest.raises(ValueError, match="lower the image processor's max_pixels"):
        encode_item(tokenizer, image_processor, image=_image(), max_length=10)


def test_truncate_text_shortens_only_the_text(tokenizer, image_processor):
    text = "a very long caption about a cat " * 10
    full = encode_item(tokenizer, image_processor, text=text, image=_image())
    assert not full.text_truncated
    limit = len(full.input_ids) - 17
    item = encode_item(
        tokenizer,
        image_processor,
        text=text,
        image=_image(),
        instruction="Find it.",
        max_length=limit,
        truncate_text=True,
    )
    assert item.text_truncated
    assert limit - 2 <= len(item.input_ids) <= limit
    count = _check_image_tokens(tokenizer, item)
    decoded = _collapse_image_tokens(_decode(tokenizer, item), count)
    head = "<|im_start|>user\nFind it. <|vision_start|><|image_pad|><|vision_end|>"
    tail = f"\n{DEFAULT_EMBED_PROMPT}{ASSISTANT_TAIL}"
    assert decoded.startswith(head) and decoded.endswith(tail)
    kept = decoded[len(head) : -len(tail)]
    assert 0 < len(kept) < len(text.strip()) and text.startswith(kept)


def test_truncate_text_refuses_when_nothing_but_text_fits(tokenizer, image_processor):
    with pytest.raises(ValueError, match="without its text"):
        encode_item(
            tokenizer,
            image_processor,
            text="hello",
            image=_image(),
            max_length=20,
            truncate_text=True,
        )
