"""What every attention variant shares: masks, the masked softmax, the decode-cache write, key
gathering for sparse attention, and query blocking (bounded memory for [T, S]-sized work).

Masks are boolean, True = visible. Scores of disallowed keys become NEG_INF, a finite value, so a
fully masked row (a padding query, a ragged block's filler) gives finite numbers, never NaN.

Letters: B batch, T queries, S key slots, N heads, U keys gathered per query, Z compressed entries,
X any trailing size.
"""

from typing import TypeVar

import jax
import jax.numpy as jnp

NEG_INF = -1e30  # finite, so a fully masked row never turns into NaN

Cache = TypeVar("Cache", bound=tuple)  # a NamedTuple of [B, S, ...] arrays


def masked_softmax(logits_BTNS: jax.Array, mask_BTS: jax.Array) -> jax.Array:
    """Softmax over S in float32 with disallowed keys removed (mask broadcasts over heads)."""
    logits_BTNS = jnp.where(mask_BTS[:, :, None, :], logits_BTNS.astype(jnp.float32), NEG_INF)
    return jax.nn.softmax(logits_BTNS, axis=-1)


def causal_mask(segment_ids_BT: jax.Array | None, B: int, T: int) -> jax.Array:
    """[B, T, S=T]: key s is visible to query t if s <= t and both lie in the same document."""
    mask_TS = jnp.tril(jnp.ones((T, T), jnp.bool_))
    if segment_ids_BT is None:
        return jnp.broadcast_to(mask_TS, (B, T, T))
    return mask_TS & (segment_ids_BT[:, :, None] == segment_ids_BT[:, None, :])


def cache_mask(B: int, T: int, S: int, index, start_B: jax.Array | None = None) -> jax.Array:
    """[B, T, S]: slot s is visible to query slot index + t if s <= index + t and s >= start_B[b]
    (slots before start_B hold a left-padded prompt's padding)."""
    mask_BTS = jnp.broadcast_to(jnp.arange(S)[None, :] <= index + jnp.arange(T)[:, None], (B, T, S))
    if start_B is not None:
        mask_BTS = mask_BTS & (jnp.arange(S)[None, None, :] >= start_B[:, None, None])
    return mask_BTS


def visible_count(positions_BT: jax.Array, m: int) -> jax.Array:
    """[B, T]: how many compressed entries (blocks of m tokens) the query at position t sees: those
    whose block has ended, entry z iff (z+1)·m ≤ t+1, i.e. z < ⌊(t+1)/m⌋. The one place of this rule."""
    return (positions_BT + 1) // m


def visible_entries(positions_BT: jax.Array, Z: int, m: int) -> jax.Array:
    """[B, T, Z]: compressed entry z (tokens z·m … z·m + m − 1) is visible to the query at position
    t iff its block has ended (`visible_count`)."""
    return jnp.arange(Z)[None, None, :] < visible_count(positions_BT, m)[:, :, None]


def cache_write(cache: Cache, new: Cache, index) -> Cache:
    """Writes each field's T new entries [B, T, ...] at slots [index, index + T) of the cache's
    [B, S, ...] (cast to the cache's dtype). A field whose new value is None is kept as it is."""
    return type(cache)(
        *(
            c if n is None else jax.lax.dynamic_update_slice_in_dim(c, n.astype(c.dtype), index, 1)
            for c, n in zip(cache, new)
        )
    )


def gather_keys(x_BSX: jax.Array, idx_BTU: jax.Array) -> jax.Array:
    """[B, T, U, X]: per query, the rows of x at its selected key slots (X any trailing size)."""
    return jax.vmap(lambda x_SX, idx_TU: x_SX[idx_TU])(x_BSX, idx_BTU)


def over_query_blocks(fn, block: int, *args_BT, keys: tuple = ()):
    """fn(*q_args, *keys) computed `block` queries (axis 1 of every q arg) at a time, each under remat,
    so only one block's work is live, forward and backward. fn must be row-local in T (every output's
    axis 1 is T) and must take every key-side array from `keys` ([B, S, ...], whole for every block),
    never from a closure: that is what lets `context.over_context` shard the queries over the
    `context` mesh axis (keys gathered) without fn knowing. Causal rules must come from the queries'
    positions (a q arg), not from their index in T. block 0 = all at once. A ragged last block is
    padded with zeros (queries whose outputs are dropped)."""
    from deepseek_jax.layers.attention.context import over_context  # context imports this module

    return over_context(lambda q, k: _blocks(fn, block, q, k), args_BT, keys)


def _blocks(fn, block: int, args_BT: tuple, keys: tuple):
    T = args_BT[0].shape[1]
    if block == 0 or block >= T:
        return fn(*args_BT, *keys)
    n = -(-T // block)

    def split(a):  # [B, T, ...] -> [n, B, block, ...]
        a = jnp.pad(a, [(0, 0), (0, n * block - T)] + [(0, 0)] * (a.ndim - 2))
        return jnp.moveaxis(a.reshape(a.shape[0], n, block, *a.shape[2:]), 1, 0)

    def merge(a):  # [n, B, block, ...] -> [B, T, ...]
        return jnp.moveaxis(a, 0, 1).reshape(a.shape[1], n * block, *a.shape[3:])[:, :T]

    blocks = tuple(split(a) for a in args_BT)
    # the weights fn closes over become explicit arguments, re-typed on the current mesh: inside
    # context parallelism's shard_map they arrive typed on the outer mesh, and the scan's transpose
    # (zero cotangents of its constants) would build arrays on that mesh, which JAX refuses there
    body, consts = jax.closure_convert(lambda *xs: fn(*xs, *keys), *(b[0] for b in blocks))
    consts = [c * jnp.ones((), c.dtype) if jnp.issubdtype(c.dtype, jnp.inexact) else c for c in consts]
    out = jax.lax.map(jax.checkpoint(lambda xs: body(*xs, *consts)), blocks)
    return jax.tree.map(merge, out)
