"""MIRe's query-guided attentive pooling and MaxSim score against float64 numpy transcriptions
of the reference formulas (../shared/MIRE.md sections 1.4 and 1.6), on 1 and 8 devices."""

import math

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import traverse_util
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from jfe_jax.models.mire import QueryGuidedAttentivePooling, maxsim, maxsim_scores

TOL = 1e-4  # float32 module against float64 numpy, max |diff|


def _count(module, d_v):
    shapes = jax.eval_shape(
        module.init,
        jax.random.key(0),
        jnp.zeros((1, 4, module.out_dim)),
        jnp.zeros((1, 5, d_v)),
        jnp.ones((1, 4), jnp.int32),
    )
    return sum(int(np.prod(x.shape)) for x in jax.tree.leaves(shapes))


def test_parameter_counts_equal_the_reference_architecture():
    # QueryGuidedAttentivePooling(num_tokens=16, num_heads=12, out_dim=128) on CLIP ViT-B/32
    # (d_v 768) and ViT-L/14-336 (d_v 1024), as the paper's configs build it.
    assert _count(QueryGuidedAttentivePooling(), 768) == 14_704_512
    assert _count(QueryGuidedAttentivePooling(), 1024) == 15_753_600


def _layer_norm(x, scale, bias, eps=1e-5):
    mean = x.mean(-1, keepdims=True)
    var = ((x - mean) ** 2).mean(-1, keepdims=True)
    return (x - mean) / np.sqrt(var + eps) * scale + bias


_erf = np.vectorize(math.erf)


def _reference_pooling(p, text, visual, mask, *, sum_masked_rows, heads, tokens, dim):
    """reference retrievers/mire.py QueryGuidedAttentivePooling.forward, in float64."""
    f = {k: np.asarray(v, np.float64) for k, v in p.items()}
    batch, length, _ = text.shape
    cls, patches = visual[:, 0], visual[:, 1:]
    # encode_image: split_mlp on the class token
    hidden = np.tanh(cls @ f["split_mlp_0/kernel"] + f["split_mlp_0/bias"])
    global_tokens = (hidden @ f["split_mlp_2/kernel"] + f["split_mlp_2/bias"]).reshape(
        batch, tokens, dim
    )
    # encode_mm: proj, keys and values per head, text rows as queries for every head
    x = _layer_norm(patches, f["proj_0/scale"], f["proj_0/bias"])
    x = x @ f["proj_1/kernel"] + f["proj_1/bias"]
    x = 0.5 * x * (1 + _erf(x / math.sqrt(2)))  # nn.GELU(): exact erf
    k = (x @ f["k_state/kernel"]).reshape(batch, -1, heads, dim).transpose(0, 2, 1, 3)
    v = (x @ f["v_state/kernel"]).reshape(batch, -1, heads, dim).transpose(0, 2, 1, 3)
    q = np.repeat(text[:, None], heads, axis=1)  # [B, H, L, d]
    scores = q @ k.transpose(0, 1, 3, 2) / math.sqrt(dim)
    scores = np.where(mask[:, None, :, None] > 0, scores, -9999.0)
    scores = np.exp(scores - scores.max(-1, keepdims=True))
    attention = scores / scores.sum(-1, keepdims=True)
    rows = attention @ v  # [B, H, L, d]
    if not sum_masked_rows:
        rows = rows * mask[:, None, :, None]
    pooled = rows.sum(2) / (mask.sum(1)[:, None, None] + 1e-15)
    guided = _layer_norm(pooled, f["o_proj_0/scale"], f["o_proj_0/bias"])
    guided = guided @ f["o_proj_1/kernel"] + f["o_proj_1/bias"]
    return np.concatenate([global_tokens, guided], axis=1)


