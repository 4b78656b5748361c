"""Engram: hashed n-gram memory gating a value into every residual stream (DeepSeek-V4.1 and the paper).

Before a listed block, each token t reads K rows of this layer's table, one per (n-gram size, hash
head): the host hashes the suffix n-grams and adds the heads' offsets (engram_hash.py), so rows_BTK
are global row ids. With h_m the m-th of the I residual streams (I = 1 for a plain residual):

    e     = [table[row_{t,0}] | … | table[row_{t,K−1}]]   ∈ R^X, X = K·H, column order (n−2)·n_heads + k
    dot_m = Σ_d h_{m,d} w_{m,d} k_{m,d} · rsqrt(mean_d h_m² + ε) · rsqrt(mean_d k_m² + ε) / √D
    g_m   = σ(sign(dot_m) · √max(|dot_m|, 1e-6))          all gate math in float32; ε = the model's norm eps
    v41:   [k_0 … k_{I−1} | v] = e W_kv  (no biases);  w = q_weight ⊙ k_weight;  h_m ← h_m + g_m v
    paper: k_m = e W_k^m + b_k^m, v = e W_v + b_v;  w = q_norm ⊙ k_norm (RMSNorm_q(h)·RMSNorm_k(k) is the
           same sum);  u_m = g_m v,  n_m = RMSNorm_conv^m(u_m),
           c_{m,t} = Σ_j conv[j, m] ⊙ n_{m, t − (W−1−j)·δ}   (depthwise, causal, dilation δ = max_ngram_size)
           h_m ← h_m + u_m + SiLU(c_m)

Tokens whose gate_mask is False (padding, image spans) get g = 0 and no update at all (the paper
variant's conv term is dropped there too). The conv reads the current and earlier positions of the
same segment only (segment_ids; a packed document starts fresh), nothing before the sequence start;
decoding keeps the last P = (W−1)·δ normed gated values and their segment ids (`EngramCache`), so any
chunking of the tokens gives the full forward's result.

Variants. "v41" is the release (official inference/model.py `Engram`, transformers `DeepseekV41Engram`):
one fused projection `engram.wkv` [(I+1)·D, X] (out, in) giving I keys and one shared value, q/k
weights used only as a product, no biases, no conv, no norms with parameters (reference §2.4-2.5).
"paper" is engram_demo_v1.py / arXiv 2601.07372 §2.4 (notes §B.5-B.6): separate biased key and value
projections, per-stream RMSNorm weights for query and key, and the ShortConv (kernel W = conv_kernel,
zero init as the paper, so Y = u at start); here one ε (norm_eps) serves all three of its norms.
Checkpoint layouts: v41 table = embed.weight (FP8 rows × their scales), w_kv[x, u, d] = wkv[u·D + d, x]
(u = I: the value), q_weight / k_weight as stored [I, D]; paper (demo module names) w_k[x, m, d] =
key_projs[m].weight[d, x], b_k[m] = key_projs[m].bias, w_v[x, d] = value_proj.weight[d, x], q_norm[m] =
norm2[m].weight (query), k_norm[m] = norm1[m].weight (key), conv_norm[m] = short_conv.norms[m].weight,
conv[j, m, d] = short_conv.conv.weight[m·D + d, 0, j] (torch Conv1d: tap W−1 is the current token).

Table rows are padded to a multiple of `row_multiple` (1024: zeros, never addressed, never updated:
only looked-up rows receive gradient), so that they split evenly over any shard count dividing it.
JAX arrays cannot be sharded unevenly, and the released tables' row counts (384,006,168 and
384,016,682) have 8 and 2 as their largest power-of-two factors (the official code splits them by
ceil-division). A converter pads with zero rows on import (`table_rows`), keeps [:n_rows] on export.

Sharding (`engram_rows` rule; scaling-book notation, G = the mesh axes of that rule):
    rows[B, T, K] → AllGather_G (int32 ids) → each shard gathers the ids in its row block, zeros
    elsewhere → e_partial[B, T, K, H] → AllReduce_G → e[B, T, K, H]        (official: the same)
and the gradient is a scatter-add into the local block: the table is never gathered. The all-reduce
carries the global batch's rows to every shard of G, O(B·T·X) per device; at scale the paper's
all-to-all of ids and rows (only the rows each shard needs) is the alternative [not implemented].

Offload. Tables may live in host memory through JAX memory kinds (`pinned_host`) on GPU/TPU, but
this file does not place them: with the state shardings of sharding.py they are in device memory.
A jitted gather rejects an operand in host memory (JAX checks that memory spaces match; seen on
XLA:CPU, not tried on an accelerator), so `lookup` raises a clear error for one; offload needs a
host-side gather (`compute_on("device_host")`) or the paper's prefetch (gather rows on the host from
the precomputed ids, feed e as an input). XLA:CPU lists `device`, `pinned_host` and `unpinned_host`
memories, but all are the same RAM: no offload gain there.

Local letters (this file only): K columns read per token (n-gram sizes × hash heads; not GQA's K),
R table rows (not the rope dim), X = K·H memory width (`mem_dim`), U = I + 1 fused outputs, W conv
taps, P = (W−1)·δ conv history. H is the table's row width (`head_dim`).
"""

