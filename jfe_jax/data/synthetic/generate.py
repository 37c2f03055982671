"""Writes the synthetic benchmark: M-BEIR's exact layout, plus stage-1 pair data.

  query/{train,val,test}/mbeir_<task>_<split>.jsonl
  query/union_train/mbeir_union_up_train.jsonl, query/union_val/mbeir_union_val.jsonl
  cand_pool/local/mbeir_<task>_cand_pool.jsonl             test pool (mscoco: *_test_*)
  cand_pool/local/mbeir_<task>_val_cand_pool.jsonl         val pool
  cand_pool/global/mbeir_union_{train,val,test}_cand_pool.jsonl
  qrels/{train,val,test}/mbeir_<task>_<split>_qrels.txt
  instructions/query_instructions.tsv
  mbeir_images/<dataset>_images/{train,val,test,cards}/*.png
  pairs/text_triples.jsonl, pairs/image_captions.jsonl    (schema in pairs.py)
  synthetic_manifest.json                                  config, counts, seed, version

The output is a pure function of the config: the same seed gives byte-identical files.
`SyntheticConfig()` is the demo's data (the nine SYNTHETIC_TASKS); `SyntheticConfig.study()`
adds the tasks that need fusion by construction (FUSION_TASKS) and enough test queries for
the fusion study.
"""

from __future__ import annotations

import dataclasses
import json
import os
import random
import shutil
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

from jfe_jax.data.mbeir import (
    DATASET_IDS,
    DATASET_NAMES,
    INSTRUCTIONS_FILE,
    TASK_MODALITIES,
    headline_k,
    parse_task_name,
)
from jfe_jax.data.synthetic import pairs, spatial
from jfe_jax.data.synthetic.builder import SPLITS, BenchmarkBuilder
from jfe_jax.data.synthetic.tasks import TASK_BUILDERS
from jfe_jax.data.synthetic.world import derive_seed
from jfe_jax.data.tokenizer import build_tokenizer
from jfe_jax.progress import progress_bar
from jfe_jax.workdir import TOKENIZER_DIR  # a demo data root keeps its tokenizer as a workdir

VERSION = 1
MANIFEST_FILE = "synthetic_manifest.json"
# The demo's tasks: changing this tuple changes the demo's data, timings and results.
SYNTHETIC_TASKS: tuple[str, ...] = (
    "mscoco_task0",
    "mscoco_task3",
    "webqa_task1",
    "webqa_task2",
    "nights_task4",
    "oven_task6",
    "oven_task8",
    "fashioniq_task7",
    "cirr_task7",
)
# Tasks where neither modality alone determines the answer and no sum of separate image and
# text embeddings can rank every query right (spatial.py); only in the study preset.
FUSION_TASKS: tuple[str, ...] = ("infoseek_task6",)
STUDY_TASKS: tuple[str, ...] = SYNTHETIC_TASKS + FUSION_TASKS
# As in M-BEIR, MSCOCO's val and test pools are separate files named by split.
SPLIT_NAMED_POOLS: tuple[str, ...] = ("mscoco_task0", "mscoco_task3")
UNION_QUERY_FILES = {
    "train": "query/union_train/mbeir_union_up_train.jsonl",
    "val": "query/union_val/mbeir_union_val.jsonl",
}

