"""Export at pool scale: items prepared by worker threads ahead of the device, batched by
length within a shard, images in vision rows of their own, written through ``etils.epath``."""

import json
import os

import numpy as np
import pytest
from etils.epath import backend as epath_backend
from fsspec.implementations.dirfs import DirFileSystem
from fsspec.implementations.local import LocalFileSystem
from PIL import Image

from jfe_jax.data.tokenizer import build_tokenizer
from jfe_jax.encoder import Encoder
from jfe_jax.index.embedder import Item, ItemEmbedder, StreamTiming
from jfe_jax.index.export import export_embeddings, load_embeddings
from jfe_jax.models.sizes import get_size

WORDS = "red green blue circle square triangle left right top bottom small large".split()


@pytest.fixture(scope="module")
def pool(tmp_path_factory):
    """A pool of text-only, image-only and image + text items of mixed lengths and sizes."""
    root = tmp_path_factory.mktemp("pool")
    rng = np.random.default_rng(1)
    texts = [" ".join(rng.choice(WORDS, size=rng.integers(2, 30))) for _ in range(60)]
    tokenizer = build_tokenizer(texts, 512, str(root / "tokenizer"))
    records = []
    for i in range(45):
        image = None
        if i % 3:
            width, height = [(56, 56), (112, 84), (56, 168)][i % 3]
            pixels = rng.integers(0, 255, size=(height, width, 3), dtype=np.uint8)
            Image.fromarray(pixels).save(root / f"img{i}.jpg")
            image = f"img{i}.jpg"
        text = None if i % 4 == 0 and image else texts[i]
        records.append((f"c{i}", Item(text=text, image=image)))
    encoder = Encoder.init(get_size("tiny"), seed=5)
    kw = dict(
        tokenizer=tokenizer,
        batch_size=8,
        length_buckets=(64, 128),
        max_pixels=168 * 168,
        image_root=str(root),
    )
    return encoder, kw, records, root


def _export(embedder, records, out, **kw):
    export_embeddings(embedder, records, str(out), shard_size=20, progress=False, **kw)
    return load_embeddings(str(out))


def test_export_with_workers_equals_export_in_line_bit_for_bit(pool, tmp_path):
    encoder, kw, records, _ = pool
    embedder = ItemEmbedder(encoder, **kw)
    timing = StreamTiming()
    threaded, ids, _ = _export(embedder, records, tmp_path / "w3", workers=3, timing=timing)
    in_line, in_line_ids, _ = _export(embedder, records, tmp_path / "w0", workers=0)
    assert ids == in_line_ids == [record_id for record_id, _ in records]
    np.testing.assert_array_equal(threaded, in_line)
    assert timing.items == 45 and 0 <= timing.host_wait_s <= timing.wall_s


def test_vision_packed_bucketed_export_equals_the_unpacked_stream_order_export(pool, tmp_path):
    encoder, kw, records, _ = pool
    packed = ItemEmbedder(encoder, **kw)
    unpacked = ItemEmbedder(encoder, pack_vision=False, **kw)
    assert packed.pack_vision and packed.item_format_hash == unpacked.item_format_hash
    new, _, new_meta = _export(packed, records, tmp_path / "new")
    old, _, old_meta = _export(unpacked, records, tmp_path / "old", workers=0, bucket_window=0)
    # Packing and bucketing change the batches, not the item format: the same identity.
    assert new_meta["item_format_hash"] == old_meta["item_format_hash"]
    np.testing.assert_allclose(new, old, rtol=0, atol=1e-5)
    assert not np.array_equal(new, old)  # the batches did change: this compares something


def test_a_failing_item_raises_its_own_error_from_a_worker(pool, tmp_path):
    encoder, kw, records, _ = pool
    embedder = ItemEmbedder(encoder, **kw)
    broken = list(records)
    broken[27] = ("c27", Item(text="red", image="missing.jpg"))
    for workers in (0, 2):
        with pytest.raises(FileNotFoundError, match="image file not found: .*missing.jpg"):
            export_embeddings(
                embedder,
                broken,
                str(tmp_path / f"o{workers}"),
                shard_size=20,
                progress=False,
                workers=workers,
            )
    # Shard 0 was complete before the failure: a rerun reuses it.
    meta = export_embeddings(
        embedder, records, str(tmp_path / "o2"), shard_size=20, progress=False, workers=2
    )
    assert meta["resumed_shards"] == [0] and meta["shards"] == [0, 1, 2]


class _LocalBucket(DirFileSystem):
    """``gs://bucket/...`` served from a local folder (fsspec, as gcsfs serves it for real)."""

    protocol = ("gs", "gcs")


def test_export_to_a_gs_location_writes_through_epath(pool, tmp_path, monkeypatch):
    encoder, kw, records, _ = pool
    embedder = ItemEmbedder(encoder, **kw)
    bucket = _LocalBucket(path=str(tmp_path / "bucket"), fs=LocalFileSystem())
    monkeypatch.setattr(epath_backend.fsspec_backend, "fs", lambda path: bucket)
    meta = export_embeddings(
        embedder, records[:30], "gs://pool-bucket/export", shard_size=20, progress=False
    )
    local = tmp_path / "bucket" / "pool-bucket" / "export"
    assert not os.path.exists("gs:")  # not a local folder named gs:
    assert sorted(os.listdir(local)) == ["metadata-host000.json", "shard-00000", "shard-00001"]
    embeddings, ids, _ = load_embeddings(str(local))
    assert ids == [record_id for record_id, _ in records[:30]] and embeddings.shape == (30, 64)
    assert json.loads((local / "metadata-host000.json").read_text()) == meta
    # An interrupted write on the store (a shard without its ids) is rebuilt, the rest reused.
    os.remove(local / "shard-00001" / "ids.json")
    again = export_embeddings(
        embedder, records[:30], "gs://pool-bucket/export", shard_size=20, progress=False
    )
    assert again["resumed_shards"] == [0] and again["shards"] == [0, 1]
    np.testing.assert_array_equal(load_embeddings(str(local))[0], embeddings)
