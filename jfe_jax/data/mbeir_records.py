"""M-BEIR's tables, records and instructions, without its files: the datasets, tasks and
headline k (UniIR's), a query or candidate jsonl line parsed and checked (`parse_query`,
`parse_candidate`), and the query instructions (`Instructions`, `instruction_index`).

``jfe_jax.data.mbeir`` reads them from an M-BEIR directory and re-exports these names.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import re
from collections.abc import Mapping
from pathlib import PurePosixPath
from typing import Any

# ---------------------------------------------------------------------------------------------
# Benchmark tables
# ---------------------------------------------------------------------------------------------

DATASET_IDS: dict[str, int] = {
    "visualnews": 0,
    "fashion200k": 1,
    "webqa": 2,
    "edis": 3,
    "nights": 4,
    "oven": 5,
    "infoseek": 6,
    "fashioniq": 7,
    "cirr": 8,
    "mscoco": 9,
}
DATASET_NAMES: dict[int, str] = {i: name for name, i in DATASET_IDS.items()}

MODALITIES: tuple[str, ...] = ("text", "image", "image,text")

# task id -> (query modality, candidate modality); task 5 is unused in M-BEIR.
TASK_MODALITIES: dict[int, tuple[str, str]] = {
    0: ("text", "image"),
    1: ("text", "text"),
    2: ("text", "image,text"),
    3: ("image", "text"),
    4: ("image", "image"),
    6: ("image,text", "text"),
    7: ("image,text", "image"),
    8: ("image,text", "image,text"),
}

TEST_TASKS: tuple[str, ...] = (
    "visualnews_task0",
    "mscoco_task0",
    "fashion200k_task0",
    "webqa_task1",
    "edis_task2",
    "webqa_task2",
    "visualnews_task3",
    "mscoco_task3",
    "fashion200k_task3",
    "nights_task4",
    "oven_task6",
    "infoseek_task6",
    "fashioniq_task7",
    "cirr_task7",
    "oven_task8",
    "infoseek_task8",
)

# The headline metric is Recall@5, except on the fashion tasks where UniIR reports Recall@10.
HEADLINE_K: dict[str, int] = {
    name: 10 if name in ("fashion200k_task0", "fashion200k_task3", "fashioniq_task7") else 5
    for name in TEST_TASKS
}

# JFE's result groups, by task id.
TASK_GROUPS: dict[str, tuple[int, ...]] = {
    "single-modal": (1, 4),
    "cross-modal": (0, 3),
    "mixed-modal": (2,),
    "multi-modal": (6, 8),
    "conditional": (7,),
}

QUERY_SPLITS: tuple[str, ...] = ("train", "val", "test", "union_train", "union_val")
QRELS_SPLITS: tuple[str, ...] = ("train", "val", "test")
INSTRUCTIONS_FILE = "instructions/query_instructions.tsv"
INSTRUCTION_MODES: tuple[str, ...] = ("fixed", "seeded")

_TASK_NAME = re.compile(r"^([a-z0-9]+)_task(\d+)$")
_QUERY_FILE = re.compile(r"^mbeir_([a-z0-9]+_task\d+)_([a-z_]+)\.jsonl$")
_PROMPT_COLUMN = re.compile(r"^prompt_?(\d+)$")


def parse_task_name(name: str) -> tuple[str, int]:
    """Splits "mscoco_task0" into ("mscoco", 0); raises ValueError on another shape or id."""
    match = _TASK_NAME.match(name)
    if not match:
        raise ValueError(f"task name {name!r} is not of the form '<dataset>_task<k>'")
    task_id = int(match.group(2))
    if task_id not in TASK_MODALITIES:
        raise ValueError(
            f"task name {name!r}: unknown task id {task_id}, expected one of "
            f"{sorted(TASK_MODALITIES)}"
        )
    return match.group(1), task_id


def headline_k(name: str) -> int:
    """The k of the headline Recall@k for a task name (5, or 10 for the fashion tasks);
    an ``mbeir_`` prefix is ignored."""
    return HEADLINE_K.get(name.removeprefix("mbeir_"), 5)


def task_group(task_id: int) -> str:
    """JFE's group (single-modal, cross-modal, ...) of a task id."""
    for group, ids in TASK_GROUPS.items():
        if task_id in ids:
            return group
    raise ValueError(
        f"task id {task_id} belongs to no group; expected one of {sorted(TASK_MODALITIES)}"
    )


# ---------------------------------------------------------------------------------------------
# Records
# ---------------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class Query:
    """One M-BEIR query line."""

    qid: str  # "<dataset_id>:<n>"
    text: str | None  # None when absent or blank
    image_path: str | None  # relative to the M-BEIR root
    modality: str  # one of MODALITIES
    task_id: int
    dataset_id: int  # from the qid prefix
    pos_cand_list: tuple[str, ...]
    neg_cand_list: tuple[str, ...]
    src_content: str | None  # kept verbatim (M-BEIR stores a JSON string or null)
    source: str = dataclasses.field(default="", compare=False)  # "file:line", for messages

    @property
    def cand_modality(self) -> str:
        """The candidate modality of this query's task (used to key its instruction)."""
        return TASK_MODALITIES[self.task_id][1]


