"""Training-data integrity: bad images fail the build (or are skipped and counted), a prepared
dataset is rebuilt when its sources change, and concurrent builds do not collide."""

import json
import logging
import os
import shutil
import struct
import threading
import zlib
from pathlib import Path

import pytest
from bench_fixtures import make_bench, small_synthetic

from jfe_jax.data import prepared_sources
from jfe_jax.data.image_processor import ImageProcessor
from jfe_jax.data.mbeir import MBEIR
from jfe_jax.data.pipeline import ContrastiveBatcher
from jfe_jax.data.synthetic import IMAGE_CAPTIONS_FILE
from jfe_jax.data.tfds_builders import MbeirTrainPairs, PairData, build_dataset, load_source
from jfe_jax.data.tokenizer import load_tokenizer
from jfe_jax.models.sizes import get_size

CONFIGS = Path(__file__).resolve().parent.parent / "configs"


@pytest.fixture(scope="module")
def bench(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("synthetic") / "data"
    counts = dict(train_queries_per_task=3, val_queries_per_task=1, test_queries_per_task=1)
    make_bench(root, small_synthetic(("mscoco_task0", "mscoco_task3"), **counts))
    return root


@pytest.fixture
def root(bench, tmp_path) -> Path:
    """A copy of the benchmark that a test may damage."""
    copy = tmp_path / "data"
    shutil.copytree(bench, copy)
    return copy


def _captions(root: Path) -> list[dict]:
    lines = (root / IMAGE_CAPTIONS_FILE).read_text().splitlines()
    return [json.loads(line) for line in lines if line.strip()]


def _truncate(path: Path) -> bytes:
    """Keeps the first half of an image file (its header still opens); returns the original."""
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    return data


def _write_bomb(path: Path) -> None:
    """A 60-byte PNG whose header claims 100000 x 100000 pixels."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        crc = struct.pack(">I", zlib.crc32(kind + data))
        return struct.pack(">I", len(data)) + kind + data + crc

    ihdr = struct.pack(">IIBBBBB", 100_000, 100_000, 8, 2, 0, 0, 0)
    body = chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"\0")) + chunk(b"IEND", b"")
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + body)


def _captions_dataset(root: Path, data_dir: Path, **config):
    return build_dataset(PairData, data_dir, root=str(root), kind="image_captions", **config)


def _text(value) -> str:
    return value.decode() if isinstance(value, bytes) else value


# ---------------------------------------------------------------------------------- bad images


def test_truncated_image_and_decompression_bomb_fail_the_build_naming_both_files(root, tmp_path):
    captions = _captions(root)
    truncated, bomb = root / captions[1]["image_path"], root / captions[3]["image_path"]
    _truncate(truncated)
    _write_bomb(bomb)
    assert bomb.stat().st_size < 100
    with pytest.raises(ValueError) as failure:
        _captions_dataset(root, tmp_path / "full", verify_images="full")
    message = str(failure.value)
    assert "\n" not in message
    assert message.startswith(
        "pair_data/image_captions: 2 bad records (skip_bad_records=True skips them): "
    )
    assert f"pairs/image_captions.jsonl:2: record {captions[1]['id']}: image {truncated}" in message
    assert "could not be decoded: image file is truncated" in message
    assert f"pairs/image_captions.jsonl:4: record {captions[3]['id']}: image {bomb}" in message
    assert "too large to decode safely" in message
    # The default checks headers only: the bomb is caught, the truncated data is not.
    with pytest.raises(ValueError, match=r"^pairs/image_captions\.jsonl:4: .*too large") as one:
        _captions_dataset(root, tmp_path / "header")
    assert str(truncated) not in str(one.value)
    # The ImageProcessor's cap applies, not only Pillow's own.
    with pytest.raises(ValueError, match=r"= \d+ pixels; expected at most max_image_pixels=3136"):
        _captions_dataset(root, tmp_path / "cap", max_image_pixels=56 * 56)
    # verify_images="none" copies the bytes unchecked (training then decodes them).
    _captions_dataset(root, tmp_path / "none", verify_images="none")


def test_bad_images_are_skipped_and_counted_with_skip_bad_records(root, tmp_path, caplog):
    captions = _captions(root)
    _truncate(root / captions[1]["image_path"])
    _write_bomb(root / captions[3]["image_path"])
    with caplog.at_level(logging.WARNING):
        builder = _captions_dataset(
            root, tmp_path / "tfds", verify_images="full", skip_bad_records=True
        )
    assert builder.info.metadata["skipped_bad_images"] == 2
    assert builder.info.metadata["skipped_records"] == {"image_captions.jsonl": 2}
    source = load_source(builder)
    kept = {_text(source[i]["id"]) for i in range(len(source))}
    assert kept == {c["id"] for c in captions} - {captions[1]["id"], captions[3]["id"]}
    assert "pair_data/image_captions: skipped 2 records with bad images" in caplog.text


def test_bad_pool_image_names_the_query_and_the_pool_line(root, tmp_path):
    reader = MBEIR(root)
    pool = reader.read_pool(reader.global_pool_path("train"))
    queries = reader.read_queries("union_train")
    query = next(q for q in queries if pool[q.pos_cand_list[0]].image_path)
    candidate = pool[query.pos_cand_list[0]]
    (root / candidate.image_path).write_bytes(b"not an image at all")
    with pytest.raises(ValueError) as failure:
        build_dataset(MbeirTrainPairs, tmp_path / "a", mbeir_root=str(root))
    expected = (
        f"{query.source}: query {query.qid}: candidate {candidate.did} ({candidate.source}): "
        f"image {root / candidate.image_path} is not a readable image"
    )
    assert expected in str(failure.value)
    builder = build_dataset(
        MbeirTrainPairs, tmp_path / "b", mbeir_root=str(root), skip_bad_records=True
    )
    # Every query that reads the image (as a positive or one of 4 hard negatives) is skipped.
    readers = [
        q
        for q in queries
        if candidate.did in q.pos_cand_list + q.neg_cand_list[:4]
        or q.image_path == candidate.image_path
    ]
    assert builder.info.metadata["skipped_bad_images"] == len(readers) > 0


def test_training_time_decode_error_names_the_image_file_and_its_record(root, tmp_path):
    # Truncated pixel data passes a header check; encoding the record then fails, naming both.
    captions = _captions(root)
    _truncate(root / captions[2]["image_path"])
    source = load_source(_captions_dataset(root, tmp_path / "tfds"))
    record = next(source[i] for i in range(len(source)) if source[i]["id"] == b"ic:2")
    batcher = ContrastiveBatcher.from_options(
        load_tokenizer(root / "tokenizer"),
        ImageProcessor(max_pixels=112 * 112),
        get_size("tiny"),
        kind="image_captions",
        candidate_patch_budget=64,
    )
    with pytest.raises(ValueError) as failure:
        batcher.encode(record)
    assert str(failure.value).startswith(
        f"record {captions[2]['id']} (pairs/image_captions.jsonl:3): positive image "
        f"{captions[2]['image_path']} could not be decoded: image file is truncated"
    )


# ---------------------------------------------------------------------------------- freshness


def test_changed_sources_rebuild_the_dataset_and_unchanged_ones_reuse_it(root, tmp_path, caplog):
    captions = _captions(root)
    image = root / captions[1]["image_path"]
    original = _truncate(image)
    data_dir = tmp_path / "tfds"
    options = dict(verify_images="full", skip_bad_records=True)
    assert len(load_source(_captions_dataset(root, data_dir, **options))) == len(captions) - 1

    with caplog.at_level(logging.INFO, logger="jfe_jax.data.prepare"):
        image.write_bytes(original)  # the fix
        builder = _captions_dataset(root, data_dir, **options)
        images = len({c["image_path"] for c in captions})
        assert f"of the {images} image file(s) read by the build, one or more changed" in (
            caplog.text
        )
        source = load_source(builder)
        assert len(source) == len(captions)
        assert builder.info.metadata["skipped_bad_images"] == 0
        fixed = next(source[i] for i in range(len(source)) if source[i]["id"] == b"ic:1")
        assert fixed["image"] == original

        caplog.clear()
        _captions_dataset(root, data_dir, **options)
        assert "rebuilding" not in caplog.text  # nothing changed: reused

        lines = (root / IMAGE_CAPTIONS_FILE).read_text().splitlines()
        lines[0] = json.dumps(dict(captions[0], caption="a caption written after the build"))
        (root / IMAGE_CAPTIONS_FILE).write_text("\n".join(lines) + "\n")
        source = load_source(_captions_dataset(root, data_dir, **options))
        assert "1 input file(s) changed" in caplog.text
        first = next(source[i] for i in range(len(source)) if source[i]["id"] == b"ic:0")
        assert _text(first["caption"]) == "a caption written after the build"

        caplog.clear()
        _captions_dataset(root, data_dir, verify_images="none", skip_bad_records=True)
        assert "its settings changed: verify_images 'full' -> 'none'" in caplog.text
    versions = list((data_dir / "pair_data" / "image_captions").iterdir())
    assert [v.name for v in versions] == [str(PairData.VERSION)]  # rebuilt in place


def test_sources_record_keeps_a_digest_of_the_images_and_stats_each_once(
    root, tmp_path, monkeypatch, caplog
):
    builder = build_dataset(MbeirTrainPairs, tmp_path / "tfds", mbeir_root=str(root))
    record_text = (Path(builder.data_path) / prepared_sources.SOURCES_FILE).read_text()
    record = json.loads(record_text)
    images = sorted(builder.source_images)
    assert record["images"] == {
        "count": len(images),
        "sha256": prepared_sources.images_digest(builder.source_images),
    }
    assert len(images) > 0 and not any(image in record_text for image in images)
    files = {os.fspath(path) for path in builder.input_files(root)}
    assert set(record["files"]) == files  # the few input files keep their own entries

    stats = []
    file_signature = prepared_sources.file_signature
    monkeypatch.setattr(
        prepared_sources, "file_signature", lambda path: stats.append(path) or file_signature(path)
    )
    with caplog.at_level(logging.INFO, logger="jfe_jax.data.prepare"):
        build_dataset(MbeirTrainPairs, tmp_path / "tfds", mbeir_root=str(root))
        assert "rebuilding" not in caplog.text
        assert sorted(stats) == sorted(os.path.join(root, image) for image in images)  # once each

        os.utime(root / images[0], ns=(0, 0))  # touched: same bytes, another mtime
        build_dataset(MbeirTrainPairs, tmp_path / "tfds", mbeir_root=str(root))
        assert f"of the {len(images)} image file(s) read by the build, one or more" in caplog.text


def test_two_concurrent_builds_on_one_directory_prepare_it_once(root, tmp_path, monkeypatch):
    generated = []
    examples = PairData.examples

    def counting(self, root):
        generated.append(self.builder_config.name)
        return examples(self, root)

    monkeypatch.setattr(PairData, "examples", counting)
    start = threading.Barrier(2)
    results, errors = [], []

    def build():
        start.wait()
        try:
            results.append(_captions_dataset(root, tmp_path / "tfds"))
        except Exception as error:  # noqa: BLE001 (reported by the assertion below)
            errors.append(error)

    threads = [threading.Thread(target=build) for _ in range(2)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert errors == [] and len(results) == 2
    assert generated == ["image_captions"]  # the second build waited, then reused
    assert results[0].data_path == results[1].data_path
    assert len(load_source(results[1])) == len(_captions(root))
    config_dir = tmp_path / "tfds" / "pair_data" / "image_captions"
    assert sorted(os.listdir(config_dir)) == [str(PairData.VERSION)]  # no leftover temp dirs


# ---------------------------------------------------------------------------------- command line


def test_jfe_train_on_a_corrupt_image_exits_2_with_one_line_naming_the_file(root, tmp_path, capsys):
    from jfe_jax.cli import main

    captions = _captions(root)
    bomb = root / captions[5]["image_path"]
    _write_bomb(bomb)
    code = main(
        [
            "train",
            "--config",
            str(CONFIGS / "stage1_demo.py"),
            "--workdir",
            str(tmp_path / "work"),
            f"--config.data.root={root}",
            "--config.data.global_batch_size=8",
            "--config.train.num_steps=1",
            "--config.optimizer.warmup_steps=0",
        ]
    )
    assert code == 2
    errors = [line for line in capsys.readouterr().err.splitlines() if "error:" in line]
    assert len(errors) == 1
    assert errors[0].startswith("jfe train: error: pairs/image_captions.jsonl:6: record ic:5: ")
    assert f"image {bomb} is too large to decode safely" in errors[0]
