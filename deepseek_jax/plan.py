"""Planning a run without running it: per-device memory and collective volume of one train step.

`plan(cfg, n)` builds the abstract train state and its shardings over a mesh of n devices (no
parameter is allocated: `eval_shape` and `ShapeDtypeStruct`s only), lowers the jitted, donating
`train_step`, and by default compiles it. Two methods, named in the result:

  compiled  XLA's memory analysis of the per-device program, and the collectives read from its
            optimized HLO. Needs n devices: on CPU, n fake ones (`jax_num_cpu_devices`, which must
            be set before JAX's backend starts; `plan` sets it when it still can).
  lowered   the step lowered on an abstract mesh (no device at all); parameter and optimizer bytes
            from the shardings, and an *analytic estimate* of the collectives (`estimate`).

Both report parameter / optimizer-state bytes per device from the shardings: an array's bytes over
the product of the mesh axes splitting it (`sharding.shard_shape`).

Collective volume (`collectives`): one device's view of one step. A collective's bytes are the
size of its *result* on one device (all-gather: the gathered array; reduce-scatter: the scattered
shard; all-reduce, all-to-all, collective-permute: the buffer), summed over tuple results. Async
pairs count once (at `-done`, whose shape is the result). Ops inside a `while` body (the scanned
layer stacks, the chunked loss) are multiplied by the loop's `known_trip_count` when XLA recorded
one (else counted once per occurrence); both branches of a conditional are counted.
"""

import math
import re
import time
from collections import Counter
from dataclasses import dataclass, field
from typing import NamedTuple

import jax
import jax.numpy as jnp

from deepseek_jax.config import Config
from deepseek_jax.model import Transformer
from deepseek_jax.params import count_params, param_shapes
from deepseek_jax.sharding import (
    abstract_mesh,
    activate,
    batch_sharding,
    logical_mesh_axes,
    make_mesh,
    moe_axes,
    rules,
)
from deepseek_jax.train import build

# The plan never runs what it compiles: XLA:CPU's LLVM optimisation is skipped (2-3x faster compiles;
# HLO passes, buffer assignment and collectives are unchanged: checked on the tiny model).
CPU_PLAN_COMPILER_OPTIONS = {"xla_backend_optimization_level": 0, "xla_llvm_disable_expensive_passes": True}
KINDS = ("all-gather", "all-reduce", "reduce-scatter", "all-to-all", "ragged-all-to-all", "collective-permute")


class Volume(NamedTuple):
    count: int  # collective ops executed per step
    bytes: int  # summed result bytes on one device


# ----------------------------------------------------------------------------------------------
# Collectives in optimized HLO text

_INSTR = re.compile(r"^\s*(?:ROOT\s+)?%?[\w.\-]+\s*=\s*(.*)$")
_ARRAY = re.compile(r"\b([a-z]+[0-9a-z]*)\[([^\]]*)\]")
_CALLEES = re.compile(
    r"\b(calls|to_apply|body|branch_computations|true_computation|false_computation)=(\{[^}]*\}|%?[\w.\-]+)"
)
_TRIPS = re.compile(r'"known_trip_count":\{"n":"(\d+)"\}')


def shape_bytes(shape: str) -> int:
    """Bytes of an HLO shape string (arrays and tuples of them): `(f32[8,128]{1,0}, s32[])` -> 4100."""
    total = 0
    for dtype, dims in _ARRAY.findall(shape):
        bits = 8 if dtype == "pred" else int(m.group(1)) if (m := re.match(r"[a-z]+(\d+)", dtype)) else 0
        n = math.prod(int(d.lstrip("<=")) for d in dims.split(",") if d.strip())
        total += n * bits // 8
    return total


def _split_shape(rest: str) -> tuple[str, str]:
    """'(a, b) op(...), attrs' -> ('(a, b)', 'op(...), attrs'); tuple shapes nest parentheses."""
    if not rest.startswith("("):
        shape, _, tail = rest.partition(" ")
        return shape, tail
    depth = 0
    for i, ch in enumerate(rest):
        depth += {"(": 1, ")": -1}.get(ch, 0)
        if depth == 0:
            return rest[: i + 1], rest[i + 1 :].lstrip()
    return rest, ""


