"""Attention benchmark: dense MLA vs V3.2 DSA vs V4 sliding-window / CSA / HCA, forward time and
peak memory as the context T grows.

One attention layer of each kind at one common small width (D 256, 4 heads, head dims 64), batch 1,
forward only under jax.jit, params from init, while the token-count knobs keep their released
values (V3.2 index_topk 2048; V4 window 128, index_topk 512, CSA ratio 4, HCA ratio 128), so the
growth with T is the real one. Per (variant, T): compile time (lower + compile, separate from any
run), XLA's compiled memory analysis (argument + output + temp bytes, the peak the executable needs)
and, when that fits in --max-run-gb, the median forward time of --runs runs after a warm-up.
Variants whose compiled peak exceeds the budget (dense MLA at long T: [T, T] scores per head) are
compiled only and marked "not run". Prints a Markdown table and writes it to
experiments/results/bench_attention.md (a hand-written "## Reading" section there is kept).

A variant is also not run when its last executed time x (T / that T)^2 exceeds --max-run-s, and
one whose warm-up x --runs exceeds --slow-s reports the warm-up as its single timed run.

    python experiments/bench_attention.py [--quick] [--seqs 4096 16384] [--max-run-gb 6]
"""

import argparse
import os
import platform
import statistics
import sys
import time
from pathlib import Path

import jax
import jax.numpy as jnp

from deepseek_jax.config import IndexerConfig, MLAConfig, RopeConfig, V4AttentionConfig
from deepseek_jax.layers.attention import MLA, V4Attention

ROOT = Path(__file__).resolve().parents[1]
OUT = ROOT / "experiments" / "results" / "bench_attention.md"
VARIANTS = ("mla", "dsa", "v4_swa", "v4_csa", "v4_hca")
V4_RATIO = {"v4_swa": 0, "v4_csa": 4, "v4_hca": 128}
WIDTHS = ("MLA/DSA: Q 128, C 128, H 64, R 32, O 64, indexer 4 heads x 64; V4: X 64 (R 16), "
          "Q 128, output 2 groups x rank 64, indexer 4 heads x 64")  # fmt: skip


def configs(ns) -> dict:
    """Each variant's (module, keys-per-query description) at the common width."""
    D, N = ns.dim, ns.heads
    mla = MLAConfig(n_heads=N, q_lora_rank=128, kv_lora_rank=128, qk_nope_head_dim=64,
                    qk_rope_head_dim=32, v_head_dim=64)  # fmt: skip
    index = IndexerConfig(index_n_heads=4, index_head_dim=64, index_topk=ns.dsa_topk,
                          index_q_block=ns.dsa_q_block)  # fmt: skip
    v4 = V4AttentionConfig(
        n_heads=N, head_dim=64, rope_head_dim=16, q_lora_rank=128, o_groups=2, o_lora_rank=64,
        window_size=ns.window, index_n_heads=4, index_head_dim=64, index_topk=ns.v4_topk,
        q_block=ns.v4_q_block,
    )  # fmt: skip
    dtype = jnp.dtype(ns.dtype)
    mods = {
        "mla": (MLA(mla, RopeConfig(), D, dtype=dtype), "all t+1 (causal)", "-"),
        "dsa": (MLA(mla, RopeConfig(), D, dtype=dtype, index=index),
                f"top-{ns.dsa_topk} of t+1", ns.dsa_q_block),
    }  # fmt: skip
    w, k = ns.window, ns.v4_topk
    keys = {0: f"window {w}", 4: f"window {w} + top-{k} of t/4", 128: f"window {w} + all t/128"}
    for name, m in V4_RATIO.items():
        rope = RopeConfig(rope_theta=v4.compress_rope_theta if m else 10000.0)
        mods[name] = (V4Attention(v4, rope, m, D, dtype=dtype), keys[m], ns.v4_q_block)
    return {v: mods[v] for v in ns.variants}


