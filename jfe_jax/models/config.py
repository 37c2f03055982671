"""Architecture of a Qwen2-VL model, read from and written to Hugging Face ``config.json``.

``ModelConfig`` describes only the network (the checkpoint's shape). How it is run (compute
dtype, scan, remat, LoRA, projection) lives on the Flax module, see ``one_tower.py``.
"""

from __future__ import annotations

import dataclasses
import json
import os
from typing import Any

SUPPORTED_MODEL_TYPES = ("qwen2_vl",)
HF_CONFIG_FILE = "config.json"  # a Hugging Face directory's architecture (not a workdir's)


@dataclasses.dataclass(frozen=True)
class VisionConfig:
    """The Qwen2-VL vision transformer (ViT with 2-D rotary positions and a 2x2 merger)."""

    depth: int = 32
    embed_dim: int = 1280  # width of the vision blocks
    out_dim: int = 3584  # width of the merged tokens = the LLM width (HF: vision hidden_size)
    num_heads: int = 16
    mlp_ratio: int = 4
    in_channels: int = 3
    patch_size: int = 14
    temporal_patch_size: int = 2
    spatial_merge_size: int = 2
    rope_theta: float = 10000.0
    hidden_act: str = "quick_gelu"

    @property
    def head_dim(self) -> int:
        return self.embed_dim // self.num_heads

    @property
    def patch_dim(self) -> int:
        """Length of one flattened patch in ``pixel_values``."""
        return self.in_channels * self.temporal_patch_size * self.patch_size**2


@dataclasses.dataclass(frozen=True)
class TextConfig:
    """The Qwen2 decoder with multimodal rotary embedding (M-RoPE)."""

    vocab_size: int = 152064
    hidden_size: int = 3584
    intermediate_size: int = 18944
    num_layers: int = 28
    num_heads: int = 28
    num_kv_heads: int = 4
    rms_norm_eps: float = 1e-6
    rope_theta: float = 1_000_000.0
    mrope_section: tuple[int, int, int] = (
        16,
        24,
        24,
    )  # temporal, height, width halves of head_dim/2
    hidden_act: str = "silu"

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_heads


