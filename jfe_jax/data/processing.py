"""One retrieval item (text, image, or both) -> Qwen2-VL token ids and image patches.

The layout is Qwen2-VL's chat format with one user turn, no system turn, and the embedding
prompt after the content; the embedding is read at the last token (the newline after
``assistant``). Concatenated, with ``\\n`` a newline::

    <|im_start|>user\\n
    {instruction} and one space                     only with an instruction
    <|vision_start|><|image_pad|><|vision_end|>     only with an image
    {text}                                          only with a text
    \\n{prompt}<|im_end|>\\n<|im_start|>assistant\\n

Instruction and text are stripped of surrounding whitespace; a blank one counts as absent.
As Qwen2VLProcessor does, the single ``<|image_pad|>`` is expanded to
``prod(image_grid_thw) // merge_size**2`` copies before the whole string is tokenized, so
the ids are what transformers produces for the same string.
"""

from __future__ import annotations

import dataclasses
import os

import numpy as np
from transformers import PreTrainedTokenizerBase

from jfe_jax.data.image_processor import ImageInput, ImageProcessor
from jfe_jax.models.image_patches import ImagePatches, pixel_values_shape, write_pixel_values
from jfe_jax.models.sizes import SPECIAL_TOKENS
from jfe_jax.train import config_base

DEFAULT_EMBED_PROMPT = config_base.DEFAULTS.data.prompt  # the training config's (data.prompt)
IMAGE_TOKEN = "<|image_pad|>"
VISION_BLOCK = "<|vision_start|>{}<|vision_end|>"
USER_HEADER = "<|im_start|>user\n"
ASSISTANT_HEADER = "<|im_end|>\n<|im_start|>assistant\n"


@dataclasses.dataclass(frozen=True, init=False)
class ProcessedItem:
    """Model inputs for one item.

    The image is held as ``patches``: the uint8 ``ImagePatches`` that ``encode_item`` makes
    (an eighth of the float32 bytes; collate normalises them straight into the batch), or
    float32 pixel values given as ``pixel_values``. Either way ``pixel_values`` reads the
    float32 ``[patches, patch_dim]`` of the image processor (computed on each read for
    uint8 patches: ``num_patches`` is the cheap way to count them).
    """

    input_ids: np.ndarray  # int32 [L]
    patches: ImagePatches | np.ndarray | None  # see above; None without an image
    image_grid_thw: np.ndarray | None  # int64 [images, 3], None without an image
    text_truncated: bool = False  # True when truncate_text shortened the text to fit

    # Written out so that ``ProcessedItem(ids, pixel_values, grid)`` still builds an item from
    # float32 pixels; ``patches=`` is what dataclasses.replace passes.
    def __init__(
        self,
        input_ids: np.ndarray,
        pixel_values: np.ndarray | None = None,
        image_grid_thw: np.ndarray | None = None,
        text_truncated: bool = False,
        *,
        patches: ImagePatches | np.ndarray | None = None,
    ):
        if pixel_values is not None and patches is not None:
            raise ValueError(
                "ProcessedItem got both pixel_values and patches; expected one (to change an "
                "item's image: dataclasses.replace(item, patches=...))"
            )
        object.__setattr__(self, "input_ids", input_ids)
        object.__setattr__(self, "patches", patches if pixel_values is None else pixel_values)
        object.__setattr__(self, "image_grid_thw", image_grid_thw)
        object.__setattr__(self, "text_truncated", text_truncated)

    @property
    def pixel_values(self) -> np.ndarray | None:
        """float32 ``[patches, patch_dim]``, normalised, or None without an image."""
        if isinstance(self.patches, ImagePatches):
            return self.patches.pixel_values()
        return self.patches

    @property
    def num_patches(self) -> int:
        """Image patches of the item (0 without an image), without computing them."""
        return 0 if self.patches is None else int(pixel_values_shape(self.patches)[0])

    def write_pixel_values(self, out: np.ndarray) -> None:
        """Writes ``pixel_values`` into ``out`` (float32 ``[patches, patch_dim]``, e.g. the
        patch rows of a batch row), without a float32 copy of the item's own."""
        write_pixel_values(self.patches, out)


def _layout(
    text: str | None, has_image: bool, instruction: str | None, prompt: str, image_tokens: int
) -> tuple[str, str, str]:
    """The item as (before the text, the text, after the text); validates the content."""
    text = text.strip() if text is not None else None
    if not text and not has_image:
        if text is None:
            raise ValueError("item has neither text nor image; expected at least one")
        raise ValueError("item text is empty or whitespace-only and there is no image")
    instruction = instruction.strip() if instruction else ""
    before = USER_HEADER + (instruction + " " if instruction else "")
    if has_image:
        before += VISION_BLOCK.format(IMAGE_TOKEN * image_tokens)
    return before, text or "", "\n" + prompt + ASSISTANT_HEADER


def build_text(
    text: str | None,
    has_image: bool,
    instruction: str | None = None,
    prompt: str = DEFAULT_EMBED_PROMPT,
) -> str:
    """The chat-formatted string of one item, with a single ``<|image_pad|>`` for an image.

    See the module docstring for the layout. A blank text counts as no text; ValueError when
    there is neither text nor image.
    """
    return "".join(_layout(text, has_image, instruction, prompt, image_tokens=1))