def forward(module):
    def fn(params, x_BTD, positions_BT):
        return module.apply(params, x_BTD, positions_BT)[0]

    return fn


def bench_one(module, params, T: int, ns, est_s: float | None) -> dict:
    """Compile (timed), memory analysis, and, within the memory budget and when the estimated run
    time est_s fits --max-run-s, the median of ns.runs timed runs after a warm-up."""
    dtype = jnp.dtype(ns.dtype)
    x_spec = jax.ShapeDtypeStruct((1, T, ns.dim), dtype)
    pos_spec = jax.ShapeDtypeStruct((1, T), jnp.int32)
    t0 = time.perf_counter()
    compiled = jax.jit(forward(module)).lower(params, x_spec, pos_spec).compile()
    compile_s = time.perf_counter() - t0
    ma = compiled.memory_analysis()
    peak = (ma.argument_size_in_bytes + ma.output_size_in_bytes + ma.temp_size_in_bytes
            - ma.alias_size_in_bytes)  # fmt: skip
    row = {"T": T, "compile_s": compile_s, "peak_gb": peak / 2**30, "run_s": None, "skip": None}
    if peak / 2**30 > ns.max_run_gb:
        row["skip"] = "no (peak > --max-run-gb)"
        return row
    if est_s is not None and est_s > ns.max_run_s:
        row["skip"] = f"no (est. {est_s:.0f} s > --max-run-s)"
        return row
    x_BTD = jax.random.normal(jax.random.key(1), (1, T, ns.dim), dtype)
    positions_BT = jnp.arange(T, dtype=jnp.int32)[None]
    times = []
    for i in range(ns.runs + 1):  # the first is the warm-up
        t0 = time.perf_counter()
        compiled(params, x_BTD, positions_BT).block_until_ready()
        times.append(time.perf_counter() - t0)
        if i == 0 and times[0] * ns.runs > ns.slow_s:  # slow: the first run is the measurement
            row.update(run_s=times[0], runs="1, the first")
            return row
    row.update(run_s=statistics.median(times[1:]), runs=f"{ns.runs} after warm-up")
    return row


def bench(ns) -> list[dict]:
    rows = []
    for variant, (module, keys, q_block) in configs(ns).items():
        T0 = 256  # params do not depend on T
        x = jnp.zeros((1, T0, ns.dim), ns.dtype)
        key = jax.random.key(0, impl="unsafe_rbg")  # its init compiles ~2x faster than threefry's
        params = jax.jit(module.init)(key, x, jnp.arange(T0)[None])
        last = None  # (T, run_s) of the last executed T; cost grows at most like T^2
        for T in ns.seqs:
            est_s = None if last is None else last[1] * (T / last[0]) ** 2
            row = bench_one(module, params, T, ns, est_s)
            last = (T, row["run_s"]) if row["run_s"] is not None else last
            row.update(variant=variant, keys=keys, q_block=q_block)
            run = "not run" if row["run_s"] is None else f"{row['run_s']:.3f} s"
            print(f"  {variant} T={T}: compile {row['compile_s']:.1f} s, peak "
                  f"{row['peak_gb']:.2f} GB, run {run}", file=sys.stderr, flush=True)  # fmt: skip
            rows.append(row)
    return rows


def kilo(T: int) -> str:
    return f"{T // 1024}K" if T % 1024 == 0 else str(T)


