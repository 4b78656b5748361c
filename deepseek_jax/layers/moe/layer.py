"""The DeepSeekMoE layer: shared experts plus routed experts chosen by the router.

    y = shared(x) + Σ_{e ∈ idx} g_e · expert_e(x)
    idx = topk(s + b)  (learned, V3/V4)   |   idx = tid2eid[token]  (hash, V4's first layers)

The selection bias lives in the `router` collection, not in `params`: it is updated by the
aux-loss-free rule from expert counts, outside the optimizer. A hash-routed layer (`hash_routing`)
has no bias; its fixed [V, A] int32 table `tid2eid` lives in the same `router` collection, so it is
checkpointed, converted and sharded with the biases but never trained (it is initialised to A
distinct random experts per token id; a converted checkpoint brings the released table). Its router
weight is still learned: the weights g come from its scores. The layer returns the expert counts
(over real tokens, padding excluded) split by the bias that selected them, `counts` for `bias` and
`counts_vl` for V4.1's `bias_vl` (media-span tokens; zeros without span_BT or without bias_vl, where
every real token is in `counts`), so each bias is balanced on its own modality's load; and the
unweighted sequence-wise balance loss (0 for a hash layer, whose selection no loss can steer), and
sows the chosen experts into `intermediates` (tests compare them with HF's exactly).

`quant_sim` ("none" | "fp8" | "fp8_fp4", quant.py) simulates the release's numerics: the routed
experts' x in e4m3 1×128 per token, their weights by `sim_expert_weight` (fp8: 128×128 e4m3 tiles;
fp8_fp4: e2m1 1×32 along `in`), W_down's input in the experts (experts.py), the shared experts as
FP8 linears (mlp.py). The router (f32) is never quantised.
"""

from typing import NamedTuple

import flax.linen as nn
import jax
import jax.numpy as jnp

from deepseek_jax.axes import constrain, dense_init, param
from deepseek_jax.config import ConfigError, MoEConfig
from deepseek_jax.layers.mlp import MLP
from deepseek_jax.layers.moe.balance import load_counts, sequence_balance_loss
from deepseek_jax.layers.moe.dispatch import dispatch_experts
from deepseek_jax.layers.moe.router import hash_route, random_hash_table, route, router_scores
from deepseek_jax.quant import sim_act, sim_expert_weight

ROUTER_COLLECTION = "router"


class MoEAux(NamedTuple):
    counts: jax.Array  # [E] int32, real tokens that selected with `bias` routed to each expert
    balance_loss: jax.Array  # scalar float32, V3's sequence-wise balance loss (before its weight α)
    dropped: jax.Array  # int32, real (token, expert) pairs dropped by a capacity-limited dispatch
    counts_vl: jax.Array  # [E] int32, real media-span tokens that selected with `bias_vl` (V4.1); else zeros


