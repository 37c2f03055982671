"""Train-step FLOP/s on CPU: the jitted contrastive step of a model size against the matmul peak.

For each configuration (rows per side, tokens per row, scanned layers, remat policy, donated
state) it builds the real train step (``make_train_step`` with ``make_optimizer``'s AdamW,
warmup + cosine, clipping, weight decay; every parameter trained but the fixed temperature),
feeds a ToyPairs batch (query: text only; candidate: every other row carries a 4x4-patch image)
and times whole steps.
Model FLOPs per step come from ``jfe_jax.models.flops.train_step_flops`` (3 x forward, every
side, padded shapes; remat recomputation not counted), so FLOP/s = model FLOPs / step time.
They count the full model: every query against every key, the last layer at every position.
The step does less (causal attention in query blocks; with unrolled layers the last layer's
queries and MLP only at the pooled tokens), so the table also gives the matmul FLOPs of the
compiled program (``jfe_jax.train.hlo_cost``, loop-aware, remat recomputation included) and
the rate they imply: the hardware's share of the peak.

Every configuration is compiled and warmed up first; then --repeats rounds each time the
machine's jitted float32 2048x2048 matmul and one step of every configuration, so load changes
hit all rows alike. Step times are the best over the rounds; the table divides by the best
matmul measurement (the least loaded), so the percentages are conservative. The machine is
shared, so the load average is printed with the table.

Usage: python benchmarks/bench_train_step.py --configs 16x64,32x128,32x128:scan,32x128:remat
  (a configuration is ROWSxLENGTH followed by any of :scan, :remat (full), :nodonate and an
  attention implementation, e.g. :dot_product_attention; warm-up is at least one step)
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import sys
import time

os.environ.setdefault("JAX_PLATFORMS", "cpu")

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "tests"))
from train_fixtures import ToyPairs  # noqa: E402

from jfe_jax.encoder import EncoderOptions  # noqa: E402
from jfe_jax.encoder_params import init_params  # noqa: E402
from jfe_jax.models import layers  # noqa: E402
from jfe_jax.models.flops import train_step_flops  # noqa: E402
from jfe_jax.models.padding import padding_report  # noqa: E402
from jfe_jax.models.sizes import get_size  # noqa: E402
from jfe_jax.train import config_base  # noqa: E402
from jfe_jax.train.hlo_cost import hlo_costs  # noqa: E402
from jfe_jax.train.optimizer import make_optimizer  # noqa: E402
from jfe_jax.train.step import TrainState, make_train_step  # noqa: E402
from jfe_jax.train.topology import time_matmul  # noqa: E402

DEFAULT_CONFIGS = (
    "16x32,16x64,32x64,32x128,32x128:dot_product_attention,32x128:scan,32x128:remat,32x128:nodonate"
)


@dataclasses.dataclass(frozen=True)
class StepConfig:
    """One row of the table."""

    rows: int  # rows per side (query and candidate)
    length: int  # tokens per row
    scan: bool = False  # scan over layers (stacked params) instead of unrolling
    remat: str = "none"  # rematerialisation policy per layer
    donate: bool = True  # donate the train state to the step (buffers reused in place)
    attention: str = config_base.DEFAULTS.model.attention_impl  # attention (layers.py)

    @classmethod
    def parse(cls, text: str) -> StepConfig:
        shape, *flags = text.split(":")
        rows, length = (int(x) for x in shape.split("x"))
        impls = [f for f in flags if f in layers.ATTENTION_IMPLS]
        unknown = set(flags) - {"scan", "remat", "nodonate", *impls}
        if unknown or len(impls) > 1:
            raise ValueError(
                f"bad flags in {text!r}: expected scan, remat, nodonate and at most one of "
                f"{layers.ATTENTION_IMPLS}"
            )
        return cls(
            rows,
            length,
            scan="scan" in flags,
            remat="full" if "remat" in flags else "none",
            donate="nodonate" not in flags,
            attention=impls[0] if impls else config_base.DEFAULTS.model.attention_impl,
        )


def matmul_peak(repeats: int = 5) -> float:
    """FLOP/s of a jitted float32 2048 x 2048 matmul, measured now (not the cached figure)."""
    return time_matmul(jax.devices()[0], 2048, repeats)


def build_step(model_config, cfg: StepConfig, warmup: int):
    """(a call running one step and waiting for it, the batch, the compiled program's matmul
    FLOPs), compiled and warmed up."""
    options = EncoderOptions(scan_layers=cfg.scan, remat=cfg.remat, attention_impl=cfg.attention)
    module = options.module(model_config)
    params = init_params(module, jax.random.key(0))
    optimizer = make_optimizer(
        learning_rate=1e-4,
        warmup_steps=10,
        total_steps=1000,
        end_learning_rate=0.0,
        weight_decay=0.01,
        max_grad_norm=1.0,
    )
    # As the trainer does with a fixed temperature: everything trains but logit_scale.
    frozen = {"logit_scale": params["logit_scale"]}
    trainable = {k: v for k, v in params.items() if k != "logit_scale"}
    state = TrainState(
        step=jnp.zeros((), jnp.int32),
        trainable=trainable,
        frozen=frozen,
        opt_state=jax.jit(optimizer.init)(trainable),
    )
    step = make_train_step(
        module,
        optimizer,
        learn_temperature=False,
        symmetric=False,
        mask_false_negatives=True,
        grad_cache_chunk=0,
    )
    jitted = jax.jit(step, donate_argnums=0 if cfg.donate else ())
    batch = jax.device_put(next(ToyPairs(model_config, batch_size=cfg.rows, length=cfg.length)))
    holder = {"state": state}

    def run_step():
        holder["state"], metrics = jitted(holder["state"], batch)
        jax.block_until_ready(metrics)

    compiled = jitted.lower(holder["state"], batch).compile()
    run_step()  # the first call traces
    for _ in range(warmup - 1):  # the traced call above counts as one
        run_step()
    return run_step, batch, hlo_costs(compiled.as_text()).matmul_flops


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--size", default="small")
    parser.add_argument("--configs", default=DEFAULT_CONFIGS)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()

    model_config = get_size(args.size)
    configs = [StepConfig.parse(c) for c in args.configs.split(",")]
    steps = []
    for cfg in configs:
        steps.append(build_step(model_config, cfg, args.warmup))
        print(f"compiled {cfg}", flush=True)
    # Timed rounds: the matmul peak, then one step of every configuration, so that a change in
    # the machine's load hits every row (and the peak) alike.
    peaks, best = [], [float("inf")] * len(configs)
    for _ in range(args.repeats):
        peaks.append(matmul_peak(repeats=3))
        for i, (run_step, _, _) in enumerate(steps):
            start = time.perf_counter()
            run_step()
            best[i] = min(best[i], time.perf_counter() - start)
    peaks.append(matmul_peak(repeats=3))
    peak = max(peaks)
    results = []
    for cfg, seconds, (_, batch, compiled_flops) in zip(configs, best, steps):
        flops = train_step_flops(model_config, batch)
        waste = padding_report(batch, model_config)["flops_padding"]
        results.append((cfg, seconds, flops, compiled_flops, waste))

    load = os.getloadavg()
    print(
        f"\n{args.size} model, float32, jax {jax.__version__} on {jax.devices()[0].platform}; "
        f"load average {load[0]:.2f} {load[1]:.2f} {load[2]:.2f} on {os.cpu_count()} cores "
        f"(1, 5, 15 min, read after the timings)"
    )
    print(
        f"f32 2048x2048 matmul peak: best {peak / 1e9:.0f} GFLOP/s, worst "
        f"{min(peaks) / 1e9:.0f} ({len(peaks)} measurements through the run)"
    )
    print(
        f"step times: best of {args.repeats} rounds (each: peak, then one step of every "
        f"configuration) after {args.warmup} warm-up steps\n"
    )
    print(
        "| rows/side | tokens/row | scan | remat | donate | attention | ms/step "
        "| model GFLOP/step | GFLOP/s | % of matmul peak | compiled matmul GFLOP/step "
        "| compiled % of peak | padding FLOPs |"
    )
    print("|---:|---:|---|---|---|---|---:|---:|---:|---:|---:|---:|---:|")
    for cfg, seconds, flops, compiled_flops, waste in results:
        rate = flops / seconds
        print(
            f"| {cfg.rows} | {cfg.length} | {cfg.scan} | {cfg.remat} | {cfg.donate} "
            f"| {cfg.attention} | {1e3 * seconds:.0f} | {flops / 1e9:.1f} | {rate / 1e9:.1f} "
            f"| {100 * rate / peak:.1f}% | {compiled_flops / 1e9:.1f} "
            f"| {100 * compiled_flops / seconds / peak:.1f}% | {100 * waste:.1f}% |"
        )


if __name__ == "__main__":
    main()