def _computations(hlo_text: str) -> tuple[dict[str, list[str]], str]:
    """{computation name: instruction lines}, and the ENTRY computation's name."""
    comps, entry, name = {}, None, None
    for line in hlo_text.splitlines():
        if line and not line[0].isspace() and line.rstrip().endswith("{") and not line.startswith("HloModule"):
            is_entry = line.startswith("ENTRY")
            name = line.split()[1 if is_entry else 0].lstrip("%")
            comps[name] = []
            entry = name if is_entry else entry
        elif line.startswith("}"):
            name = None
        elif name is not None:
            comps[name].append(line)
    return comps, entry


def _own_collectives(line: str, multiply: bool) -> tuple[Counter, list[tuple[str, int]]]:
    """(collectives of one instruction, [(callee, factor)]) for the call graph walk."""
    m = _INSTR.match(line)
    if not m:
        return Counter(), []
    shape, rest = _split_shape(m.group(1))
    op = rest.split("(", 1)[0].strip()
    found = Counter()
    base = op.removesuffix("-done")
    if base in KINDS and not op.endswith("-start"):  # `X-start` is counted at its `X-done`
        found[(base, "count")] += 1
        found[(base, "bytes")] += shape_bytes(shape)
    callees = []
    if op not in ("async-done", "async-update"):  # these name the same wrapped computation as the start
        factor = 1
        if op == "while" and multiply and (trips := _TRIPS.search(rest)):
            factor = int(trips.group(1))
        for key, target in _CALLEES.findall(rest):
            if (op == "while" and key != "body") or (key == "to_apply" and op != "call"):  # not reducers
                continue
            callees += [(t.strip().lstrip("%"), factor) for t in target.strip("{}").split(",") if t.strip()]
    return found, callees


def collectives(hlo_text: str, multiply_trip_counts: bool = True) -> dict[str, Volume]:
    """kind -> Volume(count, bytes) per step for one device, from optimized (post-SPMD) HLO text.

    Every kind in KINDS is present (zeros when absent). See the module docstring for conventions.
    """
    comps, entry = _computations(hlo_text)
    memo: dict[str, Counter] = {}

    def walk(name: str) -> Counter:  # computations form a DAG; memoised, each is parsed once
        if name not in memo:
            total = Counter()
            for line in comps.get(name, ()):
                own, callees = _own_collectives(line, multiply_trip_counts)
                total += own
                for callee, factor in callees:
                    total += Counter({k: v * factor for k, v in walk(callee).items()})
            memo[name] = total
        return memo[name]

    total = walk(entry) if entry else Counter()
    return {k: Volume(total[(k, "count")], total[(k, "bytes")]) for k in KINDS}


# ----------------------------------------------------------------------------------------------
# Building the step


@dataclass
class Setup:
    """A config's model, optimizer, step and abstract sharded state over one (abstract) mesh."""

    cfg: Config
    mesh: object  # jax.sharding.Mesh, or AbstractMesh for lowering without devices
    rules: tuple
    model: Transformer
    optimizer: object
    step: object  # train_step with its static arguments bound
    abstract: object  # TrainState of ShapeDtypeStructs
    shardings: object  # TrainState of NamedShardings
    batch_sharding: object

    def activate(self):
        """The context the model must be traced in: the mesh (concrete or abstract) and the rules."""
        return activate(self.mesh, self.rules)

    def batch_specs(self) -> dict:
        B, T = self.cfg.data.global_batch_size, self.cfg.data.seq_len
        dtypes = {"tokens": jnp.int32, "positions": jnp.int32, "segment_ids": jnp.int32, "loss_mask": jnp.float32}
        return {k: jax.ShapeDtypeStruct((B, T), dt, sharding=self.batch_sharding) for k, dt in dtypes.items()}

    def jitted(self):
        return jax.jit(self.step, in_shardings=(self.shardings, self.batch_sharding),
                       out_shardings=(self.shardings, None), donate_argnums=0)

    def lower(self):
        """The jitted, state-donating train step lowered on abstract inputs (nothing allocated)."""
        state = jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s),
                             self.abstract, self.shardings)
        with self.activate():
            traced = self.jitted().trace(state, self.batch_specs())
        if isinstance(self.mesh, jax.sharding.AbstractMesh):  # no device says which backend to lower for
            return traced.lower(lowering_platforms=(jax.default_backend(),))
        return traced.lower()


