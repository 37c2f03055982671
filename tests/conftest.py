"""Test setup: 8 fake CPU devices, so every sharding path runs on this machine."""

import os

# Must be set before jax is imported anywhere.
_DEVICES = "--xla_force_host_platform_device_count=8"
# Toy models: compiling, not running, is most of the tests' time. XLA's CPU backend at
# optimisation level 0 without its expensive LLVM passes compiles them about a third faster
# (tests/test_train_step.py: 127 -> 84 s on the 2-core machine); every comparison with a
# reference holds its stated tolerance with it (the whole suite passes either way), but one:
# tests/test_late_fusion.py compares two programs of the same float32 sums at 1e-6 and compiles
# them at XLA's defaults (at level 0 XLA orders an embedding gradient's additions apart). XLA's
# older elemental emitters instead of its MLIR fusion emitters halve the backend compile time
# again at level 0 (tests/test_train_step.py: 110 -> 72 s, backend compile 80 -> 44 s, on a
# 2-core machine at 120 GFLOP/s); at the default level they save nothing, so the demo and
# `jfe` keep XLA's defaults. The `jfe` runs the tests start as subprocesses add the same flags
# (JFE_TEST_COMPILE_FLAGS).
_COMPILE = (
    "--xla_backend_optimization_level=0 --xla_llvm_disable_expensive_passes=true"
    " --xla_cpu_use_fusion_emitters=false"
)
os.environ["JFE_TEST_COMPILE_FLAGS"] = _COMPILE
_flags = [f for f in os.environ.get("XLA_FLAGS", "").split() if f != _DEVICES]
os.environ["XLA_FLAGS"] = " ".join(dict.fromkeys(_flags + _COMPILE.split() + [_DEVICES]))
os.environ.setdefault("JAX_PLATFORMS", "cpu")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

import jax  # noqa: E402

jax.config.update("jax_default_matmul_precision", "highest")


def pytest_report_header(config):
    return f"jax {jax.__version__}, devices: {jax.device_count()} x {jax.devices()[0].platform}"