def _special_tokens(tokenizer: PreTrainedTokenizerBase) -> set[str]:
    """Strings the tokenizer turns into special ids wherever they appear."""
    added = getattr(tokenizer, "added_tokens_decoder", {}) or {}
    return set(SPECIAL_TOKENS) | {token.content for token in added.values() if token.special}


def _check_no_special_tokens(tokenizer: PreTrainedTokenizerBase, **fields: str | None) -> None:
    """ValueError if user-supplied strings contain special tokens (they would change the
    layout, e.g. a literal <|image_pad|> would break the image-token count)."""
    specials = _special_tokens(tokenizer)
    for name, value in fields.items():
        if not value:
            continue
        for token in specials:
            if token in value:
                raise ValueError(
                    f"{name} contains the special token {token!r}; expected plain text"
                )


def _tokenize(
    tokenizer: PreTrainedTokenizerBase, before: str, text: str, after: str
) -> tuple[list[int], list[int]]:
    """Token ids of the whole string, and the end offsets of tokens lying inside the text."""
    encoding = tokenizer(
        before + text + after, add_special_tokens=False, return_offsets_mapping=True
    )
    start, stop = len(before), len(before) + len(text)
    text_token_ends = [
        end for begin, end in encoding["offset_mapping"] if start <= begin < end <= stop
    ]
    return list(encoding["input_ids"]), [end - start for end in text_token_ends]


def _truncate_text(
    tokenizer: PreTrainedTokenizerBase, before: str, text: str, after: str, max_length: int
) -> list[int]:
    """Ids of the item with the text cut at a token boundary so that it fits max_length.

    The whole string is re-tokenized after each cut (merges at the cut can differ), so the
    result is exactly what tokenizing the shortened item gives.
    """
    ids, text_token_ends = _tokenize(tokenizer, before, text, after)
    while len(ids) > max_length:
        keep = len(text_token_ends) - (len(ids) - max_length)
        # The longest prefix ending on a token boundary with at most `keep` tokens in it.
        cuts = [end for i, end in enumerate(text_token_ends) if i < keep and end < len(text)]
        if not cuts:
            raise ValueError(
                f"item needs {len(ids) - len(text_token_ends)} tokens without its text,"
                f" max_length is {max_length}; expected room for at least one text token"
            )
        text = text[: max(cuts)]
        ids, text_token_ends = _tokenize(tokenizer, before, text, after)
    return ids


def encode_item(
    tokenizer: PreTrainedTokenizerBase,
    image_processor: ImageProcessor,
    *,
    text: str | None = None,
    image: ImageInput | None = None,
    instruction: str | None = None,
    prompt: str = DEFAULT_EMBED_PROMPT,
    max_length: int | None = None,
    truncate_text: bool = config_base.DEFAULTS.data.truncate_text,
    image_root: str | os.PathLike | None = None,
) -> ProcessedItem:
    """Tokenize one item and preprocess its image, as Qwen2VLProcessor would.

    ``tokenizer`` must be a fast (``tokenizers``-backed) tokenizer: the text span is found
    from its offsets. ``image`` is a PIL image, a uint8 array or a path (relative to
    ``image_root`` when given). Over ``max_length`` tokens, raises ValueError naming the
    lengths, unless ``truncate_text`` is set: then only the text is shortened, never the
    instruction, the image tokens or the prompt, and ``text_truncated`` records it.
    """
    if max_length is not None and max_length < 1:
        raise ValueError(f"max_length is {max_length}; expected a positive integer or None")
    _check_no_special_tokens(tokenizer, text=text, instruction=instruction, prompt=prompt)
    # Validate the text layout before paying for image decoding.
    build_text(text, image is not None, instruction, prompt)

    patches = image_grid_thw = None
    image_tokens = 0
    if image is not None:
        patches, grid_thw = image_processor.process_patches(image, root=image_root)
        image_grid_thw = grid_thw.reshape(1, 3)
        image_tokens = image_processor.num_image_tokens(grid_thw)

    before, text_part, after = _layout(text, image is not None, instruction, prompt, image_tokens)
    ids, text_token_ends = _tokenize(tokenizer, before, text_part, after)
    truncated = False
    if max_length is not None and len(ids) > max_length:
        if not truncate_text or not text_part:
            remedy = (
                "pass truncate_text=True to shorten the text, or raise max_length"
                if text_part
                else "raise max_length or lower the image processor's max_pixels"
            )
            raise ValueError(
                f"item is {len(ids)} tokens ({image_tokens} image, {len(text_token_ends)} text)"
                f" but max_length is {max_length}; {remedy}"
            )
        ids = _truncate_text(tokenizer, before, text_part, after, max_length)
        truncated = True

    image_token_id = tokenizer.convert_tokens_to_ids(IMAGE_TOKEN)
    found = sum(1 for token_id in ids if token_id == image_token_id)
    if found != image_tokens:
        raise ValueError(
            f"tokenized item has {found} {IMAGE_TOKEN} tokens but the image needs {image_tokens};"
            f" expected the tokenizer to map {IMAGE_TOKEN} to one special id"
        )
    return ProcessedItem(
        input_ids=np.asarray(ids, dtype=np.int32),
        patches=patches,
        image_grid_thw=image_grid_thw,
        text_truncated=truncated,
    )
