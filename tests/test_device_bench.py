"""The accelerator benchmark (benchmarks/device) at tiny sizes on the CPU, so it cannot rot
between runs on the GPU machine; and its rewrite of GPU library matmuls for the FLOP count."""

import json
import math
import os
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DEVICE_DIR = os.path.join(ROOT, "benchmarks", "device")
sys.path.insert(0, DEVICE_DIR)

import bench_device  # noqa: E402

SECTIONS = ("environment", "correctness", "throughput", "train_step", "aot")


@pytest.fixture(scope="module")
def smoke(tmp_path_factory):
    """``run.sh --cpu-smoke``: (its JSON, its Markdown, its output), as the device runs it."""
    out = tmp_path_factory.mktemp("device_smoke")
    env = dict(os.environ, OUT=str(out), PYTHON=sys.executable, JAX_PLATFORMS="cpu")
    # One CPU device, as on the GPU machine's one chip; conftest.py's faster compiles.
    env["XLA_FLAGS"] = os.environ["JFE_TEST_COMPILE_FLAGS"]
    proc = subprocess.run(
        ["bash", os.path.join(DEVICE_DIR, "run.sh"), "--cpu-smoke"],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=240,  # about 50 s on the 2-core machine
    )
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-4000:]
    with open(out / "device_bench.json", encoding="utf-8") as f:
        data = json.load(f)
    markdown = (out / "device_bench.md").read_text(encoding="utf-8")
    assert (out / "run.log").read_text(encoding="utf-8").strip()
    return data, markdown, proc.stdout


def test_smoke_runs_every_section(smoke):
    data, markdown, _ = smoke
    assert data["mode"] == "cpu-smoke"
    for name in SECTIONS:
        assert data["sections"][name]["status"] == "ok", data["sections"][name]
    env = data["sections"]["environment"]
    assert env["versions"]["jax"] and env["versions"]["torch"]
    assert env["jax_bf16_tflops"] > 0
    for heading in ("| environment |", "Correctness:", "Encoder throughput:", "Train step:"):
        assert heading in markdown
    assert "`jfe aot`'s analysis" in markdown


def test_smoke_correctness_within_the_stated_tolerances(smoke):
    correctness = smoke[0]["sections"]["correctness"]
    rows = {row["name"]: row for row in correctness["comparisons"]}
    f32 = rows["float32: JAX vs PyTorch"]
    assert f32["relative_diff"] <= bench_device.F32_RELATIVE_MAX
    assert f32["min_cosine"] >= bench_device.F32_COSINE_MIN
    assert rows["bfloat16: JAX vs PyTorch"]["min_cosine"] > bench_device.BF16_COSINE_MIN
    assert correctness["passed"]


def test_smoke_throughput_and_train_step(smoke):
    sections = smoke[0]["sections"]
    throughput = sections["throughput"]
    assert [row["name"] for row in throughput["rows"]][-1].startswith("PyTorch")
    for row in throughput["rows"]:
        assert row["per_s"] > 0 and row["min_cosine"] > bench_device.BF16_COSINE_MIN, row
    assert throughput["jax_traces"] == 1  # Encoder.embed and the device-batch row: one program
    train = sections["train_step"]
    first, ran = train["candidates"]  # the smoke's first batch stands for one too large
    assert first["result"].startswith("does not fit") and first["batch"] > ran["batch"]
    assert ran["result"] == "ran" and ran == train["ran"]
    assert math.isfinite(ran["loss"]) and ran["step_s"] > 0
    assert ran["mfu"] > 0 and ran["mfu_required"] > 0
    aot = sections["aot"]
    predicted = {row["name"]: row["predicted"] for row in aot["rows"]}
    assert predicted["step s: max(compute floor, HBM floor)"] > 0
    assert aot["estimate"]["compiled_flops"] > 0


GEMM_HLO = """HloModule m

ENTRY %main (p0: bf16[64,128], p1: bf16[128,32]) -> bf16[64,32] {
  %p0 = bf16[64,128]{1,0} parameter(0)
  %p1 = bf16[128,32]{1,0} parameter(1)
  %custom-call.1 = (bf16[64,32]{1,0}, s8[4194304]{0}) custom-call(bf16[64,128]{1,0} %p0, \
bf16[128,32]{1,0} %p1), custom_call_target="__cublas$gemm", backend_config={"gemm_backend_config"\
:{"alpha_real":1,"dot_dimension_numbers":{"lhs_contracting_dimensions":["1"],\
"rhs_contracting_dimensions":["0"],"lhs_batch_dimensions":[],"rhs_batch_dimensions":[]}}}
  ROOT %get-tuple-element.1 = bf16[64,32]{1,0} get-tuple-element((bf16[64,32]{1,0}, \
s8[4194304]{0}) %custom-call.1), index=0
}
"""


def test_cublas_calls_are_counted_as_the_dots_they_compute():
    from jfe_jax.train.hlo_cost import hlo_costs

    assert hlo_costs(GEMM_HLO).matmul_flops == 0  # the TPU-oriented count misses them
    rewritten = bench_device.gpu_hlo_as_dots(GEMM_HLO)
    assert hlo_costs(rewritten).matmul_flops == 2 * 64 * 32 * 128
