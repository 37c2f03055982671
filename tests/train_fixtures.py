"""In-memory contrastive batches for trainer tests (no tokenizer, no files)."""

from __future__ import annotations

import jax
import numpy as np

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
        return {
            "query": self._side(rng, topics, with_images=False),
            "candidate": self._side(rng, topics, with_images=True),
            "query_key": keys,
            "candidate_key": keys,
        }

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
