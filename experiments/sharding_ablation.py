"""Sharding ablation: one model config across mesh files, the layout being the only change.

For each mesh file: compile time of the jitted, donating train step; median step time over a few
real steps on a freshly initialised, sharded state (synthetic tokens); per-device parameter,
optimizer and temporary memory (shardings arithmetic and the compiled executable's memory
analysis); and the step's collectives by kind (count and result bytes per device, read from the
optimized HLO, loop bodies times their trip counts; see deepseek_jax/plan/hlo.py). The first step's
loss is reported too: every layout computes the same function, so it must agree across rows.

On a CPU the devices are fake (`jax_num_cpu_devices`, default 8) and share the host's cores, so
step times measure the partitioned program's work, not a network; on GPU/TPU the real devices
are used. Writes experiments/results/sharding_ablation.{md,png} and prints the table.

    python experiments/sharding_ablation.py [--model configs/model/tiny.yaml] [--meshes M.yaml ...]
        [--devices 8] [--batch 16] [--seq 64] [--steps 3] [a.b=value ...]
"""

import argparse
import os
import platform
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
OUT = ROOT / "experiments" / "results"
KIND_ABBREV = {"all-gather": "AG", "all-reduce": "AR", "reduce-scatter": "RS", "all-to-all": "A2A",
               "ragged-all-to-all": "rA2A", "collective-permute": "CP"}
MiB = 2**20


def synthetic_batch(cfg, sharding, seed: int = 0) -> dict:
    """Random tokens in the train step's batch layout, placed in `sharding`."""
    import jax
    import numpy as np

    B, T, V = cfg.data.global_batch_size, cfg.data.seq_len, cfg.model.vocab_size
    rng = np.random.default_rng(seed)
    loss_mask = np.ones((B, T), np.float32)
    loss_mask[:, -1] = 0
    host = {"tokens": rng.integers(0, V, (B, T), dtype=np.int32),
            "positions": np.broadcast_to(np.arange(T, dtype=np.int32), (B, T)).copy(),
            "segment_ids": np.ones((B, T), np.int32), "loss_mask": loss_mask}
    return {k: jax.device_put(v, sharding) for k, v in host.items()}


def run_layout(cfg, n_devices: int, steps: int, compiler_options: dict | None = None, initial=None):
    """Compiles, measures and runs `cfg`'s train step on its mesh over the first n devices.

    initial: a host copy of a fresh state, placed into this layout's shardings; None initialises
    one here (`Program.init_state`, created sharded). Returns (row, the host copy of the initial state).
    """
    import jax

    from deepseek_jax.plan import collectives, memory
    from deepseek_jax.program import build_program
    from deepseek_jax.sharding import make_mesh, rules

    p = build_program(cfg, make_mesh(cfg.mesh, jax.devices()[:n_devices]), rules(cfg.mesh))
    t = time.perf_counter()
    compiled = p.lower().compile(compiler_options=compiler_options)
    compile_s = time.perf_counter() - t
    if initial is None:
        with p.activate():
            state = p.init_state()
        initial = jax.device_get(state)
    else:
        state = jax.device_put(initial, p.state_shardings)
    batch = synthetic_batch(cfg, p.batch_sharding)
    state, metrics = compiled(state, batch)  # the first call also pays one-off transfer costs
    loss = float(metrics["loss"])
    times = []
    for _ in range(steps):
        t = time.perf_counter()
        state, metrics = compiled(state, batch)
        jax.block_until_ready((state, metrics))
        times.append(time.perf_counter() - t)
    row = {"mesh_shape": {k: int(v) for k, v in p.mesh.shape.items()}, "compile_s": compile_s,
           "step_s": statistics.median(times), "loss": loss, "memory": memory(compiled, p),
           "collectives": collectives(compiled.as_text())}
    return row, initial


def ablate(model: str, meshes: list[str], n_devices: int, batch: int, seq: int, steps: int,
           overrides: list[str] = (), compiler_options: dict | None = None) -> list[dict]:
    """One row per mesh file (a row with `error` where the mesh does not fit the devices).

    The state is initialised once, in the first layout, and resharded into the others: every
    layout starts from the same parameters (and the model's init compiles once, not per mesh).

    compiler_options: XLA options for the train step's compile (tests pass the plan's fast-CPU ones).
    """
    from deepseek_jax.config import ConfigError, load_config

    rows, initial = [], None
    for mesh in meshes:
        cfg = load_config([model, mesh], [f"data.global_batch_size={batch}", f"data.seq_len={seq}", *overrides])
        try:
            row, initial = run_layout(cfg, n_devices, steps, compiler_options, initial)
        except ConfigError as e:
            row = {"error": str(e)}
        rows.append({"mesh": Path(mesh).stem, **row})
        print(f"  {rows[-1]['mesh']}: " + (row.get("error") or f"compile {row['compile_s']:.1f} s, step "
              f"{row['step_s'] * 1e3:.0f} ms, loss {row['loss']:.4f}"), file=sys.stderr, flush=True)
    return rows


