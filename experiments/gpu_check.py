"""One prepared accelerator check (issue 15, item 5): training MFU of a ~1B-activated V4 config in
bf16, the `ragged_a2a` expert-parallel dispatch against `ring`, and the cuDNN attention kernel
against XLA's streamed path. `experiments/gpu_check.sh` runs it: on a GPU with the full configs, on
CPU with small ones (`--small`, 8 fake CPU devices).

    python experiments/gpu_check.py --header [--small] --out FILE    # the file's title and machine
    python experiments/gpu_check.py --check {mfu,ep,attention} [--small] [--mfu-impl ragged] [--mfu-batch 1] --out FILE

Each `--check` call runs one check in its own process (a crash or a timeout loses only that row)
and appends one row `| check | config | result | numbers |` to FILE. A check that raises is a row
saying FAILED with the one-line error; `result` is PASSED, FAILED or `skipped: why`.

  mfu        the full jitted train step (loss, MTP, balance loss, AdamW, bias update) on random
             tokens: median step time after two warm-up steps, tokens/s and MFU = tokens/s x
             params.train_flops_per_token / peak. Peak: the published dense bf16 peak of the
             device kind (PEAK_BF16); on CPU the float32 matmul peak measured by
             metrics.measure_peak_flops (it has no bf16 mode, so an unknown GPU kind gets no MFU).
  ep         value and gradient of train.loss_fn under configs/mesh/dp_ep.yaml with the expert axis
             = all local devices, `moe.dispatch` ragged_a2a vs ring on the same batch and state,
             float32 at matmul precision "highest": |Δ loss|, max |Δ grad| / max |grad|, routing
             counts identical, time per call. On a GPU it first runs the real
             `jax.lax.ragged_all_to_all` over the local devices against a numpy reference. On CPU
             (XLA:CPU has no ragged_all_to_all) it runs `ragged_a2a_emulated` and says so.
  attention  dense MLA with `model.attention_impl` cudnn vs xla in bf16: the MLA layer's output and
             the train step's loss and time on batches with no `segment_ids` (one document per
             row: `latent.use_kernel` streams packed documents). On CPU the cudnn side is skipped
             with `latent.check_kernel`'s message and only the xla path runs.
"""

import argparse
import dataclasses
import math
import os
import platform
import statistics
import time
import traceback
from datetime import date
from functools import partial
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import AxisType, Mesh
from jax.sharding import PartitionSpec as P

from deepseek_jax.config import ConfigError, load_config
from deepseek_jax.layers.attention.latent import check_kernel
from deepseek_jax.layers.attention.mla import MLA
from deepseek_jax.layers.moe.dispatch import check_backend
from deepseek_jax.metrics import measure_peak_flops, mfu
from deepseek_jax.models import build_model
from deepseek_jax.params import count_params, train_flops_per_token
from deepseek_jax.plan.report import memory
from deepseek_jax.program import build_program
from deepseek_jax.sharding import make_mesh, rules
from deepseek_jax.train import loss_fn

ROOT = Path(__file__).resolve().parents[1]
# Published dense (no sparsity) bf16 tensor-core peaks per device, matched in order against
# jax.devices()[0].device_kind (e.g. "NVIDIA H100 80GB HBM3").
PEAK_BF16 = (("H200", 989.4e12), ("H100 PCIe", 756.0e12), ("H100", 989.4e12), ("A100", 312.0e12))
CHECKS = ("mfu", "ep", "attention")


@dataclasses.dataclass(frozen=True)
class Case:
    """A model config with overrides and the batch one check runs on it."""

    config: str  # path under the repo root
    overrides: tuple[str, ...]  # `a.b=value` strings, as on the command line
    batch: int  # sequences per step
    seq: int  # tokens per sequence
    steps: int  # timed calls after the warm-up


FULL = {  # on a GPU: H100 80 GB / H200 141 GB
    "mfu": Case("configs/model/gpu_check_v4_1b.yaml", (), 2, 4096, 8),  # x2 on an H200: fit_batch
    "ep": Case("configs/model/tiny_v4.yaml", (), 8, 1024, 5),
    "attention": Case("configs/model/v3_100m.yaml", ("model.dtype=bfloat16",), 4, 4096, 5),
}
SHORT = ("model.n_layers=2", "model.num_nextn_predict_layers=0")  # one dense + one MoE block: compiles fast
SMALL = {  # on CPU (the test): the V3 tiny model, seconds per check
    "mfu": Case("configs/model/tiny.yaml", SHORT, 4, 128, 3),
    "ep": Case("configs/model/tiny.yaml", SHORT, 8, 32, 2),
    "attention": Case("configs/model/tiny.yaml", (*SHORT, "model.dtype=bfloat16"), 2, 64, 2),
}


