"""The stage-2 data build at real M-BEIR scale: wall time, records/s, bytes, peak RSS.

Generates an M-BEIR-shaped set as the real one is laid out (``--records`` training records in
UniIR's 16-task proportions, M-BEIR paper table 1: about 1.1M records in all; distinct JPEG
photos of 640x480 to 1024x768, ``bench_host_pipeline.make_photo``: a query image where the
task's query has one, a positive of its own per record, two hard negatives drawn from the
pool), then builds its ``union_train`` pairs with one hard negative per record as the 2b
stage-2 config reads them, in fresh subprocesses, side by side:

  tfds     TFDS's own writer (``download_and_prepare``: image bytes inside every record). Only
           while the examples stay under TFDS's 1000 MiB in-memory limit: past it TFDS needs
           TensorFlow (the row says so instead).
  store-1  ``build_dataset``, images read into the data root's image store by 1 process
  store-N  the same with N processes (``--workers``, default every core), into a fresh store
  reuse    a second workdir on the same root: the store is reused, only records are written

Columns: wall seconds, records/s, the image phase and record phase seconds, bytes written
(records, store) per record and relative to the distinct image bytes, peak RSS of the build
process (VmHWM, pool workers not included; they hold one image at a time). The 1.1M-record
estimate for an 8-core host assumes the image phase scales with cores (one process per core,
measured per core here) and the record phase stays on one core (it is serial), with the
measured ratio of distinct images to records.

Then, with ``--parts`` (default all), the other real-scale tables of issue 32, each from its own
benchmark: the host pipeline's examples/s per process at the 2b format with its per-stage
profile (``bench_host_pipeline``), export items/s and host share with ``tiny`` and ``small``
(``bench_export_pool``), and the exact-search peak RSS of a 500k x 1536 pool
(``bench_pool_load``), each beside the matmul rate measured with it.

Usage: python benchmarks/bench_mbeir_scale.py [--records 2000] [--root DIR] [--workers N]
           [--parts build,pipeline,export,pool] [--pool-rows 500000]
"""

from __future__ import annotations

import argparse
import json
import os
import random
import shutil
import subprocess
import sys
import tempfile
from typing import Any

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

# UniIR's M-BEIR training queries per task (M-BEIR paper, table 1; rounded).
TASK_SIZES = {
    "visualnews_task0": 99_903, "mscoco_task0": 100_000, "fashion200k_task0": 15_000,
    "webqa_task1": 16_000, "edis_task2": 26_000, "webqa_task2": 17_000,
    "visualnews_task3": 100_000, "mscoco_task3": 113_695, "fashion200k_task3": 15_000,
    "nights_task4": 16_000, "oven_task6": 150_000, "infoseek_task6": 141_000,
    "fashioniq_task7": 16_000, "cirr_task7": 26_000, "oven_task8": 157_000,
    "infoseek_task8": 143_000,
}  # fmt: skip
FULL_RECORDS = sum(TASK_SIZES.values())
# (query modality, candidate modality) by task id, as jfe_jax.data.mbeir.TASK_MODALITIES.
MODALITIES = {
    0: ("text", "image"), 1: ("text", "text"), 2: ("text", "image,text"),
    3: ("image", "text"), 4: ("image", "image"), 6: ("image,text", "text"),
    7: ("image,text", "image"), 8: ("image,text", "image,text"),
}  # fmt: skip
DATASET_IDS = {name: i for i, name in enumerate(sorted({t.split("_")[0] for t in TASK_SIZES}))}


def _photo(rng: random.Random, path: str) -> None:
    import numpy as np
    from bench_host_pipeline import make_photo

    width, height = rng.choice([(640, 480), (800, 600), (1024, 768), (768, 1024), (480, 640)])
    image = make_photo(np.random.default_rng(rng.getrandbits(32)), width, height)
    image.save(path, quality=90)


