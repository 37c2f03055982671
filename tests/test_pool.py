"""Loading an export for exact search shard by shard (its peak host memory, its results), and
the size and hash checks of export shards and index files (issue 32 item 6, issue 38 item 2).
"""

import json
import logging
import os
import sys

import numpy as np
import pytest

from jfe_jax.cli import main
from jfe_jax.index.exact import ExactIndex, exact_search_numpy
from jfe_jax.index.export import load_embeddings
from jfe_jax.index.integrity import MANIFEST_FILE, IntegrityError
from jfe_jax.index.pool import load_exact_index, open_export
from jfe_jax.index.scann_index import Index

sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(__file__)), "benchmarks"))

from bench_pool_load import measure_exact_load, write_synthetic_export  # noqa: E402


@pytest.fixture(scope="module")
def small_export(tmp_path_factory):
    """1003 unit vectors of dim 16 in shards of 97: no shard boundary is a device boundary."""
    out = str(tmp_path_factory.mktemp("export") / "pool")
    write_synthetic_export(out, 1003, 16, shard_size=97, seed=1)
    return out


def _shard_rows(export: str) -> np.ndarray:
    names = sorted(n for n in os.listdir(export) if n.startswith("shard-"))
    return np.concatenate([np.load(os.path.join(export, n, "embeddings.npy")) for n in names])


def _error_line(capsys, command: str) -> str:
    lines = [line for line in capsys.readouterr().err.splitlines() if line.strip()]
    assert len(lines) == 1, lines
    assert lines[0].startswith(f"jfe {command}: error: "), lines
    return lines[0]


# -- streamed load ------------------------------------------------------------------------------


def test_streamed_exact_index_over_8_devices_matches_float64_numpy(small_export):
    rows = _shard_rows(small_export)
    embeddings, ids, meta = load_embeddings(small_export)
    np.testing.assert_array_equal(embeddings, rows)
    assert ids == [f"c{i}" for i in range(1003)] and meta["dim"] == 16
    queries = rows[[0, 96, 97, 500, 1002]] + 0.01
    want_rows, want_scores = exact_search_numpy(queries, rows, 7)
    index, index_ids, _ = load_exact_index(small_export)
    assert index_ids == ids and not index.streamed and index.placements == 1
    found_rows, found_scores = index.search(queries, 7)
    np.testing.assert_array_equal(found_rows, want_rows)
    np.testing.assert_allclose(found_scores, want_scores, rtol=0, atol=1e-6)
    # Too large for the devices: one unpadded host copy, placed in row blocks per search.
    streamed, _, _ = load_exact_index(small_export, max_bytes_per_device=30 * 16 * 4)
    assert streamed.streamed
    np.testing.assert_array_equal(streamed.search(queries, 7)[0], want_rows)


def test_reader_reads_any_row_range_across_shards(small_export):
    reader, rows = open_export(small_export), _shard_rows(small_export)
    out = np.empty((300, 16), np.float32)
    reader.read_rows(90, out)  # shards 0 to 4
    np.testing.assert_array_equal(out, rows[90:390])
    with pytest.raises(ValueError, match=r"rows \[900, 1200\) are outside"):
        reader.read_rows(900, out)


def test_streamed_load_and_exact_index_peak_host_memory_is_under_1_3x_the_pool(tmp_path):
    export = str(tmp_path / "pool")
    write_synthetic_export(export, 49_152, 1024, shard_size=4096)  # 201 MB
    measured = measure_exact_load(export, "new", devices=8)
    assert measured["pool_bytes"] == 49_152 * 1024 * 4
    # The devices' copies (host memory on CPU) plus one device's block and the ids.
    assert measured["peak_bytes"] < 1.3 * measured["pool_bytes"], measured


# -- export integrity ---------------------------------------------------------------------------


@pytest.fixture
def export_copy(small_export, tmp_path):
    import shutil

    return shutil.copytree(small_export, tmp_path / "pool")


def test_export_shard_with_reordered_ids_is_refused_naming_the_file(export_copy):
    path = export_copy / "shard-00003" / "ids.json"
    path.write_text(json.dumps(json.loads(path.read_text())[::-1]))
    with pytest.raises(IntegrityError, match=r"shard-00003/ids.json holds other bytes"):
        load_embeddings(str(export_copy))


