"""DeepSeek-V4 KV compression (CSA and HCA): gated pooling of every m tokens into one entry.

Compressor (gated per-channel softmax pooling; V4 report §2.3, reference notes §1.5). Each token t
projects c_t = x_t W_kv and z_t = x_t W_gate, U = c·X channels each (c = 2 for CSA, 1 for HCA).
Block j holds tokens j·m … j·m + m − 1 (m = compress ratio, i = slot in the block):

    HCA:  e_j = Σ_i softmax_i(z_i + ape_i) ⊙ c_i                        (softmax per channel)
    CSA:  the same over 2m slots: block j−1 on channels [0:X], block j on channels [X:2X]
          (block −1 contributes nothing: its gate is −∞)
    e_j ← RoPE_{j·m}(RMSNorm(e_j))   RoPE on the last R dims at the block's first position

Entry j exists once token j·m + m − 1 has been seen and is visible to query t iff (j+1)·m ≤ t + 1
(`entry_visible`, evaluated per chunk of entries from the queries' positions; with packed documents
also only if every token pooled into it lies in the query's document, `entry_segments`).
The CSA indexer (indexer.py, `CSAIndexer`) owns a second compressor at width Y (`index_head_dim`)
over the same blocks.

One code path for the full forward and for decoding with a cache: the new tokens are written after
the r0 = start mod m tokens of the partial block the state holds, into a block-aligned buffer of
Z = ⌊(m − 1 + T)/m⌋ + 1 blocks; all Z blocks are pooled (static shapes), the first ⌊(r0 + T)/m⌋ are
complete and become entries start//m + j, and the first incomplete block (plus, for CSA, the
overlap half of the last complete one) becomes the new state. The rest is padding the caller never
reads: visibility only reaches complete entries. As in the official code the projections, pooling
and state are f32 (`Compressor.forward` casts x to fp32); the entry is cast to the compute dtype
before its norm. The official code's quantisation points: see v4.py (the compressors' weights are
bf16, never simulated; the CSA indexer's `quant_sim` covers its FP8 W^I_uq and its input, the
caller the Hadamard + FP4 cast of q^I and the keys).

References: HF transformers 5.24 models/deepseek_v4/modeling_deepseek_v4.py
(`DeepseekV4HCACompressor`, `DeepseekV4CSACompressor`); DeepSeek-V4-Flash inference/model.py
(`Compressor`).

Local letters: X entry width (head_dim; index_head_dim for the indexer's compressor), Z blocks
(= compressed entries), W token slots of a block (= m), U projected channels per token (c·X).
"""

from typing import NamedTuple

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from deepseek_jax.axes import dense_init, param
from deepseek_jax.layers.attention.cache_store import write_at
from deepseek_jax.layers.attention.core import NEG_INF, visible_count
from deepseek_jax.layers.norms import RMSNorm
from deepseek_jax.layers.rope import rope_cos_sin, rope_tail

CSA_RATIO = 4  # the ratio that means CSA (overlapping blocks + indexer), as `overlap = ratio == 4`
# in the official Compressor; any other positive ratio is HCA (V4: 128; tests use a small one)


class CompressorState(NamedTuple):
    """A compressor's tokens not yet pooled, f32 raw projections (ape not yet added)."""

    kv: jax.Array  # [B, W, U], tokens of the current partial block at slot = position mod m
    gate: jax.Array  # [B, W, U]
    prev_kv: jax.Array | None  # CSA: [B, W, X], channels [0:X] of the last complete block
    prev_gate: jax.Array | None  # CSA: [B, W, X]; NEG_INF before the first block completes


def empty_state(B: int, m: int, X: int, overlap: bool) -> CompressorState:
    U = 2 * X if overlap else X
    zeros = jnp.zeros((B, m, U), jnp.float32)
    if not overlap:
        return CompressorState(zeros, zeros, None, None)
    prev = jnp.zeros((B, m, X), jnp.float32)
    return CompressorState(zeros, zeros, prev, jnp.full((B, m, X), NEG_INF, jnp.float32))


