"""Routed experts: SwiGLU per expert, weights stacked on E.

    y_t = Σ_{e ∈ idx_t} g_{t,e} · W_down,e h_e(x_t)        (V3: the weight after the down projection)
    y_t = Σ_{e ∈ idx_t} W_down,e (g_{t,e} · h_e(x_t))      (V4, `weight_before_down`: same math, other rounding)
    h_e(x) = silu(min(x W_gate,e, lim)) ⊙ clip(x W_up,e, -lim, lim)     (clamp only when lim > 0, V4)

`experts_ragged` is the dropless production path: the M·A (token, expert) pairs are sorted by
expert and each expert's contiguous run is multiplied by its weights with `jax.lax.ragged_dot`, so
the work is proportional to M·A, not M·E, where the backend has a grouped-matmul kernel (GPU, TPU).
XLA:CPU lowers ragged_dot to a masked dense product over all E groups (E x the work, and an
[E, M·A, D] mask), so for CPU runs `experts_blocked` does the same dropless computation in plain
JAX: each expert's run is padded to a multiple of `block` rows, every block belongs to one expert,
and one batched matmul over blocks uses per-block gathered weights (work ~ M·A + E·block rows;
weight-gather memory ~ blocks·D·F, so it is a small-scale path). `experts_dense` runs every expert
on every token and combines with a [M, E] weight matrix: O(M·E·F), a reference for tests.
Every impl takes `limit` (the clamp), `weight_before_down` and `quant_sim` ("none" | "fp8" |
"fp8_fp4", quant.py): the FP8 simulation of W_down's input, e4m3 1×128 per (token, expert) row of
the hidden activation after the routing weight (V4: bf16(g · h)). The other quantisation points
commute with the dispatch and are the caller's (MoE layer): x in 1×128 per token, the weights
`sim_expert_weight`. Local letters: X = M·A sorted pairs, R blocks, Y rows per block.

Every impl also serves the expert-parallel dispatch (dispatch.py), which hands it a shard's local
experts: an expert id < 0 marks a pair (or buffer slot) that is not this shard's, which contributes
nothing. `out_dtype` lets a dispatch keep partial sums in float32 until they are reduced.
"""

import jax
import jax.numpy as jnp

from deepseek_jax.layers.mlp import swiglu_act
from deepseek_jax.quant import sim_act


def expert_counts(experts_MA: jax.Array, n_experts: int) -> jax.Array:
    """Tokens routed to each expert [E] (int32); ids < 0 are not counted."""
    flat = experts_MA.reshape(-1)
    return jnp.zeros((n_experts,), jnp.int32).at[jnp.where(flat < 0, n_experts, flat)].add(1, mode="drop")


def _sorted_pairs(experts_MA, E):
    """Pairs sorted by expert (foreign pairs, id < 0, last): (order_X, expert_X, token_X, valid_X)."""
    A = experts_MA.shape[1]
    flat_X = experts_MA.reshape(-1)
    key_X = jnp.where(flat_X < 0, E, flat_X)
    order_X = jnp.argsort(key_X, stable=True)
    return order_X, key_X[order_X], order_X // A, key_X[order_X] < E


def _pair_weights(weights_MA, order_X, valid_X, before: bool):
    """(w_X scaling the hidden activation, w_X scaling the output): one of them is the routing weight,
    the other 1; both 0 on foreign pairs. float32."""
    g_X = jnp.where(valid_X, weights_MA.reshape(-1)[order_X].astype(jnp.float32), 0.0)
    ones_X = valid_X.astype(jnp.float32)
    return (g_X, ones_X) if before else (ones_X, g_X)


def scale_rows(h_XF, w_X):
    """h · w per row, multiplied in float32 and rounded once to h's dtype (V4's `weights * x`)."""
    return (h_XF.astype(jnp.float32) * w_X[:, None]).astype(h_XF.dtype)


def _combine(y_XD, w_X, token_X, valid_X, M, out_dtype):
    """Σ over a token's pairs of w · y, foreign pairs masked out; [M, D]."""
    y_XD = jnp.where(valid_X[:, None], y_XD.astype(jnp.float32), 0.0) * w_X[:, None]
    return jnp.zeros((M, y_XD.shape[-1]), jnp.float32).at[token_X].add(y_XD).astype(out_dtype)


def experts_ragged(x_MD, experts_MA, weights_MA, w_gate_EDF, w_up_EDF, w_down_EFD, out_dtype=None,
                   limit: float = 0.0, weight_before_down: bool = False, quant_sim: str = "none"):
    """Dropless grouped matmuls over (token, expert) pairs sorted by expert; returns [M, D]."""
    M, E = x_MD.shape[0], w_gate_EDF.shape[0]
    order_X, _, token_X, valid_X = _sorted_pairs(experts_MA, E)
    w_hidden_X, w_out_X = _pair_weights(weights_MA, order_X, valid_X, weight_before_down)
    group_sizes_E = expert_counts(experts_MA, E)  # foreign pairs sit after the last group
    x_XD = jnp.take(x_MD, token_X, axis=0)
    gate_XF = jax.lax.ragged_dot(x_XD, w_gate_EDF, group_sizes_E)
    up_XF = jax.lax.ragged_dot(x_XD, w_up_EDF, group_sizes_E)
    h_XF = swiglu_act(gate_XF, up_XF, limit)
    h_XF = scale_rows(h_XF, w_hidden_X) if weight_before_down else h_XF
    y_XD = jax.lax.ragged_dot(sim_act(h_XF, quant_sim), w_down_EFD, group_sizes_E)
    return _combine(y_XD, w_out_X, token_X, valid_X, M, out_dtype or x_MD.dtype)


