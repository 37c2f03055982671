"""A ScaNN index over candidate embeddings that returns the candidates' own string ids.

Defaults follow the pool size: brute force below 20k vectors; asymmetric hashing (AH) plus
exact reordering below 100k; above that a k-means tree with about sqrt(n) leaves, a tenth of
them searched, then AH and exact reordering. On clustered, L2-normalised data these settings
give recall@10 >= 0.95 against exact search (tests/test_index.py); on unclustered data
recall can be much lower, so measure it (benchmarks/bench_index.py) before trusting them.

On disk an index is a directory:
  scann/               ScaNN's own `serialize` output (relative paths, so the directory moves)
  ids.npy              the string ids, fixed-width unicode, written and read without pickle
  index_metadata.json  scann version, n, dim, metric, normalisation, the builder settings
                       used, the caller's metadata (model, checkpoint step, prompt, ...), and
                       under "files" the size and blake2b hash of ids.npy and of every file in
                       scann/ (``jfe_jax.index.integrity``)
ScaNN's own doc-id support is a pickle; it is never written, and `load` refuses a directory
that has one rather than unpickle it.

`load` checks every recorded file's size and hash before ScaNN reads it (ScaNN reads its files
whole anyway; the hashing costs about a second per 1.4 GB): a modified ``ids.npy`` (which
would pair the old scores with other ids), a truncated or replaced searcher file, or a missing
one is refused with one line naming the file. Indexes written before the records (format 1)
are refused with a message to rebuild them: `jfe index build` remakes one from its export in
one command, and nothing else could tell a reordered ``ids.npy`` from the original.
"""

from __future__ import annotations

import dataclasses
import importlib.metadata
import json
import math
import os
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from jfe_jax.index import integrity
from jfe_jax.paths import absolute

METRICS = ("dot_product", "squared_l2")
MODES = ("auto", "brute_force", "ah", "tree_ah")
BRUTE_FORCE_BELOW = 20_000  # pool sizes under this are searched exactly
AH_BELOW = 100_000  # pool sizes under this get AH + reorder without a tree
DEFAULT_REORDER_K = 100
MAX_TREE_TRAINING_SAMPLE = 250_000

METADATA_FILE = "index_metadata.json"
IDS_FILE = "ids.npy"
SCANN_DIR = "scann"
FORMAT_VERSION = 2  # 2: file sizes and hashes under "files"
# Keys of the metadata file that `Index.load(expect=...)` checks before the user metadata.
_BUILTIN_KEYS = ("n", "dim", "metric", "normalized", "scann_version")


@dataclasses.dataclass(frozen=True)
class IndexSettings:
    """The ScaNN builder settings actually used; None where the mode does not use a field."""

    mode: str  # "brute_force" | "ah" | "tree_ah"
    metric: str  # "dot_product" | "squared_l2"
    num_leaves: int | None = None  # tree partitions
    num_leaves_to_search: int | None = None  # partitions visited per query
    training_sample_size: int | None = None  # vectors the tree's k-means trains on
    spherical: bool | None = None  # spherical k-means (dot product on normalised data)
    reorder_k: int | None = None  # AH candidates rescored exactly, per query (at least k)
    ah_dims_per_block: int | None = None  # dimensions per AH codebook block
    anisotropic_threshold: float | None = None  # AH anisotropic loss (dot product only)


