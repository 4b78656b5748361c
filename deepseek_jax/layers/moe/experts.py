"""Routed experts: SwiGLU per expert, weights stacked on E.

`experts_ragged` is the dropless production path: the M·A (token, expert) pairs are sorted by
expert and each expert's contiguous run is multiplied by its weights with `jax.lax.ragged_dot`, so
the work is proportional to M·A, not M·E, where the backend has a grouped-matmul kernel (GPU, TPU).
XLA:CPU lowers ragged_dot to a masked dense product over all E groups (E x the work, and an
[E, M·A, D] mask), so for CPU runs `experts_blocked` does the same dropless computation in plain
JAX: each expert's run is padded to a multiple of `block` rows, every block belongs to one expert,
and one batched matmul over blocks uses per-block gathered weights (work ~ M·A + E·block rows;
weight-gather memory ~ blocks·D·F, so it is a small-scale path). `experts_dense` runs every expert
on every token and combines with a [M, E] weight matrix: O(M·E·F), a reference for tests.
V3 applies the routing weight after the down projection. Local letters: X = M·A sorted pairs,
R blocks, Y rows per block.
"""

import jax
import jax.numpy as jnp


def expert_counts(experts_MA: jax.Array, n_experts: int) -> jax.Array:
    """Tokens routed to each expert [E] (int32)."""
    return jnp.zeros((n_experts,), jnp.int32).at[experts_MA.reshape(-1)].add(1)


def experts_ragged(x_MD, experts_MA, weights_MA, w_gate_EDF, w_up_EDF, w_down_EFD):
    """Dropless grouped matmuls over (token, expert) pairs sorted by expert; returns [M, D]."""
    M, A = experts_MA.shape
    E = w_gate_EDF.shape[0]
    flat_X = experts_MA.reshape(-1)  # X = M·A (token, expert) pairs, token-major
    order_X = jnp.argsort(flat_X, stable=True)
    token_X = order_X // A  # the token each sorted pair comes from
    group_sizes_E = expert_counts(experts_MA, E)
    x_XD = jnp.take(x_MD, token_X, axis=0)
    gate_XF = jax.lax.ragged_dot(x_XD, w_gate_EDF, group_sizes_E)
    up_XF = jax.lax.ragged_dot(x_XD, w_up_EDF, group_sizes_E)
    y_XD = jax.lax.ragged_dot(jax.nn.silu(gate_XF) * up_XF, w_down_EFD, group_sizes_E)
    y_XD = y_XD.astype(jnp.float32) * weights_MA.reshape(-1)[order_X][:, None]
    return jnp.zeros((M, x_MD.shape[-1]), jnp.float32).at[token_X].add(y_XD).astype(x_MD.dtype)


def experts_blocked(x_MD, experts_MA, weights_MA, w_gate_EDF, w_up_EDF, w_down_EFD, block: int = 64):
    """Dropless grouped matmuls as one batched matmul over expert-pure blocks; returns [M, D]."""
    M, A = experts_MA.shape
    E, D, _ = w_gate_EDF.shape
    X, Y = M * A, block
    flat_X = jnp.asarray(experts_MA).reshape(-1)
    order_X = jnp.argsort(flat_X, stable=True)
    expert_X, token_X = flat_X[order_X], order_X // A
    counts_E = expert_counts(experts_MA, E)
    padded_E = (counts_E + Y - 1) // Y * Y
    start_E, pad_start_E = jnp.cumsum(counts_E) - counts_E, jnp.cumsum(padded_E) - padded_E
    row_X = pad_start_E[expert_X] + jnp.arange(X) - start_E[expert_X]  # row in the padded buffer
    R = -(-(X + E * (Y - 1)) // Y)  # static bound on the number of blocks
    block_expert_R = jnp.minimum(jnp.searchsorted(jnp.cumsum(padded_E), jnp.arange(R) * Y, side="right"), E - 1)
    x_RYD = jnp.zeros((R * Y, D), x_MD.dtype).at[row_X].set(jnp.take(x_MD, token_X, axis=0)).reshape(R, Y, D)
    gate_RYF = jnp.einsum("RYD,RDF->RYF", x_RYD, w_gate_EDF[block_expert_R])
    up_RYF = jnp.einsum("RYD,RDF->RYF", x_RYD, w_up_EDF[block_expert_R])
    y_RYD = jnp.einsum("RYF,RFD->RYD", jax.nn.silu(gate_RYF) * up_RYF, w_down_EFD[block_expert_R])
    y_XD = y_RYD.reshape(R * Y, D)[row_X].astype(jnp.float32) * weights_MA.reshape(-1)[order_X][:, None]
    return jnp.zeros((M, D), jnp.float32).at[token_X].add(y_XD).astype(x_MD.dtype)


def experts_dense(x_MD, experts_MA, weights_MA, w_gate_EDF, w_up_EDF, w_down_EFD):
    """Every expert on every token, combined by a dense [M, E] weight matrix; returns [M, D]."""
    M, E = x_MD.shape[0], w_gate_EDF.shape[0]
    combine_ME = jnp.zeros((M, E), jnp.float32).at[jnp.arange(M)[:, None], experts_MA].add(weights_MA)
    gate_MEF = jnp.einsum("MD,EDF->MEF", x_MD, w_gate_EDF)
    up_MEF = jnp.einsum("MD,EDF->MEF", x_MD, w_up_EDF)
    y_MED = jnp.einsum("MEF,EFD->MED", jax.nn.silu(gate_MEF) * up_MEF, w_down_EFD)
    return jnp.einsum("MED,ME->MD", y_MED.astype(jnp.float32), combine_ME).astype(x_MD.dtype)


EXPERT_IMPLS = {"ragged": experts_ragged, "blocked": experts_blocked, "dense": experts_dense}
