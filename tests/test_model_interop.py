"""Checkpoint round trips, parameter counts of the named sizes, and errors on bad input."""

import dataclasses
import json
import os
import shutil

import jax
import numpy as np
import pytest

torch = pytest.importorskip("torch")

from hf_reference import build_hf_model, make_inputs, reference_hidden_states  # noqa: E402

from jfe_jax.encoder import Encoder, EncoderOptions  # noqa: E402
from jfe_jax.encoder_params import init_params  # noqa: E402
from jfe_jax.models.config import ModelConfig  # noqa: E402
from jfe_jax.models.safetensors_io import SafetensorsFile, save_checkpoint  # noqa: E402
from jfe_jax.models.sizes import get_size  # noqa: E402

ROWS = [[2, (4, 6), 3], [5], [1, (2, 2), 2, (4, 2), 1]]


@pytest.fixture(scope="module")
def hf_dir(tmp_path_factory):
    config = get_size("tiny")
    path = tmp_path_factory.mktemp("tiny_hf")
    build_hf_model(config, seed=1).save_pretrained(path)
    return str(path)


def _load_transformers(path):
    from transformers import Qwen2VLForConditionalGeneration

    model, info = Qwen2VLForConditionalGeneration.from_pretrained(path, output_loading_info=True)
    return model.float().eval(), info


def test_save_pretrained_loads_in_transformers_with_the_same_hidden_states(hf_dir, tmp_path):
    enc = Encoder.from_pretrained(hf_dir)
    out = tmp_path / "export"
    enc.save_pretrained(str(out))
    model, info = _load_transformers(str(out))
    assert not info["missing_keys"] and not info["unexpected_keys"] and not info["mismatched_keys"]
    ids, mask, pixels, grid = make_inputs(enc.config, ROWS, seed=7)
    ref = reference_hidden_states(model, ids, mask, pixels, grid)
    ours = enc.hidden_states(ids, mask, pixels, grid)
    real = mask.astype(bool)
    assert np.max(np.abs(ours[real] - ref[real])) <= 1e-4
    # and the exported directory reads back into the same params
    again = Encoder.from_pretrained(str(out))
    for a, b in zip(jax.tree_util.tree_leaves(enc.params), jax.tree_util.tree_leaves(again.params)):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


def test_untied_lm_head_round_trips(tmp_path):
    config = get_size("tiny").replace(tie_word_embeddings=False)
    src = tmp_path / "untied"
    build_hf_model(config, seed=2).save_pretrained(src)
    enc = Encoder.from_pretrained(str(src))
    assert "lm_head" in enc.params["text"]
    enc.save_pretrained(str(tmp_path / "out"))
    _, info = _load_transformers(str(tmp_path / "out"))
    assert not info["missing_keys"] and not info["unexpected_keys"]
    head = SafetensorsFile(str(tmp_path / "out" / "model.safetensors")).get("lm_head.weight")
    original = SafetensorsFile(str(src / "model.safetensors")).get("lm_head.weight")
    np.testing.assert_array_equal(head, original)


def test_lora_adapters_are_merged_on_export(hf_dir, tmp_path):
    enc = Encoder.from_pretrained(hf_dir, lora_rank=4, lora_alpha=8.0)
    layer = enc.params["text"]["layers_0"]
    assert layer["q_proj"]["lora_a"].shape == (64, 4)
    assert np.all(np.asarray(layer["q_proj"]["lora_b"]) == 0)  # fresh adapters change nothing
    base = Encoder.from_pretrained(hf_dir)
    ids, mask, pixels, grid = make_inputs(enc.config, ROWS, seed=8)
    np.testing.assert_allclose(
        enc.hidden_states(ids, mask, pixels, grid),
        base.hidden_states(ids, mask, pixels, grid),
        atol=1e-6,
    )
    # Give the adapters weight, then the merged export must reproduce the adapted model.
    rng = np.random.default_rng(0)
    params = jax.tree_util.tree_map_with_path(
        lambda path, x: (
            rng.normal(0, 0.05, x.shape).astype(np.float32) if path[-1].key == "lora_b" else x
        ),
        enc.params,
    )
    adapted = Encoder(enc.config, params, enc.options)
    ours = adapted.hidden_states(ids, mask, pixels, grid)
    assert np.max(np.abs(ours - base.hidden_states(ids, mask, pixels, grid))) > 1e-2
    adapted.save_pretrained(str(tmp_path / "merged"))
    model, info = _load_transformers(str(tmp_path / "merged"))
    assert not info["missing_keys"] and not info["unexpected_keys"]
    ref = reference_hidden_states(model, ids, mask, pixels, grid)
    real = mask.astype(bool)
    assert np.max(np.abs(ours[real] - ref[real])) <= 1e-4


