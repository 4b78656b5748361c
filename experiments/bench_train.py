"""Training-step benchmark: tokens/s, step time, compile time and MFU on this machine.

Runs the real jitted `train_step` (loss, MTP, balance loss, optimizer, bias update) on synthetic
token batches, for the tiny config and a ~100M-parameter config, with the float32 matmul peak
measured in the same run as the MFU denominator. Prints a Markdown table and writes it to
experiments/results/bench_train.md.

`--remat` instead runs one config (v3_100m at 4 x 256 by default) under each `model.remat` policy
(the jax.checkpoint policy of the scanned blocks) and writes experiments/results/bench_remat.md.
Per policy: compile time (lower + compile of the state-donating step); the median step time of
--steps steps after a warm-up step, the policies' steps interleaved so that load from other jobs
falls on all of them alike; tokens/s; CPU time and minor page faults per step; XLA's compiled
memory analysis (temporaries, and arguments + outputs - donated aliases + temporaries, the
executable's peak: deterministic, unlike process RSS); and the first step's loss and gradient norm,
which must agree across policies (remat changes what is stored, not the math). Every policy starts
from the same initial state and sees the same batches. `offload` is reported as not run where
`check_remat_backend` refuses it (CPU). A hand-written "## Reading" section in bench_remat.md is
kept across reruns.

    python experiments/bench_train.py [--steps 5] [--impl blocked]
    python experiments/bench_train.py --remat [--steps 6] [--config configs/model/v3_100m.yaml --batch 4 --seq 256]
"""

import argparse
import dataclasses
import os
import platform
import resource
import statistics
import sys
import time
from datetime import date
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

from deepseek_jax.config import (
    Config,
    ConfigError,
    DataConfig,
    OptimConfig,
    TrainConfig,
    load_model_config,
)
from deepseek_jax.metrics import measure_peak_flops, mfu
from deepseek_jax.models import check_remat_backend
from deepseek_jax.params import count_params, train_flops_per_token
from deepseek_jax.plan.report import memory
from deepseek_jax.program import build_program
from deepseek_jax.sharding import make_mesh, rules