def resolve_settings(
    n: int,
    *,
    metric: str = "dot_product",
    mode: str = "auto",
    normalized: bool = True,
    num_leaves: int | None = None,
    num_leaves_to_search: int | None = None,
    training_sample_size: int | None = None,
    reorder_k: int | None = None,
    ah_dims_per_block: int = 2,
    anisotropic_threshold: float | None = 0.2,
    spherical: bool | None = None,
) -> IndexSettings:
    """The settings `Index.build` uses for a pool of n vectors, overrides applied.

    Raises ValueError for an unknown metric or mode, and for a tree setting given while the
    mode (as resolved from n when mode="auto") does not build a tree.
    """
    if metric not in METRICS:
        raise ValueError(f"metric must be one of {METRICS}, got {metric!r}")
    if mode not in MODES:
        raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
    if mode == "auto":
        mode = "brute_force" if n < BRUTE_FORCE_BELOW else "ah" if n < AH_BELOW else "tree_ah"
    tree_values = (num_leaves, num_leaves_to_search, training_sample_size, spherical)
    tree_names = ("num_leaves", "num_leaves_to_search", "training_sample_size", "spherical")
    given = [name for name, value in zip(tree_names, tree_values) if value is not None]
    if mode != "tree_ah" and given:
        raise ValueError(
            f"{', '.join(given)} set, but mode is {mode!r} (n={n}), which builds no tree; "
            "pass mode='tree_ah' to use a tree"
        )
    if mode == "brute_force":
        if reorder_k is not None:
            raise ValueError("reorder_k set, but mode 'brute_force' scores exactly already")
        return IndexSettings(mode=mode, metric=metric)

    if metric != "dot_product":
        # Anisotropic quantisation weighs the error parallel to the datapoint, which only
        # matters for inner products.
        anisotropic_threshold = None
    if ah_dims_per_block < 1:
        raise ValueError(f"ah_dims_per_block must be >= 1, got {ah_dims_per_block}")
    reorder_k = min(DEFAULT_REORDER_K, n) if reorder_k is None else reorder_k
    if reorder_k < 1:
        raise ValueError(f"reorder_k must be >= 1, got {reorder_k}")
    settings = IndexSettings(
        mode=mode,
        metric=metric,
        reorder_k=reorder_k,
        ah_dims_per_block=ah_dims_per_block,
        anisotropic_threshold=anisotropic_threshold,
    )
    if mode == "ah":
        return settings
    return _tree_settings(
        settings,
        n,
        normalized=normalized,
        num_leaves=num_leaves,
        num_leaves_to_search=num_leaves_to_search,
        training_sample_size=training_sample_size,
        spherical=spherical,
    )


def _tree_settings(
    settings: IndexSettings,
    n: int,
    *,
    normalized: bool,
    num_leaves: int | None,
    num_leaves_to_search: int | None,
    training_sample_size: int | None,
    spherical: bool | None,
) -> IndexSettings:
    """``settings`` (AH, resolved) with the tree's: its defaults for n vectors, checked."""
    num_leaves = max(1, round(math.sqrt(n))) if num_leaves is None else num_leaves
    if not 1 <= num_leaves <= n:
        raise ValueError(f"num_leaves must be in [1, n={n}], got {num_leaves}")
    if num_leaves_to_search is None:
        num_leaves_to_search = max(1, math.ceil(num_leaves / 10))
    if not 1 <= num_leaves_to_search <= num_leaves:
        raise ValueError(
            f"num_leaves_to_search must be in [1, num_leaves={num_leaves}], "
            f"got {num_leaves_to_search}"
        )
    if training_sample_size is None:
        training_sample_size = min(n, MAX_TREE_TRAINING_SAMPLE)
    if not num_leaves <= training_sample_size <= n:
        raise ValueError(
            f"training_sample_size must be in [num_leaves={num_leaves}, n={n}], "
            f"got {training_sample_size}"
        )
    if spherical is None:
        # Spherical k-means matches cosine geometry: on normalised clustered data (100k x 256)
        # it took recall@10 from 0.81 to 0.97 at the same leaves searched (measured).
        spherical = normalized and settings.metric == "dot_product"
    return dataclasses.replace(
        settings,
        num_leaves=num_leaves,
        num_leaves_to_search=num_leaves_to_search,
        training_sample_size=training_sample_size,
        spherical=spherical,
    )


def _check_embeddings(embeddings: np.ndarray, what: str, dim: int | None = None) -> np.ndarray:
    """Returns a C-contiguous float32 [rows, dim] copy-or-view, or raises ValueError."""
    array = np.asarray(embeddings)
    if array.ndim != 2:
        raise ValueError(f"{what} must be 2-D [rows, dim], got shape {array.shape}")
    if dim is not None and array.shape[1] != dim:
        raise ValueError(f"{what} have dim {array.shape[1]}, but the index has dim {dim}")
    if not np.issubdtype(array.dtype, np.floating):
        raise ValueError(f"{what} must be floating point, got dtype {array.dtype}")
    array = np.ascontiguousarray(array, dtype=np.float32)
    finite = np.isfinite(array).all(axis=1)
    if not finite.all():
        bad = np.flatnonzero(~finite)
        raise ValueError(
            f"{what} row(s) {bad[:5].tolist()} contain NaN or inf "
            f"({bad.size} of {array.shape[0]} rows); expected finite values"
        )
    return array


