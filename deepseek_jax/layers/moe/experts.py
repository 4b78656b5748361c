"""Routed experts: SwiGLU per expert, weights stacked on E.

`experts_ragged` is the dropless production path: the M·A (token, expert) pairs are sorted by
expert and each expert's contiguous run is multiplied by its weights with `jax.lax.ragged_dot`, so
the work is proportional to M·A, not M·E. `experts_dense` runs every expert on every token and
combines with a [M, E] weight matrix: O(M·E·F), a reference for tests only.
V3 applies the routing weight after the down projection.
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


def experts_dense(x_MD, experts_MA, weights_MA, w_gate_EDF, w_up_EDF, w_down_EFD):
    """Every expert on every token, combined by a dense [M, E] weight matrix; returns [M, D]."""
    M, E = x_MD.shape[0], w_gate_EDF.shape[0]
    combine_ME = jnp.zeros((M, E), jnp.float32).at[jnp.arange(M)[:, None], experts_MA].add(weights_MA)
    gate_MEF = jnp.einsum("MD,EDF->MEF", x_MD, w_gate_EDF)
    up_MEF = jnp.einsum("MD,EDF->MEF", x_MD, w_up_EDF)
    y_MED = jnp.einsum("MEF,EFD->MED", jax.nn.silu(gate_MEF) * up_MEF, w_down_EFD)
    return jnp.einsum("MED,ME->MD", y_MED.astype(jnp.float32), combine_ME).astype(x_MD.dtype)


EXPERT_IMPLS = {"ragged": experts_ragged, "dense": experts_dense}
