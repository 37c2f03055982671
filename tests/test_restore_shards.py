"""Loading weights into an fsdp=8 mesh: straight into each device's shards, params only.

The measurement: every call that places data on a device (``jax.device_put``, which Orbax uses
per shard, and ``jax.make_array_from_callback`` / ``make_array_from_single_device_arrays``) is
followed by a census of ``jax.live_arrays()``, summing per device the buffers made since the
start. A restore onto one device holds the whole model there and fails the bound (tested).
"""

import collections
import gc
import json
import math
import os

import jax
import numpy as np
import optax
import pytest
from flax import traverse_util
from hf_reference import make_inputs

from jfe_jax.encoder import Encoder, EncoderOptions
from jfe_jax.encoder_params import BACKBONE, param_shardings
from jfe_jax.models.hf_io import save_hf_checkpoint
from jfe_jax.models.safetensors_io import INDEX_FILE
from jfe_jax.models.sizes import get_size
from jfe_jax.train import checkpoint as ckpt
from jfe_jax.train import mesh as mesh_lib
from jfe_jax.train.config_base import base_config
from jfe_jax.train.setup import initial_params
from jfe_jax.train.step import TrainState, split_params

PLACEMENTS = ("device_put", "make_array_from_callback", "make_array_from_single_device_arrays")


class DeviceCensus:
    """Largest bytes each device held, over the placements since construction, in arrays made
    since then; also the bytes ``jax.device_put`` placed and the largest slice a
    ``make_array_from_callback`` callback returned (what the host held at once)."""

    def __init__(self, monkeypatch):
        gc.collect()
        self._baseline = jax.live_arrays()  # held, so their buffers are not reused
        self._old = {self._key(s) for a in self._baseline for s in a.addressable_shards}
        self.peak: collections.Counter = collections.Counter()
        self.device_put_bytes = 0
        self.largest_slice = 0
        for name in PLACEMENTS:
            monkeypatch.setattr(jax, name, self._wrap(name, getattr(jax, name)))

    @staticmethod
    def _key(shard):
        return shard.device, shard.data.unsafe_buffer_pointer()

    def _wrap(self, name, place):
        def wrapped(*args, **kwargs):
            if name == "make_array_from_callback":
                args = (*args[:2], self._watch(args[2]), *args[3:])
            out = place(*args, **kwargs)
            if name == "device_put":
                leaves = jax.tree_util.tree_leaves(out)
                self.device_put_bytes += sum(
                    s.data.nbytes for x in leaves for s in x.addressable_shards
                )
            self.sample()
            return out

        return wrapped

    def _watch(self, callback):
        def read(index):
            value = callback(index)
            self.largest_slice = max(self.largest_slice, value.nbytes)
            return value

        return read

    def sample(self) -> None:
        held, seen = collections.Counter(), set()
        for array in jax.live_arrays():
            if array.is_deleted():
                continue
            for shard in array.addressable_shards:
                key = self._key(shard)
                if key not in self._old and key not in seen:
                    seen.add(key)  # a global array and its single-device parts share buffers
                    held[shard.device] += shard.data.nbytes
        for device, nbytes in held.items():
            self.peak[device] = max(self.peak[device], nbytes)


def shard_bytes(shapes, shardings) -> tuple[int, int, int]:
    """(bytes of its shards each device holds, bytes of the largest param, bytes of the
    largest param's shard), by the shardings."""
    flat_shardings = traverse_util.flatten_dict(shardings)
    per_device, largest, largest_shard = 0, 0, 0
    for key, x in traverse_util.flatten_dict(shapes).items():
        itemsize = np.dtype(x.dtype).itemsize
        shard = math.prod(flat_shardings[key].shard_shape(x.shape)) * itemsize
        per_device += shard
        largest = max(largest, math.prod(x.shape) * itemsize)
        largest_shard = max(largest_shard, shard)
    return per_device, largest, largest_shard


def assert_within_shard_plus_one_tensor(census, shapes, shardings):
    per_device, largest, largest_shard = shard_bytes(shapes, shardings)
    assert set(census.peak) == set(jax.devices())
    for device, peak in census.peak.items():
        # Within a shard plus one tensor, and in fact within a shard plus one *shard*: every
        # placement is one device's slice (`jfe aot` bounds the restore's peak this way).
        assert per_device <= peak <= per_device + largest_shard, (
            device,
            peak,
            per_device,
            largest,
            largest_shard,
        )