def _check_ids(ids: Sequence[str], n: int) -> np.ndarray:
    """Returns the ids as a fixed-width unicode array, or raises ValueError."""
    if len(ids) != n:
        raise ValueError(f"got {len(ids)} ids for {n} embeddings; expected one id per row")
    for position, candidate_id in enumerate(ids):
        if not isinstance(candidate_id, str) or not candidate_id:
            raise ValueError(f"id {position} is {candidate_id!r}; expected a non-empty string")
    array = np.asarray(list(ids), dtype=np.str_)
    unique, counts = np.unique(array, return_counts=True)
    if unique.size != n:
        duplicates = unique[counts > 1]
        raise ValueError(
            f"{duplicates.size} duplicate id(s), e.g. {duplicates[:3].tolist()}; "
            "expected every id once"
        )
    # Fixed-width unicode drops trailing NULs; refuse ids that would not round-trip.
    if any(candidate_id.endswith("\x00") for candidate_id in ids):
        raise ValueError("an id ends with a NUL character, which ids.npy cannot store")
    return array


def _is_normalized(embeddings: np.ndarray) -> bool:
    norms = np.linalg.norm(embeddings, axis=1)
    return bool(np.all(np.abs(norms - 1.0) < 1e-3))


def _build_searcher(embeddings: np.ndarray, settings: IndexSettings):
    import scann  # imported here: a heavy C++ extension that only index users need

    builder = scann.scann_ops_pybind.builder(embeddings, 10, settings.metric)
    if settings.mode == "brute_force":
        return builder.score_brute_force().build()
    if settings.mode == "tree_ah":
        builder = builder.tree(
            settings.num_leaves,
            settings.num_leaves_to_search,
            training_sample_size=settings.training_sample_size,
            spherical=settings.spherical,
        )
    threshold = settings.anisotropic_threshold
    builder = builder.score_ah(
        settings.ah_dims_per_block,
        anisotropic_quantization_threshold=float("nan") if threshold is None else threshold,
    )
    return builder.reorder(settings.reorder_k).build()