@dataclasses.dataclass(frozen=True)
class ModelConfig:
    """A whole Qwen2-VL checkpoint's architecture and its special token ids."""

    vision: VisionConfig = VisionConfig()
    text: TextConfig = TextConfig()
    image_token_id: int = 151655
    video_token_id: int = 151656
    vision_start_token_id: int = 151652
    vision_end_token_id: int = 151653
    tie_word_embeddings: bool = False

    def validate(self) -> ModelConfig:
        """Raises ValueError when the numbers cannot describe a working model."""
        t, v = self.text, self.vision
        problems = []
        if t.hidden_size % t.num_heads:
            problems.append(
                f"hidden_size {t.hidden_size} is not divisible by num_heads {t.num_heads}"
            )
        if t.num_heads % t.num_kv_heads:
            problems.append(
                f"num_heads {t.num_heads} is not a multiple of num_kv_heads {t.num_kv_heads}"
            )
        if t.head_dim % 2 or sum(t.mrope_section) * 2 != t.head_dim:
            problems.append(
                f"mrope_section {list(t.mrope_section)} must sum to head_dim/2 = {t.head_dim // 2}"
            )
        if v.embed_dim % v.num_heads or v.head_dim % 4:
            problems.append(
                f"vision embed_dim {v.embed_dim} / num_heads {v.num_heads} must give a head_dim "
                "divisible by 4"
            )
        if v.out_dim != t.hidden_size:
            problems.append(
                f"vision out_dim (HF vision_config.hidden_size) {v.out_dim} != LLM hidden_size "
                f"{t.hidden_size}"
            )
        for name in ("image_token_id", "vision_start_token_id", "vision_end_token_id"):
            if not 0 <= getattr(self, name) < t.vocab_size:
                problems.append(f"{name} {getattr(self, name)} is outside the vocabulary")
        if problems:
            raise ValueError("invalid Qwen2-VL config: " + "; ".join(problems))
        return self

    # ---------------------------------------------------------------- Hugging Face format

    @classmethod
    def from_hf_dict(cls, d: dict[str, Any]) -> ModelConfig:
        """Reads a Hugging Face Qwen2-VL config dict (nested v5 layout or the flat original)."""
        model_type = d.get("model_type")
        if model_type not in SUPPORTED_MODEL_TYPES:
            raise ValueError(
                f"unsupported model_type {model_type!r}: jfe-jax reads "
                f"{list(SUPPORTED_MODEL_TYPES)}"
            )
        text = dict(d.get("text_config") or {})
        # The original checkpoints keep the text fields at the top level.
        for key, value in d.items():
            if key not in ("text_config", "vision_config"):
                text.setdefault(key, value)
        rope = dict(text.get("rope_parameters") or text.get("rope_scaling") or {})
        rope_theta = rope.get("rope_theta", text.get("rope_theta", 1_000_000.0))
        mrope = tuple(rope.get("mrope_section", (16, 24, 24)))
        if text.get("use_sliding_window"):
            raise ValueError(
                "use_sliding_window=True is not supported (Qwen2-VL checkpoints use full attention)"
            )
        act = text.get("hidden_act", "silu")
        if act != "silu":
            raise ValueError(f"text hidden_act {act!r} is not supported (expected 'silu')")
        num_heads = text["num_attention_heads"]
        t = TextConfig(
            vocab_size=text["vocab_size"],
            hidden_size=text["hidden_size"],
            intermediate_size=text["intermediate_size"],
            num_layers=text["num_hidden_layers"],
            num_heads=num_heads,
            num_kv_heads=text.get("num_key_value_heads") or num_heads,
            rms_norm_eps=text.get("rms_norm_eps", 1e-5),
            rope_theta=float(rope_theta),
            mrope_section=tuple(int(x) for x in mrope),
            hidden_act=act,
        )
        vd = dict(d.get("vision_config") or {})
        vrope = dict(vd.get("rope_parameters") or {})
        v = VisionConfig(
            depth=vd.get("depth", 32),
            embed_dim=vd.get("embed_dim", 1280),
            out_dim=vd.get("hidden_size", t.hidden_size),
            num_heads=vd.get("num_heads", 16),
            mlp_ratio=int(vd.get("mlp_ratio", 4)),
            in_channels=vd.get("in_channels", vd.get("in_chans", 3)),
            patch_size=vd.get("patch_size", 14),
            temporal_patch_size=vd.get("temporal_patch_size", 2),
            spatial_merge_size=vd.get("spatial_merge_size", 2),
            rope_theta=float(vrope.get("rope_theta", 10000.0)),
            hidden_act=vd.get("hidden_act", "quick_gelu"),
        )
        if v.hidden_act != "quick_gelu":
            raise ValueError(
                f"vision hidden_act {v.hidden_act!r} is not supported (expected 'quick_gelu')"
            )
        return cls(
            vision=v,
            text=t,
            image_token_id=d.get("image_token_id", 151655),
            video_token_id=d.get("video_token_id", 151656),
            vision_start_token_id=d.get("vision_start_token_id", 151652),
            vision_end_token_id=d.get("vision_end_token_id", 151653),
            tie_word_embeddings=bool(d.get("tie_word_embeddings", False)),
        ).validate()

    def to_hf_dict(self) -> dict[str, Any]:
        """The config.json that transformers' ``Qwen2VLForConditionalGeneration`` loads."""
        t, v = self.text, self.vision
        return {
            "architectures": ["Qwen2VLForConditionalGeneration"],
            "model_type": "qwen2_vl",
            "image_token_id": self.image_token_id,
            "video_token_id": self.video_token_id,
            "vision_start_token_id": self.vision_start_token_id,
            "vision_end_token_id": self.vision_end_token_id,
            "tie_word_embeddings": self.tie_word_embeddings,
            "text_config": {
                "model_type": "qwen2_vl_text",
                "vocab_size": t.vocab_size,
                "hidden_size": t.hidden_size,
                "intermediate_size": t.intermediate_size,
                "num_hidden_layers": t.num_layers,
                "num_attention_heads": t.num_heads,
                "num_key_value_heads": t.num_kv_heads,
                "hidden_act": t.hidden_act,
                "rms_norm_eps": t.rms_norm_eps,
                "rope_parameters": {
                    "rope_type": "default",
                    "rope_theta": t.rope_theta,
                    "mrope_section": list(t.mrope_section),
                },
                "tie_word_embeddings": self.tie_word_embeddings,
                "bos_token_id": None,
                "eos_token_id": None,
                "pad_token_id": None,
            },
            "vision_config": {
                "model_type": "qwen2_vl_vision",
                "depth": v.depth,
                "embed_dim": v.embed_dim,
                "hidden_size": v.out_dim,
                "num_heads": v.num_heads,
                "mlp_ratio": v.mlp_ratio,
                "in_channels": v.in_channels,
                "patch_size": v.patch_size,
                "temporal_patch_size": v.temporal_patch_size,
                "spatial_merge_size": v.spatial_merge_size,
                "hidden_act": v.hidden_act,
                "rope_parameters": {"rope_type": "axial", "rope_theta": v.rope_theta},
            },
        }

    @classmethod
    def from_pretrained(cls, path: str | os.PathLike) -> ModelConfig:
        """Reads ``config.json`` from a Hugging Face directory."""
        config_path = os.path.join(path, HF_CONFIG_FILE)
        if not os.path.isfile(config_path):
            raise ValueError(f"{path} has no {HF_CONFIG_FILE}: not a Hugging Face model directory")
        with open(config_path, encoding="utf-8") as f:
            try:
                d = json.load(f)
            except json.JSONDecodeError as e:
                raise ValueError(f"{config_path} is not valid JSON: {e}") from e
        return cls.from_hf_dict(d)

    def replace(self, **kwargs) -> ModelConfig:
        return dataclasses.replace(self, **kwargs)
