"""The M-BEIR reader on a small tree in the real layout, written here."""

import json
import logging
import os
import subprocess
import sys
from pathlib import Path

import pytest
from PIL import Image

from jfe_jax.data import mbeir
from jfe_jax.data.mbeir import MBEIR, Instructions, instruction_index

TSV_HEADER = (
    "query_modality\tcand_modality\tdataset_name\tdataset_id\tprompt_1\tprompt_2\tprompt_3\t"
    "prompt_4"
)
PROMPTS_T2I = ("Find the image.", "Retrieve a picture.", "Which image fits?", "Match it.")
PROMPTS_IT2T = ("Answer the question.", "Find the answer.", "")  # one empty cell

COCO_QUERIES = [
    {
        "qid": "9:1",
        "query_txt": "a dog",
        "query_img_path": None,
        "query_modality": "text",
        "query_src_content": None,
        "pos_cand_list": ["9:10"],
        "neg_cand_list": ["9:11"],
        "task_id": 0,
    },
    {
        "qid": "9:2",
        "query_txt": "a cat",
        "query_img_path": None,
        "query_modality": "text",
        "query_src_content": '{"id": 2}',
        "pos_cand_list": ["9:11", "9:12"],
        "neg_cand_list": [],
        "task_id": 0,
    },
]
OVEN_QUERIES = [
    {
        "qid": "5:1",
        "query_txt": "what is this?",
        "query_img_path": "mbeir_images/oven/q1.png",
        "query_modality": "image,text",
        "query_src_content": None,
        "pos_cand_list": ["5:20"],
        "neg_cand_list": ["5:21"],
        "task_id": 6,
    },
]
COCO_POOL = [
    {
        "did": "9:10",
        "txt": None,
        "img_path": "mbeir_images/coco/a.png",
        "modality": "image",
        "src_content": None,
    },
    {
        "did": "9:11",
        "txt": "",
        "img_path": "mbeir_images/coco/b.png",
        "modality": "image",
        "src_content": None,
    },
    {
        "did": "9:12",
        "txt": None,
        "img_path": "mbeir_images/coco/c.png",
        "modality": "image",
        "src_content": None,
    },
]
OVEN_POOL = [
    {"did": "5:20", "txt": "a bridge", "img_path": None, "modality": "text", "src_content": None},
    {"did": "5:21", "txt": "a tower", "img_path": None, "modality": "text", "src_content": None},
]


def write_jsonl(path: Path, records) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    lines = [r if isinstance(r, str) else json.dumps(r) for r in records]
    path.write_text("".join(line + "\n" for line in lines), encoding="utf-8")


