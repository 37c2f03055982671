"""Exact search on 8 devices, the ScaNN index (defaults, persistence, ids) and its input errors."""

import json
import os
import shutil

import jax
import numpy as np
import pytest

from jfe_jax.index import exact as exact_module
from jfe_jax.index.exact import ExactIndex, exact_search, exact_search_numpy
from jfe_jax.index.scann_index import Index, resolve_settings


def clustered_embeddings(n, dim, num_clusters, num_queries, seed=0, spread=1.0):
    """L2-normalised points around random unit centres; queries are perturbed data points.

    `spread` is the norm of the noise relative to the unit centre, so members of a cluster
    have cosine about 0.5 with each other at spread 1.0.
    """
    rng = np.random.default_rng(seed)
    centres = rng.standard_normal((num_clusters, dim), dtype=np.float32)
    centres /= np.linalg.norm(centres, axis=1, keepdims=True)
    noise_scale = spread / np.sqrt(dim)
    points = centres[rng.integers(0, num_clusters, n)]
    points += noise_scale * rng.standard_normal((n, dim), dtype=np.float32)
    points /= np.linalg.norm(points, axis=1, keepdims=True)
    queries = points[rng.integers(0, n, num_queries)]
    queries = queries + noise_scale * rng.standard_normal(queries.shape, dtype=np.float32)
    queries /= np.linalg.norm(queries, axis=1, keepdims=True)
    return points, queries


def recall_against(approx, exact):
    """Mean fraction of each query's exact top k found in its approximate top k."""
    k = exact.shape[1]
    return float(np.mean([len(set(a) & set(e)) / k for a, e in zip(approx, exact)]))


# -- exact search ------------------------------------------------------------------------------


def test_exact_search_on_8_devices_with_uneven_pool_matches_float64_numpy():
    assert jax.device_count() == 8
    rng = np.random.default_rng(1)
    database = rng.standard_normal((1003, 64)).astype(np.float32)  # 1003 = 8 * 125 + 3
    queries = rng.standard_normal((50, 64)).astype(np.float32)
    # query_block=16 gives 4 blocks, the last one padded.
    indices, scores = exact_search(queries, database, 10, query_block=16)
    ref_indices, ref_scores = exact_search_numpy(queries, database, 10)

    assert indices.dtype == np.int32 and scores.dtype == np.float32
    assert indices.shape == scores.shape == (50, 10)
    assert indices.max() < 1003  # no padding row ever comes back
    np.testing.assert_allclose(scores, ref_scores, rtol=0, atol=1e-5)
    # Compare indices wherever the reference score is apart from its neighbours' scores.
    padded = np.pad(ref_scores, ((0, 0), (1, 1)), constant_values=np.inf)
    padded[:, -1] = -np.inf
    untied = (padded[:, :-2] - padded[:, 1:-1] > 1e-5) & (padded[:, 1:-1] - padded[:, 2:] > 1e-5)
    assert untied.mean() > 0.9
    np.testing.assert_array_equal(indices[untied], ref_indices[untied])


def test_exact_search_breaks_ties_by_lower_row_across_shards():
    # 13 rows over 8 devices (2 per shard): rows 3, 7 and 12 tie for best, the rest tie below.
    database = np.tile(np.array([[1.0, 0.0]], np.float32), (13, 1))
    database[[3, 7, 12]] = [2.0, 0.0]
    queries = np.array([[1.0, 0.0]], np.float32)
    indices, scores = exact_search(queries, database, 6)
    np.testing.assert_array_equal(indices[0], [3, 7, 12, 0, 1, 2])
    np.testing.assert_array_equal(scores[0], [2, 2, 2, 1, 1, 1])
    np.testing.assert_array_equal(exact_search_numpy(queries, database, 6)[0][0], indices[0])


def test_exact_search_pool_smaller_than_device_count_returns_every_row():
    database = np.array([[0.1], [0.5], [-0.2], [0.4], [0.3]], np.float32)
    indices, scores = exact_search(np.ones((3, 1), np.float32), database, 5)
    np.testing.assert_array_equal(indices, [[1, 3, 4, 0, 2]] * 3)
    np.testing.assert_allclose(scores[0], [0.5, 0.4, 0.3, 0.1, -0.2])


def test_exact_search_compiles_once_for_all_blocks_of_one_shape():
    rng = np.random.default_rng(6)
    database = rng.standard_normal((1003, 12)).astype(np.float32)  # dim 12: a fresh shape
    compiled = exact_module._search_block._cache_size()
    for num_queries in (50, 40, 16, 3):  # full and padded blocks of 16
        queries = rng.standard_normal((num_queries, 12)).astype(np.float32)
        exact_search(queries, database, 7, query_block=16)
    assert exact_module._search_block._cache_size() == compiled + 2  # blocks of 16, then of 3


