"""Tiny Qwen2-VL checkpoints built offline with transformers, and inputs for parity tests."""

from __future__ import annotations

import numpy as np

from jfe_jax.models.config import ModelConfig


def build_hf_model(config: ModelConfig, seed: int = 0):
    """A transformers Qwen2VLForConditionalGeneration with well-spread random float32 weights.

    The default init (std 0.02, unit norms) makes every layer nearly the identity; random
    norm scales and std-0.08 weights make the parity checks sensitive to real mistakes.
    """
    import torch
    from transformers import Qwen2VLConfig, Qwen2VLForConditionalGeneration

    torch.manual_seed(seed)
    hf_config = Qwen2VLConfig.from_dict(config.to_hf_dict())
    model = Qwen2VLForConditionalGeneration(hf_config).float().eval()
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name or "ln_q" in name:
                if name.endswith("weight"):
                    p.copy_(1.0 + 0.2 * torch.randn(p.shape, generator=gen))
                else:
                    p.copy_(0.1 * torch.randn(p.shape, generator=gen))
            else:
                p.copy_(0.08 * torch.randn(p.shape, generator=gen))
    return model


def reference_hidden_states(model, input_ids, attention_mask, pixel_values=None, grid=None):
    """Final-layer hidden states [B, L, H] from the PyTorch reference, as float32 numpy."""
    import torch

    image_token_id = model.config.image_token_id
    kwargs = dict(
        input_ids=torch.as_tensor(input_ids, dtype=torch.long),
        attention_mask=torch.as_tensor(attention_mask, dtype=torch.long),
        mm_token_type_ids=torch.as_tensor(
            (np.asarray(input_ids) == image_token_id).astype(np.int64)
        ),
    )
    if pixel_values is not None:
        kwargs["pixel_values"] = torch.as_tensor(pixel_values, dtype=torch.float32)
        kwargs["image_grid_thw"] = torch.as_tensor(grid, dtype=torch.long)
    with torch.no_grad():
        out = model.model(**kwargs)
    return out.last_hidden_state.float().numpy()


def make_inputs(
    config: ModelConfig,
    rows: list[list[tuple[int, int] | int]],
    *,
    padding: str = "right",
    seed: int = 0,
):
    """Token rows of text and images with their padding, pixel values and grids.

    Each row is a list of items: an int n is n random text tokens, a (h, w) tuple is an image of
    grid (1, h, w) patches wrapped in <|vision_start|> ... <|vision_end|>.
    """
    rng = np.random.default_rng(seed)
    merge = config.vision.spatial_merge_size
    text_vocab = config.text.vocab_size - 16
    seqs, grids, pixels = [], [], []
    for row in rows:
        seq = []
        for item in row:
            if isinstance(item, int):
                seq.extend(rng.integers(0, text_vocab, size=item).tolist())
            else:
                h, w = item
                grids.append([1, h, w])
                pixels.append(rng.normal(size=(h * w, config.vision.patch_dim)).astype(np.float32))
                seq.append(config.vision_start_token_id)
                seq.extend([config.image_token_id] * (h * w // merge**2))
                seq.append(config.vision_end_token_id)
        seqs.append(seq)
    length = max(len(s) for s in seqs)
    pad_id = text_vocab + 0  # <|endoftext|> of the small vocab layout
    input_ids = np.full((len(seqs), length), pad_id, dtype=np.int64)
    mask = np.zeros((len(seqs), length), dtype=np.int64)
    for i, s in enumerate(seqs):
        if padding == "right":
            input_ids[i, : len(s)], mask[i, : len(s)] = s, 1
        else:
            input_ids[i, length - len(s) :], mask[i, length - len(s) :] = s, 1
    if not grids:
        return input_ids, mask, None, None
    return input_ids, mask, np.concatenate(pixels), np.asarray(grids, dtype=np.int64)
