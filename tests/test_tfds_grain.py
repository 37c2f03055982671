"""TFDS builders (no TensorFlow) and the grain training pipeline, on a small synthetic M-BEIR."""

import collections
import dataclasses
import gc
import json
import re
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import grain.python as grain
import jax
import numpy as np
import orbax.checkpoint as ocp
import pytest

from jfe_jax.data.example_cache import CachedEncode, LazyRecords, example_nbytes
from jfe_jax.data.image_processor import ImageProcessor
from jfe_jax.data.loader import iterator_state, make_train_loader, restore_iterator
from jfe_jax.data.mbeir import MBEIR, TASK_MODALITIES, instruction_index
from jfe_jax.data.pipeline import ContrastiveBatcher, stable_key
from jfe_jax.data.synthetic import (
    IMAGE_CAPTIONS_FILE,
    TEXT_TRIPLES_FILE,
    SyntheticConfig,
    corpus_texts,
    generate,
)
from jfe_jax.data.tfds_builders import MbeirTrainPairs, PairData, build_dataset, load_source
from jfe_jax.data.tokenizer import build_tokenizer, load_tokenizer
from jfe_jax.models.sizes import get_size

BUCKETS = (64, 128, 256)
PATCHES = 64  # the largest synthetic image (112 x 112) is 8 x 8 patches
NEGATIVES = 3  # stored per example; the synthetic queries have 2


def _read_jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def _text(value) -> str:
    return value.decode() if isinstance(value, bytes) else value


