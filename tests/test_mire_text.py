"""MIRe's ColBERT text tower against transformers' PyTorch BertModel + a linear head, on a tiny
random checkpoint built here, and its checkpoint name map both ways."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

from jfe_jax.models.mire.text import (  # noqa: E402
    BertConfig,
    ColBERTEncoder,
    colbert_from_torch,
    colbert_to_torch,
    token_vectors,
)

TOL = 1e-4  # float32 against float32 PyTorch, max |diff|


def _tiny_colbert(seed=0):
    torch.manual_seed(seed)
    hf = transformers.BertConfig(
        vocab_size=99,
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=4,
        intermediate_size=37,
        max_position_embeddings=40,
        type_vocab_size=2,
        layer_norm_eps=1e-12,
        hidden_act="gelu",
        attn_implementation="eager",
    )
    bert = transformers.BertModel(hf).eval()
    with torch.no_grad():  # LayerNorms away from (1, 0), so a wrong axis or eps shows
        for name, p in bert.named_parameters():
            if "LayerNorm" in name:
                p.add_(torch.randn_like(p) * 0.3)
    linear = torch.nn.Linear(32, 16, bias=False)
    state = {f"bert.{k}": v for k, v in bert.state_dict().items()}
    state["linear.weight"] = linear.weight.detach()
    return hf, bert, linear, state


@pytest.fixture(scope="module")
def tiny():
    return _tiny_colbert()


def _inputs():
    rng = np.random.default_rng(0)
    ids = rng.integers(1, 99, size=(3, 12)).astype(np.int64)
    mask = np.ones((3, 12), np.int64)
    mask[0, 7:] = 0
    mask[2, 10:] = 0
    ids[mask == 0] = 0
    types = np.zeros_like(ids)
    types[1, 6:] = 1
    return ids, mask, types


def test_token_vectors_equal_bert_and_the_linear_head_in_pytorch(tiny):
    hf, bert, linear, state = tiny
    config = BertConfig.from_hf(hf.to_dict(), dim=16)
    params = colbert_from_torch(state, config)
    ids, mask, types = _inputs()
    with torch.no_grad():
        hidden = bert(
            input_ids=torch.tensor(ids),
            attention_mask=torch.tensor(mask),
            token_type_ids=torch.tensor(types),
        ).last_hidden_state
        want = linear(hidden)
        want_unit = torch.nn.functional.normalize(want * torch.tensor(mask)[..., None], dim=-1)
    got = ColBERTEncoder(config).apply(
        params, jnp.asarray(ids), jnp.asarray(mask), jnp.asarray(types)
    )
    assert got.shape == (3, 12, 16)
    # Every position, padded ones included (BERT computes those too).
    assert np.abs(np.asarray(got) - want.numpy()).max() <= TOL
    unit = token_vectors(got, jnp.asarray(mask))
    assert np.abs(np.asarray(unit) - want_unit.numpy()).max() <= TOL
    np.testing.assert_array_equal(np.asarray(unit)[mask == 0], 0.0)


def test_checkpoint_round_trip_and_one_error_naming_every_problem(tiny):
    hf, _, _, state = tiny
    config = BertConfig.from_hf(hf.to_dict(), dim=16)
    params = colbert_from_torch(state, config)
    back = colbert_to_torch(params)
    ignored = {k for k in state if k.startswith("bert.pooler.") or k.endswith("_ids")}
    assert set(back) == set(state) - ignored
    for key, value in back.items():
        np.testing.assert_array_equal(value, state[key].numpy(), err_msg=key)

    broken = dict(state)
    del broken["bert.encoder.layer.1.output.dense.bias"]
    broken["linear.weight"] = torch.zeros(8, 32)
    broken["bert.encoder.layer.2.output.dense.bias"] = torch.zeros(32)
    with pytest.raises(ValueError) as err:
        colbert_from_torch(broken, config, source="ckpt/colbert")
    message = str(err.value)
    assert message.startswith("ckpt/colbert does not match a ColBERT of this config")
    assert "missing bert.encoder.layer.1.output.dense.bias" in message
    assert "mis-shaped linear.weight (8, 32) (expected (16, 32))" in message
    assert "unused bert.encoder.layer.2.output.dense.bias" in message


def test_bert_base_with_the_head_has_the_reference_parameter_count():
    hf = transformers.BertConfig()  # bert-base-uncased's architecture
    reference = transformers.BertModel(hf, add_pooling_layer=False)
    want = sum(p.numel() for p in reference.parameters()) + 768 * 128
    shapes = jax.eval_shape(
        ColBERTEncoder(BertConfig.from_hf(hf.to_dict())).init,
        jax.random.key(0),
        jnp.zeros((1, 4), jnp.int32),
        jnp.ones((1, 4), jnp.int32),
    )
    assert sum(int(np.prod(x.shape)) for x in jax.tree.leaves(shapes)) == want


def test_bad_configs_and_inputs_are_refused():
    with pytest.raises(ValueError, match="hidden_act='gelu_new'"):
        BertConfig.from_hf({"hidden_act": "gelu_new"})
    with pytest.raises(ValueError, match="not a multiple of num_attention_heads=5"):
        BertConfig(hidden_size=32, num_attention_heads=5)
    config = BertConfig(
        vocab_size=10,
        hidden_size=8,
        num_hidden_layers=1,
        num_attention_heads=2,
        intermediate_size=8,
        max_position_embeddings=4,
        dim=4,
    )
    ids = jnp.zeros((1, 6), jnp.int32)
    with pytest.raises(ValueError, match="sequence length 6 exceeds max_position_embeddings=4"):
        ColBERTEncoder(config).init(jax.random.key(0), ids, jnp.ones_like(ids))


def test_towers_jit_sharded_by_the_project_rules_equal_one_device():
    import flax.linen as nn
    from jax.sharding import Mesh, NamedSharding, PartitionSpec

    from jfe_jax.models.axes import LOGICAL_RULES, MESH_AXES
    from jfe_jax.models.mire import QueryGuidedAttentivePooling

    mesh = Mesh(np.array(jax.devices()).reshape(2, 2, 2), MESH_AXES)
    config = BertConfig(
        vocab_size=100,
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=4,
        intermediate_size=40,
        max_position_embeddings=16,
        dim=16,
    )
    ids, mask, _ = _inputs()
    ids, mask = np.concatenate([ids, ids[:1]])[:4], np.concatenate([mask, mask[:1]])[:4]
    rows = NamedSharding(mesh, PartitionSpec(("data", "fsdp")))

    def place(module, *args):
        boxed = module.init(jax.random.key(0), *args)
        shardings = nn.logical_to_mesh_sharding(nn.get_partition_spec(boxed), mesh, LOGICAL_RULES)
        return boxed, jax.device_put(nn.meta.unbox(boxed), shardings)

    encoder = ColBERTEncoder(config)
    _, params = place(encoder, ids, mask)
    kernel = params["params"]["bert"]["encoder"]["layer_0"]["intermediate"]["dense"]["kernel"]
    assert kernel.sharding.spec == PartitionSpec("fsdp", "tensor")  # really sharded
    with mesh, nn.logical_axis_rules(LOGICAL_RULES):
        text = jax.jit(encoder.apply)(params, jax.device_put(ids, rows), jax.device_put(mask, rows))
    one = encoder.apply(jax.device_get(params), ids, mask)
    np.testing.assert_allclose(np.asarray(text), np.asarray(one), rtol=0, atol=1e-5)

    pooling = QueryGuidedAttentivePooling(num_tokens=4, num_heads=2, out_dim=16)
    visual = np.random.default_rng(1).normal(size=(4, 5, 8)).astype(np.float32)
    _, pool_params = place(pooling, one, visual, mask)
    with mesh, nn.logical_axis_rules(LOGICAL_RULES):
        pooled = jax.jit(pooling.apply)(
            pool_params, jax.device_put(one, rows), jax.device_put(visual, rows), mask
        )
    want = pooling.apply(jax.device_get(pool_params), one, visual, mask)
    np.testing.assert_allclose(np.asarray(pooled), np.asarray(want), rtol=0, atol=1e-5)
