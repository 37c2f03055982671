"""``jfe aot``: TPU topology names, loop-aware HLO costs, compiling configs for a TPU slice, the
train batch it derives from the data pipeline, and that it lowers the step the trainer runs.

These tests need libtpu (the ``tpu`` extra: ``pip install -e '.[tpu]'``); without it they fail
rather than skip, since the ahead-of-time check is only as good as the compiler behind it.
"""

import importlib
import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from batch_dicts import as_dict
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from jfe_jax.data.synthetic import SyntheticConfig, generate
from jfe_jax.models.batches import EarlyBatch, is_packed
from jfe_jax.models.flops import batch_required_flops, train_step_required_flops
from jfe_jax.train import setup as setup_lib
from jfe_jax.train.aot import aot_main, lower_train_step, parse_config
from jfe_jax.train.aot_batch import (
    MBEIR_TRAIN_QUERIES,
    BatchShape,
    batch_shape_for,
    mbeir_tasks,
    train_batch,
)
from jfe_jax.train.hlo_cost import hlo_costs
from jfe_jax.train.mesh import make_mesh
from jfe_jax.train.setup import model_config_for
from jfe_jax.train.topology import parse_topology, slice_shape
from jfe_jax.train.trainer import train

DEMO_CONFIG = os.path.join(os.path.dirname(__file__), "..", "configs", "stage1_demo.py")
STAGE2_DEMO = os.path.join(os.path.dirname(__file__), "..", "configs", "stage2_demo.py")


def demo_args(
    batch_size: int = 16, batch_shape: str = "L=64,P=16", config: str = DEMO_CONFIG
) -> list[str]:
    """The demo model at a small batch: fast compiles (seconds on 2 CPU cores)."""
    return [
        "--config",
        config,
        f"--config.data.global_batch_size={batch_size}",
        "--batch-shape",
        batch_shape,
    ]


def test_libtpu_is_installed():
    try:
        importlib.import_module("libtpu")
    except ImportError as e:
        pytest.fail(f"libtpu is missing: pip install -e '.[tpu]' ({e})")


@pytest.mark.parametrize(
    "name, generation, shape",
    [
        ("v5p-64", "v5p", (2, 4, 4)),  # 64 TensorCores = 32 chips
        ("v5p-128", "v5p", (4, 4, 4)),
        ("v5p:4x4x4", "v5p", (4, 4, 4)),
        ("v4-8", "v4", (2, 2, 1)),
        ("v4-16", "v4", (2, 2, 2)),
        ("v4-32", "v4", (2, 2, 4)),
        ("v5e-8", "v5e", (2, 4)),  # v5e counts chips
        ("v5litepod-256", "v5e", (16, 16)),
        ("v6e-16", "v6e", (4, 4)),
        ("v6e:4x8", "v6e", (4, 8)),
    ],
)
def test_topology_names_count_tensorcores_for_v4_v5p_and_chips_for_v5e_v6e(name, generation, shape):
    topology = parse_topology(name)
    assert (topology.generation, topology.shape) == (generation, shape)


def test_slice_shapes_follow_googles_default_shapes():
    assert [slice_shape("v5p", 2**k) for k in range(3, 10)] == [
        (2, 2, 2),
        (2, 2, 4),
        (2, 4, 4),
        (4, 4, 4),
        (4, 4, 8),
        (4, 8, 8),
        (8, 8, 8),
    ]
    assert [slice_shape("v5e", 2**k) for k in (0, 2, 3, 4, 5, 6, 7, 8)] == [
        (1, 1),
        (2, 2),
        (2, 4),
        (4, 4),
        (4, 8),
        (8, 8),
        (8, 16),
        (16, 16),
    ]


@pytest.mark.parametrize(
    "name, message",
    [
        ("v7-8", "unknown TPU generation 'v7'"),
        ("v5p-63", "counts TensorCores"),
        ("v5p-24", "no v5p slice has 12 chips"),
        ("v5e-512", "no v5e slice has 512 chips"),
        ("v5e:4x4x4", "a v5e slice has 2 axes"),
        ("tpu", "neither GEN-N nor GEN:AxBxC"),
    ],
)
def test_bad_topology_names_raise_an_error_that_names_the_problem(name, message):
    with pytest.raises(ValueError, match=message):
        parse_topology(name)


