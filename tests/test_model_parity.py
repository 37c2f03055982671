"""The Flax one-tower encoder against transformers' PyTorch Qwen2-VL (CPU, float32)."""

import numpy as np
import pytest

torch = pytest.importorskip("torch")

from hf_reference import build_hf_model, make_inputs, reference_hidden_states  # noqa: E402

from jfe_jax.encoder import Encoder  # noqa: E402
from jfe_jax.models.sizes import get_size  # noqa: E402

HIDDEN_ATOL = 1e-4  # max |diff| of final hidden states, float32
COSINE_MIN = 0.9999  # cosine of pooled embeddings, float32

CASES = {
    "text_only": ([[9], [5]], "right"),
    "one_image": ([[3, (4, 6), 4]], "right"),
    "images_of_different_sizes": (
        [[2, (2, 8), 3, (6, 4), 1], [4, (4, 4), 2], [(10, 2), 5]],
        "right",
    ),
    "text_and_image_rows_mixed": ([[7], [2, (4, 4), 3], [11]], "right"),
    "left_padding": ([[2, (6, 6), 2], [4], [3, (2, 4), 6]], "left"),
}


@pytest.fixture(scope="module")
def tiny():
    config = get_size("tiny")
    model = build_hf_model(config, seed=0)
    return config, model


@pytest.fixture(scope="module")
def hf_dir(tiny, tmp_path_factory):
    config, model = tiny
    path = tmp_path_factory.mktemp("tiny_qwen2vl")
    model.save_pretrained(path)
    return str(path)


@pytest.fixture(scope="module")
def encoder(hf_dir):
    return Encoder.from_pretrained(hf_dir)


def _real_positions_diff(ours, ref, mask):
    real = mask.astype(bool)
    return float(np.max(np.abs(ours[real] - ref[real])))


def _pool(ref, mask):
    last = np.array([np.flatnonzero(m).max() for m in mask])
    pooled = ref[np.arange(len(ref)), last]
    return pooled / np.linalg.norm(pooled, axis=-1, keepdims=True)


@pytest.mark.parametrize("case", sorted(CASES))
def test_hidden_states_and_embeddings_match_transformers(case, tiny, encoder):
    config, model = tiny
    rows, padding = CASES[case]
    ids, mask, pixels, grid = make_inputs(config, rows, padding=padding, seed=len(case))
    ref = reference_hidden_states(model, ids, mask, pixels, grid)
    ours = encoder.hidden_states(ids, mask, pixels, grid)
    assert ours.shape == ref.shape and ours.dtype == np.float32
    assert _real_positions_diff(ours, ref, mask) <= HIDDEN_ATOL
    emb = encoder.embed(ids, mask, pixels, grid)
    cosine = np.sum(emb * _pool(ref, mask), axis=-1)
    assert np.all(cosine >= COSINE_MIN), cosine


def test_scanned_layers_give_the_same_hidden_states(tiny, hf_dir, encoder):
    config, _ = tiny
    scanned = Encoder.from_pretrained(hf_dir, scan_layers=True, remat="full")
    assert "layers" in scanned.params["text"] and "blocks" in scanned.params["vision"]
    ids, mask, pixels, grid = make_inputs(config, CASES["images_of_different_sizes"][0], seed=3)
    np.testing.assert_allclose(
        scanned.hidden_states(ids, mask, pixels, grid),
        encoder.hidden_states(ids, mask, pixels, grid),
        atol=1e-5,
    )


@pytest.mark.parametrize("scan", [False, True])
@pytest.mark.parametrize("case", ["left_padding", "images_of_different_sizes"])
def test_pooled_last_layer_gives_the_embedding_of_the_full_hidden_states(case, scan, hf_dir):
    # embed() runs the last decoder layer only at each row's pooled token (unrolled layers);
    # it must agree with pooling the full final hidden states, to float32 rounding.
    enc = Encoder.from_pretrained(hf_dir, scan_layers=scan)
    rows, padding = CASES[case]
    ids, mask, pixels, grid = make_inputs(enc.config, rows, padding=padding, seed=7)
    expected = _pool(enc.hidden_states(ids, mask, pixels, grid), mask)
    np.testing.assert_allclose(enc.embed(ids, mask, pixels, grid), expected, atol=1e-6)


def test_bfloat16_compute_stays_close_to_the_float32_reference(tiny, hf_dir):
    # Stated tolerance for bfloat16 compute (float32 params, float32 norms/softmax):
    # embedding cosine >= 0.999 and hidden-state error <= 3% of the hidden states' max |value|
    # (measured here: about 1% and 0.9999).
    config, model = tiny
    enc = Encoder.from_pretrained(hf_dir, dtype="bfloat16")
    ids, mask, pixels, grid = make_inputs(config, CASES["images_of_different_sizes"][0], seed=4)
    ref = reference_hidden_states(model, ids, mask, pixels, grid)
    ours = enc.hidden_states(ids, mask, pixels, grid)
    real = mask.astype(bool)
    scale = np.max(np.abs(ref[real]))
    assert _real_positions_diff(ours, ref, mask) <= 0.03 * scale
    cosine = np.sum(enc.embed(ids, mask, pixels, grid) * _pool(ref, mask), axis=-1)
    assert np.all(cosine >= 0.999), cosine


def test_one_trace_per_input_shape(tiny, hf_dir):
    config, _ = tiny
    enc = Encoder.from_pretrained(hf_dir)
    a = make_inputs(config, [[3, (4, 4), 2], [9]], seed=1)
    b = make_inputs(config, [[2, (4, 4), 3], [9]], seed=2)  # same shapes, other values
    enc.embed(*a)
    enc.embed(*b)
    assert enc.trace_count == 1
    enc.hidden_states(*a)  # another program: all final-layer positions
    enc.hidden_states(*b)
    assert enc.trace_count == 2
    c = make_inputs(config, [[5], [3]], seed=5)  # text only: another shape
    enc.embed(*c)
    enc.embed(*c)
    assert enc.trace_count == 3
