"""Multi-process coordination for the loop (one process per host; each is a no-op with one process).

Every process runs the same loop, and each jitted step is one program over a mesh spanning all
processes' devices. Process i of n holds global_batch_size / n rows of each batch (`put_batch`
assembles the global array).

XLA:CPU's collectives (Gloo) give a process 30 s to join the *first* collective over a group of
devices; later waits are unbounded. So barriers (one device per process) are first used when a run
starts, and a jitted step runs only once every process has compiled it (`in_lockstep`: compile times
differ, e.g. on CPU only process 0 reads the persistent compilation cache).
"""

import math

import jax
import numpy as np
from jax.experimental import multihost_utils
from jax.sharding import NamedSharding

from deepseek_jax.config import Config, ConfigError


class ProcessError(RuntimeError):
    """Another process failed; this one stops instead of waiting for it forever."""


def sync(name: str) -> None:
    """A barrier across processes (a no-op with one)."""
    if jax.process_count() > 1:
        multihost_utils.sync_global_devices(name)


def in_lockstep(jitted):
    """`jitted`, compiled ahead of its first call per input layout, then run after a barrier."""
    if jax.process_count() == 1:
        return jitted
    compiled = {}

    def call(*args):
        leaves, tree = jax.tree.flatten(args)
        key = (tree, *((x.shape, x.dtype, x.sharding) for x in leaves))
        if key not in compiled:
            compiled[key] = jitted.lower(*args).compile()
            sync(f"compiled #{len(compiled)}")
        return compiled[key](*args)

    return call


def on_process_0(fn, elsewhere: Exception):
    """fn() on process 0 alone (None elsewhere). Whatever it raises there is raised on every process
    (`elsewhere` on the others) once all have agreed, so none waits for process 0 forever."""
    out, error = None, None
    if jax.process_index() == 0:
        try:
            out = fn()
        except Exception as e:  # noqa: BLE001 (re-raised below, once the others are told)
            error = e
    if any_process(error is not None):  # also the barrier
        raise error or elsewhere
    return out


def on_all_processes(fn):
    """fn() on process 0, then on the others once it has returned (e.g. written a shared file).

    An error on process 0 is raised on every process, so none waits for it forever."""
    if jax.process_count() == 1:
        return fn()
    out = on_process_0(fn, ProcessError("process 0 failed (its error is in its output); stopping"))
    return fn() if jax.process_index() else out


def any_process(flag: bool) -> bool:
    """True if `flag` holds on any process (a host-side collective; free with one process)."""
    if jax.process_count() == 1:
        return flag
    return bool(multihost_utils.process_allgather(np.int32(flag)).max())


def put_batch(batch: dict, sharding: NamedSharding) -> dict:
    """This process's rows [B / n, ...] -> global arrays [B, ...] split as `sharding` says."""
    n = jax.process_count()
    return {
        k: jax.make_array_from_process_local_data(sharding, v, (v.shape[0] * n, *v.shape[1:]))
        for k, v in ((k, np.asarray(v)) for k, v in batch.items())
    }


def check_batch_split(sharding: NamedSharding, cfg: Config) -> None:
    """Batches split evenly over their mesh axes, and over the processes (B / n distinct rows each). On an
    abstract mesh (planning: no devices, no processes) only the first."""
    B, n = cfg.data.global_batch_size, jax.process_count()
    axes = sharding.spec[0] if sharding.spec else None
    axes = () if axes is None else (axes,) if isinstance(axes, str) else tuple(axes)
    shards = math.prod(sharding.mesh.shape[a] for a in axes)
    if B % shards:
        sizes = ", ".join(f"{a}={sharding.mesh.shape[a]}" for a in axes)
        raise ConfigError(f"data.global_batch_size={B} does not split over the {shards} batch shards "
                          f"(mesh axes {list(axes)}: {sizes}, of mesh.shape {list(cfg.mesh.shape)}): "
                          f"use a multiple of {shards}, or change mesh.shape or the act_batch rule")
    if isinstance(sharding.mesh, jax.sharding.AbstractMesh):
        return
    rows = {tuple(range(*idx[0].indices(B))) for idx in sharding.addressable_devices_indices_map((B,)).values()}
    held = len(set().union(*rows))
    if held * n != B:
        raise ConfigError(
            f"with {n} processes the mesh must split each batch of data.global_batch_size={B} rows over "
            f"the processes ({B // n} rows each), but this process's devices hold {held} rows: put the "
            f"batch's mesh axes {list(axes)} across hosts in mesh.shape {list(cfg.mesh.shape)}"
        )
