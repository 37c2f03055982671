"""One accelerator run: the 2b model and its stage-2 train step on a GPU, against PyTorch.

Sections, in order; each one's numbers (or its error) are written to ``--out`` as soon as it
ends (``device_bench.json`` and ``device_bench.md``), so a run cut short still reports:

  environment  versions, the device, its bf16 matmul FLOP/s (N x N x N, measured now)
  correctness  the architecture at 2 decoder + 2 vision layers, random weights, JAX against
               transformers' PyTorch Qwen2-VL on the same device: float32 (max |diff| of
               the final hidden states, precision "highest" / TF32 off) and bfloat16
               (embedding cosine)
  throughput   the full architecture, random weights, bfloat16: ``Encoder.embed`` embeddings/s
               on a mixed batch (text-only rows, rows with one image of up to 448 x 448
               pixels) against transformers' PyTorch model (sdpa) with the same weights
  train_step   the stage-2 train step of ``configs/stage2_2b.py`` (LoRA, vision frozen,
               bfloat16, gradient cache, scanned layers, remat) on one device, at the largest
               per-device batch of ``--train-batches`` that fits; step time, MFU (6N and
               required FLOPs) against the measured peak, peak memory
  aot          ``jfe aot``'s analysis (``jfe_jax.train.aot_analysis.analyse``) of the very
               program that ran: predicted memory and step time next to the measured ones

``--cpu-smoke`` runs every section at tiny sizes on the CPU (the test suite runs it).

Usage: benchmarks/device/run.sh [--cpu-smoke] [--train-batches 64,32,16] [--out DIR]
"""

from __future__ import annotations

import argparse
import dataclasses
import gc
import importlib.metadata
import inspect
import math
import os
import platform
import re
import sys
import tempfile
import time
from types import SimpleNamespace

from device_report import Report, markdown  # beside this script

ROOT = os.path.abspath(os.path.join(os.path.dirname(__file__), "..", ".."))
sys.path.insert(0, os.path.join(ROOT, "tests"))  # hf_reference, train_fixtures
sys.path.insert(0, ROOT)

# Tolerances the correctness section is held to (the CPU parity tests use the same float32
# cosine; the relative hidden-state bound allows the GPU's other summation order).
F32_RELATIVE_MAX = 1e-4  # max |diff| of hidden states / max |reference|
F32_COSINE_MIN = 0.9999
BF16_COSINE_MIN = 0.99  # JAX bfloat16 against PyTorch bfloat16, every row

STAGE2_CONFIG = os.path.join(ROOT, "configs", "stage2_2b.py")
PACKAGES = (
    "jax",
    "jaxlib",
    "flax",
    "optax",
    "orbax-checkpoint",
    "ml_collections",
    "numpy",
    "transformers",
    "torch",
)
# Approximate HBM bandwidth by device kind (vendor figures), for the memory floor only.
HBM_BYTES_PER_S = {"h200": 4.8e12, "h100 pcie": 2.0e12, "h100": 3.35e12}


@dataclasses.dataclass(frozen=True)
class Plan:
    """Sizes of one run: the GPU's, or the CPU smoke's."""

    matmul_size: int  # N of the bf16 N x N x N matmul peak
    parity_size: str  # named size cut to 2 decoder + 2 vision layers
    parity_rows: tuple  # make_inputs rows: text runs and (h, w) image grids
    embed_size: str
    embed_batch: int
    embed_grids: tuple  # image grids (h, w) in patches, taking turns over the image rows
    embed_text: int  # text tokens of a text-only row (image rows carry a third of it)
    warmup: int
    repeats: int
    train_size: str  # model.size of the stage-2 config
    train_shape: str  # aot.batch_shape_for spec; "" = the config's L=512, 1024 patches
    train_batches: str  # per-device batches to try, largest first
    train_steps: int  # timed steps after the first (compiling) one
    deadline_s: float  # no train candidate starts after this many seconds of the run
    oom_above: int = 0  # smoke only: batches above this count as not fitting