# (query modality, candidate modality) -> alternative prompts, in the spirit of UniIR's.
PROMPTS: dict[tuple[str, str], tuple[str, ...]] = {
    ("text", "image"): (
        "Find the picture that matches this description.",
        "Retrieve an image of the scene described here.",
        "Which image shows what this text says?",
        "Match this caption to its image.",
    ),
    ("image", "text"): (
        "Find a caption that describes this picture.",
        "Retrieve the description of this image.",
        "Which text describes what this image shows?",
        "Write-up search: find the caption of this picture.",
    ),
    ("text", "text"): (
        "Find a document that answers this description.",
        "Retrieve the passage describing the same scene.",
        "Which description matches this text?",
        "Find the scene description that agrees with this sentence.",
    ),
    ("text", "image,text"): (
        "Find an image and its note that match this description.",
        "Retrieve a captioned picture of the described scene.",
        "Which picture, with its note, shows this scene?",
        "Match this text to an annotated image.",
    ),
    ("image", "image"): (
        "Find another picture of the same scene.",
        "Retrieve an image that shows the same thing as this one.",
        "Which image is most similar to this picture?",
        "Find a rendering of this scene at another size.",
    ),
    ("image,text", "text"): (
        "Answer the question about this picture.",
        "Retrieve the answer to this question about the image.",
        "Which object does the question ask about?",
        "Find the text that answers what is asked about this picture.",
    ),
    ("image,text", "image,text"): (
        "Find the card of the object the question asks about.",
        "Retrieve a picture and name answering this question about the image.",
        "Which card shows the object this question is about?",
        "Match the question about this picture to an illustrated entry.",
    ),
    ("image,text", "image"): (
        "Change this picture as the text says and find the result.",
        "Retrieve the image this one becomes after the described edit.",
        "Which picture matches this image with the requested change?",
        "Apply the modification to the picture and find the target image.",
    ),
}


