"""Attention with no [T, S] array: keys walked in chunks, an online softmax, and a running top-k.

A query block never holds more than one key chunk's scores. `scan_keys` walks the keys [B, S, ...]
`k_block` at a time (a ragged last chunk is padded; its slots are flagged dead), each step under remat,
so forward and backward keep one chunk's [b, N, k_block] scores live; chunks a predicate rules out
(e.g. entirely in a query block's future) are skipped.

Online softmax (long_context.md §3.3): per query and head a running max m, sum l = Σ e^{s−m} and
accumulator acc = Σ e^{s−m} v; a new chunk rescales them by e^{m_old−m_new}. A learned sink σ enters only
the denominator: out = acc / (l + e^{σ−m}); starting m at σ keeps a row with no visible key finite (out 0).
Without a sink m starts at NEG_INF and dead scores contribute exactly 0 (they are zeroed, not exp'd).
Two partial states over disjoint key sets merge exactly (`merge`), which is how a window part and a
compressed part, or context-parallel shards, combine.

Running top-k: the best min(k, S) keys per query over all chunks, as one `lax.top_k` over all S would
pick them: the running list comes first in each merge, so ties keep the lower key slot, as top_k does.
Dead keys score −inf and come back as −1.

Letters: B batch, T queries (of a block), N heads, S key slots, K keys of a chunk, O value width,
U selected keys per query.
"""

from collections.abc import Callable
from typing import NamedTuple

import jax
import jax.numpy as jnp

from deepseek_jax.layers.attention.core import NEG_INF


class Running(NamedTuple):
    """Online-softmax state of a query block (f32)."""

    m: jax.Array  # [..., N] running max (starts at the sink, or NEG_INF)
    l: jax.Array  # [..., N] Σ e^{s − m} over the keys seen
    acc: jax.Array  # [..., N, O] Σ e^{s − m} v


def start(lead: tuple[int, ...], O: int, sink_N: jax.Array | None = None) -> Running:
    """The empty state for queries of shape lead = (..., N) and values of width O."""
    m = jnp.full(lead, NEG_INF, jnp.float32)
    if sink_N is not None:
        m = jnp.broadcast_to(sink_N.astype(jnp.float32), lead)
    return Running(m, jnp.zeros(lead, jnp.float32), jnp.zeros((*lead, O), jnp.float32))


def add(r: Running, logits: jax.Array, valid: jax.Array, pv: Callable[[jax.Array], jax.Array]) -> Running:
    """Folds one chunk in: logits [..., N, K] (f32, scaled), valid broadcastable to them, and
    pv(p [..., N, K]) -> Σ_k p_k v_k [..., N, O] (the caller's value contraction)."""
    logits = jnp.where(valid, logits.astype(jnp.float32), NEG_INF)
    m_new = jnp.maximum(r.m, jnp.max(logits, axis=-1))
    p = jnp.where(valid, jnp.exp(logits - m_new[..., None]), 0.0)
    alpha = jnp.exp(r.m - m_new)
    return Running(m_new, r.l * alpha + jnp.sum(p, axis=-1), r.acc * alpha[..., None] + pv(p).astype(jnp.float32))


def merge(a: Running, b: Running) -> Running:
    """The state over the union of two disjoint key sets (both started without a sink, or one with)."""
    m = jnp.maximum(a.m, b.m)
    wa, wb = jnp.exp(a.m - m), jnp.exp(b.m - m)
    return Running(m, a.l * wa + b.l * wb, a.acc * wa[..., None] + b.acc * wb[..., None])


def finish(r: Running, sink_N: jax.Array | None = None) -> tuple[jax.Array, jax.Array]:
    """(out [..., N, O] f32, log-sum-exp [..., N] of the keys alone). With sink_N the sink joins the
    denominator; without, a row with no visible key gives 0."""
    denom = r.l
    if sink_N is not None:
        denom = denom + jnp.exp(sink_N.astype(jnp.float32) - r.m)
    out = r.acc / jnp.maximum(denom, jnp.finfo(jnp.float32).tiny)[..., None]
    return out, r.m + jnp.log(jnp.maximum(r.l, jnp.finfo(jnp.float32).tiny))


