"""MIRe's vision tower: a CLIP ViT (``CLIPVisionModel``) in Flax linen, and CLIP's image
preprocessing (``CLIPImageProcessor``) in numpy/PIL.

The tower as transformers computes it (``modeling_clip.py``): a patch embedding
(a stride-p convolution without bias), a learned class token, learned absolute positions,
``pre_layrnorm``, then pre-LayerNorm encoder layers (self-attention with biases scaled by
head_dim ** -0.5, quick-GELU MLP). ``CLIPVision`` returns every hidden state like
``output_hidden_states=True`` (index 0: the embeddings after ``pre_layrnorm``; index i: after
layer i) and the pooled output (the last layer's class token after ``post_layernorm``).

MIRe reads ``mire_visual_features``: the class token from the last layer (before
``post_layernorm``, not projected) and the patches from the second-to-last layer,
``[B, 1 + S, d_v]``. The tower is frozen in both of MIRe's training stages.

Parameters are laid out as the checkpoint names them (``encoder.layers.0.self_attn.q_proj.
weight`` is ``encoder_layers_0/self_attn/q_proj/kernel``);
``clip_from_torch`` takes a ``CLIPVisionModel`` or a whole ``CLIPModel`` state dict (the text
tower and projections are then left out) and lists every missing or mis-shaped tensor in one
error.
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Mapping, Sequence
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from flax import traverse_util
from PIL import Image

from jfe_jax.image_files import DEFAULT_MAX_IMAGE_PIXELS, load_image
from jfe_jax.models.axes import NORM, PATCH, PROJ, V_EMBED, V_MLP, V_QKV, param_init
from jfe_jax.models.mire.mismatch import raise_if_mismatched

CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)


@dataclasses.dataclass(frozen=True)
class CLIPVisionConfig:
    """The fields of transformers' ``CLIPVisionConfig`` the forward reads. Defaults: ViT-B/32."""

    hidden_size: int = 768
    intermediate_size: int = 3072
    num_hidden_layers: int = 12
    num_attention_heads: int = 12
    num_channels: int = 3
    image_size: int = 224
    patch_size: int = 32
    layer_norm_eps: float = 1e-5

    def __post_init__(self):
        if self.image_size % self.patch_size:
            raise ValueError(
                f"image_size={self.image_size} is not a multiple of patch_size={self.patch_size}"
            )
        if self.hidden_size % self.num_attention_heads:
            raise ValueError(
                f"hidden_size={self.hidden_size} is not a multiple of "
                f"num_attention_heads={self.num_attention_heads}"
            )

    @property
    def num_patches(self) -> int:
        return (self.image_size // self.patch_size) ** 2

    @classmethod
    def from_hf(cls, hf: Mapping[str, Any]) -> CLIPVisionConfig:
        """From a ``CLIPVisionConfig`` dict, or a ``CLIPConfig`` dict (its ``vision_config``).
        The activation must be quick-GELU, as in every CLIP checkpoint MIRe uses."""
        hf = hf.get("vision_config", hf)
        act = hf.get("hidden_act", "quick_gelu")
        if act != "quick_gelu":
            raise ValueError(f"hidden_act={act!r}; this CLIP tower implements 'quick_gelu'")
        names = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: hf[k] for k in names if k in hf})


def _dense(features: int, axes: tuple[str, str], name: str) -> nn.Dense:
    return nn.Dense(
        features,
        name=name,
        precision=jax.lax.Precision.HIGHEST,
        kernel_init=param_init(nn.initializers.normal(0.02), axes),
        bias_init=param_init(nn.initializers.zeros_init(), (axes[1],)),
    )


def _layer_norm(eps: float, name: str) -> nn.LayerNorm:
    return nn.LayerNorm(
        epsilon=eps,
        name=name,
        scale_init=param_init(nn.initializers.ones_init(), (NORM,)),
        bias_init=param_init(nn.initializers.zeros_init(), (NORM,)),
    )


