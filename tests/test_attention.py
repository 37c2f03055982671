"""Both attention implementations against a float64 numpy reference, and padding accounting."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hf_reference import make_inputs

from jfe_jax.encoder import Encoder, EncoderOptions
from jfe_jax.models import flops, layers
from jfe_jax.models.inputs import prepare_batch
from jfe_jax.models.padding import padding_report
from jfe_jax.models.sizes import get_size

ATOL = 1e-5  # float32 against float64, inputs of unit scale
IMPLS = layers.ATTENTION_IMPLS


def reference_attention(query, key, value, mask):
    """float64 numpy: softmax over the allowed keys; a row with none gets uniform weights."""
    q, k, v = (np.asarray(x, np.float64) for x in (query, key, value))
    mask = np.broadcast_to(np.asarray(mask), (q.shape[0], q.shape[1], k.shape[1]))
    groups = q.shape[2] // k.shape[2]
    out = np.zeros_like(q)
    for b in range(q.shape[0]):
        for h in range(q.shape[2]):
            logits = q[b, :, h] @ k[b, :, h // groups].T / np.sqrt(q.shape[-1])
            for i in range(q.shape[1]):
                allowed = mask[b, i]
                if allowed.any():
                    w = np.where(allowed, np.exp(logits[i] - logits[i][allowed].max()), 0.0)
                else:
                    w = np.ones_like(logits[i])
                out[b, i, h] = (w / w.sum()) @ v[b, :, h // groups]
    return out


def random_qkv(heads, kv_heads, length=7, batch=3, head_dim=16, seed=0):
    rng = np.random.default_rng(seed)
    q = rng.normal(size=(batch, length, heads, head_dim)).astype(np.float32)
    k = rng.normal(size=(batch, length, kv_heads, head_dim)).astype(np.float32)
    v = rng.normal(size=(batch, length, kv_heads, head_dim)).astype(np.float32)
    return q, k, v


def causal_padding_mask(length=7):
    """Right padding, left padding (its first queries see no key) and a row of only padding."""
    valid = np.zeros((3, length), bool)
    valid[0, :4] = True
    valid[1, 3:] = True
    causal = np.tril(np.ones((length, length), bool))
    return causal[None] & valid[:, None, :]


def segment_mask(length=7, padding_attends_padding=True):
    """Two images in row 0, one in row 1, none in row 2 (segment 0 is padding)."""
    seg = np.zeros((3, length), np.int32)
    seg[0, :3], seg[0, 3:5] = 1, 2
    seg[1, :] = 1
    mask = seg[:, :, None] == seg[:, None, :]
    if not padding_attends_padding:
        mask &= seg[:, :, None] > 0
    return mask


MASKS = {
    "causal_and_padding": causal_padding_mask,
    "segments": segment_mask,
    "segments_padding_masked": lambda: segment_mask(padding_attends_padding=False),
}


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("heads,kv_heads", [(4, 4), (4, 2), (6, 1)])
@pytest.mark.parametrize("mask_name", sorted(MASKS))
def test_attention_matches_float64_reference(impl, heads, kv_heads, mask_name):
    q, k, v = random_qkv(heads, kv_heads, seed=heads + kv_heads)
    mask = MASKS[mask_name]()
    out = layers.attention(q, k, v, jnp.asarray(mask), dtype=jnp.float32, impl=impl)
    assert out.shape == q.shape and out.dtype == jnp.float32
    assert np.all(np.isfinite(out))
    np.testing.assert_allclose(out, reference_attention(q, k, v, mask), atol=ATOL, rtol=0)


@pytest.mark.parametrize("impl", IMPLS)
def test_fully_masked_rows_give_the_mean_value_and_finite_gradients(impl):
    q, k, v = random_qkv(4, 2)
    mask = causal_padding_mask()
    empty = ~mask.any(axis=-1)  # [B, Lq]
    assert empty.sum() >= 7 + 3  # row 2 entirely, row 1's first three queries
    out = layers.attention(q, k, v, jnp.asarray(mask), dtype=jnp.float32, impl=impl)
    groups = 2
    mean_v = np.repeat(v.mean(axis=1), groups, axis=1)  # [B, H, D]
    b, i = np.nonzero(empty)
    np.testing.assert_allclose(np.asarray(out)[b, i], mean_v[b], atol=ATOL, rtol=0)

    def loss(q, k, v):
        # Padding outputs are multiplied by zero, as a masked loss does.
        o = layers.attention(q, k, v, jnp.asarray(mask), dtype=jnp.float32, impl=impl)
        return jnp.sum(jnp.where(empty[..., None, None], 0.0, o) ** 2)

    grads = jax.grad(loss, argnums=(0, 1, 2))(q, k, v)
    assert all(np.all(np.isfinite(g)) for g in grads)


def test_implementations_give_the_same_gradients():
    q, k, v = random_qkv(4, 2, seed=5)
    mask = jnp.asarray(causal_padding_mask())

    def grads(impl):
        f = lambda q, k, v: jnp.sum(
            jnp.sin(layers.attention(q, k, v, mask, dtype=jnp.float32, impl=impl))
        )
        return jax.grad(f, argnums=(0, 1, 2))(q, k, v)

    reference = grads("einsum")
    for impl in IMPLS[1:]:
        for a, b in zip(grads(impl), reference):
            np.testing.assert_allclose(a, b, atol=ATOL, rtol=0)


def test_causal_query_blocks():
    assert [layers.causal_query_blocks(n) for n in (7, 32, 63, 64, 96, 128, 130, 4096)] == [
        1,
        1,
        1,
        2,
        2,
        4,
        2,
        4,
    ]


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("length", [128, 64, 30])  # 4 query blocks, 2, and 1
def test_causal_blocks_match_the_reference_and_full_attention(impl, length):
    # causal=True skips the keys after each query block; queries with a visible key must get
    # the reference's outputs and gradients (padding queries are multiplied by zero, as a
    # masked loss does). Rows: right padding, left padding, two packed segments.
    q, k, v = random_qkv(4, 2, length=length, batch=3, head_dim=8, seed=length)
    valid = np.ones((3, length), bool)
    valid[0, length - 5 :] = False
    valid[1, :3] = False
    seg = np.ones((3, length), np.int32)
    seg[2, length // 3 :] = 2
    causal = np.tril(np.ones((length, length), bool))
    mask = causal[None] & valid[:, None, :] & (seg[:, :, None] == seg[:, None, :])
    visible = mask.any(axis=-1)[..., None, None]
    blocked = layers.attention(
        q, k, v, jnp.asarray(mask), dtype=jnp.float32, impl=impl, causal=True
    )
    assert np.all(np.isfinite(blocked))
    want = reference_attention(q, k, v, mask)
    np.testing.assert_allclose(np.where(visible, blocked, 0), np.where(visible, want, 0), atol=ATOL)

    def grads(causal):
        def loss(q, k, v):
            o = layers.attention(
                q, k, v, jnp.asarray(mask), dtype=jnp.float32, impl=impl, causal=causal
            )
            return jnp.sum(jnp.where(visible, jnp.sin(o), 0.0))

        return jax.grad(loss, argnums=(0, 1, 2))(q, k, v)

    for a, b in zip(grads(True), grads(False)):
        np.testing.assert_allclose(a, b, atol=ATOL, rtol=0)
    with pytest.raises(ValueError, match="causal attention needs Lq == Lk"):
        half = jnp.asarray(mask[:, : length // 2])
        layers.attention(q[:, : length // 2], k, v, half, dtype=jnp.float32, causal=True)


@pytest.mark.parametrize("impl", IMPLS)
def test_key_padding_mask_broadcasts_over_queries(impl):
    q, k, v = random_qkv(4, 2, seed=2)
    valid = np.ones((3, 7), bool)
    valid[0, 5:] = False
    valid[2, :2] = False
    full = np.broadcast_to(valid[:, None, :], (3, 7, 7))
    a = layers.attention(q, k, v, jnp.asarray(valid[:, None, :]), dtype=jnp.float32, impl=impl)
    np.testing.assert_allclose(a, reference_attention(q, k, v, full), atol=ATOL, rtol=0)


def test_bfloat16_implementations_agree_and_stay_near_float32():
    q, k, v = random_qkv(4, 2, seed=3)
    mask = jnp.asarray(causal_padding_mask())
    outs = {impl: layers.attention(q, k, v, mask, dtype=jnp.bfloat16, impl=impl) for impl in IMPLS}
    assert all(o.dtype == jnp.bfloat16 for o in outs.values())
    reference = reference_attention(q, k, v, np.asarray(mask))
    einsum = np.asarray(outs["einsum"], np.float32)
    for impl in IMPLS:
        out = np.asarray(outs[impl], np.float32)
        # Float32 logits and softmax, bfloat16 matmuls: a bfloat16 rounding or two apart.
        np.testing.assert_allclose(out, einsum, atol=1e-2, rtol=0)
        np.testing.assert_allclose(out, reference, atol=5e-2, rtol=0)


def test_unknown_impl_and_malformed_masks_are_rejected():
    q, k, v = random_qkv(4, 2)
    mask = jnp.asarray(causal_padding_mask())
    with pytest.raises(ValueError, match="unknown attention impl 'flash'"):
        layers.attention(q, k, v, mask, dtype=jnp.float32, impl="flash")
    with pytest.raises(ValueError, match="must be boolean"):
        layers.attention(q, k, v, mask.astype(jnp.int32), dtype=jnp.float32)
    with pytest.raises(ValueError, match=r"boolean \[B, Lq, Lk\].*\(7, 7\)"):
        layers.attention(q, k, v, mask[0], dtype=jnp.float32)
    with pytest.raises(ValueError, match="unknown attention impl"):
        EncoderOptions(attention_impl="flash")


@pytest.mark.parametrize("padding", ["right", "left"])
def test_model_hidden_states_do_not_depend_on_the_attention_impl(padding, monkeypatch):
    config = get_size("tiny")
    base = Encoder.init(config, seed=1)
    rows = [[2, (2, 8), 3, (6, 4), 1], [4, (4, 4), 2], [6]]
    inputs = make_inputs(config, rows, padding=padding, seed=2)
    traced = []  # which implementation each attention call of the traces used
    names = ("_einsum_attention", "_jax_nn_attention")
    for name in names:
        original = getattr(layers, name)
        wrapped = lambda *a, _f=original, _n=name, **kw: traced.append(_n) or _f(*a, **kw)
        monkeypatch.setattr(layers, name, wrapped)
    hidden = {}
    for impl in IMPLS:
        options = dataclasses.replace(base.options, attention_impl=impl)
        hidden[impl] = Encoder(config, base.params, options).hidden_states(*inputs)
    calls = config.vision.depth + config.text.num_layers
    assert traced == [name for name in names for _ in range(calls)]
    for impl in IMPLS:
        assert np.all(np.isfinite(hidden[impl]))
        np.testing.assert_allclose(hidden[impl], hidden["einsum"], atol=1e-5, rtol=0)


# ---------------------------------------------------------------------------- padding report


def hand_counted_batch(config):
    """Row 0: 6 of 8 tokens real, one 2x4 image (8 patches); row 1: 8 tokens, two 2x2 images.

    Patch budget 12, so row 0 has 4 padding patches and row 1 has 4.
    """
    img = config.image_token_id
    ids = np.array([[1, img, img, 2, 3, 4, 0, 0], [1, img, 2, img, 3, 4, 5, 6]])
    mask = np.array([[1, 1, 1, 1, 1, 1, 0, 0], [1] * 8])
    grids = np.array([[1, 2, 4], [1, 2, 2], [1, 2, 2]])
    pixels = np.zeros((16, config.vision.patch_dim), np.float32)
    return prepare_batch(config, ids, mask, pixels, grids, num_patches=12)


def test_padding_report_matches_hand_counts():
    config = get_size("tiny")
    batch = hand_counted_batch(config)
    report = padding_report(batch, config)
    assert report["token_padding"] == pytest.approx(2 / 16)
    assert report["text_attention_padding"] == pytest.approx((128 - (36 + 64)) / 128)
    assert report["patch_padding"] == pytest.approx(8 / 24)
    assert report["vision_attention_padding"] == pytest.approx((288 - (64 + 64)) / 288)
    # Row 1's two images: 8 real patches, 4 x 4 + 4 x 4 same-image pairs of its 64.
    assert report["vision_attention_cross_image"] == pytest.approx((64 - 32) / 288)
    padded = flops.text_forward_flops(config, 2, 8) + flops.vision_forward_flops(config, 2, 12)
    real = (
        flops.text_forward_flops(config, 1, 6)
        + flops.text_forward_flops(config, 1, 8)
        + 2 * flops.vision_forward_flops(config, 1, 8)
    )
    assert report["flops_padding"] == pytest.approx(1 - real / padded)


def test_padding_report_sums_the_sides_of_a_train_batch_and_skips_absent_images():
    config = get_size("tiny")
    with_images = hand_counted_batch(config)
    text_only = prepare_batch(config, np.ones((2, 4), np.int64), np.array([[1, 1, 1, 1]] * 2))
    report = padding_report({"query": text_only, "candidate": with_images, "query_key": None})
    assert report["token_padding"] == pytest.approx(2 / (8 + 16))
    assert report["patch_padding"] == pytest.approx(8 / 24)
    alone = padding_report(text_only)
    assert alone == {"token_padding": 0.0, "text_attention_padding": 0.0}
    with pytest.raises(ValueError, match="no model batch found"):
        padding_report({"query_key": np.zeros(2)})