def generate(root: str, records: int, seed: int = 0) -> dict[str, Any]:
    """Writes the M-BEIR-shaped set under ``root`` (reused when its manifest matches)."""
    manifest = os.path.join(root, "bench_manifest.json")
    wanted = {"records": records, "seed": seed, "version": 1}
    if os.path.exists(manifest):
        with open(manifest) as f:
            info = json.load(f)
        if info["settings"] == wanted:
            return info
    shutil.rmtree(root, ignore_errors=True)
    rng = random.Random(seed)
    for folder in ("query/union_train", "cand_pool/global", "instructions", "images"):
        os.makedirs(os.path.join(root, folder), exist_ok=True)
    counts = {t: max(1, round(records * n / FULL_RECORDS)) for t, n in TASK_SIZES.items()}
    pool, queries, images = [], [], 0

    def image() -> str:
        nonlocal images
        relative = f"images/{images // 1000:03d}/{images:07d}.jpg"
        os.makedirs(os.path.join(root, os.path.dirname(relative)), exist_ok=True)
        _photo(rng, os.path.join(root, relative))
        images += 1
        return relative

    def candidate(dataset: int, modality: str) -> str:
        did = f"{dataset}:{len(pool)}"
        pool.append({
            "did": did, "modality": modality,
            "txt": None if modality == "image" else f"candidate text {len(pool)} " * 4,
            "img_path": image() if "image" in modality else None,
        })  # fmt: skip
        return did

    for task, count in counts.items():
        task_id = int(task.split("task")[1])
        q_modality, c_modality = MODALITIES[task_id]
        dataset = DATASET_IDS[task.split("_")[0]]
        for n in range(count):
            positive = candidate(dataset, c_modality)
            negatives = [candidate(dataset, c_modality) for _ in range(2)]
            queries.append({
                "qid": f"{dataset}:{len(queries)}", "query_modality": q_modality,
                "query_txt": None if q_modality == "image" else f"a query about item {n} " * 3,
                "query_img_path": image() if "image" in q_modality else None,
                "pos_cand_list": [positive], "neg_cand_list": negatives, "task_id": task_id,
            })  # fmt: skip
            if len(queries) % 500 == 0:
                print(f"  generated {len(queries)} records, {images} images", flush=True)
    with open(os.path.join(root, "query/union_train/mbeir_union_up_train.jsonl"), "w") as f:
        f.writelines(json.dumps(q) + "\n" for q in queries)
    with open(os.path.join(root, "cand_pool/global/mbeir_union_train_cand_pool.jsonl"), "w") as f:
        f.writelines(json.dumps(c) + "\n" for c in pool)
    with open(os.path.join(root, "instructions/query_instructions.tsv"), "w") as f:
        f.write("dataset_id\tquery_modality\tcand_modality\tprompt_1\n")
        for name, dataset in DATASET_IDS.items():
            for q_modality, c_modality in sorted(set(MODALITIES.values())):
                f.write(f"{dataset}\t{q_modality}\t{c_modality}\tRetrieve for {name}.\n")
    info = {"settings": wanted, "records": len(queries), "images": images}
    with open(manifest, "w") as f:
        json.dump(info, f)
    return info


CHILD = r"""
import json, os, sys, time
sys.path.insert(0, os.getcwd())
mode, root, data_dir, store, workers = sys.argv[1:]
from jfe_jax.data.tfds_builders import MbeirTrainPairs, build_dataset
from jfe_jax.data.image_store import ImageStore
config = dict(mbeir_root=root, query_split="union_train", max_hard_negatives=1)
report = {}
started = time.perf_counter()
if mode == "tfds":
    builder = MbeirTrainPairs(data_dir=data_dir, config=MbeirTrainPairs.CONFIG_CLASS(**config))
    try:
        builder.download_and_prepare()
    except ImportError as error:
        report["error"] = f"needs TensorFlow: {error}"
    report["images_s"] = 0.0
else:
    builder = MbeirTrainPairs(data_dir=data_dir, config=MbeirTrainPairs.CONFIG_CLASS(**config))
    paths = set(builder.image_paths(builder.input_root(None)))
    ImageStore(store, workers=int(workers)).ensure(root, paths)
    report["images_s"] = time.perf_counter() - started
    report["distinct_images"] = len(paths)
    report["distinct_image_bytes"] = sum(os.path.getsize(os.path.join(root, p)) for p in paths)
    build_dataset(MbeirTrainPairs, data_dir, image_store=store, workers=int(workers), **config)
report["wall_s"] = time.perf_counter() - started
with open("/proc/self/status") as f:
    report["peak_rss_mb"] = next(int(l.split()[1]) for l in f if l.startswith("VmHWM")) / 1024
print("REPORT " + json.dumps(report))
"""


def _folder_bytes(path: str) -> int:
    return sum(os.path.getsize(os.path.join(d, n)) for d, _, names in os.walk(path) for n in names)


def build(mode: str, root: str, data_dir: str, store: str, workers: int) -> dict[str, Any]:
    """One build in a fresh process; its report."""
    result = subprocess.run(
        [sys.executable, "-c", CHILD, mode, root, data_dir, store, str(workers)],
        capture_output=True,
        text=True,
        cwd=os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
    )
    lines = [line for line in result.stdout.splitlines() if line.startswith("REPORT ")]
    if result.returncode or not lines:
        raise RuntimeError(f"{mode} build failed:\n{result.stderr[-3000:]}")
    report = json.loads(lines[-1][len("REPORT ") :])
    report["records_bytes"] = _folder_bytes(data_dir)
    report["store_bytes"] = _folder_bytes(store) if mode != "tfds" else 0
    return report


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--records", type=int, default=2000)
    parser.add_argument("--root", default="", help="where the set is generated (reused)")
    parser.add_argument("--workers", type=int, default=os.cpu_count() or 1)
    parser.add_argument("--skip-tfds", action="store_true")
    parser.add_argument(
        "--parts",
        default="build,pipeline,export,pool",
        help="which tables: build, pipeline (host examples/s, bench_host_pipeline), export "
        "(items/s and host share, bench_export_pool), pool (exact-search peak RSS, "
        "bench_pool_load)",
    )
    parser.add_argument("--pool-rows", type=int, default=500_000)
    args = parser.parse_args(argv)
    parts = set(args.parts.split(","))
    if "build" in parts:
        build_table(args)
    if "pipeline" in parts:
        pipeline_table()
    if "export" in parts:
        export_table()
    if "pool" in parts:
        pool_table(args.pool_rows)
    return 0


