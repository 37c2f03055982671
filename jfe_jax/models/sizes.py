"""Named model sizes: ``tiny`` (tests, the demo), ``mini`` (the fusion study), ``small`` (CPU
benchmarks), ``2b``/``7b`` (Qwen2-VL)."""

from __future__ import annotations

from jfe_jax.models.config import ModelConfig, TextConfig, VisionConfig

# Qwen2-VL's 14 special tokens in their order (real ids 151643..151656). Small vocabularies
# (the offline tokenizers of jfe_jax.data) put them at ids vocab_size-16 .. vocab_size-3.
SPECIAL_TOKENS = (
    "<|endoftext|>",
    "<|im_start|>",
    "<|im_end|>",
    "<|object_ref_start|>",
    "<|object_ref_end|>",
    "<|box_start|>",
    "<|box_end|>",
    "<|quad_start|>",
    "<|quad_end|>",
    "<|vision_start|>",
    "<|vision_end|>",
    "<|vision_pad|>",
    "<|image_pad|>",
    "<|video_pad|>",
)


def special_token_ids(vocab_size: int) -> dict[str, int]:
    """Token-id fields of ModelConfig for a small vocabulary laid out as SPECIAL_TOKENS says."""
    base = vocab_size - 16
    return dict(
        vision_start_token_id=base + SPECIAL_TOKENS.index("<|vision_start|>"),
        vision_end_token_id=base + SPECIAL_TOKENS.index("<|vision_end|>"),
        image_token_id=base + SPECIAL_TOKENS.index("<|image_pad|>"),
        video_token_id=base + SPECIAL_TOKENS.index("<|video_pad|>"),
    )


_TINY_VOCAB = 512
_SMALL_VOCAB = 8192

SIZES: dict[str, ModelConfig] = {
    # A few hundred thousand parameters: parity tests and the fast unit tests.
    "tiny": ModelConfig(
        vision=VisionConfig(depth=2, embed_dim=32, out_dim=64, num_heads=4, mlp_ratio=2),
        text=TextConfig(
            vocab_size=_TINY_VOCAB,
            hidden_size=64,
            intermediate_size=128,
            num_layers=2,
            num_heads=4,
            num_kv_heads=2,
            mrope_section=(2, 3, 3),
        ),
        tie_word_embeddings=True,
        **special_token_ids(_TINY_VOCAB),
    ),
    # About 0.8 million parameters (tiny: 0.19 million) and tiny's vocabulary, so the synthetic
    # tokenizer fits: the fusion study's model, with room for the relational tasks, at a few
    # times tiny's cost per token.
    "mini": ModelConfig(
        vision=VisionConfig(depth=3, embed_dim=64, out_dim=128, num_heads=4, mlp_ratio=2),
        text=TextConfig(
            vocab_size=_TINY_VOCAB,
            hidden_size=128,
            intermediate_size=256,
            num_layers=3,
            num_heads=4,
            num_kv_heads=2,
            mrope_section=(4, 6, 6),
        ),
        tie_word_embeddings=True,
        **special_token_ids(_TINY_VOCAB),
    ),
    # Tens of millions of parameters: CPU benchmarks.
    "small": ModelConfig(
        vision=VisionConfig(depth=4, embed_dim=256, out_dim=512, num_heads=4, mlp_ratio=4),
        text=TextConfig(
            vocab_size=_SMALL_VOCAB,
            hidden_size=512,
            intermediate_size=1536,
            num_layers=8,
            num_heads=8,
            num_kv_heads=2,
            mrope_section=(8, 12, 12),
        ),
        tie_word_embeddings=True,
        **special_token_ids(_SMALL_VOCAB),
    ),
    # Qwen2-VL-2B (Qwen/Qwen2-VL-2B-Instruct config.json).
    "2b": ModelConfig(
        vision=VisionConfig(depth=32, embed_dim=1280, out_dim=1536, num_heads=16),
        text=TextConfig(
            vocab_size=151936,
            hidden_size=1536,
            intermediate_size=8960,
            num_layers=28,
            num_heads=12,
            num_kv_heads=2,
            rms_norm_eps=1e-6,
        ),
        tie_word_embeddings=True,
    ),
    # Qwen2-VL-7B (Qwen/Qwen2-VL-7B-Instruct config.json).
    "7b": ModelConfig(
        vision=VisionConfig(depth=32, embed_dim=1280, out_dim=3584, num_heads=16),
        text=TextConfig(
            vocab_size=152064,
            hidden_size=3584,
            intermediate_size=18944,
            num_layers=28,
            num_heads=28,
            num_kv_heads=4,
            rms_norm_eps=1e-6,
        ),
        tie_word_embeddings=False,
    ),
}


def get_size(name: str) -> ModelConfig:
    """The named architecture; ValueError lists the known names."""
    if name not in SIZES:
        raise ValueError(f"unknown model size {name!r}; known sizes: {sorted(SIZES)}")
    return SIZES[name].validate()
