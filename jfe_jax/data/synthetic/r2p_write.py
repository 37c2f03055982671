"""MIRe's R2P stage-1 data from the synthetic world, written where the project's reader reads it.

``synthetic_dialogues`` stands in for the LLaVA dialogues MIRe starts from (the inputs of its
``runs/data_filtering.py``): a few (human, gpt) turns per train-split scene, the first human
turn prefixed with ``<image>\\n`` as in LLaVA, of the kinds the reference's filters keep
(descriptions, "what is on the left?", yes/no questions, "Sure!"/"In the image" boilerplate,
one-phrase answers that need the question's nouns) and of the kinds they drop (counting,
colour and region questions, bare numbers, "Unanswerable.", one-word answers). Their images
are rendered once per scene under ``mbeir_images/r2p_images/train/``. ``r2p.build_r2p_pairs``
turns them into pairs.

``generate_r2p`` writes the pairs in M-BEIR's layout, the one format of this project whose
reader yields an (image, text) query with a text positive (``MBEIR``, ``MbeirTrainPairs``,
``data.kind = "mbeir"``); JFE's own stage-1 pair files (``pairs.py``: text triples, caption ->
image) have no such kind. One task (``R2PConfig.task``, default ``oven_task6``: (image, text)
-> text, OVEN's id), train split only::

  query/train/mbeir_<task>_train.jsonl        query_txt = question, query_img_path = image,
                                              pos_cand_list = [the document's did];
                                              query_src_content = {"answer", "distractors",
                                              "turn"} (the answer is the filtered response R)
  cand_pool/global/mbeir_union_train_cand_pool.jsonl   one text candidate per pair: the document
  qrels/train/mbeir_<task>_train_qrels.txt
  instructions/query_instructions.tsv         the task's prompts (M-BEIR's readers need them;
                                              MIRe uses no instruction)
  mbeir_images/r2p_images/train/*.png
  r2p_manifest.json                           config, counts (what each filter dropped), version

Its qids and dids are OVEN's (``5:<n>``), so it is a root of its own, not merged into a
benchmark root. Scenes come from the train split of the world with the same seed and split
fractions as ``SyntheticConfig``, so a benchmark generated with that seed has none of its
val or test scenes here. The same config gives byte-identical files.
"""

from __future__ import annotations

import dataclasses
import json
import os
import random
import shutil
from pathlib import Path
from typing import Any

from jfe_jax.data.mbeir import TASK_MODALITIES, parse_task_name
from jfe_jax.data.synthetic.builder import BenchmarkBuilder
from jfe_jax.data.synthetic.generate import SyntheticConfig, instructions_tsv
from jfe_jax.data.synthetic.r2p import (
    DROP_LEN,
    N_DISTRACTORS,
    R2PResult,
    Turn,
    build_r2p_pairs,
    entity_name,
)
from jfe_jax.data.synthetic.tasks import draw_scene
from jfe_jax.data.synthetic.world import POSITION_PHRASES, SHAPES, Scene, caption, derive_seed

VERSION = 1
R2P_MANIFEST_FILE = "r2p_manifest.json"
IMAGE_FOLDER = "r2p_images"
SHORT = "Answer the question using a single word or phrase."
NUMBER_WORDS = ("zero", "one", "two", "three", "four", "five")


@dataclasses.dataclass(frozen=True)
class R2PConfig:
    """What ``generate_r2p`` writes; the split fractions must be the benchmark's to keep its
    val/test scenes out."""

    seed: int = 0  # the world seed (scene splits, images, dialogues, distractors)
    num_scenes: int = 400  # train-split scenes, one image each
    turns_per_scene: int = 4  # dialogue turns per image, before filtering
    n_distractors: int = N_DISTRACTORS
    drop_len: int = DROP_LEN
    task: str = "oven_task6"  # an (image, text) -> text M-BEIR task name
    image_size: tuple[int, int] = (112, 112)
    jitter: float = 1.0
    split_fractions: tuple[float, float, float] = SyntheticConfig.split_fractions

    def __post_init__(self):
        _, task_id = parse_task_name(self.task)
        if TASK_MODALITIES[task_id] != ("image,text", "text"):
            raise ValueError(
                f"R2PConfig.task {self.task!r} is a {TASK_MODALITIES[task_id]} task; R2P "
                "pairs need an (image,text) -> text one (task id 6, e.g. oven_task6)"
            )
        if min(self.num_scenes, self.turns_per_scene) < 1 or min(self.image_size) < 28:
            raise ValueError(
                f"R2PConfig num_scenes={self.num_scenes}, turns_per_scene="
                f"{self.turns_per_scene}, image_size={self.image_size}: expected >= 1, >= 1 "
                "and sides of at least 28 pixels"
            )


