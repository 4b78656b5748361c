"""DeepSeek-V4.1 attention: V4's shared-KV MQA (v4.py) with cross-layer shared compressed KV.

Every layer keeps V4's sliding window of w raw keys. A layer with compress ratio r > 0 also attends
to compressed entries, but only the kv-source layers compute them; the others reuse them (reference
notes §1.2–§1.6). By its role (config `shared_kv`, `models/common.py` `share_role`) a layer

    source     compresses: ℓ_j = RMSNorm(pool_r(x W_kv^c))  (r = 2: per-channel softmax of x W_gate^c over
               the 2 tokens of group j; r = 1: the token itself; fp32, no position bias, no overlap)
               entries e_j = FP4₁₆(RoPE_{j·r}(ℓ_j)),  indexer keys k^I_j = FP4₃₂(RoPE_{j·r}(RMSNorm(ℓ_j W_k)))
               and runs its own indexer over them
    candidate  a source whose indexer also keeps, per query, the best `candidate_topk_blocks` blocks of
               `candidate_block_size` entries (block score = max; the block of the newest visible entry
               always kept) as the pool later `reindex` layers pick from: block ids [B, T, K]
    reindex    its own indexer queries (W^I_uq, weights) over the source's keys, scoring only the
               pool's K·block entries (their keys gathered per query)
    reuse      the entries of the latest source and the picks of the latest indexer, computing nothing
    swa        ratio 0: the window only

Indexer: I[t, j] = Σ_p w_t,p · ReLU(q^I_t,p · k^I_j) over entries with (j+1)·r ≤ t+1, w = (x W_w)·(P·Y)^-½,
q^I = FP4₃₂(RoPE_t(c_q W^I_uq)); top-min(index_topk, visible) by I, −1 for none. No [T, Z] array: the
keys are scored `shared_kv.index_k_block` entries at a time (whole candidate blocks) with running top-k
lists for the picks and the candidate blocks (stream.py), q_block queries at a time with the keys passed
as core.over_query_blocks' `keys` and every visibility rule from the query positions; the picks equal a
top-k over the whole score row, ties to the lower entry included (the pool is walked in entry order).
Versus V4: no per-head q norm, no indexer compressor (keys from the latent), no Hadamard rotation,
and the fake-quant HF and the release apply even in float32 (`SharedKVConfig.qat`; quant.py
`qat_v41`): window kv e4m3 1×32, entries e2m1 1×16 with e4m3 scales, indexer q / k e2m1 1×32. The
attention itself (sinks, inverse RoPE on the output, grouped output projection) is V4's.

The shared state travels between layers as `SharedKV` (the decoder passes a producer's state to later
segments). Decoding: a source layer's cache holds the window ring, all entries and keys so far and the
partial group (compressor.py `CompressorState`); other layers hold the window ring only.

References: transformers `models/deepseek_v41/modeling_deepseek_v41.py` @0a2080b4 (`DeepseekV41Attention`,
`DeepseekV41Compressor`, `DeepseekV41Indexer`); DeepSeek-V4.1-Flash inference/model.py @dba1be0a.
Local letters: X entry width (head_dim), Y indexer head dim, P indexer heads, Z entries, U picks,
K candidate blocks.
"""

import functools
from typing import NamedTuple

import flax.linen as nn
import jax
import jax.numpy as jnp

from deepseek_jax.axes import constrain, dense_init, param
from deepseek_jax.config import SharedKVConfig
from deepseek_jax.layers.attention.compressor import CompressorState, compress_blocks, empty_state, write_entries
from deepseek_jax.layers.attention.core import over_query_blocks, visible_count
from deepseek_jax.layers.attention.indexer import chunk_scores, scores_at, streamed_topk
from deepseek_jax.layers.attention.stream import running_topk, scan_keys
from deepseek_jax.layers.attention.v4 import SWACache, V4Attention, ring_write
from deepseek_jax.layers.norms import RMSNorm
from deepseek_jax.layers.rope import rope_cos_sin, rope_tail
from deepseek_jax.quant import qat_v41

SOURCES = ("source", "candidate")  # roles that compress
INDEXERS = ("source", "candidate", "reindex")  # roles that run an indexer


