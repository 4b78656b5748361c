"""`plan(cfg, n)`: build the Program over n devices, lower its train step, compile it if it can; the report.

Two methods, named in the result:

  compiled  XLA's memory analysis of the per-device program, and the collectives read from its
            optimized HLO. Needs n devices: on CPU, n fake ones (`jax_num_cpu_devices`, which must
            be set before JAX's backend starts; `plan` sets it when it still can).
  lowered   the step lowered on an abstract mesh (no device at all); parameter and optimizer bytes
            from the shardings, and an *analytic estimate* of the collectives (`estimate`).
"""

import math
import time
from dataclasses import dataclass, field

import jax

from deepseek_jax.config import Config
from deepseek_jax.params import count_params
from deepseek_jax.plan import activations as acts
from deepseek_jax.plan.analytic import estimate, spec_axes, state_memory
from deepseek_jax.plan.context import ContextLayer, context_rows, context_volume
from deepseek_jax.plan.hlo import KINDS, Volume, collectives
from deepseek_jax.program import Program, build_program
from deepseek_jax.sharding import (
    abstract_mesh,
    batch_shards,
    check_state_split,
    context_axes,
    make_mesh,
    moe_axes,
    rules,
)

# The plan never runs what it compiles: XLA:CPU's LLVM optimisation is skipped (2-3x faster compiles;
# HLO passes, buffer assignment and collectives are unchanged: checked on the tiny model).
CPU_PLAN_COMPILER_OPTIONS = {"xla_backend_optimization_level": 0, "xla_llvm_disable_expensive_passes": True}


class PlanError(RuntimeError):
    """The plan cannot be made as asked (e.g. too few devices to compile for)."""


@dataclass
class PlanResult:
    n_devices: int
    mesh_shape: dict[str, int]
    batch: tuple[int, int]  # (B, T) global
    params: dict[str, int]  # total, active, active_no_embedding (count_params)
    memory: dict[str, int]  # per-device bytes (see `memory` and `state_memory`)
    collectives: dict[str, Volume] | None  # from the compiled HLO; None when only lowered
    estimate: dict[str, Volume]  # analytic, always computed
    method: str  # "compiled" | "lowered"
    platform: str  # the backend compiled for ("abstract" when only lowered)
    timings: dict[str, float] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)
    context: list[ContextLayer] = field(default_factory=list)  # per attention layer; [] without a context split
    activations: dict[str, float] = field(default_factory=dict)  # per-device bytes (plan.activations)
    fit: dict | None = None  # plan.activations.fit, when an HBM size was given


def memory(compiled, p: Program | None = None) -> dict[str, int]:
    """Per-device bytes: XLA's analysis of the compiled step, and (given `p`) the state breakdown.

    `peak_estimate` = arguments + outputs - aliased (donated) + temporaries: an upper bound on the
    step's live memory as the buffer assignment of the backend it was compiled for sees it.
    """
    m = compiled.memory_analysis()
    out = {
        "argument": m.argument_size_in_bytes, "output": m.output_size_in_bytes, "alias": m.alias_size_in_bytes,
        "temp": m.temp_size_in_bytes, "generated_code": m.generated_code_size_in_bytes,
    }
    out["peak_estimate"] = out["argument"] + out["output"] - out["alias"] + out["temp"]
    return {**out, **(state_memory(p) if p is not None else {})}


def request_cpu_devices(n: int) -> None:
    """Asks for n fake CPU devices; only possible before JAX's backend starts (else a no-op)."""
    try:
        if jax.config.jax_num_cpu_devices < n:
            jax.config.update("jax_num_cpu_devices", n)
    except RuntimeError:  # the backend already started; plan() makes do with the devices there are
        pass


def _devices(n_devices: int | None, compile: bool | None) -> tuple[list, int, bool, list[str]]:
    """(devices, n, whether to compile, notes) for a plan request; see `plan`."""
    if n_devices is not None and n_devices < 1:
        raise PlanError(f"--devices must be >= 1, got {n_devices}")
    if compile is not False and n_devices:
        request_cpu_devices(n_devices)
    devices = jax.devices()
    n = len(devices) if n_devices is None else n_devices
    if compile and len(devices) < n:
        raise PlanError(f"compiling for {n} devices needs {n}, found {len(devices)} {devices[0].platform} "
                        f"devices (on CPU: --cpu-devices {n}, set before JAX starts)")
    if compile is None and len(devices) < n:
        return devices, n, False, [f"only {len(devices)} devices here: lowered, not compiled"]
    return devices, n, compile is not False, []


