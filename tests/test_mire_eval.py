"""jfe_jax/eval/mire_eval.py (issue 34 item 3): a tiny random MIRe on a tiny synthetic M-BEIR
root; its Recall@k against an independent float64 MaxSim brute force and a recall read from the
qrels files, the skipped tasks, the run files, results.json and bad input."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import numpy as np
import pytest

from jfe_jax.data.mire_tokenizer import mire_tokenizer_for  # noqa: E402
from jfe_jax.data.synthetic.generate import SyntheticConfig, generate  # noqa: E402
from jfe_jax.eval.mire_eval import evaluate_mire, mire_skip_reason  # noqa: E402
from jfe_jax.models.mire.model import MIRe, get_mire_size  # noqa: E402

APPLIED = ("webqa_task1", "webqa_task2", "oven_task6", "oven_task8")
SKIPPED = ("mscoco_task0", "mscoco_task3")
DATA = SyntheticConfig(
    seed=3,
    tasks=APPLIED + SKIPPED,
    train_queries_per_task=2,
    val_queries_per_task=1,
    test_queries_per_task=6,
    num_text_triples=2,
    num_image_captions=2,
    tokenizer_vocab_size=0,
)
KS = (1, 3, 5)
BATCH = 5  # not a divisor of the pools (18), so batches of unequal lengths are joined
TIE = 1e-5  # reference scores closer than this are a tie: either order is right


@pytest.fixture(scope="module")
def root(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("mire_eval") / "mbeir"
    generate(str(path), DATA, progress=False)
    return path


@pytest.fixture(scope="module")
def model(root) -> MIRe:
    tiny = get_mire_size("mire-tiny")
    config = dataclasses.replace(tiny, query_maxlen=16, doc_maxlen=24)
    return MIRe.init(config, mire_tokenizer_for(root, vocab_size=600), seed=1)


@pytest.fixture(scope="module")
def evaluated(model, root, tmp_path_factory):
    out = tmp_path_factory.mktemp("mire_eval_out")
    results = evaluate_mire(model, root, ks=KS, batch_size=BATCH, out_dir=out, progress=False)
    return results, out


def _jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def _image(root: Path, path: str | None) -> str | None:
    return None if not path else str(root / path)


def _maxsim64(q, q_mask, d, d_mask) -> np.ndarray:
    """Float64 [Q, D]: per valid query position its best valid document position, summed."""
    q, d = np.asarray(q, np.float64), np.asarray(d, np.float64)
    scores = np.zeros((q.shape[0], d.shape[0]))
    for n in range(d.shape[0]):
        best = (q @ d[n][np.asarray(d_mask[n], bool)].T).max(axis=-1)
        scores[:, n] = np.where(np.asarray(q_mask, bool), best, 0.0).sum(axis=-1)
    return scores


def first_prompts(root: Path) -> dict[tuple[str, str, str], str]:
    """{(query modality, candidate modality, dataset id): prompt_1} of the instructions TSV."""
    lines = (root / "instructions" / "query_instructions.tsv").read_text().splitlines()[1:]
    rows = [line.split("\t") for line in lines if line.strip()]
    return {(r[0], r[1], r[3]): r[4] for r in rows}


def query_texts(root: Path, task: str, queries: list[dict], instruction: bool) -> list[str]:
    """Plain query texts, or each after its task's first prompt and a space."""
    texts = [q["query_txt"] or "" for q in queries]
    if not instruction:
        return texts
    cand = {"0": "image", "1": "text", "2": "image,text", "6": "text", "8": "image,text"}
    prompts = first_prompts(root)
    return [
        f"{prompts[(q['query_modality'], cand[task[-1]], q['qid'].split(':')[0])]} {t}".strip()
        for q, t in zip(queries, texts)
    ]


def reference(model: MIRe, root: Path, task: str, instruction: bool = False):
    """(qids, dids, float64 scores [Q, D], {qid: positive dids}) read from the files directly;
    every query and every document encoded in one call each (not evaluate_mire's batches)."""
    queries = _jsonl(root / "query" / "test" / f"mbeir_{task}_test.jsonl")
    pool = _jsonl(root / "cand_pool" / "local" / f"mbeir_{task}_cand_pool.jsonl")
    q_images = [_image(root, q["query_img_path"]) for q in queries]
    d_images = [_image(root, c["img_path"]) for c in pool]
    q = model.encode_queries(
        query_texts(root, task, queries, instruction), None if not any(q_images) else q_images
    )
    d = model.encode_documents(
        [c["txt"] or "" for c in pool], None if not any(d_images) else d_images
    )
    positives: dict[str, set[str]] = {}
    qrels = root / "qrels" / "test" / f"mbeir_{task}_test_qrels.txt"
    for line in qrels.read_text().splitlines():
        qid, _, did, relevance, _ = line.split()
        if int(relevance) > 0:
            positives.setdefault(qid, set()).add(did)
    return [x["qid"] for x in queries], [c["did"] for c in pool], _maxsim64(*q, *d), positives


def reference_recall(dids, scores, qids, positives, k) -> float:
    """UniIR's hit rate: a query scores 1 when any positive qrels did is in its first k."""
    order = np.argsort(-scores, axis=1, kind="stable")  # ties: pool order
    hits = [
        bool(positives.get(qid, set()) & {dids[j] for j in order[i, :k]})
        for i, qid in enumerate(qids)
    ]
    return float(np.mean(hits))