def pipeline_table() -> None:
    from bench_host_pipeline import profile_host_pipeline

    result = profile_host_pipeline(64, rounds=3)
    print(f"\nhost pipeline, 2b stage-2 format, one process ({result['examples']} examples per "
          f"round; matmul {result['matmul_gflops']:.0f} GFLOP/s)")  # fmt: skip
    stages = list(result["current"]["ms_per_example"])
    print("| implementation | examples/s | " + " | ".join(stages) + " |")
    print("|" + "---|" * (len(stages) + 2))
    for name in ("baseline", "current"):
        row = result[name]
        cells = " | ".join(f"{row['ms_per_example'][s]:.2f}" for s in stages)
        print(f"| {name} | {row['examples_per_s']:.1f} | {cells} |")


def export_table() -> None:
    from bench_export_pool import measure_export
    from bench_train_step import matmul_peak

    print(f"\nexport (matmul {matmul_peak() / 1e9:.0f} GFLOP/s)")
    print("| size | items | variant | items/s | host share |\n|---|---|---|---|---|")
    for size, n in (("tiny", 128), ("small", 48)):
        for name, workers, pack in (("before", 0, False), ("after", 2, True)):
            r = measure_export(size, n, workers, pack)
            print(f"| {size} | {n} | {name} | {r['items_per_s']:.1f} | {r['host_share']:.0%} |")


def pool_table(rows: int) -> None:
    from bench_pool_load import measure_exact_load, write_synthetic_export
    from bench_train_step import matmul_peak

    with tempfile.TemporaryDirectory(prefix="bench_pool_") as tmp:
        write_synthetic_export(os.path.join(tmp, "pool"), rows, 1536)
        results = {p: measure_exact_load(os.path.join(tmp, "pool"), p) for p in ("old", "new")}
    print(f"\nexact search load, {rows} x 1536 float32 (matmul {matmul_peak() / 1e9:.0f} GFLOP/s)")
    print("| path | peak RSS above baseline GB | x pool | seconds |\n|---|---|---|---|")
    for path, r in results.items():
        print(f"| {path} | {r['peak_bytes'] / 1e9:.2f} | {r['peak_bytes'] / r['pool_bytes']:.2f} "
              f"| {r['seconds']:.1f} |")  # fmt: skip


def build_table(args) -> None:
    from bench_train_step import matmul_peak

    scratch = tempfile.mkdtemp(prefix="mbeir_scale_")
    root = args.root or os.path.join(scratch, "mbeir", "set")
    print(f"generating {args.records} records under {root} ...", flush=True)
    info = generate(root, args.records)
    gflops = matmul_peak() / 1e9
    rows = {}
    if not args.skip_tfds:
        rows["tfds"] = build("tfds", root, f"{scratch}/tfds", f"{scratch}/unused", 0)
    rows["store-1"] = build("store", root, f"{scratch}/w1", f"{scratch}/store1", 1)
    rows[f"store-{args.workers}"] = build(
        "store", root, f"{scratch}/wN", f"{scratch}/storeN", args.workers
    )
    rows["reuse"] = build("store", root, f"{scratch}/w2", f"{scratch}/storeN", args.workers)
    n = info["records"]
    print(f"\n{n} records, {info['images']} images generated; matmul {gflops:.0f} GFLOP/s; "
          f"{os.cpu_count()} cores")  # fmt: skip
    header = "| build | wall s | records/s | images s | records s | bytes/record | x distinct images | peak RSS MB |"  # noqa: E501
    print(header + "\n|" + "---|" * 8)
    distinct = rows["store-1"]["distinct_image_bytes"]
    for name, r in rows.items():
        if "error" in r:
            print(f"| {name} | {r['wall_s']:.1f} | - | - | - | - | - | {r['peak_rss_mb']:.0f} "
                  f"| ({r['error'][:60]})")  # fmt: skip
            continue
        written = r["records_bytes"] + (r["store_bytes"] if name != "reuse" else 0)
        print(
            f"| {name} | {r['wall_s']:.1f} | {n / r['wall_s']:.0f} | {r['images_s']:.1f} | "
            f"{r['wall_s'] - r['images_s']:.1f} | {written / n / 1e3:.1f} KB | "
            f"{written / distinct:.3f} | {r['peak_rss_mb']:.0f} |"
        )
    one = rows["store-1"]
    per_image = one["images_s"] / one["distinct_images"]
    per_record = (one["wall_s"] - one["images_s"]) / n
    ratio = one["distinct_images"] / n
    estimate = FULL_RECORDS * (per_record + ratio * per_image / 8)
    print(
        f"\n1.1M-record estimate on 8 cores: {estimate / 60:.1f} min "
        f"({per_image * 1e3:.2f} ms per image per core, {ratio:.2f} distinct images per "
        f"record, record phase {per_record * 1e6:.0f} us per record on one core)"
    )
    shutil.rmtree(scratch, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