def test_exact_index_places_the_pool_once_and_matches_float64_numpy_with_ties(monkeypatch):
    """The database is transferred once, when the index is made; later searches (several
    query blocks, several calls) move only queries. Ties go to the lower row."""
    rng = np.random.default_rng(3)
    # Small integers: every score is exact in float32 and float64, so ties are real ties
    # (many of them) and the order must match the reference everywhere.
    database = rng.integers(-4, 5, (1003, 32)).astype(np.float32)  # 1003 = 8 * 125 + 3
    database[[10, 500, 700, 1002]] = 4.0  # the best match of the first query, four times
    queries = rng.integers(-4, 5, (41, 32)).astype(np.float32)
    queries[0] = 4.0
    puts = []
    real_put = jax.device_put
    monkeypatch.setattr(
        exact_module.jax,
        "device_put",
        lambda x, *a, **kw: puts.append(np.shape(x)) or real_put(x, *a, **kw),
    )
    index = ExactIndex(database)
    assert index.placements == 1 and not index.streamed
    # One block per device (1008 padded rows / 8), never a padded copy of the whole pool.
    db_puts = [shape for shape in puts if shape[:1] in ((126,), (1008,))]
    assert db_puts == [(126, 32)] * 8
    ref_indices, ref_scores = exact_search_numpy(queries, database, 9)
    for _ in range(2):
        # No implicit transfer either: the resident database is used as it is.
        with jax.transfer_guard_host_to_device("disallow"):
            indices, scores = index.search(queries, 9, query_block=16)
        np.testing.assert_array_equal(indices, ref_indices)
        np.testing.assert_array_equal(scores, ref_scores)
    np.testing.assert_array_equal(indices[0, :4], [10, 500, 700, 1002])
    assert index.placements == 1
    assert [shape for shape in puts if shape[:1] in ((126,), (1008,))] == db_puts


def test_exact_index_from_rows_reads_each_device_block_into_its_own_buffer(monkeypatch):
    """A CPU device may keep a put host buffer as its memory: a buffer reused for the next
    block would silently make every device's rows the last block's."""
    rng = np.random.default_rng(5)
    database = rng.standard_normal((1003, 16)).astype(np.float32)
    put = []
    real_put = jax.device_put

    def recording_put(x, *args, **kwargs):
        if isinstance(x, np.ndarray):
            put.append(x)
        return real_put(x, *args, **kwargs)

    monkeypatch.setattr(exact_module.jax, "device_put", recording_put)

    def read_rows(start, out):
        out[:] = database[start : start + len(out)]

    index = ExactIndex.from_rows(read_rows, 1003, 16)
    monkeypatch.undo()
    blocks = [x for x in put if x.shape == (126, 16)]
    assert len(blocks) == 8
    assert not any(np.shares_memory(a, b) for i, a in enumerate(blocks) for b in blocks[i + 1 :])
    queries = database[[0, 500, 1002]]
    np.testing.assert_array_equal(
        index.search(queries, 5)[0], exact_search_numpy(queries, database, 5)[0]
    )


def test_exact_index_streams_a_pool_larger_than_the_device_budget():
    rng = np.random.default_rng(4)
    database = rng.integers(-4, 5, (1003, 16)).astype(np.float32)  # exact scores, many ties
    database[[5, 42, 400, 999]] = 4.0  # ties across stream blocks
    queries = rng.integers(-4, 5, (21, 16)).astype(np.float32)
    queries[0] = 4.0
    # 8 devices x 30 rows x 64 bytes: blocks of 240 rows, 5 of them.
    index = ExactIndex(database, max_bytes_per_device=30 * 16 * 4)
    assert index.streamed and index.placements == 0
    indices, scores = index.search(queries, 12)
    assert index.placements == 5
    ref_indices, ref_scores = exact_search_numpy(queries, database, 12)
    np.testing.assert_array_equal(indices, ref_indices)
    np.testing.assert_allclose(scores, ref_scores, rtol=0, atol=1e-5)
    np.testing.assert_array_equal(indices[0, :4], [5, 42, 400, 999])


def test_exact_search_rejects_k_larger_than_pool_and_mismatched_dims():
    database = np.zeros((5, 4), np.float32)
    with pytest.raises(ValueError, match="k=6 is larger than the database"):
        exact_search(np.zeros((1, 4), np.float32), database, 6)
    with pytest.raises(ValueError, match="queries have dim 3 but the database has dim 4"):
        exact_search(np.zeros((1, 3), np.float32), database, 2)


# -- default settings on a 100k clustered pool -------------------------------------------------


@pytest.fixture(scope="module")
def clustered_100k():
    """A default-settings index over 100k x 256 clustered embeddings, with shuffled ids."""
    points, queries = clustered_embeddings(100_000, 256, 1000, 1000, seed=0)
    rng = np.random.default_rng(2)
    ids = [f"9:{i}" for i in rng.permutation(len(points))]
    index = Index.build(points, ids, metadata={"model": "tiny", "step": 7})
    return points, queries, ids, index