class _Attention(nn.Module):
    config: CLIPVisionConfig

    @nn.compact
    def __call__(self, x):
        c = self.config
        heads, width = c.num_attention_heads, c.hidden_size // c.num_attention_heads
        shape = x.shape[:2] + (heads, width)
        q = _dense(c.hidden_size, (V_EMBED, V_QKV), "q_proj")(x).reshape(shape) * width**-0.5
        k = _dense(c.hidden_size, (V_EMBED, V_QKV), "k_proj")(x).reshape(shape)
        v = _dense(c.hidden_size, (V_EMBED, V_QKV), "v_proj")(x).reshape(shape)
        hi = jax.lax.Precision.HIGHEST
        probs = jax.nn.softmax(jnp.einsum("bqhd,bkhd->bhqk", q, k, precision=hi), axis=-1)
        out = jnp.einsum("bhqk,bkhd->bqhd", probs, v, precision=hi).reshape(x.shape)
        return _dense(c.hidden_size, (V_QKV, V_EMBED), "out_proj")(out)


class _Layer(nn.Module):
    config: CLIPVisionConfig

    @nn.compact
    def __call__(self, x):
        c = self.config
        x = x + _Attention(c, name="self_attn")(_layer_norm(c.layer_norm_eps, "layer_norm1")(x))
        return x + _MLP(c, name="mlp")(_layer_norm(c.layer_norm_eps, "layer_norm2")(x))


class _MLP(nn.Module):
    config: CLIPVisionConfig

    @nn.compact
    def __call__(self, x):
        c = self.config
        h = _dense(c.intermediate_size, (V_EMBED, V_MLP), "fc1")(x)
        h = h * jax.nn.sigmoid(1.702 * h)  # quick_gelu
        return _dense(c.hidden_size, (V_MLP, V_EMBED), "fc2")(h)


class CLIPVision(nn.Module):
    """``pixel_values [B, C, H, W]`` (the processor's output, channels first as in
    transformers) -> (hidden states ``[num_layers + 1, B, 1 + S, d_v]``, pooled ``[B, d_v]``)."""

    config: CLIPVisionConfig

    @nn.compact
    def __call__(self, pixel_values: jax.Array) -> tuple[jax.Array, jax.Array]:
        c = self.config
        expected = (c.num_channels, c.image_size, c.image_size)
        if pixel_values.ndim != 4 or tuple(pixel_values.shape[1:]) != expected:
            shape = ", ".join(map(str, expected))
            raise ValueError(f"pixel_values {tuple(pixel_values.shape)}; expected [B, {shape}]")
        x = _Embeddings(c, name="embeddings")(pixel_values)
        x = _layer_norm(c.layer_norm_eps, "pre_layrnorm")(x)  # transformers' spelling
        states = [x]
        for i in range(c.num_hidden_layers):
            x = _Layer(c, name=f"encoder_layers_{i}")(x)
            states.append(x)
        pooled = _layer_norm(c.layer_norm_eps, "post_layernorm")(x[:, 0])
        return jnp.stack(states), pooled


class _Embeddings(nn.Module):
    config: CLIPVisionConfig

    @nn.compact
    def __call__(self, pixel_values):
        c = self.config
        p = c.patch_size
        images = jnp.transpose(pixel_values, (0, 2, 3, 1))  # NCHW -> NHWC
        patches = nn.Conv(
            c.hidden_size,
            (p, p),
            strides=(p, p),
            padding="VALID",
            use_bias=False,
            precision=jax.lax.Precision.HIGHEST,
            kernel_init=param_init(nn.initializers.normal(0.02), (None, None, PATCH, V_EMBED)),
            name="patch_embedding",
        )(images)
        batch = patches.shape[0]
        patches = patches.reshape(batch, -1, c.hidden_size)
        cls = self.param(
            "class_embedding",
            param_init(nn.initializers.normal(0.02), (V_EMBED,)),
            (c.hidden_size,),
        )
        x = jnp.concatenate([jnp.broadcast_to(cls, (batch, 1, c.hidden_size)), patches], axis=1)
        positions = nn.Embed(
            c.num_patches + 1,
            c.hidden_size,
            embedding_init=param_init(nn.initializers.normal(0.02), (PROJ, V_EMBED)),
            name="position_embedding",
        )(jnp.arange(c.num_patches + 1))
        return x + positions[None]


