"""Long-context benchmark: one attention layer of each kind, forward time and peak memory at T up to
1M tokens, and the decode step time against the context length L.

Kinds (`--types`): dense MLA (V3), DSA (V3.2), V4 sliding window (SWA), V4 CSA (ratio 4), V4 HCA at the
released ratio 128 and at the tiny ratio 16, a V4.1 kv-source layer (ratio 2, its own indexer), and
`csa_gather`: CSA's gathered sink attention alone, with the w + k slots per query given as input (what
is left of CSA once the indexer has picked). Widths are tiny (D 128, 4 heads of 64, indexers 4 × 32),
batch 1, float32, on the CPU; the token-count knobs keep their released values (V3.2 top-2048; V4 window
128, top-512), so the growth with T is the real one. Query blocks and key chunks are the configs'
`*q_block` / `*k_block` fields (`--q-block`, `--k-block`; memory only).

Every (mode, kind, T) runs in its own subprocess, so its peak RSS (VmHWM of that process,
which includes the ~0.3 GB JAX runtime and the compiler) is its own; with it come XLA's compiled memory
analysis (argument, output, temp bytes) and the compile time. A run is killed after `--time-limit`
seconds, and not started when its estimate (the last measured time extrapolated with the growth
exponent seen between the last two lengths, 2 before there are two) exceeds the limit, nor executed
when XLA's compiled peak exceeds `--max-gb`. Decode: one new token at cache_index L − 1 of a cache of
L slots (the layer's own cache); mode `model` runs the whole tiny model through `long_decode.decode_at`.

Prints a Markdown table and writes it to experiments/results/bench_long_context.md (a hand-written
"## Reading" section there is kept).

    python experiments/bench_long_context.py --max-len 65536                # quick: 4K .. 64K
    python experiments/bench_long_context.py --time-limit 14400 --cap mla=65536 dsa=65536   # full, to 1M
    python experiments/bench_long_context.py --types v4_csa v4_hca128 --modes forward
"""

import argparse
import dataclasses
import json
import math
import os
import platform
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
OUT = ROOT / "experiments" / "results" / "bench_long_context.md"
SEQS = (4096, 16384, 65536, 262144, 1048576)
# kind -> (family, compress ratio, keys per query t)
TYPES = {
    "mla": ("mla", 0, "all t+1"),
    "dsa": ("dsa", 0, "top-k of t+1 (indexer: all t+1)"),
    "v4_swa": ("v4", 0, "window w"),
    "v4_csa": ("v4", 4, "w + top-k of t/4 (indexer: all t/4)"),
    "v4_hca128": ("v4", 128, "w + all t/128"),
    "v4_hca16": ("v4", 16, "w + all t/16"),
    "v41_source": ("v41", 2, "w + top-k of t/2 (indexer: all t/2)"),
    "csa_gather": ("gather", 4, "w + k given slots"),
}
MODES = ("forward", "decode", "model")  # model: long_decode.decode_at on --model-config
RESULT = "RESULT "  # the child's last stdout line: RESULT {json}


# ----------------------------------------------------------------------------------------------
# The child: one (mode, kind, T) in its own process


def with_blocks(cfg, q_block: int, k_block: int):
    """cfg with every `*q_block` field set to q_block and every `*k_block` field to k_block (the block
    fields each attention config has; names differ between configs)."""
    names = {f.name for f in dataclasses.fields(cfg)}
    new = {n: q_block for n in names if n.endswith("q_block")}
    new.update({n: k_block for n in names if n.endswith("k_block")})
    return dataclasses.replace(cfg, **new)


