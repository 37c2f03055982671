"""Index search side by side: ScaNN (default settings) vs exact search vs faiss, one run.

On one set of clustered, L2-normalised embeddings (Gaussian clusters around random unit
centres; queries are perturbed data points) it builds each index, searches the same queries
for their top 10 by dot product, and prints one table: build time, queries per second (best
of --repeats), the ratio to exact numpy, and recall@10 against exact numpy (the fraction of
each query's exact top 10 that a method returns, averaged over queries).

Methods:
  exact numpy   float32 matmul + argpartition, query blocks of 256
  exact JAX     jfe_jax.index.exact.exact_search on the local devices (compile excluded)
  ScaNN         jfe_jax.Index.build defaults for the pool size (a tree above 100k)
  faiss HNSW32  IndexHNSWFlat, M=32, efConstruction=40, efSearch 128 and 512
  faiss IVF-PQ  IVF sqrt(n)*1 lists, PQ dim/8 bytes (8 bits), nprobe=lists/10, without and
                with exact refinement of 10*k candidates (IndexRefineFlat)

Usage: python benchmarks/bench_index.py --n 1000000 --dim 256 --queries 1000
"""

from __future__ import annotations

import argparse
import math
import os
import time

import numpy as np

from jfe_jax.index.exact import exact_search
from jfe_jax.index.scann_index import Index

K = 10


def clustered_embeddings(n, dim, num_clusters, num_queries, seed, spread):
    """Unit-norm points around random unit centres (noise norm `spread`), and noisy queries."""
    rng = np.random.default_rng(seed)
    centres = rng.standard_normal((num_clusters, dim), dtype=np.float32)
    centres /= np.linalg.norm(centres, axis=1, keepdims=True)
    points = centres[rng.integers(0, num_clusters, n)]
    for start in range(0, n, 100_000):  # in place, in chunks: no second n x dim buffer
        chunk = points[start : start + 100_000]
        chunk += spread / math.sqrt(dim) * rng.standard_normal(chunk.shape, dtype=np.float32)
        chunk /= np.linalg.norm(chunk, axis=1, keepdims=True)
    queries = points[rng.integers(0, n, num_queries)]
    queries += spread / math.sqrt(dim) * rng.standard_normal(queries.shape, dtype=np.float32)
    queries /= np.linalg.norm(queries, axis=1, keepdims=True)
    return points, queries


def exact_numpy_top_k(queries, points, k, block=256):
    """Exact top k by float32 matmul + argpartition, sorted best first."""
    out = np.empty((len(queries), k), dtype=np.int64)
    for start in range(0, len(queries), block):
        scores = queries[start : start + block] @ points.T
        top = np.argpartition(-scores, k - 1, axis=1)[:, :k]
        order = np.argsort(-np.take_along_axis(scores, top, axis=1), axis=1)
        out[start : start + block] = np.take_along_axis(top, order, axis=1)
    return out


def recall_at_k(found, exact):
    """Mean fraction of each query's exact top k present in the method's top k."""
    k = exact.shape[1]
    return float(np.mean([len(set(f) & set(e)) / k for f, e in zip(found, exact)]))


def best_time(search, repeats):
    """(indices of the last run, best wall time over `repeats` runs) of search()."""
    best = math.inf
    for _ in range(repeats):
        start = time.perf_counter()
        indices = search()
        best = min(best, time.perf_counter() - start)
    return indices, best