def mire_visual_features(hidden_states: jax.Array) -> jax.Array:
    """MIRe's ``v``: the last layer's class token and the second-to-last layer's patches,
    ``[B, 1 + S, d_v]`` (``retrievers/layers/vit.py``)."""
    if hidden_states.shape[0] < 3:
        raise ValueError("MIRe reads the last two encoder layers; the tower has fewer than 2")
    return jnp.concatenate([hidden_states[-1][:, :1], hidden_states[-2][:, 1:]], axis=1)


# --- checkpoints --------------------------------------------------------------------------------


def _hf_key(path: tuple[str, ...]) -> tuple[str, str]:
    *modules, leaf = path
    parts = []
    for m in modules:
        if m.startswith("encoder_layers_"):
            parts += ["encoder", "layers", m.rsplit("_", 1)[1]]
        else:
            parts.append(m)
    name = ".".join(parts)
    if leaf == "class_embedding":
        return name + ".class_embedding", "copy"
    if leaf == "kernel":
        return name + ".weight", "conv" if modules[-1] == "patch_embedding" else "linear"
    if leaf in ("embedding", "scale"):
        return name + ".weight", "copy"
    return f"{name}.{leaf}", "copy"


def _to_flax(kind: str, array: np.ndarray) -> np.ndarray:
    if kind == "linear":
        return array.T
    if kind == "conv":  # torch [out, in, kh, kw] -> flax [kh, kw, in, out]
        return array.transpose(2, 3, 1, 0)
    return array


def _to_torch(kind: str, array: np.ndarray) -> np.ndarray:
    if kind == "linear":
        return array.T
    if kind == "conv":
        return array.transpose(3, 2, 0, 1)
    return array


_VISION_PREFIX = "vision_model."
# A CLIPModel's other parts, left out when its whole state dict is given.
_OTHER_PARTS = ("text_model.", "visual_projection.", "text_projection.", "logit_scale")


def _vision_state(state: Mapping[str, Any]) -> dict[str, Any]:
    """The vision tower's tensors by ``CLIPVisionModel`` names without the ``vision_model.``
    prefix (which CLIPModel checkpoints, and CLIPVisionModel files of older transformers
    versions, carry)."""
    out = {}
    for key, value in state.items():
        if key.startswith(_OTHER_PARTS) or key.endswith("position_ids"):
            continue
        out[key.removeprefix(_VISION_PREFIX)] = value
    return out


def clip_from_torch(
    state: Mapping[str, Any], config: CLIPVisionConfig, *, source: str = "checkpoint"
) -> dict:
    """Flax params of ``CLIPVision`` from a ``CLIPVisionModel`` or ``CLIPModel`` state dict
    (arrays or tensors; names with or without ``vision_model.``). A CLIPModel's text tower and
    projections and the ``position_ids`` buffer are left out; every vision parameter must be
    present with its shape and no other tensor given, or one ValueError lists the missing,
    mis-shaped and unused ones."""
    shapes = jax.eval_shape(
        CLIPVision(config).init,
        jax.random.key(0),
        jnp.zeros((1, config.num_channels, config.image_size, config.image_size)),
    )
    flat = traverse_util.flatten_dict(nn.meta.unbox(shapes)["params"])
    vision = _vision_state(state)
    missing, misshaped, out, used = [], [], {}, set()
    for path, leaf in flat.items():
        key, kind = _hf_key(path)
        if key not in vision:
            missing.append(key)
            continue
        used.add(key)
        value = vision[key]
        value = np.asarray(value.detach().cpu().numpy() if hasattr(value, "detach") else value)
        converted = _to_flax(kind, value)
        if converted.shape != leaf.shape:
            want = _to_torch(kind, np.zeros(leaf.shape, np.int8)).shape
            misshaped.append(f"{key} {tuple(value.shape)} (expected {tuple(want)})")
            continue
        out[path] = converted.astype(np.float32)
    extra = sorted(set(vision) - used)
    raise_if_mismatched(
        f"{source} does not match a CLIP vision tower of this config", missing, misshaped, extra
    )
    return {"params": traverse_util.unflatten_dict(out)}


