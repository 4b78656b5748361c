"""What the shardings say, with no compiler: per-device state bytes and an estimate of the collectives.

Parameter / optimizer-state bytes per device: an array's bytes over the product of the mesh axes
splitting it (`sharding.shard_shape`). The collective estimate assumes an idealised schedule; its
conventions match `hlo.collectives` (result bytes on one device, per step), so the two compare.
"""

import math
from collections import Counter

import jax
import jax.numpy as jnp

from deepseek_jax.params import param_shapes
from deepseek_jax.plan.context import context_parts
from deepseek_jax.plan.hlo import KINDS, Volume
from deepseek_jax.program import Program
from deepseek_jax.sharding import context_axes, logical_mesh_axes, moe_axes

Part = tuple[str, int, int]  # (collective kind, count, result bytes on one device)


def sharded_bytes(abstract, shardings) -> int:
    """Bytes one device holds of a tree of arrays: each leaf's shard shape times its item size."""
    leaves = zip(jax.tree.leaves(abstract), jax.tree.leaves(shardings), strict=True)
    return sum(math.prod(s.shard_shape(a.shape)) * jnp.dtype(a.dtype).itemsize for a, s in leaves)


def state_memory(p: Program) -> dict[str, int]:
    """Per-device bytes of the train state by part, from shardings arithmetic, plus the batch."""
    a, sh = p.abstract_state, p.state_shardings
    other = sharded_bytes((a.router, a.step, a.rng, a.bad_step), (sh.router, sh.step, sh.rng, sh.bad_step))
    batch = p.batch_specs()
    tables = _engram_tables(a.params)
    return {
        "engram_tables": sharded_bytes(_engram_tables(a.params), _engram_tables(sh.params)) if tables else 0,
        "params": sharded_bytes(a.params, sh.params),
        "optimizer": sharded_bytes(a.opt_state, sh.opt_state),
        "other_state": other,
        "batch": sharded_bytes(batch, {k: v.sharding for k, v in batch.items()}),
        "params_unsharded": sum(math.prod(x.shape) * jnp.dtype(x.dtype).itemsize for x in jax.tree.leaves(a.params)),
    }


def _engram_tables(tree) -> list:
    """The Engram tables' leaves (`.../engram/table`) of a params-shaped tree, in tree order."""
    leaves = jax.tree_util.tree_leaves_with_path(tree)
    return [x for path, x in leaves if [getattr(k, "key", None) for k in path[-2:]] == ["engram", "table"]]


def spec_axes(spec) -> set[str]:
    """The mesh axes a PartitionSpec names."""
    return {a for entry in spec if entry is not None for a in ((entry,) if isinstance(entry, str) else entry)}


def _size(mesh, axes) -> int:
    return math.prod(mesh.shape[a] for a in axes)


def estimate(p: Program) -> dict[str, Volume]:
    """Per-device collective volume of one step under an idealised schedule (an estimate).

    Weights: see `_weight_parts`; MoE dispatch: `_dispatch_parts`, per MoE layer (main + MTP).
    Tensor parallelism (axes of `act_heads` / `act_mlp` not splitting tokens): 4 all-reduces of
    M·D per layer (attention and FFN outputs, and their input gradients). Context parallelism
    (`act_seq` axes): the attention keys' all-gathers, their gradients' reduce-scatters and the
    query reorder (`plan.context`). Left out: router and metric reductions (small) and the loss chunks'
    head-gradient all-reduces (one [D, V] per chunk where the vocabulary is not split: not small).
    """
    mcfg, mesh = p.cfg.model, p.mesh
    with p.activate():
        ax, cx = moe_axes(), context_axes()
        tensor = {a for n in ("act_heads", "act_mlp") for a in logical_mesh_axes(n, mesh)}
    tokens = set(ax.tokens[0]) | set(ax.tokens[1])
    M = p.cfg.data.global_batch_size * p.cfg.data.seq_len // _size(mesh, tokens)  # tokens per device
    parts = _weight_parts(p, tokens, set(ax.expert)) + _engram_parts(p, tokens, M)
    B_local = p.cfg.data.global_batch_size // _size(mesh, cx.batch)
    parts += context_parts(mcfg, B_local, p.cfg.data.seq_len, _size(mesh, cx.seq))
    n_moe = mcfg.n_moe_layers + mcfg.num_nextn_predict_layers
    for kind, count, nbytes in _dispatch_parts(mcfg, M, _size(mesh, ax.expert), not set(ax.expert) <= tokens):
        parts.append((kind, count * n_moe, nbytes * n_moe))
    if tensor - tokens:
        n_layers = mcfg.n_layers + mcfg.num_nextn_predict_layers
        parts.append(("all-reduce", 4 * n_layers, 4 * n_layers * M * mcfg.dim * jnp.dtype(mcfg.dtype).itemsize))
    vol: Counter = Counter()
    for kind, count, nbytes in parts:
        vol[(kind, "count")] += int(count)
        vol[(kind, "bytes")] += int(nbytes)
    return {k: Volume(vol[(k, "count")], vol[(k, "bytes")]) for k in KINDS}


