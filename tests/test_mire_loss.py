"""MIRe's MaxSim InfoNCE (jfe_jax/train/mire_loss.py) against a float64 numpy implementation, on
one device and sharded over 8 fake devices, with global and local negatives, and its gradient
cache against the full-batch gradient."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jfe_jax.models.axes import LOGICAL_RULES
from jfe_jax.train.grad_cache import grad_cache_loss_and_grad
from jfe_jax.train.mesh import batch_sharding, data_parallel_size, make_mesh, replicated_sharding
from jfe_jax.train.mire_loss import (
    TEMPERATURE_STAGE1,
    TEMPERATURE_STAGE2,
    cached_vector_grads,
    grad_cache_loss_fn,
    maxsim_infonce,
)

BATCH, QUERY_LEN, DOC_LEN, DIM, FEATURES = 8, 5, 7, 16, 12
PADDING_ROW = 5  # a padding pair: its query and its document fully masked
FILL = -9999.0  # the reference's value for masked document positions (MIRE.md section 1.6)
RTOL = 1e-5  # float32 loss and gradients against float64 numpy, relative to the largest entry
MESHES = [{"data": 2, "fsdp": 4, "tensor": 1}, {"data": 2, "fsdp": 2, "tensor": 2}]


def _normalised(rng: np.random.Generator, *shape: int) -> np.ndarray:
    x = rng.normal(size=shape)
    return (x / np.linalg.norm(x, axis=-1, keepdims=True)).astype(np.float32)


def make_inputs(seed: int = 0, batch: int = BATCH, masked: bool = True) -> dict:
    """Unit token vectors (masked positions hold vectors too, so a mask that is ignored shows)
    and masks: padded query and document positions and, with ``masked``, a padding pair."""
    rng = np.random.default_rng(seed)
    q, d = _normalised(rng, batch, QUERY_LEN, DIM), _normalised(rng, batch, DOC_LEN, DIM)
    d = (0.5 * d + 0.5 * np.pad(q, ((0, 0), (0, DOC_LEN - QUERY_LEN), (0, 0)))).astype(np.float32)
    q_mask = np.ones((batch, QUERY_LEN), np.int32)
    d_mask = np.ones((batch, DOC_LEN), np.int32)
    if masked:
        q_mask[:, 3:] = rng.integers(0, 2, size=(batch, QUERY_LEN - 3))
        d_mask[:, 2:] = rng.integers(0, 2, size=(batch, DOC_LEN - 2))
        q_mask[PADDING_ROW] = 0
        d_mask[PADDING_ROW] = 0
    return dict(q=q, q_mask=q_mask, d=d, d_mask=d_mask)


def _pair_score(q, q_mask, d, d_mask):
    """MaxSim of one pair in float64 and, per query position, its best document position."""
    valid = np.flatnonzero(d_mask)
    if not len(valid):
        return FILL * q_mask.sum(), None
    sims = q @ d[valid].T
    return float((q_mask * sims.max(axis=1)).sum()), valid[sims.argmax(axis=1)]


def _reference_group(q, q_mask, d, d_mask, tau, ids, scale_to, grad_q, grad_d):
    """One group's loss sum and hits; adds its gradient (of the mean over ``scale_to``
    queries) into ``grad_q`` and ``grad_d``."""
    n = len(q)
    scores, best = np.zeros((n, n)), {}
    for b in range(n):
        for c in range(n):
            scores[b, c], best[b, c] = _pair_score(q[b], q_mask[b], d[c], d_mask[c])
    allowed = np.ones((n, n), bool)
    for key in ids:
        if key is not None:
            allowed &= (key[:, None] != key[None, :]) | np.eye(n, dtype=bool)
    logits = np.where(allowed, scores / tau, -np.inf)
    top = logits.max(axis=1, keepdims=True)
    lse = top[:, 0] + np.log(np.exp(logits - top).sum(axis=1))
    losses = lse - np.diagonal(logits)
    probs = np.exp(logits - lse[:, None])
    dscores = (probs - np.eye(n)) / (tau * scale_to)
    for b in range(n):
        for c in range(n):
            if best[b, c] is None:  # a fully masked document's score is a constant
                continue
            weights = dscores[b, c] * q_mask[b]
            grad_q[b] += weights[:, None] * d[c, best[b, c]]
            np.add.at(grad_d[c], best[b, c], weights[:, None] * q[b])
    return losses.sum(), int((logits.argmax(axis=1) == np.arange(n)).sum())


def reference(q, q_mask, d, d_mask, *, tau, groups=1, query_ids=None, doc_ids=None):
    """Loop-by-loop float64 loss, accuracy and gradients w.r.t. q and d, ``groups`` contiguous
    groups scoring among themselves."""
    q, d = q.astype(np.float64), d.astype(np.float64)
    grad_q, grad_d = np.zeros_like(q), np.zeros_like(d)
    size, total, hits = len(q) // groups, 0.0, 0
    for g in range(groups):
        rows = slice(g * size, (g + 1) * size)
        ids = [None if k is None else np.asarray(k)[rows] for k in (query_ids, doc_ids)]
        loss, hit = _reference_group(
            q[rows], q_mask[rows], d[rows], d_mask[rows], tau, ids, len(q), grad_q[rows],
            grad_d[rows],
        )  # fmt: skip
        total, hits = total + loss, hits + hit
    return total / len(q), hits / len(q), grad_q, grad_d


def relative(actual, expected) -> float:
    """max|actual - expected| / max|expected|."""
    actual, expected = np.asarray(actual, np.float64), np.asarray(expected, np.float64)
    return float(np.max(np.abs(actual - expected)) / np.max(np.abs(expected)))


DUPLICATES = dict(
    query_ids=np.array([0, 1, 2, 1, 4, 5, 6, 7], np.int32),
    doc_ids=np.array([0, 1, 2, 3, 4, 5, 0, 7], np.int32),
)
CASES = {
    "unmasked": (dict(masked=False), {}, TEMPERATURE_STAGE1),
    "masks_and_padding_pair": (dict(), {}, TEMPERATURE_STAGE1),
    "masks_stage2": (dict(seed=1), {}, TEMPERATURE_STAGE2),
    "false_negatives": (dict(seed=2), DUPLICATES, TEMPERATURE_STAGE1),
}


@pytest.mark.parametrize("case", CASES)
def test_loss_and_vector_grads_match_float64_numpy(case):
    input_options, ids, tau = CASES[case]
    inputs = make_inputs(**input_options)
    step = jax.jit(lambda x, k: cached_vector_grads(**x, **k, temperature=tau))
    (loss, metrics), (grad_q, grad_d) = step(inputs, ids)
    ref_loss, ref_accuracy, ref_grad_q, ref_grad_d = reference(**inputs, tau=tau, **ids)

    assert relative(loss, ref_loss) <= RTOL
    assert relative(metrics["loss"][0] / metrics["loss"][1], ref_loss) <= RTOL
    assert float(metrics["accuracy"][0] / metrics["accuracy"][1]) == ref_accuracy
    assert relative(grad_q, ref_grad_q) <= RTOL
    assert relative(grad_d, ref_grad_d) <= RTOL
    # Masked query positions get no gradient; the padding pair's vectors none at all.
    assert not np.any(np.asarray(grad_q)[np.asarray(inputs["q_mask"]) == 0])
    if input_options.get("masked", True):
        assert not np.any(np.asarray(grad_d)[PADDING_ROW])


@pytest.mark.parametrize("groups", [2, 4])
def test_local_negatives_are_the_mean_of_per_shard_losses(groups):
    inputs = make_inputs(seed=3)
    tau = TEMPERATURE_STAGE1
    local = jax.jit(
        lambda x: cached_vector_grads(**x, temperature=tau, negatives="local", shards=groups)
    )
    (loss, metrics), (grad_q, grad_d) = local(inputs)
    size = BATCH // groups
    shard_losses = [
        reference(**{k: v[g * size : (g + 1) * size] for k, v in inputs.items()}, tau=tau)[0]
        for g in range(groups)
    ]
    _, ref_accuracy, ref_grad_q, ref_grad_d = reference(**inputs, tau=tau, groups=groups)
    global_loss, _ = maxsim_infonce(**inputs, temperature=tau)

    assert relative(loss, np.mean(shard_losses)) <= RTOL
    assert float(metrics["accuracy"][0] / metrics["accuracy"][1]) == ref_accuracy
    assert relative(grad_q, ref_grad_q) <= RTOL
    assert relative(grad_d, ref_grad_d) <= RTOL
    assert abs(float(loss) - float(global_loss)) > 0.1  # fewer negatives: a different loss


def test_local_false_negatives_are_masked_within_each_group():
    inputs, tau = make_inputs(seed=4), TEMPERATURE_STAGE2
    ids = dict(query_ids=np.array([0, 0, 2, 3, 4, 5, 6, 6], np.int32), doc_ids=None)
    loss, _ = jax.jit(
        lambda x, k: maxsim_infonce(**x, **k, temperature=tau, negatives="local", shards=4)
    )(inputs, ids)
    ref_loss = reference(**inputs, tau=tau, groups=4, **ids)[0]
    assert relative(loss, ref_loss) <= RTOL
    assert relative(loss, reference(**inputs, tau=tau, groups=4)[0]) > 1e-3


def _sharded(mesh, fn, inputs):
    """``fn(inputs)`` jitted under ``mesh`` and the rules, the batch split over its data axes."""
    with jax.set_mesh(mesh), nn.logical_axis_rules(LOGICAL_RULES):
        placed = jax.device_put(inputs, batch_sharding(mesh))
        out_shardings = ((replicated_sharding(mesh),) * 2, (batch_sharding(mesh),) * 2)
        return jax.jit(fn, out_shardings=out_shardings)(placed)


@pytest.mark.parametrize("mesh_shape", MESHES, ids=["data2_fsdp4", "data2_fsdp2_tensor2"])
@pytest.mark.parametrize("negatives", ["global", "local"])
def test_sharded_loss_equals_one_device(mesh_shape, negatives):
    mesh = make_mesh(mesh_shape)
    shards = data_parallel_size(mesh)
    inputs = make_inputs(seed=5, batch=16)
    options = dict(temperature=TEMPERATURE_STAGE1, negatives=negatives, shards=shards)

    def fn(x):
        (loss, metrics), grads = cached_vector_grads(**x, **options)
        return (loss, metrics["accuracy"][0]), grads

    (loss, hits), grads = _sharded(mesh, fn, inputs)
    (one_loss, one_hits), one_grads = jax.jit(fn)(inputs)
    ref_loss, ref_accuracy, *ref_grads = reference(
        **inputs, tau=TEMPERATURE_STAGE1, groups=shards if negatives == "local" else 1
    )

    assert grads[0].sharding.spec == batch_sharding(mesh).spec
    assert relative(loss, one_loss) <= 1e-6
    assert float(hits) == float(one_hits) == ref_accuracy * 16
    for grad, one_grad, ref_grad in zip(grads, one_grads, ref_grads, strict=True):
        assert relative(grad, one_grad) <= 1e-6
        assert relative(grad, ref_grad) <= RTOL
    assert relative(loss, ref_loss) <= RTOL


def tower(params: dict, x: jax.Array) -> jax.Array:
    """A toy linear tower: features ``[rows, L, F]`` -> unit token vectors ``[rows, L, DIM]``."""
    vectors = x @ params["kernel"] + params["bias"]
    return vectors / jnp.linalg.norm(vectors, axis=-1, keepdims=True)


def _toy_batch(seed: int = 6) -> tuple[dict, dict]:
    rng = np.random.default_rng(seed)
    params = {
        "kernel": rng.normal(size=(FEATURES, DIM)).astype(np.float32),
        "bias": rng.normal(size=(DIM,)).astype(np.float32),
    }
    masks = make_inputs(seed=seed)
    x_q = rng.normal(size=(BATCH, QUERY_LEN, FEATURES)).astype(np.float32)
    x_d = np.pad(x_q, ((0, 0), (0, DOC_LEN - QUERY_LEN), (0, 0)))
    x_d = (x_d + rng.normal(size=x_d.shape)).astype(np.float32)
    return params, dict(x_q=x_q, q_mask=masks["q_mask"], x_d=x_d, d_mask=masks["d_mask"])


GRAD_CACHE_OPTIONS = {
    "global": dict(temperature=TEMPERATURE_STAGE1),
    "local": dict(temperature=TEMPERATURE_STAGE1, negatives="local", shards=2),
    "false_negatives": dict(temperature=TEMPERATURE_STAGE2, **DUPLICATES),
}


def _full_batch(params, batch, options):
    def loss(p):
        q, d = tower(p, batch["x_q"]), tower(p, batch["x_d"])
        return maxsim_infonce(q, batch["q_mask"], d, batch["d_mask"], **options)

    return jax.value_and_grad(loss, has_aux=True)(params)


def _chunked(params, batch, options, chunk):
    """Embed chunk by chunk without gradients, take the vectors' gradient, re-run each chunk
    under jax.vjp with its slice as cotangent and sum the parameter gradients."""
    starts = range(0, BATCH, chunk)
    embed = jax.jit(tower)
    q = jnp.concatenate([embed(params, batch["x_q"][s : s + chunk]) for s in starts])
    d = jnp.concatenate([embed(params, batch["x_d"][s : s + chunk]) for s in starts])
    (loss, _), (grad_q, grad_d) = cached_vector_grads(
        q, batch["q_mask"], d, batch["d_mask"], **options
    )
    grads = jax.tree.map(jnp.zeros_like, params)
    for s in starts:
        for x, cotangent in ((batch["x_q"], grad_q), (batch["x_d"], grad_d)):
            _, vjp = jax.vjp(lambda p, x=x[s : s + chunk]: tower(p, x), params)
            grads = jax.tree.map(jnp.add, grads, vjp(cotangent[s : s + chunk])[0])
    return loss, grads


@pytest.mark.parametrize("chunk", [1, 2, 4])
@pytest.mark.parametrize("loss_case", GRAD_CACHE_OPTIONS)
def test_grad_cache_rerun_equals_full_batch_gradient(loss_case, chunk):
    options = GRAD_CACHE_OPTIONS[loss_case]
    params, batch = _toy_batch()
    (loss, _), grads = jax.jit(lambda p, b: _full_batch(p, b, options))(params, batch)
    cached_loss, cached_grads = _chunked(params, batch, options, chunk)

    assert relative(cached_loss, loss) <= 1e-6
    for name in params:
        assert relative(cached_grads[name], grads[name]) <= 1e-5


def test_grad_cache_loss_fn_plugs_into_grad_cache_loss_and_grad():
    params, batch = _toy_batch(seed=7)
    options = GRAD_CACHE_OPTIONS["global"]
    loss_fn = grad_cache_loss_fn(batch["q_mask"], batch["d_mask"], **options)

    def cached(p, b):
        return grad_cache_loss_and_grad(
            lambda p, side: tower(p, side["x"]), loss_fn, p, {"x": b["x_q"]}, {"x": b["x_d"]},
            chunk_size=2,
        )  # fmt: skip

    (loss, _), grads = jax.jit(lambda p, b: _full_batch(p, b, options))(params, batch)
    (cached_loss, _), cached_grads = jax.jit(cached)(params, batch)
    assert relative(cached_loss, loss) <= 1e-6
    for name in params:
        assert relative(cached_grads[name], grads[name]) <= 1e-5


def _bad(change: dict) -> dict:
    inputs = make_inputs(seed=8)
    inputs.update(temperature=TEMPERATURE_STAGE1)
    inputs.update(change)
    return inputs


BAD_INPUTS = {
    "q_not_3d": (dict(q=np.zeros((BATCH, DIM), np.float32)), "q and d must be token vectors"),
    "batch_mismatch": (dict(d=np.zeros((BATCH - 1, DOC_LEN, DIM), np.float32)), "same batch"),
    "dim_mismatch": (dict(d=np.zeros((BATCH, DOC_LEN, DIM + 1), np.float32)), "differ in dim"),
    "q_mask_shape": (dict(q_mask=np.ones((BATCH, QUERY_LEN + 1))), "q_mask must have shape"),
    "d_mask_shape": (dict(d_mask=np.ones((BATCH, DOC_LEN - 1))), "d_mask must have shape"),
    "doc_ids_shape": (dict(doc_ids=np.arange(BATCH + 1)), "doc_ids must have shape"),
    "zero_temperature": (dict(temperature=0.0), "temperature must be positive"),
    "negative_temperature": (dict(temperature=-0.3), "temperature must be positive"),
    "vector_temperature": (dict(temperature=np.ones(2)), "temperature must be a scalar"),
    "unknown_negatives": (dict(negatives="cross"), "negatives='cross'"),
    "local_without_shards": (dict(negatives="local"), "needs shards"),
    "shards_do_not_divide": (dict(negatives="local", shards=3), "does not split into shards=3"),
}


@pytest.mark.parametrize("case", BAD_INPUTS)
def test_bad_input_raises_naming_it(case):
    change, message = BAD_INPUTS[case]
    with pytest.raises(ValueError, match=message):
        maxsim_infonce(**_bad(change))


def test_traced_temperature_is_not_checked_but_used():
    inputs = make_inputs()
    traced = jax.jit(lambda x, tau: maxsim_infonce(**x, temperature=tau)[0])(inputs, 0.8)
    ref_loss = reference(**inputs, tau=0.8)[0]
    assert relative(traced, ref_loss) <= RTOL
    assert relative(traced, reference(**inputs, tau=0.3)[0]) > 1e-2
