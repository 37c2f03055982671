"""The synthetic benchmark: deterministic, in M-BEIR's layout, and each task well posed."""

import hashlib
import json
import os
import random
import subprocess
import sys
from pathlib import Path

import pytest
from PIL import Image

from jfe_jax.data import mbeir
from jfe_jax.data.mbeir import MBEIR
from jfe_jax.data.synthetic import (
    IMAGE_CAPTIONS_FILE,
    MANIFEST_FILE,
    STUDY_TASKS,
    SYNTHETIC_TASKS,
    TEXT_TRIPLES_FILE,
    SyntheticConfig,
    composed,
    corpus_texts,
    generate,
    world,
)

SMALL = SyntheticConfig(
    seed=3,
    train_queries_per_task=5,
    val_queries_per_task=2,
    test_queries_per_task=4,
    train_query_multipliers=(("oven_task8", 2),),
    num_text_triples=6,
    num_image_captions=4,
)
SPLITS = ("train", "val", "test")


def tree_digest(root: Path) -> dict[str, str]:
    return {
        p.relative_to(root).as_posix(): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(root.rglob("*"))
        if p.is_file()
    }


@pytest.fixture(scope="module")
def bench(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("synthetic") / "mbeir"
    generate(root, SMALL, progress=False)
    return root


def src(record: mbeir.Query | mbeir.Candidate) -> dict:
    return json.loads(record.src_content)


# --- determinism ----------------------------------------------------------------------------


def test_same_seed_gives_byte_identical_trees(bench, tmp_path):
    again = tmp_path / "again"
    generate(again, SMALL, progress=False)
    first, second = tree_digest(bench), tree_digest(again)
    assert list(first) == list(second)
    assert first == second


def test_same_seed_gives_identical_trees_in_another_process(bench, tmp_path):
    # Another PYTHONHASHSEED catches any dependence on set or str-hash order.
    code = (
        "import sys; from jfe_jax.data.synthetic import SyntheticConfig, generate; "
        f"generate(sys.argv[1], SyntheticConfig(**{SMALL.__dict__!r}), progress=False)"
    )
    env = dict(os.environ, PYTHONHASHSEED="987")
    subprocess.run([sys.executable, "-c", code, str(tmp_path / "child")], env=env, check=True)
    assert tree_digest(tmp_path / "child") == tree_digest(bench)


def test_different_seed_gives_different_files(bench, tmp_path):
    other = tmp_path / "other"
    generate(other, SyntheticConfig(**{**SMALL.__dict__, "seed": 4}), progress=False)
    first, second = tree_digest(bench), tree_digest(other)
    changed = [f for f in first if first[f] != second.get(f)]
    assert "query/test/mbeir_mscoco_task0_test.jsonl" in changed
    assert any(f.endswith(".png") for f in changed)


# --- layout and counts ----------------------------------------------------------------------


def test_manifest_records_config_seed_version_and_counts(bench):
    manifest = json.loads((bench / MANIFEST_FILE).read_text())
    assert manifest["seed"] == 3 and manifest["version"] == 1
    assert manifest["config"]["train_queries_per_task"] == 5
    for task in SYNTHETIC_TASKS:
        assert {s: manifest["tasks"][task][s]["queries"] for s in SPLITS} == {
            "train": 10 if task == "oven_task8" else 5,
            "val": 2,
            "test": 4,
        }
    images = list((bench / "mbeir_images").rglob("*.png"))
    assert manifest["images"] == len(images)
    assert manifest["pairs"] == {"text_triples": 6, "image_captions": 4}


def test_every_task_type_is_present_under_real_task_names():
    task_ids = {mbeir.parse_task_name(t)[1] for t in SYNTHETIC_TASKS}
    assert task_ids == {0, 1, 2, 3, 4, 6, 7, 8}
    assert set(SYNTHETIC_TASKS) <= set(mbeir.TEST_TASKS)


def test_output_passes_the_reader_with_zero_bad_records(bench):
    reader = MBEIR(bench, check_images=True, skip_bad_records=True)
    for split in SPLITS:
        assert reader.tasks(split) == sorted(SYNTHETIC_TASKS)
        for task in SYNTHETIC_TASKS:
            expected = (
                10 if (split, task) == ("train", "oven_task8") else SMALL.queries_per_task(split)
            )
            assert len(reader.read_queries(split, task)) == expected
            reader.read_qrels(split, task)
            if split != "train":
                reader.read_pool(reader.local_pool_path(task, split))
        reader.read_pool(reader.global_pool_path(split))
    assert len(reader.read_queries("union_train")) == 5 * len(SYNTHETIC_TASKS) + 5
    assert len(reader.read_queries("union_val")) == 2 * len(SYNTHETIC_TASKS)
    assert reader.total_bad_records == 0


def test_mscoco_keeps_split_named_pools_like_mbeir(bench):
    reader = MBEIR(bench)
    assert reader.local_pool_path("mscoco_task0", "test").name == (
        "mbeir_mscoco_task0_test_cand_pool.jsonl"
    )
    assert reader.local_pool_path("cirr_task7", "test").name == "mbeir_cirr_task7_cand_pool.jsonl"
    assert reader.local_pool_path("cirr_task7", "val").name == (
        "mbeir_cirr_task7_val_cand_pool.jsonl"
    )


def test_qrels_match_positives_and_pools_hold_every_listed_candidate(bench):
    reader = MBEIR(bench)
    for split in SPLITS:
        union = reader.read_pool(reader.global_pool_path(split))
        for task in SYNTHETIC_TASKS:
            queries = reader.read_queries(split, task)
            assert reader.read_qrels(split, task) == {
                q.qid: dict.fromkeys(q.pos_cand_list, 1) for q in queries
            }
            local = (
                reader.read_pool(reader.local_pool_path(task, split)) if split != "train" else union
            )
            cand_modality = mbeir.TASK_MODALITIES[mbeir.parse_task_name(task)[1]][1]
            for query in queries:
                assert not set(query.pos_cand_list) & set(query.neg_cand_list)
                for did in query.pos_cand_list + query.neg_cand_list:
                    assert did in local and did in union
                    assert local[did].modality == cand_modality


def test_hard_negatives_are_present(bench):
    reader = MBEIR(bench)
    for task in SYNTHETIC_TASKS:
        queries = reader.read_queries("train", task)
        assert sum(len(q.neg_cand_list) for q in queries) >= len(queries), task


def test_every_query_has_an_instruction(bench):
    reader = MBEIR(bench)
    for task in SYNTHETIC_TASKS:
        for query in reader.read_queries("test", task):
            assert reader.instruction_for(query, "fixed")
            assert reader.instruction_for(query, "seeded", seed=1)


def test_scenes_never_cross_splits(bench):
    reader = MBEIR(bench)
    scenes = {split: set() for split in SPLITS}
    for split in SPLITS:
        for task in SYNTHETIC_TASKS:
            for query in reader.read_queries(split, task):
                content = src(query)
                scenes[split].update(v for k, v in content.items() if k in ("scene", "target"))
    assert not scenes["train"] & scenes["test"]
    assert not scenes["train"] & scenes["val"]
    assert not scenes["val"] & scenes["test"]


def test_images_come_in_several_sizes(bench):
    sizes = {Image.open(p).size for p in (bench / "mbeir_images").rglob("*.png")}
    assert len(sizes) >= 3
    assert all(min(s) >= 28 for s in sizes)


# --- tasks are well posed -------------------------------------------------------------------


@pytest.mark.parametrize("task", ["fashioniq_task7", "cirr_task7"])
def test_composed_targets_differ_from_references(bench, task):
    reader = MBEIR(bench)
    pool = reader.read_pool(reader.global_pool_path("train"))
    for query in reader.read_queries("train", task):
        content = src(query)
        target = pool[query.pos_cand_list[0]]
        assert content["reference"] != content["target"] == src(target)["scene"]
        reference_bytes = (bench / query.image_path).read_bytes()
        assert (bench / target.image_path).read_bytes() != reference_bytes
        # The unedited reference is among the hard negatives: the image alone is not enough.
        negatives = [pool[d] for d in query.neg_cand_list]
        assert content["reference"] in [src(c)["scene"] for c in negatives]


def test_question_answers_describe_the_object_asked_about(bench):
    reader = MBEIR(bench)
    pool = reader.read_pool(reader.global_pool_path("train"))
    for query in reader.read_queries("train", "oven_task6"):
        content = src(query)
        assert world.POSITION_PHRASES[content["position"]] in query.text
        objects = [o.split("@") for o in content["scene"].split("+")]
        asked = next(o for o, where in objects if where == content["position"])
        size, colour, shape = asked.split("-")
        assert pool[query.pos_cand_list[0]].text == f"a {size} {colour} {shape}"
        assert len(objects) >= 2  # the image alone does not say which object is meant


def test_world_caption_and_edits():
    scene = world.Scene(
        (
            world.SceneObject("square", "blue", "small", "top"),
            world.SceneObject("circle", "red", "large", "left"),
        )
    )
    assert (
        world.caption(scene) == "a large red circle on the left and a small blue square at the top"
    )
    assert scene.key == "large-red-circle@left+small-blue-square@top"
    rng = random.Random(0)
    for _ in range(20):
        scene = world.random_scene(rng)
        edits = composed.multi_object_modifications(scene)
        assert edits and all(m.target.key != scene.key for m in edits)
        assert all(
            v.key != scene.key
            for v in (scene.with_object(i, new) for i, new in world.one_attribute_variants(scene))
        )


# --- pairs and corpus -----------------------------------------------------------------------


def test_pair_files_parse_with_their_schema(bench):
    triples = [json.loads(line) for line in (bench / TEXT_TRIPLES_FILE).read_text().splitlines()]
    assert len(triples) == 6
    for triple in triples:
        assert set(triple) == {"id", "sentence", "positive", "hard_negative"}
        assert triple["sentence"] != triple["positive"]
        assert triple["sentence"] != triple["hard_negative"]
    captions = [json.loads(line) for line in (bench / IMAGE_CAPTIONS_FILE).read_text().splitlines()]
    assert len(captions) == 4
    for pair in captions:
        assert set(pair) == {"id", "image_path", "caption"}
        assert (bench / pair["image_path"]).is_file() and pair["caption"]


def test_corpus_texts_yields_each_text_once(bench):
    texts = list(corpus_texts(bench))
    assert len(texts) == len(set(texts))
    query = MBEIR(bench).read_queries("test", "webqa_task1")[0]
    triple = json.loads((bench / TEXT_TRIPLES_FILE).read_text().splitlines()[0])
    instruction = MBEIR(bench).instruction_for(query)
    for text in (query.text, triple["hard_negative"], instruction):
        assert text in texts


# --- writing --------------------------------------------------------------------------------


def test_generate_replaces_only_its_own_output(bench, tmp_path):
    foreign = tmp_path / "foreign"
    foreign.mkdir()
    (foreign / "notes.txt").write_text("keep me")
    with pytest.raises(FileExistsError, match="not a synthetic benchmark"):
        generate(foreign, SMALL, overwrite=True, progress=False)
    assert (foreign / "notes.txt").read_text() == "keep me"
    ours = tmp_path / "ours"
    generate(ours, SMALL, progress=False)
    with pytest.raises(FileExistsError, match="overwrite=True"):
        generate(ours, SMALL, progress=False)
    (ours / "stale.txt").write_text("old")
    generate(ours, SMALL, overwrite=True, progress=False)
    assert not (ours / "stale.txt").exists()
    assert tree_digest(ours) == tree_digest(bench)


def test_config_rejects_unknown_tasks_and_bad_fractions():
    with pytest.raises(ValueError, match="unknown tasks \\['edis_task2'\\]"):
        SyntheticConfig(tasks=("edis_task2",))
    with pytest.raises(ValueError, match="train_query_multipliers names unknown tasks"):
        SyntheticConfig(train_query_multipliers=(("oven_task9", 3),))
    with pytest.raises(ValueError, match="split_fractions"):
        SyntheticConfig(split_fractions=(0.5, 0.5, 0.5))


def test_generator_writes_a_tokenizer_matching_the_tiny_model(tmp_path):
    from jfe_jax.data.tokenizer import load_tokenizer
    from jfe_jax.models.sizes import get_size

    root = tmp_path / "bench"
    generate(
        str(root),
        SyntheticConfig(
            train_queries_per_task=4,
            val_queries_per_task=2,
            test_queries_per_task=2,
            num_text_triples=8,
            num_image_captions=8,
        ),
        progress=False,
    )
    tokenizer = load_tokenizer(str(root / "tokenizer"))
    config = get_size("tiny")
    assert len(tokenizer) == config.text.vocab_size
    assert tokenizer.convert_tokens_to_ids("<|image_pad|>") == config.image_token_id
    assert tokenizer.convert_tokens_to_ids("<|vision_start|>") == config.vision_start_token_id


def test_study_tasks_pass_the_reader_with_zero_bad_records(tmp_path):
    config = SyntheticConfig(**{**SMALL.__dict__, "tasks": STUDY_TASKS, "tokenizer_vocab_size": 0})
    generate(tmp_path / "study", config, progress=False)
    reader = MBEIR(tmp_path / "study", check_images=True, skip_bad_records=True)
    for split in SPLITS:
        assert reader.tasks(split) == sorted(STUDY_TASKS)
        for task in STUDY_TASKS:
            assert reader.read_queries(split, task)
            reader.read_qrels(split, task)
            if split != "train":
                reader.read_pool(reader.local_pool_path(task, split))
    assert reader.total_bad_records == 0