ROOT = Path(__file__).resolve().parents[1]
REMAT_OUT = ROOT / "experiments" / "results" / "bench_remat.md"
POLICIES = ("none", "full", "save_dots", "save_attention", "offload")
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
    p = build_program(cfg, make_mesh(cfg.mesh), rules(cfg.mesh))
    state = p.init_state()
    step = jax.jit(p.train_step, donate_argnums=0)
    rng = np.random.default_rng(0)
    batch_of = lambda: {
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
        state, _ = step(state, batch_of())
    jax.block_until_ready(state)
    step_s = (time.perf_counter() - t0) / steps
    counts = count_params(model_cfg)
    return {"config": name, "params": counts["total"], "active": counts["active_no_embedding"],
            "batch": f"{batch}x{seq}", "compile_s": compile_s, "step_s": step_s,
            "tokens_per_s": batch * seq / step_s, "flops_per_token": train_flops_per_token(model_cfg, seq),
            "moe_impl": model_cfg.moe.impl}


def synthetic_batches(p, n: int) -> list[dict]:
    """n random token batches in the program's batch sharding; the same n batches on every call."""
    B, T, V = p.cfg.data.global_batch_size, p.cfg.data.seq_len, p.cfg.model.vocab_size
    rng = np.random.default_rng(0)
    host = [{
        "tokens": rng.integers(0, V, (B, T)).astype(np.int32),
        "positions": np.broadcast_to(np.arange(T, dtype=np.int32), (B, T)),
        "segment_ids": np.ones((B, T), np.int32),
        "loss_mask": np.ones((B, T), np.float32) * (np.arange(T) < T - 1),
    } for _ in range(n)]
    return [jax.device_put(b, p.batch_sharding) for b in host]


def prepare_remat(model_cfg, policy: str, batch: int, seq: int, steps: int) -> dict:
    """One policy compiled, its memory analysis, and one warm-up step (its loss and grad norm); the
    state and the `steps` timed batches are kept for `time_remat`."""
    model_cfg = dataclasses.replace(model_cfg, remat=policy)
    row = {"policy": policy}
    try:
        check_remat_backend(model_cfg, jax.devices()[0].platform)
    except ConfigError as e:
        return {**row, "skipped": str(e)}
    cfg = Config(model=model_cfg, data=DataConfig(seq_len=seq, global_batch_size=batch),
                 optim=OptimConfig(), train=TrainConfig(steps=1000))
    p = build_program(cfg, make_mesh(cfg.mesh), rules(cfg.mesh))
    t0 = time.perf_counter()
    compiled = p.lower().compile()
    row.update(compile_s=time.perf_counter() - t0, mem=memory(compiled), step=compiled, times=[],
               usage=[])
    first, *row["batches"] = synthetic_batches(p, steps + 1)
    state, metrics = compiled(p.init_state(), first)
    row.update(state=state, loss=float(metrics["loss"]), grad_norm=float(metrics["grad_norm"]))
    return row


def time_remat(rows: list[dict], steps: int) -> None:
    """`steps` rounds of one step per policy, interleaved so that load from other jobs falls on
    every policy alike; each row gets the medians of its step time, the process's user and system
    CPU time and minor page faults per step, and tokens/s."""
    live = [r for r in rows if "skipped" not in r]
    for i in range(steps):
        for r in live:
            ru0, t0 = resource.getrusage(resource.RUSAGE_SELF), time.perf_counter()
            r["state"], metrics = r["step"](r["state"], r["batches"][i])
            jax.block_until_ready((r["state"], metrics))
            ru1 = resource.getrusage(resource.RUSAGE_SELF)
            r["times"].append(time.perf_counter() - t0)
            r["usage"].append((ru1.ru_utime - ru0.ru_utime, ru1.ru_stime - ru0.ru_stime,
                               ru1.ru_minflt - ru0.ru_minflt))  # fmt: skip
    for r in live:
        tokens = r["batches"][0]["tokens"].size
        r["step_s"] = statistics.median(r["times"])
        r["tokens_per_s"] = tokens / r["step_s"]
        r["user_s"], r["sys_s"], r["faults"] = (statistics.median(u) for u in zip(*r["usage"]))
        del r["state"], r["step"], r["batches"]


def machine() -> str:
    ram = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30
    return (f"{os.cpu_count()}-core {platform.machine()}, {ram:.0f} GB RAM, "
            f"{jax.device_count()} x {jax.devices()[0].platform} (jax {jax.__version__}, "
            f"python {platform.python_version()})")  # fmt: skip


def _gib(n: int) -> str:
    return f"{n / 2**30:.3f}"


def remat_table(rows: list[dict]) -> list[str]:
    """The Markdown table; the `x none` columns are ratios to the `none` row."""
    base = next((r for r in rows if r["policy"] == "none" and "skipped" not in r), None)

    def ratio(r: dict, key) -> str:
        return f"{key(r) / key(base):.2f}" if base else "-"

    lines = [
        (
            "| model.remat | compile (s) | step (s) | step min-max (s) | x none | tokens/s "
            "| CPU user + sys (s) | page faults | temp (GiB) | x none | peak (GiB) | x none "
            "| first-step loss | first-step grad norm |"
        ),
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        if "skipped" in r:
            reason = r["skipped"].replace("|", "\\|")  # the refusal lists the policies as a | b
            lines.append(f"| {r['policy']} | not run: {reason} |" + " |" * 12)
            continue
        m = r["mem"]
        lines.append(
            f"| {r['policy']} | {r['compile_s']:.1f} | {r['step_s']:.3f} "
            f"| {min(r['times']):.2f}-{max(r['times']):.2f} "
            f"| {ratio(r, lambda x: x['step_s'])} | {r['tokens_per_s']:,.0f} "
            f"| {r['user_s']:.2f} + {r['sys_s']:.2f} | {r['faults'] / 1e3:,.0f}k "
            f"| {_gib(m['temp'])} | {ratio(r, lambda x: x['mem']['temp'])} "
            f"| {_gib(m['peak_estimate'])} | {ratio(r, lambda x: x['mem']['peak_estimate'])} "
            f"| {r['loss']:.6f} | {r['grad_norm']:.6f} |"
        )
    return lines


def main_remat(ns) -> None:
    model_cfg = load_model_config([ROOT / ns.config])
    load0, t0 = os.getloadavg()[0], time.perf_counter()
    rows = [prepare_remat(model_cfg, policy, ns.batch, ns.seq, ns.steps) for policy in ns.policies]
    time_remat(rows, ns.steps)
    wall, load1 = time.perf_counter() - t0, os.getloadavg()[0]
    counts = count_params(model_cfg)
    base = next((r for r in rows if "mem" in r), None)
    args = f"{_gib(base['mem']['argument'])} GiB" if base else "-"
    lines = [
        f"Command: `python experiments/bench_train.py {' '.join(sys.argv[1:])}`",
        "",
        f"Machine: {machine()}. Date: {date.today().isoformat()}.",
        (
            f"Config: {ns.config} ({counts['total'] / 1e6:.1f}M parameters, "
            f"{counts['active'] / 1e6:.1f}M active), {model_cfg.dtype}, MoE impl {model_cfg.moe.impl}, "
            f"batch {ns.batch} x {ns.seq} tokens; the full train step (MTP, balance loss, AdamW, bias "
            "update). Remat wraps the scanned decoder blocks only: embedding, head, MTP block and loss "
            "are outside it (the cross-entropy is under its own jax.checkpoint in every row)."
        ),
        (
            f"Step: median of {ns.steps} steps after one warm-up step, the policies' steps interleaved "
            "(one step of each in turn); CPU time (user + system, all threads) and minor page "
            "faults of this process per step are medians too. Memory: XLA's compiled memory "
            "analysis (`compiled.memory_analysis()`), not process RSS: temp = temp_size_in_bytes "
            "(activations kept for the backward, gradients, workspace); peak = arguments + outputs - "
            f"donated aliases + temp (the arguments, state and batch, are {args} in every row)."
        ),
        (
            f"1-min load average {load0:.1f} at start, {load1:.1f} at end (other jobs may share the "
            "cores: compare ratios within this table, not absolute times across runs). "
            f"Total wall {wall:.0f} s."
        ),
        "",
        *remat_table(rows),
    ]
    table = "\n".join(lines)
    print(table)
    reading = ""  # a hand-written "## Reading" section in the output file is kept
    if ns.out.exists() and "\n## Reading" in ns.out.read_text():
        reading = "\n## Reading" + ns.out.read_text().split("\n## Reading", 1)[1]
    ns.out.parent.mkdir(parents=True, exist_ok=True)
    ns.out.write_text("# bench_train --remat\n\n" + table + "\n" + reading)
    print(f"\nwritten to {ns.out}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--steps", type=int, help="timed steps (default 5; 6 with --remat)")
    ap.add_argument("--impl", choices=["ragged", "blocked", "dense"], help="override the configs' MoE impl")
    ap.add_argument("--remat", action="store_true", help="the remat-policy table instead (bench_remat.md)")
    ap.add_argument("--config", default="configs/model/v3_100m.yaml", help="--remat: model config")
    ap.add_argument("--batch", type=int, default=4, help="--remat: sequences per step")
    ap.add_argument("--seq", type=int, default=256, help="--remat: tokens per sequence")
    ap.add_argument("--policies", nargs="+", choices=POLICIES, default=list(POLICIES), help="--remat")
    ap.add_argument("--out", type=Path, default=REMAT_OUT, help="--remat: output file")
    ns = ap.parse_args()
    if ns.remat:
        ns.steps = ns.steps or 6
        return main_remat(ns)
    ns.steps = ns.steps or 5
    peak = measure_peak_flops()
    rows = [bench(name, path, b, t, ns.steps, ns.impl or impl) for name, path, b, t, impl in CASES]
    lines = [
        (
            f"Machine: {platform.processor() or platform.machine()}, {jax.device_count()} x "
            f"{jax.devices()[0].platform} (jax {jax.__version__}); measured float32 matmul peak "
            f"{peak / 1e9:.1f} GFLOP/s per device."
        ),
        "",
        "| config | params (total / active) | MoE impl | batch | compile (s) | step (s) | tokens/s | MFU |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        util = mfu(r["tokens_per_s"], r["flops_per_token"], peak, jax.device_count())
        lines.append(
            f"| {r['config']} | {r['params'] / 1e6:.1f}M / {r['active'] / 1e6:.1f}M | {r['moe_impl']} | {r['batch']} "
            f"| {r['compile_s']:.1f} | {r['step_s']:.3f} | {r['tokens_per_s']:,.0f} | {util:.1%} |"
        )
    table = "\n".join(lines)
    print(table)
    out = ROOT / "experiments" / "results" / "bench_train.md"
    out.write_text("# bench_train\n\n" + table + "\n")
    print(f"\nwritten to {out}")


if __name__ == "__main__":
    main()
