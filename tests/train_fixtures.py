"""In-memory contrastive batches for trainer tests (no tokenizer, no files)."""

from __future__ import annotations

import jax
import numpy as np

from jfe_jax.models.batches import TrainBatch
from jfe_jax.models.config import ModelConfig
from jfe_jax.models.inputs import prepare_batch


class ToyPairs:
    """Deterministic query/candidate batches with a learnable signal.

    Query i and candidate i share a random 'topic' token run, so a model can learn to match
    them; some candidates carry an image. Implements the iterator protocol of the trainer
    (``next``, ``get_state``, ``set_state``).
    """

    def __init__(self, config: ModelConfig, *, batch_size: int, seed: int = 0, length: int = 16):
        self.config, self.batch_size, self.seed, self.length = config, batch_size, seed, length
        self.position = 0

    def _side(self, rng, topics, with_images):
        cfg = self.config
        merge = cfg.vision.spatial_merge_size
        ids = rng.integers(0, cfg.text.vocab_size - 16, size=(self.batch_size, self.length))
        ids[:, 2:6] = topics
        pixels, grids = [], []
        if with_images:
            for row in range(self.batch_size):
                if row % 2 == 0:
                    ids[row, 8 : 8 + 4] = cfg.image_token_id
                    grids.append([1, 2 * merge, 2 * merge])
                    pixels.append(rng.normal(size=(16, cfg.vision.patch_dim)).astype(np.float32))
            return prepare_batch(
                cfg, ids, None, np.concatenate(pixels), np.array(grids), num_patches=16
            )
        return prepare_batch(cfg, ids)

    def __next__(self):
        rng = np.random.default_rng([self.seed, self.position])
        self.position += 1
        topics = rng.integers(0, self.config.text.vocab_size - 16, size=(self.batch_size, 4))
        keys = rng.integers(0, 2**31 - 1, size=self.batch_size).astype(np.int32)
        return TrainBatch(
            query=self._side(rng, topics, with_images=False),
            candidate=self._side(rng, topics, with_images=True),
            query_key=keys,
            candidate_key=keys,
        )

    def get_state(self) -> dict:
        return {"position": self.position}

    def set_state(self, state: dict) -> None:
        self.position = int(state["position"])


def spread_weights(params, seed: int = 7):
    """Random weights spread out enough that no layer is near identity: norm scales 1 +- 0.2,
    biases 0.1 and kernels 0.08 standard normal; the temperature is kept."""
    import jax

    leaves, treedef = jax.tree_util.tree_flatten_with_path(params)
    keys = jax.random.split(jax.random.key(seed), len(leaves))
    spread = []
    for (path, leaf), key in zip(leaves, keys):
        name = jax.tree_util.keystr(path)
        noise = jax.random.normal(key, leaf.shape, leaf.dtype)
        if "logit_scale" in name:
            spread.append(leaf)
        elif "scale" in name:
            spread.append(1.0 + 0.2 * noise)
        elif "bias" in name:
            spread.append(0.1 * noise)
        else:
            spread.append(0.08 * noise)
    return jax.tree_util.tree_unflatten(treedef, spread)


def assert_trees_close(a, b, rtol: float) -> None:
    """Every leaf of ``a`` within ``rtol`` x the max |value| of the same leaf of ``b``."""
    import jax

    for (path, x), y in zip(jax.tree_util.tree_leaves_with_path(a), jax.tree_util.tree_leaves(b)):
        scale = max(float(np.max(np.abs(y))), 1e-12)
        diff = float(np.max(np.abs(np.asarray(x) - np.asarray(y))))
        assert diff <= rtol * scale, (jax.tree_util.keystr(path), diff, scale)


def contrastive_loss_and_grad_fn(module, chunk=0):
    """The train step's loss-and-gradient function as the tests use it: symmetric loss,
    learned temperature, false negatives masked, grad cache ``chunk`` (0: off)."""
    from jfe_jax.train.step import make_loss_and_grad

    return make_loss_and_grad(
        module,
        learn_temperature=True,
        symmetric=True,
        mask_false_negatives=True,
        grad_cache_chunk=chunk,
    )


def loss_and_grad(module, state, batch, mesh=None, boxed=None, chunk=0):
    """(loss, grads) of one contrastive step (symmetric, learned temperature, false negatives
    masked; grad cache ``chunk``), jitted; with a ``mesh``, the state placed in the logical
    shardings of the ``boxed`` params (trainable and frozen parts alike) and the host batch
    made global, traced under the mesh and the logical axis rules."""
    import flax.linen as nn
    import jax

    from jfe_jax.models.axes import LOGICAL_RULES
    from jfe_jax.train import mesh as mesh_lib
    from jfe_jax.train.optimizer import trainable_mask
    from jfe_jax.train.step import split_params

    fn = contrastive_loss_and_grad_fn(module, chunk)
    if mesh is None:
        (loss, _), grads = jax.jit(fn)(state, batch)
        return float(loss), jax.device_get(grads)
    shardings = mesh_lib.logical_shardings(boxed, mesh, LOGICAL_RULES)
    t_shard, f_shard = split_params(shardings, trainable_mask(nn.meta.unbox(boxed), "full"))
    sharded_state = state.replace(
        trainable=jax.device_put(state.trainable, t_shard),
        frozen=jax.device_put(state.frozen, f_shard),
    )
    sharded_batch = mesh_lib.global_batch_from_host(batch, mesh)
    with jax.set_mesh(mesh), nn.logical_axis_rules(LOGICAL_RULES):
        (loss, _), grads = jax.jit(fn)(sharded_state, sharded_batch)
    return float(loss), jax.device_get(grads)