def run_config(case: Case, mesh_file: str, extra: list[str]):
    """The Config of `case` under a mesh file, with `extra` overrides applied last."""
    size = [f"data.seq_len={case.seq}", f"data.global_batch_size={case.batch}"]
    return load_config([ROOT / case.config, ROOT / mesh_file], [*case.overrides, *size, *extra])


def program(case: Case, mesh_file: str, extra: list[str]):
    """The Program of run_config(...) on a mesh of this machine's devices."""
    cfg = run_config(case, mesh_file, extra)
    return build_program(cfg, make_mesh(cfg.mesh), rules(cfg.mesh))


def random_batch(p, seed: int, packed: bool = True) -> dict:
    """Random tokens [B, T] in the program's batch sharding; `packed=False` leaves out segment_ids
    (one document per row), which is what lets dense MLA take the fused kernel."""
    B, T, V = p.cfg.data.global_batch_size, p.cfg.data.seq_len, p.cfg.model.vocab_size
    rng = np.random.default_rng(seed)
    batch = {
        "tokens": rng.integers(0, V, (B, T)).astype(np.int32),
        "positions": np.broadcast_to(np.arange(T, dtype=np.int32), (B, T)),
        "segment_ids": np.ones((B, T), np.int32) if packed else None,
        "loss_mask": np.ones((B, T), np.float32) * (np.arange(T) < T - 1),
    }
    return jax.device_put(batch, p.batch_sharding)


def run_steps(step, state, batches: list, n: int):
    """n calls of a state-donating step on alternating batches, each waited for:
    (state, last metrics, seconds per call)."""
    metrics, times = None, []
    for i in range(n):
        t0 = time.perf_counter()
        state, metrics = jax.block_until_ready(step(state, batches[i % len(batches)]))
        times.append(time.perf_counter() - t0)
    return state, metrics, times


def backend() -> str:
    """The platform of the devices the checks run on: "cpu" or "gpu" (one place to stub in tests)."""
    return jax.devices()[0].platform


def published_peak(device_kind: str) -> float | None:
    """The PEAK_BF16 entry of a device kind; None for a kind not in the table."""
    return next((peak for key, peak in PEAK_BF16 if key in device_kind), None)


def peak_flops() -> tuple[float | None, str]:
    """(per-device peak FLOP/s or None, where it comes from) for MFU's denominator."""
    if backend() == "cpu":
        return measure_peak_flops(), "measured float32 matmul peak"
    kind = jax.devices()[0].device_kind
    peak = published_peak(kind)
    if peak is None:
        return None, f"no published peak for {kind!r}; metrics.measure_peak_flops is float32 only"
    return peak, f"published dense bf16 peak of {kind}"


def fit_batch(case: Case) -> Case:
    """Twice the sequences on a device with >= 120 GiB (H200) as on an 80 GB H100: the XLA:CPU
    memory analysis of the step is 66.5 GiB at 2 x 4096 tokens and 89.5 GiB at 4 x 4096."""
    stats = jax.devices()[0].memory_stats() or {}
    return dataclasses.replace(case, batch=2 * case.batch) if stats.get("bytes_limit", 0) >= 120 * 2**30 else case


def check_mfu(case: Case, impl: str | None, notes: list[str]) -> str:
    """Check 1: compile, two warm-up steps, `case.steps` timed steps of the donated train step."""
    p = program(case, "configs/mesh/single.yaml", [f"model.moe.impl={impl}"] if impl else [])
    m = p.cfg.model
    c = count_params(m)
    notes.append(f"{c['total'] / 1e9:.3f}B total, {c['active'] / 1e9:.3f}B active "
                 f"({c['active_no_embedding'] / 1e9:.3f}B without embedding), remat {m.remat}")  # fmt: skip
    t0 = time.perf_counter()
    step = p.lower().compile()
    peak_mem = memory(step)["peak_estimate"] / 2**30
    notes.append(f"compile {time.perf_counter() - t0:.0f} s, XLA peak estimate {peak_mem:.1f} GiB")
    batches = [random_batch(p, i) for i in range(2)]
    state, _, _ = run_steps(step, p.init_state(), batches, 2)  # warm-up
    _, metrics, times = run_steps(step, state, batches, case.steps)
    loss, step_s = float(metrics["loss"]), statistics.median(times)
    flops = train_flops_per_token(m, case.seq)
    tokens_s = case.batch * case.seq / step_s
    peak, source = peak_flops()
    util = f"MFU {mfu(tokens_s, flops, peak, 1):.1%} of {peak / 1e12:.1f} TFLOP/s" if peak else "MFU unknown"
    notes.append(f"step {step_s:.3f} s (median of {case.steps}, min {min(times):.3f}), {tokens_s:,.0f} tokens/s, "
                 f"{flops / 1e9:.2f} GFLOP/token, {util} ({source}), loss {loss:.4f}")  # fmt: skip
    return "PASSED" if math.isfinite(loss) else "FAILED: non-finite loss"