def _n_slots(keys: tuple) -> int:
    """S, axis 1 of the first key's (first leaf's) [B, S, ...]."""
    return jax.tree.leaves(keys[0])[0].shape[1]


def scan_keys(body, carry, k_block: int, keys: tuple, needed: Callable | None = None):
    """carry after body(carry, s_K, live_K, *chunks) over the keys' chunks of k_block slots: s_K the
    chunk's key slots [K] (int32), live_K whether each is a real slot (< S), chunks the keys' [B, K, ...]
    slices. A key may be a pytree (e.g. cache_store's stored rows): every leaf [B, S, ...] is split on
    axis 1 and its chunk comes back as the same pytree, so a body can dequantise one chunk at a time.
    needed(s_K) -> bool scalar skips a chunk when False. Each step runs under remat."""
    S = _n_slots(keys)
    if S == 0:  # no key at all (a cache with no slot yet): nothing to fold in
        return carry
    kb = min(k_block, S) if k_block > 0 else S
    n = -(-S // kb)

    def split(a):  # [B, S, ...] -> [n, B, kb, ...]
        a = jnp.pad(a, [(0, 0), (0, n * kb - S)] + [(0, 0)] * (a.ndim - 2))
        return jnp.moveaxis(a.reshape(a.shape[0], n, kb, *a.shape[2:]), 1, 0)

    def step(c, xs):
        i, chunks = xs[0], xs[1:]
        s_K = i * kb + jnp.arange(kb, dtype=jnp.int32)
        live_K = s_K < S
        if needed is None:
            return body(c, s_K, live_K, *chunks), None
        return jax.lax.cond(needed(s_K), lambda c_: body(c_, s_K, live_K, *chunks), lambda c_: c_, c), None

    xs = (jnp.arange(n, dtype=jnp.int32), *(jax.tree.map(split, a) for a in keys))
    if n == 1:
        return step(carry, jax.tree.map(lambda a: a[0], xs))[0]
    return jax.lax.scan(jax.checkpoint(step), carry, xs)[0]


def running_topk(score_chunk, k: int, k_block: int, keys: tuple, lead: tuple[int, ...], needed=None) -> jax.Array:
    """Slots [*lead, U] of the U = min(k, S) best keys per query (best first; −1 = none), where
    score_chunk(s_K, live_K, *chunks) -> [*lead, K] f32 scores with −inf for keys the query may not
    pick (keys may be pytrees, as in scan_keys). No gradient flows through a selection."""
    U = min(k, _n_slots(keys))

    def body(c, s_K, live_K, *chunks):
        vals, idx = c
        scores = jax.lax.stop_gradient(score_chunk(s_K, live_K, *chunks)).astype(jnp.float32)
        scores = jnp.where(live_K, scores, -jnp.inf)
        both_vals = jnp.concatenate([vals, scores], axis=-1)
        both_idx = jnp.concatenate([idx, jnp.broadcast_to(s_K, scores.shape)], axis=-1)
        vals, at = jax.lax.top_k(both_vals, U)
        return vals, jnp.take_along_axis(both_idx, at, axis=-1)

    init = (jnp.full((*lead, U), -jnp.inf, jnp.float32), jnp.full((*lead, U), -1, jnp.int32))
    vals, idx = scan_keys(body, init, k_block, keys, needed)
    return jnp.where(vals > -jnp.inf, idx, -1)


def flash_attention(logits_fn, values_fn, visible_fn, k_block: int, keys: tuple, lead, O: int,
                    sink_N=None, needed=None) -> tuple[jax.Array, jax.Array]:
    """Softmax attention over all key chunks: (out [*lead, O] f32, lse [*lead]). Per chunk
    logits_fn(*chunks) -> [*lead, K] (f32, scaled), visible_fn(s_K, live_K, *chunks) -> bool
    broadcastable to them, values_fn(p, *chunks) -> [*lead, O]. lead = (..., N)."""

    def body(r, s_K, live_K, *chunks):
        return add(r, logits_fn(*chunks), visible_fn(s_K, live_K, *chunks), lambda p: values_fn(p, *chunks))

    return finish(scan_keys(body, start(lead, O, sink_N), k_block, keys, needed), sink_N)