def test_recall_equals_an_independent_maxsim_brute_force(evaluated, model, root):
    results, out = evaluated
    assert sorted(results["table"]["tasks"]) == sorted(APPLIED)
    for task in APPLIED:
        qids, dids, scores, positives = reference(model, root, task)
        recall = results["table"]["tasks"][task]["recall"]
        assert sorted(recall) == sorted(KS)
        for k in KS:
            assert recall[k] == reference_recall(dids, scores, qids, positives, k), (task, k)
        detail = results["details"][task]
        assert detail["pool_size"] == len(dids) and detail["queries"] == len(qids)
        assert detail["per_query"]["qids"] == qids


def test_instruction_prefixes_the_tasks_first_prompt(model, root):
    tasks = ["webqa_task1", "oven_task6"]
    results = evaluate_mire(
        model, root, tasks=tasks, ks=KS, batch_size=BATCH, instruction=True, progress=False
    )
    assert results["instruction_mode"] == "fixed" and results["skipped"] == {}
    for task in tasks:
        qids, dids, scores, positives = reference(model, root, task, instruction=True)
        for k in KS:
            expected = reference_recall(dids, scores, qids, positives, k)
            assert results["table"]["tasks"][task]["recall"][k] == expected, (task, k)


def test_run_files_hold_each_querys_top_k(evaluated, model, root):
    results, out = evaluated
    for task in APPLIED:
        qids, dids, scores, _ = reference(model, root, task)
        k = max(KS)
        lines = [
            line.split() for line in (out / "runs" / f"{task}.local.tsv").read_text().splitlines()
        ]
        assert len(lines) == len(qids) * k
        ranked = -np.sort(-scores, axis=1)
        for i, qid in enumerate(qids):
            rows = lines[i * k : (i + 1) * k]
            assert [r[0] for r in rows] == [qid] * k
            assert [int(r[3]) for r in rows] == list(range(1, k + 1))
            got = np.asarray([float(r[4]) for r in rows])
            np.testing.assert_allclose(got, ranked[i, :k], rtol=1e-5, atol=1e-5)
            for rank, row in enumerate(rows):
                col = dids.index(row[2])
                assert abs(scores[i, col] - ranked[i, rank]) <= TIE, (task, qid, rank)


def test_skipped_tasks_and_results_json(evaluated):
    results, out = evaluated
    assert sorted(results["skipped"]) == sorted(SKIPPED)
    assert "image candidates" in results["skipped"]["mscoco_task0"]
    assert "image-only queries" in results["skipped"]["mscoco_task3"]
    assert all(mire_skip_reason(task) is None for task in APPLIED)
    saved = json.loads((out / "results.json").read_text())
    assert sorted(saved["tasks"]) == sorted(APPLIED)
    assert saved["skipped"] == results["skipped"]
    assert saved["ranking"] == "exact_maxsim" and saved["instruction_mode"] == "none"
    assert saved["average"] == pytest.approx(results["table"]["average"])
    assert "webqa_task1" in results["text"]


def test_bad_input_is_named(model, root, tmp_path):
    with pytest.raises(ValueError, match="nope_task1"):
        evaluate_mire(model, root, tasks=["nope_task1"], progress=False)
    missing = tmp_path / "no_such_root"
    with pytest.raises(FileNotFoundError, match="no_such_root"):
        evaluate_mire(model, missing, progress=False)
    with pytest.raises(ValueError, match="ks"):
        evaluate_mire(model, root, ks=[0], progress=False)
    with pytest.raises(ValueError, match="applies to none"):
        evaluate_mire(model, root, tasks=list(SKIPPED), progress=False)


@pytest.mark.parametrize("layout", ["save_pretrained", "save_checkpoint"])
def test_jfe_eval_on_a_mire_directory_prints_the_same_table(
    evaluated, model, root, tmp_path, capsys, layout
):
    from jfe_jax.cli import main

    results, _ = evaluated
    directory = tmp_path / "mire"
    getattr(model, layout)(str(directory))
    out = tmp_path / "out"
    argv = ["eval", "--model", str(directory), "--mbeir-root", str(root), "--out", str(out)]
    assert main([*argv, "--ks", ",".join(map(str, KS)), "--batch-size", "7"]) == 0
    printed = capsys.readouterr().out
    saved = json.loads((out / "results.json").read_text())
    assert saved["average"] == pytest.approx(results["table"]["average"], abs=1e-9)
    assert sorted(saved["tasks"]) == sorted(APPLIED)
    for task in SKIPPED:
        assert f"skipped {task}: {results['skipped'][task]}" in printed
    assert "webqa_task1" in printed and "results.json" in printed
    for name in APPLIED:
        assert (out / "runs" / f"{name}.local.tsv").is_file()


def test_jfe_eval_refuses_what_mire_has_none_of(model, root, tmp_path, capsys):
    from jfe_jax.cli import main

    directory = tmp_path / "mire"
    model.save_pretrained(str(directory))
    argv = ["eval", "--model", str(directory), "--mbeir-root", str(root), "--out", str(tmp_path)]
    for extra, message in (
        (["--pool", "global"], "--pool global: MIRe"),
        (["--mesh", "data=2"], "--mesh: MIRe"),
    ):
        assert main([*argv, *extra]) == 2  # the parser's usage error, in one line
        assert message in capsys.readouterr().err
