"""MIRe's R2P stage-1 pairs from the synthetic world (issue 34 item 2): the reference's filters
rule by rule, the pseudo-passage [D1, R, D2, D3], determinism, and the files read back by the
project's own M-BEIR readers."""

import hashlib
import json
from pathlib import Path

import pytest

from jfe_jax.data.mbeir import MBEIR
from jfe_jax.data.synthetic.r2p import (
    DROP_REASONS,
    Turn,
    build_r2p_pairs,
    filter_turn,
    knowledge_passages,
    pseudo_passage,
    question_nouns,
    truncate_passage,
)
from jfe_jax.data.synthetic.r2p_write import (
    R2P_MANIFEST_FILE,
    R2PConfig,
    generate_r2p,
    r2p_builder,
    r2p_pairs,
)
from jfe_jax.data.tfds_builders import MbeirTrainPairs, build_dataset, load_source

SMALL = R2PConfig(seed=1, num_scenes=24, image_size=(56, 56))
TASK = SMALL.task
POOL = "cand_pool/global/mbeir_union_train_cand_pool.jsonl"
SHORT = "Answer the question using a single word or phrase."


def tree_digest(root: Path) -> dict[str, str]:
    return {
        p.relative_to(root).as_posix(): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(root.rglob("*"))
        if p.is_file()
    }


@pytest.fixture(scope="module")
def written(tmp_path_factory) -> tuple[Path, dict]:
    root = tmp_path_factory.mktemp("r2p") / "set"
    return root, generate_r2p(root, SMALL)


def read_back(root: Path) -> list[tuple[str, str, str, dict]]:
    """(question, image path, document, src) per query, through the project's M-BEIR reader."""
    reader = MBEIR(root)
    pool = reader.read_pool(root / POOL)
    out = []
    for query in reader.read_queries("train", TASK):
        (did,) = query.pos_cand_list
        out.append((query.text, query.image_path, pool[did].text, json.loads(query.src_content)))
    return out


# --- determinism ----------------------------------------------------------------------------


def test_same_seed_gives_the_same_bytes_and_another_seed_other_ones(written, tmp_path):
    root, manifest = written
    again = generate_r2p(tmp_path / "again", SMALL)
    assert tree_digest(tmp_path / "again") == tree_digest(root)
    assert again == manifest
    other = R2PConfig(seed=2, num_scenes=SMALL.num_scenes, image_size=SMALL.image_size)
    generate_r2p(tmp_path / "other", other)
    other_digest = tree_digest(tmp_path / "other")
    query_file = f"query/train/mbeir_{TASK}_train.jsonl"
    assert other_digest[query_file] != tree_digest(root)[query_file]
    assert other_digest[POOL] != tree_digest(root)[POOL]


def test_distractors_depend_on_the_seed_only():
    response = "A red circle on the left, alone."
    turns = [Turn(f"t{i}", "x.png", "Describe the image.", response) for i in range(6)]
    first = build_r2p_pairs(turns, seed=5).pairs
    assert build_r2p_pairs(turns, seed=5).pairs == first
    assert [p.distractors for p in build_r2p_pairs(turns, seed=6).pairs] != [
        p.distractors for p in first
    ]


# --- the pseudo-passage ---------------------------------------------------------------------


def test_the_answer_follows_the_first_passage_and_each_passage_has_two_sentences(written):
    root, manifest = written
    passages = knowledge_passages()
    pairs = read_back(root)
    assert len(pairs) == manifest["counts"]["kept"] > 10
    for question, _, document, src in pairs:
        kept = [truncate_passage(passages[e]) for e in src["distractors"]]
        assert len(kept) == SMALL.n_distractors
        for entity, passage in zip(src["distractors"], kept, strict=True):
            assert passage.count(".") == 1  # two "."-separated sentences, the last "." gone
            assert passages[entity].startswith(passage) and passages[entity].count(".") > 2
        assert document.startswith(kept[0] + " " + src["answer"] + " ")
        assert document == " ".join([kept[0], src["answer"], *kept[1:]])
        assert "<image>" not in question