# Per pair, hf_reference.make_inputs row specs (int: text tokens, (h, w): an image of h x w
# patches) of the query and its candidate: text only, image only, and text with one or two
# images of 4 to 32 patches (16-patch images are the per-image blocks' size in the tests).
MIXED_PAIRS = [
    ([9], [(4, 4)]),
    ([5, (2, 4), 3], [12]),
    ([(4, 4)], [4, (4, 8), 3]),
    ([17], [(2, 2), 5, (2, 4)]),
    ([3, (6, 4), 2], [(4, 4), 2]),
    ([12], [6]),
    ([(2, 2)], [(4, 6)]),
    ([7, (4, 4), 1], [15]),
] * 2


def processed_items(config, specs, seed):
    """One ``ProcessedItem`` per make_inputs row spec (seeds ``seed``, ``seed + 1``, ...)."""
    from hf_reference import make_inputs

    from jfe_jax.data.processing import ProcessedItem

    items = []
    for i, spec in enumerate(specs):
        ids, _, pixels, grid = make_inputs(config, [spec], seed=seed + i)
        items.append(ProcessedItem(ids[0].astype(np.int32), pixels, grid))
    return items


def step_on_mesh(module, boxed, params, batch, *, mode: str, chunk: int):
    """(loss, grads) of one contrastive step on a data=4 x fsdp=2 mesh, the trainable/frozen
    split of optimizer ``mode`` sharded by the params' logical axes, the batch made global."""
    import flax.linen as nn
    import jax
    import jax.numpy as jnp

    from jfe_jax.models.axes import LOGICAL_RULES
    from jfe_jax.train import mesh as mesh_lib
    from jfe_jax.train.optimizer import trainable_mask
    from jfe_jax.train.step import TrainState, split_params

    mesh = mesh_lib.make_mesh(dict(data=4, fsdp=2, tensor=1))
    mask = trainable_mask(params, mode, also_trainable=("logit_scale",))
    trainable, frozen = split_params(params, mask)
    t_shard, f_shard = split_params(mesh_lib.logical_shardings(boxed, mesh, LOGICAL_RULES), mask)
    state = TrainState(
        step=jnp.zeros((), jnp.int32),
        trainable=jax.device_put(trainable, t_shard),
        frozen=jax.device_put(frozen, f_shard),
        opt_state=None,
    )
    fn = contrastive_loss_and_grad_fn(module, chunk)
    global_batch = mesh_lib.global_batch_from_host(batch, mesh)
    with jax.set_mesh(mesh), nn.logical_axis_rules(LOGICAL_RULES):
        (loss, _), grads = jax.jit(fn)(state, global_batch)
    return float(loss), jax.device_get(grads)


def assert_same_step(got, want, rtol: float) -> None:
    """Two ``(loss, grads)``: the loss within ``rtol`` relative, every gradient leaf within
    ``rtol`` of its max |value|, and no leaf of ``got`` all zero."""
    import jax

    (loss_got, grads_got), (loss_want, grads_want) = got, want
    assert abs(loss_got - loss_want) <= rtol * abs(loss_want)
    assert_trees_close(grads_got, grads_want, rtol)
    assert all(float(np.max(np.abs(g))) > 0 for g in jax.tree.leaves(grads_got))


def small_bench(root) -> str:
    """A small synthetic benchmark generated under ``root`` (for train() tests)."""
    from jfe_jax.data.synthetic import SyntheticConfig, generate

    small = SyntheticConfig(
        seed=1,
        train_queries_per_task=8,
        val_queries_per_task=2,
        test_queries_per_task=4,
        num_text_triples=32,
        num_image_captions=32,
    )
    generate(str(root), small, progress=False)
    return str(root)


def count_forward_dots(jaxpr, scope: str) -> int:
    """Forward (not transposed) dot_general equations of ``jaxpr`` and its sub-jaxprs traced
    under a name scope containing ``scope``: how many times a tower runs in a traced step."""
    count = 0
    for eqn in jaxpr.eqns:
        name_stack = str(eqn.source_info.name_stack)
        if eqn.primitive.name == "dot_general" and scope in name_stack:
            count += not name_stack.startswith("transpose(")
        for value in eqn.params.values():
            for sub in value if isinstance(value, (tuple, list)) else (value,):
                if isinstance(sub, jax.extend.core.ClosedJaxpr):
                    count += count_forward_dots(sub.jaxpr, scope)
                elif isinstance(sub, jax.extend.core.Jaxpr):
                    count += count_forward_dots(sub, scope)
    return count