class SharedKV(NamedTuple):
    """What a layer hands to the later layers of its group."""

    entries: jax.Array  # [B, Z, X] compressed entries of the latest kv source
    index_keys: jax.Array  # [B, Z, Y] their indexer keys
    topk: jax.Array | None  # [B, T, U] picks of the latest indexer (−1 = none)
    candidates: jax.Array | None  # [B, T, K] int32 ids of the candidate source's kept blocks (−1 = none)


class SourceCache(NamedTuple):
    window: jax.Array  # [B, w, X] rotated kv of the last w positions, slot = position mod w
    entries: jax.Array  # [B, max_len // r, X]
    state: CompressorState  # the partial group (f32)
    index_keys: jax.Array  # [B, max_len // r, Y]


def init_v41_attention_cache(cfg, ratio: int, role: str, batch: int, max_len: int, dtype=jnp.float32):
    """An empty decode cache for one layer: the window ring, plus a source's entries, keys and state."""
    window = jnp.zeros((batch, cfg.window_size, cfg.head_dim), dtype)
    if role not in SOURCES:
        return SWACache(window)
    Z = max_len // ratio
    return SourceCache(
        window, jnp.zeros((batch, Z, cfg.head_dim), dtype), empty_state(batch, ratio, cfg.head_dim, overlap=False),
        jnp.zeros((batch, Z, cfg.index_head_dim), dtype),
    )  # fmt: skip


# ----------------------------------------------------------------------------------------------
# Pure functions


def pick_entries(iq_BTPY, iw_BTP, positions_BT, ik_BZY, *, ratio: int, topk: int, k_block: int) -> jax.Array:
    """The indexer's top-min(topk, Z) visible entries [B, T, U] (−1 = none), keys scored k_block at a
    time (indexer.streamed_topk: `select_topk`'s picks, ties to the lower entry)."""
    n_vis_BT = visible_count(positions_BT, ratio)
    visible = lambda s_K: s_K[None, None, :] < n_vis_BT[..., None]  # noqa: E731
    needed = lambda s_K: s_K[0] < jnp.max(n_vis_BT)  # noqa: E731  (chunks wholly in every query's future)
    return streamed_topk(iq_BTPY, iw_BTP, ik_BZY, visible, topk, k_block, needed)


def _merge_topk(vals, ids, new_vals, new_ids, k: int):
    """The best k of a running list (first, so ties keep it: lower ids) and a chunk's scores."""
    both_ids = jnp.concatenate([ids, jnp.broadcast_to(new_ids, new_vals.shape)], axis=-1)
    vals, at = jax.lax.top_k(jnp.concatenate([vals, new_vals], axis=-1), k)
    return vals, jnp.take_along_axis(both_ids, at, axis=-1)