@pytest.fixture(scope="module")
def bench(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("synthetic") / "mbeir"
    config = SyntheticConfig(
        train_queries_per_task=4,
        val_queries_per_task=1,
        test_queries_per_task=1,
        num_text_triples=24,
        num_image_captions=16,
    )
    generate(root, config, progress=False)
    return root


@pytest.fixture(scope="module")
def tokenizer_dir(bench, tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("tokenizer")
    build_tokenizer(list(corpus_texts(bench)), 512, save_dir=path)
    return path


@pytest.fixture(scope="module")
def tokenizer(tokenizer_dir):
    return load_tokenizer(tokenizer_dir)


@pytest.fixture(scope="module")
def sources(bench, tmp_path_factory) -> dict:
    data_dir = tmp_path_factory.mktemp("tfds")
    return {
        "mbeir": load_source(
            build_dataset(
                MbeirTrainPairs, data_dir, mbeir_root=str(bench), max_hard_negatives=NEGATIVES
            )
        ),
        "text_triples": load_source(
            build_dataset(PairData, data_dir, root=str(bench), kind="text_triples")
        ),
        # Through manual_dir, the other way of naming the input.
        "image_captions": load_source(
            build_dataset(PairData, data_dir, manual_dir=bench, kind="image_captions")
        ),
    }


def _batcher(tokenizer, kind: str, **options):
    defaults = {
        "mbeir": dict(
            num_hard_negatives=2, query_patch_budget=PATCHES, candidate_patch_budget=PATCHES
        ),
        "text_triples": dict(num_hard_negatives=1),
        "image_captions": dict(candidate_patch_budget=PATCHES),
    }[kind]
    return ContrastiveBatcher.from_options(
        tokenizer,
        ImageProcessor(max_pixels=112 * 112),
        get_size("tiny"),
        kind=kind,
        length_buckets=BUCKETS,
        **{**defaults, **options},
    )


def _assert_trees_equal(a, b):
    assert jax.tree_util.tree_structure(a) == jax.tree_util.tree_structure(b)
    for x, y in zip(jax.tree_util.tree_leaves(a), jax.tree_util.tree_leaves(b)):
        np.testing.assert_array_equal(np.asarray(x), np.asarray(y))


# ---------------------------------------------------------------------------------- builders


def test_mbeir_builder_examples_match_the_reader(bench, sources):
    reader = MBEIR(bench)
    queries = reader.read_queries("union_train")
    pool = reader.read_pool(reader.global_pool_path("train"))
    source = sources["mbeir"]
    examples = {_text(source[i]["example_id"]): source[i] for i in range(len(source))}
    expected = {f"{q.qid}|{d}|0": (q, d) for q in queries for d in q.pos_cand_list}
    assert len(source) == sum(len(q.pos_cand_list) for q in queries) == len(expected)
    assert set(examples) == set(expected)
    for example_id, (query, did) in expected.items():
        example = examples[example_id]
        assert _text(example["qid"]) == query.qid
        assert _text(example["query_text"]) == (query.text or "")
        assert _text(example["query_modality"]) == query.modality
        assert (example["task_id"], example["dataset_id"]) == (query.task_id, query.dataset_id)
        image = (bench / query.image_path).read_bytes() if query.image_path else b""
        assert example["query_image"] == image
        prompts = reader.instructions().prompts_for(
            query.dataset_id, query.modality, TASK_MODALITIES[query.task_id][1]
        )
        assert [_text(p) for p in example["instructions"]] == list(prompts)
        positive = pool[did]
        assert _text(example["positive_did"]) == did
        assert _text(example["positive_text"]) == (positive.text or "")
        assert example["positive_image"] == (
            (bench / positive.image_path).read_bytes() if positive.image_path else b""
        )
        negatives = query.neg_cand_list[:NEGATIVES]
        assert example["num_negatives"] == len(negatives) > 0
        assert [_text(d) for d in example["negative_dids"]] == (
            list(negatives) + [""] * (NEGATIVES - len(negatives))
        )
        for i, negative_did in enumerate(negatives):
            negative = pool[negative_did]
            assert _text(example["negative_texts"][i]) == (negative.text or "")
            assert example["negative_images"][i] == (
                (bench / negative.image_path).read_bytes() if negative.image_path else b""
            )
    modalities = {_text(e["query_modality"]) for e in examples.values()}
    assert modalities == {"text", "image", "image,text"}


def test_pair_builders_round_trip_the_jsonl_files(bench, sources):
    triples = _read_jsonl(bench / TEXT_TRIPLES_FILE)
    source = sources["text_triples"]
    got = {_text(source[i]["id"]): source[i] for i in range(len(source))}
    assert len(source) == len(triples) and set(got) == {t["id"] for t in triples}
    for triple in triples:
        for field in ("sentence", "positive", "hard_negative"):
            assert _text(got[triple["id"]][field]) == triple[field]
    captions = _read_jsonl(bench / IMAGE_CAPTIONS_FILE)
    source = sources["image_captions"]
    got = {_text(source[i]["id"]): source[i] for i in range(len(source))}
    assert len(source) == len(captions) and set(got) == {c["id"] for c in captions}
    for caption in captions:
        assert _text(got[caption["id"]]["caption"]) == caption["caption"]
        assert got[caption["id"]]["image"] == (bench / caption["image_path"]).read_bytes()


def test_builders_raise_on_bad_records_and_count_them_when_skipping(bench, tmp_path):
    root = tmp_path / "broken"
    shutil.copytree(bench, root)
    first = _read_jsonl(root / IMAGE_CAPTIONS_FILE)[0]
    (root / first["image_path"]).unlink()
    with open(root / "query/union_train/mbeir_union_up_train.jsonl", "a") as f:
        f.write(
            json.dumps(
                {
                    "qid": "9:9999",
                    "query_txt": "a red star",
                    "query_img_path": None,
                    "query_modality": "text",
                    "pos_cand_list": ["9:99999"],
                    "neg_cand_list": [],
                    "task_id": 0,
                }
            )
            + "\n"
        )
    with pytest.raises(ValueError, match=f"{first['id']}.*cannot read image"):
        build_dataset(PairData, tmp_path / "a", root=str(root), kind="image_captions")
    with pytest.raises(ValueError, match=r"9:9999 names candidates \['9:99999'\]"):
        build_dataset(MbeirTrainPairs, tmp_path / "b", mbeir_root=str(root))

    builder = build_dataset(
        PairData, tmp_path / "c", root=str(root), kind="image_captions", skip_bad_records=True
    )
    assert builder.info.metadata["skipped_records"] == {"image_captions.jsonl": 1}
    assert len(load_source(builder)) == len(_read_jsonl(bench / IMAGE_CAPTIONS_FILE)) - 1
    builder = build_dataset(
        MbeirTrainPairs, tmp_path / "d", mbeir_root=str(root), skip_bad_records=True
    )
    assert sum(builder.info.metadata["skipped_records"].values()) == 1
    # Reloaded from its directory, without the config, the counts are still there.
    reloaded = load_source(builder.data_path)
    assert reloaded.metadata["skipped_records"] == builder.info.metadata["skipped_records"]


NO_TENSORFLOW_SCRIPT = """
import importlib.abc, importlib.machinery, json, sys

attempts = []


class RefuseTensorFlow(importlib.abc.MetaPathFinder, importlib.abc.Loader):
    \"\"\"Every import of tensorflow fails here, installed or not, and is recorded. (find_spec
    probes still succeed: etils asks whether TensorFlow is installed without importing it.)\"\"\"

    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] == "tensorflow":
            return importlib.machinery.ModuleSpec(name, self)
        return None

    def create_module(self, spec):
        attempts.append(spec.name)
        raise ImportError(f"{spec.name} is refused in this test")

    def exec_module(self, module):
        raise AssertionError("unreachable")


sys.meta_path.insert(0, RefuseTensorFlow())

from jfe_jax.data.example_cache import CachedEncode, LazyRecords, example_nbytes
from jfe_jax.data.image_processor import ImageProcessor
from jfe_jax.data.loader import make_train_loader
from jfe_jax.data.pipeline import ContrastiveBatcher
from jfe_jax.data.tfds_builders import MbeirTrainPairs, PairData, build_dataset, load_source
from jfe_jax.data.tokenizer import load_tokenizer
from jfe_jax.models.sizes import get_size

import tensorflow_datasets.core.shuffle as tfds_shuffle
from jfe_jax.data import prepared

bench, data_dir, tokenizer_dir = sys.argv[1:]
tokenizer = load_tokenizer(tokenizer_dir)
# TFDS's shuffler keeps 1000 MiB in memory, then spills through tf.io.gfile. A limit of 1 KiB
# puts this small set over it, as 1.1M real M-BEIR pairs are over the real one.
tfds_shuffle.MAX_MEM_BUFFER_SIZE = 1024
prepared.RECORDS_PER_SHARD = 8  # several shards
tfds_error = None
try:  # TFDS's own writer, for contrast: it needs TensorFlow past the limit
    MbeirTrainPairs(data_dir=data_dir + "-tfds", config=MbeirTrainPairs.CONFIG_CLASS(
        mbeir_root=bench, max_hard_negatives=1)).download_and_prepare()
except ImportError as error:
    tfds_error = str(error)
tfds_attempts, attempts[:] = list(attempts), []
builder = build_dataset(MbeirTrainPairs, data_dir, mbeir_root=bench, max_hard_negatives=1)
build_dataset(PairData, data_dir, root=bench, kind="image_captions")
source = load_source(builder.data_path)
transform = ContrastiveBatcher.from_options(
    tokenizer, ImageProcessor(max_pixels=112 * 112), get_size("tiny"),
    query_patch_budget=64, candidate_patch_budget=64, num_hard_negatives=1)
batch = next(iter(make_train_loader(source, transform=transform, global_batch_size=4,
                                    shard_index=0, shard_count=1)))
loaded = [m for m, module in sys.modules.items()
          if m.split(".")[0] == "tensorflow" and module is not None]
print(json.dumps({"rows": len(batch.query_key), "loaded": loaded, "attempts": attempts,
                  "tfds_error": tfds_error, "tfds_attempts": tfds_attempts,
                  "examples": len(source), "shards": len(source.description["shards"])}))
"""


def test_a_build_over_tfds_memory_limit_needs_no_tensorflow(bench, tokenizer_dir, tmp_path):
    result = subprocess.run(
        [
            sys.executable,
            "-c",
            textwrap.dedent(NO_TENSORFLOW_SCRIPT),
            str(bench),
            str(tmp_path / "data"),
            str(tokenizer_dir),
        ],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    report = json.loads(result.stdout.strip().splitlines()[-1])
    assert report["rows"] == 4
    # TFDS's writer, over its (lowered) in-memory limit, stops for want of TensorFlow ...
    assert "tensorflow" in report["tfds_error"] and report["tfds_attempts"]
    # ... while build_dataset built (several shards), read and batched the same data with
    # TensorFlow unimportable; nothing even tried to import it.
    assert report["examples"] > 8 and report["shards"] > 1
    assert report["loaded"] == [] and report["attempts"] == []
    # This process too: the fixtures built and read every dataset without loading it.
    assert "tensorflow" not in sys.modules


# ------------------------------------------------------------------------------------ grain


def _example_id(record) -> bytes:
    return record["example_id"]


@pytest.mark.parametrize("shard_count", [2, 4])
def test_shards_are_disjoint_and_cover_every_record_once(sources, shard_count):
    source = sources["mbeir"]
    seen = []
    for shard_index in range(shard_count):
        loader = make_train_loader(
            source,
            transform=_example_id,
            global_batch_size=shard_count,
            shard_index=shard_index,
            shard_count=shard_count,
            seed=3,
            num_epochs=1,
            drop_remainder=False,
        )
        seen.append([i for batch in loader for i in batch.tolist()])
    counts = collections.Counter(i for shard in seen for i in shard)
    assert sorted(counts) == sorted(source[i]["example_id"] for i in range(len(source)))
    assert set(counts.values()) == {1}
    # With drop_remainder every host gets the same number of equal batches.
    lengths = set()
    for shard_index in range(shard_count):
        loader = make_train_loader(
            source,
            transform=_example_id,
            global_batch_size=shard_count,
            shard_index=shard_index,
            shard_count=shard_count,
            seed=3,
            num_epochs=1,
        )
        lengths.add(tuple(len(batch) for batch in loader))
    assert len(lengths) == 1 and set(next(iter(lengths))) == {1}


def test_global_batch_must_divide_by_the_shard_count(sources):
    with pytest.raises(
        ValueError, match="global_batch_size=6 must be a positive multiple of shard_count=4"
    ):
        make_train_loader(
            sources["mbeir"],
            transform=_example_id,
            global_batch_size=6,
            shard_index=0,
            shard_count=4,
        )


def _resume_check(source, transform, worker_count: int) -> None:
    def loader():
        return make_train_loader(
            source,
            transform=transform,
            global_batch_size=4,
            shard_index=1,
            shard_count=2,
            seed=5,
            worker_count=worker_count,
        )

    iterator = iter(loader())
    # A shard holds 18 (mbeir) or 12 (text triples) records, 2 per batch: the 4 batches after
    # the 8th cross the first epoch's end (mbeir) or lie in the second epoch (text triples).
    for _ in range(8):
        next(iterator)
    state = iterator_state(iterator)
    expected = [next(iterator) for _ in range(4)]
    resumed = restore_iterator(loader(), state)
    got = [next(resumed) for _ in range(4)]
    _assert_trees_equal(expected, got)
    assert len({batch.query_key.tobytes() for batch in got}) == 4
    del iterator, resumed, expected, got
    gc.collect()  # release the workers' shared-memory batches before the next test


def test_restored_iterator_reproduces_the_following_batches(tokenizer, sources):
    _resume_check(sources["mbeir"], _batcher(tokenizer, "mbeir"), worker_count=0)


@pytest.mark.slow
def test_restored_iterator_reproduces_the_following_batches_with_workers(tokenizer, sources):
    _resume_check(sources["text_triples"], _batcher(tokenizer, "text_triples"), worker_count=2)


def test_iterator_state_round_trips_through_orbax(tmp_path):
    source = [{"example_id": str(i).encode()} for i in range(40)]

    def loader():
        return make_train_loader(
            source, transform=_example_id, global_batch_size=4, shard_index=0, shard_count=1, seed=1
        )

    iterator = iter(loader())
    next(iterator)
    manager = ocp.CheckpointManager(tmp_path / "ckpt", item_names=("data",))
    manager.save(7, args=ocp.args.Composite(data=grain.PyGrainCheckpointSave(iterator)))
    manager.wait_until_finished()
    expected = [next(iterator) for _ in range(3)]
    resumed = iter(loader())
    manager.restore(7, args=ocp.args.Composite(data=grain.PyGrainCheckpointRestore(resumed)))
    _assert_trees_equal(expected, [next(resumed) for _ in range(3)])


# -------------------------------------------------------------------------------- transform


@pytest.mark.parametrize("kind,hard", [("mbeir", 2), ("text_triples", 1), ("image_captions", 0)])
def test_batches_have_static_shapes_within_the_buckets(tokenizer, sources, kind, hard):
    batcher = _batcher(tokenizer, kind)
    loader = make_train_loader(
        sources[kind],
        transform=batcher,
        global_batch_size=8,
        shard_index=0,
        shard_count=1,
        seed=0,
        num_epochs=1,
    )
    patch_dim = get_size("tiny").vision.patch_dim
    sides = {
        "query": (8, batcher.query_patch_budget),
        "candidate": (8, batcher.candidate_patch_budget),
    }
    if hard:
        sides["hard_negative"] = (8 * hard, batcher.candidate_patch_budget)
    for batch in loader:
        present = {f.name for f in dataclasses.fields(batch) if getattr(batch, f.name) is not None}
        assert present == set(sides) | {
            "query_key",
            "candidate_key",
            "hard_negative_key",
            "hard_negative_count",
            "skipped_records",
        }
        for side, (rows, patches) in sides.items():
            length = getattr(batch, side).input_ids.shape[1]
            assert length in BUCKETS
            assert getattr(batch, side).input_ids.shape == getattr(batch, side).attention_mask.shape
            assert getattr(batch, side).position_ids.shape == (rows, 3, length)
            if patches:
                assert getattr(batch, side).pixel_values.shape == (rows, patches, patch_dim)
                assert getattr(batch, side).patch_segment_ids.shape == (rows, patches)
            else:
                assert getattr(batch, side).pixel_values is None
        assert batch.hard_negative_key.shape == (8, hard)
        for key in ("query_key", "candidate_key", "hard_negative_count", "skipped_records"):
            assert getattr(batch, key).shape == (8,) and getattr(batch, key).dtype == np.int32
        assert (batch.query_key >= 0).all() and (batch.skipped_records == 0).all()


def _query_text(tokenizer, batch, row: int) -> str:
    ids = batch.query.input_ids[row][batch.query.attention_mask[row] > 0]
    return tokenizer.decode(ids, skip_special_tokens=True)


@pytest.mark.parametrize("mode", ["fixed", "seeded"])
def test_mbeir_queries_start_with_their_instruction(tokenizer, sources, mode):
    source = sources["mbeir"]
    records = [source[i] for i in range(8)]
    batch = _batcher(tokenizer, "mbeir", instruction_mode=mode, instruction_seed=4)(records)
    for row, record in enumerate(records):
        prompts = [_text(p) for p in record["instructions"]]
        chosen = prompts[instruction_index(_text(record["qid"]), len(prompts), mode, seed=4)]
        assert _query_text(tokenizer, batch, row).startswith(f"user\n{chosen} ")


def test_pair_queries_have_no_instruction(tokenizer, bench, sources):
    source = sources["text_triples"]
    records = [source[i] for i in range(8)]
    batch = _batcher(tokenizer, "text_triples")(records)
    prompts = [
        p
        for line in (bench / "instructions/query_instructions.tsv").read_text().splitlines()[1:]
        for p in line.split("\t")[4:]
    ]
    for row, record in enumerate(records):
        text = _query_text(tokenizer, batch, row)
        assert text.startswith(f"user\n{_text(record['sentence'])}\n")
        assert not any(prompt in text for prompt in prompts)


def test_keys_mark_repeated_candidates_and_filler_negatives(tokenizer, sources):
    source = sources["mbeir"]
    record = dict(next(source[i] for i in range(len(source)) if source[i]["num_negatives"] >= 2))
    lonely = dict(source[1], num_negatives=0)
    batcher = _batcher(tokenizer, "mbeir", num_hard_negatives=3)
    batch = batcher([record, dict(record), lonely])
    assert batch.candidate_key[0] == batch.candidate_key[1] != batch.candidate_key[2]
    assert batch.query_key[0] == stable_key("qid:" + _text(record["qid"]))
    # Two real negatives cycled into three slots; none at all: the positive (masked by key).
    keys = [stable_key("did:" + _text(d)) for d in record["negative_dids"][:2]]
    assert batch.hard_negative_key[0].tolist() == keys + keys[:1]
    assert batch.hard_negative_count.tolist() == [2, 2, 0]
    assert (batch.hard_negative_key[2] == batch.candidate_key[2]).all()
    assert batch.hard_negative.input_ids.shape[0] == 9


def _corrupt(record: dict) -> dict:
    return dict(record, positive_image=b"\x89PNG not really", positive_text=b"")


def test_bad_record_raises_naming_it(tokenizer, sources):
    source = sources["mbeir"]
    # Settings that do not fit the dataset are never skipped as bad records.
    too_many = _batcher(tokenizer, "mbeir", num_hard_negatives=NEGATIVES + 1, skip_bad_records=True)
    with pytest.raises(ValueError, match=f"stores at most {NEGATIVES} per query"):
        too_many.encode_or_skip(source[0])
    record = next(source[i] for i in range(len(source)) if source[i]["positive_image"])
    # The record's id and input line, and the image file (not just a record key).
    where = f"record {_text(record['example_id'])} ({_text(record['source'])}): positive image "
    with pytest.raises(
        ValueError,
        match=re.escape(f"{where}{_text(record['positive_image_path'])} is not a readable image"),
    ):
        _batcher(tokenizer, "mbeir").encode(_corrupt(record))
    with pytest.raises(ValueError, match="query image has .* patches but the patch budget is 0"):
        _batcher(tokenizer, "mbeir", query_patch_budget=0).encode(
            next(source[i] for i in range(len(source)) if source[i]["query_image"])
        )


def test_skipped_bad_records_are_counted_and_batches_stay_full(tokenizer, sources):
    source = sources["mbeir"]
    records = [source[i] for i in range(len(source)) if source[i]["positive_image"]][:10]
    records[2], records[5] = _corrupt(records[2]), _corrupt(records[5])
    batcher = _batcher(tokenizer, "mbeir", skip_bad_records=True)
    loader = make_train_loader(
        records,
        transform=batcher,
        global_batch_size=4,
        shard_index=0,
        shard_count=1,
        shuffle=False,
        num_epochs=1,
    )
    batches = list(loader)
    assert [len(b.query_key) for b in batches] == [4, 4]
    assert sum(int(b.skipped_records.sum()) for b in batches) == 2 == batcher.bad_records


# ---------------------------------------------------------------- cache (data.cache_examples_mb)


def _batches(source, batcher, count, **options):
    loader = make_train_loader(
        source, transform=batcher, global_batch_size=4, shard_index=0, shard_count=1, seed=7,
        **options,
    )  # fmt: skip
    iterator = iter(loader)
    return [next(iterator) for _ in range(count)]


def test_cached_batches_equal_uncached_ones_over_several_epochs(tokenizer, sources):
    source = sources["mbeir"]
    epochs = 3
    count = epochs * len(source) // 4
    expected = _batches(source, _batcher(tokenizer, "mbeir"), count)
    batcher = _batcher(tokenizer, "mbeir")
    calls = []
    encode = batcher.encode
    batcher.encode = lambda record: calls.append(1) or encode(record)
    got = _batches(source, batcher, count, cache_bytes=2**30)
    _assert_trees_equal(expected, got)
    assert len(calls) == len(source)  # each record encoded once in three epochs


def test_the_cache_encodes_each_record_once_and_stops_growing_at_its_limit(tokenizer, sources):
    source = sources["mbeir"]
    batcher = _batcher(tokenizer, "mbeir")
    refs = LazyRecords(source)
    sizes = [example_nbytes(batcher.encode(source[i])) for i in range(len(source))]
    assert min(sizes) > 0
    unlimited = CachedEncode(batcher, max_bytes=2**30)
    for _ in range(2):
        for i in range(len(source)):
            unlimited.map(refs[i])
    assert (unlimited.misses, unlimited.hits) == (len(source), len(source))
    # A limit of about three examples: the rest are encoded on every pass, and the outputs
    # equal the uncached encoding either way.
    small = CachedEncode(batcher, max_bytes=sum(sizes[:3]))
    for _ in range(2):
        for i in range(len(source)):
            _assert_trees_equal(
                batcher.collate([small.map(refs[i])]), batcher.collate([batcher.encode(source[i])])
            )
    assert small.cached_bytes <= sum(sizes[:3])
    assert 0 < small.hits <= 3 and small.hits + small.misses == 2 * len(source)


def test_bad_records_are_skipped_and_counted_on_every_pass(tokenizer, sources):
    source = sources["mbeir"]
    records = [source[i] for i in range(len(source)) if source[i]["positive_image"]][:10]
    records[2], records[5] = _corrupt(records[2]), _corrupt(records[5])
    batcher = _batcher(tokenizer, "mbeir", skip_bad_records=True)
    loader = make_train_loader(
        records, transform=batcher, global_batch_size=4, shard_index=0, shard_count=1,
        shuffle=False, num_epochs=3, cache_bytes=2**30,
    )  # fmt: skip
    batches = list(loader)
    assert [len(b.query_key) for b in batches] == [4, 4] * 3
    assert sum(int(b.skipped_records.sum()) for b in batches) == 6 == batcher.bad_records


def test_cache_settings_are_checked(tokenizer, sources):
    with pytest.raises(ValueError, match="cache_bytes=-1: expected >= 0"):
        _batches(sources["mbeir"], _batcher(tokenizer, "mbeir"), 1, cache_bytes=-1)
    with pytest.raises(ValueError, match="cache_bytes needs a ContrastiveBatcher"):
        _batches(sources["mbeir"], lambda record: record["example_id"], 1, cache_bytes=1)
    with pytest.raises(ValueError, match="max_bytes=0"):
        CachedEncode(_batcher(tokenizer, "mbeir"), 0)