GPU = Plan(
    matmul_size=8192,
    parity_size="2b",
    parity_rows=([30, (16, 16), 20], [90], [10, (12, 20), 40], [60, (8, 8), 5]),
    embed_size="2b",
    embed_batch=64,
    embed_grids=((32, 32), (24, 32), (32, 24), (28, 28), (20, 28), (16, 32), (32, 16), (24, 24)),
    embed_text=128,
    warmup=2,
    repeats=5,
    train_size="2b",
    train_shape="",
    train_batches="32,16",  # H100 80GB: 32 does not fit, 16 does (24 ran out of memory)
    train_steps=3,
    deadline_s=480.0,
)
SMOKE = dataclasses.replace(
    GPU,
    matmul_size=256,
    parity_size="tiny",
    parity_rows=([6, (4, 4), 3], [9], [2, (2, 6), 4]),
    embed_size="tiny",
    embed_batch=8,
    embed_grids=((4, 4), (4, 6), (8, 8)),
    embed_text=24,
    warmup=1,
    repeats=2,
    train_size="tiny",
    train_shape="L=32,P=16",
    train_batches="8,4",
    train_steps=1,
    deadline_s=100.0,
    oom_above=4,
)


# ============================================================================ helpers


def device_memory() -> dict:
    """JAX's allocator figures of device 0 (empty on the CPU backend)."""
    import jax

    return jax.devices()[0].memory_stats() or {}


def free_memory() -> None:
    import jax

    gc.collect()
    jax.clear_caches()
    try:
        import torch

        if torch.cuda.is_available():
            torch.cuda.empty_cache()
    except ImportError:
        pass


def time_calls(calls: dict, warmup: int, repeats: int) -> tuple[dict, dict, dict]:
    """(best seconds, mean seconds, last result) per call; the calls take turns."""
    for call in calls.values():
        for _ in range(warmup):
            call()
    times = {name: [] for name in calls}
    results = {}
    for _ in range(repeats):
        for name, call in calls.items():
            start = time.perf_counter()
            results[name] = call()
            times[name].append(time.perf_counter() - start)
    best = {k: min(v) for k, v in times.items()}
    mean = {k: sum(v) / len(v) for k, v in times.items()}
    return best, mean, results


def shallow(config, text_layers: int, vision_layers: int):
    """``config`` with fewer decoder layers and vision blocks."""
    return dataclasses.replace(
        config,
        text=dataclasses.replace(config.text, num_layers=text_layers),
        vision=dataclasses.replace(config.vision, depth=vision_layers),
    )


def torch_model(directory: str, dtype, device):
    from transformers import Qwen2VLForConditionalGeneration

    model = Qwen2VLForConditionalGeneration.from_pretrained(
        directory, dtype=dtype, attn_implementation="sdpa"
    )
    return model.to(device).eval()


def torch_inputs(model, ids, mask, pixels, grid) -> dict:
    """transformers' forward arguments on the model's device (``mm_token_type_ids`` where the
    installed version takes it: 5.2x does, earlier 5.x compute it from the ids)."""
    import torch

    dev = model.device
    kwargs = dict(
        input_ids=torch.as_tensor(ids, dtype=torch.long, device=dev),
        attention_mask=torch.as_tensor(mask, dtype=torch.long, device=dev),
    )
    if "mm_token_type_ids" in inspect.signature(model.model.forward).parameters:
        kwargs["mm_token_type_ids"] = torch.as_tensor(
            (ids == model.config.image_token_id).astype("int64"), device=dev
        )
    if pixels is not None:
        kwargs["pixel_values"] = torch.as_tensor(pixels, device=dev).to(model.dtype)
        kwargs["image_grid_thw"] = torch.as_tensor(grid, dtype=torch.long, device=dev)
    return kwargs


def torch_embed(model, kwargs):
    """Last-real-token final hidden states (right padding), L2-normalised, float32 numpy."""
    import torch

    hidden = model.model(**kwargs).last_hidden_state
    last = kwargs["attention_mask"].sum(dim=1) - 1
    pooled = hidden[torch.arange(hidden.shape[0], device=hidden.device), last].float()
    return torch.nn.functional.normalize(pooled, dim=-1).cpu().numpy()


