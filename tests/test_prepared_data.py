"""Prepared datasets at real-M-BEIR scale: TFDS's examples without TFDS's writer, images once
per data root in a shared store, parallel and multi-host builds."""

import json
import os
import shutil
import threading
from pathlib import Path

import numpy as np
import pytest

from jfe_jax.data import image_store as image_store_lib
from jfe_jax.data.image_store import ImageStore
from jfe_jax.data.synthetic import SyntheticConfig, generate
from jfe_jax.data.tfds_builders import (
    MbeirTrainPairs,
    PairData,
    PrepareTimeoutError,
    build_dataset,
    load_source,
)


@pytest.fixture(scope="module")
def bench(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("synthetic") / "mbeir"
    config = SyntheticConfig(
        train_queries_per_task=4,
        val_queries_per_task=1,
        test_queries_per_task=1,
        num_text_triples=12,
        num_image_captions=10,
    )
    generate(root, config, progress=False)
    return root


@pytest.fixture
def root(bench, tmp_path) -> Path:
    """A private copy of the benchmark (its default image store lives inside it)."""
    copy = tmp_path / "mbeir"
    shutil.copytree(bench, copy)
    return copy


def _key(record) -> bytes:
    return record["example_id"] if "example_id" in record else record["id"]


def _assert_same_records(a, b):
    """The two sources hold the same examples, field for field (in any order)."""
    assert len(a) == len(b) > 0
    by_key = {_key(b[i]): b[i] for i in range(len(b))}
    assert len(by_key) == len(b)
    for i in range(len(a)):
        x = a[i]
        y = by_key[_key(x)]
        assert sorted(x) == sorted(y)
        for field in x:
            u, v = x[field], y[field]
            assert type(u) is type(v), field
            if isinstance(u, np.ndarray):
                assert u.dtype == v.dtype and u.shape == v.shape and list(u) == list(v), field
            else:
                assert list(u) == list(v) if isinstance(u, list) else u == v, field


CONFIGS = [
    (MbeirTrainPairs, dict(max_hard_negatives=2)),
    (PairData, dict(kind="image_captions")),
    (PairData, dict(kind="text_triples")),
]


@pytest.mark.parametrize("builder_cls, config", CONFIGS, ids=["mbeir", "captions", "triples"])
def test_examples_equal_tfds_own_build_record_by_record(bench, tmp_path, builder_cls, config):
    field = builder_cls.ROOT_FIELD
    built = build_dataset(
        builder_cls, tmp_path / "new", image_store=tmp_path / "store", **{field: str(bench)},
        **config,
    )  # fmt: skip
    reference = builder_cls(
        data_dir=str(tmp_path / "tfds"),
        config=builder_cls.CONFIG_CLASS(**{field: str(bench)}, **config),
    )
    reference.download_and_prepare()  # TFDS's own writer: image bytes inside the examples
    ours, theirs = load_source(built), reference.as_data_source("train")
    _assert_same_records(ours, theirs)
    # In the same order, too: training reads the same batches as from TFDS's build.
    assert [_key(ours[i]) for i in range(len(ours))] == [
        _key(theirs[i]) for i in range(len(theirs))
    ]


def _captions(root: Path, data_dir: Path, **options):
    return build_dataset(PairData, data_dir, root=str(root), kind="image_captions", **options)


def test_two_workdirs_on_one_root_share_one_image_store_built_once(root, tmp_path):
    first = load_source(_captions(root, tmp_path / "run1" / "tfds"))
    second = load_source(_captions(root, tmp_path / "run2" / "tfds"))
    _assert_same_records(first, second)
    store = ImageStore(root / image_store_lib.STORE_DIR)
    assert first.store.directory == second.store.directory == store.directory
    assert store.stats() == {"ingestions": 1, "images_read": 10}
    # Both datasets read their images from the same segment files.
    refs = [
        json.loads(json.dumps(src._row(0)))  # the stored (unresolved) record
        for src in (first, second)
    ]
    assert refs[0] == refs[1]
    segments = sorted(n for n in os.listdir(store.directory) if n.endswith(".array_record"))
    inodes = {os.stat(os.path.join(store.directory, n)).st_ino for n in segments}
    assert len(inodes) == len(segments) >= 1
    # The records hold a reference to each image, not its bytes.
    field = first.names.index("image")
    assert [type(v) for v in first._row(0)[field]] == [str, str, int]


def test_a_changed_image_is_read_again_alone_and_its_dataset_rebuilt(root, tmp_path, caplog):
    _captions(root, tmp_path / "tfds")
    store = ImageStore(root / image_store_lib.STORE_DIR)
    first = json.loads((root / "pairs" / "image_captions.jsonl").read_text().splitlines()[0])
    changed = root / first["image_path"]
    other = sorted(p for p in store.catalog() if p != first["image_path"])[0]
    old_entry, old_other = store.catalog()[first["image_path"]], store.catalog()[other]
    shutil.copyfile(root / other, changed)  # other bytes, a new mtime
    caplog.set_level("INFO")
    source = load_source(_captions(root, tmp_path / "tfds"))
    assert "rebuilding the prepared dataset" in caplog.text
    assert store.stats() == {"ingestions": 2, "images_read": 11}  # 10, then the one changed
    catalog = store.catalog()
    assert catalog[first["image_path"]].sha256 != old_entry.sha256
    assert catalog[other] == old_other  # untouched
    images = {_key(source[i]).decode(): source[i]["image"] for i in range(len(source))}
    assert images[first["id"]] == changed.read_bytes()


def test_a_build_with_worker_processes_equals_one_in_process(root, tmp_path, monkeypatch):
    serial = _captions(root, tmp_path / "a", image_store=tmp_path / "s0", workers=0)
    parallel = _captions(root, tmp_path / "b", image_store=tmp_path / "s2", workers=2)
    # One segment open at a time: the reader closes and reopens them as it goes.
    monkeypatch.setattr(image_store_lib, "MAX_OPEN_SEGMENTS", 1)
    _assert_same_records(load_source(serial), load_source(parallel))
    # Two worker processes wrote their own segments.
    segments = [n for n in os.listdir(tmp_path / "s2") if n.endswith(".array_record")]
    assert len(segments) >= 2


def test_another_host_waits_on_the_filesystem_for_host_0(root, tmp_path):
    data_dir = tmp_path / "shared"
    waited = {}

    def host_1():
        waited["builder"] = _captions(root, data_dir, wait_for_host=0, wait_seconds=60)

    thread = threading.Thread(target=host_1)
    thread.start()
    built = _captions(root, data_dir)
    thread.join(timeout=60)
    assert not thread.is_alive()
    assert waited["builder"].data_path == built.data_path
    _assert_same_records(load_source(waited["builder"]), load_source(built))


def test_a_wait_that_outlasts_its_bound_names_the_dataset_and_what_to_check(root, tmp_path):
    with pytest.raises(PrepareTimeoutError, match=r"host 0 to prepare .*image_captions.*shares"):
        _captions(root, tmp_path / "nothing", wait_for_host=0, wait_seconds=0.3)


def test_a_text_file_named_png_fails_the_default_build_with_its_file_and_line(root, tmp_path):
    lines = (root / "pairs" / "image_captions.jsonl").read_text().splitlines()
    third = json.loads(lines[2])
    (root / third["image_path"]).write_text("this is a text file, not an image\n" * 20)
    with pytest.raises(ValueError, match=r"image_captions.jsonl:3: .*not a readable image"):
        _captions(root, tmp_path / "tfds")


def test_a_stage_without_hard_negatives_stores_no_negative_image(root, tmp_path):
    store_dir = tmp_path / "store"
    source = load_source(
        build_dataset(
            MbeirTrainPairs,
            tmp_path / "tfds",
            mbeir_root=str(root),
            max_hard_negatives=0,
            image_store=store_dir,
        )  # fmt: skip
    )
    read = {
        p
        for i in range(len(source))
        for p in (source[i]["query_image_path"], source[i]["positive_image_path"])
        if p
    }
    assert len(source[0]["negative_dids"]) == 0
    assert {p.decode() for p in read} == set(ImageStore(store_dir).catalog())


def test_hosts_other_than_0_wait_for_the_data_without_a_device_collective(
    root, tmp_path, monkeypatch
):
    from jax.experimental import multihost_utils

    from jfe_jax.train import data as train_data
    from jfe_jax.train.config_base import demo_stage2_config

    config = demo_stage2_config()
    config.data.root = str(root)
    config.data.tfds_dir = str(tmp_path / "tfds")
    host_0 = train_data._builders(config, config.data.tfds_dir, 112 * 112)  # builds
    calls = []
    monkeypatch.setattr(train_data.jax, "process_index", lambda: 1)
    monkeypatch.setattr(multihost_utils, "sync_global_devices", lambda *a: calls.append(a))
    monkeypatch.setattr(train_data, "build_dataset", _recording(train_data.build_dataset, calls))
    host_1 = train_data._builders(config, config.data.tfds_dir, 112 * 112)
    assert [c for c in calls if not isinstance(c, dict)] == []  # no device barrier
    assert [c["wait_for_host"] for c in calls] == [0] * len(host_0)
    assert {k: b.data_path for k, b in host_1.items()} == {
        k: b.data_path for k, b in host_0.items()
    }


def _recording(function, calls):
    def recorded(*args, **kwargs):
        calls.append(kwargs)
        return function(*args, **kwargs)

    return recorded


def test_a_text_file_named_png_fails_the_default_stage_2_build_with_its_file_and_line(
    root, tmp_path
):
    query_file = root / "query" / "union_train" / "mbeir_union_up_train.jsonl"
    lines = query_file.read_text().splitlines()
    number, query = next(
        (n, q) for n, q in enumerate(map(json.loads, lines), 1) if q.get("query_img_path")
    )
    (root / query["query_img_path"]).write_text("a text file renamed to .png\n")
    with pytest.raises(
        ValueError, match=rf"mbeir_union_up_train.jsonl:{number}: query .*not a readable image"
    ):
        build_dataset(MbeirTrainPairs, tmp_path / "tfds", mbeir_root=str(root))


def test_a_build_writes_nothing_to_stdout(root, tmp_path, capfd):
    build_dataset(MbeirTrainPairs, tmp_path / "tfds", mbeir_root=str(root))
    _captions(root, tmp_path / "tfds")
    assert capfd.readouterr().out == ""  # TFDS's "Downloading and preparing ..." is gone


def test_an_image_removed_after_it_was_stored_is_reported_missing(root, tmp_path):
    _captions(root, tmp_path / "a")  # stores every image
    first = json.loads((root / "pairs" / "image_captions.jsonl").read_text().splitlines()[0])
    (root / first["image_path"]).unlink()
    with pytest.raises(ValueError, match=rf"{first['id']}.*cannot read image"):
        _captions(root, tmp_path / "b")