def build(kind: str, ns):
    """The Linen module of a kind at the benchmark's widths."""
    import jax.numpy as jnp

    from deepseek_jax.config import IndexerConfig, MLAConfig, RopeConfig, SharedKVConfig, V4AttentionConfig
    from deepseek_jax.layers.attention import MLA, V4Attention
    from deepseek_jax.layers.attention.v41 import V41Attention

    family, ratio, _ = TYPES[kind]
    D, N, dtype, blocks = ns.dim, ns.heads, jnp.dtype(ns.dtype), (ns.q_block, ns.k_block)
    if family in ("mla", "dsa"):
        mla = with_blocks(MLAConfig(n_heads=N, q_lora_rank=64, kv_lora_rank=64, qk_nope_head_dim=32,
                                    qk_rope_head_dim=16, v_head_dim=32), *blocks)  # fmt: skip
        index = None
        if family == "dsa":
            index = with_blocks(IndexerConfig(index_n_heads=4, index_head_dim=32, index_topk=ns.dsa_topk), *blocks)
        return MLA(mla, RopeConfig(), D, dtype=dtype, index=index)
    v4 = with_blocks(V4AttentionConfig(
        n_heads=N, head_dim=64, rope_head_dim=16, q_lora_rank=64, o_groups=2, o_lora_rank=64,
        window_size=ns.window, index_n_heads=4, index_head_dim=32, index_topk=ns.v4_topk), *blocks)  # fmt: skip
    rope = RopeConfig(rope_theta=v4.compress_rope_theta if ratio else 10000.0)
    if family == "v41":
        shared = SharedKVConfig(kv_source_layers=(0,), index_source_layers=(0,))
        return V41Attention(v4, rope, ratio, D, dtype=dtype, q_head_norm=False, role="source", shared_cfg=shared)
    return V4Attention(v4, rope, ratio, D, dtype=dtype)


def init_cache(module, kind: str, L: int):
    """An empty decode cache of L slots for the module (a kind's own cache type)."""
    from deepseek_jax.layers.attention import init_mla_cache, init_v4_attention_cache
    from deepseek_jax.layers.attention.v41 import init_v41_attention_cache

    family, ratio, _ = TYPES[kind]
    if family in ("mla", "dsa"):
        return init_mla_cache(module.cfg, module.index, 1, L, module.dtype)
    if family == "v41":
        return init_v41_attention_cache(module.cfg, ratio, "source", 1, L, module.dtype)
    return init_v4_attention_cache(module.cfg, ratio, 1, L, module.dtype)