@dataclasses.dataclass(frozen=True)
class SyntheticConfig:
    """What to generate. The defaults give ~8.4k small images in about 4 seconds on 2 cores."""

    seed: int = 0  # one seed for the world, the splits, the sampling and the jitter
    tasks: tuple[str, ...] = SYNTHETIC_TASKS  # a subset of SYNTHETIC_TASKS
    train_queries_per_task: int = 300
    # (task, factor) pairs: those tasks get factor x train_queries_per_task training queries.
    # The position questions of the OVEN tasks need more examples than the others.
    train_query_multipliers: tuple[tuple[str, int], ...] = (("oven_task6", 2), ("oven_task8", 2))
    val_queries_per_task: int = 8
    test_queries_per_task: int = 60
    hard_negatives: int = 2  # per query, in neg_cand_list (fewer when the world has fewer)
    # (width, height) choices; multiples of 28 so Qwen2-VL's smart resize keeps them as is.
    image_sizes: tuple[tuple[int, int], ...] = (
        (56, 56),
        (84, 84),
        (112, 84),
        (84, 112),
        (112, 112),
    )
    card_size: tuple[int, int] = (84, 84)  # the object cards of oven_task8
    jitter: float = 1.0  # scale of rendering jitter (0: every rendering of a scene identical)
    # Fractions of all possible scenes in train, val and test (scenes never cross splits).
    split_fractions: tuple[float, float, float] = (0.6, 0.15, 0.25)
    num_text_triples: int = 1000  # pairs/text_triples.jsonl
    num_image_captions: int = 1500  # pairs/image_captions.jsonl
    # More pairs/image_captions.jsonl lines: 3x3 grid scenes of infoseek_task6 captioned with
    # their nine objects (spatial.grid_captions), so stage 1 learns to see a grid's objects.
    num_grid_captions: int = 0
    # tokenizer/: byte-level BPE trained on every text written, Qwen2-VL special tokens at
    # the end of the vocabulary (must equal the model's vocab_size: 512 for the tiny size,
    # 8192 for small); 0 writes no tokenizer.
    tokenizer_vocab_size: int = 512

    def __post_init__(self):
        unknown = [t for t in self.tasks if t not in TASK_BUILDERS]
        if unknown or not self.tasks:
            raise ValueError(
                f"SyntheticConfig.tasks has unknown tasks {unknown} (or none); "
                f"expected a subset of {tuple(TASK_BUILDERS)}"
            )
        if abs(sum(self.split_fractions) - 1) > 1e-9 or min(self.split_fractions) <= 0:
            raise ValueError(
                f"SyntheticConfig.split_fractions {self.split_fractions} must be "
                "three positive fractions summing to 1"
            )
        sizes = list(self.image_sizes) + [self.card_size]
        if not self.image_sizes or any(len(s) != 2 or min(s) < 28 for s in sizes):
            raise ValueError(
                f"SyntheticConfig image sizes {sizes} must be (width, height) "
                "pairs of at least 28 pixels"
            )
        counts = (
            self.train_queries_per_task,
            self.val_queries_per_task,
            self.test_queries_per_task,
            self.hard_negatives,
            self.num_text_triples,
            self.num_image_captions,
        )
        unknown = [t for t, _ in self.train_query_multipliers if t not in TASK_BUILDERS]
        if unknown:
            raise ValueError(
                f"SyntheticConfig.train_query_multipliers names unknown tasks {unknown}; "
                f"expected some of {tuple(TASK_BUILDERS)}"
            )
        counts += tuple(n for _, n in self.train_query_multipliers)
        if min(counts) < 0:
            raise ValueError(f"SyntheticConfig counts must be non-negative, got {counts}")

    @classmethod
    def study(cls, seed: int = 0) -> SyntheticConfig:
        """The fusion study's data: STUDY_TASKS (the nine plus FUSION_TASKS), 240 test
        queries per task (one query moves a task's recall by 0.42 points; a multiple of 4
        keeps infoseek_task6's XOR groups whole), 40 val queries, and the demo's training
        set plus 9600 infoseek_task6 training queries and 1500 stage-1 captions of its grids.
        The fusion task is learned from many distinct scenes, not from many passes over a
        few (at 600 or 1200 training queries the tiny model memorises them), and the
        captions teach stage 1 to see a grid's nine objects; the study's stage 2 gives the
        task most of its batches (jfe_jax.study.presets). Chance at the headline k, k/pool
        (`chance_at_headline_k`), on the test pools: infoseek_task6, oven_task6 and
        oven_task8 5/160 = 3.1%; fashioniq_task7 10/210 = 4.8% (the world has only ~200
        one-object test scenes); the others 5/600-720, under 1%. About 50 s to generate on
        2 cores (the grids' ~6300 images most of it).
        """
        return cls(
            seed=seed,
            tasks=STUDY_TASKS,
            train_query_multipliers=(
                ("oven_task6", 2),
                ("oven_task8", 2),
                ("infoseek_task6", 32),
            ),
            val_queries_per_task=40,
            test_queries_per_task=240,
            num_grid_captions=1500,
        )

    def queries_per_task(self, split: str, task: str | None = None) -> int:
        """Queries ``task`` (default: any task without an override) gets in a split."""
        if split == "train" and task is not None:
            return self.train_queries_per_task * dict(self.train_query_multipliers).get(task, 1)
        return {
            "train": self.train_queries_per_task,
            "val": self.val_queries_per_task,
            "test": self.test_queries_per_task,
        }[split]


def chance_at_headline_k(manifest: dict[str, Any], split: str = "test") -> dict[str, float]:
    """{task: k / local pool size} from a manifest: the Recall@k a random ranking of the
    task's pool scores in expectation, k being the task's headline k (one positive each)."""
    return {
        task: min(1.0, headline_k(task) / counts[split]["pool"])
        for task, counts in manifest["tasks"].items()
        if counts[split]["pool"]
    }


def local_pool_file(task: str, split: str) -> str:
    """Where a task's local pool for val or test is written (relative to the root)."""
    if split == "test" and task not in SPLIT_NAMED_POOLS:
        return f"cand_pool/local/mbeir_{task}_cand_pool.jsonl"
    return f"cand_pool/local/mbeir_{task}_{split}_cand_pool.jsonl"


def _write_jsonl(path: Path, records: Iterable[dict[str, Any]]) -> int:
    path.parent.mkdir(parents=True, exist_ok=True)
    count = 0
    with open(path, "w", encoding="utf-8", newline="\n") as f:
        for record in records:
            f.write(json.dumps(record, sort_keys=True, ensure_ascii=False) + "\n")
            count += 1
    return count