def test_aot_with_a_bad_topology_exits_2_with_the_reason(capsys):
    assert aot_main([*demo_args(), "--topology", "v5q-8"]) == 2
    assert "unknown TPU generation 'v5q'" in capsys.readouterr().err


def test_topology_devices_are_one_per_chip():
    devices = parse_topology("v4-16").devices()  # 8 megacore chips, not 16 TensorCores
    assert len(devices) == 8
    assert devices[0].device_kind == "TPU v4"


def test_loop_aware_flops_multiply_scan_bodies_by_their_trip_counts():
    devices = parse_topology("v5e-4").devices()
    mesh = Mesh(np.array(devices), ("x",))
    x = jax.ShapeDtypeStruct(
        (512, 256), jnp.bfloat16, sharding=NamedSharding(mesh, PartitionSpec("x"))
    )
    w = jax.ShapeDtypeStruct(
        (6, 256, 256), jnp.bfloat16, sharding=NamedSharding(mesh, PartitionSpec())
    )

    def layer(h, weight):
        return jnp.tanh(h @ weight), None

    def scanned(x, w):  # an outer loop of 3 around a scan of 6
        return jax.lax.scan(lambda h, _: (jax.lax.scan(layer, h, w)[0], None), x, None, 3)[0]

    def unrolled(x, w):
        for _ in range(3):
            for i in range(6):
                x = layer(x, w[i])[0]
        return x

    loops = hlo_costs(jax.jit(scanned).lower(x, w).compile().as_text())
    reference = jax.jit(unrolled).lower(x, w).compile().cost_analysis()["flops"]
    per_layer = 2 * (512 // 4) * 256 * 256  # per chip
    assert sorted(trips for _, trips in loops.loops) == [3, 6]
    assert loops.matmul_flops == 18 * per_layer
    assert loops.matmul_flops_once == per_layer
    # XLA's own count of the unrolled program also has the tanh: matmuls dominate it.
    assert loops.matmul_flops == pytest.approx(reference, rel=0.02)


def test_aot_compiles_the_demo_config_for_a_v5e_slice_and_reports_memory_and_flops(
    tmp_path, capsys
):
    out = tmp_path / "aot.json"
    assert aot_main([*demo_args(), "--topology", "v5e-8", "--json", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "v5litepod-8 = v5e:2x4" in printed and "total / HBM" in printed
    report = json.loads(out.read_text())
    assert report["topology"]["chips"] == 8 and report["fits"]
    assert report["mesh"] == {"data": 8, "fsdp": 1, "tensor": 1}
    assert report["global_batch_size"] == 16  # the --config override reached the programs
    for program in ("train", "export"):
        numbers = report["programs"][program]
        assert numbers["fits"], program
        assert 0 < numbers["total_bytes"] < numbers["hbm_bytes"], program
        assert numbers["argument_bytes"] > 0 and numbers["temp_bytes"] >= 0, program
        assert numbers["compiled_flops"] > 0 and numbers["model_flops"] > 0, program
        assert numbers["xla_flops"] > 0, program
        assert numbers["cost_model_seconds"] > 0 and 0 < numbers["mfu"] < 1, program
    # Model FLOPs count 3x a full forward of every side. The compiled step does less: the last
    # of tiny's 2 decoder layers runs its queries, o_proj and MLP at the pooled token only (it
    # skips 63/64 of that layer's 90k FLOPs per token but k/v's 8k: about 45% of the decoder)
    # and causal attention in 2 query blocks skips a quarter of layer 1's score work (2%), so
    # the compiled step is expected near 0.55 of model FLOPs (measured 0.57 on stage 1's
    # image-caption batches: text-only queries, image-only candidates).
    train = report["programs"]["train"]
    assert 0.5 < train["compiled_flops"] * 8 / train["model_flops"] < 0.75


def test_aot_exits_1_with_does_not_fit_when_a_batch_exceeds_hbm(capsys):
    # 8192 rows of 4096 float32 patches are 158 GB of pixels: 20 GB per v5e chip (16 GiB).
    argv = [*demo_args(8192, "L=64,P=4096"), "--topology", "v5e-8", "--programs", "export"]
    assert aot_main(argv) == 1
    captured = capsys.readouterr()
    assert "the export program does not fit in HBM on v5e-8 (16 GiB per chip)" in captured.err


def test_aot_exits_2_when_the_configs_mesh_does_not_map_onto_the_torus(capsys):
    # data=8, fsdp=8 on a 4x4x4 v5p slice: jax.make_mesh cannot make an axis of 8 chips.
    argv = [*demo_args(64), "--config.mesh.fsdp=8", "--topology", "v5p-128"]
    assert aot_main(argv) == 2
    assert "cannot be laid on the v5p:4x4x4 torus" in capsys.readouterr().err


def test_required_flops_match_what_the_compiler_runs_with_a_frozen_vision_tower(tmp_path):
    # No gradient cache and no remat: the compiled step runs exactly what the gradients need,
    # so its FLOPs check the required count (frozen vision: 1x forward) against the compiler.
    # Stage 2's uniform items fill their rows (text and an image on both sides), so nothing
    # the compiler runs is padding the required count leaves out.
    out = tmp_path / "aot.json"
    argv = [*demo_args(config=STAGE2_DEMO), "--config.optimizer.trainable=freeze_vision"]
    argv += ["--programs", "train"]
    assert aot_main([*argv, "--topology", "v5e-8", "--json", str(out)]) == 0
    train = json.loads(out.read_text())["programs"]["train"]
    assert train["required_flops"] < train["model_flops"]
    assert 0.9 < train["compiled_flops"] * 8 / train["required_flops"] < 1.1
    assert train["mfu_required"] == pytest.approx(
        train["mfu"] * train["required_flops"] / train["model_flops"]
    )


# ============================================================================ the train batch


def _demo_batch(mix, *overrides, batch_size=64):
    config = parse_config("test", ["--config", STAGE2_DEMO, *overrides])
    with config.unlocked():
        config.data.global_batch_size = batch_size
    mesh = make_mesh(dict(config.mesh))
    model_config = model_config_for(config)
    return (
        config,
        model_config,
        train_batch(config, model_config, mesh, batch_shape_for(config), mix),
    )


def test_mbeir_mix_has_the_union_training_sets_task_proportions():
    # UniIR's Table 1, in thousands: 1150 rows are exactly one row per thousand queries.
    rows = mbeir_tasks(1150)
    assert {task: rows.count(task) for task in set(rows)} == {
        task: n // 1000 for task, n in MBEIR_TRAIN_QUERIES.items()
    }
    # Per side: text-only tasks 0-2 (273K queries), image-only 3-4 (244K), image+text 6-8
    # (633K); candidates: images for tasks 0, 4, 7 (272K), text for 1, 3, 6 (535K), both for
    # 2, 8 (343K).
    _, _, batch = _demo_batch("mbeir")
    expected = {
        "query": {"text": 273, "image": 244, "image,text": 633},
        "candidate": {"image": 272, "text": 535, "image,text": 343},
    }
    for side, shares in expected.items():
        assert sum(batch.modalities[side].values()) == 64
        for modality, thousands in shares.items():
            assert abs(batch.modalities[side][modality] - 64 * thousands / 1150) <= 1, side


def test_required_flops_count_only_real_tokens_and_patches():
    config, model_config, uniform = _demo_batch("uniform")
    _, _, mixed = _demo_batch("mbeir")
    options = dict(
        trainable=config.optimizer.trainable,
        lora_rank=config.model.lora_rank,
        lora_targets=tuple(config.model.lora_targets),
    )
    # The same padded shapes; uniform items fill them, the mix's leave padding.
    assert jax.tree.map(lambda s: s.shape, uniform.batch) == jax.tree.map(
        lambda s: s.shape, mixed.batch
    )
    padded = train_step_required_flops(model_config, uniform.batch, **options)
    assert uniform.required_flops == pytest.approx(padded, rel=1e-12)
    assert mixed.required_flops < 0.9 * padded
    # Recounted from the collated rows: each row alone at its real tokens and patches.
    recount = 0.0
    for side in mixed.host_batch.sides():
        tokens = np.asarray(side.attention_mask).sum(axis=1)
        patches = (np.asarray(side.patch_segment_ids) > 0).sum(axis=1)
        for n, p in zip(tokens, patches):
            alone = EarlyBatch(
                input_ids=np.zeros((1, n)),
                attention_mask=np.ones((1, n)),
                position_ids=np.zeros((1, 3, n)),
                pixel_values=np.zeros((1, p, 1)),
            )
            recount += batch_required_flops(model_config, alone, **options)
    assert mixed.required_flops == pytest.approx(recount, rel=1e-12)


@pytest.mark.parametrize(
    "override, keys",
    [
        ("--config.data.pack=True", {"segment_ids", "pool_index", "item_mask"}),
        ("--config.model.fusion=late", {"text", "image", "has_text", "has_image"}),
        ("--config.data.pack_vision=True", {"vision_pixel_values", "image_token_index"}),
    ],
    ids=["pack", "late_fusion", "pack_vision"],
)
def test_train_batch_is_the_pipelines_collate_of_packed_late_and_vision_packed_sides(
    override, keys
):
    _, model_config, batch = _demo_batch("uniform", override, batch_size=16)
    for side in ("query", "candidate"):
        fields = set(as_dict(getattr(batch.batch, side)))
        assert keys <= fields, side
        assert fields == set(as_dict(getattr(batch.host_batch, side))), side
    # Pixels are collated one float wide (host memory), then widened to the model's patches.
    pixels = [
        leaf
        for path, leaf in jax.tree_util.tree_leaves_with_path(batch.batch)
        if "pixel_values" in jax.tree_util.keystr(path)
    ]
    assert pixels and all(p.shape[-1] == model_config.vision.patch_dim for p in pixels)


def test_aot_with_the_mbeir_mix_reports_its_items_and_a_lower_required_mfu(tmp_path, capsys):
    out = tmp_path / "aot.json"
    argv = ["--config", STAGE2_DEMO, "--config.data.global_batch_size=16", "--batch-mix", "mbeir"]
    argv += ["--programs", "train", "--topology", "v5e-8", "--json", str(out)]
    assert aot_main(argv) == 0
    printed = capsys.readouterr().out
    assert "batch (mbeir mix), items: query " in printed
    assert "restore peak per chip, GiB (bound)" in printed
    train = json.loads(out.read_text())["programs"]["train"]
    assert train["batch_mix"] == "mbeir"
    assert sum(train["batch_items"]["candidate"].values()) == 16
    assert train["mfu_required"] < train["mfu"]
    assert 0 < train["mfu_required_cycles"] < train["mfu_cycles"]
    assert 0 < train["restore_bytes"] < train["hbm_bytes"]
    # The per-op cycles by pass and tower add up to the per-op cycles time.
    passes = {label: seconds for label, seconds, _ in train["passes"]}
    assert sum(passes.values()) == pytest.approx(train["cycles_seconds"], rel=1e-6)
    assert "backward: text" in passes and any(k.endswith(": vision") for k in passes), passes


def test_the_mbeir_mix_of_a_pairs_config_exits_2(capsys):
    assert aot_main([*demo_args(), "--batch-mix", "mbeir", "--topology", "v5e-8"]) == 2
    assert "--batch-mix mbeir lays out M-BEIR's training tasks" in capsys.readouterr().err


# ============================================================================ aot = the trainer


@pytest.mark.slow
def test_aot_lowers_the_same_step_the_trainer_compiles(tmp_path, monkeypatch):
    """A short train() on the real data pipeline, its lowering captured, against jfe aot's
    lowering of the same config on the same mesh for that batch shape."""
    root = tmp_path / "data"
    generate(
        str(root),
        SyntheticConfig(
            seed=1,
            tasks=("cirr_task7",),  # (image, text) queries, image candidates
            train_queries_per_task=16,
            val_queries_per_task=2,
            test_queries_per_task=2,
            num_text_triples=8,
            num_image_captions=8,
        ),
        progress=False,
    )
    config = parse_config("test", ["--config", STAGE2_DEMO])
    with config.unlocked():
        config.stage = "stage1"  # random init: stage 2 would need a stage-1 workdir
        config.data.root = str(root)
        config.data.global_batch_size = 8
        config.data.num_hard_negatives = 1
        config.data.length_buckets = (128,)  # every side one length, as aot's BatchShape
        config.train.num_steps = 1
        config.optimizer.warmup_steps = 0
    lowered_by_trainer = []
    lower = setup_lib.TrainSetup.lower

    def spy(self, state, batch):
        lowered = lower(self, state, batch)
        lowered_by_trainer.append((jax.tree.map(lambda x: (x.shape, x.dtype), batch), lowered))
        return lowered

    monkeypatch.setattr(setup_lib.TrainSetup, "lower", spy)
    train(config, str(tmp_path / "workdir"))
    monkeypatch.undo()

    ((batch_shapes, trainer_lowered),) = lowered_by_trainer
    shape = BatchShape(
        length=batch_shapes.query.input_ids[0][1],
        query_patches=batch_shapes.query.pixel_values[0][1],
        candidate_patches=batch_shapes.candidate.pixel_values[0][1],
    )
    aot_lowered, aot_batch = lower_train_step(setup_lib.build(config), shape)
    assert jax.tree.map(lambda s: (s.shape, s.dtype), aot_batch.batch) == batch_shapes
    assert aot_lowered.as_text() == trainer_lowered.as_text()


# ============================================================================ estimates


def test_cost_model_time_is_never_below_the_compute_floor():
    from jfe_jax.train.aot_analysis import cost_model_time

    assert cost_model_time(0.02, 50.0, 0.5) == (1.0, "")  # one pass x loop factor
    seconds, note = cost_model_time(0.07, 6.5, 0.526)  # 0.455 s: under what peak allows
    assert seconds == 0.526 and "below the compute floor" in note
    seconds, note = cost_model_time(-0.3, 6.5, 0.526)  # unknown-cost ops miscounted
    assert seconds == 0.526 and "no usable optimal_seconds" in note


def test_restore_bound_is_the_largest_devices_state_shards_plus_the_largest_shard():
    from jfe_jax.train.aot import restore_peak_bytes

    config = parse_config("test", ["--config", STAGE2_DEMO, "--config.mesh.fsdp=8"])
    with config.unlocked():
        config.mesh.data = 1
    setup = setup_lib.build(config, mesh=make_mesh(dict(config.mesh)))
    # Counted independently: place zeros in the state's shardings and sum the shards each
    # device holds.
    held, largest = {}, 0
    for shape, sharding in zip(
        jax.tree_util.tree_leaves(setup.state_shapes),
        jax.tree_util.tree_leaves(setup.state_shardings),
    ):
        array = jax.device_put(np.zeros(shape.shape, shape.dtype), sharding)
        for shard in array.addressable_shards:
            held[shard.device] = held.get(shard.device, 0) + shard.data.nbytes
            largest = max(largest, shard.data.nbytes)
    assert len(held) == 8
    assert restore_peak_bytes(setup) == max(held.values()) + largest
    # fsdp=8 splits the big leaves: the bound is well under a whole state per device.
    assert max(held.values()) < 0.5 * sum(
        np.dtype(s.dtype).itemsize * np.prod(s.shape)
        for s in jax.tree_util.tree_leaves(setup.state_shapes)
    )


def test_the_mbeir_mixs_items_and_required_flops_do_not_depend_on_packing():
    _, _, plain = _demo_batch("mbeir")
    _, _, packed = _demo_batch(
        "mbeir",
        "--config.data.pack=True",
        "--config.data.pack_length=512",
        "--config.data.pack_items_per_row=2",  # a row's share (256) is not the items' L (128)
    )
    assert is_packed(packed.batch.query)
    assert packed.modalities == plain.modalities
    assert packed.required_flops == plain.required_flops
