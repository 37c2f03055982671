"""MIRe's model object: named sizes, checkpoints in and out, and how the query and document
embeddings are put together from the towers and the pooling."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from PIL import Image

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")
tokenizers = pytest.importorskip("tokenizers")

from jfe_jax.models.mire import maxsim  # noqa: E402
from jfe_jax.models.mire.model import (  # noqa: E402
    MIRe,
    MIReModel,
    get_mire_size,
    pooling_to_torch,
)

SPECIAL = ["[PAD]", "[unused0]", "[unused1]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]
QUERIES = ["what is the red bird on the fence?", "a dog, in rome"]
DOCS = ["the cardinal is a red bird.", "dogs of rome: a photo essay, with captions", "paris"]


@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory):
    trainer = tokenizers.BertWordPieceTokenizer(lowercase=True)
    trainer.train_from_iterator(QUERIES + DOCS, vocab_size=100, special_tokens=SPECIAL)
    directory = tmp_path_factory.mktemp("bert_tokenizer")
    trainer.save_model(str(directory))
    return transformers.BertTokenizerFast(vocab=str(directory / "vocab.txt"))


@pytest.fixture(scope="module")
def tiny(tokenizer):
    config = get_mire_size("mire-tiny")
    return MIRe.init(
        config.__class__(**{**config.__dict__, "query_maxlen": 12, "doc_maxlen": 16}), tokenizer
    )


def _images(n, seed=0):
    rng = np.random.default_rng(seed)
    return [Image.fromarray(rng.integers(0, 256, (40, 48, 3), dtype=np.uint8)) for _ in range(n)]


VIT_L14_336 = dict(
    hidden_size=1024,
    intermediate_size=4096,
    num_hidden_layers=24,
    num_attention_heads=16,
    image_size=336,
    patch_size=14,
)


@pytest.mark.parametrize(
    ("size", "clip", "pooling"),
    [("mire-base", {}, 14_704_512), ("mire-large", VIT_L14_336, 15_753_600)],
)
def test_paper_sizes_have_the_reference_parameter_counts(size, clip, pooling):
    with torch.device("meta"):
        bert = transformers.BertModel(transformers.BertConfig(), add_pooling_layer=False)
        vit = transformers.CLIPVisionModel(transformers.CLIPVisionConfig(**clip))
    want = sum(p.numel() for m in (bert, vit) for p in m.parameters()) + 768 * 128 + pooling
    c = get_mire_size(size)
    shapes = jax.eval_shape(
        MIReModel(c).init,
        jax.random.key(0),
        jnp.zeros((1, 4), jnp.int32),
        jnp.ones((1, 4), jnp.int32),
        jnp.zeros((1, 3, c.vision.image_size, c.vision.image_size)),
    )
    assert sum(int(np.prod(x.shape)) for x in jax.tree.leaves(shapes)) == want


def test_pooling_weights_carry_the_reference_module_names(tiny):
    names = pooling_to_torch(tiny.params["params"]["pooling"])
    heads, tokens, d, d_v = 2, 4, 128, 32
    assert {k: v.shape for k, v in names.items()} == {
        "proj.0.weight": (d_v,),
        "proj.0.bias": (d_v,),
        "proj.1.weight": (2 * heads * d, d_v),
        "proj.1.bias": (2 * heads * d,),
        "k_state.weight": (heads * d, 2 * heads * d),
        "v_state.weight": (heads * d, 2 * heads * d),
        "o_proj.0.weight": (d,),
        "o_proj.0.bias": (d,),
        "o_proj.1.weight": (d, d),
        "o_proj.1.bias": (d,),
        "split_mlp.0.weight": (tokens * d // 2, d_v),
        "split_mlp.0.bias": (tokens * d // 2,),
        "split_mlp.2.weight": (tokens * d, tokens * d // 2),
        "split_mlp.2.bias": (tokens * d,),
    }


def test_embeddings_are_put_together_as_mire_does(tiny):
    T, H = 4, 2  # mire-tiny's global and query-guided tokens
    text_only, text_mask = tiny.encode_queries(QUERIES)
    assert text_only.shape == (2, 12, 128) and text_mask.all()  # consistent: [MASK] kept
    vectors, mask = tiny.encode_queries(QUERIES, _images(2))
    assert vectors.shape == (2, T + H + 12, 128) and mask.shape == (2, T + H + 12)
    np.testing.assert_allclose(np.linalg.norm(vectors, axis=-1), 1.0, atol=1e-5)
    # The text part is the plain ColBERT query; the visual part is what alignment uses.
    np.testing.assert_allclose(vectors[:, T + H :], text_only, atol=1e-6)
    aligned, aligned_mask = tiny.encode_queries(QUERIES, _images(2), stage="alignment")
    assert aligned.shape == (2, T + H, 128) and aligned_mask.all()
    np.testing.assert_allclose(aligned, vectors[:, : T + H], atol=1e-6)
    # Another image changes the visual tokens only.
    other, _ = tiny.encode_queries(QUERIES, _images(2, seed=1))
    assert np.abs(other[:, : T + H] - vectors[:, : T + H]).max() > 1e-3
    np.testing.assert_allclose(other[:, T + H :], text_only, atol=1e-6)

    docs, doc_mask = tiny.encode_documents(DOCS)
    assert docs.shape[0] == 3 and not doc_mask.all()  # padding and punctuation masked
    np.testing.assert_array_equal(docs[doc_mask == 0], 0.0)
    with_images, mask_images = tiny.encode_documents(DOCS, _images(3))
    np.testing.assert_allclose(with_images[:, T + H :], docs, atol=1e-6)
    assert mask_images[:, : T + H].all()

    scores = tiny.score((vectors, mask), (with_images, mask_images), doc_chunk=2)
    want = maxsim(jnp.asarray(vectors), mask, jnp.asarray(with_images), mask_images)
    assert scores.shape == (2, 3)
    np.testing.assert_allclose(scores, np.asarray(want), atol=1e-5)


def test_save_and_from_pretrained_give_the_same_model(tiny, tmp_path):
    tiny.save_pretrained(str(tmp_path / "mire"))
    loaded = MIRe.from_pretrained(
        str(tmp_path / "mire" / "colbert"),
        str(tmp_path / "mire" / "clip"),
        str(tmp_path / "mire" / "pooling"),
        num_tokens=4,
        num_heads=2,
        query_maxlen=12,
        doc_maxlen=16,
    )
    jax.tree.map(np.testing.assert_array_equal, loaded.params, tiny.params)
    assert loaded.config == tiny.config
    a, b = tiny.encode_queries(QUERIES, _images(2)), loaded.encode_queries(QUERIES, _images(2))
    np.testing.assert_array_equal(a[0], b[0])
    # Transformers reads the towers back too.
    bert = transformers.BertModel.from_pretrained(str(tmp_path / "mire" / "colbert"))
    assert bert.config.hidden_size == 32
    vit = transformers.CLIPVisionModel.from_pretrained(str(tmp_path / "mire" / "clip"))
    assert vit.config.image_size == 32
    # ColBERTv2 as the authors publish it: pytorch_model.bin, read without running its pickle.
    colbert = tmp_path / "mire" / "colbert"
    from jfe_jax.models.mire import colbert_to_torch

    tensors = colbert_to_torch({"params": tiny.params["params"]["colbert"]})
    torch.save(
        {k: torch.from_numpy(v.copy()) for k, v in tensors.items()}, colbert / "pytorch_model.bin"
    )
    (colbert / "model.safetensors").unlink()
    from_bin = MIRe.from_pretrained(
        str(colbert), str(tmp_path / "mire" / "clip"), num_tokens=4, num_heads=2
    )
    jax.tree.map(
        np.testing.assert_array_equal,
        from_bin.params["params"]["colbert"],
        tiny.params["params"]["colbert"],
    )
    # Without pooling weights the pooling is fresh (stage 1 trains it).
    fresh = MIRe.from_pretrained(
        str(tmp_path / "mire" / "colbert"),
        str(tmp_path / "mire" / "clip"),
        num_tokens=4,
        num_heads=2,
    )
    jax.tree.map(
        np.testing.assert_array_equal, fresh.params["params"]["clip"], tiny.params["params"]["clip"]
    )


# A valid value other than MIReConfig()'s for every field, the towers' included (tiny, so the
# test is cheap). num_channels is the one exception: the image processor makes RGB.
NON_DEFAULT = {
    "text": dict(
        vocab_size=120,
        hidden_size=24,
        num_hidden_layers=1,
        num_attention_heads=3,
        intermediate_size=40,
        max_position_embeddings=48,
        type_vocab_size=3,
        layer_norm_eps=1e-6,
        pad_token_id=1,
        dim=16,
    ),
    "vision": dict(
        hidden_size=24,
        intermediate_size=40,
        num_hidden_layers=2,
        num_attention_heads=2,
        image_size=24,
        patch_size=12,
        layer_norm_eps=1e-6,
    ),
    "num_tokens": 3,
    "num_heads": 5,
    "query_maxlen": 10,
    "doc_maxlen": 20,
    "mask_mode": "reference_eval",
}
RGB_ONLY = {("vision", "num_channels")}


def _fields(config, prefix=()):
    """{(field, ...): value} of a config and its nested configs, every leaf field."""
    import dataclasses

    out = {}
    for f in dataclasses.fields(config):
        value = getattr(config, f.name)
        if dataclasses.is_dataclass(value):
            out.update(_fields(value, (*prefix, f.name)))
        else:
            out[(*prefix, f.name)] = value
    return out


def test_save_pretrained_keeps_every_config_field_and_the_scores(tokenizer, tmp_path):
    from jfe_jax.models.mire.model import BertConfig, CLIPVisionConfig, MIReConfig

    config = MIReConfig(
        **{
            **NON_DEFAULT,
            "text": BertConfig(**NON_DEFAULT["text"]),
            "vision": CLIPVisionConfig(**NON_DEFAULT["vision"]),
        }
    )
    default = _fields(MIReConfig())
    same = {name for name, value in _fields(config).items() if value == default[name]}
    assert same == RGB_ONLY, f"give these fields a non-default value in NON_DEFAULT: {same}"
    model = MIRe.init(config, tokenizer, seed=3)
    model.save_pretrained(str(tmp_path / "mire"))
    parts = [str(tmp_path / "mire" / part) for part in ("colbert", "clip", "pooling")]
    loaded = MIRe.from_pretrained(*parts)
    assert loaded.config == config
    jax.tree.map(np.testing.assert_array_equal, loaded.params, model.params)

    def scores(m):
        queries = m.encode_queries(QUERIES, _images(2))
        return m.score(queries, m.encode_documents(DOCS, _images(3)))

    np.testing.assert_array_equal(scores(loaded), scores(model))
    # A setting given that differs from the saved one is refused, not silently used.
    with pytest.raises(
        ValueError, match=r"given mask_mode='consistent' \(saved 'reference_eval'\)"
    ):
        MIRe.from_pretrained(*parts, mask_mode="consistent")


def test_orbax_checkpoint_round_trip_restores_into_shards(tiny, tmp_path):
    import flax.linen as nn
    from jax.sharding import Mesh, PartitionSpec

    from jfe_jax.models.axes import LOGICAL_RULES, MESH_AXES

    tiny.save_checkpoint(str(tmp_path / "ckpt"))
    restored = MIRe.from_checkpoint(str(tmp_path / "ckpt"))
    assert restored.config == tiny.config
    jax.tree.map(np.testing.assert_array_equal, restored.params, tiny.params)
    mesh = Mesh(np.array(jax.devices()).reshape(2, 2, 2), MESH_AXES)
    boxed = jax.eval_shape(
        MIReModel(tiny.config).init,
        jax.random.key(0),
        jnp.zeros((1, 4), jnp.int32),
        jnp.ones((1, 4), jnp.int32),
        jnp.zeros((1, 3, 32, 32)),
    )
    shardings = nn.logical_to_mesh_sharding(nn.get_partition_spec(boxed), mesh, LOGICAL_RULES)
    sharded = MIRe.from_checkpoint(str(tmp_path / "ckpt"), shardings=shardings)
    kernel = sharded.params["params"]["colbert"]["bert"]["encoder"]["layer_0"]["intermediate"]
    assert kernel["dense"]["kernel"].sharding.spec == PartitionSpec("fsdp", "tensor")
    jax.tree.map(np.testing.assert_array_equal, sharded.params, tiny.params)


def test_pooling_weights_that_do_not_fit_are_one_error_naming_them(tiny, tmp_path):
    from jfe_jax.models.mire import pooling_from_torch

    template = tiny.params["params"]["pooling"]
    state = pooling_to_torch(template)
    del state["k_state.weight"]
    state["o_proj.1.weight"] = np.zeros((3, 3), np.float32)
    state["gate.weight"] = np.zeros(2, np.float32)
    with pytest.raises(ValueError) as err:
        pooling_from_torch(state, template, source="mire.safetensors")
    message = str(err.value)
    assert message.startswith("mire.safetensors do not match MIRe's pooling")
    assert "missing k_state.weight" in message
    assert "mis-shaped o_proj.1.weight (3, 3)" in message
    assert "unused gate.weight" in message


def test_a_batch_mixing_text_only_and_image_items_scores_each_as_alone(tiny, tmp_path):
    image = tmp_path / "bird.png"
    _images(1)[0].save(image)
    other = _images(1, seed=1)[0]
    queries = tiny.encode_queries(QUERIES, [None, str(image)])
    docs = tiny.encode_documents(DOCS, [other, None, str(image)])
    alone_queries = [
        tiny.encode_queries(QUERIES[:1]),
        tiny.encode_queries(QUERIES[1:], [str(image)]),
    ]
    alone_docs = [
        tiny.encode_documents(DOCS[:1], [other]),
        tiny.encode_documents(DOCS[1:2]),
        tiny.encode_documents(DOCS[2:], [str(image)]),
    ]
    want = np.array([[tiny.score(q, d)[0, 0] for d in alone_docs] for q in alone_queries])
    np.testing.assert_allclose(tiny.score(queries, docs), want, rtol=1e-5, atol=1e-5)
    with pytest.raises(ValueError, match="embeds image queries only; query 0 has no image"):
        tiny.encode_queries(QUERIES, [None, str(image)], stage="alignment")


def test_bad_inputs_are_refused_naming_them(tiny, tmp_path):
    with pytest.raises(ValueError, match="unknown MIRe size 'mire-huge'"):
        get_mire_size("mire-huge")
    with pytest.raises(ValueError, match="config.json does not exist"):
        MIRe.from_pretrained(str(tmp_path / "nowhere"), str(tmp_path / "nowhere"))
    with pytest.raises(ValueError, match="2 query texts but 1 images"):
        tiny.encode_queries(QUERIES, _images(1))
    with pytest.raises(ValueError, match="stage='train'"):
        tiny.encode_queries(QUERIES, stage="train")


def test_readme_mire_block_runs_as_written(tokenizer, tmp_path, monkeypatch):
    """The README's MIRe code, unchanged, with the three checkpoints it names written by
    save_pretrained (tiny towers, the paper's 16 + 12 pooling tokens) and its photo."""
    import os
    import re
    import shutil

    readme = open(os.path.join(os.path.dirname(__file__), os.pardir, "README.md")).read()
    section = readme.split("\n## MIRe, the late-fusion counterpart", 1)[1].split("\n## ", 1)[0]
    (block,) = re.findall(r"```python\n(.*?)```", section, flags=re.S)
    monkeypatch.chdir(tmp_path)
    tiny = get_mire_size("mire-tiny")
    config = tiny.__class__(text=tiny.text, vision=tiny.vision)  # 16 global, 12 guided tokens
    MIRe.init(config, tokenizer).save_pretrained("saved")
    os.makedirs("models")
    for part, name in (("colbert", "colbertv2.0"), ("clip", "clip-vit-base-patch32")):
        shutil.move(f"saved/{part}", f"models/{name}")
    shutil.move("saved/pooling", "models/mire_pooling")
    os.makedirs("photos")
    _images(1)[0].save("photos/bird.jpg")

    namespace: dict = {}
    exec(compile(block, "README.md", "exec"), namespace)
    vectors, mask = namespace["queries"]
    assert vectors.shape == (1, 16 + 12 + 64, 128) and mask.shape == (1, 92)
    assert namespace["scores"].shape == (1, 2)
    assert os.path.isdir("exported/mire/pooling")