def fmt_table(rows: list[dict]) -> list[str]:
    dense = {r["T"]: r["run_s"] for r in rows if r["variant"] == "mla" and r["run_s"]}
    first = {}
    lines = [
        "| variant | keys per query t | q_block | T | compile (s) | peak mem (GB, XLA) | executed "
        "| run (s) | x dense MLA (same T) | x own time at first T |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        run = r["run_s"]
        if run is not None:
            first.setdefault(r["variant"], (r["T"], run))
        vs_dense = f"{run / dense[r['T']]:.2f}" if run and r["T"] in dense else "-"
        T0, run0 = first.get(r["variant"], (None, None))
        own = f"{run / run0:.1f} (vs {kilo(T0)})" if run and T0 != r["T"] else "-"
        ran = f"yes ({r['runs']})" if run is not None else r["skip"]
        run_txt = f"{run:.3f}" if run is not None else "not run"
        lines.append(
            f"| {r['variant']} | {r['keys']} | {r['q_block']} | {kilo(r['T'])} "
            f"| {r['compile_s']:.1f} | {r['peak_gb']:.2f} | {ran} | {run_txt} "
            f"| {vs_dense} | {own} |"
        )
    return lines


def machine() -> str:
    ram = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30
    return (f"{os.cpu_count()}-core {platform.machine()}, {ram:.0f} GB RAM, "
            f"{jax.device_count()} x {jax.devices()[0].platform} (jax {jax.__version__}, "
            f"python {platform.python_version()})")  # fmt: skip


def parse(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--quick", action="store_true", help="T = 1K, 2K only")
    ap.add_argument("--seqs", type=int, nargs="+", help="context lengths (default 4K 16K 64K)")
    ap.add_argument("--variants", nargs="+", choices=VARIANTS, default=list(VARIANTS))
    ap.add_argument("--dim", type=int, default=256)
    ap.add_argument("--heads", type=int, default=4)
    ap.add_argument("--dtype", choices=["float32", "bfloat16"], default="float32")
    ap.add_argument("--dsa-topk", type=int, default=2048)
    ap.add_argument("--v4-topk", type=int, default=512)
    ap.add_argument("--window", type=int, default=128)
    ap.add_argument("--dsa-q-block", type=int, default=256, help="IndexerConfig.index_q_block")
    ap.add_argument("--v4-q-block", type=int, default=1024, help="V4AttentionConfig.q_block")
    ap.add_argument("--runs", type=int, default=3, help="timed runs after the warm-up (median)")
    ap.add_argument(
        "--slow-s",
        type=float,
        default=60.0,
        help="if runs x warm-up time exceeds this, the warm-up is the one timed run",
    )
    ap.add_argument(
        "--max-run-s",
        type=float,
        default=600.0,
        help="skip running when (last run) x (T / last T)^2 exceeds this",
    )
    ap.add_argument(
        "--max-run-gb",
        type=float,
        default=6.0,
        help="execute only when XLA's compiled peak fits in this many GB",
    )
    ap.add_argument("--out", type=Path, default=OUT)
    ns = ap.parse_args(argv)
    ns.seqs = ns.seqs or ([1024, 2048] if ns.quick else [4096, 16384, 65536])
    return ns


def main(argv=None) -> list[dict]:
    ns = parse(argv)
    load0 = os.getloadavg()[0]
    t0 = time.perf_counter()
    rows = bench(ns)
    wall = time.perf_counter() - t0
    load1 = os.getloadavg()[0]
    command = "python experiments/bench_attention.py " + " ".join(
        argv if argv is not None else sys.argv[1:]
    )
    lines = [
        f"Machine: {machine()}.",
        f"One layer, forward only, batch 1, {ns.dtype}, D {ns.dim}, {ns.heads} heads; {WIDTHS}.",
        f"1-min load average {load0:.1f} at start, {load1:.1f} at end (other jobs shared the "
        "cores: compare ratios within this table, not absolute times across runs). "
        f"Total wall {wall:.0f} s.",
        "",
        *fmt_table(rows),
    ]
    table = "\n".join(lines)
    print(table)
    reading = ""
    if ns.out.exists() and "\n## Reading" in ns.out.read_text():
        reading = "\n## Reading" + ns.out.read_text().split("\n## Reading", 1)[1]
    ns.out.parent.mkdir(parents=True, exist_ok=True)
    ns.out.write_text(f"# bench_attention\n\nCommand: `{command.strip()}`\n\n{table}\n{reading}")
    print(f"\nwritten to {ns.out}")
    return rows


if __name__ == "__main__":
    main()
