"""Routing statistics: V3's sequence-wise balance loss and the aux-loss-free bias update.

    balance       L_bal = α Σ_i f_i P_i per sequence                                   (V3 §2.1.2)
    bias update   b_i <- b_i + γ·sign(mean_j c_j - c_i)        (aux-loss-free balancing, V3 §2.1.2)

Both are pure and computed in float32; the layer (layer.py) returns the unweighted loss and the
expert counts c, and the training step applies α and γ. V4.1 keeps one bias per modality: `bias`
moves with the counts of the tokens that selected with it (text), `bias_vl` with those of the
media-span tokens ("router-bias speed 0.001 per modality"), each by the same rule and γ; an
all-zero count vector (a batch without span tokens) has error 0 everywhere, so sign(0) = 0 leaves
that bias exactly as it was.
Reference: DeepSeek-V3 technical report, arXiv:2412.19437, §2.1.2.
"""

import jax
import jax.numpy as jnp


def sequence_balance_loss(
    scores_BTE: jax.Array, experts_BTA: jax.Array, mask_BT: jax.Array, n_activated: int
) -> jax.Array:
    """V3's complementary sequence-wise balance loss, unweighted (the caller multiplies by α).

    Per sequence b with T_b unmasked tokens and A = n_activated of E experts:
        f_i = E/(A·T_b) Σ_t 1[i ∈ topk(t)],   P_i = 1/T_b Σ_t s_{i,t} / Σ_j s_{j,t},
        L_b = Σ_i f_i P_i;   the result is the mean of L_b over sequences with T_b > 0.
    Perfectly uniform routing gives f_i = 1, P_i = 1/E, L = 1; all tokens on the same A experts
    with scores spread evenly over them gives f = E/A, P = 1/A there, L = E/A.
    Gradients flow through P only (f counts discrete choices).
    """
    E = scores_BTE.shape[-1]
    mask_BT = mask_BT.astype(jnp.float32)
    T_B = mask_BT.sum(-1)
    scores_BTE = scores_BTE.astype(jnp.float32)
    probs_BTE = scores_BTE / scores_BTE.sum(-1, keepdims=True)
    chosen_BTE = jax.nn.one_hot(experts_BTA, E, dtype=jnp.float32).sum(-2)
    denom_B = jnp.maximum(T_B, 1.0)[:, None]
    f_BE = E / n_activated * jnp.einsum("BTE,BT->BE", chosen_BTE, mask_BT) / denom_B
    p_BE = jnp.einsum("BTE,BT->BE", probs_BTE, mask_BT) / denom_B
    loss_B = (f_BE * p_BE).sum(-1)
    has_tokens_B = T_B > 0
    return jnp.where(has_tokens_B, loss_B, 0.0).sum() / jnp.maximum(has_tokens_B.sum(), 1)


def load_counts(experts_MA: jax.Array, keep_M: jax.Array, n_experts: int) -> jax.Array:
    """[E] int32: per expert, how many kept tokens (keep_M True) selected it among their A experts."""
    return jnp.zeros((n_experts,), jnp.int32).at[experts_MA].add(keep_M.reshape(-1, 1).astype(jnp.int32))


def update_router_bias(bias_E: jax.Array, counts_E: jax.Array, rate: float) -> jax.Array:
    """Aux-loss-free balancing: b_i <- b_i + γ·sign(mean_j c_j - c_i) over the last axis.

    Overloaded experts (c_i above the mean load) lose γ of selection bias, underloaded ones gain
    γ; works on one layer's [E] or a stack's [L, E] (mean per layer). An expert at the mean load
    keeps its bias bit for bit (sign 0; even a -0.0 stays), so all-zero counts change nothing.
    """
    counts_E = counts_E.astype(jnp.float32)
    error_E = counts_E.mean(-1, keepdims=True) - counts_E
    moved_E = (bias_E + rate * jnp.sign(error_E)).astype(bias_E.dtype)
    return jnp.where(error_E == 0, bias_E, moved_E)
