"""Context parallelism: queries split over the sequence across the `act_seq` mesh axes, keys gathered.

`core.over_query_blocks(fn, block, *q_BT, keys=...)` runs its blocked fn through `over_context(fn,
q_args, keys)`. When the active rules split `act_seq` over mesh axes of total size cp > 1
(`configs/mesh/cp.yaml`, `fsdp_cp.yaml`), fn runs under `jax.shard_map` manual over those axes and
the batch axes: every device computes fn on its T/cp queries against all keys (the all-gather
strategy of MaxText, long_context.md §4), then the outputs are put back in order. This is exact only
because fn takes every causal / window / document rule from its q args (positions, segment ids) and
its keys from `keys` (the contract in core.over_query_blocks): fn never learns which queries it holds.

Load balance (dual-chunk swap): causal work grows with the query position, so T is cut into 2·cp
chunks and device i takes chunks i and 2cp−1−i (the first device holds the first and the last
chunk). The q args are permuted this way before the split and the outputs permuted back. T is padded
with zero queries to a multiple of 2·cp (fn must accept them, as it accepts a ragged block's filler);
their outputs are dropped.

Communication (scaling-book notation, one attention call, c = context axes, b = batch axes):
  q[B_b, T_c, ...] → permute (T-local swaps: a collective-permute of half the rows) → fn per shard
  keys[B_b, S_c, ...] → AllGather_c inside the shard_map (forward); d keys → ReduceScatter_c (backward)
  (a key whose S does not split into cp enters whole: d keys → AllReduce_c)
  out[B_b, T_c, ...] → inverse permute
Strategy `ring` (keys passed round with ppermute, partial softmax states merged with stream.merge)
is documented in docs/sharding.md and not implemented: fn returns finished outputs, not states.

Inside the shard_map the logical rules lose the manual axes (constraints name only the others:
e.g. heads over `tensor` stay split), and a nested over_context sees no context split.
"""

import math

import flax.linen as nn
import jax
import jax.numpy as jnp
from jax.sharding import PartitionSpec as P

from deepseek_jax.config import ConfigError
from deepseek_jax.sharding import context_axes, rules_without


class ContextError(ConfigError):
    """Context parallelism cannot run this call as configured; the message names the sizes."""


def swap_order(x, cp: int):
    """[B, T, ...] -> [B, T, ...] in dual-chunk-swap order: 2·cp chunks, shard i = chunks (i, 2cp−1−i)."""
    B, T = x.shape[:2]
    c = T // (2 * cp)
    x = x.reshape(B, 2, cp, c, *x.shape[2:])
    return jnp.stack([x[:, 0], jnp.flip(x[:, 1], axis=1)], axis=2).reshape(x.shape[0], T, *x.shape[4:])


def unswap_order(y, cp: int):
    """The inverse of `swap_order`."""
    B, T = y.shape[:2]
    c = T // (2 * cp)
    y = y.reshape(B, cp, 2, c, *y.shape[2:])
    return jnp.concatenate([y[:, :, 0], jnp.flip(y[:, :, 1], axis=1)], axis=1).reshape(B, T, *y.shape[4:])


def _pad_T(x, T_pad: int):
    return x if x.shape[1] == T_pad else jnp.pad(x, [(0, 0), (0, T_pad - x.shape[1])] + [(0, 0)] * (x.ndim - 2))


def over_context(fn, q_args: tuple, keys: tuple):
    """fn(q_args, keys) with the queries ([B, T, ...] each) split over the context axes, keys whole
    on every context shard; returns fn's pytree of [B, T, ...] outputs (None leaves kept)."""
    ax = context_axes()
    if not ax.seq:
        return fn(q_args, keys)
    if ax.strategy != "all_gather":
        raise ContextError(f"context_strategy={ax.strategy!r} is not implemented (only 'all_gather'; "
                           "the ring design is in docs/sharding.md)")
    cp = math.prod(ax.mesh.shape[a] for a in ax.seq)
    B, T = q_args[0].shape[:2]
    bad = [i for i, x in enumerate(jax.tree.leaves(q_args)) if x.ndim < 2 or x.shape[:2] != (B, T)]
    if bad:
        raise ContextError(f"over_context: every q arg must be [B={B}, T={T}, ...]; q leaves {bad} are not")
    batch = ax.batch if B % math.prod(ax.mesh.shape[a] for a in ax.batch) == 0 else ()
    T_pad = -(-T // (2 * cp)) * 2 * cp
    q_args = jax.tree.map(lambda x: swap_order(_pad_T(x, T_pad), cp), q_args)
    b = batch or None
    # keys whose axis 1 splits evenly enter split over the context axes and are all-gathered inside
    # (backward: a reduce-scatter of their gradient); others (e.g. T/128 compressed entries < cp) enter
    # whole (backward: an all-reduce)
    split = jax.tree.map(lambda x: x.ndim >= 2 and x.shape[0] == B and x.shape[1] % cp == 0, keys)
    key_spec = lambda x, s: P(b, ax.seq) if s else P(b) if x.ndim >= 1 and x.shape[0] == B else P()  # noqa: E731
    inner_rules = rules_without(ax.seq + batch)

    def body(q, k):
        k = jax.tree.map(lambda x, s: jax.lax.all_gather(x, ax.seq, axis=1, tiled=True) if s else x, k, split)
        with nn.logical_axis_rules(inner_rules):
            return fn(q, k)

    out = jax.shard_map(
        body, mesh=ax.mesh, axis_names=set(ax.seq + batch), check_vma=False,
        in_specs=(jax.tree.map(lambda _: P(b, ax.seq), q_args), jax.tree.map(key_spec, keys, split)),
        out_specs=P(b, ax.seq),
    )(q_args, keys)
    return jax.tree.map(lambda y: unswap_order(y, cp)[:, :T], out)
