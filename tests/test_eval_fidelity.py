"""`jfe eval`'s numbers against an independent transcription of UniIR's metric.

The fixture is a small synthetic benchmark whose OVEN qrels are rewritten the way real M-BEIR
qrels look: positives from the other dataset (InfoSeek ids for OVEN queries, and an InfoSeek
query with OVEN positives), several positives per query, relevance-0 lines (never positives),
exact duplicates in the pools (score ties, broken by the lower pool row), and a query with no
positive line (scores 0, counted). The reference below reads the files with its own parsing,
ranks by float64 numpy over the exported embeddings, and scores with UniIR's
``compute_recall_at_k``, transcribed.
"""

import json
import os

import numpy as np
import pytest
from bench_fixtures import make_bench, small_synthetic, tiny_model

from jfe_jax.cli import main
from jfe_jax.data.mbeir import MBEIR
from jfe_jax.encoder import embedder_for
from jfe_jax.eval.mbeir_eval import query_item
from jfe_jax.index.embedder import Item
from jfe_jax.index.export import load_embeddings

TASKS = ("oven_task6", "oven_task8", "webqa_task1")


def read_jsonl(path):
    with open(path) as f:
        return [json.loads(line) for line in f]


def write_jsonl(path, records):
    with open(path, "w") as f:
        for r in records:
            f.write(json.dumps(r) + "\n")


def rewrite_oven(root):
    """Makes the OVEN qrels look like real M-BEIR's (see the module docstring)."""
    global_pool = os.path.join(root, "cand_pool", "global", "mbeir_union_test_cand_pool.jsonl")
    extra_global = []
    for task in ("oven_task6", "oven_task8"):
        local_pool = os.path.join(root, "cand_pool", "local", f"mbeir_{task}_cand_pool.jsonl")
        pool = {c["did"]: c for c in read_jsonl(local_pool)}
        query_path = os.path.join(root, "query", "test", f"mbeir_{task}_test.jsonl")
        queries = read_jsonl(query_path)
        qrels_path = os.path.join(root, "qrels", "test", f"mbeir_{task}_test_qrels.txt")
        task_id = 6 if task == "oven_task6" else 8
        offset = 900 if task == "oven_task6" else 950
        extra, lines = [], []
        for i, q in enumerate(queries):
            positive = q["pos_cand_list"][0]
            others = [d for d in pool if d != positive]
            # An InfoSeek copy of the OVEN positive: same content, so the same score (a tie).
            copy = dict(pool[positive], did=f"6:{offset + i}")
            extra.append(copy)
            if i == 0:  # only the InfoSeek copy is positive; the OVEN original is a 0 line
                lines += [(q["qid"], positive, 0), (q["qid"], copy["did"], 1)]
            elif i == 1:  # several positives, from both datasets
                lines += [(q["qid"], positive, 1), (q["qid"], copy["did"], 1)]
                lines += [(q["qid"], others[0], 1), (q["qid"], others[1], 0)]
            elif i == 2:  # no positive line at all: scores 0, counted
                lines += [(q["qid"], positive, 0), (q["qid"], copy["did"], 0)]
            elif i == 3:  # an InfoSeek query whose positives are OVEN ids
                q["qid"] = f"6:{offset + 40 + i}"
                lines += [(q["qid"], positive, 1), (q["qid"], others[2], 1)]
            else:  # the original, a relevance-0 line, and an InfoSeek positive of other content
                copy = dict(pool[others[i]], did=f"6:{offset + i}")
                extra[-1] = copy
                lines += [(q["qid"], positive, 1), (q["qid"], others[i + 1], 0)]
                lines += [(q["qid"], copy["did"], 1)]
        write_jsonl(query_path, queries)
        write_jsonl(local_pool, [*pool.values(), *extra])
        with open(qrels_path, "w") as f:
            for qid, did, rel in lines:
                f.write(f"{qid} 0 {did} {rel} {task_id}\n")
        extra_global += extra
    write_jsonl(global_pool, [*read_jsonl(global_pool), *extra_global])
    # InfoSeek (6) queries take InfoSeek instructions: copies of OVEN's rows.
    instructions = os.path.join(root, "instructions", "query_instructions.tsv")
    with open(instructions) as f:
        rows = f.read().splitlines()
    infoseek = [
        "\t".join([*c[:2], "infoseek", "6", *c[4:]])
        for c in (row.split("\t") for row in rows[1:])
        if c[3] == "5"
    ]
    with open(instructions, "w") as f:
        f.write("\n".join(rows + infoseek) + "\n")