# ============================================================================ sections


def environment(plan: Plan) -> dict:
    import jax
    import jax.numpy as jnp
    import torch

    versions = {"python": platform.python_version()}
    for name in PACKAGES:
        try:
            versions[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            versions[name] = "not installed"
    dev = jax.devices()[0]
    n = plan.matmul_size
    a = jax.device_put(jnp.ones((n, n), jnp.bfloat16) * 0.01, dev)
    matmul = jax.jit(lambda x: x @ x)
    matmul(a).block_until_ready()
    best, calls = float("inf"), 10
    for _ in range(3):  # 10 back-to-back calls per timing: launch gaps amortised
        start = time.perf_counter()
        for _ in range(calls):
            out = matmul(a)
        out.block_until_ready()
        best = min(best, (time.perf_counter() - start) / calls)
    result = {
        "versions": versions,
        "platform": dev.platform,
        "device": dev.device_kind if dev.platform != "cpu" else platform.processor() or "cpu",
        "device_count": jax.device_count(),
        "memory_gib": device_memory().get("bytes_limit", math.nan) / 2**30,
        "matmul_size": n,
        "jax_bf16_tflops": 2 * n**3 / best / 1e12,
        "torch_cuda": torch.cuda.is_available(),
    }
    if torch.cuda.is_available():
        t = torch.full((n, n), 0.01, dtype=torch.bfloat16, device="cuda")
        torch.matmul(t, t)
        torch.cuda.synchronize()
        best = float("inf")
        for _ in range(3):
            start = time.perf_counter()
            for _ in range(calls):
                torch.matmul(t, t)
            torch.cuda.synchronize()
            best = min(best, (time.perf_counter() - start) / calls)
        result["torch_bf16_tflops"] = 2 * n**3 / best / 1e12
        result["torch_device"] = torch.cuda.get_device_name(0)
        del t
    del a
    print(f"{result['device']}: bf16 matmul {result['jax_bf16_tflops']:.1f} TFLOP/s (JAX)")
    return result


def correctness(plan: Plan, torch_device) -> dict:
    import jax
    import numpy as np
    import torch
    from hf_reference import make_inputs
    from train_fixtures import spread_weights

    from jfe_jax.encoder import Encoder, EncoderOptions
    from jfe_jax.models.sizes import get_size

    config = shallow(get_size(plan.parity_size), 2, 2)
    f32 = Encoder.init(config, seed=0)
    f32.params = jax.jit(spread_weights)(f32.params)  # norms 1 +- 0.2, kernels 0.08
    bf16 = Encoder(
        config,
        jax.tree_util.tree_map(lambda x: x.astype(jax.numpy.bfloat16), f32.params),
        EncoderOptions(dtype="bfloat16", param_dtype="bfloat16"),
    )
    ids, mask, pixels, grid = make_inputs(config, list(plan.parity_rows), seed=1)
    with tempfile.TemporaryDirectory() as tmp:
        f32.save_pretrained(tmp)
        ref32 = torch_model(tmp, torch.float32, torch_device)
        # Loaded in bfloat16 as a user would (rotary tables stay float32; .to() would not).
        ref16 = torch_model(tmp, torch.bfloat16, torch_device)
    tf32 = (torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32)
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
    try:
        with torch.inference_mode():
            kwargs = torch_inputs(ref32, ids, mask, pixels, grid)
            hidden_ref = ref32.model(**kwargs).last_hidden_state.float().cpu().numpy()
            emb_ref = torch_embed(ref32, kwargs)
    finally:
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = tf32
    with jax.default_matmul_precision("highest"):
        hidden = f32.hidden_states(ids, mask, pixels, grid)
        emb32 = f32.embed(ids, mask, pixels, grid)
    with torch.inference_mode():
        emb_torch16 = torch_embed(ref16, torch_inputs(ref16, ids, mask, pixels, grid))
    emb16 = bf16.embed(ids, mask, pixels, grid)

    real = mask.astype(bool)
    diff = float(np.max(np.abs(hidden[real] - hidden_ref[real])))
    scale = float(np.max(np.abs(hidden_ref[real])))

    def cosine(a, b):
        return float(np.min(np.sum(a * b, axis=-1)))

    def row(name, min_cosine, tolerance, passed, **extra):
        return {
            "name": name,
            "min_cosine": min_cosine,
            "tolerance": tolerance,
            "pass": bool(passed),
            **extra,
        }

    f32_cosine, bf16_cosine = cosine(emb32, emb_ref), cosine(emb16, emb_torch16)
    rows = [
        row(
            "float32: JAX vs PyTorch",
            f32_cosine,
            f"relative <= {F32_RELATIVE_MAX:g}, cosine >= {F32_COSINE_MIN}",
            diff / scale <= F32_RELATIVE_MAX and f32_cosine >= F32_COSINE_MIN,
            max_abs_diff=diff,
            relative_diff=diff / scale,
        ),
        row(
            "bfloat16: JAX vs PyTorch",
            bf16_cosine,
            f"cosine >= {BF16_COSINE_MIN}",
            bf16_cosine >= BF16_COSINE_MIN,
        ),
        row("bfloat16 JAX vs float32 PyTorch", cosine(emb16, emb_ref), "(information)", True),
        row(
            "bfloat16 PyTorch vs float32 PyTorch",
            cosine(emb_torch16, emb_ref),
            "(information)",
            True,
        ),
    ]
    for row in rows:
        extra = f", max|diff| {diff:.3g} (max|ref| {scale:.3g})" if "max_abs_diff" in row else ""
        print(f"  {row['name']}: cosine {row['min_cosine']:.6f}{extra}")
    return {
        "model": f"{plan.parity_size} at 2 decoder + 2 vision layers",
        "rows": int(ids.shape[0]),
        "images": 0 if grid is None else int(len(grid)),
        "hidden_max_abs_ref": scale,
        "comparisons": rows,
        "passed": all(r["pass"] for r in rows),
    }


def embed_rows(plan: Plan) -> list:
    """Half text-only rows, half one image of ``embed_grids`` with a little text around it."""
    rows = []
    for i in range(plan.embed_batch):
        if i % 2 == 0:
            rows.append([plan.embed_text - 2 * (i % 8)])
        else:
            text = plan.embed_text // 3
            rows.append([text // 2, plan.embed_grids[(i // 2) % len(plan.embed_grids)], text])
    return rows


def throughput(plan: Plan, torch_device) -> dict:
    import jax
    import numpy as np
    import torch
    from hf_reference import make_inputs

    from jfe_jax.encoder import Encoder, EncoderOptions
    from jfe_jax.models.packing import pack_vision
    from jfe_jax.models.sizes import get_size

    config = get_size(plan.embed_size)
    start = time.perf_counter()
    encoder = Encoder.init(config, EncoderOptions(dtype="bfloat16", param_dtype="bfloat16"))
    jax.block_until_ready(encoder.params)
    print(f"  JAX init {time.perf_counter() - start:.1f} s", flush=True)
    ids, mask, pixels, grid = make_inputs(config, embed_rows(plan), seed=2)
    with tempfile.TemporaryDirectory() as tmp:
        start = time.perf_counter()
        encoder.save_pretrained(tmp, dtype="bfloat16")
        model = torch_model(tmp, torch.bfloat16, torch_device)
        print(f"  same weights into PyTorch {time.perf_counter() - start:.1f} s", flush=True)
    on_device = jax.device_put(pack_vision(encoder.prepare(ids, mask, pixels, grid), coarse=True))
    with torch.inference_mode():
        kwargs = torch_inputs(model, ids, mask, pixels, grid)
    torch_name = "PyTorch (transformers, sdpa)"
    calls = {
        "JAX Encoder.embed (host prepare + transfer included)": lambda: encoder.embed(
            ids, mask, pixels, grid
        ),
        # The jit Encoder.embed calls, on the batch it makes, already on the device.
        "JAX forward, batch on device": lambda: np.asarray(
            encoder._embed(encoder.params, on_device)
        ),
        torch_name: lambda: torch_embed(model, kwargs),
    }
    start = time.perf_counter()
    calls["JAX Encoder.embed (host prepare + transfer included)"]()
    print(f"  JAX compile + first call {time.perf_counter() - start:.1f} s", flush=True)
    if torch.cuda.is_available():
        torch.cuda.reset_peak_memory_stats()
    with torch.inference_mode():
        best, mean, results = time_calls(calls, plan.warmup, plan.repeats)
    ref = results[torch_name]
    rows = []
    for name in calls:
        rows.append(
            dict(
                name=name,
                best_ms=1e3 * best[name],
                mean_ms=1e3 * mean[name],
                per_s=len(ids) / best[name],
                x_torch=best[torch_name] / best[name],
                min_cosine=float(np.min(np.sum(results[name] * ref, axis=-1))),
            )
        )
        print(f"  {name}: {1e3 * best[name]:.1f} ms, x{rows[-1]['x_torch']:.2f}")
    torch_peak = torch.cuda.max_memory_allocated() / 2**30 if torch.cuda.is_available() else None
    result = {
        "model": plan.embed_size,
        "params_m": encoder.num_params() / 1e6,
        "batch": int(len(ids)),
        "images": int(len(grid)),
        "patches": int(pixels.shape[0]),
        "tokens": int(ids.shape[1]),
        "jax_patch_budget": int(on_device.masked.pixel_values.shape[1]),
        "jax_vision_rows": int(on_device.masked.pixel_values.shape[0]),
        "warmup": plan.warmup,
        "repeats": plan.repeats,
        "rows": rows,
        "torch_peak_gib": torch_peak,
        "jax_peak_gib": device_memory().get("peak_bytes_in_use", math.nan) / 2**30,
        "jax_traces": encoder.trace_count,  # 1: both JAX rows ran one compiled program
    }
    return result  # the models go with this frame


def train_batch(model_config, shape, rows: int):
    """A real batch in the data pipeline's layout (checked against ``jfe aot``'s, from
    ``jfe_jax.train.aot_batch.train_batch``): each side half text-only rows, half one image
    filling the side's patch budget, one row of full length; distinct keys (no duplicate
    positives)."""
    import numpy as np
    from hf_reference import make_inputs

    from jfe_jax.models.batches import TrainBatch
    from jfe_jax.models.inputs import prepare_batch

    merge = model_config.vision.spatial_merge_size

    def side(patches: int, seed: int) -> dict:
        grid = int(math.isqrt(patches)) // merge * merge
        layout = []
        for i in range(rows):
            if patches and i % 2:
                image = grid * grid // merge**2 + 2
                text = shape.length - image - 8 * (i % 4)
                layout.append([text // 4, (grid, grid), text - text // 4])
            else:
                layout.append([shape.length - 8 * (i % 4)])
        ids, mask, pixels, grids = make_inputs(model_config, layout, seed=seed)
        return prepare_batch(
            model_config, ids, mask, pixels, grids, num_patches=patches if patches else None
        )

    keys = np.arange(rows, dtype=np.int32)
    return TrainBatch(
        query=side(shape.query_patches, 3),
        candidate=side(shape.candidate_patches, 4),
        query_key=keys,
        candidate_key=keys,
        hard_negative_key=np.zeros((rows, 0), np.int32),
        hard_negative_count=np.zeros(rows, np.int32),
        skipped_records=np.zeros(rows, np.int32),
    )


def train_step(plan: Plan, batches: list, peak: float, report: Report) -> dict:
    import jax

    from jfe_jax.models.flops import train_step_flops, train_step_required_flops
    from jfe_jax.train import aot
    from jfe_jax.train import mesh as mesh_lib
    from jfe_jax.train.aot_batch import train_batch as aot_train_batch
    from jfe_jax.train.metrics import reduce_metrics
    from jfe_jax.train.setup import build

    overrides = ["--config.mesh.fsdp=1", "--config.mesh.data=-1"]
    config = aot.parse_config("bench_device", ["--config", STAGE2_CONFIG, *overrides])
    config.model.size = plan.train_size
    shape = aot.batch_shape_for(config, plan.train_shape)
    mesh = mesh_lib.make_mesh(dict(config.mesh), devices=jax.devices()[:1])
    setup = build(config, mesh=mesh)  # the trainer's builder; rebuilt per batch size below
    model_config = setup.model_config
    batch_sharding = mesh_lib.batch_sharding(mesh)
    result = {
        "config": os.path.relpath(STAGE2_CONFIG, ROOT) + f" (model.size={plan.train_size})",
        "batch_shape": dataclasses.asdict(shape),
        "peak_tflops": peak / 1e12,
        "candidates": [],
    }
    report.data["sections"]["train_step"] = {"status": "running", **result}

    def new_state():
        return setup.new_state(setup.random_params(0))

    state, chunk_cap = new_state(), config.train.grad_cache_chunk
    for rows in batches:
        chunk = min(chunk_cap, rows) if chunk_cap else 0
        while chunk and rows % chunk:
            chunk -= 1
        row = {"batch": rows, "chunk": chunk, "result": "skipped"}
        result["candidates"].append(row)
        if report.elapsed() > plan.deadline_s:
            row["result"] = f"skipped: past the {plan.deadline_s:.0f} s deadline"
            continue
        config.data.global_batch_size, config.train.grad_cache_chunk = rows, chunk
        setup = build(config, mesh=mesh)  # the same state layout; this batch size's step
        host = train_batch(model_config, shape, rows)
        want = aot_train_batch(config, model_config, mesh, shape).batch
        got = jax.tree_util.tree_map(lambda x: (x.shape, str(x.dtype)), host)
        if got != jax.tree_util.tree_map(lambda s: (s.shape, str(s.dtype)), want):
            raise ValueError(f"batch layout differs from jfe aot's: {got} vs {want}")
        batch = jax.device_put(host, batch_sharding)
        print(f"  batch {rows}, chunk {chunk}: compiling", flush=True)
        try:
            start = time.perf_counter()
            compiled = setup.lower(setup.abstract_state(), batch).compile()
            row["compile_s"] = time.perf_counter() - start
            memory = compiled.memory_analysis()
            stats = device_memory()
            free = stats["bytes_limit"] - stats["bytes_in_use"] if stats else math.inf
            if plan.oom_above and rows > plan.oom_above:
                free = 0  # the smoke's stand-in for a batch too large: the fallback runs
            if memory is not None:
                extra = (
                    memory.temp_size_in_bytes
                    + memory.output_size_in_bytes
                    - memory.alias_size_in_bytes
                )
                row["predicted_gib"] = (memory.argument_size_in_bytes + extra) / 2**30
            if free < (extra if memory is not None else 0):
                row["result"] = "does not fit (compiler's memory analysis)"
                report.write()
                continue
            times = []
            for i in range(1 + plan.train_steps):  # the first call is not timed
                start = time.perf_counter()
                state, metrics = compiled(state, batch)
                jax.block_until_ready((state, metrics))
                times.append(time.perf_counter() - start)
                print(f"    step {i}: {times[-1]:.3f} s", flush=True)
        except Exception as e:  # noqa: BLE001 - out of memory: the next, smaller batch
            text = f"{type(e).__name__}: {e}"
            if "RESOURCE_EXHAUSTED" not in text and "out of memory" not in text.lower():
                raise
            row["result"] = "out of memory: " + text.splitlines()[0][:200]
            del batch
            state = None
            free_memory()
            state = new_state()
            report.write()
            continue
        seconds = sorted(times[1:])[len(times[1:]) // 2]  # median of the timed steps
        flops = train_step_flops(model_config, host)
        required = train_step_required_flops(
            model_config,
            host,
            trainable=config.optimizer.trainable,
            lora_rank=config.model.lora_rank,
            lora_targets=tuple(config.model.lora_targets),
        )
        stats = device_memory()
        row.update(
            result="ran",
            step_s=seconds,
            step_times=times,
            examples_per_s=rows / seconds,
            model_tflop=flops / 1e12,
            required_tflop=required / 1e12,
            mfu=flops / seconds / peak,
            mfu_required=required / seconds / peak,
            peak_gib=stats.get("peak_bytes_in_use", math.nan) / 2**30,
            loss=reduce_metrics(jax.device_get(metrics))["loss"],
        )
        result.update(ran=row, compiled=compiled)
        break
    return result


class _Precompiled:
    """What ``aot_analysis.analyse`` takes as a lowered program: ``compile()`` returns the
    executable that ran, its HLO text with GPU library matmuls written as dots (see
    ``gpu_hlo_as_dots``)."""

    def __init__(self, compiled):
        self._compiled = compiled

    def compile(self):
        return self

    def memory_analysis(self):
        return self._compiled.memory_analysis()

    def cost_analysis(self):
        return self._compiled.cost_analysis()

    def as_text(self) -> str:
        return gpu_hlo_as_dots(self._compiled.as_text())


_LIBRARY_MATMUL = re.compile(r'custom_call_target="__cublas\$(?:gemm|lt\$matmul[^"]*)"')


def gpu_hlo_as_dots(text: str) -> str:
    """HLO text with cuBLAS matmul custom calls rewritten as the ``dot`` they compute.

    XLA:GPU lowers many dots to ``custom-call`` (``__cublas$gemm``, ``__cublas$lt$matmul``)
    whose output is a (result, workspace) tuple and whose contraction sits in the backend
    config; ``jfe_jax.train.hlo_cost`` counts ``dot`` instructions only. The rewrite keeps the
    name and operands, so the loop-aware count sees them.
    """
    from jfe_jax.train.hlo_cost import _parse_instruction

    lines = []
    for line in text.splitlines():
        if _LIBRARY_MATMUL.search(line):
            try:
                instruction = _parse_instruction(line)
            except ValueError:  # not an instruction line hlo_cost can read: left as it is
                instruction = None
            type_text = instruction.type_text if instruction else ""
            result = re.search(r"\w+\[[\d,]*\](?:\{[^}]*\})?", type_text)
            dims = re.search(r'"lhs_contracting_dimensions":\[([^\]]*)\]', line)
            if result and dims:
                contracting = ",".join(d.strip().strip('"') for d in dims.group(1).split(","))
                head = re.match(r"^(\s*(?:ROOT\s+)?%?)", line).group(1)
                operands = ", ".join(f"%{o}" for o in instruction.operands[:2])
                line = (
                    f"{head}{instruction.name} = {result.group(0)} dot({operands}), "
                    f"lhs_contracting_dims={{{contracting}}}"
                )
        lines.append(line)
    return "\n".join(lines)


def aot_analysis(train: dict, peak: float, hbm_gib: float, device: str) -> dict:
    from jfe_jax.train.aot_analysis import analyse
    from jfe_jax.train.hlo_cost import hlo_costs

    if "ran" not in train:
        raise ValueError("no train step ran, so there is nothing to compare with")
    ran = train["ran"]
    # What analyse reads of a TpuTopology, for one device at the measured peak (no ICI, and no
    # per-op cycle estimates on GPU: their clock is unknown).
    spec = SimpleNamespace(peak_flops=peak, hbm_gib=hbm_gib, ici_gbps=math.nan, clock_hz=math.nan)
    topology = SimpleNamespace(spec=spec, chips=1, hbm_bytes_per_chip=hbm_gib * 2**30)
    est = analyse(
        "train",
        _Precompiled(train["compiled"]),
        topology,
        ran["model_tflop"] * 1e12,
        ran["required_tflop"] * 1e12,
    )
    cost = train["compiled"].cost_analysis()
    cost = (cost[0] if isinstance(cost, (list, tuple)) else cost) or {}
    plain = hlo_costs(train["compiled"].as_text()).matmul_flops
    bandwidth = next((v for k, v in HBM_BYTES_PER_S.items() if k in device.lower()), math.nan)
    memory_floor = float(cost.get("bytes accessed", math.nan)) * est.loop_factor / bandwidth

    def row(name, predicted, measured):
        ratio = measured / predicted if predicted and math.isfinite(predicted) else math.nan
        return dict(name=name, predicted=predicted, measured=measured, ratio=ratio)

    rows = [
        row(
            "step s: cost model (compute floor where XLA gives none)",
            est.cost_model_seconds,
            ran["step_s"],
        ),
        row(
            "step s: max(compute floor, HBM floor)",
            max(est.compute_floor_seconds, memory_floor),
            ran["step_s"],
        ),
        row(
            "memory GiB: arguments + temporaries + outputs - aliased + code",
            est.total_bytes / 2**30,
            ran["peak_gib"],
        ),
        row("MFU (6N) at the predicted time", est.mfu, ran["mfu"]),
        row("MFU (required FLOPs) at the predicted time", est.mfu_required, ran["mfu_required"]),
        row("compiled matmul TFLOP / 6N TFLOP", est.compiled_flops / est.model_flops, math.nan),
    ]
    notes = list(est.notes) + [
        f"XLA cost_analysis keys: {sorted(k for k in cost if '{' not in k)}",
        f"matmul FLOPs with cuBLAS calls counted {est.compiled_flops:.4g}, dots only {plain:.4g}",
        f"HBM floor: cost_analysis bytes accessed x loop factor {est.loop_factor:.1f} / "
        f"{bandwidth / 1e12:.2f} TB/s (vendor figure)",
    ]
    return {
        "batch": ran["batch"],
        "rows": rows,
        "notes": notes,
        "estimate": {k: v for k, v in dataclasses.asdict(est).items() if k != "top_ops"},
    }


# ============================================================================ main


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cpu-smoke", action="store_true", help="tiny sizes on the CPU")
    parser.add_argument(
        "--out",
        default=os.environ.get("OUT") or os.path.join(ROOT, "benchmarks", "device", "out"),
        help="where the JSON and Markdown go",
    )
    parser.add_argument("--train-batches", default="", help="per-device batches, largest first")
    parser.add_argument("--sections", default="correctness,throughput,train_step,aot")
    parser.add_argument(
        "--deadline-s", type=float, default=0.0, help="no train candidate starts after this"
    )
    args = parser.parse_args(argv)
    plan = SMOKE if args.cpu_smoke else GPU
    if args.train_batches:
        plan = dataclasses.replace(plan, train_batches=args.train_batches)
    if args.deadline_s:
        plan = dataclasses.replace(plan, deadline_s=args.deadline_s)
    if args.cpu_smoke:
        os.environ["JAX_PLATFORMS"] = "cpu"
    os.environ.setdefault("XLA_PYTHON_CLIENT_PREALLOCATE", "false")  # PyTorch shares the GPU

    import jax
    import torch

    if args.cpu_smoke:  # checks that the code runs, not how fast: compile quickly
        jax.config.update("jax_disable_most_optimizations", True)
        torch.set_num_threads(os.cpu_count() or 1)
    elif jax.devices()[0].platform != "gpu":
        print(f"warning: JAX runs on {jax.devices()[0].platform}; pass --cpu-smoke for CPU sizes")
    torch_device = torch.device(
        "cuda" if torch.cuda.is_available() and not args.cpu_smoke else "cpu"
    )
    report = Report(os.path.abspath(args.out), "cpu-smoke" if args.cpu_smoke else "gpu")
    wanted = args.sections.split(",")
    env = report.section("environment", environment, plan)
    peak = env.get("jax_bf16_tflops", math.nan) * 1e12
    if "correctness" in wanted:
        report.section("correctness", correctness, plan, torch_device)
        free_memory()
    if "throughput" in wanted:
        report.section("throughput", throughput, plan, torch_device)
        free_memory()
    train = {}
    if "train_step" in wanted:
        batches = [int(b) for b in plan.train_batches.split(",")]

        def run_train():
            train.update(train_step(plan, batches, peak, report))
            return {k: v for k, v in train.items() if k != "compiled"}

        report.section("train_step", run_train)
    if "aot" in wanted:
        hbm = env.get("memory_gib", math.nan)
        report.section("aot", aot_analysis, train, peak, hbm, env.get("device", ""))
    report.write()
    print("\n" + markdown(report.data))
    print(f"wrote {report.out}/device_bench.json and device_bench.md")
    failed = [k for k, v in report.data["sections"].items() if v["status"] != "ok"]
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
