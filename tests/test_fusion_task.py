"""infoseek_task6 needs fusion by construction: no additive (late-fusion) scorer ranks it
right, a scorer that reads image and text together does, and the default data is unchanged.

The image's ground truth is its scene (query_src_content "scene"), read back as cells ->
objects; the text is the query text; the answer is the positive candidate's text. An additive
scorer is s(image, text, c) = f(image, c) + g(text, c) for any functions f and g: what a sum
of separate image and text embeddings scores against a candidate embedding.
"""

import dataclasses
import hashlib
import itertools
import json
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from jfe_jax.data.mbeir import MBEIR
from jfe_jax.data.synthetic import (
    FUSION_TASKS,
    STUDY_TASKS,
    SYNTHETIC_TASKS,
    SyntheticConfig,
    chance_at_headline_k,
    generate,
    spatial,
)

TASK = "infoseek_task6"
TEST_QUERIES = SyntheticConfig.study().test_queries_per_task
ONLY_SPATIAL = SyntheticConfig(
    seed=5,
    tasks=(TASK,),
    train_queries_per_task=8,
    train_query_multipliers=(),
    val_queries_per_task=4,
    test_queries_per_task=TEST_QUERIES,
    num_text_triples=2,
    num_image_captions=2,
    tokenizer_vocab_size=0,
)
# Digest of SyntheticConfig()'s records (every file but the tokenizer; images by name only,
# since PNG bytes follow the zlib build). Taken before infoseek_task6 existed: the demo's data.
# Session 14 retook it when the manifest's config gained "num_grid_captions": 0, the only
# difference (every other file byte-identical to the data before, compared with diff -r).
DEFAULT_RECORDS_DIGEST = "598329a99185328e80723745e11a3204250580f656bd782d199c16048425efc9"


def tree_digest(root: Path) -> dict[str, str]:
    return {
        p.relative_to(root).as_posix(): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(root.rglob("*"))
        if p.is_file()
    }


def records_digest(root: Path) -> str:
    digest = hashlib.sha256()
    for path in sorted(root.rglob("*")):
        relative = path.relative_to(root)
        if not path.is_file() or relative.parts[0] == "tokenizer":
            continue
        digest.update(relative.as_posix().encode() + b"\0")
        if path.suffix != ".png":
            digest.update(hashlib.sha256(path.read_bytes()).digest())
    return digest.hexdigest()