def main():
    """Builds every index, times the searches and prints the table."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--n", type=int, default=1_000_000, help="pool size")
    parser.add_argument("--dim", type=int, default=256, help="embedding dimension")
    parser.add_argument("--queries", type=int, default=1000, help="number of queries")
    parser.add_argument("--clusters", type=int, default=1000, help="Gaussian clusters")
    parser.add_argument("--spread", type=float, default=1.0, help="noise norm per point")
    parser.add_argument("--repeats", type=int, default=3, help="timed searches, best kept")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--skip", default="", help="comma list of methods to skip: hnsw,ivfpq")
    args = parser.parse_args()
    skip = set(filter(None, args.skip.split(",")))

    import faiss
    import jax

    start = time.perf_counter()
    points, queries = clustered_embeddings(
        args.n, args.dim, args.clusters, args.queries, args.seed, args.spread
    )
    print(
        f"data: {args.n} x {args.dim}, {args.queries} queries, {args.clusters} clusters, "
        f"spread {args.spread}; generated in {time.perf_counter() - start:.1f} s"
    )
    print(
        f"jax {jax.__version__} on {jax.device_count()} x {jax.devices()[0].platform}, "
        f"faiss {faiss.__version__} with {faiss.omp_get_max_threads()} threads"
    )
    print(f"load average before the run (1, 5, 15 min): {os.getloadavg()}")
    rows = []  # (method, build seconds or None, search seconds, indices)

    exact, seconds = best_time(lambda: exact_numpy_top_k(queries, points, K), args.repeats)
    rows.append(("exact numpy (f32 matmul+argpartition)", None, seconds, exact))

    # Compile outside the timing: one call on the same block shape as the timed calls.
    exact_search(queries, points, K)
    found, seconds = best_time(lambda: exact_search(queries, points, K)[0], args.repeats)
    rows.append((f"exact JAX exact_search ({jax.device_count()} dev)", None, seconds, found))

    start = time.perf_counter()
    index = Index.build(points, [str(i) for i in range(args.n)])
    build = time.perf_counter() - start
    s = index.settings
    name = f"ScaNN default ({s.mode}"
    if s.mode == "tree_ah":
        name += f" {s.num_leaves}/{s.num_leaves_to_search} leaves"
    name += f", reorder {s.reorder_k})" if s.reorder_k else ")"
    found, seconds = best_time(lambda: index.search_indices(queries, K)[0], args.repeats)
    rows.append((name, build, seconds, found))

    if "hnsw" not in skip:
        start = time.perf_counter()
        hnsw = faiss.IndexHNSWFlat(args.dim, 32, faiss.METRIC_INNER_PRODUCT)
        hnsw.hnsw.efConstruction = 40
        hnsw.add(points)
        build = time.perf_counter() - start
        for ef_search in (128, 512):
            hnsw.hnsw.efSearch = ef_search
            found, seconds = best_time(lambda: hnsw.search(queries, K)[1], args.repeats)
            rows.append((f"faiss HNSW32 (efC 40, efSearch {ef_search})", build, seconds, found))

    if "ivfpq" not in skip:
        lists = max(1, round(math.sqrt(args.n)))
        start = time.perf_counter()
        coarse = faiss.IndexFlatIP(args.dim)
        ivfpq = faiss.IndexIVFPQ(
            coarse, args.dim, lists, args.dim // 8, 8, faiss.METRIC_INNER_PRODUCT
        )
        sample = points[np.random.default_rng(1).choice(args.n, min(args.n, 100 * lists), False)]
        ivfpq.train(sample)
        ivfpq.add(points)
        build = time.perf_counter() - start
        ivfpq.nprobe = max(1, lists // 10)
        label = f"IVF{lists},PQ{args.dim // 8} nprobe {ivfpq.nprobe}"
        found, seconds = best_time(lambda: ivfpq.search(queries, K)[1], args.repeats)
        rows.append((f"faiss {label}", build, seconds, found))
        start = time.perf_counter()
        refined = faiss.IndexRefineFlat(ivfpq, faiss.swig_ptr(points))
        refined.k_factor = 10
        refine_build = build + time.perf_counter() - start
        found, seconds = best_time(lambda: refined.search(queries, K)[1], args.repeats)
        rows.append((f"faiss {label} + refine 10k", refine_build, seconds, found))

    exact_qps = args.queries / rows[0][2]
    print()
    print(f"| method | build (s) | queries/s | x exact numpy | recall@{K} |")
    print("|---|---:|---:|---:|---:|")
    for method, build, seconds, found in rows:
        qps = args.queries / seconds
        build_text = "-" if build is None else f"{build:.1f}"
        recall = recall_at_k(found, exact)
        print(f"| {method} | {build_text} | {qps:,.0f} | {qps / exact_qps:.1f} | {recall:.4f} |")
    print(f"\nload average after the run (1, 5, 15 min): {os.getloadavg()}")


if __name__ == "__main__":
    main()