def setup(cfg: Config, mesh) -> Setup:
    """Model, optimizer and abstract sharded state of `cfg` on `mesh`; needs no data and no devices."""
    mesh_rules = rules(cfg.mesh)
    model, optimizer, step, abstract, shardings = build(cfg, mesh, mesh_rules)
    return Setup(cfg, mesh, mesh_rules, model, optimizer, step, abstract, shardings,
                 batch_sharding(mesh, mesh_rules))


# ----------------------------------------------------------------------------------------------
# Memory


def sharded_bytes(abstract, shardings) -> int:
    """Bytes one device holds of a tree of arrays: each leaf's shard shape times its item size."""
    leaves = zip(jax.tree.leaves(abstract), jax.tree.leaves(shardings), strict=True)
    return sum(math.prod(s.shard_shape(a.shape)) * jnp.dtype(a.dtype).itemsize for a, s in leaves)


def state_memory(s: Setup) -> dict[str, int]:
    """Per-device bytes of the train state by part, from shardings arithmetic, plus the batch."""
    a, sh = s.abstract, s.shardings
    other = sharded_bytes((a.router, a.step, a.rng, a.bad_step), (sh.router, sh.step, sh.rng, sh.bad_step))
    batch = s.batch_specs()
    return {
        "params": sharded_bytes(a.params, sh.params),
        "optimizer": sharded_bytes(a.opt_state, sh.opt_state),
        "other_state": other,
        "batch": sharded_bytes(batch, {k: v.sharding for k, v in batch.items()}),
        "params_unsharded": sum(math.prod(x.shape) * jnp.dtype(x.dtype).itemsize for x in jax.tree.leaves(a.params)),
    }


def memory(compiled, s: Setup | None = None) -> dict[str, int]:
    """Per-device bytes: XLA's analysis of the compiled step, and (given `s`) the state breakdown.

    `peak_estimate` = arguments + outputs - aliased (donated) + temporaries: an upper bound on the
    step's live memory as the buffer assignment of the backend it was compiled for sees it.
    """
    m = compiled.memory_analysis()
    out = {
        "argument": m.argument_size_in_bytes, "output": m.output_size_in_bytes, "alias": m.alias_size_in_bytes,
        "temp": m.temp_size_in_bytes, "generated_code": m.generated_code_size_in_bytes,
    }
    out["peak_estimate"] = out["argument"] + out["output"] - out["alias"] + out["temp"]
    return {**out, **(state_memory(s) if s is not None else {})}


# ----------------------------------------------------------------------------------------------
# Analytic estimate (the lowering-only method, and a cross-check of the compiled one)


def _spec_axes(spec) -> set[str]:
    return {a for entry in spec if entry is not None for a in ((entry,) if isinstance(entry, str) else entry)}