def test_head_params_and_options_round_trip(hf_dir, tmp_path):
    options = EncoderOptions(projection_dim=16, temperature=0.1)
    enc = Encoder.from_pretrained(hf_dir, options)
    assert enc.params["projection"]["kernel"].shape == (64, 16)
    enc.save_pretrained(str(tmp_path / "proj"))
    again = Encoder.from_pretrained(str(tmp_path / "proj"))
    assert again.options.projection_dim == 16
    np.testing.assert_array_equal(
        np.asarray(enc.params["projection"]["kernel"]),
        np.asarray(again.params["projection"]["kernel"]),
    )
    np.testing.assert_allclose(float(again.params["logit_scale"]), np.log(10.0), rtol=1e-6)
    ids, mask, pixels, grid = make_inputs(enc.config, ROWS, seed=9)
    emb = again.embed(ids, mask, pixels, grid)
    assert emb.shape == (3, 16)
    np.testing.assert_allclose(np.linalg.norm(emb, axis=-1), 1.0, rtol=1e-5)


@pytest.mark.parametrize("size", ["2b", "7b"])
def test_named_size_parameter_count_equals_transformers(size):
    from transformers import Qwen2VLConfig, Qwen2VLForConditionalGeneration

    config = get_size(size)
    module = EncoderOptions().module(config)
    shapes = jax.eval_shape(lambda: init_params(module, jax.random.key(0)))
    ours = sum(
        int(np.prod(x.shape))
        for k in ("vision", "text")
        for x in jax.tree_util.tree_leaves(shapes[k])
    )
    with torch.device("meta"):
        reference = Qwen2VLForConditionalGeneration(Qwen2VLConfig.from_dict(config.to_hf_dict()))
    expected = sum(p.numel() for p in reference.parameters())
    assert ours == expected
    assert ours > (2.0e9 if size == "2b" else 8.0e9)


# ---------------------------------------------------------------------------- bad input


def _copy(hf_dir, tmp_path):
    dst = tmp_path / "ckpt"
    shutil.copytree(hf_dir, dst)
    return dst


def _rewrite(path, edit):
    st = SafetensorsFile(str(path / "model.safetensors"))
    tensors = {k: np.array(st.get(k)) for k in st.keys()}
    edit(tensors)
    os.remove(path / "model.safetensors")
    save_checkpoint(str(path), tensors)


def test_missing_extra_and_misshaped_tensors_are_all_named(hf_dir, tmp_path):
    path = _copy(hf_dir, tmp_path)

    def edit(t):
        del t["model.layers.1.mlp.up_proj.weight"]
        t["model.layers.7.mlp.up_proj.weight"] = np.zeros((4, 4), np.float32)
        t["visual.blocks.0.attn.qkv.bias"] = np.zeros((95,), np.float32)

    _rewrite(path, edit)
    with pytest.raises(ValueError) as err:
        Encoder.from_pretrained(str(path))
    message = str(err.value)
    assert "missing: model.layers.1.mlp.up_proj.weight" in message
    assert "unexpected: model.layers.7.mlp.up_proj.weight" in message
    assert "visual.blocks.0.attn.qkv.bias: [95] (expected [96])" in message


def test_unknown_model_type_is_rejected(hf_dir, tmp_path):
    path = _copy(hf_dir, tmp_path)
    config = json.loads((path / "config.json").read_text())
    config["model_type"] = "llava"
    (path / "config.json").write_text(json.dumps(config))
    with pytest.raises(ValueError, match="unsupported model_type 'llava'"):
        Encoder.from_pretrained(str(path))
    with pytest.raises(ValueError, match="has no config.json"):
        Encoder.from_pretrained(str(tmp_path))


