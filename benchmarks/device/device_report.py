"""The device benchmark's results: one dict, written as JSON and Markdown after each section."""

from __future__ import annotations

import json
import math
import os
import time
import traceback


class Report:
    """The run's results, rewritten to ``out`` after every section."""

    def __init__(self, out: str, mode: str):
        self.out, self.start = out, time.perf_counter()
        self.data = {"mode": mode, "started": time.strftime("%Y-%m-%d %H:%M:%S"), "sections": {}}
        os.makedirs(out, exist_ok=True)

    def elapsed(self) -> float:
        return time.perf_counter() - self.start

    def section(self, name: str, fn, *args):
        """Runs ``fn(*args) -> dict``; records it, or its error, and writes the files."""
        print(f"\n=== {name} (t={self.elapsed():.0f} s)", flush=True)
        start = time.perf_counter()
        try:
            result = {"status": "ok", **fn(*args)}
        except Exception as e:  # noqa: BLE001 - recorded; the next section still runs
            traceback.print_exc()
            lines = traceback.format_exc().strip().splitlines()
            result = {
                **self.data["sections"].get(name, {}),  # what it wrote while running
                "status": "error",
                "error": f"{type(e).__name__}: {e}"[:2000],
                "traceback": lines[-12:],
            }
        result["seconds"] = round(time.perf_counter() - start, 1)
        self.data["sections"][name] = result
        self.write()
        print(f"=== {name}: {result['status']} in {result['seconds']} s", flush=True)
        return result

    def write(self) -> None:
        self.data["elapsed_s"] = round(self.elapsed(), 1)
        with open(os.path.join(self.out, "device_bench.json"), "w", encoding="utf-8") as f:
            json.dump(_clean(self.data), f, indent=2, default=str)
        with open(os.path.join(self.out, "device_bench.md"), "w", encoding="utf-8") as f:
            f.write(markdown(self.data))


def _clean(value):
    """JSON-ready: numpy scalars as Python numbers, NaN and infinities as null."""
    if isinstance(value, dict):
        return {str(k): _clean(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_clean(v) for v in value]
    if hasattr(value, "item") and getattr(value, "ndim", 1) == 0:
        value = value.item()
    if isinstance(value, float) and not math.isfinite(value):
        return None
    return value


def _fmt(value, spec: str) -> str:
    if value is None or (isinstance(value, float) and not math.isfinite(value)):
        return "-"
    return format(value, spec)


def markdown(data: dict) -> str:
    """The tables of ``benchmarks/README.md``'s "Accelerator (measured)"."""
    s = data["sections"]
    env = s.get("environment", {})
    lines = [f"# Accelerator benchmark ({data['mode']}, {env.get('device', '?')})", ""]
    for name, sec in s.items():
        if sec["status"] != "ok":
            lines += [
                f"**{name}: {sec['status']}** ({sec.get('seconds')} s): "
                f"`{sec.get('error', '')[:300]}`",
                "",
            ]
    if env.get("status") == "ok":
        lines += ["| environment | |", "|---|---|"]
        lines += [f"| {k} | {v} |" for k, v in env["versions"].items()]
        lines += [
            f"| device | {env['device']} ({env['device_count']} visible, "
            f"{_fmt(env['memory_gib'], '.1f')} GiB for JAX) |",
            f"| bf16 matmul {env['matmul_size']}^3, JAX | {env['jax_bf16_tflops']:.3g} TFLOP/s |",
            f"| bf16 matmul {env['matmul_size']}^3, PyTorch | "
            f"{_fmt(env.get('torch_bf16_tflops'), '.3g')} TFLOP/s |",
            "",
        ]
    if s.get("correctness", {}).get("status") == "ok":
        c = s["correctness"]
        lines += [
            f"Correctness: {c['model']}, random weights, {c['rows']} rows "
            f"({c['images']} images), JAX vs transformers on the same device.",
            "",
            "| comparison | max abs diff (hidden) | relative | min embedding cosine "
            "| tolerance | pass |",
            "|---|---:|---:|---:|---|---|",
        ]
        for row in c["comparisons"]:
            lines.append(
                f"| {row['name']} | {_fmt(row.get('max_abs_diff'), '.3g')} "
                f"| {_fmt(row.get('relative_diff'), '.2e')} | {row['min_cosine']:.6f} "
                f"| {row['tolerance']} | {'yes' if row['pass'] else 'NO'} |"
            )
        lines.append("")
    if s.get("throughput", {}).get("status") == "ok":
        t = s["throughput"]
        lines += [
            f"Encoder throughput: {t['model']} ({t['params_m']:.4g}M params), bfloat16, batch "
            f"{t['batch']} ({t['images']} images, {t['patches']} patches, {t['tokens']} "
            f"tokens/row padded); best of {t['repeats']} after {t['warmup']} warm-up calls.",
            "",
            "| implementation | ms/batch (best) | ms/batch (mean) | embeddings/s | x PyTorch "
            "| min cosine vs PyTorch |",
            "|---|---:|---:|---:|---:|---:|",
        ]
        for row in t["rows"]:
            lines.append(
                f"| {row['name']} | {row['best_ms']:.1f} | {row['mean_ms']:.1f} "
                f"| {row['per_s']:.1f} | {row['x_torch']:.2f} | {row['min_cosine']:.5f} |"
            )
        lines.append("")
    if "train_step" in s and s["train_step"].get("candidates"):
        t = s["train_step"]
        lines += [
            f"Train step: {t['config']} (LoRA, vision frozen, bfloat16), one device, "
            f"L={t['batch_shape']['length']}, patches {t['batch_shape']['query_patches']}/"
            f"{t['batch_shape']['candidate_patches']} per row; peak = the measured bf16 matmul.",
            "",
            "| per-device batch | grad-cache chunk | result | compile s | step s | examples/s "
            "| 6N TFLOP | required TFLOP | MFU 6N | MFU required | peak GiB | predicted GiB |",
            "|---:|---:|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
        ]
        for r in t["candidates"]:
            lines.append(
                f"| {r['batch']} | {r['chunk']} | {r['result']} | {_fmt(r.get('compile_s'), '.0f')}"
                f" | {_fmt(r.get('step_s'), '.3f')} | {_fmt(r.get('examples_per_s'), '.1f')} "
                f"| {_fmt(r.get('model_tflop'), '.1f')} | {_fmt(r.get('required_tflop'), '.1f')}"
                f" | {_fmt(r.get('mfu'), '.1%')} | {_fmt(r.get('mfu_required'), '.1%')} "
                f"| {_fmt(r.get('peak_gib'), '.1f')} | {_fmt(r.get('predicted_gib'), '.1f')} |"
            )
        lines.append("")
    if s.get("aot", {}).get("status") == "ok":
        a = s["aot"]
        lines += [
            f"`jfe aot`'s analysis of the program that ran (batch {a['batch']}):",
            "",
            "| quantity | predicted | measured | measured / predicted |",
            "|---|---:|---:|---:|",
        ]
        for row in a["rows"]:
            lines.append(
                f"| {row['name']} | {_fmt(row['predicted'], '.4g')} "
                f"| {_fmt(row['measured'], '.4g')} | {_fmt(row['ratio'], '.2f')} |"
            )
        lines += [""] + [f"- note: {n}" for n in a["notes"]] + [""]
    lines.append(f"Total {data.get('elapsed_s')} s.")
    return "\n".join(lines) + "\n"
