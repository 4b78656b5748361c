"""Meshes and logical-axis rules from config; the package's only place that names mesh axes.

Mesh axes are always (data, fsdp, context, expert, tensor); a mesh file sets their sizes and the
ordered logical-axis rules. Parameters and optimizer state are created already sharded:
`eval_shape` gives the boxed abstract state, the rules turn its logical names into
`NamedSharding`s, and `jit(init, out_shardings=...)` materialises it in place.
"""

import contextlib
import contextvars
import math
from typing import NamedTuple

import flax.linen as nn
import jax
import numpy as np
from jax.sharding import AxisType, Mesh, NamedSharding, PartitionSpec

from deepseek_jax.config import MESH_AXES, ConfigError, MeshConfig

BATCH_AXES = ("data", "fsdp", "expert")  # mesh axes a batch is split over, when the rules do not say
# context parallelism (layers/attention/context.py): queries split over the `act_seq` axes, keys either
# all-gathered (implemented) or passed round a ring (documented in docs/sharding.md, not implemented)
CONTEXT_STRATEGIES = ("all_gather", "ring")
_CONTEXT_STRATEGY = contextvars.ContextVar("context_strategy", default="all_gather")


def mesh_shape(cfg: MeshConfig, n_devices: int) -> tuple[int, ...]:
    """Resolves the one -1 in `mesh.shape`; the product must equal the device count (or, with no -1,
    may be smaller: the mesh then takes the first devices)."""
    known = math.prod(s for s in cfg.shape if s != -1)
    shape = tuple(n_devices // known if s == -1 else s for s in cfg.shape)
    fits = math.prod(shape) == n_devices or (-1 not in cfg.shape and math.prod(shape) < n_devices)
    if not fits:
        raise ConfigError(
            f"mesh.shape {list(cfg.shape)} does not fit {n_devices} devices (resolved {list(shape)}; "
            f"axes {list(MESH_AXES)})"
        )
    return shape


def make_mesh(cfg: MeshConfig, devices=None) -> Mesh:
    """A mesh with Auto axes (Explicit axes would turn Linen's logical constraints into assertions)."""
    devices = jax.devices() if devices is None else devices
    shape = mesh_shape(cfg, len(devices))
    n = math.prod(shape)
    if n < len(devices) and jax.process_count() > 1:
        raise ConfigError(f"mesh.shape {list(cfg.shape)} uses {n} of {len(devices)} devices; with "
                          f"{jax.process_count()} processes a mesh must span every device (use a -1)")
    return Mesh(np.asarray(devices[:n]).reshape(shape), MESH_AXES, axis_types=(AxisType.Auto,) * len(shape))


def abstract_mesh(cfg: MeshConfig, n_devices: int) -> jax.sharding.AbstractMesh:
    """The mesh of `cfg` over n devices without any device (planning, golden shardings)."""
    shape = mesh_shape(cfg, n_devices)
    return jax.sharding.AbstractMesh(shape, MESH_AXES, axis_types=(AxisType.Auto,) * len(shape))


@contextlib.contextmanager
def activate(mesh, mesh_rules, context_strategy: str = "all_gather"):
    """Traces under `mesh` (concrete, or abstract for lowering without devices) and the logical
    rules: constraints, the MoE dispatch and context parallelism (with `context_strategy`) see them."""
    if context_strategy not in CONTEXT_STRATEGIES:
        raise ConfigError(f"context_strategy must be one of {list(CONTEXT_STRATEGIES)}, got {context_strategy!r}")
    use = jax.sharding.use_abstract_mesh if isinstance(mesh, jax.sharding.AbstractMesh) else jax.set_mesh
    token = _CONTEXT_STRATEGY.set(context_strategy)
    try:
        with use(mesh), nn.logical_axis_rules(mesh_rules):
            yield
    finally:
        _CONTEXT_STRATEGY.reset(token)


def in_mesh(fn, mesh, mesh_rules):
    """`fn` (typically jitted) called under `activate(mesh, mesh_rules)`."""

    def call(*args, **kwargs):
        with activate(mesh, mesh_rules):
            return fn(*args, **kwargs)

    return call


def logical_mesh_axes(logical: str, mesh) -> tuple[str, ...]:
    """The mesh axes (size > 1) the active rules give a logical name, in order."""
    spec = nn.logical_to_mesh_axes((logical,))[0]
    axes = () if spec is None else (spec,) if isinstance(spec, str) else tuple(spec)
    return tuple(a for a in axes if mesh.shape[a] > 1)


class MoEAxes(NamedTuple):
    """Where the MoE dispatch runs, as resolved from the active mesh and rules."""

    mesh: object  # the (abstract) mesh, or None outside any mesh: no expert parallelism
    expert: tuple[str, ...]  # mesh axes the routed experts are split over (`experts` rule)
    tokens: tuple[tuple[str, ...], tuple[str, ...]]  # (batch axes, sequence axes) of [B, T, D] tokens
    hidden: tuple[str, ...]  # axes splitting each expert's F (`expert_mlp`): partial sums to reduce


class ContextAxes(NamedTuple):
    """Where context parallelism runs, as resolved from the active mesh and rules."""

    mesh: object  # the (abstract) mesh, or None outside any mesh
    seq: tuple[str, ...]  # mesh axes splitting T (`act_seq`); () = no context parallelism
    batch: tuple[str, ...]  # mesh axes splitting B (`act_batch`, less the seq axes)
    strategy: str  # one of CONTEXT_STRATEGIES


def context_axes() -> ContextAxes:
    """Context parallelism's view of the mesh (never names an axis): axes already manual (inside a
    shard_map) are left out, so a nested call sees no context split."""
    mesh, strategy = jax.sharding.get_abstract_mesh(), _CONTEXT_STRATEGY.get()
    if mesh is None or mesh.empty:
        return ContextAxes(None, (), (), strategy)
    free = lambda axes: tuple(a for a in axes if a not in mesh.manual_axes)  # noqa: E731
    seq = free(logical_mesh_axes("act_seq", mesh))
    batch = tuple(a for a in free(logical_mesh_axes("act_batch", mesh)) if a not in seq)
    return ContextAxes(mesh, seq, batch, strategy)


def rules_without(axes: tuple[str, ...]) -> tuple:
    """The active logical rules with `axes` removed from every target (inside a shard_map manual over
    them, where constraints may name only the other axes)."""
    def strip(target):
        kept = tuple(a for a in ((target,) if isinstance(target, str) else target or ()) if a not in axes)
        return kept or None

    return tuple((name, strip(target)) for name, target in nn.get_logical_axis_rules())


def batch_shards() -> int:
    """How many ways the active rules split a batch's tokens (1 outside a mesh): the `act_batch` axes
    times the `act_seq` ones (context parallelism), so per-device sizes (the loss chunk) stay per device."""
    mesh = jax.sharding.get_abstract_mesh()
    if mesh is None or mesh.empty:
        return 1
    axes = set(logical_mesh_axes("act_batch", mesh)) | set(logical_mesh_axes("act_seq", mesh))
    return math.prod(mesh.shape[a] for a in axes)


def moe_axes() -> MoEAxes:
    """The dispatch's view of the mesh; never names an axis, only looks the rules up."""
    mesh = jax.sharding.get_abstract_mesh()
    if mesh is None or mesh.empty:
        return MoEAxes(None, (), ((), ()), ())
    batch, seq = logical_mesh_axes("act_batch", mesh), logical_mesh_axes("act_seq", mesh)
    return MoEAxes(mesh, logical_mesh_axes("experts", mesh), (batch, seq), logical_mesh_axes("expert_mlp", mesh))


def rules(cfg: MeshConfig) -> tuple[tuple[str, object], ...]:
    return tuple((name, tuple(t) if isinstance(t, (list, tuple)) else t) for name, t in cfg.rules)


def logical_shardings(abstract_boxed, mesh: Mesh, mesh_rules) -> object:
    """NamedShardings for a boxed (nn.Partitioned) abstract tree; unboxed leaves are replicated."""
    specs = nn.get_partition_spec(abstract_boxed)
    return nn.logical_to_mesh_sharding(specs, mesh, mesh_rules)


def batch_sharding(mesh: Mesh, mesh_rules) -> NamedSharding:
    """Sharding of [B, ...] batch arrays: B over the mesh axes of the first `act_batch` rule."""
    axes = next((t for name, t in mesh_rules if name == "act_batch"), BATCH_AXES)
    axes = (axes,) if isinstance(axes, str) else tuple(axes or ())
    axes = tuple(a for a in axes if mesh.shape[a] > 1)
    return NamedSharding(mesh, PartitionSpec(axes or None))


def replicated(mesh: Mesh) -> NamedSharding:
    return NamedSharding(mesh, PartitionSpec())


def check_state_split(target, mesh) -> None:
    """ConfigError, before anything compiles, for the first array of `target` (ShapeDtypeStructs carrying
    NamedShardings: `Program.state_target()`) whose dimension does not divide evenly over the mesh axes
    its PartitionSpec puts there (JAX itself fails later with an internal error). `mesh` may be abstract."""
    for path, leaf in jax.tree_util.tree_flatten_with_path(target)[0]:
        spec = getattr(getattr(leaf, "sharding", None), "spec", None) or ()
        for dim, (size, entry) in enumerate(zip(leaf.shape, spec)):
            axes = () if entry is None else (entry,) if isinstance(entry, str) else tuple(entry)
            shards = math.prod(mesh.shape[a] for a in axes)
            if size % shards:
                name = jax.tree_util.keystr(path, simple=True, separator="/")
                sizes = ", ".join(f"{a}={mesh.shape[a]}" for a in axes)
                raise ConfigError(
                    f"{'parameter' if name.startswith('params/') else 'state array'} {name} dim {dim} (size {size}) "
                    f"does not split over mesh axes {sizes} ({shards} shards): change mesh.shape or mesh.rules")