@pytest.fixture(scope="module")
def bench(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("spatial") / "mbeir"
    generate(root, ONLY_SPATIAL, progress=False)
    return root


@dataclasses.dataclass(frozen=True)
class Query:
    scene: str  # the image's ground truth: the scene key
    text: str
    answer: str  # the positive candidate's text


def read_queries(root: Path, split: str = "test") -> tuple[list[Query], list[str]]:
    """The split's queries as (scene, text, answer) and its pool's candidate texts."""
    reader = MBEIR(root)
    pool = reader.read_pool(reader.local_pool_path(TASK, split))
    queries = []
    for query in reader.read_queries(split, TASK):
        (positive,) = query.pos_cand_list
        scene = json.loads(query.src_content)["scene"]
        queries.append(Query(scene, query.text, pool[positive].text))
    return queries, sorted(c.text for c in pool.values())


def xor_quads(queries: list[Query]) -> list[tuple[Query, Query, Query, Query]]:
    """Every (I1,T1), (I2,T2), (I1,T2), (I2,T1) in the data with a(I1,T1) = a(I2,T2) = c and
    a(I1,T2) = a(I2,T1) = c' != c."""
    by_text: dict[str, dict[str, Query]] = {}
    for q in queries:
        by_text.setdefault(q.text, {})[q.scene] = q
    quads = []
    for t1, t2 in itertools.combinations(sorted(by_text), 2):
        common = sorted(set(by_text[t1]) & set(by_text[t2]))
        for i1, i2 in itertools.combinations(common, 2):
            a, b = by_text[t1][i1], by_text[t2][i2]
            a_swapped, b_swapped = by_text[t2][i1], by_text[t1][i2]
            if a.answer == b.answer != a_swapped.answer == b_swapped.answer:
                quads.append((a, b, a_swapped, b_swapped))
    return quads


def ranked_first(scores: np.ndarray, answer: int) -> bool:
    """Whether `answer` scores strictly above every other candidate."""
    return bool(np.sum(scores >= scores[answer]) == 1)


def parse_scene(key: str) -> dict[str, tuple[str, str, str]]:
    """ "grid:large-red-circle@top-left+..." -> {cell: (size, colour, shape)}."""
    assert key.startswith("grid:")
    cells = {}
    for part in key.removeprefix("grid:").split("+"):
        obj, cell = part.split("@")
        cells[cell] = tuple(obj.split("-"))
    return cells


def joint_oracle_answer(scene_key: str, text: str) -> str:
    """Reads the question and the scene together: the cell the text names, then its object."""
    cells = parse_scene(scene_key)
    (cell,) = [cell for cell, phrase in spatial.CELL_PHRASES.items() if phrase in text]
    size, colour, shape = cells[cell]
    return f"a {size} {colour} {shape}"


# --- late fusion cannot, early fusion can -----------------------------------------------------


def test_every_test_query_sits_in_an_xor_configuration(bench):
    queries, _ = read_queries(bench)
    quads = xor_quads(queries)
    covered = {q for quad in quads for q in quad}
    share = len(covered) / len(queries)
    print(
        f"\n{TASK}: {len(quads)} XOR configurations, {share:.1%} of {len(queries)} queries in one"
    )
    assert len(queries) == TEST_QUERIES
    assert share == 1.0
    # Disjoint ones bound every additive scorer: at most 3 of each 4 ranked right at 1.
    disjoint, used = 0, set()
    for quad in quads:
        if not used & set(quad):
            used |= set(quad)
            disjoint += 1
    assert 1 - disjoint / len(queries) <= 0.75


def test_an_xor_configuration_is_a_certificate_against_every_additive_scorer(bench):
    # "c ranks above c' for (I, T)" is f(I,c) - f(I,c') + g(T,c) - g(T,c') > 0, linear in the
    # unknowns f(., .) and g(., .). The four inequalities of a quad add up to exactly 0 > 0,
    # so no f and g satisfy them all (Farkas); checked term by term on the data.
    queries, _ = read_queries(bench)
    quads = xor_quads(queries)
    assert quads
    for a, b, a_swapped, b_swapped in quads:
        rival = a_swapped.answer
        total = Counter()
        for q, other in ((a, rival), (b, rival), (a_swapped, a.answer), (b_swapped, a.answer)):
            total.update({("f", q.scene, q.answer): 1, ("g", q.text, q.answer): 1})
            total.update({("f", q.scene, other): -1, ("g", q.text, other): -1})
        assert not +total and not -total


def test_additive_scorers_miss_a_query_of_every_xor_configuration(bench):
    queries, pool = read_queries(bench)
    quads = xor_quads(queries)
    scenes = {s: i for i, s in enumerate(dict.fromkeys(q.scene for q in queries))}
    texts = {t: i for i, t in enumerate(dict.fromkeys(q.text for q in queries))}
    cands = {c: i for i, c in enumerate(pool)}
    rng = np.random.default_rng(0)
    # Random additive scorers, then the best one a perceptron finds on the test queries
    # themselves (free to memorise every image and every text).
    shapes = ((len(scenes), len(pool)), (len(texts), len(pool)))
    scorers = [tuple(rng.normal(size=shape) for shape in shapes) for _ in range(50)]
    f, g = np.zeros(shapes[0]), np.zeros(shapes[1])
    for _ in range(100):
        for q in queries:
            i, t, c = scenes[q.scene], texts[q.text], cands[q.answer]
            best = int(np.argmax(f[i] + g[t]))
            if best != c:
                f[i, [c, best]] += (1, -1)
                g[t, [c, best]] += (1, -1)
    scorers.append((f, g))
    for f, g in scorers:
        first = {
            q: ranked_first(f[scenes[q.scene]] + g[texts[q.text]], cands[q.answer]) for q in queries
        }
        assert all(sum(first[q] for q in quad) <= 3 for quad in quads)
        assert np.mean(list(first.values())) <= 0.75


def test_a_joint_oracle_ranks_every_query_first(bench):
    for split in ("train", "val", "test"):
        queries, pool = read_queries(bench, split)
        assert len(set(pool)) == len(pool) == 160  # every answer once: 8 shapes x 10 x 2
        for q in queries:
            assert joint_oracle_answer(q.scene, q.text) == q.answer


def test_neither_modality_alone_determines_the_answer(bench):
    queries, _ = read_queries(bench)
    answers_of_image, answers_of_text = {}, {}
    for q in queries:
        answers_of_image.setdefault(q.scene, set()).add(q.answer)
        answers_of_text.setdefault(q.text, set()).add(q.answer)
    assert all(len(answers_of_image[q.scene]) >= 2 for q in queries)
    assert all(len(answers_of_text[q.text]) >= 2 for q in queries)


def test_questions_name_every_cell_and_hard_negatives_come_from_the_same_image(bench):
    reader = MBEIR(bench)
    pool = reader.read_pool(reader.local_pool_path(TASK, "test"))
    asked = Counter()
    for query in reader.read_queries("test", TASK):
        src = json.loads(query.src_content)
        asked[src["cell"]] += 1
        assert spatial.CELL_PHRASES[src["cell"]] in query.text
        in_image = {f"a {s} {c} {shp}" for s, c, shp in parse_scene(src["scene"]).values()}
        negatives = [pool[d].text for d in query.neg_cand_list]
        assert len(negatives) == ONLY_SPATIAL.hard_negatives
        assert set(negatives) <= in_image - {pool[query.pos_cand_list[0]].text}
    assert sorted(asked) == sorted(spatial.GRID_CELLS)  # every cell is asked about
    assert sum(asked.values()) == TEST_QUERIES


def test_every_cell_is_painted_its_own_tint_in_every_image(bench):
    """The cell tints (spatial.CELL_TINTS) are the same in every image, whatever the scene:
    a cell's corner pixel is its tint within the jitter (6 per channel)."""
    reader = MBEIR(bench)
    width, height = spatial.GRID_CANVAS
    images = {reader.image_file(q) for q in reader.read_queries("test", TASK)}
    assert len(images) == TEST_QUERIES // 2  # two questions per image
    tints = np.array([spatial.CELL_TINTS[c] for c in spatial.GRID_CELLS])
    for path in sorted(images)[:20]:
        with Image.open(path) as image:
            pixels = np.asarray(image.convert("RGB")).astype(int)
        for (row, col), tint in zip(spatial.GRID_CELLS.values(), tints):
            corner = pixels[row * height // 3 + 1, col * width // 3 + 1]
            assert np.abs(corner - tint).max() <= 6, (path, row, col, corner, tint)


def test_output_passes_the_reader_and_scenes_never_cross_splits(bench):
    reader = MBEIR(bench, check_images=True, skip_bad_records=True)
    scenes = {}
    for split in ("train", "val", "test"):
        for query in reader.read_queries(split, TASK):
            assert reader.instruction_for(query)
            scenes.setdefault(split, set()).add(json.loads(query.src_content)["scene"])
        reader.read_qrels(split, TASK)
    assert reader.total_bad_records == 0
    assert not scenes["train"] & scenes["test"] and not scenes["val"] & scenes["test"]
    assert not scenes["train"] & scenes["val"]


# --- determinism and the default data ---------------------------------------------------------


def test_same_seed_gives_identical_bytes_and_another_seed_other_data(bench, tmp_path):
    generate(tmp_path / "again", ONLY_SPATIAL, progress=False)
    assert tree_digest(tmp_path / "again") == tree_digest(bench)
    generate(tmp_path / "other", dataclasses.replace(ONLY_SPATIAL, seed=6), progress=False)
    first, second = tree_digest(bench), tree_digest(tmp_path / "other")
    changed = [f for f in first if first[f] != second.get(f)]
    assert f"query/test/mbeir_{TASK}_test.jsonl" in changed
    assert any(f.startswith("mbeir_images/infoseek_images/test/") for f in changed)


def test_default_config_is_the_nine_tasks_and_writes_the_same_records(tmp_path):
    config = SyntheticConfig()
    assert config.tasks == SYNTHETIC_TASKS and not set(FUSION_TASKS) & set(SYNTHETIC_TASKS)
    generate(tmp_path / "default", config, progress=False)
    assert not (tmp_path / "default/mbeir_images/infoseek_images").exists()
    assert records_digest(tmp_path / "default") == DEFAULT_RECORDS_DIGEST


def test_study_preset_has_the_fusion_tasks_and_200_test_queries_each():
    study = SyntheticConfig.study()
    assert study.tasks == STUDY_TASKS == SYNTHETIC_TASKS + FUSION_TASKS
    assert study.test_queries_per_task >= 200 and study.test_queries_per_task % 4 == 0
    assert SyntheticConfig.study(seed=1).seed == 1


def test_chance_is_k_over_the_pool(bench):
    manifest = json.loads((bench / "synthetic_manifest.json").read_text())
    assert chance_at_headline_k(manifest) == {TASK: 5 / 160}


def test_grid_captions_list_a_train_grid_s_nine_objects_in_reading_order(tmp_path):
    config = dataclasses.replace(ONLY_SPATIAL, num_grid_captions=6)
    manifest = generate(tmp_path / "captions", config, progress=False)
    root = tmp_path / "captions"
    lines = [json.loads(x) for x in (root / "pairs/image_captions.jsonl").read_text().splitlines()]
    assert manifest["pairs"]["image_captions"] == len(lines) == 2 + 6
    assert len({line["id"] for line in lines}) == len(lines)
    grids = lines[2:]
    cells = list(spatial.GRID_CELLS.values())
    for line in grids:
        assert line["caption"].startswith("a grid of ") and "/train/" in line["image_path"]
        objects = line["caption"].removeprefix("a grid of ").split(", ")
        assert len(objects) == 9 and len(set(objects)) == 9, line["caption"]
        with Image.open(root / line["image_path"]) as image:
            assert image.size == spatial.GRID_CANVAS
            pixels = np.asarray(image.convert("RGB"), np.int32)
        # Reading order: the centre of the k-th cell has the k-th object's fill colour.
        side = spatial.GRID_CANVAS[0] // 3
        for (row, col), described in zip(cells, objects):
            _, size, colour, shape = described.split(" ")
            assert size in spatial.SIZES and shape in spatial.SHAPES
            centre = pixels[row * side + side // 2, col * side + side // 2]
            assert np.abs(centre - np.array(spatial.COLOURS[colour])).max() <= 20, described
    # Deterministic per seed, and the captions come after the world's, which are unchanged.
    again = generate(tmp_path / "again", config, progress=False)
    assert again == manifest
    assert (tmp_path / "again/pairs/image_captions.jsonl").read_bytes() == (
        root / "pairs/image_captions.jsonl"
    ).read_bytes()
    plain = tmp_path / "plain"
    generate(plain, ONLY_SPATIAL, progress=False)
    assert (plain / "pairs/image_captions.jsonl").read_text().splitlines() == (
        root / "pairs/image_captions.jsonl"
    ).read_text().splitlines()[:2]
