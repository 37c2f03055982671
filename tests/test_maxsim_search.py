"""jfe_jax/index/maxsim_search.py: exact MaxSim search against a float64 numpy brute force."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
import pytest
from jax.sharding import Mesh

from jfe_jax.index.maxsim_search import MaxSimIndex

TIE = 1e-6  # reference scores closer than this are a tie: either order is right


def brute_force(queries, query_mask, docs, doc_mask) -> np.ndarray:
    """Float64 ``[Q, D]`` MaxSim: for each valid query position, its best valid document
    position's dot product, summed; masked query positions add nothing."""
    q, d = np.asarray(queries, np.float64), np.asarray(docs, np.float64)
    scores = np.zeros((q.shape[0], d.shape[0]))
    for n in range(d.shape[0]):
        valid_doc = d[n][np.asarray(doc_mask[n], bool)]  # [valid Ld, dim]
        best = (q @ valid_doc.T).max(axis=-1)  # [Q, Lq]
        scores[:, n] = np.where(np.asarray(query_mask, bool), best, 0.0).sum(axis=-1)
    return scores


def assert_ranks_like(rows, scores, reference, k) -> None:
    """Scores match the reference's top k (rtol 1e-5); ranks agree except among ties."""
    order = np.argsort(-reference, axis=1, kind="stable")
    ranked = np.take_along_axis(reference, order, axis=1)
    np.testing.assert_allclose(scores, ranked[:, :k], rtol=1e-5, atol=1e-6)
    for q in range(reference.shape[0]):
        assert len(set(rows[q].tolist())) == k, rows[q]
        for r in range(k):
            gap_before = np.inf if r == 0 else ranked[q, r - 1] - ranked[q, r]
            gap_after = np.inf if r + 1 == ranked.shape[1] else ranked[q, r] - ranked[q, r + 1]
            if min(gap_before, gap_after) > TIE:
                assert rows[q, r] == order[q, r], (q, r, rows[q], order[q, :k])
            else:
                assert abs(reference[q, rows[q, r]] - ranked[q, r]) <= TIE


def pool(rng, num_docs=29, doc_len=6, dim=8):
    docs = rng.normal(size=(num_docs, doc_len, dim)).astype(np.float32)
    docs /= np.linalg.norm(docs, axis=-1, keepdims=True)
    mask = rng.random((num_docs, doc_len)) < 0.6
    mask[np.arange(num_docs), rng.integers(0, doc_len, num_docs)] = True  # one valid at least
    return docs, mask


def queries(rng, num_queries=10, query_len=4, dim=8):
    q = rng.normal(size=(num_queries, query_len, dim)).astype(np.float32)
    q /= np.linalg.norm(q, axis=-1, keepdims=True)
    mask = rng.random((num_queries, query_len)) < 0.7
    mask[:, 0] = True
    mask[1, 1:] = False  # a one-token query
    return q, mask


def one_device_mesh() -> Mesh:
    return Mesh(np.array(jax.devices()[:1]), ("db",))


@pytest.mark.parametrize("devices", [8, 1])
def test_matches_float64_brute_force_with_masks_padding_and_ragged_blocks(devices):
    rng = np.random.default_rng(0)
    docs, doc_mask = pool(rng)  # 29 documents: 4 per shard on 8 devices, 3 padding rows
    q, q_mask = queries(rng)  # 10 queries in blocks of 3
    ids = np.array([f"doc-{n}" for n in range(len(docs))])
    mesh = None if devices == 8 else one_device_mesh()
    index = MaxSimIndex(docs, doc_mask, ids, mesh=mesh, doc_chunk=3)
    assert index.mesh.devices.size == devices
    assert index.doc_chunk == 3 and index.rows_per_shard % 3 == 0
    reference = brute_force(q, q_mask, docs, doc_mask)
    for k in (5, len(docs)):
        rows, scores = index.search_rows(q, q_mask, k, query_block=3, progress=False)
        assert rows.dtype == np.int32 and scores.dtype == np.float32
        assert rows.shape == scores.shape == (len(q), k)
        assert rows.min() >= 0 and rows.max() < len(docs)  # never a padding document
        assert_ranks_like(rows, scores, reference, k)
    found, found_scores = index.search(q, q_mask, 5, query_block=3, progress=False)
    np.testing.assert_array_equal(found, ids[rows[:, :5]])
    np.testing.assert_array_equal(found_scores, scores[:, :5])


