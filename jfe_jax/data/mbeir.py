"""Reader for M-BEIR, UniIR's multimodal retrieval benchmark, in its on-disk layout.

Layout under the root (M-BEIR's own, as released with UniIR):
  query/{train,val,test,union_train,union_val}/mbeir_<dataset>_task<k>_<split>.jsonl
  cand_pool/local/mbeir_<task>[_<split>]_cand_pool.jsonl
  cand_pool/global/mbeir_union_<split>_cand_pool.jsonl
  qrels/{train,val,test}/mbeir_<task>_<split>_qrels.txt   ("qid 0 did relevance task_id")
  instructions/query_instructions.tsv
  mbeir_images/...

Records stream from disk (the union test pool is 2.4 GB). Every record is validated; a bad one
raises ValueError naming the file and line, or, with `skip_bad_records=True`, is logged, counted
in `MBEIR.bad_records` and skipped. Nothing is dropped silently.

The benchmark's tables, its records and its instructions are parsed in
``jfe_jax.data.mbeir_records``; their names are importable from here too.
"""

from __future__ import annotations

import collections
import json
import logging
import os
import re
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, TypeVar

from jfe_jax.data.mbeir_records import (  # noqa: F401  (re-exported: they were defined here)
    _QUERY_FILE,
    DATASET_IDS,
    DATASET_NAMES,
    HEADLINE_K,
    INSTRUCTION_MODES,
    INSTRUCTIONS_FILE,
    MODALITIES,
    QRELS_SPLITS,
    QUERY_SPLITS,
    TASK_GROUPS,
    TASK_MODALITIES,
    TEST_TASKS,
    Candidate,
    InstructionKey,
    Instructions,
    Query,
    _dataset_id,
    headline_k,
    instruction_index,
    parse_candidate,
    parse_query,
    parse_task_name,
    task_group,
)
from jfe_jax.paths import absolute

logger = logging.getLogger(__name__)

_Record = TypeVar("_Record")