def plan(cfg: Config, n_devices: int | None = None, compile: bool | None = None, hbm_gib: float | None = None,
         headroom: float = 0.1) -> PlanResult:
    """Per-device memory and collectives of `cfg`'s train step on n devices, nothing allocated.

    n_devices: None = the devices present. compile: True compiles (error without n devices), False
    only lowers on an abstract mesh, None compiles when n devices are available (after asking for
    n fake CPU devices). hbm_gib: with it, whether state + activations fit per device keeping the
    `headroom` fraction free (plan.activations.fit).
    """
    devices, n, compile, notes = _devices(n_devices, compile)
    timings = {}
    t = time.perf_counter()
    mesh = make_mesh(cfg.mesh, devices[:n]) if compile else abstract_mesh(cfg.mesh, n)
    p = build_program(cfg, mesh, rules(cfg.mesh))
    timings["build_s"] = time.perf_counter() - t
    check_state_split(p.state_target(), p.mesh)  # a ConfigError naming the array, not JAX's internal error
    _check_fits(p)
    t = time.perf_counter()
    lowered = p.lower()
    timings["lower_s"] = time.perf_counter() - t
    coll, mem, platform = None, state_memory(p), "abstract"
    if compile:
        platform = devices[0].platform
        t = time.perf_counter()
        compiled = lowered.compile(compiler_options=CPU_PLAN_COMPILER_OPTIONS if platform == "cpu" else {})
        timings["compile_s"] = time.perf_counter() - t
        mem, coll = memory(compiled, p), collectives(compiled.as_text())
        notes += _backend_notes(cfg, platform)
    c = count_params(cfg.model)
    t = time.perf_counter()
    activation = _activations(p)
    timings["activations_s"] = time.perf_counter() - t
    state = sum(mem[k] for k in ("params", "optimizer", "other_state", "batch"))
    return PlanResult(
        n, {k: int(v) for k, v in p.mesh.shape.items()}, (cfg.data.global_batch_size, cfg.data.seq_len),
        {k: c[k] for k in ("total", "active", "active_no_embedding")}, mem, coll, estimate(p),
        "compiled" if compile else "lowered", platform, timings, notes, _context(p), activation,
        None if hbm_gib is None else acts.fit(state, activation["peak"], hbm_gib, headroom),
    )