def test_pseudo_passage_is_the_references_join():
    assert truncate_passage("One. Two. Three. Four.") == "One. Two"
    assert truncate_passage("Only one.") == "Only one."
    assert pseudo_passage("R.", ["A. B", "C.", "D. E"]) == "A. B R. C. D. E"
    assert pseudo_passage("R", ["A..", "C"]) == "A. R C"  # ".." -> "."
    with pytest.raises(ValueError, match="at least one passage"):
        pseudo_passage("R", [])


def test_distractors_are_never_the_images_own_entities():
    passages = {"red circle": "A. B. C.", "blue star": "D. E. F.", "green cross": "G. H. I."}
    turn = Turn(
        "t", "x.png", "What is here?", "There is a red circle on the left.", ("red circle",)
    )
    for seed in range(5):
        (pair,) = build_r2p_pairs([turn], seed=seed, n_distractors=2, passages=passages).pairs
        assert sorted(pair.distractors) == ["blue star", "green cross"]


# --- the filters ----------------------------------------------------------------------------

LONG = "There is a large red circle on the left of the scene."


@pytest.mark.parametrize(
    "question, response, reason",
    [
        ("What is written on it?", "Unanswerable.", "unanswerable"),
        ("What is written on it?", "It is unanswerable. " + LONG, "unanswerable"),
        ("What does it say?", "Answering does not require reading text.", "unanswerable"),
        (f"How many shapes are there?\n{SHORT}", "3", "numeric"),
        ("Count them.", "12.", "numeric"),
        ("How many objects can you see?", LONG, "bad_question"),
        ("What color is the circle?", LONG, "bad_question"),
        ("What is the color of the object on the left?", LONG, "bad_question"),
        ("What are the colors of the shapes?", LONG, "bad_question"),
        ("Give a short description for this region: [0.1, 0.2, 0.3, 0.4].", LONG, "bad_question"),
        ("Is there a star in the picture?", "No, there is no star in the picture.", "short"),
        (f"What shape is on the left?\n{SHORT}", "Circle", "short"),
        ("Is it red?", "Yes.", "empty"),
    ],
)  # fmt: skip
def test_each_filter_drops_what_it_should(question, response, reason):
    result = filter_turn(question, response)
    assert (result.reason, result.response) == (reason, None)


def test_kept_responses_are_stripped_of_boilerplate_and_upper_cased():
    cases = {
        "Yes, the image shows a large red circle on the left.": "A large red circle on the left.",
        "Sure! In the picture, there is a small blue square at the top.": (
            "There is a small blue square at the top."
        ),
        "Certainly. In this image a large red circle sits on the left.": (
            "A large red circle sits on the left."
        ),
        "the image depicts a small green star in the center.": "A small green star in the center.",
    }
    for response, expected in cases.items():
        result = filter_turn("<image>\nDescribe the image.", response)
        assert (result.reason, result.response, result.stripped) == (None, expected, True)
        assert result.question == "Describe the image."


def test_short_responses_get_the_questions_nouns_and_the_length_rule_counts_them():
    question = f"<image>\nWhich object is on the left?\n{SHORT}"
    assert question_nouns(question.replace("<image>", "").strip()) == ["object", "left"]
    result = filter_turn(question, "a large red circle")
    assert result.response == "A large red circle (object, left)" and result.nouns_appended
    assert filter_turn(question, "a large red circle", drop_len=40).reason == "short"
    # Five words: no nouns appended, kept on its own length.
    five = filter_turn(question, "a very large red circle", drop_len=20)
    assert (five.response, five.nouns_appended) == ("A very large red circle", False)
    assert question_nouns("What is next to Paris and the star?") == ["Paris", "star"]


def test_numbers_inside_a_long_answer_and_lower_case_prompts_pass():
    assert filter_turn("Describe it.", "3 large red circles stand in a row.").reason is None
    # The reference matches "What color" as written, so the lower-case form passes.
    assert filter_turn("what color is it?", LONG).reason is None
    assert filter_turn("Describe it.", "A red circle.", drop_len=0).reason is None


def test_a_comma_question_loses_its_first_clause_from_the_response():
    result = filter_turn("On the left, what is there?", "On the left there is a large red circle.")
    assert result.response == " there is a large red circle."  # as the reference does


