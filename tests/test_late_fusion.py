"""The late-fusion baseline: same tower, parts embedded apart and added."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from PIL import Image

from jfe_jax.data.late_fusion import late_collate
from jfe_jax.data.tokenizer import build_tokenizer
from jfe_jax.encoder import Encoder
from jfe_jax.index.embedder import Item, ItemEmbedder
from jfe_jax.models.sizes import get_size
from jfe_jax.train.step import TrainState, make_loss_and_grad

WORDS = "red green blue circle square left right top what is on the find".split()


@pytest.fixture(scope="module")
def embedders(tmp_path_factory):
    root = tmp_path_factory.mktemp("late")
    rng = np.random.default_rng(1)
    tokenizer = build_tokenizer([" ".join(rng.choice(WORDS, 6)) for _ in range(100)], 512)
    for i in range(4):
        Image.fromarray(rng.integers(0, 255, (56, 84, 3), dtype=np.uint8)).save(root / f"{i}.png")
    encoder = Encoder.init(get_size("tiny"), seed=5)
    kw = dict(
        tokenizer=tokenizer,
        batch_size=8,
        length_buckets=(128,),
        max_pixels=112 * 112,
        image_root=str(root),
    )
    return ItemEmbedder(encoder, **kw), ItemEmbedder(encoder, fusion="late", **kw)


def _unit(x):
    return x / np.linalg.norm(x, axis=-1, keepdims=True)


def test_late_embedding_is_the_normalised_sum_of_separately_embedded_parts(embedders):
    early, late = embedders
    items = [
        Item(text="what is on the left", image="0.png", instruction="find the red"),
        Item(text="red circle"),
        Item(image="1.png"),
        Item(image="2.png", instruction="find the square"),
    ]
    fused = late.embed(items)
    text_parts = early.embed(
        [Item(text="what is on the left", instruction="find the red"), Item(text="red circle")]
    )
    image_parts = early.embed([Item(image=f"{i}.png") for i in range(3)])
    instruction_only = early.embed([Item(text="find the square")])
    expected = np.stack(
        [
            _unit(text_parts[0] + image_parts[0]),
            text_parts[1],
            image_parts[1],
            _unit(instruction_only[0] + image_parts[2]),
        ]
    )
    np.testing.assert_allclose(fused, expected, atol=2e-5)
    # and it is not the early-fusion embedding of the same items
    assert np.max(np.abs(fused[0] - early.embed(items[:1])[0])) > 1e-2


def test_train_step_accepts_late_fusion_batches(embedders):
    _, late = embedders
    queries = [late.process(Item(text="red circle", image=f"{i}.png")) for i in range(4)]
    candidates = [late.process(Item(text=w)) for w in ("red", "green", "blue", "square")]
    batch = {
        "query": late_collate(queries, late._collate, late.patch_budget),
        "candidate": late_collate(candidates, late._collate, late.patch_budget),
        "query_key": np.arange(4, dtype=np.int32),
        "candidate_key": np.arange(4, dtype=np.int32),
    }
    params = late.encoder.params
    state = TrainState(step=jnp.zeros((), jnp.int32), trainable=params, frozen={}, opt_state=None)
    fn = make_loss_and_grad(
        late.encoder.module,
        learn_temperature=False,
        symmetric=False,
        mask_false_negatives=True,
        grad_cache_chunk=2,
    )
    (loss, _), grads = jax.jit(fn)(state, batch)
    assert np.isfinite(float(loss))
    norms = [float(jnp.linalg.norm(g)) for g in jax.tree_util.tree_leaves(grads["vision"])]
    assert max(norms) > 0  # the image parts reach the vision tower