def _weight_parts(p: Program, tokens: set[str], expert: set[str]) -> list[Part]:
    """Weight collectives (f32, as the optimizer holds them), one set per layer of a scanned stack.

    A weight split over token axes (those splitting the batch or sequence) is all-gathered over them
    in the forward and again in the backward, and its gradient reduce-scattered over them; over
    token axes that do not split it, the gradient is all-reduced. Routed experts skip both over
    their expert axes (tokens travel). The media front-ends (`media/`) only run on a batch with media
    (data.media): on a text batch their weights are never read, and XLA moves none of them.
    """
    mesh, logical, parts = p.mesh, param_shapes(p.cfg.model), []
    media_batch = p.cfg.data.media is not None
    leaves = jax.tree_util.tree_leaves_with_path(p.abstract_state.params)
    for (path, a), sh in zip(leaves, jax.tree.leaves(p.state_shardings.params), strict=True):
        name = "/".join(str(getattr(k, "key", k)) for k in path)
        if name.endswith("engram/table"):  # never gathered: `_engram_parts`
            continue
        if name.startswith("media/") and not media_batch:
            continue
        axes = logical[name][1]
        k = a.shape[0] if "layers" in axes else 1  # one collective per layer of a scanned stack
        split = {x for x in spec_axes(sh.spec) if mesh.shape[x] > 1}
        reduce = tokens - (expert if "experts" in axes else set())
        shard = math.prod(sh.shard_shape(a.shape)) * jnp.dtype(a.dtype).itemsize // k
        if gather := split & reduce:
            parts += [("all-gather", 2 * k, 2 * k * shard * _size(mesh, gather)), ("reduce-scatter", k, k * shard)]
        if reduce - split:
            parts.append(("all-reduce", k, k * shard))
    return parts


def _engram_parts(p: Program, tokens: set[str], M: int) -> list[Part]:
    """Engram's sharded lookup (layers/engram.py), per Engram layer, with G the table's row axes and g
    the token shards among them: the ids [M·g, K] int32 all-gathered over G, the partial rows
    [M·g, K, H] all-reduced (forward), their cotangent all-gathered (backward); the table's gradient
    is all-reduced over the token axes outside G (a scatter-add is local)."""
    e = p.cfg.model.engram
    if e is None:
        return []
    mesh = p.mesh
    with p.activate():
        rows = {a for a in logical_mesh_axes("engram_rows", mesh) if mesh.shape[a] > 1}
    g, K, H = _size(mesh, rows & tokens), e.n_columns, e.head_dim
    parts = [("all-gather", 1, M * g * K * 4), ("all-reduce", 1, M * g * K * H * 4),
             ("all-gather", 1, M * g * K * H * 4)] if rows else []
    if tokens - rows:  # the gradient of this device's table shard, summed over the other token shards
        shard = sum(n for n in e.num_embeddings) * H * 4 // max(_size(mesh, rows), 1) // len(e.num_embeddings)
        parts.append(("all-reduce", 1, shard))
    return [(kind, n * len(e.layer_ids), b * len(e.layer_ids)) for kind, n, b in parts]


def _dispatch_parts(mcfg, M: int, ep: int, replicated_tokens: bool) -> list[Part]:
    """One MoE layer's dispatch (layers/moe/dispatch.py), forward + backward, M tokens per device,
    X = M·A pairs, ep expert shards, result-bytes convention:
      ring: all-gather tokens, ids, weights (M·ep rows) and, backward, output grads; reduce-scatter
        the outputs and, backward, the token grads.
      a2a: 5 all-to-alls of [ep·C] rows, C = X (dropless: capacity_factor 0) or ⌈cf·X/ep⌉.
      ragged_a2a: 4 ragged all-to-alls, two into ep·X-row worst-case buffers, two into X rows.
      dense: 4 all-to-alls of [E, C, D], C = M (dropless) or ⌈cf·X/E⌉.
    """
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
    if mcfg.moe.dispatch in ("ragged_a2a", "ragged_a2a_emulated"):  # emulated: the collective it stands in for
        return [("ragged-all-to-all", 4, (ep * X + X) * D * (c + f)), ("all-gather", 1, ep * E * 4)]
    C = M if cf == 0 else max(1, math.ceil(cf * X / E))  # dense (GShard)
    return [("all-to-all", 4, E * C * D * (2 * c + 2 * f))]