def gather_case(ns, T: int):
    """(fn(sink, q, source, slots), sink, inputs): CSA's gathered sink attention alone (v4_stream's
    gather + sink_softmax), its w window slots and k random visible entries per query given, over a
    key source [T window tokens, T/4 entries]."""
    import jax
    import jax.numpy as jnp

    from deepseek_jax.layers.attention.core import gather_keys, over_query_blocks
    from deepseek_jax.layers.attention.v4_stream import sink_softmax

    N, X, w, k, m = ns.heads, 64, ns.window, ns.v4_topk, 4
    dtype = jnp.dtype(ns.dtype)

    def make(key):
        kq, ks, ki = jax.random.split(key, 3)
        t_T1 = jnp.arange(T)[:, None]
        window_TW = t_T1 - w + 1 + jnp.arange(w)  # key positions, < 0 before the start
        n_vis_T1 = (t_T1 + 1) // m
        pick_TK = jnp.floor(jax.random.uniform(ki, (T, k)) * n_vis_T1).astype(jnp.int32)
        comp_TK = jnp.where(jnp.arange(k) < n_vis_T1, T + pick_TK, -1)
        slots_BTU = jnp.concatenate([jnp.where(window_TW >= 0, window_TW, -1), comp_TK], -1)[None]
        q_BTNX = jax.random.normal(kq, (1, T, N, X), dtype)
        source_BSX = jax.random.normal(ks, (1, T + T // m, X), dtype)
        return q_BTNX, source_BSX, slots_BTU.astype(jnp.int32)

    def attend(sink_N, q_BTNX, slots_BTU, source_BSX):
        kv_BTUX = gather_keys(source_BSX, jnp.maximum(slots_BTU, 0))
        return sink_softmax(q_BTNX, kv_BTUX, slots_BTU >= 0, sink_N, X**-0.5)[0]

    def fn(sink_N, q_BTNX, source_BSX, slots_BTU):
        return over_query_blocks(lambda q, i, src: attend(sink_N, q, i, src), ns.q_block, q_BTNX, slots_BTU,
                                 keys=(source_BSX,))  # fmt: skip

    return fn, jnp.zeros((N,), jnp.float32), jax.jit(make)(jax.random.key(1))


def model_decode(ns, L: int) -> dict:
    """long_decode.decode_at on configs/model/tiny_v4_1m.yaml: chunked prefill of L random tokens, then
    one-token steps at positions L, L + 1, ... (the whole tiny model, not one layer)."""
    from deepseek_jax.config import load_model_config
    from deepseek_jax.long_decode import decode_at

    cfg = load_model_config([ROOT / ns.model_config])
    r = decode_at(cfg, L, n_new=ns.model_steps)
    return {"run_s": r["prefill_s"], "step_ms": r["step_ms"], "bytes_per_token": r["bytes_per_token"],
            "fixed_mb": r["fixed_bytes"] / 2**20, "finite": r["finite"], "skip": None}  # fmt: skip


def layer_case(kind: str, mode: str, ns, T: int):
    """(fn(params, *inputs), params, inputs) of a layer's forward over T tokens, or its decode step of
    one token at cache_index T − 1 of a T-slot cache."""
    import jax
    import jax.numpy as jnp

    module = build(kind, ns)
    x0 = jnp.zeros((1, 64, ns.dim), module.dtype)
    key = jax.random.key(0, impl="unsafe_rbg")  # params do not depend on T
    params = jax.jit(module.init)(key, x0, jnp.arange(64)[None])
    if mode == "forward":
        x_BTD = jax.random.normal(jax.random.key(1), (1, T, ns.dim), module.dtype)
        inputs = (x_BTD, jnp.arange(T, dtype=jnp.int32)[None])
        return (lambda p, x, pos: module.apply(p, x, pos)[0]), params, inputs
    cache = jax.jit(lambda: init_cache(module, kind, T))()
    x_BTD = jax.random.normal(jax.random.key(1), (1, 1, ns.dim), module.dtype)
    inputs = (x_BTD, jnp.full((1, 1), T - 1, jnp.int32), cache, jnp.int32(T - 1))

    def step(p, x, pos, cache, index):
        return module.apply(p, x, pos, cache=cache, cache_index=index)[:2]

    return step, params, inputs


def child(spec: dict) -> dict:
    """Compiles and times one case; the returned dict is printed as the RESULT line."""
    import jax

    ns, kind, mode, T = argparse.Namespace(**spec["ns"]), spec["kind"], spec["mode"], spec["T"]
    if mode == "model":
        return model_decode(ns, T)
    case = gather_case(ns, T) if kind == "csa_gather" else layer_case(kind, mode, ns, T)
    fn, params, inputs = case
    t0 = time.perf_counter()
    compiled = jax.jit(fn).lower(params, *inputs).compile()
    row = {"compile_s": time.perf_counter() - t0, "run_s": None, "runs": None, "skip": None}
    ma = compiled.memory_analysis()
    row.update(temp_gb=ma.temp_size_in_bytes / 2**30,
               xla_gb=(ma.argument_size_in_bytes + ma.output_size_in_bytes + ma.temp_size_in_bytes
                       - ma.alias_size_in_bytes) / 2**30)  # fmt: skip
    if row["xla_gb"] > ns.max_gb:
        row["skip"] = "no (XLA peak > --max-gb)"
        return row
    n_runs = ns.runs if mode == "forward" else ns.decode_runs
    times = []
    for i in range(n_runs + 1):  # the first is the warm-up
        t0 = time.perf_counter()
        jax.block_until_ready(compiled(params, *inputs))
        times.append(time.perf_counter() - t0)
        if i == 0 and times[0] * n_runs > ns.slow_s:  # slow: the first run is the measurement
            row.update(run_s=times[0], runs="1, the first")
            return row
    row.update(run_s=statistics.median(times[1:]), runs=f"{n_runs} after warm-up")
    return row


# ----------------------------------------------------------------------------------------------
# The parent: one subprocess per case, estimates, the table


def run_child(kind: str, mode: str, T: int, ns) -> dict:
    """The child's RESULT (plus rss_gb), or a row saying why there is none (timeout, crash)."""
    spec = {"kind": kind, "mode": mode, "T": T, "ns": {k: v for k, v in vars(ns).items() if k != "out"}}
    env = {**os.environ, "JAX_PLATFORMS": os.environ.get("JAX_PLATFORMS", "cpu")}
    cmd = [sys.executable, str(Path(__file__).resolve()), "--child", json.dumps(spec)]
    t0 = time.perf_counter()
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=ns.time_limit, env=env, cwd=ROOT)
    except subprocess.TimeoutExpired:
        return {"skip": f"no (killed at --time-limit {ns.time_limit:.0f} s)", "wall_s": time.perf_counter() - t0}
    lines = [x for x in proc.stdout.splitlines() if x.startswith(RESULT)]
    if proc.returncode != 0 or not lines:
        err = (proc.stderr.strip().splitlines() or ["?"])[-1][:160].replace("|", "/")
        return {"skip": f"failed (rc {proc.returncode}: {err})", "wall_s": time.perf_counter() - t0}
    return {**json.loads(lines[-1][len(RESULT) :]), "wall_s": time.perf_counter() - t0}


def estimate(points: list[tuple[int, float]], T: int) -> float | None:
    """Run time at T extrapolated from the measured (T, s) points: the last one grown with the exponent
    seen between the last two (clamped to [1, 2]), or 2 with one point; None with none."""
    if not points:
        return None
    p = 2.0
    if len(points) >= 2:
        (T1, s1), (T2, s2) = points[-2:]
        p = min(2.0, max(1.0, math.log(max(s2, 1e-9) / max(s1, 1e-9)) / math.log(T2 / T1)))
    T0, s0 = points[-1]
    return s0 * (T / T0) ** p


def cases(ns):
    """(mode, kind) pairs to run: every kind per layer mode (csa_gather has no decode), one for "model"."""
    for mode in ns.modes:
        if mode == "model":
            yield mode, "model"
            continue
        yield from ((mode, kind) for kind in ns.types if not (mode == "decode" and kind == "csa_gather"))


def bench(ns) -> list[dict]:
    rows = []
    for mode, kind in cases(ns):
        points = []
        for T in ns.seqs:
            est = estimate(points, T)
            if T > ns.cap.get(kind, T):
                row = {"skip": f"no (--cap {kind}={ns.cap[kind]})"}
            elif est is not None and est > ns.time_limit:
                row = {"skip": f"no (est. {est:.0f} s > --time-limit)"}
            else:
                row = run_child(kind, mode, T, ns)
            row.update(mode=mode, kind=kind, T=T)
            if row.get("run_s") is not None:
                points.append((T, row["run_s"]))
            print(f"  {mode} {kind} T={T}: " + ", ".join(
                f"{k} {v:.3g}" if isinstance(v, float) else f"{k} {v}" for k, v in row.items()
                if k not in ("mode", "kind", "T")), file=sys.stderr, flush=True)  # fmt: skip
            rows.append(row)
    return rows


def work(kind: str, T: int, ns) -> float:
    """Multiply-adds of the T-dependent attention terms of a forward (query/key pairs × dims, causal;
    projections left out): what the run time should follow once it dominates."""
    _, m, _ = TYPES[kind]
    N, w, PY = ns.heads, ns.window, 4 * 32
    head = {"mla": 2 * 48, "dsa": 2 * 48}.get(kind, 2 * 64) * N  # q·k + p·v per pair, all heads
    k = {"dsa": ns.dsa_topk}.get(kind, ns.v4_topk)
    if kind == "mla":
        return T * T / 2 * head
    if kind == "dsa":
        return T * T / 2 * PY + T * k * head
    if kind == "v4_swa":
        return T * w * head
    if kind in ("v4_hca128", "v4_hca16"):
        return (T * T / (2 * m) + T * w) * head
    if kind == "csa_gather":
        return T * (k + w) * head
    return T * T / (2 * m) * PY + T * (k + w) * head  # v4_csa, v41_source


def kilo(T: int) -> str:
    return f"{T // 2**20}M" if T % 2**20 == 0 else f"{T // 1024}K" if T % 1024 == 0 else str(T)


def fmt_table(rows: list[dict], ns) -> list[str]:
    """One Markdown row per case; the last two columns compare with the same kind and mode at 64K."""
    base = {(r["mode"], r["kind"]): r for r in rows if r["T"] == 65536 and r.get("run_s")}
    lines = [
        "| mode | kind | keys per query t | T or L | compile (s) | XLA temp (GB) | XLA peak (GB) | peak RSS (GB) "
        "| run (s) | executed | x own 64K | work model x own 64K |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        b, run = base.get((r["mode"], r["kind"])), r.get("run_s")
        vs = f"{run / b['run_s']:.3g}" if b and run and r["T"] != 65536 else "-"
        model = "-"
        if r["mode"] == "forward" and b and r["T"] != 65536:
            model = f"{work(r['kind'], r['T'], ns) / work(r['kind'], 65536, ns):.3g}"
        num = lambda key, f: f.format(r[key]) if r.get(key) is not None else "-"  # noqa: E731
        lines.append(
            f"| {r['mode']} | {r['kind']} | {TYPES[r['kind']][2]} | {kilo(r['T'])} | {num('compile_s', '{:.1f}')} "
            f"| {num('temp_gb', '{:.2f}')} | {num('xla_gb', '{:.2f}')} | {num('rss_gb', '{:.2f}')} "
            f"| {num('run_s', '{:.4g}')} | {r.get('skip') or 'yes (' + str(r.get('runs')) + ')'} | {vs} | {model} |"
        )
    return lines


def fmt_model_table(rows: list[dict], ns) -> list[str]:
    """The "model" rows: decode_at's prefill, step and cache size per context length L."""
    lines = [f"Whole tiny model ({ns.model_config}), long_decode.decode_at: chunked prefill of L tokens, then "
             f"{ns.model_steps} one-token steps (median after the first).", "",
             "| L | prefill (s, incl. compile) | decode step (ms) | x own 64K step | cache bytes / token "
             "| fixed cache (MB) | peak RSS (GB) | finite | executed |",
             "|---|---|---|---|---|---|---|---|---|"]  # fmt: skip
    base = next((r["step_ms"] for r in rows if r["T"] == 65536 and r.get("step_ms")), None)
    for r in rows:
        num = lambda key, f: f.format(r[key]) if r.get(key) is not None else "-"  # noqa: E731
        vs = f"{r['step_ms'] / base:.2f}" if base and r.get("step_ms") and r["T"] != 65536 else "-"
        lines.append(f"| {kilo(r['T'])} | {num('run_s', '{:.1f}')} | {num('step_ms', '{:.2f}')} | {vs} "
                     f"| {num('bytes_per_token', '{:.0f}')} | {num('fixed_mb', '{:.2f}')} | {num('rss_gb', '{:.2f}')} "
                     f"| {num('finite', '{}')} | {r.get('skip') or 'yes'} |")  # fmt: skip
    return lines


def machine() -> str:
    ram = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30
    cpu = platform.processor() or platform.machine()
    return f"{os.cpu_count()}-core {cpu}, {ram:.0f} GB RAM, CPU backend (python {platform.python_version()})"


def parse(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--seqs", type=int, nargs="+", default=list(SEQS), help="T (forward) and L (decode)")
    ap.add_argument("--max-len", type=int, default=None, help="drop --seqs above this (quick runs)")
    ap.add_argument("--types", nargs="+", choices=list(TYPES), default=list(TYPES))
    ap.add_argument("--modes", nargs="+", choices=MODES, default=list(MODES))
    ap.add_argument("--dim", type=int, default=128)
    ap.add_argument("--heads", type=int, default=4)
    ap.add_argument("--dtype", choices=["float32", "bfloat16"], default="float32")
    ap.add_argument("--dsa-topk", type=int, default=2048)
    ap.add_argument("--v4-topk", type=int, default=512)
    ap.add_argument("--window", type=int, default=128)
    ap.add_argument("--q-block", type=int, default=1024, help="every config's *q_block field")
    ap.add_argument("--k-block", type=int, default=4096, help="every config's *k_block field")
    ap.add_argument("--runs", type=int, default=3, help="timed forward runs after the warm-up (median)")
    ap.add_argument("--decode-runs", type=int, default=10, help="timed decode steps after the warm-up (median)")
    ap.add_argument("--slow-s", type=float, default=60.0, help="runs x warm-up above this: the warm-up is the run")
    ap.add_argument("--time-limit", type=float, default=1800.0, help="seconds per case (child killed after)")
    ap.add_argument("--max-gb", type=float, default=16.0, help="execute only when XLA's compiled peak fits")
    ap.add_argument("--cap", nargs="*", default=[], metavar="KIND=T", help="longest T to run for a kind")
    ap.add_argument("--model-config", default="configs/model/tiny_v4_1m.yaml", help="for --modes model")
    ap.add_argument("--model-steps", type=int, default=4, help="decode steps after the prefill (model mode)")
    ap.add_argument("--out", type=Path, default=OUT)
    ns = ap.parse_args(argv)
    ns.seqs = [T for T in ns.seqs if ns.max_len is None or T <= ns.max_len]
    try:
        ns.cap = {k: int(v) for k, v in (c.split("=") for c in ns.cap)}
    except ValueError:
        ap.error(f"--cap takes KIND=T pairs, got {ns.cap}")
    if set(ns.cap) - {*TYPES, "model"}:
        ap.error(f"--cap: unknown kinds {sorted(set(ns.cap) - {*TYPES, 'model'})}")
    return ns


def main(argv=None) -> list[dict]:
    ns = parse(argv)
    load0, t0 = os.getloadavg()[0], time.perf_counter()
    rows = bench(ns)
    wall, load1 = time.perf_counter() - t0, os.getloadavg()[0]
    command = "python experiments/bench_long_context.py " + " ".join(argv if argv is not None else sys.argv[1:])
    lines = [
        f"Machine: {machine()}.",
        f"One layer, batch 1, {ns.dtype}, D {ns.dim}, {ns.heads} heads (V4 head 64, MLA 32 + 16 rope / 32 v), "
        f"indexers 4 heads x 32; window {ns.window}, V4 top-{ns.v4_topk}, DSA top-{ns.dsa_topk}; "
        f"q_block {ns.q_block}, k_block {ns.k_block}. Each case in its own process.",
        f"1-min load average {load0:.1f} at start, {load1:.1f} at end (other jobs may share the cores: compare "
        f"ratios within this table). Total wall {wall:.0f} s.",
        "",
        *fmt_table([r for r in rows if r["mode"] != "model"], ns),
    ]
    model_rows = [r for r in rows if r["mode"] == "model"]
    if model_rows:
        lines += ["", *fmt_model_table(model_rows, ns)]
    table = "\n".join(lines)
    print(table)
    reading = ""
    if ns.out.exists() and "\n## Reading" in ns.out.read_text():
        reading = "\n## Reading" + ns.out.read_text().split("\n## Reading", 1)[1]
    ns.out.parent.mkdir(parents=True, exist_ok=True)
    ns.out.write_text(f"# bench_long_context\n\nCommand: `{command.strip()}`\n\n{table}\n{reading}")
    print(f"\nwritten to {ns.out}")
    return rows


def peak_rss_gb() -> float:
    """This process's peak RSS: VmHWM of /proc/self/status, which belongs to the process's own memory map
    and so starts afresh at exec. (ru_maxrss survives fork + exec: a child started by a large parent,
    e.g. a pytest process late in the suite, would report the parent's size.)"""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 2**20  # kB
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # KiB on Linux

if __name__ == "__main__":
    if len(sys.argv) == 3 and sys.argv[1] == "--child":
        result = child(json.loads(sys.argv[2]))
        result["rss_gb"] = peak_rss_gb()
        print(RESULT + json.dumps(result), flush=True)
    else:
        main()