def block_align(new_BTU: jax.Array, buf_BWU: jax.Array, r0, Z: int) -> jax.Array:
    """[B, Z, W, U]: the partial block's r0 buffered tokens, then the T new ones, block-aligned."""
    B, _, U = new_BTU.shape
    m = buf_BWU.shape[1]
    ext_BSU = jnp.zeros((B, Z * m, U), jnp.float32).at[:, :m].set(buf_BWU)
    ext_BSU = jax.lax.dynamic_update_slice_in_dim(ext_BSU, new_BTU.astype(jnp.float32), r0, axis=1)
    return ext_BSU.reshape(B, Z, m, U)


def pool(kv_BZWX: jax.Array, gate_BZWX: jax.Array) -> jax.Array:
    """e = Σ_slots softmax_slots(gate) ⊙ kv, per channel, in f32: [B, Z, X]."""
    return jnp.sum(kv_BZWX * jax.nn.softmax(gate_BZWX.astype(jnp.float32), axis=2), axis=2)


def compress_blocks(kv_BTU, gate_BTU, state: CompressorState, start, ape_WU, overlap: bool):
    """Pools the blocks that the T new tokens (positions start …) touch.

    Returns (pooled [B, Z, X] un-normed f32, n_done = complete blocks among the Z, new state);
    block j is entry start//m + j.
    """
    m, T = ape_WU.shape[0], kv_BTU.shape[1]
    Z, r0 = (m - 1 + T) // m + 1, start % m
    n_done = (r0 + T) // m
    kv_BZWU = block_align(kv_BTU, state.kv, r0, Z)
    graw_BZWU = block_align(gate_BTU, state.gate, r0, Z)  # raw: the state keeps gates without ape
    next_kv = jax.lax.dynamic_index_in_dim(kv_BZWU, n_done, axis=1, keepdims=False)
    next_gate = jax.lax.dynamic_index_in_dim(graw_BZWU, n_done, axis=1, keepdims=False)
    gate_BZWU = graw_BZWU + ape_WU
    if not overlap:
        return pool(kv_BZWU, gate_BZWU), n_done, CompressorState(next_kv, next_gate, None, None)
    X = ape_WU.shape[1] // 2
    # index j of prev_*: channels [0:X] of block j − 1 (for j = 0, the state's last complete block)
    prev_kv_BZWX = jnp.concatenate([state.prev_kv[:, None], kv_BZWU[..., :X]], axis=1)
    prev_graw_BZWX = jnp.concatenate([state.prev_gate[:, None], graw_BZWU[..., :X]], axis=1)
    pooled_BZX = pool(
        jnp.concatenate([prev_kv_BZWX[:, :Z], kv_BZWU[..., X:]], axis=2),
        jnp.concatenate([prev_graw_BZWX[:, :Z] + ape_WU[:, :X], gate_BZWU[..., X:]], axis=2),
    )
    new_state = CompressorState(
        next_kv,
        next_gate,
        jax.lax.dynamic_index_in_dim(prev_kv_BZWX, n_done, axis=1, keepdims=False),
        jax.lax.dynamic_index_in_dim(prev_graw_BZWX, n_done, axis=1, keepdims=False),
    )
    return pooled_BZX, n_done, new_state


def write_entries(entries_BZX: jax.Array, new_BZX: jax.Array, first, n_done) -> jax.Array:
    """Stores the first n_done new entries at [first, first + n_done); drops the incomplete rest."""
    Z = new_BZX.shape[1]
    slot_Z = jnp.where(jnp.arange(Z) < n_done, first + jnp.arange(Z), -1)  # −1: dropped
    return write_at(entries_BZX, new_BZX, slot_Z)  # plain arrays or stored rows (cache_store)


