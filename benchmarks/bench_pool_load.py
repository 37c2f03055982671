"""Peak host memory of loading an export for exact search: the old path against the streamed
one (``jfe_jax.index.pool.load_exact_index``), side by side in one run (issue 32 item 6).

The pool is synthetic unit vectors written as an export with the real shard layout
(``embeddings.npy``, ``ids.json``, ``identity.json``, ``manifest.json`` per shard, and the
host metadata). Each path runs in a fresh process over 8 CPU devices (as the tests use) and
reports its resident-memory peak (VmHWM) above the process's resident memory just before the
load, so imports and the runtime are not counted. The old path is the loader and exact index
as they were: every shard read, then concatenated, then padded for the mesh, then placed
(on a CPU backend the devices' copies are host memory too).

`write_synthetic_export` and `measure_exact_load` are importable (tests/test_pool.py uses
them at a small size).

Usage: python benchmarks/bench_pool_load.py [--rows 500000] [--dim 1536] [--shard-size 4096]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time

os.environ.setdefault("JAX_PLATFORMS", "cpu")

import numpy as np  # noqa: E402

DEVICES = 8
_DEVICE_FLAG = "--xla_force_host_platform_device_count"


def write_synthetic_export(
    out_dir: str, num_rows: int, dim: int, *, shard_size: int = 4096, seed: int = 0
) -> dict:
    """Writes ``num_rows`` random unit vectors of ``dim`` as a one-host export in ``out_dir``,
    shard by shard (memory: one shard); returns its metadata."""
    from jfe_jax.index.export import IDENTITY_FILE, METADATA_PATTERN, SHARD_PATTERN
    from jfe_jax.index.integrity import write_manifest

    rng = np.random.default_rng(seed)
    identity = {
        "model": "synthetic",
        "checkpoint_step": None,
        "model_fingerprint": f"synthetic-{seed}",
        "item_format": {},
        "item_format_hash": "synthetic",
        "source": {"synthetic": f"{num_rows}x{dim}"},
        "shard_size": shard_size,
    }
    os.makedirs(out_dir, exist_ok=True)
    num_shards = -(-num_rows // shard_size)
    for shard in range(num_shards):
        first, count = shard * shard_size, min(shard_size, num_rows - shard * shard_size)
        rows = rng.standard_normal((count, dim), dtype=np.float32)
        rows /= np.linalg.norm(rows, axis=1, keepdims=True)
        path = os.path.join(out_dir, SHARD_PATTERN.format(shard))
        os.makedirs(path, exist_ok=True)
        np.save(os.path.join(path, "embeddings.npy"), rows)
        with open(os.path.join(path, IDENTITY_FILE), "w", encoding="utf-8") as f:
            json.dump(identity, f, indent=2, sort_keys=True)
        with open(os.path.join(path, "ids.json"), "w", encoding="utf-8") as f:
            json.dump([f"c{i}" for i in range(first, first + count)], f)
        write_manifest(path)
    metadata = {
        "format": "jfe-jax embeddings",
        **identity,
        "dim": dim,
        "prompt": None,
        "normalized": True,
        "total_items": num_rows,
        "num_shards": num_shards,
        "process_index": 0,
        "process_count": 1,
        "shards": list(range(num_shards)),
        "resumed_shards": [],
    }
    with open(os.path.join(out_dir, METADATA_PATTERN.format(0)), "w", encoding="utf-8") as f:
        json.dump(metadata, f, indent=2, sort_keys=True)
    return metadata


def measure_exact_load(export_dir: str, path: str = "new", devices: int = DEVICES) -> dict:
    """Loads the export for exact search in a fresh process over ``devices`` CPU devices;
    returns ``{"pool_bytes", "peak_bytes" (resident peak above the baseline), "seconds"}``.
    ``path``: "new" (``load_exact_index``) or "old" (the loader and index before it)."""
    env = dict(os.environ, JAX_PLATFORMS="cpu")
    flags = [f for f in env.get("XLA_FLAGS", "").split() if not f.startswith(_DEVICE_FLAG)]
    env["XLA_FLAGS"] = " ".join([*flags, f"{_DEVICE_FLAG}={devices}"])
    done = subprocess.run(
        [sys.executable, os.path.abspath(__file__), "--child", path, "--export", export_dir],
        env=env,
        capture_output=True,
        text=True,
    )
    if done.returncode:
        raise RuntimeError(f"the {path} load failed:\n{done.stderr[-3000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def _memory_kib(field: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise RuntimeError(f"/proc/self/status has no {field}")


def _old_exact_index(export_dir: str):
    """The loader and exact index before issue 32 item 6: (placed database, host rows, ids)."""
    import jax
    from jax.sharding import NamedSharding
    from jax.sharding import PartitionSpec as P

    from jfe_jax.index.exact import default_mesh
    from jfe_jax.index.export import SHARD_PATTERN

    with open(os.path.join(export_dir, "metadata-host000.json")) as f:
        metadata = json.load(f)
    shards, ids = [], []
    for shard in range(metadata["num_shards"]):
        path = os.path.join(export_dir, SHARD_PATTERN.format(shard))
        shards.append(np.load(os.path.join(path, "embeddings.npy")))
        with open(os.path.join(path, "ids.json")) as f:
            ids.extend(json.load(f))
    matrix = np.concatenate(shards)
    del shards
    mesh = default_mesh()
    num_shards = mesh.shape["db"]
    rows_per_shard = -(-matrix.shape[0] // num_shards)
    padded = np.pad(matrix, ((0, rows_per_shard * num_shards - matrix.shape[0]), (0, 0)))
    placed = jax.device_put(padded, NamedSharding(mesh, P("db", None))).block_until_ready()
    return placed, matrix, ids  # the old ExactIndex kept its host rows


def _child(path: str, export_dir: str) -> None:
    import jax

    from jfe_jax.index.exact import ExactIndex
    from jfe_jax.index.pool import load_exact_index, open_export

    # The runtime, its devices and a first placement, before the baseline.
    ExactIndex(np.ones((jax.device_count(), 8), np.float32))
    reader = open_export(export_dir, hash_embeddings=False)
    pool_bytes, num_rows = reader.nbytes, reader.num_rows
    del reader
    try:  # resets VmHWM to the current RSS (Linux >= 4.0)
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
    except OSError:
        pass
    baseline = _memory_kib("VmRSS")
    start = time.perf_counter()
    if path == "new":
        held = load_exact_index(export_dir)
        assert held[0].num_rows == num_rows and not held[0].streamed
    else:
        held = _old_exact_index(export_dir)
    seconds = time.perf_counter() - start
    peak = _memory_kib("VmHWM") - baseline
    print(json.dumps({"pool_bytes": pool_bytes, "peak_bytes": peak * 1024, "seconds": seconds}))


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--rows", type=int, default=500_000)
    ap.add_argument("--dim", type=int, default=1536)
    ap.add_argument("--shard-size", type=int, default=4096)
    ap.add_argument("--child", choices=["new", "old"], help=argparse.SUPPRESS)
    ap.add_argument("--export", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.child:
        _child(args.child, args.export)
        return 0

    import jax

    from jfe_jax.train.topology import time_matmul

    with tempfile.TemporaryDirectory(prefix="bench_pool_") as tmp:
        export_dir = os.path.join(tmp, "pool")
        start = time.perf_counter()
        write_synthetic_export(export_dir, args.rows, args.dim, shard_size=args.shard_size)
        write_s = time.perf_counter() - start
        results = {path: measure_exact_load(export_dir, path) for path in ("old", "new")}
    gflops = time_matmul(jax.devices()[0], 2048) / 1e9
    pool_gb = results["new"]["pool_bytes"] / 1e9
    print(
        f"pool {args.rows} x {args.dim} float32 = {pool_gb:.2f} GB in shards of "
        f"{args.shard_size} (written in {write_s:.0f} s); {DEVICES} CPU devices; JAX f32 "
        f"2048x2048 matmul {gflops:.0f} GFLOP/s"
    )
    print("| path | peak RSS above baseline, GB | x pool | load + place, s |")
    print("|---|---|---|---|")
    for path, label in (("old", "old (concatenate, pad, place)"), ("new", "streamed")):
        r = results[path]
        print(
            f"| {label} | {r['peak_bytes'] / 1e9:.2f} | {r['peak_bytes'] / r['pool_bytes']:.2f} "
            f"| {r['seconds']:.1f} |"
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