def test_masked_positions_change_the_score_as_the_reference_says():
    rng = np.random.default_rng(1)
    docs, doc_mask = pool(rng, num_docs=11)
    q, q_mask = queries(rng, num_queries=4)
    index = MaxSimIndex(docs, doc_mask, doc_chunk=2)
    rows, scores = index.search_rows(q, q_mask, 11, progress=False)
    assert_ranks_like(rows, scores, brute_force(q, q_mask, docs, doc_mask), 11)
    # Unmasking everything ranks differently: the masks are read, not ignored.
    full = brute_force(q, np.ones_like(q_mask), docs, np.ones_like(doc_mask))
    assert not np.allclose(np.sort(scores, axis=1), np.sort(full, axis=1)[:, ::-1], atol=1e-3)


def test_padding_documents_are_never_returned_even_below_every_real_score():
    # Real scores far below the all-masked score (MASK_FILL per position, -9999 * 3): a
    # padding document left unguarded would outrank every real one. (Every document position
    # is valid: score.maxsim's fill would otherwise win the max over such dot products.)
    rng = np.random.default_rng(2)
    docs, doc_mask = pool(rng, num_docs=9, dim=4)
    docs, doc_mask = np.abs(docs) * 1e5, np.ones_like(doc_mask)
    q = -np.abs(rng.normal(size=(2, 3, 4))).astype(np.float32)
    q_mask = np.ones((2, 3), bool)
    q_mask[1] = False  # every document scores 0: ties, lower row first
    index = MaxSimIndex(docs, doc_mask)  # 9 documents on 8 devices: 7 padding rows
    rows, scores = index.search_rows(q, q_mask, 9, progress=False)
    assert scores[0].max() < -1e5
    assert sorted(rows[0].tolist()) == list(range(9))
    np.testing.assert_array_equal(rows[1], np.arange(9))
    np.testing.assert_array_equal(scores[1], np.zeros(9))


@pytest.mark.parametrize("doc_chunk", [1, 256])
def test_ties_go_to_the_lower_row_across_shards_and_chunks(doc_chunk):
    rng = np.random.default_rng(3)
    docs, doc_mask = pool(rng, num_docs=20)  # 3 per shard on 8 devices
    q, q_mask = queries(rng, num_queries=2)
    # Copies of one document that matches query 0 exactly, in rows of different shards
    # (rows 2, 9, 17: shards 0, 3, 5) and two in one shard (9, 10), placed out of order.
    best = np.zeros_like(docs[0])
    best[: q.shape[1]] = q[0]
    for row in (17, 10, 2, 9):
        docs[row], doc_mask[row] = best, True
    index = MaxSimIndex(docs, doc_mask, doc_chunk=doc_chunk)
    rows, scores = index.search_rows(q, q_mask, 5, progress=False)
    np.testing.assert_array_equal(rows[0, :4], [2, 9, 10, 17])
    assert scores[0, 0] == scores[0, 1] == scores[0, 2] == scores[0, 3] > scores[0, 4]


def test_bfloat16_storage_scores_the_rounded_vectors_in_float32():
    rng = np.random.default_rng(4)
    docs, doc_mask = pool(rng, num_docs=13)
    q, q_mask = queries(rng, num_queries=5)
    index = MaxSimIndex(docs, doc_mask, storage_dtype="bfloat16", doc_chunk=2)
    assert index._docs.dtype == jnp.bfloat16
    rounded = docs.astype(ml_dtypes.bfloat16).astype(np.float32)
    rows, scores = index.search_rows(q, q_mask, 6, query_block=4, progress=False)
    assert_ranks_like(rows, scores, brute_force(q, q_mask, rounded, doc_mask), 6)


def test_jax_inputs_search_as_numpy_ones_do():
    rng = np.random.default_rng(5)
    docs, doc_mask = pool(rng, num_docs=13)
    q, q_mask = queries(rng, num_queries=5)
    from_numpy = MaxSimIndex(docs, doc_mask, doc_chunk=2)
    from_jax = MaxSimIndex(jnp.asarray(docs), jnp.asarray(doc_mask), doc_chunk=2)
    expected = from_numpy.search_rows(q, q_mask, 6, query_block=4, progress=False)
    got = from_jax.search_rows(jnp.asarray(q), jnp.asarray(q_mask), 6, query_block=4)
    np.testing.assert_array_equal(got[0], expected[0])
    np.testing.assert_array_equal(got[1], expected[1])