def uniir_load_qrel(filename):
    """UniIR's load_qrel: {qid: [did, ...]} of the lines with relevance > 0."""
    qrel = {}
    with open(filename) as f:
        for line in f:
            query_id, _, doc_id, relevance_score, _task_id = line.strip().split()
            if int(relevance_score) > 0:
                qrel.setdefault(query_id, []).append(doc_id)
    return qrel


def uniir_compute_recall_at_k(relevant_docs, retrieved_indices, k):
    """UniIR's compute_recall_at_k, transcribed."""
    if not relevant_docs:
        return 0.0
    return 1.0 if set(relevant_docs) & set(retrieved_indices[:k]) else 0.0


def move_best_candidate_to_infoseek(root, model):
    """Gives OVEN query 5 of oven_task6 an InfoSeek positive that this model ranks first in the
    global pool, above its OVEN positive: the candidate it ranks first is renamed to an
    InfoSeek id in the pools and made positive, so only a rule that drops other datasets'
    positives would miss it at k=1."""
    mbeir = MBEIR(root)
    pool_path = mbeir.global_pool_path("test")
    pool = read_jsonl(pool_path)
    query = mbeir.read_queries("test", "oven_task6")[5]
    embedder = embedder_for(model, batch_size=64, image_root=root)
    pool_emb = embedder.embed(Item(text=c["txt"], image=c["img_path"]) for c in pool)
    (query_emb,) = embedder.embed([query_item(mbeir, query, "fixed", 0)])
    positives = set(uniir_load_qrel(mbeir.qrels_path("test", "oven_task6")).get(query.qid, []))
    best = next(
        pool[r]["did"]
        for r in np.argsort(-(pool_emb @ query_emb), kind="stable")
        if pool[r]["did"] not in positives
    )
    moved = "6:999"
    local = os.path.join(root, "cand_pool", "local", "mbeir_oven_task6_cand_pool.jsonl")
    for path in (pool_path, local):
        records = read_jsonl(path)
        write_jsonl(path, [dict(c, did=moved) if c["did"] == best else c for c in records])
    with open(mbeir.qrels_path("test", "oven_task6"), "a") as f:
        f.write(f"{query.qid} 0 {moved} 1 6\n")


@pytest.fixture(scope="module")
def bench(tmp_path_factory):
    base = tmp_path_factory.mktemp("fidelity")
    root = make_bench(base / "bench", small_synthetic(TASKS, test_queries_per_task=8))
    rewrite_oven(root)
    model = tiny_model(base / "model", root, seed=5)
    move_best_candidate_to_infoseek(root, model)
    return root, model, base