# ---------------------------------------------------------------------------------------------
# Dialogues
# ---------------------------------------------------------------------------------------------


def _pick(scene: Scene, rng: random.Random):
    obj = rng.choice(scene.objects)
    return obj, POSITION_PHRASES[obj.position]


def _describe(scene, rng):
    question = rng.choice(
        (
            "Describe the image in detail.",
            "What do you see in this picture?",
            "Can you describe the scene?",
        )
    )
    answer = rng.choice(
        (
            "The image shows {}.",
            "In the image, there is {}.",
            "Certainly! The picture has {}.",
            "Sure. This photo shows {}.",
        )
    )
    return question, answer.format(caption(scene))


def _position(scene, rng):
    obj, where = _pick(scene, rng)
    question = rng.choice(("What is {}?", "Which shape do you see {}?", "What can be found {}?"))
    answer = rng.choice(
        ("{W} there is {d}.", "The object {w} is {d}.", "In the image, {d} is {w}.")
    )
    text = answer.format(W=where[0].upper() + where[1:], w=where, d=obj.describe())
    return question.format(where), text


def _one_phrase(scene, rng):
    obj, where = _pick(scene, rng)
    if rng.random() < 0.5:  # four words + "(object, left)": long enough to keep
        return f"Which object is {where}?\n{SHORT}", obj.describe()
    return f"What shape is {where}?\n{SHORT}", obj.shape.capitalize()  # too short


def _exists(scene, rng):
    obj, where = _pick(scene, rng)
    absent = [s for s in SHAPES if s not in {o.shape for o in scene.objects}]
    if rng.random() < 0.5:
        return f"Is there a {obj.shape} in the image?", f"Yes, there is {obj.describe()} {where}."
    shape = rng.choice(absent)
    return f"Is there a {shape} in the picture?", f"No, there is no {shape} in the picture."


def _colour(scene, rng):
    obj, where = _pick(scene, rng)
    questions = (
        f"What color is the {obj.shape} {where}?",
        f"What is the color of the object {where}?",
        "What are the colors of the shapes in the image?",
    )
    return rng.choice(questions), f"The {obj.shape} {where} is {obj.colour}, {obj.describe()}."


def _count(scene, rng):
    n = len(scene.objects)
    if rng.random() < 0.5:
        return f"How many shapes are there?\n{SHORT}", str(n)
    return (
        "How many objects can you see in this image?",
        f"There are {NUMBER_WORDS[n]} objects here.",
    )


def _unanswerable(scene, rng):
    obj, _ = _pick(scene, rng)
    if rng.random() < 0.5:
        return f"What is written on the {obj.shape}?", "Unanswerable."
    return "What does the label say?", "Answering does not require reading text in the image."


def _region(scene, rng):
    obj, where = _pick(scene, rng)
    box = ", ".join(f"{rng.random():.2f}" for _ in range(4))
    question = f"Please provide a short description for this region: [{box}]."
    return question, f"This region shows {obj.describe()} {where}."


# (turn maker, weight): about half of the turns pass the filters.
TURN_KINDS = (
    (_describe, 3),
    (_position, 3),
    (_one_phrase, 2),
    (_exists, 2),
    (_colour, 1),
    (_count, 1),
    (_unanswerable, 1),
    (_region, 1),
)


def scene_turns(scene: Scene, rng: random.Random, count: int) -> list[tuple[str, str]]:
    """``count`` (question, response) turns about a scene, the first marked ``<image>``."""
    makers, weights = zip(*TURN_KINDS, strict=True)
    turns = [maker(scene, rng) for maker in rng.choices(makers, weights, k=count)]
    return [("<image>\n" + q if t == 0 else q, a) for t, (q, a) in enumerate(turns)]


def synthetic_dialogues(
    bench: BenchmarkBuilder, rng: random.Random, num_scenes: int, turns_per_scene: int
) -> list[Turn]:
    """Dialogue turns about ``num_scenes`` distinct train-split scenes; turn ids are
    "<scene>_<2t>" like the reference's ``f"{id}_{t}"`` over human/gpt message pairs."""
    used: set[str] = set()
    turns = []
    for n in range(num_scenes):
        scene = draw_scene(bench, rng, "train", used, task="r2p")
        image = bench.scene_image(IMAGE_FOLDER, scene, largest=True)
        entities = tuple(sorted({entity_name(o.colour, o.shape) for o in scene.objects}))
        for t, (question, response) in enumerate(scene_turns(scene, rng, turns_per_scene)):
            turns.append(Turn(f"{n}_{2 * t}", image, question, response, entities))
    return turns


# ---------------------------------------------------------------------------------------------
# Writing
# ---------------------------------------------------------------------------------------------