def test_default_settings_on_100k_clustered_reach_recall_at_10_of_095(clustered_100k):
    points, queries, _, index = clustered_100k
    assert index.settings.mode == "tree_ah"  # 100k is past the AH-only range
    exact_indices, _ = exact_search(queries, points, 10)
    approx_indices, _ = index.search_indices(queries, 10)
    recall = recall_against(approx_indices, exact_indices)
    print(f"recall@10 of default ScaNN vs exact, 100k x 256 clustered: {recall:.4f}")
    assert recall >= 0.95


def test_search_returns_the_candidates_own_ids(clustered_100k):
    points, _, ids, index = clustered_100k
    rows = np.array([5, 77_000, 99_999])
    found_ids, found_scores = index.search(points[rows], 3)
    assert found_ids.shape == (3, 3)
    # A stored vector's best match is itself: its own id, not its row number.
    assert found_ids[:, 0].tolist() == [ids[row] for row in rows]
    np.testing.assert_allclose(found_scores[:, 0], 1.0, atol=1e-3)
    indices, _ = index.search_indices(points[rows], 3)
    assert found_ids.tolist() == [[ids[i] for i in row] for row in indices]


def test_save_then_load_gives_identical_results_and_metadata(clustered_100k, tmp_path):
    _, queries, _, index = clustered_100k
    index.save(tmp_path / "index")
    loaded = Index.load(tmp_path / "index", expect={"dim": 256, "model": "tiny", "step": 7})
    before_ids, before_scores = index.search(queries, 10)
    after_ids, after_scores = loaded.search(queries, 10)
    np.testing.assert_array_equal(after_ids, before_ids)
    np.testing.assert_array_equal(after_scores, before_scores)
    metadata = json.loads((tmp_path / "index" / "index_metadata.json").read_text())
    assert metadata["n"] == 100_000 and metadata["dim"] == 256 and metadata["normalized"]
    assert metadata["settings"]["num_leaves"] == 316
    assert metadata["settings"]["num_leaves_to_search"] == 32
    assert metadata["user"] == {"model": "tiny", "step": 7}
    assert not (tmp_path / "index" / "scann" / "scann_docids.pkl").exists()


# -- settings and small pools ------------------------------------------------------------------


def test_auto_mode_follows_pool_size():
    assert resolve_settings(19_999).mode == "brute_force"
    assert resolve_settings(20_000).mode == "ah"
    assert resolve_settings(20_000).reorder_k == 100
    tree = resolve_settings(1_000_000)
    assert tree.mode == "tree_ah"
    assert (tree.num_leaves, tree.num_leaves_to_search) == (1000, 100)
    assert tree.training_sample_size == 250_000 and tree.spherical


def test_overrides_are_used_and_recorded(tmp_path):
    points, _ = clustered_embeddings(3000, 32, 30, 1)
    index = Index.build(
        points,
        [str(i) for i in range(3000)],
        mode="tree_ah",
        num_leaves=40,
        num_leaves_to_search=8,
        training_sample_size=2000,
        reorder_k=50,
        ah_dims_per_block=4,
        anisotropic_threshold=0.3,
        spherical=False,
    )
    index.save(tmp_path)
    settings = json.loads((tmp_path / "index_metadata.json").read_text())["settings"]
    assert settings == {
        "mode": "tree_ah",
        "metric": "dot_product",
        "num_leaves": 40,
        "num_leaves_to_search": 8,
        "training_sample_size": 2000,
        "spherical": False,
        "reorder_k": 50,
        "ah_dims_per_block": 4,
        "anisotropic_threshold": 0.3,
    }
    config = index._searcher.config()  # ScaNN's text proto: the settings reached ScaNN
    assert "num_children: 40" in config and "max_spill_centers: 8" in config


@pytest.mark.parametrize("metric", ["dot_product", "squared_l2"])
def test_brute_force_mode_equals_exact_numpy(metric):
    rng = np.random.default_rng(3)
    points = rng.standard_normal((500, 16)).astype(np.float32)
    queries = rng.standard_normal((20, 16)).astype(np.float32)
    index = Index.build(points, [f"d{i}" for i in range(500)], metric=metric)
    assert index.settings.mode == "brute_force"
    indices, scores = index.search_indices(queries, 5)
    diffs = queries[:, None, :].astype(np.float64) - points[None].astype(np.float64)
    if metric == "dot_product":
        expected = queries.astype(np.float64) @ points.T.astype(np.float64)
        order = np.argsort(-expected, axis=1)[:, :5]
    else:
        expected = (diffs**2).sum(-1)
        order = np.argsort(expected, axis=1)[:, :5]
    np.testing.assert_array_equal(indices, order)
    np.testing.assert_allclose(scores, np.take_along_axis(expected, order, 1), atol=1e-4)