@pytest.mark.parametrize("pool", ["local", "global"])
def test_eval_equals_an_independent_uniir_metric(bench, pool, capsys):
    root, model, base = bench
    out = str(base / f"eval_{pool}")
    args = ["eval", "--model", model, "--mbeir-root", root, "--out", out, "--pool", pool]
    assert main(args) == 0
    assert "2 queries have no positive qrels line" in capsys.readouterr().out
    with open(os.path.join(out, "results.json")) as f:
        results = json.load(f)
    assert results["ranking"] == "exact" and results["queries_without_qrels"] == 2

    embedder = embedder_for(model, batch_size=64, image_root=root)
    mbeir = MBEIR(root)
    some_hit = some_miss = own_rule_differs = False
    for task in TASKS:
        pool_name = "mbeir_union_test_cand_pool" if pool == "global" else f"mbeir_{task}_cand_pool"
        cand_emb, cand_ids, _ = load_embeddings(os.path.join(out, "embeddings", pool_name))
        with open(os.path.join(root, "cand_pool", pool, pool_name + ".jsonl")) as f:
            assert cand_ids == [json.loads(line)["did"] for line in f]  # pool file order
        queries = mbeir.read_queries("test", task)
        query_emb = embedder.embed(query_item(mbeir, q, "fixed", 0) for q in queries)
        scores = query_emb.astype(np.float64) @ cand_emb.astype(np.float64).T
        order = np.argsort(-scores, axis=1, kind="stable")  # ties: lower pool row first
        # The exact run file is the system's ranking (every query's top 10). It ranks by
        # float32 scores, the reference by float64 ones, and the query embeddings here come
        # from other batches than the eval's: at each rank the two must score alike in float64
        # (within float32 rounding of a unit-norm dot product), so they may differ only where
        # candidates tie within that rounding (the global pool's InfoSeek copies of OVEN
        # candidates, encoded in other batches than their originals). Exact ties: see the
        # local pool's copies below.
        with open(os.path.join(out, "runs", f"{task}.{pool}.tsv")) as f:
            run = [line.split() for line in f]
        row = {did: r for r, did in enumerate(cand_ids)}
        ranked = []
        for i, q in enumerate(queries):
            top = [r[2] for r in run if r[0] == q.qid]
            assert len(top) == 10, (task, q.qid)
            gaps = np.abs(scores[i, [row[d] for d in top]] - scores[i, order[i, :10]])
            assert gaps.max() < 1e-6, (task, q.qid, top, [cand_ids[r] for r in order[i, :10]])
            ranked.append(top)
        qrel = uniir_load_qrel(os.path.join(root, "qrels", "test", f"mbeir_{task}_test_qrels.txt"))
        got = results["tasks"][task]["recall"]
        assert set(got) == {"recall@1", "recall@5", "recall@10"}
        for k in (1, 5, 10):
            per_query = [
                uniir_compute_recall_at_k(qrel.get(q.qid, []), ranked[i], k)
                for i, q in enumerate(queries)
            ]
            assert got[f"recall@{k}"] == pytest.approx(np.mean(per_query), abs=1e-12), (task, k)
            some_hit |= max(per_query) == 1.0
            some_miss |= min(per_query) == 0.0
            # The rule this replaces (global pool: OVEN/InfoSeek queries keep only their own
            # dataset's positives) gives other numbers on this fixture.
            own = [
                uniir_compute_recall_at_k(
                    [d for d in qrel.get(q.qid, []) if d.split(":")[0] == q.qid.split(":")[0]]
                    or qrel.get(q.qid, []),
                    ranked[i],
                    k,
                )
                for i, q in enumerate(queries)
            ]
            own_rule_differs |= np.mean(own) != np.mean(per_query)
    assert some_hit and some_miss  # the fixture exercises both
    if pool == "local":
        # The InfoSeek copies score exactly alike with their OVEN originals (one export batch:
        # bitwise equal embeddings), so the fixture exercises ties; the original is the lower
        # row, which the reference ranks first as exact search does.
        emb, ids, _ = load_embeddings(os.path.join(out, "embeddings", "mbeir_oven_task6_cand_pool"))
        copies = [i for i, d in enumerate(ids) if d.startswith("6:") and d != "6:999"]
        assert len(copies) == 8
        for row in copies:
            twins = [j for j in range(len(ids)) if j != row and np.array_equal(emb[j], emb[row])]
            assert twins and min(twins) < row
    assert own_rule_differs or pool == "local"