import math
from typing import NamedTuple

import flax.linen as nn
import jax
import jax.numpy as jnp
from jax.sharding import PartitionSpec

from deepseek_jax.axes import constrain, dense_init, param
from deepseek_jax.config import EngramConfig
from deepseek_jax.layers.norms import rms_norm
from deepseek_jax.sharding import logical_mesh_axes

STREAMS = ("act_batch", "act_seq", None, "act_embed")
GATE_CLAMP = 1e-6  # |dot| floor under the signed square root (official code, TileKernels tests)
ROW_MULTIPLE = 1024  # table rows are padded to a multiple of this (module docstring)
NO_SEGMENT = -1  # segment id of the conv history before the sequence start: matches no token


class EngramCache(NamedTuple):
    """The paper variant's decode state (v41 needs none)."""

    values: jax.Array  # [B, P, I, D] the conv's last P inputs (normed gated values)
    segments: jax.Array  # [B, P] int32 their segment ids, NO_SEGMENT before the sequence start


def init_engram_cache(cfg: EngramConfig, n_streams: int, dim: int, batch: int, dtype=jnp.float32):
    """An empty decode cache for one Engram layer: None for "v41", an EngramCache for "paper"."""
    if cfg.variant == "v41":
        return None
    P = (cfg.conv_kernel - 1) * cfg.max_ngram_size
    return EngramCache(jnp.zeros((batch, P, n_streams, dim), dtype), jnp.full((batch, P), NO_SEGMENT, jnp.int32))