def assert_placed_and_equal(params, source, shardings):
    flat_shardings = traverse_util.flatten_dict(shardings)
    flat_source = traverse_util.flatten_dict(source)
    flat = traverse_util.flatten_dict(params)
    assert flat.keys() == flat_source.keys()
    for key, value in flat.items():
        assert value.sharding.is_equivalent_to(flat_shardings[key], value.ndim), key
        np.testing.assert_array_equal(np.asarray(value), flat_source[key], err_msg=str(key))


@pytest.fixture(scope="module")
def mesh():
    return mesh_lib.make_mesh({"data": 1, "fsdp": 8, "tensor": 1})


@pytest.fixture(scope="module")
def model():
    """(config, options, source params as numpy)."""
    config, options = get_size("tiny"), EncoderOptions()
    params = Encoder.init(config, options, seed=3).params
    return config, options, jax.tree_util.tree_map(np.asarray, jax.device_get(params))


def write_workdir(workdir, config, params) -> None:
    """A training workdir holding ``params`` (vision frozen, the rest trainable) with AdamW
    moments, written by the trainer's Checkpointer."""
    os.makedirs(workdir)
    with open(os.path.join(workdir, ckpt.MODEL_CONFIG_FILE), "w") as f:
        json.dump(config.to_hf_dict(), f)
    mask = traverse_util.unflatten_dict(
        {k: k[0] != "vision" for k in traverse_util.flatten_dict(params)}
    )
    trainable, frozen = split_params(params, mask)
    state = TrainState(
        step=np.int32(1),
        trainable=trainable,
        frozen=frozen,
        opt_state=optax.adamw(1e-3).init(trainable),
    )
    state = jax.device_put(state)  # jax arrays, as the trainer saves
    checkpointer = ckpt.Checkpointer(
        str(workdir), every_steps=1, every_seconds=1e9, keep=1, asynchronous=False
    )
    checkpointer.save(1, state, data_state={"position": 0}, config={})
    checkpointer.close()


@pytest.fixture(scope="module")
def workdir(model, tmp_path_factory):
    config, _, params = model
    path = tmp_path_factory.mktemp("restore") / "run"
    write_workdir(str(path), config, params)
    return str(path)


@pytest.fixture(scope="module")
def hf_dir(model, tmp_path_factory):
    """The backbone as a sharded Hugging Face directory (index + several safetensors)."""
    config, _, params = model
    path = str(tmp_path_factory.mktemp("restore") / "hf")
    save_hf_checkpoint(path, {k: params[k] for k in BACKBONE}, config, max_shard_bytes=200_000)
    return path


def test_workdir_restores_into_fsdp_shards_within_a_shard_plus_one_tensor_per_device(
    model, workdir, mesh, monkeypatch
):
    config, options, source = model
    census = DeviceCensus(monkeypatch)
    encoder = Encoder.from_workdir(workdir, options, mesh=mesh)
    shardings = param_shardings(encoder.module, mesh)
    assert_placed_and_equal(encoder.params, source, shardings)
    assert_within_shard_plus_one_tensor(census, encoder.params, shardings)


def test_sharded_safetensors_load_into_fsdp_shards_one_device_slice_at_a_time(
    model, hf_dir, mesh, monkeypatch
):
    config, options, source = model
    with open(os.path.join(hf_dir, INDEX_FILE)) as f:
        assert len(set(json.load(f)["weight_map"].values())) >= 2
    census = DeviceCensus(monkeypatch)
    encoder = Encoder.from_pretrained(hf_dir, options, mesh=mesh)
    shardings = param_shardings(encoder.module, mesh)
    backbone = {k: encoder.params[k] for k in BACKBONE}
    assert_placed_and_equal(backbone, {k: source[k] for k in BACKBONE}, shardings)
    assert_within_shard_plus_one_tensor(census, encoder.params, shardings)
    # The host read one device's slice at a time, never a whole sharded tensor.
    largest_shard = max(
        math.prod(x.sharding.shard_shape(x.shape)) * x.dtype.itemsize
        for x in jax.tree.leaves(backbone)
    )
    assert 0 < census.largest_slice <= largest_shard