@dataclasses.dataclass(frozen=True)
class Candidate:
    """One M-BEIR candidate-pool line."""

    did: str  # "<dataset_id>:<n>"
    text: str | None
    image_path: str | None
    modality: str
    dataset_id: int
    src_content: str | None
    source: str = dataclasses.field(default="", compare=False)


def _text(value: Any, field: str, source: str) -> str | None:
    if value is None:
        return None
    if not isinstance(value, str):
        raise ValueError(f"{source}: {field} must be a string or null, got {type(value).__name__}")
    return value if value.strip() else None


def _relative_path(value: Any, field: str, source: str) -> str | None:
    """Checks that a path stays under the root lexically; symlinks are checked on resolution."""
    if value is None or value == "":
        return None
    if not isinstance(value, str):
        raise ValueError(f"{source}: {field} must be a string or null, got {type(value).__name__}")
    path = PurePosixPath(value.replace("\\", "/"))
    if path.is_absolute() or re.match(r"^[A-Za-z]:", value):
        raise ValueError(
            f"{source}: {field} {value!r} is absolute; expected a path relative to the M-BEIR root"
        )
    if ".." in path.parts:
        raise ValueError(f"{source}: {field} {value!r} escapes the M-BEIR root ('..')")
    return value


def _dataset_id(record_id: Any, field: str, source: str) -> int:
    if not isinstance(record_id, str) or not re.match(r"^\d+:.+$", record_id):
        raise ValueError(f"{source}: {field} {record_id!r} is not of the form '<dataset_id>:<n>'")
    return int(record_id.split(":", 1)[0])


def _required(record: Mapping[str, Any], field: str, what: str, source: str) -> Any:
    """``record[field]``; ValueError saying it is missing (absent or null), not "empty" or
    "unknown", for a field every record must have."""
    value = record.get(field)
    if value is None:
        state = "is missing" if field not in record else "is null"
        raise ValueError(f"{source}: {what} has no {field} (the field {state})")
    return value


def _modality(value: Any, field: str, source: str) -> str:
    if value not in MODALITIES:
        raise ValueError(f"{source}: unknown {field} {value!r}, expected one of {MODALITIES}")
    return value


def _check_parts(modality: str, text: str | None, image: str | None, what: str, source: str):
    if text is None and image is None:
        raise ValueError(f"{source}: {what} has neither text nor image")
    if "text" in modality and text is None:
        raise ValueError(f"{source}: {what} modality is {modality!r} but its text is empty")
    if "image" in modality and image is None:
        raise ValueError(f"{source}: {what} modality is {modality!r} but it has no image path")


def _src_content(value: Any) -> str | None:
    if value is None or isinstance(value, str):
        return value
    return json.dumps(value, sort_keys=True)


def _did_list(value: Any, field: str, source: str) -> tuple[str, ...]:
    if value is None:
        return ()
    if not isinstance(value, list) or not all(isinstance(d, str) for d in value):
        raise ValueError(f"{source}: {field} must be a list of did strings")
    return tuple(value)


def parse_query(record: Mapping[str, Any], source: str = "", task_id: int | None = None) -> Query:
    """Validates one decoded query line; `task_id` is the fallback when the line has none."""
    if "task_id" in record and record["task_id"] is not None:
        task_id = record["task_id"]
    if isinstance(task_id, bool) or not isinstance(task_id, int) or task_id not in TASK_MODALITIES:
        raise ValueError(
            f"{source}: unknown task id {task_id!r}, expected one of {sorted(TASK_MODALITIES)}"
        )
    qid = record.get("qid")
    dataset_id = _dataset_id(qid, "qid", source)
    modality = _required(record, "query_modality", f"query {qid}", source)
    modality = _modality(modality, "query_modality", source)
    if modality != TASK_MODALITIES[task_id][0]:
        raise ValueError(
            f"{source}: query_modality {modality!r} does not match task {task_id}, "
            f"whose queries are {TASK_MODALITIES[task_id][0]!r}"
        )
    text = _text(record.get("query_txt"), "query_txt", source)
    image = _relative_path(record.get("query_img_path"), "query_img_path", source)
    _check_parts(modality, text, image, f"query {qid}", source)
    pos = _required(record, "pos_cand_list", f"query {qid}", source)
    pos = _did_list(pos, "pos_cand_list", source)
    if not pos:
        raise ValueError(f"{source}: query {qid} has an empty pos_cand_list")
    return Query(
        qid=qid,
        text=text,
        image_path=image,
        modality=modality,
        task_id=task_id,
        dataset_id=dataset_id,
        pos_cand_list=pos,
        neg_cand_list=_did_list(record.get("neg_cand_list"), "neg_cand_list", source),
        src_content=_src_content(record.get("query_src_content")),
        source=source,
    )


