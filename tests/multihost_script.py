"""Runs the trainer on ToyPairs as one process of a (possibly) multi-process CPU runtime.

    python multihost_script.py WORKDIR NUM_STEPS NUM_PROCESSES PROCESS_ID PORT

With NUM_PROCESSES = 1 the process holds all 8 CPU devices. With NUM_PROCESSES = 2 each
process holds 4 and they join over loopback (``127.0.0.1:PORT``, gloo collectives) into one
8-device runtime; each process feeds only the rows of every global batch that its devices
hold (process i: rows [i * B / 2, (i + 1) * B / 2)), as a real multi-host pipeline does.
Both processes write to the same WORKDIR (process 0 the metrics, both the checkpoints).
Used by test_multihost.py.

``JFE_TEST_PACK_VISION=1`` moves each host's candidate images into vision rows of their own
(``pack_vision`` at a fixed count: half the host's candidates, what every host must feed), as
``data.pack_vision_row_fraction=0.5`` makes the loader do.

``JFE_TEST_SIGTERM=1@2`` makes process 1 send itself SIGTERM as it draws its second batch (and
wait 3 s, so that the notice reaches every process before the run ends); a run stopped that way
prints "process I stopped at step S" and exits 0. ``JFE_TEST_LOG_EVERY`` sets
``train.log_every`` (default 1). Used by test_host_sync.py.
"""

import os
import signal
import sys
import time

TOTAL_DEVICES = 8
GLOBAL_BATCH = 8
SEED = 1

if len(sys.argv) != 6:
    sys.exit(f"usage: {sys.argv[0]} WORKDIR NUM_STEPS NUM_PROCESSES PROCESS_ID PORT")
WORKDIR, NUM_STEPS = sys.argv[1], int(sys.argv[2])
NUM_PROCESSES, PROCESS_ID, PORT = (int(a) for a in sys.argv[3:6])
if TOTAL_DEVICES % NUM_PROCESSES:
    sys.exit(f"NUM_PROCESSES={NUM_PROCESSES} does not divide the {TOTAL_DEVICES} devices")
# Must be set before jax is imported.
os.environ["XLA_FLAGS"] = (
    f"--xla_force_host_platform_device_count={TOTAL_DEVICES // NUM_PROCESSES} "
    + os.environ.get("JFE_TEST_COMPILE_FLAGS", "")  # conftest.py: faster compiles
).strip()
os.environ["JAX_PLATFORMS"] = "cpu"

sys.path.insert(0, os.path.dirname(__file__))

import jax  # noqa: E402

jax.config.update("jax_default_matmul_precision", "highest")

from train_fixtures import ToyPairs  # noqa: E402

from jfe_jax.models.sizes import get_size  # noqa: E402
from jfe_jax.train import mesh as mesh_lib  # noqa: E402
from jfe_jax.train.config_base import base_config  # noqa: E402
from jfe_jax.train.run_control import TrainingInterrupted  # noqa: E402
from jfe_jax.train.trainer import train  # noqa: E402


def host_rows(config, global_batch: int) -> slice:
    """The rows of each global batch whose shards live on this process's devices.

    ``global_batch_from_host`` places a process's local rows at exactly these indices, so
    feeding them reproduces the global batch a single process would see.
    """
    mesh = mesh_lib.make_mesh(dict(config.mesh))
    indices = mesh_lib.batch_sharding(mesh).addressable_devices_indices_map((global_batch,))
    starts = sorted({index[0].start or 0 for index in indices.values()})
    stops = sorted(
        {global_batch if index[0].stop is None else index[0].stop for index in indices.values()}
    )
    rows = slice(starts[0], stops[-1])
    if rows.stop - rows.start != global_batch // jax.process_count():
        raise ValueError(
            f"process {jax.process_index()} holds batch rows {starts}..{stops}, not one "
            f"contiguous block of {global_batch // jax.process_count()}"
        )
    return rows