def clip_to_torch(params: Mapping[str, Any], *, prefix: str = "") -> dict[str, np.ndarray]:
    """The inverse of ``clip_from_torch``: ``CLIPVisionModel`` state dict names (with
    ``prefix="vision_model."``: a CLIPModel's) -> numpy arrays."""
    flat = traverse_util.flatten_dict(nn.meta.unbox(params)["params"])
    out = {}
    for path, value in flat.items():
        key, kind = _hf_key(path)
        out[prefix + key] = _to_torch(kind, np.asarray(value))
    return out


# --- preprocessing ------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class CLIPImageProcessor:
    """transformers' ``CLIPImageProcessor`` with its defaults: RGB, resize the shortest side to
    ``size`` (bicubic, the long side scaled and truncated as transformers does), centre crop to
    ``crop_size``, x / 255, normalise by CLIP's mean and std; channels first, float32."""

    size: int = 224
    crop_size: int = 224
    image_mean: tuple[float, float, float] = CLIP_MEAN
    image_std: tuple[float, float, float] = CLIP_STD

    def __post_init__(self):
        if self.size < 1 or self.crop_size < 1:
            raise ValueError(f"size={self.size} and crop_size={self.crop_size} must be positive")

    def process_one(self, image: Image.Image | np.ndarray | str | os.PathLike) -> np.ndarray:
        """One image (PIL, uint8 array or path) -> ``[3, crop, crop]`` float32."""
        if isinstance(image, str | os.PathLike):
            # The decompression-bomb cap and clear errors of the Qwen2-VL pipeline's loader.
            image = load_image(image, max_image_pixels=DEFAULT_MAX_IMAGE_PIXELS)
        if isinstance(image, np.ndarray):
            if image.dtype != np.uint8 or image.ndim != 3 or image.shape[-1] not in (3, 4):
                raise ValueError(
                    f"image array {image.shape} {image.dtype}; expected uint8 [H, W, 3 or 4]"
                )
            image = Image.fromarray(image)
        image = image.convert("RGB")
        width, height = image.size
        short, long = (width, height) if width <= height else (height, width)
        new_short, new_long = self.size, int(self.size * long / short)
        new_w, new_h = (new_short, new_long) if width <= height else (new_long, new_short)
        resized = np.asarray(image.resize((new_w, new_h), Image.Resampling.BICUBIC))
        top = (new_h - self.crop_size) // 2
        left = (new_w - self.crop_size) // 2
        if top < 0 or left < 0:
            raise ValueError(
                f"a {width}x{height} image resized to {new_w}x{new_h} is smaller than the "
                f"{self.crop_size} crop; expected crop_size <= size"
            )
        crop = resized[top : top + self.crop_size, left : left + self.crop_size]
        pixels = (crop.astype(np.float64) * (1 / 255)).astype(np.float32)
        mean = np.asarray(self.image_mean, np.float32)
        std = np.asarray(self.image_std, np.float32)
        return ((pixels - mean) / std).transpose(2, 0, 1)

    def __call__(self, images: Sequence[Image.Image | np.ndarray | str]) -> np.ndarray:
        """Images (PIL, uint8 arrays or paths) -> ``pixel_values [n, 3, crop, crop]`` float32."""
        if isinstance(images, Image.Image | np.ndarray | str | os.PathLike):
            images = [images]
        if not len(images):
            raise ValueError("no images to process")
        return np.stack([self.process_one(image) for image in images])