def _activations(p: Program) -> dict[str, float]:
    """plan.activations on the mesh's splits: token shards, sequences per device, cp and ep."""
    with p.activate():
        shards, cx, ax = batch_shards(), context_axes(), moe_axes()
    ways = lambda axes: math.prod(p.mesh.shape[a] for a in axes)  # noqa: E731
    B_local = max(1, p.cfg.data.global_batch_size // ways(cx.batch))
    a = p.abstract_state
    split = acts.weight_split(a.params, p.state_shardings.params)
    out = acts.saved_memory(p.cfg, a.params, a.router, shards, split)
    out |= acts.working_set(p.cfg, shards, B_local, ways(cx.seq), ways(ax.expert))
    out["peak"] = acts.peak(out)
    return out


def _context(p: Program) -> list[ContextLayer]:
    """`plan.context.context_volume` at the run's batch and seq_len, on the mesh's context split."""
    with p.activate():
        cx = context_axes()
    ways = lambda axes: math.prod(p.mesh.shape[a] for a in axes)  # noqa: E731
    B, T = p.cfg.data.global_batch_size, p.cfg.data.seq_len
    return context_volume(p.cfg.model, B // ways(cx.batch), T, ways(cx.seq))


def _check_fits(p: Program) -> None:
    B, T = p.cfg.data.global_batch_size, p.cfg.data.seq_len
    n = math.prod(p.mesh.shape[a] for a in spec_axes(p.batch_sharding.spec))
    if B % n:
        raise PlanError(f"data.global_batch_size={B} does not split over the {n} devices the batch is sharded "
                        f"on; use a multiple of {n}")
    if T > p.cfg.model.max_seq_len:
        raise PlanError(f"data.seq_len={T} exceeds model.max_seq_len={p.cfg.model.max_seq_len}")


def _backend_notes(cfg: Config, platform: str) -> list[str]:
    if platform != "cpu":
        return []
    notes = [("temporaries are XLA:CPU's buffer assignment (no GPU/TPU fusion or kernels); "
              "arguments and the state breakdown carry over to any backend"),
             ("XLA:CPU writes gradient reductions as all-reduces of whole gradients (no reduce-scatter "
              "creation): its all-reduce bytes overstate a GPU/TPU's reduce-scatters")]
    if cfg.model.moe.impl == "ragged":
        notes.append("XLA:CPU lowers ragged_dot to a masked dense product over all of a shard's experts: "
                     "temporaries include [E, M*A, ...] buffers a GPU/TPU grouped matmul does not need")
    return notes


def _size(n: float) -> str:
    """Bytes in the largest binary unit that keeps the number >= 1: '10.70 GiB'."""
    for unit in ("B", "KiB", "MiB", "GiB"):
        if abs(n) < 1024:
            return f"{n:.2f} {unit}" if unit != "B" else f"{int(n)} B"
        n /= 1024
    return f"{n:.2f} TiB"


def _count(n: int) -> str:
    return f"{n / 1e9:.3f}B" if n >= 1e9 else f"{n / 1e6:.3f}M"


def _collective_rows(r: PlanResult) -> list[str]:
    have = r.collectives is not None
    compiled = lambda v: f"{v.count:>8}{_size(v.bytes):>14}   " if have else ""  # noqa: E731
    head = f"{'count':>8}{'bytes':>14}   " if have else ""
    rows = [f"  {'kind':<20}{head}{'est. count':>11}{'est. bytes':>14}"]
    for k in KINDS:
        got, est = (r.collectives or {}).get(k, Volume(0, 0)), r.estimate[k]
        if got.count or est.count:
            rows.append(f"  {k:<20}{compiled(got)}{est.count:>11}{_size(est.bytes):>14}")
    return rows


def _memory_rows(r: PlanResult) -> list[str]:
    m = r.memory
    row = lambda label, n, note="": f"  {label:<20}{_size(n):>14}{note}"  # noqa: E731
    lines = [
        "per-device memory, from the shardings:",
        row("parameters (f32)", m["params"], f"   (unsharded {_size(m['params_unsharded'])})"),
        *([row("  of which Engram", m["engram_tables"], "   (tables: rows split by the `engram_rows` rule)")]
          if m.get("engram_tables") else []),
        row("optimizer state", m["optimizer"]),
        row("router/step/rng", m["other_state"]),
        row("batch", m["batch"]),
    ]
    if "temp" in m:
        lines += [
            f"per-device memory, XLA memory analysis ({r.platform}):",
            row("arguments", m["argument"]),
            row("outputs", m["output"], f"   (aliased with arguments: {_size(m['alias'])}, donated)"),
            row("temporaries", m["temp"]),
            row("generated code", m["generated_code"]),
            row("peak estimate", m["peak_estimate"], "   (arguments + outputs - aliased + temporaries)"),
        ]
    return lines + _activation_rows(r)


def _activation_rows(r: PlanResult) -> list[str]:
    """Saved residuals (measured with JAX's AD on abstract shapes), the working-set estimate, the fit."""
    a = r.activations
    if not a:
        return []
    row = lambda label, n, note="": f"  {label:<20}{_size(n):>14}{note}"  # noqa: E731
    lines = [
        "per-device activations (plan.activations: residuals measured by jax's AD, working set an estimate):",
        row("saved residuals", a["saved"], f"   (fixed {_size(a['residual_fixed'])} + per sequence "
            f"{_size(a['residual_per_sequence'])} x batch / token shards)"),
        row("remat block", a["remat_block"], "   (one block's residuals during its backward)"),
        row("attention keys", a["attention_keys"], "   (key side + its gradient)"),
        row("query block", a["query_block"]),
        row("MoE dispatch", a["moe_dispatch"]),
        row("loss chunk", a["loss_chunk"]),
        row("activation peak", a["peak"], "   (saved + remat block + largest phase)"),
    ]
    if r.fit is not None:
        f = r.fit
        state = f["need"] - a["peak"]
        verdict = "FITS" if f["fits"] else "DOES NOT FIT"
        lines.append(row("state + activations", f["need"], f"   (state {_size(state)}): {verdict} in "
                         f"{_size(f['hbm'])} with {1 - f['usable'] / f['hbm']:.0%} headroom "
                         f"({_size(f['usable'])} usable)"))
    return lines


def format_report(r: PlanResult) -> str:
    """The plan as a readable text report."""
    p = r.params
    mesh = " ".join(f"{k}={v}" for k, v in r.mesh_shape.items())
    how = {"compiled": f"compiled for {r.platform}: XLA memory analysis + collectives from the optimized HLO",
           "lowered": "lowered on an abstract mesh: memory from shardings arithmetic, collectives an ESTIMATE"}
    lines = [
        f"plan: {r.n_devices} devices, mesh {mesh}, global batch {r.batch[0]} x {r.batch[1]} tokens",
        f"method: {r.method} ({how[r.method]})",
        (f"parameters: total {_count(p['total'])}, active per token {_count(p['active'])} "
         f"({_count(p['active_no_embedding'])} without the embedding)"),
        "",
        *_memory_rows(r),
        "",
        ("collectives per step, per device (result bytes; loop bodies x trip counts; "
         "est. = analytic estimate, see plan.estimate):"),
        *_collective_rows(r),
        "",
        *(context_rows(r.context, r.batch[1]) + [""] if r.context else []),
        "timings: " + ", ".join(f"{k.removesuffix('_s')} {v:.1f} s" for k, v in r.timings.items()),
    ]
    lines += [f"note: {n}" for n in r.notes]
    return "\n".join(lines)