def experts_blocked(x_MD, experts_MA, weights_MA, w_gate_EDF, w_up_EDF, w_down_EFD, block: int = 64,
                    out_dtype=None, limit: float = 0.0, weight_before_down: bool = False,
                    quant_sim: str = "none"):
    """Dropless grouped matmuls as one batched matmul over expert-pure blocks; returns [M, D]."""
    M, A = experts_MA.shape
    E, D, _ = w_gate_EDF.shape
    X, Y = M * A, block
    order_X, expert_X, token_X, valid_X = _sorted_pairs(experts_MA, E)
    counts_E = expert_counts(experts_MA, E)
    padded_E = (counts_E + Y - 1) // Y * Y
    start_E, pad_start_E = jnp.cumsum(counts_E) - counts_E, jnp.cumsum(padded_E) - padded_E
    e_X = jnp.minimum(expert_X, E - 1)
    R = -(-(X + E * (Y - 1)) // Y)  # static bound on the number of blocks
    row_X = jnp.where(valid_X, pad_start_E[e_X] + jnp.arange(X) - start_E[e_X], R * Y)  # R*Y: no row
    block_expert_R = jnp.minimum(jnp.searchsorted(jnp.cumsum(padded_E), jnp.arange(R) * Y, side="right"), E - 1)
    x_RYD = jnp.zeros((R * Y, D), x_MD.dtype).at[row_X].set(jnp.take(x_MD, token_X, axis=0), mode="drop")
    x_RYD = x_RYD.reshape(R, Y, D)
    gate_RYF = jnp.einsum("RYD,RDF->RYF", x_RYD, w_gate_EDF[block_expert_R])
    up_RYF = jnp.einsum("RYD,RDF->RYF", x_RYD, w_up_EDF[block_expert_R])
    h_RYF = swiglu_act(gate_RYF, up_RYF, limit)
    w_hidden_X, w_out_X = _pair_weights(weights_MA, order_X, valid_X, weight_before_down)
    if weight_before_down:  # each row's weight, at its place in the block layout (padding rows: 0)
        w_RY = jnp.zeros((R * Y,), jnp.float32).at[row_X].set(w_hidden_X, mode="drop")
        h_RYF = scale_rows(h_RYF.reshape(R * Y, -1), w_RY).reshape(h_RYF.shape)
    y_RYD = jnp.einsum("RYF,RFD->RYD", sim_act(h_RYF, quant_sim), w_down_EFD[block_expert_R])
    y_XD = jnp.take(y_RYD.reshape(R * Y, D), row_X, axis=0, mode="fill", fill_value=0)
    return _combine(y_XD, w_out_X, token_X, valid_X, M, out_dtype or x_MD.dtype)


def experts_dense(x_MD, experts_MA, weights_MA, w_gate_EDF, w_up_EDF, w_down_EFD, out_dtype=None,
                  limit: float = 0.0, weight_before_down: bool = False, quant_sim: str = "none"):
    """Every expert on every token, combined by a dense [M, E] weight matrix; returns [M, D]."""
    M, E = x_MD.shape[0], w_gate_EDF.shape[0]
    weights_MA = jnp.where(experts_MA < 0, 0.0, weights_MA)
    combine_ME = jnp.zeros((M, E), jnp.float32).at[jnp.arange(M)[:, None], jnp.maximum(experts_MA, 0)].add(weights_MA)
    gate_MEF = jnp.einsum("MD,EDF->MEF", x_MD, w_gate_EDF)
    up_MEF = jnp.einsum("MD,EDF->MEF", x_MD, w_up_EDF)
    h_MEF = swiglu_act(gate_MEF, up_MEF, limit)
    if weight_before_down:  # unrouted (token, expert) rows are zeroed before the down projection
        h_MEF = (h_MEF.astype(jnp.float32) * combine_ME[..., None]).astype(h_MEF.dtype)
        y_MD = jnp.einsum("MEF,EFD->MD", sim_act(h_MEF, quant_sim), w_down_EFD, preferred_element_type=jnp.float32)
        return y_MD.astype(out_dtype or x_MD.dtype)
    y_MED = jnp.einsum("MEF,EFD->MED", sim_act(h_MEF, quant_sim), w_down_EFD)
    return jnp.einsum("MED,ME->MD", y_MED.astype(jnp.float32), combine_ME).astype(out_dtype or x_MD.dtype)


EXPERT_IMPLS = {"ragged": experts_ragged, "blocked": experts_blocked, "dense": experts_dense}