def _write_text(path: Path, text: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", encoding="utf-8", newline="\n") as f:
        f.write(text)


def instructions_tsv(tasks: Iterable[str]) -> str:
    """The query_instructions.tsv text for `tasks`, with UniIR's header."""
    lines = [
        "query_modality\tcand_modality\tdataset_name\tdataset_id\t"
        "prompt_1\tprompt_2\tprompt_3\tprompt_4"
    ]
    keys = []
    for task in tasks:
        dataset, task_id = parse_task_name(task)
        keys.append((DATASET_IDS[dataset], *TASK_MODALITIES[task_id]))
    for dataset_id, query_modality, cand_modality in sorted(set(keys)):
        prompts = PROMPTS[(query_modality, cand_modality)]
        lines.append(
            "\t".join(
                [
                    query_modality,
                    cand_modality,
                    DATASET_NAMES[dataset_id],
                    str(dataset_id),
                    *prompts,
                ]
            )
        )
    return "\n".join(lines) + "\n"


def _qrels_lines(queries: list[dict[str, Any]]) -> str:
    return "".join(
        f"{q['qid']} 0 {did} 1 {q['task_id']}\n" for q in queries for did in q["pos_cand_list"]
    )


def _union(pools: Iterable[list[dict[str, Any]]]) -> list[dict[str, Any]]:
    merged: dict[str, dict[str, Any]] = {}
    for pool in pools:
        for record in pool:
            merged.setdefault(record["did"], record)
    return list(merged.values())


def _write_benchmark(
    out: Path, bench: BenchmarkBuilder, config: SyntheticConfig, triples, captions
) -> dict[str, Any]:
    counts: dict[str, dict[str, dict[str, int]]] = {}
    for task in config.tasks:
        for split in SPLITS:
            queries = bench.queries.get((task, split), [])
            _write_jsonl(out / f"query/{split}/mbeir_{task}_{split}.jsonl", queries)
            _write_text(
                out / f"qrels/{split}/mbeir_{task}_{split}_qrels.txt", _qrels_lines(queries)
            )
            pool = bench.pool(task, split)
            if split != "train":
                _write_jsonl(out / local_pool_file(task, split), pool)
            counts.setdefault(task, {})[split] = {"queries": len(queries), "pool": len(pool)}
    for split, path in UNION_QUERY_FILES.items():
        _write_jsonl(
            out / path, (q for t in config.tasks for q in bench.queries.get((t, split), []))
        )
    global_pools = {}
    for split in SPLITS:
        pool = _union(bench.pool(t, split) for t in config.tasks)
        global_pools[split] = _write_jsonl(
            out / f"cand_pool/global/mbeir_union_{split}_cand_pool.jsonl", pool
        )
    _write_text(out / INSTRUCTIONS_FILE, instructions_tsv(config.tasks))
    _write_jsonl(out / pairs.TEXT_TRIPLES_FILE, triples)
    _write_jsonl(out / pairs.IMAGE_CAPTIONS_FILE, captions)
    manifest = {
        "version": VERSION,
        "seed": config.seed,
        "config": dataclasses.asdict(config),
        "tasks": counts,
        "global_pools": global_pools,
        "images": bench.num_images,
        "pairs": {"text_triples": len(triples), "image_captions": len(captions)},
    }
    # Round-trip through JSON so the returned summary equals the file (tuples become lists).
    manifest = json.loads(json.dumps(manifest))
    _write_text(out / MANIFEST_FILE, json.dumps(manifest, sort_keys=True, indent=2) + "\n")
    return manifest


def generate(
    root: str | os.PathLike,
    config: SyntheticConfig | None = None,
    *,
    overwrite: bool = False,
    progress: bool = True,
) -> dict[str, Any]:
    """Writes the synthetic benchmark to `root` and returns its manifest (counts per task and
    split, pool sizes, image count, config, seed, version).

    The files are written to a sibling staging folder and moved into place at the end, so
    `root` is never left half-written. An existing non-empty `root` is replaced only with
    overwrite=True and only if it holds a synthetic_manifest.json (i.e. it is ours).
    """
    config = config or SyntheticConfig()
    root = Path(root)
    if root.exists() and (not root.is_dir() or any(root.iterdir())):
        if not overwrite:
            raise FileExistsError(
                f"{root} exists and is not empty; pass overwrite=True to "
                "replace an earlier synthetic benchmark"
            )
        if not (root / MANIFEST_FILE).is_file():
            raise FileExistsError(
                f"{root} holds no {MANIFEST_FILE}, so it is not a synthetic "
                "benchmark; refusing to replace it"
            )
    staging = root.parent / f".{root.name}.partial"
    if staging.exists():
        shutil.rmtree(staging)  # a leftover of an interrupted run of ours
    staging.mkdir(parents=True)

    bench = BenchmarkBuilder(
        staging,
        seed=config.seed,
        image_sizes=tuple(tuple(s) for s in config.image_sizes),
        card_size=tuple(config.card_size),
        split_fractions=tuple(config.split_fractions),
        jitter=config.jitter,
    )
    steps = [(task, split) for split in SPLITS for task in config.tasks]
    with progress_bar(total=len(steps) + 3, desc="synthetic M-BEIR", disable=not progress) as bar:
        for task, split in steps:
            bar.set_postfix_str(f"{task} {split}")
            rng = random.Random(derive_seed(config.seed, "queries", task, split))
            TASK_BUILDERS[task](
                bench, task, split, rng, config.queries_per_task(split, task), config.hard_negatives
            )
            bar.update()
        bar.set_postfix_str("pairs")
        triples = pairs.text_triples(
            bench, random.Random(derive_seed(config.seed, "text_triples")), config.num_text_triples
        )
        captions = pairs.image_captions(
            bench,
            random.Random(derive_seed(config.seed, "image_captions")),
            config.num_image_captions,
        )
        captions += spatial.grid_captions(
            bench,
            random.Random(derive_seed(config.seed, "grid_captions")),
            config.num_grid_captions,
            first_id=len(captions),
        )
        bar.update()
        bar.set_postfix_str("writing")
        manifest = _write_benchmark(staging, bench, config, triples, captions)
        bar.update()
        if config.tokenizer_vocab_size:
            bar.set_postfix_str("tokenizer")
            build_tokenizer(
                list(corpus_texts(staging)), config.tokenizer_vocab_size, staging / TOKENIZER_DIR
            )
        bar.update()

    if root.exists():
        shutil.rmtree(root) if root.is_dir() else root.unlink()
    staging.rename(root)
    return manifest


def corpus_texts(root: str | os.PathLike) -> Iterator[str]:
    """Every distinct text of a synthetic benchmark (query texts, candidate texts, pair texts,
    instruction prompts), in a fixed order: the corpus for training a tokenizer."""
    root = Path(root)
    seen: set[str] = set()

    def new(text: Any) -> bool:
        if not isinstance(text, str) or not text.strip() or text in seen:
            return False
        seen.add(text)
        return True

    files = sorted((root / "query").glob("*/*.jsonl")) + sorted(
        (root / "cand_pool").glob("*/*.jsonl")
    )
    fields = ("query_txt", "txt", "sentence", "positive", "hard_negative", "caption")
    for path in files + [root / pairs.TEXT_TRIPLES_FILE, root / pairs.IMAGE_CAPTIONS_FILE]:
        with open(path, encoding="utf-8") as f:
            for line in f:
                record = json.loads(line)
                for field in fields:
                    if new(record.get(field)):
                        yield record[field]
    with open(root / INSTRUCTIONS_FILE, encoding="utf-8") as f:
        for line in f.read().splitlines()[1:]:
            for prompt in line.split("\t")[4:]:
                if new(prompt):
                    yield prompt