class MBEIR:
    """An M-BEIR directory: lists tasks and streams queries, pools, qrels and instructions.

    Args:
      root: the M-BEIR root (the folder that holds query/, cand_pool/, qrels/, ...).
      check_images: resolve every image path while reading (symlinks included) and require the
        file to exist. Off by default because it costs a few stat calls per record; use
        `image_file(record)` to check lazily.
      skip_bad_records: log and count bad records (in `bad_records`, per file) instead of
        raising.
    """

    def __init__(
        self, root: str | os.PathLike, *, check_images: bool = False, skip_bad_records: bool = False
    ):
        self.root = Path(absolute(root))
        if not self.root.is_dir():
            raise FileNotFoundError(f"M-BEIR root {self.root} is not a directory")
        self._real_root = Path(os.path.realpath(self.root))
        self.check_images = check_images
        self.skip_bad_records = skip_bad_records
        self.bad_records: collections.Counter[str] = collections.Counter()
        self._instructions: Instructions | None = None

    @property
    def total_bad_records(self) -> int:
        """Bad records skipped since this reader was made, over all files."""
        return sum(self.bad_records.values())

    # --- files --------------------------------------------------------------------------------

    def _relative(self, path: Path) -> str:
        try:
            return path.relative_to(self.root).as_posix()
        except ValueError:
            return str(path)

    def query_files(self, split: str) -> list[Path]:
        """The query jsonl files of a split, sorted by name."""
        if split not in QUERY_SPLITS:
            raise ValueError(f"query split {split!r} is unknown, expected one of {QUERY_SPLITS}")
        folder = self.root / "query" / split
        return sorted(folder.glob("*.jsonl")) if folder.is_dir() else []

    def tasks(self, split: str) -> list[str]:
        """Names of the tasks ("mscoco_task0", ...) that have a query file in a split."""
        names = []
        for path in self.query_files(split):
            match = _QUERY_FILE.match(path.name)
            if match and match.group(2) == split:
                names.append(match.group(1))
        return names

    def query_path(self, split: str, task: str) -> Path:
        """Path of a task's query file; FileNotFoundError listing the tasks present."""
        parse_task_name(task)
        path = self.root / "query" / split / f"mbeir_{task}_{split}.jsonl"
        if not path.is_file():
            raise FileNotFoundError(
                f"no query file for task {task!r} in split {split!r} "
                f"(expected {path}); tasks present: {self.tasks(split)}"
            )
        return path

    def local_pool_path(self, task: str, split: str = "test") -> Path:
        """A task's own candidate pool: mbeir_<task>_<split>_cand_pool.jsonl when it exists
        (MSCOCO keeps separate val and test pools), else mbeir_<task>_cand_pool.jsonl."""
        folder = self.root / "cand_pool" / "local"
        tried = [
            folder / f"mbeir_{task}_{split}_cand_pool.jsonl",
            folder / f"mbeir_{task}_cand_pool.jsonl",
        ]
        for path in tried:
            if path.is_file():
                return path
        raise FileNotFoundError(
            f"no local pool for task {task!r}, split {split!r}: tried {[str(p) for p in tried]}"
        )

    def global_pool_path(self, split: str = "test") -> Path:
        """The union pool of a split: cand_pool/global/mbeir_union_<split>_cand_pool.jsonl."""
        path = self.root / "cand_pool" / "global" / f"mbeir_union_{split}_cand_pool.jsonl"
        if not path.is_file():
            raise FileNotFoundError(f"no global pool for split {split!r}: expected {path}")
        return path

    def qrels_path(self, split: str, task: str) -> Path:
        """Path of a task's qrels file for a split."""
        path = self.root / "qrels" / split / f"mbeir_{task}_{split}_qrels.txt"
        if not path.is_file():
            raise FileNotFoundError(
                f"no qrels for task {task!r} in split {split!r}: expected {path}"
            )
        return path

    # --- records ------------------------------------------------------------------------------

    def _bad(self, relative: str, error: ValueError) -> None:
        if not self.skip_bad_records:
            raise error
        self.bad_records[relative] += 1
        logger.warning("skipping bad record: %s", error)

    def _iter_lines(
        self, path: Path, parse: Callable[[str, str], _Record | None]
    ) -> Iterator[_Record]:
        """Streams `parse(line, "file:line")` over a file, applying the bad-record policy."""
        relative = self._relative(path)
        skipped_before = self.bad_records[relative]
        with open(path, encoding="utf-8") as f:
            for lineno, line in enumerate(f, start=1):
                if not line.strip():
                    continue  # a blank line holds no record
                try:
                    record = parse(line, f"{relative}:{lineno}")
                except ValueError as error:
                    self._bad(relative, error)
                    continue
                if record is not None:
                    yield record
        skipped = self.bad_records[relative] - skipped_before
        if skipped:
            logger.warning("skipped %d bad record(s) in %s", skipped, relative)

    def _decode(self, line: str, source: str) -> dict[str, Any]:
        try:
            record = json.loads(line)
        except json.JSONDecodeError as error:
            raise ValueError(
                f"{source}: malformed JSON ({error.msg} at column {error.colno})"
            ) from None
        if not isinstance(record, dict):
            raise ValueError(f"{source}: expected a JSON object, got {type(record).__name__}")
        return record

    def _check_record_images(self, record: Query | Candidate) -> None:
        if self.check_images and record.image_path is not None:
            self.image_file(record)

    def iter_query_file(self, path: str | os.PathLike) -> Iterator[Query]:
        """Streams the queries of one jsonl file (relative to the root, or absolute)."""
        path = self.root / path
        match = _QUERY_FILE.match(path.name)
        fallback = parse_task_name(match.group(1))[1] if match else None

        def parse(line: str, source: str) -> Query:
            query = parse_query(self._decode(line, source), source, task_id=fallback)
            self._check_record_images(query)
            return query

        return self._iter_lines(path, parse)

    def iter_queries(self, split: str, task: str | None = None) -> Iterator[Query]:
        """Streams a task's queries, or with task=None every query file of the split (the
        union splits hold one file covering all tasks)."""
        paths = [self.query_path(split, task)] if task else self.query_files(split)
        for path in paths:
            yield from self.iter_query_file(path)

    def read_queries(self, split: str, task: str | None = None) -> list[Query]:
        """`iter_queries` as a list."""
        return list(self.iter_queries(split, task))

    def iter_candidates(self, path: str | os.PathLike) -> Iterator[Candidate]:
        """Streams the candidates of one pool file (relative to the root, or absolute)."""

        def parse(line: str, source: str) -> Candidate:
            candidate = parse_candidate(self._decode(line, source), source)
            self._check_record_images(candidate)
            return candidate

        return self._iter_lines(self.root / path, parse)

    def iter_local_pool(self, task: str, split: str = "test") -> Iterator[Candidate]:
        """Streams a task's own pool (see `local_pool_path`)."""
        return self.iter_candidates(self.local_pool_path(task, split))

    def read_pool(self, path: str | os.PathLike) -> dict[str, Candidate]:
        """A pool file as {did: Candidate}, in file order; a repeated did is a bad record."""
        pool: dict[str, Candidate] = {}
        for candidate in self.iter_candidates(path):
            if candidate.did in pool:
                error = ValueError(
                    f"{candidate.source}: did {candidate.did} already appeared "
                    f"at {pool[candidate.did].source}"
                )
                self._bad(self._relative(self.root / path), error)
                continue
            pool[candidate.did] = candidate
        return pool

    def read_qrels(self, split: str, task: str) -> dict[str, dict[str, int]]:
        """A task's qrels: {qid: {did: relevance}} from "qid 0 did relevance task_id" lines."""
        qrels: dict[str, dict[str, int]] = {}

        def parse(line: str, source: str) -> None:
            fields = line.split()
            if len(fields) != 5:
                raise ValueError(
                    f"{source}: {len(fields)} fields, expected 5 ('qid 0 did relevance task_id')"
                )
            qid, _, did, relevance, task_id = fields
            _dataset_id(qid, "qid", source)
            _dataset_id(did, "did", source)
            if not re.match(r"^-?\d+$", relevance):
                raise ValueError(f"{source}: relevance {relevance!r} is not an integer")
            if not task_id.isdigit() or int(task_id) not in TASK_MODALITIES:
                raise ValueError(
                    f"{source}: unknown task id {task_id!r}, expected one of "
                    f"{sorted(TASK_MODALITIES)}"
                )
            previous = qrels.get(qid, {}).get(did)
            if previous is not None and previous != int(relevance):
                raise ValueError(
                    f"{source}: ({qid}, {did}) has relevance {relevance}, but "
                    f"{previous} earlier in the file"
                )
            qrels.setdefault(qid, {})[did] = int(relevance)

        for _ in self._iter_lines(self.qrels_path(split, task), parse):
            pass
        return qrels

    # --- instructions and images --------------------------------------------------------------

    def instructions(self) -> Instructions:
        """The parsed instructions TSV (read once)."""
        if self._instructions is None:
            path = self.root / INSTRUCTIONS_FILE
            if not path.is_file():
                raise FileNotFoundError(f"no instructions file: expected {path}")
            self._instructions = Instructions.from_tsv(path, name=INSTRUCTIONS_FILE)
        return self._instructions

    def instruction_for(self, query: Query, mode: str = "fixed", seed: int = 0) -> str:
        """The instruction for a query (see `Instructions.instruction_for`)."""
        return self.instructions().instruction_for(query, mode, seed)

    def image_file(self, record: Query | Candidate) -> Path:
        """The checked file of a record's image: it must resolve (symlinks followed) inside the
        root and exist. ValueError names the record's file and line."""
        if record.image_path is None:
            raise ValueError(f"{record.source}: record has no image")
        path = self.root / record.image_path
        real = Path(os.path.realpath(path))
        if not real.is_relative_to(self._real_root):
            raise ValueError(
                f"{record.source}: image path {record.image_path!r} resolves to "
                f"{real}, outside the M-BEIR root {self._real_root}"
            )
        if not real.is_file():
            raise ValueError(
                f"{record.source}: image {record.image_path!r} does not exist under {self.root}"
            )
        return path