def test_export_shard_with_modified_or_truncated_embeddings_is_refused(export_copy):
    path = export_copy / "shard-00005" / "embeddings.npy"
    data = bytearray(path.read_bytes())
    data[-4:] = np.float32(0.5).tobytes()  # same size, one value changed
    path.write_bytes(bytes(data))
    with pytest.raises(IntegrityError, match=r"shard-00005/embeddings.npy holds other bytes"):
        load_embeddings(str(export_copy))
    path.write_bytes(bytes(data[:-40]))
    # Sizes are checked even where the embeddings are not hashed (large exports).
    with pytest.raises(IntegrityError, match=r"embeddings.npy is \d+ bytes .*\(truncated\)"):
        open_export(str(export_copy), hash_embeddings=False)


def test_export_shards_without_manifests_are_read_with_size_checks(export_copy, caplog):
    want = load_embeddings(str(export_copy))[0]
    for name in os.listdir(export_copy):
        if name.startswith("shard-"):
            os.remove(export_copy / name / MANIFEST_FILE)
    with caplog.at_level(logging.WARNING, logger="jfe_jax.index.pool"):
        np.testing.assert_array_equal(load_embeddings(str(export_copy))[0], want)
    assert "written before shard manifests" in caplog.text
    path = export_copy / "shard-00002" / "embeddings.npy"
    path.write_bytes(path.read_bytes()[:-64])
    with pytest.raises(IntegrityError, match=r"header's shape \(97, 16\) needs \d+ \(truncated\)"):
        load_embeddings(str(export_copy))


# -- index integrity ----------------------------------------------------------------------------


@pytest.fixture
def built_index(small_export, tmp_path, capsys):
    """(index directory built by ``jfe index build`` from the small export, hits path)."""
    index = str(tmp_path / "index")
    assert main(["index", "build", "--embeddings", small_export, "--out", index]) == 0
    capsys.readouterr()
    return index, str(tmp_path / "hits.jsonl")


def test_index_with_reversed_ids_is_refused(built_index):
    index, _ = built_index
    path = os.path.join(index, "ids.npy")
    np.save(path, np.load(path)[::-1])
    with pytest.raises(IntegrityError, match=r"index/ids.npy holds other bytes"):
        Index.load(index)


def test_truncated_scann_file_is_one_line_exit_2_naming_it(built_index, small_export, capsys):
    index, hits = built_index
    search = ["index", "search", "--index", index, "--queries", small_export, "--out", hits]
    assert main(search) == 0
    capsys.readouterr()
    scann_dir = os.path.join(index, "scann")
    largest = max(os.listdir(scann_dir), key=lambda n: os.path.getsize(os.path.join(scann_dir, n)))
    path = os.path.join(scann_dir, largest)
    with open(path, "r+b") as f:
        f.truncate(os.path.getsize(path) // 2)
    assert main(search) == 2
    line = _error_line(capsys, "index")
    assert f"scann/{largest} is " in line and "(truncated)" in line and "rebuild the index" in line


def test_index_without_file_hashes_is_refused_with_a_rebuild_message(built_index):
    index, _ = built_index
    path = os.path.join(index, "index_metadata.json")
    with open(path) as f:
        meta = json.load(f)
    meta["format_version"] = 1
    del meta["files"]
    with open(path, "w") as f:
        json.dump(meta, f)
    with pytest.raises(ValueError, match=r"older jfe-jax \(format 1.*rebuild the index"):
        Index.load(index)


def test_exact_index_from_rows_reads_each_row_once_in_order():
    rows = np.arange(45 * 4, dtype=np.float32).reshape(45, 4)
    reads = []

    def read_rows(start, out):
        reads.append((start, out.shape[0]))
        out[...] = rows[start : start + out.shape[0]]

    index = ExactIndex.from_rows(read_rows, 45, 4)
    assert sum(count for _, count in reads) == 45
    assert [start for start, count in reads if count] == list(range(0, 45, 6))
    np.testing.assert_array_equal(index.search(rows[[44]], 1)[0], [[44]])
