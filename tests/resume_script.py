"""Runs the trainer on ToyPairs; used by test_trainer.py as a killable subprocess.

    python resume_script.py WORKDIR NUM_STEPS [HANG_AFTER_BATCHES]

With HANG_AFTER_BATCHES the data iterator blocks forever after that many batches, so the
test can SIGKILL the process at a known point.
"""

import os
import sys
import time

_flags = os.environ.get("XLA_FLAGS", "--xla_force_host_platform_device_count=8").split()
_flags += os.environ.get("JFE_TEST_COMPILE_FLAGS", "").split()  # conftest.py: faster compiles
os.environ["XLA_FLAGS"] = " ".join(dict.fromkeys(_flags))
sys.path.insert(0, os.path.dirname(__file__))

import jax  # noqa: E402

jax.config.update("jax_default_matmul_precision", "highest")

from train_fixtures import ToyPairs  # noqa: E402

from jfe_jax.models.sizes import get_size  # noqa: E402
from jfe_jax.train.config_base import base_config  # noqa: E402
from jfe_jax.train.trainer import train  # noqa: E402


class Hanging(ToyPairs):
    def __init__(self, *args, hang_after, **kwargs):
        super().__init__(*args, **kwargs)
        self.hang_after = hang_after

    def __next__(self):
        if self.hang_after is not None and self.position >= self.hang_after:
            time.sleep(3600)
        return super().__next__()


def config(num_steps):
    c = base_config()
    c.data.global_batch_size = 8
    c.mesh.data, c.mesh.fsdp, c.mesh.tensor = 2, 2, 2
    c.optimizer.learning_rate = 1e-3
    c.optimizer.warmup_steps = 2
    c.train.num_steps = num_steps
    c.train.log_every = 1
    c.train.checkpoint_every_steps = 3
    c.train.async_checkpointing = True
    c.lock()
    return c


def get_config():
    """The toy config as a ``jfe train --config`` file (interrupt_script.py)."""
    return config(6)


if __name__ == "__main__":
    workdir, steps = sys.argv[1], int(sys.argv[2])
    hang = int(sys.argv[3]) if len(sys.argv) > 3 else None
    data = Hanging(get_size("tiny"), batch_size=8, seed=1, hang_after=hang)
    train(config(steps), workdir, data=data)
