"""``jfe train`` and ``jfe demo`` through ``cli.main`` at toy size; test_interrupt.py runs it as
a subprocess and checks its exit status and output.

    python interrupt_script.py train WORKDIR NUM_STEPS
    python interrupt_script.py demo WORKDIR NUM_STEPS

``train`` reads resume_script.py's toy config and ToyPairs in place of the data pipeline.
``demo`` generates a tiny synthetic benchmark and trains with batch 8, one length bucket and
metrics at every step, stage 1 on ToyPairs (one compiled program per stage).

``JFE_TEST_SIGNAL=TERM@3`` (or ``INT@3``; ``stage2:TERM@3`` for one demo stage) makes the
training data iterator send that signal to this process as it yields its third batch, so the
run stops after a known step.
"""

import os
import signal
import sys

_flags = os.environ.get("XLA_FLAGS", "--xla_force_host_platform_device_count=8").split()
_flags += os.environ.get("JFE_TEST_COMPILE_FLAGS", "").split()  # conftest.py: faster compiles
os.environ["XLA_FLAGS"] = " ".join(dict.fromkeys(_flags))
sys.path.insert(0, os.path.dirname(__file__))

import jax  # noqa: E402

jax.config.update("jax_default_matmul_precision", "highest")

from train_fixtures import ToyPairs  # noqa: E402

import jfe_jax.demo  # noqa: E402
import jfe_jax.train.data  # noqa: E402
from jfe_jax.cli import main  # noqa: E402
from jfe_jax.data.synthetic import SyntheticConfig  # noqa: E402

HERE = os.path.dirname(os.path.abspath(__file__))
TINY_BENCHMARK = SyntheticConfig(
    train_queries_per_task=8, test_queries_per_task=4, num_image_captions=32, num_text_triples=64
)


class SignalAt:
    """Wraps a training data iterator; sends ``signum`` to this process at batch ``at``."""

    def __init__(self, inner, signum: int, at: int):
        self.inner, self.signum, self.at, self.count = inner, signum, at, 0

    def __next__(self):
        self.count += 1
        if self.count == self.at:
            os.kill(os.getpid(), self.signum)
        return next(self.inner)

    def get_state(self):
        return self.inner.get_state()

    def set_state(self, state):
        self.inner.set_state(state)


def tiny(make_config):
    def make():
        config = make_config()
        config.data.global_batch_size = 8
        config.data.length_buckets = (config.data.max_length,)
        config.train.log_every = 1
        return config

    return make


def patch_data(toy_stages: tuple[str, ...]) -> None:
    real = jfe_jax.train.data.make_train_data
    stage, _, spec = os.environ.get("JFE_TEST_SIGNAL", "").rpartition(":")
    name, _, at = spec.partition("@")

    def make_train_data(config, workdir, model_config, item_format=None):
        if config.stage in toy_stages:
            data = ToyPairs(model_config, batch_size=8, seed=1)
        else:
            data = real(config, workdir, model_config, item_format)
        if name and stage in ("", config.stage):
            data = SignalAt(data, getattr(signal, "SIG" + name), int(at))
        return data

    jfe_jax.train.data.make_train_data = make_train_data


if __name__ == "__main__":
    # Ctrl-C as in a terminal's foreground: when the test run itself was started as a
    # background job, SIGINT arrives ignored, and jfe leaves an ignored SIGINT alone.
    signal.signal(signal.SIGINT, signal.default_int_handler)
    command, workdir, steps = sys.argv[1], sys.argv[2], sys.argv[3]
    if command == "train":
        patch_data(toy_stages=("stage1", "stage2"))
        argv = ["train", "--config", os.path.join(HERE, "resume_script.py"), "--workdir", workdir]
        argv.append(f"--config.train.num_steps={steps}")
        if jax.device_count() != 8:  # resume_script's mesh is 2 x 2 x 2
            argv += ["--config.mesh.data=-1", "--config.mesh.fsdp=1", "--config.mesh.tensor=1"]
    else:
        patch_data(toy_stages=("stage1",))
        jfe_jax.demo.SyntheticConfig = lambda: TINY_BENCHMARK
        jfe_jax.demo.demo_stage1_config = tiny(jfe_jax.demo.demo_stage1_config)
        jfe_jax.demo.demo_stage2_config = tiny(jfe_jax.demo.demo_stage2_config)
        argv = ["demo", "--workdir", workdir, "--steps", steps]
    sys.exit(main(argv))
