"""Export of a pool over 8 devices: ids once each, embeddings as if encoded one by one."""

import json
import os
import shutil

import jax
import numpy as np
import pytest
from PIL import Image

from jfe_jax.data.tokenizer import build_tokenizer
from jfe_jax.encoder import Encoder
from jfe_jax.index.embedder import Item, ItemEmbedder
from jfe_jax.index.export import export_embeddings, load_embeddings
from jfe_jax.models.sizes import get_size
from jfe_jax.train.mesh import make_mesh

WORDS = "red green blue circle square triangle left right top bottom small large".split()


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("pool")
    rng = np.random.default_rng(0)
    texts = [" ".join(rng.choice(WORDS, size=rng.integers(2, 9))) for _ in range(200)]
    tokenizer = build_tokenizer(texts, 512, str(root / "tokenizer"))
    records = []
    for i in range(37):  # not divisible by 8 devices, nor by the batch or shard size
        image = None
        if i % 3:
            size = [(56, 56), (84, 56), (56, 112)][i % 3]
            pixels = rng.integers(0, 255, size=(size[1], size[0], 3), dtype=np.uint8)
            Image.fromarray(pixels).save(root / f"img{i}.png")
            image = f"img{i}.png"
        text = None if i % 5 == 0 and image else texts[i]
        records.append((f"9:{i}", Item(text=text, image=image)))
    encoder = Encoder.init(get_size("tiny"), seed=3)
    embedder = ItemEmbedder(
        encoder,
        tokenizer=tokenizer,
        batch_size=12,
        length_buckets=(128,),
        max_pixels=112 * 112,
        image_root=str(root),
    )
    return embedder, records, root


def test_pool_not_divisible_by_devices_exports_every_id_once_as_encoded_alone(setup, tmp_path):
    embedder, records, _ = setup
    assert jax.local_device_count() == 8 and embedder.batch_size == 16
    meta = export_embeddings(
        embedder, records, str(tmp_path / "out"), shard_size=10, progress=False
    )
    assert meta["num_shards"] == 4 and meta["total_items"] == 37
    embeddings, ids, metadata = load_embeddings(str(tmp_path / "out"))
    assert ids == [r[0] for r in records] and len(set(ids)) == 37
    assert metadata["dim"] == 64 and metadata["normalized"]
    for (record_id, item), row in zip(records, embeddings):
        alone = embedder.process(item)
        grid = alone.image_grid_thw
        single = embedder.encoder.embed(alone.input_ids[None], None, alone.pixel_values, grid)[0]
        np.testing.assert_allclose(row, single, atol=2e-5, err_msg=record_id)


def test_interrupted_export_resumes_and_missing_shards_are_named(setup, tmp_path):
    embedder, records, _ = setup
    out = str(tmp_path / "out")
    export_embeddings(embedder, records, out, shard_size=10, progress=False)
    first, _, _ = load_embeddings(out)
    shutil.rmtree(os.path.join(out, "shard-00002"))
    with pytest.raises(ValueError, match="missing shard shard-00002 of 4"):
        load_embeddings(out)
    meta = export_embeddings(embedder, records, out, shard_size=10, progress=False)
    assert meta["resumed_shards"] == [0, 1, 3]
    again, _, _ = load_embeddings(out)
    np.testing.assert_array_equal(first, again)


def test_export_split_over_two_hosts_covers_the_pool(setup, tmp_path):
    embedder, records, _ = setup
    out = str(tmp_path / "out")
    for host in (0, 1):
        export_embeddings(
            embedder,
            records,
            out,
            shard_size=8,
            process_index=host,
            process_count=2,
            progress=False,
        )
    with open(os.path.join(out, "metadata-host001.json")) as f:
        assert json.load(f)["shards"] == [1, 3]
    embeddings, ids, _ = load_embeddings(out)
    assert ids == [r[0] for r in records] and embeddings.shape == (37, 64)


def test_item_with_neither_text_nor_image_is_rejected(setup):
    embedder, _, _ = setup
    with pytest.raises(ValueError, match="neither text nor image"):
        embedder.embed([Item()])


def test_duplicate_ids_in_the_stream_are_rejected(setup, tmp_path):
    embedder, records, _ = setup
    with pytest.raises(ValueError, match="occurs twice"):
        export_embeddings(embedder, records[:3] + records[:1], str(tmp_path / "o"), progress=False)


def test_an_encoder_on_a_mesh_embeds_with_its_params_sharded_as_the_replicated_one(
    setup, monkeypatch
):
    embedder, records, root = setup
    mesh = make_mesh({"data": 2, "fsdp": 2, "tensor": 2})
    encoder = embedder.encoder
    sharded_encoder = Encoder(encoder.config, encoder.params, encoder.options, mesh=mesh)
    sharded = ItemEmbedder(
        sharded_encoder,
        tokenizer=embedder.tokenizer,
        batch_size=12,  # rounded up to the 4 row shards (data x fsdp): 12
        length_buckets=(128,),
        max_pixels=112 * 112,
        image_root=str(root),
    )
    assert sharded.batch_size == 12 and sharded.mesh is mesh
    leaves = jax.tree_util.tree_leaves(sharded._params)
    # No device holds the whole model: the embedder kept the FSDP/tensor shards.
    total = sum(leaf.nbytes for leaf in leaves)
    on_first = sum(
        shard.data.nbytes
        for leaf in leaves
        for shard in leaf.addressable_shards
        if shard.device == jax.devices()[0]
    )
    assert on_first < total / 2, (on_first, total)
    items = [embedder.process(item) for _, item in records[:12]]
    np.testing.assert_allclose(
        sharded.embed_processed(items), embedder.embed_processed(items), rtol=0, atol=1e-5
    )
    # A mesh over other processes' devices is refused, naming what to do instead.
    monkeypatch.setattr(jax, "process_index", lambda: 1)
    with pytest.raises(ValueError, match="spans several processes"):
        ItemEmbedder(sharded_encoder, tokenizer=embedder.tokenizer)
