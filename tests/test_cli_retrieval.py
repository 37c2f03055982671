"""jfe export / index build / index search / search / eval on a small synthetic benchmark."""

import json
import os

import numpy as np
import pytest
from bench_fixtures import make_bench, small_synthetic, tiny_model

from jfe_jax.cli import main
from jfe_jax.data.mbeir import MBEIR
from jfe_jax.index.exact import exact_search_numpy
from jfe_jax.index.export import load_embeddings


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    base = tmp_path_factory.mktemp("cli")
    tasks = ("mscoco_task0", "webqa_task1", "cirr_task7")
    root = make_bench(base / "bench", small_synthetic(tasks))
    return root, tiny_model(base / "model", root, seed=2), base


def test_export_index_and_search_return_the_exact_top_k(setup, capsys):
    root, model, base = setup
    pool, index, queries = str(base / "pool"), str(base / "index"), str(base / "queries")
    common = ["--model", model, "--mbeir-root", root]
    assert main(["export", *common, "--pool", "mscoco_task0", "--out", pool]) == 0
    assert main(["index", "build", "--embeddings", pool, "--out", index]) == 0
    assert main(["export", *common, "--queries", "mscoco_task0", "--out", queries]) == 0
    results = str(base / "hits.jsonl")
    assert (
        main(
            ["index", "search", "--index", index, "--queries", queries, "-k", "5", "--out", results]
        )
        == 0
    )
    pool_emb, pool_ids, _ = load_embeddings(pool)
    query_emb, qids, meta = load_embeddings(queries)
    assert meta["instruction_mode"] == "fixed"
    rows, _ = exact_search_numpy(query_emb, pool_emb, 5)
    with open(results) as f:
        hits = [json.loads(line) for line in f]
    assert [h["qid"] for h in hits] == qids
    assert [h["ids"] for h in hits] == [[pool_ids[r] for r in row] for row in rows]

    capsys.readouterr()
    assert (
        main(
            [
                "search",
                "--model",
                model,
                "--index",
                index,
                "--text",
                "a red circle",
                "-k",
                "3",
                "--json",
            ]
        )
        == 0
    )
    out = json.loads(capsys.readouterr().out)
    # What describes the query, and none of argparse's other fields (--json, --batch-size, ...).
    assert set(out["query"]) == {"text", "image", "instruction", "task", "model", "index", "k"}
    assert out["query"] == {
        "text": "a red circle",
        "image": None,
        "instruction": None,
        "task": None,
        "model": model,
        "index": index,
        "k": 3,
    }
    assert len(out["hits"]) == 3 and all(h["id"] in pool_ids for h in out["hits"])
    assert all(h["image"] and os.path.isfile(h["image"]) for h in out["hits"])

    # --task: the task's instruction from the data, as evaluation prefixes it to its queries.
    mbeir = MBEIR(root)
    expected = mbeir.instruction_for(mbeir.read_queries("test", "mscoco_task0")[0])
    query = ["search", "--model", model, "--index", index, "--text", "a red circle", "--json"]
    assert main([*query, "--task", "mscoco_task0"]) == 0
    by_task = json.loads(capsys.readouterr().out)
    assert by_task["query"]["instruction"] == expected
    assert by_task["query"]["task"] == "mscoco_task0"
    assert main([*query, "--instruction", expected]) == 0
    assert json.loads(capsys.readouterr().out)["hits"] == by_task["hits"]
    assert main([*query, "--task", "cirr_task7"]) == 2  # an image + text task
    assert "takes image,text queries" in capsys.readouterr().err