@pytest.fixture(scope="module")
def pooling_case():
    rng = np.random.default_rng(0)
    batch, length, patches, d_v = 3, 9, 10, 48
    text = rng.normal(size=(batch, length, 128)) * 0.2
    mask = np.ones((batch, length), np.int32)
    mask[0, 5:] = 0  # a padded query
    mask[1, 1] = mask[1, 7:] = 0  # a masked row inside, as [MASK] positions at eval
    # The ColBERT projections are multiplied by the mask; float32 as the model takes them.
    text = (text * mask[..., None]).astype(np.float32)
    visual = rng.normal(size=(batch, 1 + patches, d_v)).astype(np.float32)
    module = QueryGuidedAttentivePooling(mask_mode="consistent")
    params = module.init(jax.random.key(1), text, visual, mask)
    # Random LayerNorm scales and biases, so that a wrong axis or eps shows.
    flat = traverse_util.flatten_dict(jax.device_get(nn.meta.unbox(params["params"])), sep="/")
    for name in list(flat):
        if name.endswith(("scale", "bias")):
            flat[name] = rng.normal(size=flat[name].shape).astype(np.float32) * 0.5 + (
                1.0 if name.endswith("scale") else 0.0
            )
    params = {"params": traverse_util.unflatten_dict(flat, sep="/")}
    return text, visual, mask, params, flat


@pytest.mark.parametrize("mask_mode", ["consistent", "reference_eval", "reference_train"])
def test_pooling_equals_the_reference_formulas_in_float64(pooling_case, mask_mode):
    text, visual, mask, params, flat = pooling_case
    module = QueryGuidedAttentivePooling(mask_mode=mask_mode)
    got = np.asarray(
        module.apply(params, *(jnp.asarray(a, jnp.float32) for a in (text, visual)), mask)
    )
    want = _reference_pooling(
        flat,
        text,
        visual,
        mask,
        sum_masked_rows=mask_mode != "consistent",
        heads=12,
        tokens=16,
        dim=128,
    )
    assert got.shape == (3, 28, 128)
    assert np.abs(got - want).max() <= TOL


def test_the_mask_modes_differ_only_where_text_rows_are_masked(pooling_case):
    text, visual, mask, params, _ = pooling_case
    out = {
        mode: np.asarray(
            QueryGuidedAttentivePooling(mask_mode=mode).apply(params, text, visual, mask)
        )
        for mode in ("consistent", "reference_eval")
    }
    np.testing.assert_array_equal(out["consistent"][:, :16], out["reference_eval"][:, :16])
    assert np.abs(out["consistent"][:, 16:] - out["reference_eval"][:, 16:]).max() > 1e-3
    # Consistent pooling averages the valid rows only: masked rows change nothing, whatever
    # their text vectors hold.
    noisy = text + (1 - mask[..., None]) * np.random.default_rng(1).normal(size=text.shape)
    again = QueryGuidedAttentivePooling(mask_mode="consistent").apply(params, noisy, visual, mask)
    np.testing.assert_allclose(np.asarray(again), out["consistent"], atol=1e-6)
    # With no masked row the two modes are one formula.
    full = np.ones_like(mask)
    a, b = (
        np.asarray(QueryGuidedAttentivePooling(mask_mode=m).apply(params, text, visual, full))
        for m in ("consistent", "reference_train")
    )
    np.testing.assert_allclose(a, b, atol=1e-6)


def test_bad_inputs_are_refused_naming_what_is_wrong(pooling_case):
    text, visual, mask, params, _ = pooling_case
    with pytest.raises(ValueError, match="mask_mode='eval'"):
        QueryGuidedAttentivePooling(mask_mode="eval").apply(params, text, visual, mask)
    with pytest.raises(ValueError, match="width 64; expected 128"):
        QueryGuidedAttentivePooling().apply(params, text[..., :64], visual, mask)
    with pytest.raises(ValueError, match="text_mask"):
        QueryGuidedAttentivePooling().apply(params, text, visual, mask[:, :4])