def estimate(s: Setup) -> dict[str, Volume]:
    """Per-device collective volume of one step under an idealised schedule (an estimate).

    Weights (f32, as the optimizer holds them): a weight split over token axes (those splitting
    the batch or sequence) is all-gathered over them in the forward and again in the backward,
    and its gradient reduce-scattered over them; over token axes that do not split it, the
    gradient is all-reduced. Routed experts skip both over their expert axes (tokens travel).
    MoE dispatch (layers/moe/dispatch.py), per MoE layer (main + MTP), M tokens per device,
    X = M·A pairs, ep expert shards, forward + backward, result-bytes convention:
      ring: all-gather tokens, ids, weights (M·ep rows) and, backward, output grads; reduce-scatter
        the outputs and, backward, the token grads.
      a2a: 5 all-to-alls of [ep·C] rows, C = X (dropless: capacity_factor 0) or ⌈cf·X/ep⌉.
      ragged_a2a: 4 ragged all-to-alls, two into ep·X-row worst-case buffers, two into X rows.
      dense: 4 all-to-alls of [E, C, D], C = M (dropless) or ⌈cf·X/E⌉.
    Tensor parallelism (axes of `act_heads` / `act_mlp` not splitting tokens): 4 all-reduces of
    M·D per layer (attention and FFN outputs, and their input gradients). Loss-chunk, router and
    metric reductions are left out (small).
    """
    mcfg, mesh = s.cfg.model, s.mesh
    with s.activate():
        ax = moe_axes()
        tensor = [a for n in ("act_heads", "act_mlp") for a in logical_mesh_axes(n, mesh)]
    size = lambda axes: math.prod(mesh.shape[a] for a in axes)
    tokens = set(ax.tokens[0]) | set(ax.tokens[1])
    vol: Counter = Counter()

    def add(kind, count, nbytes):
        vol[(kind, "count")] += int(count)
        vol[(kind, "bytes")] += int(nbytes)

    logical = param_shapes(mcfg)
    leaves = jax.tree_util.tree_leaves_with_path(s.abstract.params)
    for (path, a), sh in zip(leaves, jax.tree.leaves(s.shardings.params), strict=True):
        axes = logical["/".join(str(getattr(k, "key", k)) for k in path)][1]
        k = a.shape[0] if "layers" in axes else 1  # one collective per layer of a scanned stack
        split = {x for x in _spec_axes(sh.spec) if mesh.shape[x] > 1}
        reduce = tokens - (set(ax.expert) if "experts" in axes else set())
        shard = math.prod(sh.shard_shape(a.shape)) * jnp.dtype(a.dtype).itemsize // k
        if gather := split & reduce:
            add("all-gather", 2 * k, 2 * k * shard * size(gather))
            add("reduce-scatter", k, k * shard)
        if reduce - split:
            add("all-reduce", k, k * shard)
    M = s.cfg.data.global_batch_size * s.cfg.data.seq_len // size(tokens)
    for kind, count, nbytes in _dispatch_volume(mcfg, M, size(ax.expert), not set(ax.expert) <= tokens):
        add(kind, count * (mcfg.n_moe_layers + mcfg.num_nextn_predict_layers),
            nbytes * (mcfg.n_moe_layers + mcfg.num_nextn_predict_layers))
    if set(tensor) - tokens:
        n_layers = mcfg.n_layers + mcfg.num_nextn_predict_layers
        add("all-reduce", 4 * n_layers, 4 * n_layers * M * mcfg.dim * jnp.dtype(mcfg.dtype).itemsize)
    return {k: Volume(vol[(k, "count")], vol[(k, "bytes")]) for k in KINDS}


def _dispatch_volume(mcfg, M: int, ep: int, replicated_tokens: bool) -> list[tuple[str, int, int]]:
    """(kind, count, result bytes) of one MoE layer's dispatch, forward + backward (see `estimate`)."""
    if ep == 1:
        return []
    c, f, D, A, E = jnp.dtype(mcfg.dtype).itemsize, 4, mcfg.dim, mcfg.moe.n_activated_experts, mcfg.moe.n_routed_experts
    X, cf = M * A, mcfg.moe.capacity_factor
    if replicated_tokens:  # local experts on every token, partial outputs psum'd
        return [("all-reduce", 2, 2 * M * D * f)]
    if mcfg.moe.dispatch == "ring":
        return [("all-gather", 4, M * ep * (D * (c + f) + A * 8)), ("reduce-scatter", 2, M * D * (f + c))]
    if mcfg.moe.dispatch == "a2a":
        C = X if cf == 0 else max(1, math.ceil(cf * X / ep))
        return [("all-to-all", 5, ep * C * (D * (2 * c + 2 * f) + 4))]
    if mcfg.moe.dispatch == "ragged_a2a":
        return [("ragged-all-to-all", 4, (ep * X + X) * D * (c + f)), ("all-gather", 1, ep * E * 4)]
    C = M if cf == 0 else max(1, math.ceil(cf * X / E))  # dense (GShard)
    return [("all-to-all", 4, E * C * D * (2 * c + 2 * f))]