def candidate_picks(iq_BTPY, iw_BTP, positions_BT, ik_BZY, *, ratio: int, topk: int, k_block: int,
                    n_blocks: int, block: int) -> tuple[jax.Array, jax.Array]:
    """(the candidate source's own picks [B, T, U] as `pick_entries`, its pool: the ids [B, T, K] of the
    best K = min(n_blocks, ⌈Z/block⌉) blocks of `block` entries, −1 = none), one pass over the keys in
    chunks of whole blocks with two running top-k lists. A block scores its best visible entry; the
    block of the newest visible entry scores +inf; a block with no visible entry is never kept."""
    B, T = iw_BTP.shape[:2]
    Z, Y = ik_BZY.shape[1:]
    nb = -(-Z // block)
    U, K = min(topk, Z), min(n_blocks, nb)
    ik_BNbY = jnp.pad(ik_BZY, ((0, 0), (0, nb * block - Z), (0, 0))).reshape(B, nb, block, Y)
    n_vis_BT = visible_count(positions_BT, ratio)
    forced_BT = jnp.where(n_vis_BT > 0, (n_vis_BT - 1) // block, -1)

    def body(c, s_N, live_N, k_BNbY):
        (e_vals, e_ids), (b_vals, b_ids) = c
        e_E = (s_N[:, None] * block + jnp.arange(block, dtype=jnp.int32)).reshape(-1)
        scores_BTE = chunk_scores(iq_BTPY, k_BNbY.reshape(B, -1, Y), iw_BTP)
        visible_BTE = (e_E < Z) & (e_E[None, None, :] < n_vis_BT[..., None])
        scores_BTE = jnp.where(visible_BTE, jax.lax.stop_gradient(scores_BTE), -jnp.inf)
        best_BTN = jnp.max(scores_BTE.reshape(B, T, -1, block), axis=-1)
        best_BTN = jnp.where(s_N == forced_BT[..., None], jnp.inf, best_BTN)
        best_BTN = jnp.where(live_N, best_BTN, -jnp.inf)
        return _merge_topk(e_vals, e_ids, scores_BTE, e_E, U), _merge_topk(b_vals, b_ids, best_BTN, s_N, K)

    def empty(n):
        return jnp.full((B, T, n), -jnp.inf, jnp.float32), jnp.full((B, T, n), -1, jnp.int32)

    kb = max(k_block // block, 1) if k_block > 0 else 0
    needed = lambda s_N: s_N[0] * block < jnp.max(n_vis_BT)  # noqa: E731
    (e_vals, e_ids), (b_vals, b_ids) = scan_keys(body, (empty(U), empty(K)), kb, (ik_BNbY,), needed)
    return jnp.where(e_vals > -jnp.inf, e_ids, -1), jnp.where(b_vals > -jnp.inf, b_ids, -1)


def pool_entries(blocks_BTK, Z: int, block: int) -> jax.Array:
    """[B, T, K·block] the entry ids of each query's kept blocks in ascending order (a −1 block's
    become ≥ Z, at the end): the pool a `reindex` layer picks from."""
    nb = -(-Z // block)
    ids_BTK = jnp.sort(jnp.where(blocks_BTK >= 0, blocks_BTK, nb), axis=-1)
    e_BTKb = ids_BTK[..., None] * block + jnp.arange(block, dtype=ids_BTK.dtype)
    return e_BTKb.reshape(*blocks_BTK.shape[:2], -1)


def reindex_picks(iq_BTPY, iw_BTP, positions_BT, blocks_BTK, ik_BZY, *, ratio: int, topk: int, k_block: int,
                  block: int) -> jax.Array:
    """A reindex layer's top-min(topk, Z) [B, T, U] (−1 = none) among its visible entries inside the
    candidate pool (`candidate_picks`' block ids): scores of the pool's entries only, their keys
    gathered k_block at a time, a running top-k over pool slots mapped back to entry ids. The pool
    runs in ascending entry order, so ties keep the lower entry, as a top-k over all Z would."""
    B, T = iw_BTP.shape[:2]
    Z = ik_BZY.shape[1]
    e_BTE = pool_entries(blocks_BTK, Z, block)
    # the visible part of the pool is a prefix: ids ascend, visibility is id < min(Z, ⌊(t+1)/r⌋)
    limit_BT = jnp.minimum(visible_count(positions_BT, ratio), Z)
    n_ok = jnp.max(jnp.sum(e_BTE < limit_BT[..., None], axis=-1))

    def score(s_K, live_K, e_BKT):
        e_BTK = jnp.swapaxes(e_BKT, 1, 2)
        scores_BTK = scores_at(iq_BTPY, iw_BTP, ik_BZY, jnp.clip(e_BTK, 0, Z - 1))
        return jnp.where(e_BTK < limit_BT[..., None], scores_BTK, -jnp.inf)

    slots_BTU = running_topk(score, topk, k_block, (jnp.swapaxes(e_BTE, 1, 2),), (B, T), lambda s: s[0] < n_ok)
    picks_BTU = jnp.where(slots_BTU >= 0, jnp.take_along_axis(e_BTE, jnp.maximum(slots_BTU, 0), axis=-1), -1)
    U = min(topk, Z)
    pad = max(U - picks_BTU.shape[-1], 0)
    return jnp.pad(picks_BTU, ((0, 0), (0, 0), (0, pad)), constant_values=-1)[..., :U]


# ----------------------------------------------------------------------------------------------
# Modules


class SharedCompressor(nn.Module):
    """A kv source's compressor: entries [B, Z, X] and indexer keys [B, Z, Y] of the groups the T new
    tokens touch (the first n_done complete), and the new partial-group state."""

    ratio: int  # r: 1 (no pooling) or more (gated per-channel softmax over r tokens)
    width: int  # X
    index_width: int  # Y
    dim: int  # D
    norm_eps: float
    dtype: jnp.dtype
    qat: bool = True

    @nn.compact
    def __call__(self, x_BTD, state: CompressorState | None, start, inv_freq):
        m, X, Y, D = self.ratio, self.width, self.index_width, self.dim
        w_kv_DX = param(self, "w_kv", ("embed", "head_dim"), (D, X), dense_init([0], [1]))
        x_BTD = x_BTD.astype(jnp.float32)  # the pooling runs in fp32, as in HF and the official code
        kv_BTX = jnp.einsum("BTD,DX->BTX", x_BTD, w_kv_DX)
        gate_BTX = jnp.zeros_like(kv_BTX)  # r = 1: the softmax over one slot is exactly 1
        if m > 1:
            w_gate_DX = param(self, "w_gate", ("embed", "head_dim"), (D, X), dense_init([0], [1]))
            gate_BTX = jnp.einsum("BTD,DX->BTX", x_BTD, w_gate_DX)
        if state is None:
            state = empty_state(x_BTD.shape[0], m, X, overlap=False)
        no_ape = jnp.zeros((m, X), jnp.float32)
        pooled_BZX, n_done, state = compress_blocks(kv_BTX, gate_BTX, state, start, no_ape, overlap=False)
        latent_BZX = RMSNorm(X, self.norm_eps, "head_dim", self.dtype, name="norm")(pooled_BZX.astype(self.dtype))
        w_k_XY = param(self, "w_k", (None, "head_dim"), (X, Y), dense_init([0], [1]))
        keys_BZY = jnp.einsum("BZX,XY->BZY", latent_BZX, w_k_XY.astype(self.dtype))
        keys_BZY = RMSNorm(Y, self.norm_eps, "head_dim", self.dtype, name="k_norm")(keys_BZY)
        cos_Zr, sin_Zr = rope_cos_sin((start // m + jnp.arange(pooled_BZX.shape[1])) * m, inv_freq)
        entries_BZX = rope_tail(latent_BZX, cos_Zr, sin_Zr)
        keys_BZY = rope_tail(keys_BZY, cos_Zr, sin_Zr)
        if self.qat:
            entries_BZX, keys_BZY = qat_v41(entries_BZX, "entry"), qat_v41(keys_BZY, "index")
        return entries_BZX, keys_BZY, n_done, state


class SharedIndexer(nn.Module):
    """An index source's queries q^I [B, T, P, Y] (rotated at t) and head weights w [B, T, P] (f32)."""

    n_heads: int  # P
    head_dim: int  # Y
    q_lora_rank: int  # Q
    dim: int  # D
    dtype: jnp.dtype
    qat: bool = True

    @nn.compact
    def __call__(self, x_BTD, c_q_BTQ, cos_BTr, sin_BTr):
        P, Y, Q, D = self.n_heads, self.head_dim, self.q_lora_rank, self.dim
        w_uq_QPY = param(self, "w_uq", ("q_latent", "heads", "head_dim"), (Q, P, Y), dense_init([0], [1, 2]))
        w_weights_DP = param(self, "w_weights", ("embed", "heads"), (D, P), dense_init([0], [1]))
        q_BTPY = jnp.einsum("BTQ,QPY->BTPY", c_q_BTQ.astype(self.dtype), w_uq_QPY.astype(self.dtype))
        q_BTPY = rope_tail(q_BTPY, cos_BTr[:, :, None], sin_BTr[:, :, None])
        if self.qat:
            q_BTPY = qat_v41(q_BTPY, "index")
        w_BTP = jnp.einsum("BTD,DP->BTP", x_BTD.astype(jnp.float32), w_weights_DP) * (P * Y) ** -0.5
        return q_BTPY, w_BTP


class V41Attention(V4Attention):
    """One V4.1 layer's attention by its `role` (module docstring); V4's query, key/value, sink
    attention and grouped output with V4.1's numerics."""

    role: str = "swa"  # swa | source | candidate | reindex | reuse
    shared_cfg: SharedKVConfig | None = None

    def sim(self, site: str, x: jax.Array) -> jax.Array:
        if site == "kv" and self.shared_cfg.qat:
            return qat_v41(x, "window")
        return super().sim(site, x)

    def shared_state(self, x_BTD, c_q_BTQ, rope_BT, positions_BT, shared, cache, start):
        """(the SharedKV this layer attends with and hands on, a source's new cache fields)."""
        c, m, fields = self.cfg, self.compress_ratio, ()
        cos_BTr, sin_BTr, inv_freq = rope_BT
        if self.role in SOURCES:
            comp = SharedCompressor(m, c.head_dim, c.index_head_dim, self.dim, self.norm_eps, self.dtype,
                                    self.shared_cfg.qat, name="compressor")
            entries_BZX, keys_BZY, n_done, state = comp(x_BTD, None if cache is None else cache.state, start,
                                                        inv_freq)
            if cache is not None:
                entries_BZX = write_entries(cache.entries, entries_BZX, start // m, n_done)
                keys_BZY = write_entries(cache.index_keys, keys_BZY, start // m, n_done)
            shared, fields = SharedKV(entries_BZX, keys_BZY, None, None), (entries_BZX, state, keys_BZY)
        if self.role in INDEXERS:
            indexer = SharedIndexer(c.index_n_heads, c.index_head_dim, c.q_lora_rank, self.dim, self.dtype,
                                    self.shared_cfg.qat, name="indexer")
            iq_BTPY, iw_BTP = indexer(x_BTD, c_q_BTQ, cos_BTr, sin_BTr)
            ik_BZY = shared.index_keys.astype(self.dtype)
            picks_BTU, candidates = self.pick(iq_BTPY, iw_BTP, positions_BT, ik_BZY, shared.candidates)
            shared = shared._replace(topk=picks_BTU, candidates=candidates)
        return shared, fields

    def pick(self, iq_BTPY, iw_BTP, positions_BT, ik_BZY, candidates_BTK):
        """(this indexer's picks [B, T, U], the candidate pool [B, T, K] it hands on), q_block queries at
        a time, the indexer keys passed as keys (core.over_query_blocks' contract)."""
        c, s = self.cfg, self.shared_cfg
        kw = dict(ratio=self.compress_ratio, topk=c.index_topk, k_block=s.index_k_block)
        q_args = (iq_BTPY, iw_BTP, positions_BT)
        if self.role == "candidate":
            fn = functools.partial(candidate_picks, n_blocks=s.candidate_topk_blocks, block=s.candidate_block_size,
                                   **kw)
            picks_BTU, candidates_BTK = over_query_blocks(fn, c.q_block, *q_args, keys=(ik_BZY,))
            self.sow("intermediates", "candidate_blocks_BTK", candidates_BTK)
        elif self.role == "reindex" and candidates_BTK is not None:
            fn = functools.partial(reindex_picks, block=s.candidate_block_size, **kw)
            picks_BTU = over_query_blocks(fn, c.q_block, *q_args, candidates_BTK, keys=(ik_BZY,))
        else:
            picks_BTU = over_query_blocks(functools.partial(pick_entries, **kw), c.q_block, *q_args, keys=(ik_BZY,))
        self.sow("intermediates", "index_topk_BTU", picks_BTU)
        return picks_BTU, candidates_BTK

    @nn.compact
    def __call__(self, x_BTD, positions_BT, cache=None, cache_index=0, shared: SharedKV | None = None):
        """(out [B, T, D], updated cache or None, the SharedKV handed on). Positions are row slots."""
        x_BTD = constrain(x_BTD.astype(self.dtype), ("act_batch", "act_seq", "act_embed"))
        w = self.window_keys(x_BTD, positions_BT, cache, cache_index)
        source_BSX, slots_BTU, fields = w.source, w.slots, ()
        if self.compress_ratio:
            shared, fields = self.shared_state(x_BTD, w.c_q, w.rope, positions_BT, shared, cache, w.start)
            cslots_BTU = jnp.where(shared.topk >= 0, source_BSX.shape[1] + shared.topk, -1)
            source_BSX = jnp.concatenate([source_BSX, shared.entries.astype(self.dtype)], axis=1)
            slots_BTU = jnp.concatenate([slots_BTU, cslots_BTU], axis=-1)
        out_BTD = self.attend_and_project(w, source_BSX, slots_BTU)
        new_cache = None if cache is None else type(cache)(ring_write(cache.window, w.kv, w.start), *fields)
        return out_BTD, new_cache, shared if self.role in INDEXERS else None