def test_one_block_holds_a_chunk_of_similarities_not_the_shard():
    # 8 devices x 64 documents each; a block of 4 queries x 8 positions against 16 positions.
    rng = np.random.default_rng(6)
    docs, doc_mask = pool(rng, num_docs=512, doc_len=16, dim=8)
    sims_bytes = {}
    for chunk in (4, 64):
        index = MaxSimIndex(docs, doc_mask, doc_chunk=chunk)
        assert index.doc_chunk == chunk and index.rows_per_shard == 64
        stats = index.lower_block(4, 8, 5).compile().memory_analysis()
        if stats is None:
            pytest.skip("this backend reports no memory analysis")
        sims_bytes[chunk] = stats.temp_size_in_bytes
    whole_shard = 4 * 64 * 8 * 16 * 4  # [block, documents per shard, Lq, Ld] float32
    assert sims_bytes[4] < whole_shard / 4, sims_bytes
    assert sims_bytes[64] >= whole_shard, sims_bytes  # the measure sees the similarities


def test_default_query_block_keeps_the_similarities_within_budget():
    rng = np.random.default_rng(7)
    docs, doc_mask = pool(rng, num_docs=8 * 256, doc_len=512, dim=1)
    index = MaxSimIndex(docs, doc_mask)  # 256 per shard: one chunk of 256
    assert index.query_block_size(10_000, 32) == 2**26 // (256 * 32 * 512) == 16
    assert index.query_block_size(10_000, 1) == 512
    assert index.query_block_size(3, 32) == 3


def test_progress_bar_counts_query_blocks(capsys):
    rng = np.random.default_rng(8)
    docs, doc_mask = pool(rng, num_docs=9)
    q, q_mask = queries(rng, num_queries=7)
    index = MaxSimIndex(docs, doc_mask)
    index.search_rows(q, q_mask, 2, query_block=3, progress=False)
    assert "maxsim search" not in capsys.readouterr().err
    index.search_rows(q, q_mask, 2, query_block=3)
    assert "3/3" in capsys.readouterr().err


def _bad_pools():
    docs, mask = np.zeros((4, 3, 2), np.float32), np.ones((4, 3), bool)
    return [
        ((np.zeros((0, 3, 2)), np.ones((0, 3), bool)), {}, "pool is empty"),
        ((docs, np.ones((4, 2), bool)), {}, "document mask has shape"),
        ((docs[0], mask[0]), {}, "must be 3-D"),
        ((docs, mask, ["a", "b"]), {}, "2 document ids for 4 documents"),
        ((docs, mask), {"storage_dtype": "float16"}, "storage_dtype='float16'"),
        ((docs, mask), {"doc_chunk": 0}, "doc_chunk must be a positive"),
        ((docs, mask), {"max_bytes_per_device": 8}, "bytes per device"),
    ]


@pytest.mark.parametrize(("args", "kwargs", "message"), _bad_pools())
def test_bad_pools_are_named(args, kwargs, message):
    with pytest.raises(ValueError, match=message):
        MaxSimIndex(*args, **kwargs)


def test_bad_searches_are_named():
    index = MaxSimIndex(np.ones((4, 3, 2), np.float32), np.ones((4, 3), bool))
    q, mask = np.ones((2, 5, 2), np.float32), np.ones((2, 5), bool)
    cases = [
        ((np.ones((2, 5, 3), np.float32), mask, 1), "dim 3 but the documents have dim 2"),
        ((q, np.ones((2, 4), bool), 1), "query mask has shape"),
        ((q[0], mask[0], 1), "must be 3-D"),
        ((q, mask, 0), "k must be a positive integer"),
        ((q, mask, 5), "larger than the database"),
    ]
    for args, message in cases:
        with pytest.raises(ValueError, match=message):
            index.search_rows(*args, progress=False)
    with pytest.raises(ValueError, match="query_block must be a positive"):
        index.search_rows(q, mask, 1, query_block=0)
