"""``jfe aot``: TPU topology names, loop-aware HLO costs, and compiling configs for a TPU slice.

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
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from jfe_jax.train.aot import aot_main
from jfe_jax.train.hlo_cost import hlo_costs
from jfe_jax.train.topology import parse_topology, slice_shape

DEMO_CONFIG = os.path.join(os.path.dirname(__file__), "..", "configs", "stage1_demo.py")


def demo_args(batch_size: int = 16, batch_shape: str = "L=64,P=16") -> list[str]:
    """The demo model at a small batch: fast compiles (seconds on 2 CPU cores)."""
    return [
        "--config",
        DEMO_CONFIG,
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
    # the compiled step is expected near 0.55 of model FLOPs (measured 0.59).
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
    out = tmp_path / "aot.json"
    argv = [*demo_args(), "--config.optimizer.trainable=freeze_vision", "--programs", "train"]
    assert aot_main([*argv, "--topology", "v5e-8", "--json", str(out)]) == 0
    train = json.loads(out.read_text())["programs"]["train"]
    assert train["required_flops"] < train["model_flops"]
    assert 0.9 < train["compiled_flops"] * 8 / train["required_flops"] < 1.1
    assert train["mfu_required"] == pytest.approx(
        train["mfu"] * train["required_flops"] / train["model_flops"]
    )