@pytest.mark.parametrize("source_kind", ["workdir", "hf"])
def test_initial_params_read_init_from_straight_into_param_shardings(
    source_kind, model, workdir, hf_dir, mesh, monkeypatch
):
    config, options, source = model
    train_config = base_config()
    train_config.model.init_from = workdir if source_kind == "workdir" else hf_dir
    module = options.module(config)
    shardings = param_shardings(module, mesh)
    census = DeviceCensus(monkeypatch)
    params, what = initial_params(train_config, module, config, mesh, shardings)
    assert what.startswith("stage-1 checkpoint step 1" if source_kind == "workdir" else "Hugging")
    loaded = source if source_kind == "workdir" else {k: source[k] for k in BACKBONE}
    flat = traverse_util.flatten_dict(params)
    flat_loaded = traverse_util.flatten_dict(loaded)
    assert_placed_and_equal(
        traverse_util.unflatten_dict({k: flat[k] for k in flat_loaded}), loaded, shardings
    )
    assert_within_shard_plus_one_tensor(census, params, shardings)


def test_the_bound_catches_a_restore_onto_one_device(model, workdir, hf_dir, mesh, monkeypatch):
    _, options, _ = model
    census = DeviceCensus(monkeypatch)
    params, _ = ckpt.restore_params(workdir)  # no mesh: the whole model on the first device
    shardings = param_shardings(options.module(get_size("tiny")), mesh)
    per_device, largest, _ = shard_bytes(params, shardings)
    assert census.peak[jax.local_devices()[0]] > per_device + largest
    del params
    census = DeviceCensus(monkeypatch)
    encoder = Encoder.from_pretrained(hf_dir, options)
    assert census.peak[jax.local_devices()[0]] > per_device + largest
    assert encoder.mesh is None


def test_inference_restore_reads_the_params_and_no_optimizer_state(model, workdir, monkeypatch):
    _, _, source = model
    with ckpt._reader(ckpt.checkpoint_dir(workdir)) as manager:
        saved = manager.item_metadata(1)["state"]
    moments = [x for x in jax.tree.leaves(saved["opt_state"]) if hasattr(x, "shape")]
    trainable_bytes = sum(
        x.nbytes for x in jax.tree.leaves({k: v for k, v in source.items() if k != "vision"})
    )
    assert sum(math.prod(x.shape) * x.dtype.itemsize for x in moments) >= 2 * trainable_bytes
    census = DeviceCensus(monkeypatch)
    encoder = Encoder.from_workdir(workdir, EncoderOptions())
    assert set(encoder.params) == set(source)  # no opt_state, no step
    # Exactly the params were placed; the AdamW moments would have added 2 x trainable_bytes.
    assert census.device_put_bytes == sum(x.nbytes for x in jax.tree.leaves(source))
    assert encoder.step == 1


def test_initial_params_skip_previous_adapters_and_name_a_shape_mismatch_before_reading(
    model, mesh, tmp_path, monkeypatch
):
    config, _, _ = model
    lora = Encoder.init(config, EncoderOptions(lora_rank=2, lora_alpha=4.0), seed=5).params
    write_workdir(str(tmp_path / "lora"), config, jax.device_get(lora))
    train_config = base_config()
    train_config.model.init_from = str(tmp_path / "lora")

    plain = EncoderOptions().module(config)
    params, _ = initial_params(train_config, plain, config, mesh, param_shardings(plain, mesh))
    assert not any(k[-1] == "lora_a" for k in traverse_util.flatten_dict(params))

    wider = EncoderOptions(lora_rank=4, lora_alpha=4.0).module(config)
    wider_shardings = param_shardings(wider, mesh)
    census = DeviceCensus(monkeypatch)
    with pytest.raises(
        ValueError, match=r"lora_a has shape \(\d+, 2\), the model expects \(\d+, 4\)"
    ):
        initial_params(train_config, wider, config, mesh, wider_shardings)
    assert not census.peak  # from the checkpoint's metadata: nothing read or placed


def test_an_encoder_loaded_into_shards_embeds_and_fingerprints_as_one_on_a_device(
    model, workdir, hf_dir, mesh
):
    config, options, _ = model
    for load, path in ((Encoder.from_pretrained, hf_dir), (Encoder.from_workdir, workdir)):
        whole, sharded = load(path, options), load(path, options, mesh=mesh)
        assert sharded.mesh is mesh and whole.mesh is None
        assert sharded.fingerprint == whole.fingerprint
    ids, mask, pixels, grid = make_inputs(config, [[2, (4, 6), 3], [5]], seed=7)
    np.testing.assert_allclose(
        sharded.embed(ids, mask, pixels, grid), whole.embed(ids, mask, pixels, grid), atol=1e-6
    )
