"""MIRe's CLIP vision tower and image processor against transformers' CLIPVisionModel and
CLIPImageProcessor, on a tiny random checkpoint built here."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from PIL import Image

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

from jfe_jax.models.mire.vision import (  # noqa: E402
    CLIPImageProcessor,
    CLIPVision,
    CLIPVisionConfig,
    clip_from_torch,
    clip_to_torch,
    mire_visual_features,
)

TOL = 1e-4  # the tower: float32 against float32 PyTorch, max |diff|
PIXEL_TOL = 1e-5  # the processor against CLIPImageProcessor


@pytest.fixture(scope="module")
def tiny():
    torch.manual_seed(0)
    hf = transformers.CLIPVisionConfig(
        hidden_size=32,
        intermediate_size=37,
        num_hidden_layers=3,
        num_attention_heads=4,
        image_size=32,
        patch_size=8,
        hidden_act="quick_gelu",
        attn_implementation="eager",
    )
    model = transformers.CLIPVisionModel(hf).eval()
    with torch.no_grad():  # LayerNorms away from (1, 0), so a wrong axis or eps shows
        for name, p in model.named_parameters():
            if "layer_norm" in name or "layrnorm" in name or "layernorm" in name:
                p.add_(torch.randn_like(p) * 0.3)
    return hf, model


def _images():
    rng = np.random.default_rng(0)
    # width x height: square, wide, tall; 45 x 37 resizes its long side to 38.9, truncated to 38
    sizes = [(32, 32), (50, 40), (33, 64), (100, 31), (45, 37)]
    return [Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)) for w, h in sizes]


def test_processor_reads_paths_as_the_images_they_hold(tmp_path):
    image = _images()[1]
    image.save(tmp_path / "a.png")
    ours = CLIPImageProcessor(size=32, crop_size=32)
    np.testing.assert_array_equal(ours([str(tmp_path / "a.png")]), ours([image]))
    with pytest.raises(FileNotFoundError):
        ours([str(tmp_path / "missing.png")])


def test_processor_equals_clip_image_processor_for_several_sizes():
    reference = transformers.CLIPImageProcessorPil(
        size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32}
    )
    ours = CLIPImageProcessor(size=32, crop_size=32)
    for image in _images() + [_images()[1].convert("L"), _images()[2].convert("RGBA")]:
        want = reference(images=image, return_tensors="np")["pixel_values"]
        got = ours([image])
        assert got.shape == want.shape == (1, 3, 32, 32)
        assert np.abs(got - want).max() <= PIXEL_TOL, image.size


def test_hidden_states_and_mire_features_equal_clip_vision_model(tiny):
    hf, model = tiny
    config = CLIPVisionConfig.from_hf(hf.to_dict())
    params = clip_from_torch(model.state_dict(), config)
    pixels = CLIPImageProcessor(size=32, crop_size=32)(_images())
    with torch.no_grad():
        out = model(pixel_values=torch.tensor(pixels), output_hidden_states=True)
    states, pooled = CLIPVision(config).apply(params, jnp.asarray(pixels))
    assert states.shape == (4, 5, 17, 32)
    for i, want in enumerate(out.hidden_states):
        assert np.abs(np.asarray(states[i]) - want.numpy()).max() <= TOL, i
    assert np.abs(np.asarray(pooled) - out.pooler_output.numpy()).max() <= TOL
    features = np.asarray(mire_visual_features(states))
    want = torch.cat([out.hidden_states[-1][:, :1], out.hidden_states[-2][:, 1:]], dim=1)
    assert np.abs(features - want.numpy()).max() <= TOL


def test_checkpoint_round_trip_clip_model_layout_and_one_error(tiny):
    hf, model = tiny
    config = CLIPVisionConfig.from_hf(hf.to_dict())
    state = model.state_dict()
    params = clip_from_torch(state, config)
    back = clip_to_torch(params)
    assert set(back) == {k for k in state if not k.endswith("position_ids")}
    for key, value in back.items():
        np.testing.assert_array_equal(value, state[key].numpy(), err_msg=key)
    # A whole CLIPModel's names: vision_model.*, its text tower and projections left out.
    full = clip_to_torch(params, prefix="vision_model.")
    full["text_model.embeddings.token_embedding.weight"] = np.zeros((5, 4))
    full["visual_projection.weight"] = np.zeros((4, 32))
    full["logit_scale"] = np.zeros(())
    jax.tree.map(np.testing.assert_array_equal, clip_from_torch(full, config), params)

    broken = dict(state)
    del broken["encoder.layers.2.mlp.fc1.bias"]
    broken["embeddings.patch_embedding.weight"] = torch.zeros(32, 3, 4, 4)
    broken["encoder.layers.3.mlp.fc1.bias"] = torch.zeros(37)
    with pytest.raises(ValueError) as err:
        clip_from_torch(broken, config, source="ckpt/clip")
    message = str(err.value)
    assert message.startswith("ckpt/clip does not match a CLIP vision tower of this config")
    assert "missing encoder.layers.2.mlp.fc1.bias" in message
    assert (
        "mis-shaped embeddings.patch_embedding.weight (32, 3, 4, 4) "
        "(expected (32, 3, 8, 8))" in message
    )
    assert "unused encoder.layers.3.mlp.fc1.bias" in message


def test_vit_b32_and_l14_336_have_the_reference_parameter_counts():
    for hf in (
        transformers.CLIPVisionConfig(),  # ViT-B/32
        transformers.CLIPVisionConfig(
            hidden_size=1024,
            intermediate_size=4096,
            num_hidden_layers=24,
            num_attention_heads=16,
            image_size=336,
            patch_size=14,
        ),
    ):
        with torch.device("meta"):
            want = sum(p.numel() for p in transformers.CLIPVisionModel(hf).parameters())
        config = CLIPVisionConfig.from_hf(hf.to_dict())
        shapes = jax.eval_shape(
            CLIPVision(config).init,
            jax.random.key(0),
            jnp.zeros((1, 3, config.image_size, config.image_size)),
        )
        assert sum(int(np.prod(x.shape)) for x in jax.tree.leaves(shapes)) == want


def test_bad_inputs_are_refused():
    with pytest.raises(ValueError, match="hidden_act='gelu'"):
        CLIPVisionConfig.from_hf({"hidden_act": "gelu"})
    with pytest.raises(ValueError, match="image_size=30 is not a multiple of patch_size=8"):
        CLIPVisionConfig(image_size=30, patch_size=8)
    config = CLIPVisionConfig(
        hidden_size=8,
        intermediate_size=8,
        num_hidden_layers=2,
        num_attention_heads=2,
        image_size=16,
        patch_size=8,
    )
    with pytest.raises(ValueError, match=r"expected \[B, 3, 16, 16\]"):
        CLIPVision(config).init(jax.random.key(0), jnp.zeros((1, 3, 32, 32)))
    with pytest.raises(ValueError, match="smaller than the 40 crop"):
        CLIPImageProcessor(size=32, crop_size=40)(_images()[:1])