def _check_root(root: Path, overwrite: bool) -> None:
    """An existing non-empty root is replaced only with overwrite=True and only if it holds
    an R2P manifest (as ``generate`` does for benchmarks)."""
    if root.exists() and (not root.is_dir() or any(root.iterdir())):
        if not overwrite:
            raise FileExistsError(
                f"{root} exists and is not empty; pass overwrite=True to replace an earlier R2P set"
            )
        if not (root / R2P_MANIFEST_FILE).is_file():
            raise FileExistsError(
                f"{root} holds no {R2P_MANIFEST_FILE}, so it is not an R2P set; refusing to "
                "replace it"
            )


def _write_lines(path: Path, lines: list[str]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", encoding="utf-8", newline="\n") as f:
        f.writelines(lines)


def _jsonl(records: list[dict[str, Any]]) -> list[str]:
    return [json.dumps(r, sort_keys=True, ensure_ascii=False) + "\n" for r in records]


def _record_pairs(bench: BenchmarkBuilder, task: str, pairs) -> list[dict[str, Any]]:
    """Adds each pair as a query with its document as the one positive candidate."""
    for pair in pairs:
        did = bench.add_candidate(
            task, "train", ("r2p", pair.id), text=pair.document, image=None, src={"turn": pair.id}
        )
        bench.add_query(
            task,
            "train",
            text=pair.question,
            image=pair.image_path,
            positives=[did],
            negatives=[],
            src={"answer": pair.answer, "distractors": list(pair.distractors), "turn": pair.id},
        )
    return bench.queries.get((task, "train"), [])


def _write_set(
    out: Path, bench: BenchmarkBuilder, config: R2PConfig, result: R2PResult
) -> dict[str, Any]:
    task = config.task
    queries = _record_pairs(bench, task, result.pairs)
    _write_lines(out / f"query/train/mbeir_{task}_train.jsonl", _jsonl(queries))
    pool = bench.pool(task, "train")
    _write_lines(out / "cand_pool/global/mbeir_union_train_cand_pool.jsonl", _jsonl(pool))
    qrels = [f"{q['qid']} 0 {d} 1 {q['task_id']}\n" for q in queries for d in q["pos_cand_list"]]
    _write_lines(out / f"qrels/train/mbeir_{task}_train_qrels.txt", qrels)
    _write_lines(out / "instructions/query_instructions.tsv", [instructions_tsv([task])])
    manifest = {
        "version": VERSION,
        "kind": "r2p",
        "config": dataclasses.asdict(config),
        "counts": result.counts(),
        "images": bench.num_images,
    }
    manifest = json.loads(json.dumps(manifest))  # tuples become lists, as in the file
    _write_lines(out / R2P_MANIFEST_FILE, [json.dumps(manifest, sort_keys=True, indent=2) + "\n"])
    return manifest


def r2p_builder(root: Path, config: R2PConfig) -> BenchmarkBuilder:
    """The records and images of an R2P set being written under ``root``."""
    return BenchmarkBuilder(
        root,
        seed=config.seed,
        image_sizes=(tuple(config.image_size),),
        card_size=tuple(config.image_size),
        split_fractions=tuple(config.split_fractions),
        jitter=config.jitter,
    )


def r2p_pairs(bench: BenchmarkBuilder, config: R2PConfig) -> R2PResult:
    """The config's dialogues (images rendered into ``bench``) made into R2P pairs."""
    rng = random.Random(derive_seed(config.seed, "r2p dialogues"))
    turns = synthetic_dialogues(bench, rng, config.num_scenes, config.turns_per_scene)
    return build_r2p_pairs(
        turns, seed=config.seed, n_distractors=config.n_distractors, drop_len=config.drop_len
    )


def generate_r2p(
    root: str | os.PathLike, config: R2PConfig | None = None, *, overwrite: bool = False
) -> dict[str, Any]:
    """Writes the R2P set (module docstring) to ``root`` and returns its manifest, whose
    ``counts`` say how many turns each filter dropped. Written to a sibling staging folder
    and moved into place, so ``root`` is never half-written; an existing non-empty ``root``
    is replaced only with overwrite=True and only if it is an R2P set."""
    config = config or R2PConfig()
    root = Path(root)
    _check_root(root, overwrite)
    staging = root.parent / f".{root.name}.partial"
    if staging.exists():
        shutil.rmtree(staging)  # a leftover of an interrupted run of ours
    staging.mkdir(parents=True)
    bench = r2p_builder(staging, config)
    manifest = _write_set(staging, bench, config, r2p_pairs(bench, config))
    if root.exists():
        shutil.rmtree(root) if root.is_dir() else root.unlink()
    staging.rename(root)
    return manifest