def probe_ragged_all_to_all(n: int, rows: int = 64, width: int = 8) -> tuple[bool, str]:
    """The real `jax.lax.ragged_all_to_all` over n devices against numpy: shard s sends rows
    [in_off[s, d], +size[s, d]) of its operand to shard d, which writes them at out_off[s, d]."""
    rng = np.random.default_rng(0)
    size_SD = rng.integers(0, rows // n + 1, (n, n)).astype(np.int32)  # each row sums to <= rows
    in_off_SD = (np.cumsum(size_SD, 1) - size_SD).astype(np.int32)
    out_off_SD = (np.cumsum(size_SD, 0) - size_SD).astype(np.int32)  # s's place in d's buffer
    x_SXW = rng.normal(size=(n, rows, width)).astype(np.float32)
    want = np.zeros((n, n * rows, width), np.float32)
    for s in range(n):
        for d in range(n):
            want[d, out_off_SD[s, d]:][:size_SD[s, d]] = x_SXW[s, in_off_SD[s, d]:][:size_SD[s, d]]

    def shard(x, in_off, send, out_off, recv):
        out = jnp.zeros((n * rows, width), x.dtype)
        return jax.lax.ragged_all_to_all(x[0], out, in_off[0], send[0], out_off[0], recv[0], axis_name="ep")[None]

    mesh = Mesh(np.asarray(jax.devices()[:n]), ("ep",), axis_types=(AxisType.Auto,))
    fn = jax.jit(jax.shard_map(shard, mesh=mesh, in_specs=(P("ep"),) * 5, out_specs=P("ep")))
    got = np.asarray(fn(x_SXW, in_off_SD, size_SD, out_off_SD, np.ascontiguousarray(size_SD.T)))
    ok = np.array_equal(got, want)
    return ok, f"real ragged_all_to_all over {n} device(s) vs numpy: {'exact' if ok else 'MISMATCH'}"


def loss_and_grad(cfg, p, state, batch, steps: int) -> dict:
    """Loss, routing counts, gradients and time per call of value_and_grad(train.loss_fn) for
    `cfg`'s model on program p's mesh, state and batch, float32 matmuls at full precision."""
    grad = jax.jit(jax.value_and_grad(partial(loss_fn, model=build_model(cfg.model), cfg=cfg), has_aux=True))
    with p.activate(), jax.default_matmul_precision("highest"):
        (total, (_, counts)), grads = jax.block_until_ready(grad(state.params, state.router, batch))
        times = []
        for _ in range(steps):
            t0 = time.perf_counter()
            jax.block_until_ready(grad(state.params, state.router, batch))
            times.append(time.perf_counter() - t0)
    return {"loss": float(total), "counts": {k: np.asarray(v) for k, v in counts.items() if v is not None},
            "grads": jax.device_get(grads), "step_s": statistics.median(times)}


def check_ep(case: Case, notes: list[str]) -> str:
    """Check 2: ragged_a2a (emulated on CPU) vs ring on one batch, after the collective probe on GPU."""
    n, platform_ = jax.device_count(), backend()
    dispatch = "ragged_a2a_emulated" if platform_ == "cpu" else "ragged_a2a"
    probe_ok = True
    if platform_ == "cpu":
        notes.append(f"real ragged_all_to_all NOT exercised (XLA:CPU lacks it): ragged_a2a_emulated on {n} CPU devices")
    else:
        probe_ok, text = probe_ragged_all_to_all(n)
        notes.append(text)
    check_backend(dispatch, platform_)
    mesh_file, shape = "configs/mesh/dp_ep.yaml", f"mesh.shape=[1,1,1,{n},1]"  # the expert axis = every device
    notes.append(f"{Path(mesh_file).name} with expert axis {n}, {dispatch} vs ring")
    # The ring program makes the state and batch for both: build_program and init_state trace the
    # model outside the mesh, where ragged_a2a's per-shard code has no expert axis and fails.
    p = program(case, mesh_file, [shape])
    state, batch = p.init_state(), random_batch(p, 0)
    b, a = (loss_and_grad(run_config(case, mesh_file, [shape, f"model.moe.dispatch={d}"]), p, state, batch,
                          case.steps) for d in ("ring", dispatch))  # fmt: skip
    d_loss = abs(a["loss"] - b["loss"])
    scale = max(float(np.max(np.abs(g))) for g in jax.tree.leaves(b["grads"]))
    d_grad = max(float(np.max(np.abs(x - y))) for x, y in zip(jax.tree.leaves(a["grads"]), jax.tree.leaves(b["grads"])))
    same = a["counts"].keys() == b["counts"].keys() and all(
        np.array_equal(a["counts"][k], b["counts"][k]) for k in a["counts"])
    routed = sum(int(v.sum()) for v in b["counts"].values())
    notes.append(f"|Δ loss| {d_loss:.2e} (total loss {b['loss']:.5f}), "
                 f"max |Δ grad| / max |grad| {d_grad / scale:.2e}, "
                 f"routing counts {'identical' if same else 'DIFFER'} ({routed:,} routed pairs), "
                 f"value+grad {a['step_s'] * 1e3:.1f} ms vs ring {b['step_s'] * 1e3:.1f} ms")  # fmt: skip
    # same f32 math, other reduction order (STYLE.md: 1e-5 on a different mesh); grads to their scale
    ok = probe_ok and same and d_loss <= 1e-5 * max(1.0, abs(b["loss"])) and d_grad <= 1e-4 * scale
    return "PASSED" if ok else "FAILED: ragged_a2a and ring disagree (see numbers)"


def mla_outputs(cfg, impls: list[str], batch: int, seq: int) -> dict:
    """One MLA layer's output [B, T, D] per attention impl, the same parameters and input (bf16)."""
    m = cfg.model
    layer = lambda impl: MLA(m.mla, m.rope, m.dim, m.norm_eps, jnp.bfloat16, attention_impl=impl)  # noqa: E731
    x_BTD = jax.random.normal(jax.random.key(1), (batch, seq, m.dim), jnp.bfloat16)
    pos_BT = jnp.broadcast_to(jnp.arange(seq, dtype=jnp.int32), (batch, seq))
    params = jax.jit(layer("xla").init)(jax.random.key(0), x_BTD, pos_BT)
    return {impl: np.asarray(jax.jit(layer(impl).apply)(params, x_BTD, pos_BT)[0], np.float32) for impl in impls}


def attention_step(case: Case, impl: str) -> dict:
    """The train step with `model.attention_impl=impl` on unpacked batches: first loss, step time,
    and whether the lowered step calls cuDNN's fused attention."""
    p = program(case, "configs/mesh/single.yaml", [f"model.attention_impl={impl}"])
    batches = [random_batch(p, i, packed=False) for i in range(2)]
    state = p.init_state()
    with p.activate():
        lowered = jax.jit(p.train_step, donate_argnums=0).lower(state, batches[0])
        step = lowered.compile()
        state, metrics, _ = run_steps(step, state, batches, 1)  # warm-up; its loss is the compared one
        _, _, times = run_steps(step, state, batches, case.steps)
    return {"cfg": p.cfg, "loss": float(metrics["loss"]), "step_s": statistics.median(times),
            "fused": "__cudnn$" in lowered.as_text()}  # jax's custom calls for cuDNN attention


def check_attention(case: Case, notes: list[str]) -> str:
    """Check 3: cudnn vs xla (layer output, loss, step time); xla alone where check_kernel refuses."""
    mla = run_config(case, "configs/mesh/single.yaml", []).model.mla
    head_dim = max(mla.qk_head_dim, mla.v_head_dim)
    try:
        check_kernel("cudnn", jnp.bfloat16, head_dim)
        impls = ["xla", "cudnn"]
    except ConfigError as e:
        skipped, impls = str(e), ["xla"]
    runs = {impl: attention_step(case, impl) for impl in impls}
    outs = mla_outputs(runs["xla"]["cfg"], impls, case.batch, case.seq)
    x = runs["xla"]
    scale = float(np.max(np.abs(outs["xla"])))
    notes.append(f"xla: loss {x['loss']:.4f}, step {x['step_s']:.3f} s, layer output max |y| {scale:.3f}")
    if "cudnn" not in runs:
        finite = math.isfinite(x["loss"]) and bool(np.all(np.isfinite(outs["xla"])))
        return f"skipped: {skipped}" if finite else "FAILED: non-finite xla loss or output"
    c = runs["cudnn"]
    d_out = float(np.max(np.abs(outs["cudnn"] - outs["xla"])))
    d_loss = abs(c["loss"] - x["loss"])
    fused = "yes" if c["fused"] else "NO"
    notes.append(f"cudnn: loss {c['loss']:.4f}, step {c['step_s']:.3f} s (xla / cudnn "
                 f"{x['step_s'] / c['step_s']:.2f}x), cuDNN fused attention in the step: {fused}; "
                 f"layer output max |Δ| {d_out:.2e} ({d_out / scale:.2e} of max |y|), "
                 f"|Δ loss| {d_loss:.2e}")  # fmt: skip
    ok = c["fused"] and d_out <= 2e-2 * scale and d_loss <= 2e-2  # STYLE.md: bf16 compute, 2e-2
    return "PASSED" if ok else "FAILED: cudnn and xla disagree, or the kernel did not run (see numbers)"


def case_label(case: Case, impl: str | None) -> str:
    """The config column: file, overrides and batch."""
    extra = [*case.overrides, *([f"model.moe.impl={impl}"] if impl else [])]
    return f"{Path(case.config).name}{' ' + ' '.join(extra) if extra else ''}, {case.batch}x{case.seq}"


def header(small: bool) -> str:
    """Title, machine and mode lines and the table head."""
    dev = jax.devices()[0]
    mode = ("--small: small configs" + (" on CPU, no GPU visible: the GPU paths are not exercised"
                                        if dev.platform == "cpu" else "")) if small else "full configs"
    return "\n".join([
        "# gpu_check", "",
        f"Command: `bash experiments/gpu_check.sh{' --small' if small else ''}`; {date.today().isoformat()}; {mode}.",
        f"Machine: {jax.device_count()} x {dev.device_kind} ({dev.platform}), {platform.machine()}, "
        f"jax {jax.__version__}, python {platform.python_version()}, 1-min load average {os.getloadavg()[0]:.1f}.", "",
        "| check | config | result | numbers |", "|---|---|---|---|", "",
    ])  # fmt: skip


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--check", choices=CHECKS, help="the one check to run (appends its row)")
    ap.add_argument("--header", action="store_true", help="write the file's title and table head")
    ap.add_argument("--small", action="store_true", help="the small configs (CPU)")
    ap.add_argument("--mfu-impl", choices=["ragged", "blocked", "dense"], help="mfu: override model.moe.impl")
    ap.add_argument("--mfu-batch", type=int, help="mfu: sequences per step (default: the case's, fit_batch)")
    ap.add_argument("--out", type=Path, default=ROOT / "experiments" / "results" / "gpu_check.md")
    ns = ap.parse_args()
    if not ns.small and backend() == "cpu":
        raise SystemExit("gpu_check: JAX sees no GPU (platform cpu); the full configs need one: use --small")
    if ns.header:
        ns.out.parent.mkdir(parents=True, exist_ok=True)
        ns.out.write_text(header(ns.small))
        return print(header(ns.small))
    if ns.check is None:
        raise SystemExit("gpu_check: give --header or --check {mfu,ep,attention}")
    case = SMALL[ns.check] if ns.small else FULL[ns.check]
    if ns.check == "mfu" and ns.mfu_batch:
        case = dataclasses.replace(case, batch=ns.mfu_batch)
    elif ns.check == "mfu" and not ns.small:
        case = fit_batch(case)
    impl = ns.mfu_impl if ns.check == "mfu" else None
    notes: list[str] = []
    run = {"mfu": partial(check_mfu, impl=impl), "ep": check_ep, "attention": check_attention}[ns.check]
    try:
        result = run(case, notes=notes)
    except Exception as e:  # noqa: BLE001 -- a failed check is a row, never an abort of the others
        where = traceback.extract_tb(e.__traceback__)[-1]
        first = (str(e).strip().splitlines() or [""])[0][:300]
        result = f"FAILED: {type(e).__name__}: {first} (at {Path(where.filename).name}:{where.lineno} {where.name})"
    cells = [f"{CHECKS.index(ns.check) + 1} {ns.check}", case_label(case, impl), result, "; ".join(notes)]
    row = "| " + " | ".join(c.replace("|", "\\|") for c in cells) + " |"
    with ns.out.open("a") as f:
        f.write(row + "\n")
    print(row)


if __name__ == "__main__":
    main()