def test_ah_mode_on_small_clustered_pool_reaches_recall_at_10_of_095():
    points, queries = clustered_embeddings(10_000, 64, 100, 200, seed=4)
    index = Index.build(points, [str(i) for i in range(10_000)], mode="ah")
    exact_indices, _ = exact_search_numpy(queries, points, 10)
    assert recall_against(index.search_indices(queries, 10)[0], exact_indices) >= 0.95


def test_tree_search_fills_k_when_visited_leaves_hold_fewer_points():
    points, queries = clustered_embeddings(3000, 32, 30, 10, seed=5)
    index = Index.build(
        points, [str(i) for i in range(3000)], mode="tree_ah", num_leaves=50, num_leaves_to_search=1
    )
    indices, scores = index.search_indices(queries, 300)  # one leaf holds about 60 points
    assert not np.isnan(scores).any()
    assert all(len(set(row)) == 300 for row in indices)
    assert (np.diff(scores, axis=1) <= 1e-6).all()


def test_saved_index_loads_after_its_directory_moves(tmp_path):
    points, queries = clustered_embeddings(2000, 16, 20, 5)
    index = Index.build(points, [f"c{i}" for i in range(2000)], mode="ah")
    index.save(tmp_path / "a")
    shutil.move(tmp_path / "a", tmp_path / "b")
    moved = Index.load(tmp_path / "b")
    np.testing.assert_array_equal(moved.search(queries, 4)[0], index.search(queries, 4)[0])


# -- bad input -------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def small_index():
    points, _ = clustered_embeddings(100, 8, 4, 1)
    return Index.build(points, [f"c{i}" for i in range(100)], metadata={"model": "a"})


def test_build_rejects_duplicate_ids():
    with pytest.raises(ValueError, match=r"duplicate id.*'c1'"):
        Index.build(np.eye(3, dtype=np.float32), ["c0", "c1", "c1"])


def test_build_rejects_wrong_id_count_and_non_string_ids():
    with pytest.raises(ValueError, match="got 2 ids for 3 embeddings"):
        Index.build(np.eye(3, dtype=np.float32), ["a", "b"])
    with pytest.raises(ValueError, match="id 1 is 7; expected a non-empty string"):
        Index.build(np.eye(3, dtype=np.float32), ["a", 7, "c"])


@pytest.mark.parametrize("bad", [np.nan, np.inf, -np.inf])
def test_build_rejects_non_finite_embeddings(bad):
    embeddings = np.eye(4, dtype=np.float32)
    embeddings[2, 1] = bad
    with pytest.raises(ValueError, match=r"embeddings row\(s\) \[2\] contain NaN or inf"):
        Index.build(embeddings, ["a", "b", "c", "d"])


def test_build_rejects_tree_settings_for_a_pool_without_a_tree():
    with pytest.raises(ValueError, match="num_leaves set, but mode is 'brute_force'"):
        Index.build(np.eye(4, dtype=np.float32), list("abcd"), num_leaves=2)


def test_search_rejects_queries_of_the_wrong_dim(small_index):
    with pytest.raises(ValueError, match="queries have dim 9, but the index has dim 8"):
        small_index.search(np.zeros((2, 9), np.float32), 3)


def test_search_rejects_k_larger_than_the_pool(small_index):
    with pytest.raises(ValueError, match=r"k must be an integer in \[1, pool size 100\], got 101"):
        small_index.search(np.zeros((2, 8), np.float32), 101)


def test_load_rejects_an_index_of_another_model_or_dim(small_index, tmp_path):
    small_index.save(tmp_path)
    with pytest.raises(ValueError, match="'dim' is 8 but 768 was expected"):
        Index.load(tmp_path, expect={"dim": 768})
    with pytest.raises(ValueError, match="'model' is 'a' but 'b' was expected"):
        Index.load(tmp_path, expect={"model": "b"})
    with pytest.raises(ValueError, match="index has no metadata 'step'"):
        Index.load(tmp_path, expect={"step": 3})


@pytest.mark.parametrize("missing", ["index_metadata.json", "ids.npy", "scann/scann_assets.pbtxt"])
def test_load_names_a_missing_file(small_index, tmp_path, missing):
    small_index.save(tmp_path)
    os.remove(tmp_path / missing)
    with pytest.raises(FileNotFoundError, match=f"{missing} is missing"):
        Index.load(tmp_path)


def test_load_refuses_a_pickled_docid_file(small_index, tmp_path):
    small_index.save(tmp_path)
    (tmp_path / "scann" / "scann_docids.pkl").write_bytes(b"not read")
    with pytest.raises(ValueError, match="refusing to unpickle"):
        Index.load(tmp_path)