def test_build_counts_what_each_filter_dropped(written):
    turns = [
        Turn("a", "x.png", "What does it say?", "Unanswerable."),
        Turn("b", "x.png", f"How many?\n{SHORT}", "2"),
        Turn("c", "x.png", "Is it?", "Yes!"),
        Turn("d", "x.png", "What color is it?", LONG),
        Turn("e", "x.png", "Is it?", "A red circle."),
        Turn("f", "x.png", "<image>\nDescribe the image.", "Yes, " + LONG),
    ]
    result = build_r2p_pairs(turns, seed=0)
    assert result.dropped == dict.fromkeys(DROP_REASONS, 1)
    assert [p.id for p in result.pairs] == ["f"] and result.pairs[0].answer == LONG
    assert result.counts()["boilerplate_stripped"] == 2  # "yes!" and "yes,"
    counts = written[1]["counts"]
    assert counts["kept"] + sum(counts["dropped"].values()) == counts["turns"]
    assert all(counts["dropped"][r] > 0 for r in DROP_REASONS if r != "empty")


# --- the project's readers ------------------------------------------------------------------


def test_the_written_set_reads_back_as_the_built_pairs(written, tmp_path):
    root, manifest = written
    built = r2p_pairs(r2p_builder(tmp_path / "images", SMALL), SMALL)
    assert manifest["counts"] == built.counts()
    expected = [(p.question, p.image_path, p.document, p.answer) for p in built.pairs]
    assert [(q, i, d, s["answer"]) for q, i, d, s in read_back(root)] == expected

    # As the trainer builds it (data.kind="mbeir", data.split="train").
    builder = build_dataset(
        MbeirTrainPairs, tmp_path / "tfds", mbeir_root=str(root), query_split="train"
    )
    source = load_source(builder)
    examples = [source[n] for n in range(len(source))]  # in the prepared order
    assert {e["query_modality"].decode() for e in examples} == {"image,text"}
    assert sorted(
        (e["query_text"].decode(), e["positive_text"].decode(), bytes(e["query_image"]))
        for e in examples
    ) == sorted((q, d, (root / i).read_bytes()) for q, i, d, _ in expected)


# --- errors ---------------------------------------------------------------------------------


def test_an_existing_output_is_replaced_only_when_it_is_an_r2p_set(written, tmp_path):
    root, _ = written
    other = tmp_path / "other"
    other.mkdir()
    (other / "notes.txt").write_text("mine")
    with pytest.raises(FileExistsError, match=f"{other} holds no {R2P_MANIFEST_FILE}"):
        generate_r2p(other, SMALL, overwrite=True)
    assert (other / "notes.txt").read_text() == "mine"
    with pytest.raises(FileExistsError, match="overwrite=True"):
        generate_r2p(root, SMALL)
    small = R2PConfig(seed=1, num_scenes=2, image_size=(56, 56))
    copy = tmp_path / "copy"
    generate_r2p(copy, small)
    assert generate_r2p(copy, small, overwrite=True)["config"]["num_scenes"] == 2


def test_bad_input_is_named():
    with pytest.raises(ValueError, match=r"turn 1 \('b'\) has no \['response'\]"):
        build_r2p_pairs(
            [Turn("a", "x.png", "q", "r"), {"id": "b", "image_path": "x.png", "question": "q"}],
            seed=0,
        )
    with pytest.raises(ValueError, match=r"turn 1: id 'a' already used by turn 0"):
        build_r2p_pairs([Turn("a", "x.png", "q", "r"), Turn("a", "y.png", "q", "r")], seed=0)
    with pytest.raises(ValueError, match=r"turn 0 \('a'\): image_path '' must be"):
        build_r2p_pairs([Turn("a", "", "q", "r")], seed=0)
    with pytest.raises(ValueError, match="turn 0 is a str"):
        build_r2p_pairs(["not a turn"], seed=0)
    with pytest.raises(ValueError, match="n_distractors=0"):
        build_r2p_pairs([], seed=0, n_distractors=0)
    with pytest.raises(ValueError, match="n_distractors=4 but only 3 passages"):
        build_r2p_pairs([], seed=0, n_distractors=4, passages={"a": "", "b": "", "c": ""})
    with pytest.raises(ValueError, match="R2PConfig.task 'mscoco_task0'"):
        R2PConfig(task="mscoco_task0")
    with pytest.raises(ValueError, match="num_scenes=0"):
        R2PConfig(num_scenes=0)