def table_rows(n_rows: int, multiple: int = ROW_MULTIPLE) -> int:
    """Rows of the stored table: n_rows rounded up to a multiple of `multiple`."""
    return -(-n_rows // multiple) * multiple


# ----------------------------------------------------------------------------------------------
# Pure functions


def lookup_block(table_RH: jax.Array, rows_BTK: jax.Array, start) -> jax.Array:
    """Rows [start, start + R) of a table held as this block; ids outside it give zeros. [B, T, K, H]."""
    R = table_RH.shape[0]
    local_BTK = rows_BTK - start
    inside_BTK = (local_BTK >= 0) & (local_BTK < R)
    e_BTKH = jnp.take(table_RH, jnp.clip(local_BTK, 0, R - 1), axis=0)  # gradient: a local scatter-add
    return jnp.where(inside_BTK[..., None], e_BTKH, jnp.zeros((), table_RH.dtype))


def _axis(axes: tuple[str, ...]):
    return axes if len(axes) > 1 else axes[0]


def lookup(table_RH: jax.Array, rows_BTK: jax.Array, out_dtype=None) -> jax.Array:
    """e = table[rows] as [B, T, K, H] in out_dtype (default the table's); ids outside [0, R) give zeros.
    Under a mesh whose rules split `engram_rows`: a block per shard, partial rows psum'd (docstring)."""
    out_dtype = out_dtype or table_RH.dtype
    if getattr(jax.typeof(table_RH), "memory_space", None) == jax.memory.Space.Host:
        raise NotImplementedError("engram.lookup: the table is in host memory (pinned_host); a device gather "
                                  "cannot read it. See the offload note in layers/engram.py.")
    mesh = jax.sharding.get_abstract_mesh()
    table_axes = () if mesh is None or mesh.empty else logical_mesh_axes("engram_rows", mesh)
    if not table_axes:
        return lookup_block(table_RH, rows_BTK, 0).astype(out_dtype)
    size = lambda names: math.prod(mesh.shape[a] for a in names)  # noqa: E731
    if table_RH.shape[0] % size(table_axes):
        raise ValueError(f"engram: {table_RH.shape[0]} table rows do not split into {size(table_axes)} "
                         f"shards over {table_axes}; raise Engram.row_multiple to a multiple of it")
    B, T = rows_BTK.shape[:2]
    # the ids are replicated over the table's axes (every shard serves every token); other splits stay
    batch = tuple(a for a in logical_mesh_axes("act_batch", mesh) if a not in table_axes)
    seq = tuple(a for a in logical_mesh_axes("act_seq", mesh) if a not in table_axes and a not in batch)
    batch, seq = (batch if B % size(batch) == 0 else ()), (seq if T % size(seq) == 0 else ())
    tokens = PartitionSpec(batch or None, seq or None)

    def per_shard(block_RH, ids_BTK):  # this shard's R/n rows; the ids of its tokens
        start = jax.lax.axis_index(_axis(table_axes)) * block_RH.shape[0]
        # exactly one shard holds each row, so the sum of zeros and that row is exact in any dtype
        return jax.lax.psum(lookup_block(block_RH, ids_BTK, start).astype(out_dtype), _axis(table_axes))

    return jax.shard_map(
        per_shard, mesh=mesh, in_specs=(PartitionSpec(_axis(table_axes), None), PartitionSpec(*tokens, None)),
        out_specs=PartitionSpec(*tokens, None, None),
    )(table_RH, rows_BTK)


def v41_gate(h_BTID, k_BTID, q_weight_ID, k_weight_ID, eps: float) -> jax.Array:
    """g_m = σ(sign(dot_m)·√max(|dot_m|, 1e-6)), dot_m = Σ_d h w k · rsqrt(mean h² + ε) rsqrt(mean k² + ε) / √D
    with w = q_weight ⊙ k_weight, per stream m; float32 [B, T, I]. (The paper's RMSNorm_q(h)·RMSNorm_k(k)
    with norm weights q_norm, k_norm is the same sum.)"""
    h_BTID, k_BTID = h_BTID.astype(jnp.float32), k_BTID.astype(jnp.float32)
    w_ID = q_weight_ID.astype(jnp.float32) * k_weight_ID.astype(jnp.float32)
    r_h_BTI = jax.lax.rsqrt(jnp.mean(jnp.square(h_BTID), axis=-1) + eps)
    r_k_BTI = jax.lax.rsqrt(jnp.mean(jnp.square(k_BTID), axis=-1) + eps)
    dot_BTI = jnp.sum(h_BTID * w_ID * k_BTID, axis=-1) * r_h_BTI * r_k_BTI / math.sqrt(h_BTID.shape[-1])
    return jax.nn.sigmoid(jnp.sign(dot_BTI) * jnp.sqrt(jnp.maximum(jnp.abs(dot_BTI), GATE_CLAMP)))


def gated_values(gate_BTI: jax.Array, v_BTD: jax.Array) -> jax.Array:
    """u_m = g_m v: the shared value scaled per stream, float32 [B, T, I, D]."""
    return gate_BTI[..., None] * v_BTD.astype(jnp.float32)[:, :, None, :]


def causal_conv(n_BTID, segment_ids_BT, conv_WID, dilation: int, cache: EngramCache):
    """c_t = Σ_j conv[j] ⊙ n_{t − (W−1−j)·δ} over the same segment, the cache holding the P = (W−1)·δ
    inputs before the chunk. Returns (c float32 [B, T, I, D], the cache after the chunk)."""
    W, T, P = conv_WID.shape[0], n_BTID.shape[1], cache.values.shape[1]
    assert P == (W - 1) * dilation, (P, W, dilation)
    n_BSID = jnp.concatenate([cache.values.astype(n_BTID.dtype), n_BTID], axis=1)  # S = P + T
    seg_BS = jnp.concatenate([cache.segments, segment_ids_BT.astype(jnp.int32)], axis=1)
    c_BTID = jnp.zeros(n_BTID.shape, jnp.float32)
    for j in range(W):  # static taps; tap W−1 is the current token (torch Conv1d's cross-correlation)
        lag = (W - 1 - j) * dilation
        same_BT = seg_BS[:, P - lag:P - lag + T] == segment_ids_BT
        src_BTID = jnp.where(same_BT[..., None, None], n_BSID[:, P - lag:P - lag + T], 0).astype(jnp.float32)
        c_BTID += src_BTID * conv_WID[j].astype(jnp.float32)
    return c_BTID, EngramCache(n_BSID[:, T:].astype(cache.values.dtype), seg_BS[:, T:])


def add_update(x_BTID: jax.Array, y_BTID: jax.Array, mask_BT: jax.Array) -> jax.Array:
    """h ← h + y where the gate mask is set (float32 sum, X's dtype)."""
    y_BTID = jnp.where(mask_BT[..., None, None], y_BTID, 0)
    return (x_BTID.astype(jnp.float32) + y_BTID).astype(x_BTID.dtype)


# ----------------------------------------------------------------------------------------------
# The layer


def _table_init(n_rows: int):
    """N(0, 1) rows, the padding rows (≥ n_rows) zero."""

    def init(key, shape, dtype=jnp.float32):
        rows = jax.random.normal(key, shape, dtype)
        return jnp.where(jnp.arange(shape[0])[:, None] < n_rows, rows, jnp.zeros((), dtype))

    return init


class Engram(nn.Module):
    """One Engram site (before a block): returns (new streams, new cache or None)."""

    cfg: EngramConfig
    n_rows: int  # R before padding: this layer's table rows (Σ of its primes)
    dim: int  # D
    n_streams: int = 1  # I; 1 for a plain residual
    norm_eps: float = 1e-6  # ε of the gate statistics and the conv norm (V4.1: 1e-20)
    dtype: jnp.dtype = jnp.bfloat16
    row_multiple: int = ROW_MULTIPLE  # the table's rows are padded to a multiple of it

    @nn.compact
    def __call__(self, x, rows_BTK, gate_mask_BT=None, segment_ids_BT=None, cache=None):
        plain = x.ndim == 3  # [B, T, D]: one stream
        x_BTID = constrain(x[:, :, None, :] if plain else x, STREAMS)
        assert x_BTID.shape[2] == self.n_streams, (x.shape, self.n_streams)
        B, T, _, _ = x_BTID.shape
        c = self.cfg
        mask_BT = jnp.ones((B, T), bool) if gate_mask_BT is None else gate_mask_BT.astype(bool)
        table_RH = param(self, "table", ("engram_rows", None), (table_rows(self.n_rows, self.row_multiple),
                                                                  c.head_dim), _table_init(self.n_rows))
        e_BTX = lookup(table_RH, rows_BTK, self.dtype).reshape(B, T, c.mem_dim)
        if c.variant == "v41":
            x_BTID = add_update(x_BTID, self._v41(x_BTID, e_BTX), mask_BT)
        else:
            segment_ids_BT = jnp.zeros((B, T), jnp.int32) if segment_ids_BT is None else segment_ids_BT
            y_BTID, new_cache = self._paper(x_BTID, e_BTX, mask_BT, segment_ids_BT, cache)
            x_BTID, cache = add_update(x_BTID, y_BTID, mask_BT), (None if cache is None else new_cache)
        x_BTID = constrain(x_BTID, STREAMS)
        return (x_BTID[:, :, 0] if plain else x_BTID), cache

    def _v41(self, x_BTID, e_BTX):
        """g_m v from the fused projection (released form); float32 [B, T, I, D]."""
        I, D, X, ones = self.n_streams, self.dim, self.cfg.mem_dim, nn.initializers.ones
        w_kv_XUD = param(self, "w_kv", (None, None, "embed"), (X, I + 1, D), dense_init([0], [1, 2]))
        q_weight_ID = param(self, "q_weight", (None, "embed"), (I, D), ones)
        k_weight_ID = param(self, "k_weight", (None, "embed"), (I, D), ones)
        kv_BTUD = jnp.einsum("BTX,XUD->BTUD", e_BTX, w_kv_XUD.astype(self.dtype))
        gate_BTI = v41_gate(x_BTID, kv_BTUD[:, :, :I], q_weight_ID, k_weight_ID, self.norm_eps)
        return gated_values(gate_BTI, kv_BTUD[:, :, I])

    def _paper(self, x_BTID, e_BTX, mask_BT, segment_ids_BT, cache):
        """u + SiLU(ShortConv(u)) with u = g v (the demo); (float32 [B, T, I, D], cache after the chunk)."""
        c, dt = self.cfg, self.dtype
        I, D, X, W = self.n_streams, self.dim, c.mem_dim, c.conv_kernel
        ones, zeros = nn.initializers.ones, nn.initializers.zeros
        w_k_XID = param(self, "w_k", (None, None, "embed"), (X, I, D), dense_init([0], [1, 2]))
        b_k_ID = param(self, "b_k", (None, "embed"), (I, D), zeros)
        w_v_XD = param(self, "w_v", (None, "embed"), (X, D), dense_init([0], [1]))
        b_v_D = param(self, "b_v", ("embed",), (D,), zeros)
        q_norm_ID, k_norm_ID, conv_norm_ID = (param(self, n, (None, "embed"), (I, D), ones)
                                              for n in ("q_norm", "k_norm", "conv_norm"))
        conv_WID = param(self, "conv", (None, None, "embed"), (W, I, D), zeros)  # zero init: Y = u at start
        k_BTID = jnp.einsum("BTX,XID->BTID", e_BTX, w_k_XID.astype(dt)) + b_k_ID.astype(dt)
        v_BTD = jnp.einsum("BTX,XD->BTD", e_BTX, w_v_XD.astype(dt)) + b_v_D.astype(dt)
        gate_BTI = jnp.where(mask_BT[..., None], v41_gate(x_BTID, k_BTID, q_norm_ID, k_norm_ID, self.norm_eps), 0)
        u_BTID = gated_values(gate_BTI, v_BTD)
        n_BTID = rms_norm(u_BTID, conv_norm_ID, self.norm_eps).astype(dt)
        history = init_engram_cache(c, I, D, x_BTID.shape[0], dt) if cache is None else cache
        c_BTID, history = causal_conv(n_BTID, segment_ids_BT, conv_WID, c.max_ngram_size, history)
        return u_BTID + jax.nn.silu(c_BTID), history