def test_export_and_eval_with_a_mesh_match_the_replicated_model(setup, capsys):
    """--mesh keeps the params in their shards over the 8 devices; the numbers do not change."""
    root, model, base = setup
    common = ["--model", model, "--mbeir-root", root]
    plain, meshed = str(base / "pool_plain"), str(base / "pool_mesh")
    assert main(["export", *common, "--pool", "webqa_task1", "--out", plain]) == 0
    assert (
        main(
            [
                "export",
                *common,
                "--pool",
                "webqa_task1",
                "--out",
                meshed,
                "--mesh",
                "fsdp=4,data=-1",
            ]
        )
        == 0
    )
    plain_emb, plain_ids, _ = load_embeddings(plain)
    mesh_emb, mesh_ids, _ = load_embeddings(meshed)
    assert mesh_ids == plain_ids
    np.testing.assert_allclose(mesh_emb, plain_emb, rtol=0, atol=1e-5)
    out = str(base / "eval_mesh")
    assert main(["eval", *common, "--out", out, "--index-mode", "none", "--mesh", "fsdp=8"]) == 0
    with open(os.path.join(out, "results.json")) as f:
        assert set(json.load(f)["tasks"]) >= {"mscoco_task0", "webqa_task1"}
    capsys.readouterr()
    for bad, said in (
        ("fsdp=3", "the product of the axis sizes must equal the device count"),
        ("pipeline=2", "expected comma-separated axis=size"),
        ("fsdp=x", "is not an integer"),
    ):
        code = main(["export", *common, "--pool", "webqa_task1", "--out", meshed, "--mesh", bad])
        assert code == 2, bad
        assert said in capsys.readouterr().err, bad


def test_search_errors_are_clear(setup, capsys):
    root, model, base = setup
    pool, index = str(base / "pool2"), str(base / "index2")
    main(["export", "--model", model, "--mbeir-root", root, "--pool", "webqa_task1", "--out", pool])
    main(["index", "build", "--embeddings", pool, "--out", index])
    capsys.readouterr()
    assert main(["search", "--model", model, "--index", index]) == 2
    assert "needs --text, --image or both" in capsys.readouterr().err
    other = str(base / "other_model")
    tiny_model(other, root, seed=9, tie_word_embeddings=False)
    queries = str(base / "q_other")
    main(
        [
            "export",
            "--model",
            other,
            "--mbeir-root",
            root,
            "--queries",
            "webqa_task1",
            "--out",
            queries,
        ]
    )
    capsys.readouterr()
    assert (
        main(
            [
                "index",
                "search",
                "--index",
                index,
                "--queries",
                queries,
                "-k",
                "3",
                "--out",
                str(base / "x.jsonl"),
            ]
        )
        == 2
    )
    assert "was this index built by another model" in capsys.readouterr().err
    assert (
        main(
            [
                "index",
                "search",
                "--index",
                index,
                "--queries",
                pool,
                "-k",
                "100000",
                "--out",
                str(base / "y.jsonl"),
            ]
        )
        == 2
    )
    assert "k must be an integer in [1, pool size" in capsys.readouterr().err


def test_eval_writes_table_json_and_plot(setup, capsys):
    root, model, base = setup
    out = str(base / "eval")
    assert main(["eval", "--model", model, "--mbeir-root", root, "--out", out]) == 0
    text = capsys.readouterr().out
    assert "mscoco_task0" in text and "conditional" in text and "average" in text
    with open(os.path.join(out, "results.json")) as f:
        results = json.load(f)
    assert set(results["tasks"]) == {"mscoco_task0", "webqa_task1", "cirr_task7"}
    assert results["instruction_mode"] == "fixed"
    assert results["ranking"] == "exact" and results["queries_without_qrels"] == 0
    assert results["tasks"]["cirr_task7"]["headline_k"] == 5
    for task, detail in results["details"].items():
        # UniIR's k: R@1/5/10 here (no fashion task).
        assert set(results["tasks"][task]["recall"]) == {"recall@1", "recall@5", "recall@10"}
        # brute-force ScaNN on these small pools equals exact search
        assert detail["scann"]["recall"] == {
            k.removeprefix("recall@"): v for k, v in results["tasks"][task]["recall"].items()
        }
        assert detail["scann"]["agreement_at_5"] == 1.0
        with open(os.path.join(out, "runs", f"{task}.local.tsv")) as f:
            assert len(f.readlines()) == detail["queries"] * 10
    assert os.path.getsize(os.path.join(out, "results.png")) > 1000
    assert np.isfinite(results["average"])

    # jfe eval's (and so the demo's) indexes name their pool file: with the M-BEIR root,
    # jfe search shows each hit's text and image, and --task takes the task's instruction.
    index = os.path.join(out, "index", "mbeir_mscoco_task0_test_cand_pool")
    query = ["--model", model, "--index", index, "--mbeir-root", root, "--json", "-k", "2"]
    assert main(["search", *query, "--task", "mscoco_task0", "--text", "a red circle"]) == 0
    hits = json.loads(capsys.readouterr().out)["hits"]
    assert len(hits) == 2 and all(h["image"] and os.path.isfile(h["image"]) for h in hits)