def markdown_table(rows: list[dict]) -> str:
    kinds = [k for k in KIND_ABBREV if any(r.get("collectives", {}).get(k, (0, 0))[0] for r in rows)]
    head = ["mesh", "shape d,f,c,e,t", "compile s", "step ms", "loss", "params MiB", "opt MiB", "temp MiB",
            "peak MiB", *(f"{KIND_ABBREV[k]} n / MiB" for k in kinds)]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in rows:
        if "error" in r:
            lines.append(f"| {r['mesh']} | {r['error']} |" + " |" * (len(head) - 2))
            continue
        m, c = r["memory"], r["collectives"]
        cells = [r["mesh"], ",".join(map(str, r["mesh_shape"].values())), f"{r['compile_s']:.1f}",
                 f"{r['step_s'] * 1e3:.0f}", f"{r['loss']:.4f}", f"{m['params'] / MiB:.2f}",
                 f"{m['optimizer'] / MiB:.2f}", f"{m['temp'] / MiB:.1f}", f"{m['peak_estimate'] / MiB:.1f}",
                 *(f"{c[k].count} / {c[k].bytes / MiB:.2f}" for k in kinds)]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def bar_chart(rows: list[dict], path: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    rows = [r for r in rows if "error" not in r]
    names, x = [r["mesh"] for r in rows], np.arange(len(rows))
    fig, axes = plt.subplots(1, 4, figsize=(20, 4.8))
    memory = [(lambda r, k=k: r["memory"][k], label) for k, label in
              (("params", "parameters"), ("optimizer", "optimizer state"), ("temp", "temporaries"))]
    comms = [(lambda r, k=k: r["collectives"][k].bytes, label) for k, label in KIND_ABBREV.items()]
    for ax, parts, name in ((axes[0], memory, "per-device memory (MiB)"),
                            (axes[1], comms, "collective result bytes per device per step (MiB)")):
        bottom = np.zeros(len(rows))
        for get, label in parts:
            v = np.array([get(r) / MiB for r in rows])
            if v.any():
                ax.bar(x, v, bottom=bottom, label=label)
                bottom += v
        ax.set(title=name, ylim=(0, 1.1 * max(bottom.max(), 1e-9)))
    axes[2].bar(x, [r["step_s"] * 1e3 for r in rows])
    axes[2].set(title="step time (ms, median)")
    axes[3].bar(x, [r["compile_s"] for r in rows])
    axes[3].set(title="compile time (s)")
    for ax in axes:
        ax.set_xticks(x, names, rotation=35, ha="right")
    for ax in axes[:2]:
        ax.legend(fontsize=8)
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def machine() -> str:
    import jax

    d = jax.devices()
    text = (f"{platform.machine()} {platform.processor() or ''}".strip() + f", {os.cpu_count()} CPU cores, "
            f"{len(d)} x {d[0].platform} device(s) ({d[0].device_kind}), jax {jax.__version__}, "
            f"Python {platform.python_version()}")
    if d[0].platform == "cpu":  # fake devices: every shard's work runs on the same cores
        text += (f"; host load average {os.getloadavg()[2]:.1f} (15 min) at the end of the run. The "
                 f"{len(d)} devices are fake CPU devices sharing the host's cores: step times measure the "
                 "partitioned program's total work, and collectives are memory copies, not a network. "
                 "XLA:CPU writes gradient reductions as all-reduces of whole gradients where GPU/TPU "
                 "compilers emit reduce-scatters")
    return text


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", default="configs/model/tiny.yaml")
    ap.add_argument("--meshes", nargs="+", help="mesh files (default: configs/mesh/*.yaml)")
    ap.add_argument("--devices", type=int, help="devices (default: 8 fake ones on CPU, else all)")
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--seq", type=int, default=64)
    ap.add_argument("--steps", type=int, default=3, help="timed steps after a warm-up step")
    ap.add_argument("--out", default=str(OUT / "sharding_ablation"), help="output path without suffix")
    ap.add_argument("overrides", nargs="*", help="a.b=value config overrides")
    ns = ap.parse_args(argv)
    from deepseek_jax.plan import request_cpu_devices

    request_cpu_devices(ns.devices or 8)  # only the CPU backend's count; GPUs/TPUs stay as they are
    import jax

    n = ns.devices or (8 if jax.default_backend() == "cpu" else jax.device_count())
    meshes = ns.meshes or sorted(str(p.relative_to(ROOT)) for p in (ROOT / "configs" / "mesh").glob("*.yaml"))
    rows = ablate(ns.model, meshes, n, ns.batch, ns.seq, ns.steps, ns.overrides)
    table = markdown_table(rows)
    command = "python experiments/sharding_ablation.py " + " ".join(sys.argv[1:] if argv is None else argv)
    out = Path(ns.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    title = f"{Path(ns.model).stem}, batch {ns.batch} x {ns.seq}, {n} devices"
    bar_chart(rows, out.with_suffix(".png"), title)
    out.with_suffix(".md").write_text(
        f"# Sharding ablation: {title}\n\nCommand: `{command.strip()}`\n\nMachine: {machine()}\n\n"
        f"{time.strftime('%Y-%m-%d')}. Memory is per device; collectives are per device and step (count / "
        "result MiB, loop bodies x trip counts; AG all-gather, AR all-reduce, RS reduce-scatter, A2A "
        "all-to-all, CP collective-permute). Step time is the median of the timed steps.\n\n"
        f"{table}\n\n![bars]({out.with_suffix('.png').name})\n"
    )
    print(table)
    print(f"\nwritten to {out.with_suffix('.md')} and {out.with_suffix('.png')}")


if __name__ == "__main__":
    main()
