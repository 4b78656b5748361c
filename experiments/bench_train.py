"""Training-step benchmark: tokens/s, step time, compile time and MFU on this machine.

Runs the real jitted `train_step` (loss, MTP, balance loss, optimizer, bias update) on synthetic
token batches, for the tiny config and a ~100M-parameter config, with the float32 matmul peak
measured in the same run as the MFU denominator. Prints a Markdown table and writes it to
experiments/results/bench_train.md.

    python experiments/bench_train.py [--steps 5] [--impl blocked]
"""

import argparse
import dataclasses
import platform
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

from deepseek_jax.config import Config, DataConfig, OptimConfig, TrainConfig, load_model_config
from deepseek_jax.params import count_params, train_flops_per_token
from deepseek_jax.run import measure_peak_flops
from deepseek_jax.sharding import make_mesh, rules
from deepseek_jax.train import build, init_state

ROOT = Path(__file__).resolve().parents[1]
CASES = [  # (name, config, batch, seq, MoE impl override)
    ("tiny", "configs/model/tiny.yaml", 16, 128, None),
    ("tiny", "configs/model/tiny.yaml", 16, 128, "ragged"),  # XLA:CPU's masked-dense ragged_dot
    ("v3_100m", "configs/model/v3_100m.yaml", 4, 256, None),
]


def bench(name: str, path: str, batch: int, seq: int, steps: int, impl: str | None) -> dict:
    model_cfg = load_model_config([ROOT / path])
    if impl:
        model_cfg = dataclasses.replace(model_cfg, moe=dataclasses.replace(model_cfg.moe, impl=impl))
    cfg = Config(model=model_cfg, data=DataConfig(seq_len=seq, global_batch_size=batch),
                 optim=OptimConfig(), train=TrainConfig(steps=1000))
    mesh = make_mesh(cfg.mesh)
    model, optimizer, step, _, shardings = build(cfg, mesh, rules(cfg.mesh))
    state = init_state(model, optimizer, cfg, shardings)
    step = jax.jit(step, donate_argnums=0)
    rng = np.random.default_rng(0)
    batch_of = lambda: {  # noqa: E731
        "tokens": jnp.asarray(rng.integers(0, model_cfg.vocab_size, (batch, seq)), jnp.int32),
        "positions": jnp.broadcast_to(jnp.arange(seq, dtype=jnp.int32), (batch, seq)),
        "segment_ids": jnp.ones((batch, seq), jnp.int32),
        "loss_mask": jnp.ones((batch, seq), jnp.float32).at[:, -1].set(0),
    }
    t0 = time.perf_counter()
    state, _ = step(state, batch_of())
    jax.block_until_ready(state)
    compile_s = time.perf_counter() - t0
    t0 = time.perf_counter()
    for _ in range(steps):
        state, metrics = step(state, batch_of())
    jax.block_until_ready(state)
    step_s = (time.perf_counter() - t0) / steps
    counts = count_params(model_cfg)
    return {"config": name, "params": counts["total"], "active": counts["active_no_embedding"],
            "batch": f"{batch}x{seq}", "compile_s": compile_s, "step_s": step_s,
            "tokens_per_s": batch * seq / step_s, "flops_per_token": train_flops_per_token(model_cfg, seq),
            "moe_impl": model_cfg.moe.impl}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--steps", type=int, default=5)
    ap.add_argument("--impl", choices=["ragged", "blocked", "dense"], help="override the configs' MoE impl")
    ns = ap.parse_args()
    peak = measure_peak_flops()
    rows = [bench(name, path, b, t, ns.steps, ns.impl or impl) for name, path, b, t, impl in CASES]
    lines = [
        f"Machine: {platform.processor() or platform.machine()}, {jax.device_count()} x {jax.devices()[0].platform}"
        f" (jax {jax.__version__}); measured float32 matmul peak {peak / 1e9:.1f} GFLOP/s per device.",
        "",
        "| config | params (total / active) | MoE impl | batch | compile (s) | step (s) | tokens/s | MFU |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        mfu = r["tokens_per_s"] * r["flops_per_token"] / (peak * jax.device_count())
        lines.append(
            f"| {r['config']} | {r['params'] / 1e6:.1f}M / {r['active'] / 1e6:.1f}M | {r['moe_impl']} | {r['batch']} "
            f"| {r['compile_s']:.1f} | {r['step_s']:.3f} | {r['tokens_per_s']:,.0f} | {mfu:.1%} |"
        )
    table = "\n".join(lines)
    print(table)
    out = ROOT / "experiments" / "results" / "bench_train.md"
    out.write_text("# bench_train\n\n" + table + "\n")
    print(f"\nwritten to {out}")


if __name__ == "__main__":
    main()