def entry_segments(segment_ids_BT: jax.Array, m: int, Z: int) -> jax.Array:
    """[B, Z] the document of each compressed entry z (blocks of m row slots from 0): the segment id
    when every token pooled into it (block z; CSA: block z − 1 as well, from z = 1) has it, else −1
    (an entry that straddles documents, or reaches past the row, belongs to none)."""
    B, T = segment_ids_BT.shape
    n = Z * m
    seg_BS = jnp.pad(segment_ids_BT, ((0, 0), (0, max(n - T, 0))), constant_values=-1)[:, :n]
    seg_BZW = seg_BS.reshape(B, Z, m)
    first_BZ = seg_BZW[..., 0]
    same_BZ = jnp.all(seg_BZW == first_BZ[..., None], axis=-1)
    if m == CSA_RATIO:  # the overlap: block z − 1 pools into entry z too
        prev_BZ = same_BZ[:, :-1] & (first_BZ[:, :-1] == first_BZ[:, 1:])
        same_BZ = same_BZ & jnp.concatenate([jnp.ones((B, 1), jnp.bool_), prev_BZ], axis=1)
    return jnp.where(same_BZ, first_BZ, -1).astype(jnp.int32)


def entry_visible(s_K: jax.Array, positions_BT: jax.Array, seg_BT: jax.Array, eseg_BZ: jax.Array, m: int):
    """[B, T, K]: whether entries s_K [K] are visible to each query: their block has ended,
    (z+1)·m ≤ t+1 at the query's position t, and they lie in its document (eseg [B, Z] from
    `entry_segments`, or zeros with seg zeros when documents are not masked). Slots past Z clip."""
    ended_BTK = s_K[None, None, :] < visible_count(positions_BT, m)[:, :, None]
    eseg_BK = jnp.take(eseg_BZ, s_K, axis=1, mode="clip")
    return ended_BTK & (eseg_BK[:, None, :] == seg_BT[:, :, None])


class Compressor(nn.Module):
    """Gated pooling of every m tokens into one normed, rotated entry of width X."""

    ratio: int  # m
    width: int  # X
    dim: int  # D
    norm_eps: float = 1e-6
    dtype: jnp.dtype = jnp.bfloat16

    @nn.compact
    def __call__(self, x_BTD, state: CompressorState | None, start, inv_freq: np.ndarray):
        """(entries [B, Z, X] in dtype, n_done, new state); see `compress_blocks`."""
        m, X, D = self.ratio, self.width, self.dim
        overlap = m == CSA_RATIO
        U = 2 * X if overlap else X
        # [D, U]: channels [0:X] feed the next block's entry, [X:2X] this block's (CSA)
        w_kv_DU = param(self, "w_kv", ("embed", "head_dim"), (D, U), dense_init([0], [1]))
        w_gate_DU = param(self, "w_gate", ("embed", "head_dim"), (D, U), dense_init([0], [1]))
        ape_WU = param(self, "ape", (None, "head_dim"), (m, U), nn.initializers.zeros)
        x_BTD = x_BTD.astype(jnp.float32)  # the official compressor runs in fp32
        kv_BTU = jnp.einsum("BTD,DU->BTU", x_BTD, w_kv_DU)
        gate_BTU = jnp.einsum("BTD,DU->BTU", x_BTD, w_gate_DU)
        if state is None:
            state = empty_state(x_BTD.shape[0], m, X, overlap)
        pooled_BZX, n_done, state = compress_blocks(kv_BTU, gate_BTU, state, start, ape_WU, overlap)
        entries_BZX = RMSNorm(X, self.norm_eps, "head_dim", self.dtype, name="norm")(
            pooled_BZX.astype(self.dtype)
        )
        cos_Zr, sin_Zr = rope_cos_sin((start // m + jnp.arange(pooled_BZX.shape[1])) * m, inv_freq)
        return rope_tail(entries_BZX, cos_Zr, sin_Zr), n_done, state