class Index:
    """ScaNN searcher + the candidates' string ids + the metadata needed to trust a loaded one.

    Build with `Index.build`, or read one back with `Index.load`.
    """

    def __init__(self, searcher, ids: np.ndarray, metadata: dict[str, Any]):
        """Wraps parts that already agree; use `build` or `load` rather than this."""
        self._searcher = searcher
        self._ids = ids
        self._metadata = metadata
        self.settings = IndexSettings(**metadata["settings"])

    @classmethod
    def build(
        cls,
        embeddings: np.ndarray,
        ids: Sequence[str],
        *,
        metric: str = "dot_product",
        mode: str = "auto",
        num_leaves: int | None = None,
        num_leaves_to_search: int | None = None,
        training_sample_size: int | None = None,
        reorder_k: int | None = None,
        ah_dims_per_block: int = 2,
        anisotropic_threshold: float | None = 0.2,
        spherical: bool | None = None,
        metadata: dict | None = None,
    ) -> Index:
        """Builds an index over embeddings [n, dim] float32 whose row i has id ids[i].

        mode "auto" picks by pool size (see the module docstring); every setting can be
        overridden. `metadata` (JSON-serialisable; e.g. model name, checkpoint step, prompt)
        is saved with the index and checked by `Index.load(expect=...)`.
        Raises ValueError for NaN/inf embeddings, a wrong number of ids, duplicate ids,
        or settings that do not fit the pool.
        """
        embeddings = _check_embeddings(embeddings, "embeddings")
        n, dim = embeddings.shape
        if n == 0:
            raise ValueError("embeddings are empty; expected at least one row")
        id_array = _check_ids(ids, n)
        user_metadata = dict(metadata or {})
        try:
            json.dumps(user_metadata)
        except TypeError as error:
            raise ValueError(f"metadata must be JSON-serialisable: {error}") from error
        normalized = _is_normalized(embeddings)
        settings = resolve_settings(
            n,
            metric=metric,
            mode=mode,
            normalized=normalized,
            num_leaves=num_leaves,
            num_leaves_to_search=num_leaves_to_search,
            training_sample_size=training_sample_size,
            reorder_k=reorder_k,
            ah_dims_per_block=ah_dims_per_block,
            anisotropic_threshold=anisotropic_threshold,
            spherical=spherical,
        )
        searcher = _build_searcher(embeddings, settings)
        index_metadata = {
            "format_version": FORMAT_VERSION,
            "scann_version": importlib.metadata.version("scann"),
            "n": n,
            "dim": dim,
            "metric": settings.metric,
            "normalized": normalized,
            "settings": dataclasses.asdict(settings),
            "user": user_metadata,
        }
        return cls(searcher, id_array, index_metadata)

    # -- properties ---------------------------------------------------------------------------

    @property
    def size(self) -> int:
        """Number of candidates in the pool."""
        return self._metadata["n"]

    @property
    def dim(self) -> int:
        """Embedding dimension the index expects of queries."""
        return self._metadata["dim"]

    @property
    def ids(self) -> np.ndarray:
        """Candidate ids in row order (fixed-width unicode array)."""
        return self._ids

    @property
    def metadata(self) -> dict[str, Any]:
        """A copy of the index metadata (what `save` writes to index_metadata.json)."""
        return json.loads(json.dumps(self._metadata))

    # -- search -------------------------------------------------------------------------------

    def search_indices(self, queries: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        """Top k per query as (row indices int32 [Q, k], scores float32 [Q, k]), best first.

        Scores are dot products (higher is better) for metric "dot_product", squared L2
        distances (lower is better) for "squared_l2".
        """
        queries = _check_embeddings(queries, "queries", dim=self.dim)
        if not isinstance(k, int | np.integer) or not 1 <= k <= self.size:
            raise ValueError(f"k must be an integer in [1, pool size {self.size}], got {k!r}")
        if queries.shape[0] == 0:
            return np.empty((0, k), np.int32), np.empty((0, k), np.float32)
        # ScaNN reorders only `pre_reorder_num_neighbors` candidates; fewer than k would
        # leave slots empty.
        reorder = None if self.settings.reorder_k is None else max(self.settings.reorder_k, k)
        indices, scores = self._searcher.search_batched_parallel(
            queries, final_num_neighbors=k, pre_reorder_num_neighbors=reorder
        )
        # ScaNN fills slots it could not fill (the visited leaves held fewer than k points)
        # with row 0 and a NaN score; search those queries again over every leaf.
        short = np.flatnonzero(np.isnan(scores).any(axis=1))
        if short.size:
            retry_indices, retry_scores = self._searcher.search_batched(
                queries[short],
                final_num_neighbors=k,
                pre_reorder_num_neighbors=reorder,
                leaves_to_search=self.settings.num_leaves,
            )
            indices[short], scores[short] = retry_indices, retry_scores
            if np.isnan(scores).any():
                raise RuntimeError(f"ScaNN returned fewer than k={k} neighbours after a retry")
        return indices.astype(np.int32), scores.astype(np.float32)

    def search(self, queries: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        """Top k per query as (candidate ids, str array [Q, k]; scores float32 [Q, k])."""
        indices, scores = self.search_indices(queries, k)
        return self._ids[indices], scores

    # -- persistence --------------------------------------------------------------------------

    def save(self, directory: str | os.PathLike) -> None:
        """Writes the index to `directory` (created if needed; files there are overwritten)."""
        directory = absolute(directory)
        scann_dir = os.path.join(directory, SCANN_DIR)
        os.makedirs(scann_dir, exist_ok=True)
        # Relative asset paths, so the directory can be copied or moved as a whole.
        self._searcher.serialize(scann_dir, relative_path=True)
        np.save(os.path.join(directory, IDS_FILE), self._ids, allow_pickle=False)
        files = [f"{SCANN_DIR}/{name}" for name in integrity.files_under(scann_dir)]
        self._metadata["files"] = integrity.record_files(directory, [IDS_FILE, *files])
        # The metadata goes last: a directory without it is an interrupted save.
        with open(os.path.join(directory, METADATA_FILE), "w") as f:
            json.dump(self._metadata, f, indent=2, sort_keys=True)

    @classmethod
    def load(
        cls, directory: str | os.PathLike, *, expect: Mapping[str, Any] | None = None
    ) -> Index:
        """Reads an index written by `save`.

        `expect` maps metadata keys to required values: "n", "dim", "metric", "normalized",
        "scann_version", or any key of the metadata passed to `build` (e.g. "model",
        "checkpoint_step"). A missing key or a different value raises ValueError naming both,
        so an index built by another model or for another dimension is caught before search.
        Raises FileNotFoundError when a file of the index is missing, IntegrityError (a
        ValueError) when one is truncated or modified, ValueError for an index written before
        file hashes (rebuild it).
        """
        directory = absolute(directory)
        metadata_path = os.path.join(directory, METADATA_FILE)
        ids_path = os.path.join(directory, IDS_FILE)
        scann_dir = os.path.join(directory, SCANN_DIR)
        for path in (metadata_path, ids_path, os.path.join(scann_dir, "scann_assets.pbtxt")):
            if not os.path.isfile(path):
                raise FileNotFoundError(
                    f"{path} is missing; expected a directory written by Index.save"
                )
        if os.path.exists(os.path.join(scann_dir, "scann_docids.pkl")):
            raise ValueError(
                f"{scann_dir} holds scann_docids.pkl; refusing to unpickle it "
                "(Index.save keeps ids in ids.npy)"
            )
        with open(metadata_path) as f:
            metadata = json.load(f)
        rebuild = "rebuild the index from its export (jfe index build)"
        version = metadata.get("format_version")
        if version == 1:
            raise ValueError(
                f"index {directory} was built by an older jfe-jax (format 1, without file "
                f"hashes), so a modified ids.npy could not be caught; {rebuild}"
            )
        if version != FORMAT_VERSION:
            raise ValueError(
                f"{metadata_path} has format_version {version!r}; expected {FORMAT_VERSION}"
            )
        _check_expected(metadata, expect or {}, metadata_path)
        records = metadata.get("files") or {}
        for name in (IDS_FILE, f"{SCANN_DIR}/scann_assets.pbtxt"):
            if name not in records:
                raise integrity.IntegrityError(f"{metadata_path} records no {name}; {rebuild}")
        integrity.check_files(directory, records, rebuild=rebuild)
        ids = np.load(ids_path, allow_pickle=False)
        if ids.shape != (metadata["n"],):
            raise ValueError(f"{ids_path} holds {ids.shape} ids; metadata says n={metadata['n']}")

        import scann

        try:
            searcher = scann.scann_ops_pybind.load_searcher(scann_dir)
        except RuntimeError as error:  # its files matched their hashes: another ScaNN?
            cause = (str(error).strip().splitlines() or ["RuntimeError"])[-1]
            raise ValueError(
                f"ScaNN {importlib.metadata.version('scann')} cannot load {scann_dir} (written "
                f"by ScaNN {metadata.get('scann_version')}): {cause}; {rebuild}"
            ) from None
        if searcher.size() != metadata["n"]:
            raise ValueError(
                f"{scann_dir} holds {searcher.size()} vectors; metadata says n={metadata['n']}"
            )
        return cls(searcher, ids, metadata)


def _check_expected(metadata: dict[str, Any], expect: Mapping[str, Any], source: str) -> None:
    """Raises ValueError on the first expected key that is missing or differs."""
    for key, wanted in expect.items():
        if key in _BUILTIN_KEYS:
            found = metadata.get(key)
        elif key in metadata.get("user", {}):
            found = metadata["user"][key]
        else:
            raise ValueError(f"index has no metadata {key!r} (in {source}); expected {wanted!r}")
        if found != wanted:
            raise ValueError(
                f"index metadata {key!r} is {found!r} but {wanted!r} was expected "
                f"(in {source}): was this index built by another model or for another dim?"
            )
