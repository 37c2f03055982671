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
from jfe_jax.models import flops
from jfe_jax.models.batches import TrainBatch
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
    batch = TrainBatch(
        query=late_collate(queries, late._collate, late.patch_budget),
        candidate=late_collate(candidates, late._collate, late.patch_budget),
        query_key=np.arange(4, dtype=np.int32),
        candidate_key=np.arange(4, dtype=np.int32),
    )
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


def _filled(side):
    """The side with a part no row has filled with the other part (masked out): what
    late_collate built before it left such parts out."""
    (part, _), *rest = side.parts()
    assert not rest  # one part only
    return side.replace(text=part, image=part)


def _caption_batch(late):
    # Stage 1's shape: text-only queries, image-only candidates.
    queries = [late.process(Item(text=w)) for w in ("red circle", "green", "blue top", "square")]
    candidates = [late.process(Item(image=f"{i}.png")) for i in range(4)]
    return TrainBatch(
        query=late_collate(queries, late._collate, late.patch_budget),
        candidate=late_collate(candidates, late._collate, late.patch_budget),
        query_key=np.arange(4, dtype=np.int32),
        candidate_key=np.arange(4, dtype=np.int32),
    )


def test_a_part_no_item_has_is_left_out_and_embeds_as_when_filled(embedders):
    _, late = embedders
    batch = _caption_batch(late)
    query, candidate = batch.query, batch.candidate
    assert query.image is None and query.text is not None
    assert candidate.text is None and candidate.image is not None
    # a mixed side keeps both parts (the absent rows filled and masked)
    mixed = late_collate(
        [late.process(Item(text="red")), late.process(Item(image="0.png"))],
        late._collate,
        late.patch_budget,
    )
    assert mixed.text is not None and mixed.image is not None
    np.testing.assert_array_equal(mixed.has_image, [0.0, 1.0])

    module, params = late.encoder.module, {"params": late.encoder.params}
    for side in (query, candidate):
        alone, out = module.apply(params, side)
        filled, _ = module.apply(params, _filled(side))
        np.testing.assert_allclose(np.asarray(alone), np.asarray(filled), atol=1e-6)
        assert len(out) == 1  # the one part's embedding
    config = late.encoder.config
    for side in (query, candidate):  # the FLOPs counted are the one part's, half the filled
        assert flops.batch_forward_flops(config, side) == pytest.approx(
            flops.batch_forward_flops(config, _filled(side)) / 2
        )


# XLA's own backend settings, which `jfe` and the demo compile with; conftest lowers them for
# the suite's compile time. The two batches below are two programs of the same sums: at the
# defaults their gradients agree to 0 (chunk 0) and 1.4e-7 (chunk 2); at conftest's level 0
# the embedding table's gradient (a scatter-add over every token) comes out up to 1.1e-6
# apart, XLA's order of those float32 additions and not the one-part path.
_XLA_DEFAULTS = {
    "xla_backend_optimization_level": 2,
    "xla_llvm_disable_expensive_passes": False,
    "xla_cpu_use_fusion_emitters": True,
}


def _at_xla_defaults(fn, *args):
    return fn.lower(*args).compile(compiler_options=_XLA_DEFAULTS)(*args)


@pytest.mark.parametrize("chunk", [0, 2])
def test_train_step_on_one_part_sides_matches_the_filled_batch(embedders, chunk):
    _, late = embedders
    batch = _caption_batch(late)
    filled = batch.replace(query=_filled(batch.query), candidate=_filled(batch.candidate))
    params = late.encoder.params
    state = TrainState(step=jnp.zeros((), jnp.int32), trainable=params, frozen={}, opt_state=None)
    fn = jax.jit(
        make_loss_and_grad(
            late.encoder.module,
            learn_temperature=False,
            symmetric=True,
            mask_false_negatives=True,
            grad_cache_chunk=chunk,
        )
    )
    (loss, _), grads = _at_xla_defaults(fn, state, batch)
    (loss_filled, _), grads_filled = _at_xla_defaults(fn, state, filled)
    np.testing.assert_allclose(float(loss), float(loss_filled), rtol=1e-6)
    for g, h in zip(jax.tree_util.tree_leaves(grads), jax.tree_util.tree_leaves(grads_filled)):
        np.testing.assert_allclose(np.asarray(g), np.asarray(h), atol=1e-6)
    assert max(float(jnp.linalg.norm(g)) for g in jax.tree_util.tree_leaves(grads["vision"])) > 0