class HostRows:
    """This process's share (``rows``) of each global batch drawn from ``source``."""

    def __init__(self, source, rows: slice):
        self.source, self.rows = source, rows

    def __iter__(self):
        return self

    def __next__(self):
        return jax.tree_util.tree_map(lambda x: x[self.rows], next(self.source))

    def get_state(self) -> dict:
        return self.source.get_state()

    def set_state(self, state: dict) -> None:
        self.source.set_state(state)


class PackVision(HostRows):
    """``HostRows`` whose candidate side has its images in fixed vision rows (``pack_vision``)."""

    def __init__(self, rows: HostRows, row_multiple: int):
        super().__init__(rows.source, rows.rows)
        self.inner, self.row_multiple = rows, row_multiple

    def __next__(self):
        from jfe_jax.models.packing import pack_vision

        batch = next(self.inner)
        items = len(batch.candidate.input_ids)
        rows = -(-items // 2 // self.row_multiple) * self.row_multiple
        return batch.replace(
            candidate=pack_vision(batch.candidate, row_multiple=self.row_multiple, num_rows=rows)
        )


class SigtermAt(HostRows):
    """``HostRows`` whose ``at``-th batch comes with a SIGTERM to this process."""

    def __init__(self, rows: HostRows, at: int):
        super().__init__(rows.source, rows.rows)
        self.at, self.drawn = at, 0

    def __next__(self):
        self.drawn += 1
        if self.drawn == self.at:
            os.kill(os.getpid(), signal.SIGTERM)
            time.sleep(3)
        return super().__next__()


def config(num_steps: int):
    c = base_config()
    c.data.global_batch_size = GLOBAL_BATCH
    c.mesh.data, c.mesh.fsdp, c.mesh.tensor = 2, 2, 2
    c.optimizer.learning_rate = 1e-3
    c.optimizer.warmup_steps = 1
    c.train.num_steps = num_steps
    c.train.log_every = int(os.environ.get("JFE_TEST_LOG_EVERY", "1"))
    c.train.checkpoint_every_steps = 2  # an intermediate save too, both processes taking part
    c.train.async_checkpointing = True
    c.lock()
    return c


def main() -> None:
    if NUM_PROCESSES > 1:
        jax.config.update("jax_cpu_collectives_implementation", "gloo")
        jax.distributed.initialize(
            coordinator_address=f"127.0.0.1:{PORT}",
            num_processes=NUM_PROCESSES,
            process_id=PROCESS_ID,
            initialization_timeout=120,
        )
    if jax.device_count() != TOTAL_DEVICES or jax.process_count() != NUM_PROCESSES:
        raise RuntimeError(
            f"expected {TOTAL_DEVICES} devices in {NUM_PROCESSES} processes, got "
            f"{jax.device_count()} in {jax.process_count()}"
        )
    c = config(NUM_STEPS)
    rows = host_rows(c, GLOBAL_BATCH)
    print(f"process {jax.process_index()} feeds rows {rows.start}:{rows.stop}", flush=True)
    data = HostRows(ToyPairs(get_size("tiny"), batch_size=GLOBAL_BATCH, seed=SEED), rows)
    if os.environ.get("JFE_TEST_PACK_VISION") == "1":
        mesh = mesh_lib.make_mesh(dict(c.mesh))
        data = PackVision(data, mesh_lib.local_data_parallel_shards(mesh))
        print(f"process {jax.process_index()} packs its candidate images", flush=True)
    process, _, batch = os.environ.get("JFE_TEST_SIGTERM", "").partition("@")
    if process and int(process) == jax.process_index():
        data = SigtermAt(data, int(batch))
    try:
        summary = train(c, WORKDIR, data=data)
    except TrainingInterrupted as e:
        print(f"process {jax.process_index()} stopped at step {e.step}", flush=True)
    else:
        print(f"process {jax.process_index()} finished step {summary.get('step')}", flush=True)
    if NUM_PROCESSES > 1:
        jax.distributed.shutdown()


if __name__ == "__main__":
    main()
