"""The DeepSeekMoE layer: shared experts plus routed experts chosen by the router.

    y = shared(x) + Σ_{e ∈ topk} g_e · expert_e(x)

The selection bias lives in the `router` collection, not in `params`: it is updated by the
aux-loss-free rule from expert counts, outside the optimizer. The layer returns those counts (over
real tokens, padding excluded) and the unweighted sequence-wise balance loss, and sows the chosen
experts into `intermediates` (tests compare them with HF's exactly).
"""

from typing import NamedTuple

import flax.linen as nn
import jax
import jax.numpy as jnp

from deepseek_jax.axes import constrain, dense_init, param
from deepseek_jax.config import MoEConfig
from deepseek_jax.layers.mlp import MLP
from deepseek_jax.layers.moe.dispatch import dispatch_experts
from deepseek_jax.layers.moe.router import route, router_scores
from deepseek_jax.losses import sequence_balance_loss

ROUTER_COLLECTION = "router"


class MoEAux(NamedTuple):
    counts: jax.Array  # [E] int32, real tokens routed to each expert
    balance_loss: jax.Array  # scalar float32, V3's sequence-wise balance loss (before its weight α)
    dropped: jax.Array  # int32, real (token, expert) pairs dropped by a capacity-limited dispatch


class MoE(nn.Module):
    cfg: MoEConfig
    dim: int  # D
    dtype: jnp.dtype = jnp.bfloat16

    @nn.compact
    def __call__(self, x_BTD: jax.Array, mask_BT: jax.Array | None = None) -> tuple[jax.Array, MoEAux]:
        """mask_BT marks real tokens (False = padding) for the counts and the balance loss."""
        c, D = self.cfg, self.dim
        E, F = c.n_routed_experts, c.moe_inter_dim
        B, T, _ = x_BTD.shape
        x_BTD = constrain(x_BTD.astype(self.dtype), ("act_batch", "act_seq", "act_embed"))
        x_MD = x_BTD.reshape(B * T, D)

        w_router_DE = param(self, "w_router", ("embed", None), (D, E), dense_init([0], [1]))
        bias_E = self.variable(
            ROUTER_COLLECTION, "bias", nn.with_logical_partitioning(jnp.zeros, (None,)), (E,), jnp.float32
        ).value
        with jax.named_scope("route"):  # router math in float32, as in the reference
            logits_ME = jnp.einsum("MD,DE->ME", x_MD.astype(jnp.float32), w_router_DE)
            logits_ME = constrain(logits_ME, ("act_batch", None))  # top-k per token shard, never gathered
            weights_MA, experts_MA = route(
                logits_ME, bias_E, n_activated=c.n_activated_experts, n_groups=c.n_expert_groups,
                n_limited_groups=c.n_limited_groups, score_func=c.score_func,
                route_scale=c.route_scale, norm_topk_prob=c.norm_topk_prob,
            )
        weights_MA, experts_MA = (constrain(a, ("act_batch", None)) for a in (weights_MA, experts_MA))
        self.sow("intermediates", "experts_MA", experts_MA)

        expert_init = dense_init([1], [2], batch_axes=[0])
        w_gate_EDF = param(self, "w_gate", ("experts", "embed", "expert_mlp"), (E, D, F), expert_init)
        w_up_EDF = param(self, "w_up", ("experts", "embed", "expert_mlp"), (E, D, F), expert_init)
        w_down_EFD = param(self, "w_down", ("experts", "expert_mlp", "embed"), (E, F, D), expert_init)
        mask_BT = jnp.ones((B, T), jnp.bool_) if mask_BT is None else mask_BT
        with jax.named_scope("experts"):
            y_BTD, dropped = dispatch_experts(
                c, x_BTD, experts_MA.reshape(B, T, -1), weights_MA.reshape(B, T, -1), mask_BT,
                *(w.astype(self.dtype) for w in (w_gate_EDF, w_up_EDF, w_down_EFD)),
            )
        if c.n_shared_experts > 0:
            shared = MLP(D, c.n_shared_experts * F, self.dtype, name="shared")
            y_BTD = y_BTD + shared(x_BTD)
        counts_E = jnp.zeros((E,), jnp.int32).at[experts_MA].add(mask_BT.reshape(B * T, 1).astype(jnp.int32))
        balance = sequence_balance_loss(
            router_scores(logits_ME, c.score_func).reshape(B, T, E), experts_MA.reshape(B, T, -1),
            mask_BT, c.n_activated_experts,
        )
        return y_BTD, MoEAux(counts_E, balance, dropped)
