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
               always kept) as the pool later `reindex` layers pick from
    reindex    its own indexer queries (W^I_uq, weights) over the source's keys, restricted to the pool
    reuse      the entries of the latest source and the picks of the latest indexer, computing nothing
    swa        ratio 0: the window only

Indexer: I[t, j] = Σ_p w_t,p · ReLU(q^I_t,p · k^I_j) over entries with (j+1)·r ≤ t+1, w = (x W_w)·(P·Y)^-½,
q^I = FP4₃₂(RoPE_t(c_q W^I_uq)); top-min(index_topk, visible) by I, −1 for none. Versus V4: no per-head q
norm, no indexer compressor (keys from the latent), no Hadamard rotation, and the fake-quant HF and the
release apply even in float32 (`SharedKVConfig.qat`; quant.py `qat_v41`): window kv e4m3 1×32, entries
e2m1 1×16 with e4m3 scales, indexer q / k e2m1 1×32. The attention itself (sinks, inverse RoPE on the
output, grouped output projection) is V4's.

The shared state travels between layers as `SharedKV` (the decoder passes a producer's state to later
segments). Decoding: a source layer's cache holds the window ring, all entries and keys so far and the
partial group (compressor.py `CompressorState`); other layers hold the window ring only.

References: transformers `models/deepseek_v41/modeling_deepseek_v41.py` @0a2080b4 (`DeepseekV41Attention`,
`DeepseekV41Compressor`, `DeepseekV41Indexer`); DeepSeek-V4.1-Flash inference/model.py @dba1be0a.
Local letters: X entry width (head_dim), Y indexer head dim, P indexer heads, Z entries, U picks,
K candidate blocks.
"""

from typing import NamedTuple

import flax.linen as nn
import jax
import jax.numpy as jnp

from deepseek_jax.axes import constrain, dense_init, param
from deepseek_jax.config import SharedKVConfig
from deepseek_jax.layers.attention.compressor import CompressorState, compress_blocks, empty_state, write_entries
from deepseek_jax.layers.attention.core import over_query_blocks, visible_entries
from deepseek_jax.layers.attention.indexer import index_scores, select_topk
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
    candidates: jax.Array | None  # [B, T, Z] bool, the candidate source's pool


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


def candidate_pool(scores_BTZ, visible_BTZ, positions_BT, ratio: int, n_blocks: int, block: int) -> jax.Array:
    """[B, T, Z] bool: the entries of each query's best `n_blocks` blocks of `block` entries, a block
    scored by its best visible entry, the block of the newest visible entry forced in, blocks with no
    visible entry never kept."""
    B, T, Z = scores_BTZ.shape
    nb = -(-Z // block)
    s_BTZ = jnp.where(visible_BTZ, scores_BTZ, -jnp.inf)
    s_BTKb = jnp.pad(s_BTZ, ((0, 0), (0, 0), (0, nb * block - Z)), constant_values=-jnp.inf)
    best_BTK = jnp.max(s_BTKb.reshape(B, T, nb, block), axis=-1)
    newest_BT = (positions_BT + 1) // ratio - 1
    forced_BTK = (jnp.arange(nb) == (newest_BT // block)[..., None]) & (newest_BT >= 0)[..., None]
    best_BTK = jnp.where(forced_BTK, jnp.inf, best_BTK)
    vals_BTK, ids_BTK = jax.lax.top_k(best_BTK, min(n_blocks, nb))
    keep_BTK = jnp.zeros((B, T, nb), jnp.bool_)
    keep_BTK = jax.vmap(jax.vmap(lambda k, i, v: k.at[i].set(v > -jnp.inf)))(keep_BTK, ids_BTK, vals_BTK)
    return jnp.repeat(keep_BTK, block, axis=-1)[..., :Z]


def pick_entries(iq_BTPY, ik_BZY, iw_BTP, positions_BT, allowed_BTZ, *, ratio: int, topk: int, pool=None):
    """(picks [B, T, U] (−1 = none), the candidate pool [B, T, Z] or None): the indexer's top-k among
    visible entries (and, for a reindex layer, inside `allowed_BTZ`). pool = (n_blocks, block) makes
    the candidate pool from these scores. Row-local in T."""
    visible_BTZ = visible_entries(positions_BT, ik_BZY.shape[1], ratio)
    scores_BTZ = index_scores(iq_BTPY, ik_BZY, iw_BTP, visible_BTZ)
    mask_BTZ = visible_BTZ if allowed_BTZ is None else visible_BTZ & allowed_BTZ
    idx_BTU, valid_BTU = select_topk(scores_BTZ, mask_BTZ, topk)
    picks_BTU = jnp.where(valid_BTU, idx_BTU, -1)
    if pool is None:
        return picks_BTU, None
    return picks_BTU, candidate_pool(scores_BTZ, visible_BTZ, positions_BT, ratio, *pool)


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
            s = self.shared_cfg
            pool = (s.candidate_topk_blocks, s.candidate_block_size) if self.role == "candidate" else None
            allowed_BTZ = shared.candidates if self.role == "reindex" else None
            ik_BZY = shared.index_keys.astype(self.dtype)

            def pick(iq, iw, pos, *allowed):
                return pick_entries(iq, ik_BZY, iw, pos, allowed[0] if allowed else None, ratio=m,
                                    topk=c.index_topk, pool=pool)

            extra = () if allowed_BTZ is None else (allowed_BTZ,)
            picks_BTU, pool_BTZ = over_query_blocks(pick, c.q_block, iq_BTPY, iw_BTP, positions_BT, *extra)
            self.sow("intermediates", "index_topk_BTU", picks_BTU)
            candidates = shared.candidates
            if self.role == "candidate":
                candidates = pool_BTZ
                self.sow("intermediates", "candidates_BTZ", pool_BTZ)
            shared = shared._replace(topk=picks_BTU, candidates=candidates)
        return shared, fields

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
