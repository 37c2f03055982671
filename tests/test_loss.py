"""contrastive_loss against an independent float64 numpy implementation."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jfe_jax.train.loss import contrastive_loss

BATCH, DIM, NUM_HARD = 12, 16, 3
TEMPERATURE = 0.05
RTOL = 1e-6


def _normalised(rng: np.random.Generator, *shape: int) -> np.ndarray:
    x = rng.normal(size=shape).astype(np.float32)
    return x / np.linalg.norm(x, axis=-1, keepdims=True)


def _logsumexp(values: list[float]) -> float:
    top = max(values)
    return top + float(np.log(np.sum(np.exp(np.array(values) - top))))


def reference_loss(
    query, cand, *, scale, query_ids=None, cand_ids=None, hard=None, hard_ids=None, symmetric
):
    """Loop-by-loop InfoNCE in float64: returns (mean loss, accuracy)."""
    query, cand = query.astype(np.float64), cand.astype(np.float64)
    batch = len(query)

    def duplicate(i, j):
        same_cand = cand_ids is not None and cand_ids[i] == cand_ids[j]
        same_query = query_ids is not None and query_ids[i] == query_ids[j]
        return i != j and (same_cand or same_query)

    losses, hits = [], 0
    for i in range(batch):
        positive = scale * query[i] @ cand[i]
        negatives = [
            scale * query[i] @ cand[j] for j in range(batch) if j != i and not duplicate(i, j)
        ]
        if hard is not None:
            for j in range(batch):
                for h in range(hard.shape[1]):
                    if hard_ids is not None and hard_ids[j, h] == cand_ids[i]:
                        continue
                    negatives.append(scale * query[i] @ hard[j, h].astype(np.float64))
        loss = _logsumexp([positive, *negatives]) - positive
        hits += positive > max(negatives)
        if symmetric:
            reverse = [
                scale * cand[i] @ query[j] for j in range(batch) if j != i and not duplicate(i, j)
            ]
            loss = 0.5 * (loss + _logsumexp([positive, *reverse]) - positive)
        losses.append(loss)
    return float(np.mean(losses)), hits / batch


CASES = {
    "plain": {},
    "hard_negatives": {"hard": True},
    "duplicate_cand_ids": {"cand_ids": True},
    "duplicate_query_and_cand_ids": {"cand_ids": True, "query_ids": True},
    "hard_negative_ids": {"hard": True, "cand_ids": True, "hard_ids": True},
    "symmetric": {"symmetric": True},
    "everything": {
        "hard": True,
        "cand_ids": True,
        "query_ids": True,
        "hard_ids": True,
        "symmetric": True,
    },
}


@pytest.mark.parametrize("case", list(CASES))
def test_contrastive_loss_matches_float64_reference(case):
    options = CASES[case]
    rng = np.random.default_rng(0)
    query = _normalised(rng, BATCH, DIM)
    # Positives close to their queries so the accuracy is neither 0 nor 1.
    cand = query + 0.6 * rng.normal(size=(BATCH, DIM)).astype(np.float32)
    cand = (cand / np.linalg.norm(cand, axis=-1, keepdims=True)).astype(np.float32)
    # Rows 1 and 5 share a candidate; rows 2, 7 and 9 share a query.
    cand_ids = np.arange(BATCH, dtype=np.int32)
    cand_ids[5] = cand_ids[1]
    query_ids = np.arange(100, 100 + BATCH, dtype=np.int32)
    query_ids[[7, 9]] = query_ids[2]
    hard = _normalised(rng, BATCH, NUM_HARD, DIM)
    hard_ids = np.arange(1000, 1000 + BATCH * NUM_HARD, dtype=np.int32).reshape(BATCH, NUM_HARD)
    hard_ids[4, 0] = cand_ids[0]  # a hard negative of query 4 is the positive of query 0
    hard_ids[0, 2] = cand_ids[0]  # and one of query 0 is its own positive

    kwargs = dict(
        query_ids=query_ids if options.get("query_ids") else None,
        cand_ids=cand_ids if options.get("cand_ids") else None,
        hard=hard if options.get("hard") else None,
        hard_ids=hard_ids if options.get("hard_ids") else None,
        symmetric=options.get("symmetric", False),
    )
    expected_loss, expected_accuracy = reference_loss(query, cand, scale=1 / TEMPERATURE, **kwargs)

    loss, metrics = jax.jit(
        lambda q, c: contrastive_loss(
            q,
            c,
            temperature=TEMPERATURE,
            query_ids=kwargs["query_ids"],
            cand_ids=kwargs["cand_ids"],
            hard_negatives=kwargs["hard"],
            hard_negative_ids=kwargs["hard_ids"],
            symmetric=kwargs["symmetric"],
        )
    )(query, cand)

    np.testing.assert_allclose(float(loss), expected_loss, rtol=RTOL)
    loss_sum, loss_count = metrics["loss"]
    np.testing.assert_allclose(float(loss_sum) / float(loss_count), expected_loss, rtol=RTOL)
    assert float(loss_count) == BATCH
    hits, count = metrics["accuracy"]
    assert float(count) == BATCH
    assert float(hits) / float(count) == pytest.approx(expected_accuracy)
    assert 0 < expected_accuracy < 1


def test_logit_scale_equals_inverse_temperature():
    rng = np.random.default_rng(1)
    query, cand = _normalised(rng, BATCH, DIM), _normalised(rng, BATCH, DIM)
    by_temperature, _ = contrastive_loss(query, cand, temperature=0.05)
    by_scale, _ = contrastive_loss(query, cand, logit_scale=jnp.float32(20.0))
    expected, _ = reference_loss(query, cand, scale=20.0, symmetric=False)
    np.testing.assert_allclose(float(by_scale), expected, rtol=RTOL)
    np.testing.assert_allclose(float(by_temperature), expected, rtol=RTOL)


def test_masked_pairs_leave_gradients_finite():
    # Masking writes -inf into the logits; its gradient must stay finite (no inf - inf).
    rng = np.random.default_rng(2)
    query, cand = _normalised(rng, 4, DIM), _normalised(rng, 4, DIM)
    hard = _normalised(rng, 4, 2, DIM)
    cand_ids = np.array([0, 1, 0, 3])
    hard_ids = np.array([[0, 5], [6, 7], [8, 9], [10, 1]])

    def loss(q, c, h):
        return contrastive_loss(
            q,
            c,
            temperature=0.05,
            cand_ids=cand_ids,
            query_ids=np.array([0, 0, 2, 3]),
            hard_negatives=h,
            hard_negative_ids=hard_ids,
            symmetric=True,
        )[0]

    grads = jax.grad(loss, argnums=(0, 1, 2))(query, cand, hard)
    for grad in grads:
        assert np.all(np.isfinite(np.asarray(grad)))
        assert np.any(np.asarray(grad) != 0)


def test_needs_exactly_one_of_temperature_and_logit_scale():
    x = np.eye(4, dtype=np.float32)
    with pytest.raises(ValueError, match="exactly one of temperature"):
        contrastive_loss(x, x)
    with pytest.raises(ValueError, match="exactly one of temperature"):
        contrastive_loss(x, x, temperature=0.05, logit_scale=20.0)


def test_shape_errors_name_the_input():
    x = np.eye(4, dtype=np.float32)
    with pytest.raises(ValueError, match="query_emb and cand_emb"):
        contrastive_loss(x, x[:3], temperature=0.05)
    with pytest.raises(ValueError, match="hard_negatives must be"):
        contrastive_loss(x, x, temperature=0.05, hard_negatives=np.zeros((4, 2, 3), np.float32))
    with pytest.raises(ValueError, match="cand_ids must have shape"):
        contrastive_loss(x, x, temperature=0.05, cand_ids=np.arange(3))