def _reference_maxsim(q, q_mask, d, d_mask):
    """colbert_score over explicit loops, float64: zeroed query vectors, -9999 on masked docs."""
    q = q * q_mask[..., None]
    out = np.zeros((len(q), len(d)))
    for a in range(len(q)):
        for b in range(len(d)):
            sims = q[a] @ d[b].T
            sims[:, d_mask[b] == 0] = -9999.0
            out[a, b] = sims.max(axis=1).sum()
    return out


def _unit(x):
    return x / np.linalg.norm(x, axis=-1, keepdims=True)


@pytest.fixture(scope="module")
def score_case():
    rng = np.random.default_rng(2)
    q = _unit(rng.normal(size=(5, 12, 16)))
    d = _unit(rng.normal(size=(19, 11, 16)))
    q_mask = np.ones((5, 12), np.int32)
    q_mask[1, 6:] = 0
    q_mask[3, 0] = 0
    d_mask = (rng.random((19, 11)) > 0.3).astype(np.int32)
    d_mask[:, 0] = 1  # every document keeps a position
    d_mask[4, 3:] = 0  # a short, padded document
    return q, q_mask, d, d_mask


@pytest.mark.parametrize("doc_chunk", [1, 4, 19, 64])
def test_maxsim_equals_colbert_score_in_float64(score_case, doc_chunk):
    q, q_mask, d, d_mask = score_case
    want = _reference_maxsim(q, q_mask, d, d_mask)
    f32 = [jnp.asarray(a, jnp.float32) for a in (q, d)]
    got = np.asarray(maxsim_scores(f32[0], q_mask, f32[1], d_mask, doc_chunk=doc_chunk))
    assert got.shape == (5, 19)
    assert np.abs(got - want).max() <= 1e-5
    # Masked positions never match: scrambling them changes nothing.
    rng = np.random.default_rng(3)
    d_noise = np.where(d_mask[..., None] > 0, d, rng.normal(size=d.shape) * 10)
    q_noise = np.where(q_mask[..., None] > 0, q, rng.normal(size=q.shape) * 10)
    again = maxsim(
        jnp.asarray(q_noise, jnp.float32), q_mask, jnp.asarray(d_noise, jnp.float32), d_mask
    )
    np.testing.assert_allclose(np.asarray(again), got, atol=1e-5)


def test_scores_sharded_over_8_devices_equal_one_device(score_case):
    q, q_mask, d, d_mask = score_case
    assert jax.device_count() == 8
    # 24 documents: the columns split evenly over the devices.
    d = np.concatenate([d, d[:5]])
    d_mask = np.concatenate([d_mask, d_mask[:5]])
    one = maxsim_scores(
        jnp.asarray(q, jnp.float32), q_mask, jnp.asarray(d, jnp.float32), d_mask, doc_chunk=3
    )
    mesh = Mesh(np.array(jax.devices()), ("data",))
    docs = NamedSharding(mesh, PartitionSpec("data"))
    replicated = NamedSharding(mesh, PartitionSpec())
    sharded = maxsim_scores(
        jax.device_put(jnp.asarray(q, jnp.float32), replicated),
        jax.device_put(q_mask, replicated),
        jax.device_put(jnp.asarray(d, jnp.float32), docs),
        jax.device_put(d_mask, docs),
        doc_chunk=3,
    )
    np.testing.assert_allclose(np.asarray(sharded), np.asarray(one), rtol=0, atol=1e-6)


def test_maxsim_refuses_mismatched_shapes(score_case):
    q, q_mask, d, d_mask = score_case
    with pytest.raises(ValueError, match=r"expected \[Q, Lq, d\] and \[D, Ld, d\]"):
        maxsim_scores(q[..., :8], q_mask, d, d_mask)
    with pytest.raises(ValueError, match="masks"):
        maxsim_scores(q, q_mask[:, :3], d, d_mask)
    with pytest.raises(ValueError, match="doc_chunk=0"):
        maxsim_scores(q, q_mask, d, d_mask, doc_chunk=0)
