"""Test setup: 8 fake CPU devices, so every sharding path runs on this machine."""

import os

# Must be set before jax is imported anywhere.
_DEVICES = "--xla_force_host_platform_device_count=8"
os.environ["XLA_FLAGS"] = " ".join(
    [f for f in os.environ.get("XLA_FLAGS", "").split() if f != _DEVICES] + [_DEVICES]
)
# The `jfe` runs the tests start as subprocesses (toy models: compiling, not running, is most
# of their time) add these to their XLA_FLAGS: XLA's CPU backend then skips its expensive
# LLVM passes, about a third off each run. Tests in this process keep the default code
# generation, whose rounding the comparisons with float64 references were written against.
os.environ["JFE_TEST_COMPILE_FLAGS"] = (
    "--xla_backend_optimization_level=0 --xla_llvm_disable_expensive_passes=true"
)
os.environ.setdefault("JAX_PLATFORMS", "cpu")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

import jax  # noqa: E402

jax.config.update("jax_default_matmul_precision", "highest")


def pytest_report_header(config):
    return f"jax {jax.__version__}, devices: {jax.device_count()} x {jax.devices()[0].platform}"