def parse_candidate(record: Mapping[str, Any], source: str = "") -> Candidate:
    """Validates one decoded candidate-pool line."""
    did = record.get("did")
    dataset_id = _dataset_id(did, "did", source)
    modality = _modality(
        _required(record, "modality", f"candidate {did}", source), "modality", source
    )
    text = _text(record.get("txt"), "txt", source)
    image = _relative_path(record.get("img_path"), "img_path", source)
    _check_parts(modality, text, image, f"candidate {did}", source)
    return Candidate(
        did=did,
        text=text,
        image_path=image,
        modality=modality,
        dataset_id=dataset_id,
        src_content=_src_content(record.get("src_content")),
        source=source,
    )


# ---------------------------------------------------------------------------------------------
# Instructions
# ---------------------------------------------------------------------------------------------


def instruction_index(qid: str, num_prompts: int, mode: str = "fixed", seed: int = 0) -> int:
    """Index of the prompt a query gets among `num_prompts` alternatives.

    "fixed": always 0 (the first prompt). "seeded": the first 8 bytes of
    sha256(f"{seed}:{qid}") as a big-endian unsigned integer, modulo num_prompts. The rule
    depends on nothing but (seed, qid), so results only need to record the mode and seed.
    """
    if num_prompts < 1:
        raise ValueError(f"num_prompts must be at least 1, got {num_prompts}")
    if mode == "fixed":
        return 0
    if mode == "seeded":
        digest = hashlib.sha256(f"{seed}:{qid}".encode()).digest()
        return int.from_bytes(digest[:8], "big") % num_prompts
    raise ValueError(f"instruction mode {mode!r} is unknown, expected one of {INSTRUCTION_MODES}")


InstructionKey = tuple[int, str, str]  # (dataset id, query modality, candidate modality)


@dataclasses.dataclass(frozen=True)
class Instructions:
    """The query instructions of M-BEIR: key (dataset id, query mod., cand. mod.) -> prompts."""

    prompts: Mapping[InstructionKey, tuple[str, ...]]
    source: str = ""

    @classmethod
    def from_tsv(cls, path: str | os.PathLike, name: str | None = None) -> Instructions:
        """Parses a query_instructions.tsv: a header row naming `query_modality`,
        `cand_modality`, `dataset_id` and prompt columns (`prompt_1`, `prompt_2`, ...; other
        columns such as `dataset_name` are ignored), then one row per key. Empty prompt
        cells are dropped; a key without prompts, or twice, is an error."""
        name = name or str(path)
        with open(path, encoding="utf-8") as f:
            lines = f.read().splitlines()
        if not lines:
            raise ValueError(f"{name}: empty file, expected a header row")
        header = lines[0].split("\t")
        required = ("query_modality", "cand_modality", "dataset_id")
        missing = [c for c in required if c not in header]
        prompt_columns = sorted(
            (int(m.group(1)), i) for i, c in enumerate(header) if (m := _PROMPT_COLUMN.match(c))
        )
        if missing or not prompt_columns:
            raise ValueError(
                f"{name}:1: header {header} lacks columns {missing or ['prompt_1']}; "
                f"expected {list(required)} and prompt_1, prompt_2, ..."
            )
        column = {c: header.index(c) for c in required}
        prompts: dict[InstructionKey, tuple[str, ...]] = {}
        for lineno, line in enumerate(lines[1:], start=2):
            if not line.strip():
                continue
            cells = line.split("\t")
            where = f"{name}:{lineno}"
            if len(cells) <= max(column.values()):
                raise ValueError(
                    f"{where}: {len(cells)} columns, expected at least {max(column.values()) + 1}"
                )
            try:
                dataset_id = int(cells[column["dataset_id"]])
            except ValueError:
                raise ValueError(
                    f"{where}: dataset_id {cells[column['dataset_id']]!r} is not an integer"
                ) from None
            key = (
                dataset_id,
                _modality(cells[column["query_modality"]].strip(), "query_modality", where),
                _modality(cells[column["cand_modality"]].strip(), "cand_modality", where),
            )
            row = tuple(
                cells[i].strip() for _, i in prompt_columns if i < len(cells) and cells[i].strip()
            )
            if not row:
                raise ValueError(f"{where}: no prompt for key {key}")
            if key in prompts:
                raise ValueError(f"{where}: key {key} appears twice")
            prompts[key] = row
        return cls(prompts=prompts, source=name)

    def prompts_for(
        self, dataset_id: int, query_modality: str, cand_modality: str
    ) -> tuple[str, ...]:
        """The alternative prompts of a key; ValueError naming the key when it is absent."""
        key = (dataset_id, query_modality, cand_modality)
        if key not in self.prompts:
            raise ValueError(
                f"{self.source}: no instruction for key {key}; known keys: {sorted(self.prompts)}"
            )
        return self.prompts[key]

    def choose(self, query: Query, mode: str = "fixed", seed: int = 0) -> tuple[int, str]:
        """(prompt index, prompt) for a query, by `instruction_index`'s rule."""
        prompts = self.prompts_for(query.dataset_id, query.modality, query.cand_modality)
        index = instruction_index(query.qid, len(prompts), mode, seed)
        return index, prompts[index]

    def instruction_for(self, query: Query, mode: str = "fixed", seed: int = 0) -> str:
        """The instruction text a query gets: the first prompt ("fixed") or a seeded choice."""
        return self.choose(query, mode, seed)[1]