class MoE(nn.Module):
    cfg: MoEConfig
    dim: int  # D
    dtype: jnp.dtype = jnp.bfloat16
    hash_routing: bool = False  # choose experts by token id through `tid2eid` (V4's first layers)
    vocab_size: int = 0  # V, rows of `tid2eid`; needed with hash_routing
    quant_sim: str = "none"  # FP8/FP4 simulation of the experts (module docstring)

    def _route(self, logits_ME, tokens_BT, span_BT):
        """(weights_MA float32, experts_MA int32) by the learned top-k or by the token-id table;
        tokens inside media spans select with `bias_vl` (V4.1) where the config has it."""
        c = self.cfg
        E, A = c.n_routed_experts, c.n_activated_experts
        kw = dict(score_func=c.score_func, route_scale=c.route_scale, norm_topk_prob=c.norm_topk_prob)
        if self.hash_routing:
            if self.vocab_size <= 0 or tokens_BT is None:
                raise ConfigError("a hash-routed MoE needs vocab_size > 0 and the token ids (tokens_BT)")
            table = nn.with_logical_partitioning(  # replicated: a few MB, gathered by every token shard
                lambda: random_hash_table(self.make_rng("params"), self.vocab_size, E, A), (None, None))
            tid2eid_VA = self.variable(ROUTER_COLLECTION, "tid2eid", table).value
            return hash_route(logits_ME, tokens_BT.reshape(-1), tid2eid_VA, **kw)
        bias_E = self.variable(
            ROUTER_COLLECTION, "bias", nn.with_logical_partitioning(jnp.zeros, (None,)), (E,), jnp.float32
        ).value
        if c.vl_bias:
            bias_vl_E = self.variable(
                ROUTER_COLLECTION, "bias_vl", nn.with_logical_partitioning(jnp.zeros, (None,)), (E,), jnp.float32
            ).value
            if span_BT is not None:
                bias_E = jnp.where(span_BT.reshape(-1, 1), bias_vl_E, bias_E)  # [M, E]
        return route(logits_ME, bias_E, n_activated=A, n_groups=c.n_expert_groups,
                     n_limited_groups=c.n_limited_groups, **kw)

    @nn.compact
    def __call__(
        self, x_BTD: jax.Array, mask_BT: jax.Array | None = None, tokens_BT: jax.Array | None = None,
        span_BT: jax.Array | None = None,
    ) -> tuple[jax.Array, MoEAux]:
        """mask_BT marks real tokens (False = padding) for the counts and the balance loss;
        tokens_BT (int ids) are read only by a hash-routed layer; span_BT (media-span tokens) picks
        `bias_vl` when moe.vl_bias, and those tokens are counted in `counts_vl`, not `counts`."""
        c, D = self.cfg, self.dim
        E, F = c.n_routed_experts, c.moe_inter_dim
        B, T, _ = x_BTD.shape
        x_BTD = constrain(x_BTD.astype(self.dtype), ("act_batch", "act_seq", "act_embed"))
        x_MD = x_BTD.reshape(B * T, D)

        w_router_DE = param(self, "w_router", ("embed", None), (D, E), dense_init([0], [1]))
        with jax.named_scope("route"):  # router math in float32, as in the reference
            logits_ME = jnp.einsum("MD,DE->ME", x_MD.astype(jnp.float32), w_router_DE)
            if c.gate_temp != 1.0:
                logits_ME = logits_ME / c.gate_temp
            logits_ME = constrain(logits_ME, ("act_batch", None))  # top-k per token shard, never gathered
            weights_MA, experts_MA = self._route(logits_ME, tokens_BT, span_BT)
        weights_MA, experts_MA = (constrain(a, ("act_batch", None)) for a in (weights_MA, experts_MA))
        self.sow("intermediates", "experts_MA", experts_MA)

        expert_init = dense_init([1], [2], batch_axes=[0])
        w_gate_EDF = param(self, "w_gate", ("experts", "embed", "expert_mlp"), (E, D, F), expert_init)
        w_up_EDF = param(self, "w_up", ("experts", "embed", "expert_mlp"), (E, D, F), expert_init)
        w_down_EFD = param(self, "w_down", ("experts", "expert_mlp", "embed"), (E, F, D), expert_init)
        mask_BT = jnp.ones((B, T), jnp.bool_) if mask_BT is None else mask_BT
        q = self.quant_sim
        with jax.named_scope("experts"):
            y_BTD, dropped = dispatch_experts(
                c, sim_act(x_BTD, q), experts_MA.reshape(B, T, -1), weights_MA.reshape(B, T, -1), mask_BT,
                *(sim_expert_weight(w, q).astype(self.dtype) for w in (w_gate_EDF, w_up_EDF, w_down_EFD)),
                quant_sim=q,
            )
        if c.n_shared_experts > 0:
            shared = MLP(D, c.n_shared_experts * F, self.dtype, c.swiglu_limit, q, name="shared")
            y_BTD = y_BTD + shared(x_BTD)
        real_M = mask_BT.reshape(B * T).astype(jnp.bool_)
        vl_M = jnp.zeros_like(real_M)  # tokens that selected with bias_vl (as _route decides)
        if c.vl_bias and not self.hash_routing and span_BT is not None:
            vl_M = span_BT.reshape(B * T).astype(jnp.bool_)
        counts_E = load_counts(experts_MA, real_M & ~vl_M, E)
        counts_vl_E = load_counts(experts_MA, real_M & vl_M, E)
        balance = jnp.float32(0) if self.hash_routing else sequence_balance_loss(
            router_scores(logits_ME, c.score_func).reshape(B, T, E), experts_MA.reshape(B, T, -1),
            mask_BT, c.n_activated_experts,
        )
        return y_BTD, MoEAux(counts_E, balance, dropped, counts_vl_E)
