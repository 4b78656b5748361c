"""Meshes and logical-axis rules from config; the package's only place that names mesh axes.

Mesh axes are always (data, fsdp, context, expert, tensor); a mesh file sets their sizes and the
ordered logical-axis rules. Parameters and optimizer state are created already sharded:
`eval_shape` gives the boxed abstract state, the rules turn its logical names into
`NamedSharding`s, and `jit(init, out_shardings=...)` materialises it in place.
"""

import math

import flax.linen as nn
import jax
import numpy as np
from jax.sharding import AxisType, Mesh, NamedSharding, PartitionSpec

from deepseek_jax.config import MESH_AXES, MeshConfig

BATCH_AXES = ("data", "fsdp", "expert")  # mesh axes a batch is split over, when the rules do not say


def mesh_shape(cfg: MeshConfig, n_devices: int) -> tuple[int, ...]:
    """Resolves the one -1 in `mesh.shape` and checks the product equals the device count."""
    known = math.prod(s for s in cfg.shape if s != -1)
    shape = tuple(n_devices // known if s == -1 else s for s in cfg.shape)
    if math.prod(shape) != n_devices:
        raise ValueError(f"mesh.shape {list(cfg.shape)} does not fit {n_devices} devices (resolved {list(shape)})")
    return shape


def make_mesh(cfg: MeshConfig, devices=None) -> Mesh:
    """A mesh with Auto axes (Explicit axes would turn Linen's logical constraints into assertions)."""
    devices = jax.devices() if devices is None else devices
    shape = mesh_shape(cfg, len(devices))
    return Mesh(np.asarray(devices).reshape(shape), MESH_AXES, axis_types=(AxisType.Auto,) * len(shape))


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