def write_image(path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", (8, 8), (200, 10, 10)).save(path)


@pytest.fixture
def root(tmp_path: Path) -> Path:
    """A two-task M-BEIR tree: mscoco_task0 (with MSCOCO's split-named pool) and oven_task6."""
    root = tmp_path / "M-BEIR"
    write_jsonl(root / "query/test/mbeir_mscoco_task0_test.jsonl", COCO_QUERIES)
    write_jsonl(root / "query/test/mbeir_oven_task6_test.jsonl", OVEN_QUERIES)
    write_jsonl(root / "query/union_train/mbeir_union_up_train.jsonl", COCO_QUERIES + OVEN_QUERIES)
    write_jsonl(root / "cand_pool/local/mbeir_mscoco_task0_test_cand_pool.jsonl", COCO_POOL)
    write_jsonl(root / "cand_pool/local/mbeir_oven_task6_cand_pool.jsonl", OVEN_POOL)
    write_jsonl(root / "cand_pool/global/mbeir_union_test_cand_pool.jsonl", COCO_POOL + OVEN_POOL)
    qrels = root / "qrels/test/mbeir_mscoco_task0_test_qrels.txt"
    qrels.parent.mkdir(parents=True)
    qrels.write_text("9:1 0 9:10 1 0\n9:2 0 9:11 1 0\n9:2 0 9:12 1 0\n")
    tsv = root / mbeir.INSTRUCTIONS_FILE
    tsv.parent.mkdir(parents=True)
    tsv.write_text(
        "\n".join(
            [
                TSV_HEADER,
                "\t".join(["text", "image", "mscoco", "9", *PROMPTS_T2I]),
                "\t".join(["image,text", "text", "oven", "5", *PROMPTS_IT2T]),
            ]
        )
        + "\n"
    )
    for name in ("coco/a.png", "coco/b.png", "coco/c.png", "oven/q1.png"):
        write_image(root / "mbeir_images" / name)
    return root


# --- reading ----------------------------------------------------------------------------------


def test_lists_tasks_per_split(root):
    reader = MBEIR(root)
    assert reader.tasks("test") == ["mscoco_task0", "oven_task6"]
    assert reader.tasks("val") == []
    assert reader.tasks("union_train") == []  # the union file is not named per task


def test_reads_queries_with_ids_modalities_and_lists(root):
    queries = MBEIR(root).read_queries("test", "mscoco_task0")
    assert [q.qid for q in queries] == ["9:1", "9:2"]
    first = queries[0]
    assert (first.text, first.image_path, first.modality) == ("a dog", None, "text")
    assert (first.task_id, first.dataset_id, first.cand_modality) == (0, 9, "image")
    assert first.pos_cand_list == ("9:10",) and first.neg_cand_list == ("9:11",)
    assert queries[1].src_content == '{"id": 2}'
    assert first.source == "query/test/mbeir_mscoco_task0_test.jsonl:1"
    oven = MBEIR(root).read_queries("test", "oven_task6")[0]
    assert (oven.modality, oven.image_path, oven.dataset_id) == (
        "image,text",
        "mbeir_images/oven/q1.png",
        5,
    )


def test_union_split_streams_every_query(root):
    queries = list(MBEIR(root).iter_queries("union_train"))
    assert [q.qid for q in queries] == ["9:1", "9:2", "5:1"]


def test_local_pool_prefers_the_split_named_file_then_the_task_file(root):
    reader = MBEIR(root)
    assert reader.local_pool_path("mscoco_task0").name == (
        "mbeir_mscoco_task0_test_cand_pool.jsonl"
    )
    assert reader.local_pool_path("oven_task6").name == "mbeir_oven_task6_cand_pool.jsonl"
    with pytest.raises(FileNotFoundError, match="webqa_task1"):
        reader.local_pool_path("webqa_task1")


def test_reads_local_and_global_pools(root):
    reader = MBEIR(root)
    coco = list(reader.iter_local_pool("mscoco_task0"))
    assert [c.did for c in coco] == ["9:10", "9:11", "9:12"]
    assert coco[1].text is None  # "" counts as no text
    assert all(c.modality == "image" and c.dataset_id == 9 for c in coco)
    union = reader.read_pool(reader.global_pool_path("test"))
    assert list(union) == ["9:10", "9:11", "9:12", "5:20", "5:21"]
    assert union["5:20"].text == "a bridge" and union["5:20"].image_path is None


def test_qrels_round_trip(root):
    assert MBEIR(root).read_qrels("test", "mscoco_task0") == {
        "9:1": {"9:10": 1},
        "9:2": {"9:11": 1, "9:12": 1},
    }


def test_check_images_accepts_existing_images(root):
    reader = MBEIR(root, check_images=True)
    assert len(list(reader.iter_local_pool("mscoco_task0"))) == 3
    oven = reader.read_queries("test", "oven_task6")[0]
    assert reader.image_file(oven) == root / "mbeir_images/oven/q1.png"


# --- instructions ----------------------------------------------------------------------------


def test_instructions_keyed_by_dataset_and_modalities_without_empty_prompts(root):
    instructions = MBEIR(root).instructions()
    assert instructions.prompts[(9, "text", "image")] == PROMPTS_T2I
    assert instructions.prompts[(5, "image,text", "text")] == PROMPTS_IT2T[:2]


def test_instructions_parser_follows_the_header_not_column_positions(tmp_path):
    path = tmp_path / "query_instructions.tsv"
    path.write_text(
        "prompt_2\tdataset_id\tprompt_1\tcand_modality\tquery_modality\n"
        "second\t9\tfirst\timage\ttext\n"
    )
    assert Instructions.from_tsv(path).prompts == {(9, "text", "image"): ("first", "second")}


def test_fixed_instruction_is_the_first_prompt(root):
    reader = MBEIR(root)
    for query in reader.read_queries("test", "mscoco_task0"):
        assert reader.instruction_for(query) == PROMPTS_T2I[0]
        assert reader.instruction_for(query, "fixed", seed=7) == PROMPTS_T2I[0]


def test_seeded_instruction_matches_the_documented_hash():
    # Expected values computed once from the rule in instruction_index's docstring:
    # int.from_bytes(sha256(f"{seed}:{qid}").digest()[:8], "big") % n.
    expected = {
        (0, "9:1", 4): 3,
        (0, "2:7", 4): 1,
        (1, "9:2", 4): 1,
        (1, "2:7", 4): 3,
        (2024, "9:2", 4): 0,
        (0, "9:1", 3): 2,
        (2024, "9:1", 3): 1,
    }
    for (seed, qid, n), index in expected.items():
        assert instruction_index(qid, n, "seeded", seed) == index


def test_seeded_instruction_choice_is_recordable_and_stable(root):
    reader = MBEIR(root)
    query = reader.read_queries("test", "mscoco_task0")[0]  # qid 9:1
    assert reader.instructions().choose(query, "seeded", 0) == (3, PROMPTS_T2I[3])
    assert reader.instruction_for(query, "seeded", 0) == PROMPTS_T2I[3]
    assert reader.instruction_for(query, "seeded", 0) == reader.instruction_for(query, "seeded", 0)


def test_seeded_instruction_is_the_same_in_another_process():
    code = (
        "from jfe_jax.data.mbeir import instruction_index as f; "
        "print([f(q, 4, 'seeded', 0) for q in ('9:1', '2:7', '5:13')])"
    )
    env = dict(os.environ, PYTHONHASHSEED="12345")
    out = subprocess.run(
        [sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True
    ).stdout
    assert out.strip() == "[3, 1, 2]"


def test_unknown_instruction_mode_and_missing_key_are_errors(root):
    reader = MBEIR(root)
    query = reader.read_queries("test", "mscoco_task0")[0]
    with pytest.raises(ValueError, match="'random'"):
        reader.instruction_for(query, "random")
    tsv = root / mbeir.INSTRUCTIONS_FILE
    tsv.write_text(TSV_HEADER + "\n" + "\t".join(["image", "text", "mscoco", "9", "x"]) + "\n")
    with pytest.raises(ValueError, match=r"\(9, 'text', 'image'\)"):
        MBEIR(root).instruction_for(query)


def test_instructions_header_without_prompt_columns_is_an_error(tmp_path):
    path = tmp_path / "query_instructions.tsv"
    path.write_text("query_modality\tcand_modality\tdataset_id\ntext\timage\t9\n")
    with pytest.raises(ValueError, match=r"query_instructions.tsv:1: .*prompt_1"):
        Instructions.from_tsv(path)


# --- bad records -----------------------------------------------------------------------------

GOOD = COCO_QUERIES[0]
QUERY_FILE = "query/test/mbeir_mscoco_task0_test.jsonl"


def bad_query(**changes):
    return json.dumps({**GOOD, **changes})


BAD_QUERIES = {
    "malformed json": ('{"qid": "9:3", "query_txt": ', "malformed JSON"),
    "not an object": ('["9:3"]', "expected a JSON object"),
    "unknown task id": (bad_query(task_id=5), "unknown task id 5"),
    "unknown modality": (bad_query(query_modality="audio"), "unknown query_modality 'audio'"),
    "modality of another task": (
        bad_query(query_modality="image", query_img_path="mbeir_images/coco/a.png"),
        "does not match task 0",
    ),
    "neither text nor image": (bad_query(query_txt=None), "neither text nor image"),
    "whitespace text": (bad_query(query_txt="  \t "), "neither text nor image"),
    "dot-dot path": (bad_query(query_img_path="mbeir_images/../../etc/passwd"), "escapes"),
    "absolute path": (bad_query(query_img_path="/etc/passwd"), "is absolute"),
    "bad qid": (bad_query(qid="nine"), "'<dataset_id>:<n>'"),
    "empty positives": (bad_query(pos_cand_list=[]), "empty pos_cand_list"),
}


@pytest.mark.parametrize("case", list(BAD_QUERIES))
def test_bad_query_line_raises_naming_file_and_line(root, case):
    line, message = BAD_QUERIES[case]
    write_jsonl(root / QUERY_FILE, [GOOD, line])
    with pytest.raises(ValueError, match=message) as error:
        MBEIR(root).read_queries("test", "mscoco_task0")
    assert f"{QUERY_FILE}:2" in str(error.value)


def test_symlink_resolving_outside_the_root_is_rejected(root, tmp_path):
    outside = tmp_path / "outside.png"
    write_image(outside)
    (root / "mbeir_images/escape.png").symlink_to(outside)
    (root / "mbeir_images/inside.png").symlink_to(root / "mbeir_images/coco/a.png")
    write_jsonl(
        root / QUERY_FILE,
        [
            bad_query(query_modality="text", query_img_path="mbeir_images/inside.png"),
            bad_query(query_img_path="mbeir_images/escape.png"),
        ],
    )
    with pytest.raises(ValueError, match=f"{QUERY_FILE}:2: .*outside the M-BEIR root"):
        MBEIR(root, check_images=True).read_queries("test", "mscoco_task0")
    # Lazily: reading passes, resolving the image does not.
    queries = MBEIR(root).read_queries("test", "mscoco_task0")
    assert MBEIR(root).image_file(queries[0]).name == "inside.png"
    with pytest.raises(ValueError, match=f"{QUERY_FILE}:2: .*outside the M-BEIR root"):
        MBEIR(root).image_file(queries[1])


def test_missing_image_is_reported_eagerly_or_lazily(root):
    pool = "cand_pool/local/mbeir_oven_task6_cand_pool.jsonl"
    write_jsonl(
        root / pool,
        [
            OVEN_POOL[0],
            {**OVEN_POOL[1], "modality": "image,text", "img_path": "mbeir_images/nope.png"},
        ],
    )
    with pytest.raises(ValueError, match=f"{pool}:2: image 'mbeir_images/nope.png' does not"):
        list(MBEIR(root, check_images=True).iter_local_pool("oven_task6"))
    candidates = list(MBEIR(root).iter_local_pool("oven_task6"))
    with pytest.raises(ValueError, match=f"{pool}:2: .*does not exist"):
        MBEIR(root).image_file(candidates[1])


@pytest.mark.parametrize(
    ("line", "message"),
    [
        ("{oops", "malformed JSON"),
        (json.dumps({**OVEN_POOL[0], "modality": "video"}), "unknown modality 'video'"),
        (json.dumps({**OVEN_POOL[0], "txt": " "}), "neither text nor image"),
        (json.dumps({**OVEN_POOL[0], "img_path": "../x.png"}), "escapes"),
        (json.dumps({**OVEN_POOL[0], "modality": "image,text"}), "no image path"),
    ],
)
def test_bad_candidate_line_raises_naming_file_and_line(root, line, message):
    pool = "cand_pool/local/mbeir_oven_task6_cand_pool.jsonl"
    write_jsonl(root / pool, [OVEN_POOL[1], line])
    with pytest.raises(ValueError, match=f"{pool}:2: .*{message}"):
        list(MBEIR(root).iter_local_pool("oven_task6"))


@pytest.mark.parametrize(
    ("line", "message"),
    [
        ("9:1 0 9:10 1", "4 fields, expected 5"),
        ("9:1 0 9:10 yes 0", "relevance 'yes'"),
        ("9:1 0 9:10 1 5", "unknown task id '5'"),
    ],
)
def test_bad_qrels_line_raises_naming_file_and_line(root, line, message):
    path = "qrels/test/mbeir_mscoco_task0_test_qrels.txt"
    (root / path).write_text(f"9:2 0 9:11 1 0\n{line}\n")
    with pytest.raises(ValueError, match=f"{path}:2: {message}"):
        MBEIR(root).read_qrels("test", "mscoco_task0")


def test_duplicate_did_in_a_pool_is_an_error(root):
    pool = "cand_pool/local/mbeir_oven_task6_cand_pool.jsonl"
    write_jsonl(root / pool, OVEN_POOL + [OVEN_POOL[0]])
    with pytest.raises(ValueError, match=f"{pool}:3: did 5:20 already appeared at {pool}:1"):
        MBEIR(root).read_pool(pool)


def test_skip_bad_records_counts_and_logs_each_one(root, caplog):
    write_jsonl(
        root / QUERY_FILE,
        [
            GOOD,
            BAD_QUERIES["malformed json"][0],
            BAD_QUERIES["unknown task id"][0],
            COCO_QUERIES[1],
            BAD_QUERIES["neither text nor image"][0],
        ],
    )
    reader = MBEIR(root, skip_bad_records=True)
    with caplog.at_level(logging.WARNING, logger="jfe_jax.data.mbeir"):
        queries = reader.read_queries("test", "mscoco_task0")
    assert [q.qid for q in queries] == ["9:1", "9:2"]
    assert reader.bad_records == {QUERY_FILE: 3}
    assert reader.total_bad_records == 3
    messages = [r.getMessage() for r in caplog.records]
    for line in (2, 3, 5):
        assert sum(f"{QUERY_FILE}:{line}:" in m for m in messages) == 1
    assert messages[-1] == f"skipped 3 bad record(s) in {QUERY_FILE}"


def test_skip_bad_records_covers_missing_images_and_clean_files_count_zero(root):
    reader = MBEIR(root, check_images=True, skip_bad_records=True)
    (root / "mbeir_images/coco/b.png").unlink()
    assert [c.did for c in reader.iter_local_pool("mscoco_task0")] == ["9:10", "9:12"]
    assert reader.read_qrels("test", "mscoco_task0")
    assert reader.bad_records == {"cand_pool/local/mbeir_mscoco_task0_test_cand_pool.jsonl": 1}


# --- tables ----------------------------------------------------------------------------------


def test_task_tables_match_the_benchmark():
    assert len(mbeir.TEST_TASKS) == 16
    assert mbeir.DATASET_IDS["visualnews"] == 0 and mbeir.DATASET_IDS["mscoco"] == 9
    assert mbeir.TASK_MODALITIES[2] == ("text", "image,text") and 5 not in mbeir.TASK_MODALITIES
    assert [t for t in mbeir.TEST_TASKS if mbeir.headline_k(t) == 10] == [
        "fashion200k_task0",
        "fashion200k_task3",
        "fashioniq_task7",
    ]
    assert {t: mbeir.task_group(t) for t in (0, 1, 2, 6, 7)} == {
        0: "cross-modal",
        1: "single-modal",
        2: "mixed-modal",
        6: "multi-modal",
        7: "conditional",
    }
    for name in mbeir.TEST_TASKS:
        dataset, task_id = mbeir.parse_task_name(name)
        assert dataset in mbeir.DATASET_IDS and task_id in mbeir.TASK_MODALITIES
    with pytest.raises(ValueError, match="unknown task id 5"):
        mbeir.parse_task_name("oven_task5")