# ----------------------------------------------------------------------------------------------
# The plan


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


def plan(cfg: Config, n_devices: int | None = None, compile: bool | None = None) -> PlanResult:
    """Per-device memory and collectives of `cfg`'s train step on n devices, nothing allocated.

    n_devices: None = the devices present. compile: True compiles (error without n devices), False
    only lowers on an abstract mesh, None compiles when n devices are available (after asking for
    n fake CPU devices).
    """
    devices, n, compile, notes = _devices(n_devices, compile)
    timings = {}
    t = time.perf_counter()
    s = setup(cfg, make_mesh(cfg.mesh, devices[:n]) if compile else abstract_mesh(cfg.mesh, n))
    timings["setup_s"] = time.perf_counter() - t
    _check_fits(s)
    t = time.perf_counter()
    lowered = s.lower()
    timings["lower_s"] = time.perf_counter() - t
    coll, mem, platform = None, state_memory(s), "abstract"
    if compile:
        platform = devices[0].platform
        t = time.perf_counter()
        compiled = lowered.compile(compiler_options=CPU_PLAN_COMPILER_OPTIONS if platform == "cpu" else {})
        timings["compile_s"] = time.perf_counter() - t
        mem, coll = memory(compiled, s), collectives(compiled.as_text())
        notes += _backend_notes(cfg, platform)
    c = count_params(cfg.model)
    return PlanResult(
        n, {k: int(v) for k, v in s.mesh.shape.items()}, (cfg.data.global_batch_size, cfg.data.seq_len),
        {k: c[k] for k in ("total", "active", "active_no_embedding")}, mem, coll, estimate(s),
        "compiled" if compile else "lowered", platform, timings, notes,
    )


def _check_fits(s: Setup) -> None:
    B, T = s.cfg.data.global_batch_size, s.cfg.data.seq_len
    n = math.prod(s.mesh.shape[a] for a in _spec_axes(s.batch_sharding.spec))
    if B % n:
        raise PlanError(f"data.global_batch_size={B} does not split over the {n} devices the batch is sharded "
                        f"on; use a multiple of {n}")
    if T > s.cfg.model.max_seq_len:
        raise PlanError(f"data.seq_len={T} exceeds model.max_seq_len={s.cfg.model.max_seq_len}")


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


def format_report(r: PlanResult) -> str:
    """The plan as a readable text report."""
    m, p = r.memory, r.params
    mesh = " ".join(f"{k}={v}" for k, v in r.mesh_shape.items())
    how = {"compiled": f"compiled for {r.platform}: XLA memory analysis + collectives from the optimized HLO",
           "lowered": "lowered on an abstract mesh: memory from shardings arithmetic, collectives an ESTIMATE"}
    row = lambda label, n, note="": f"  {label:<20}{_size(n):>14}{note}"  # noqa: E731
    lines = [
        f"plan: {r.n_devices} devices, mesh {mesh}, global batch {r.batch[0]} x {r.batch[1]} tokens",
        f"method: {r.method} ({how[r.method]})",
        (f"parameters: total {_count(p['total'])}, active per token {_count(p['active'])} "
         f"({_count(p['active_no_embedding'])} without the embedding)"),
        "",
        "per-device memory, from the shardings:",
        row("parameters (f32)", m["params"], f"   (unsharded {_size(m['params_unsharded'])})"),
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
    lines += ["", ("collectives per step, per device (result bytes; loop bodies x trip counts; "
                   "est. = analytic estimate, see plan.estimate):"), *_collective_rows(r), ""]
    lines.append("timings: " + ", ".join(f"{k.removesuffix('_s')} {v:.1f} s" for k, v in r.timings.items()))
    lines += [f"note: {n}" for n in r.notes]
    return "\n".join(lines)