def test_sharded_checkpoint_with_index_loads(hf_dir, tmp_path):
    enc = Encoder.from_pretrained(hf_dir)
    from jfe_jax.models.hf_io import save_hf_checkpoint

    host = jax.device_get(enc.params)
    out = tmp_path / "sharded"
    save_hf_checkpoint(
        str(out), {k: host[k] for k in ("vision", "text")}, enc.config, max_shard_bytes=200_000
    )
    assert (out / "model.safetensors.index.json").exists()
    assert len(list(out.glob("model-*.safetensors"))) > 1
    again = Encoder.from_pretrained(str(out))
    ids, mask, pixels, grid = make_inputs(enc.config, ROWS, seed=3)
    np.testing.assert_array_equal(
        again.hidden_states(ids, mask, pixels, grid), enc.hidden_states(ids, mask, pixels, grid)
    )


@pytest.fixture(scope="module")
def tiny_encoder():
    return Encoder.init(get_size("tiny"))


def test_patch_count_disagreeing_with_grid_is_rejected(tiny_encoder):
    ids, mask, pixels, grid = make_inputs(tiny_encoder.config, [[2, (4, 4), 2]])
    with pytest.raises(ValueError, match="pixel_values has 15 patches but image_grid_thw says 16"):
        tiny_encoder.embed(ids, mask, pixels[:-1], grid)


def test_more_images_than_image_pad_runs_is_rejected(tiny_encoder):
    ids, mask, pixels, grid = make_inputs(tiny_encoder.config, [[2, (4, 4), 2]])
    pixels2 = np.concatenate([pixels, pixels])
    grid2 = np.concatenate([grid, grid])
    with pytest.raises(ValueError, match="in 1 runs but 2 images were given"):
        tiny_encoder.embed(ids, mask, pixels2, grid2)


def test_run_length_disagreeing_with_grid_is_rejected(tiny_encoder):
    ids, mask, _, _ = make_inputs(tiny_encoder.config, [[2, (4, 4), 2]])
    bad_grid = np.array([[1, 4, 8]])
    bad_pixels = np.zeros((32, tiny_encoder.config.vision.patch_dim), np.float32)
    with pytest.raises(ValueError, match="has 4 tokens but image 0 .* needs 8"):
        tiny_encoder.embed(ids, mask, bad_pixels, bad_grid)


def test_token_ids_outside_the_vocabulary_are_rejected(tiny_encoder):
    ids = np.array([[1, 2, 600]])
    with pytest.raises(ValueError, match=r"input_ids\[0, 2\] = 600 is outside the vocabulary"):
        tiny_encoder.embed(ids)


def test_image_tokens_without_pixels_are_rejected(tiny_encoder):
    ids, mask, _, _ = make_inputs(tiny_encoder.config, [[2, (4, 4), 2]])
    with pytest.raises(ValueError, match="4 <|image_pad|> tokens in 1 runs but 0 images"):
        tiny_encoder.embed(ids, mask)


def test_invalid_config_numbers_are_rejected():
    config = get_size("tiny")
    bad_text = dataclasses.replace(config.text, mrope_section=(2, 2, 2))
    with pytest.raises(ValueError, match=r"mrope_section \[2, 2, 2\] must sum to head_dim/2 = 8"):
        config.replace(text=bad_text).validate()
    assert isinstance(config, ModelConfig)


def test_cli_convert_writes_bfloat16_that_transformers_loads(hf_dir, tmp_path, capsys):
    from jfe_jax.cli import main

    assert (
        main(["convert", "--src", hf_dir, "--dst", str(tmp_path / "bf16"), "--dtype", "bfloat16"])
        == 0
    )
    assert "backbone parameters in bfloat16" in capsys.readouterr().out
    st = SafetensorsFile(str(tmp_path / "bf16" / "model.safetensors"))
    assert str(st.get("model.norm.weight").dtype) == "bfloat16"
    _, info = _load_transformers(str(tmp_path / "bf16"))
    assert not info["missing_keys"] and not info["unexpected_keys"]
    assert main(["convert", "--src", str(tmp_path / "nothing"), "--dst", str(tmp_path / "x")]) == 2
    assert "is not a directory" in capsys.readouterr().err
