"""DeepSeek-V3 routing (V3 §2.1.2): sigmoid affinities, biased selection, group-limited top-k.

Local letters: P expert groups, U kept groups, W experts per group.

The bias b_e (`e_score_correction_bias`) only decides *which* experts are chosen; the weights
come from the unbiased scores, so adjusting b_e balances load without an auxiliary loss.
Reference: deepseek-ai/DeepSeek-V3 inference/model.py `Gate`; transformers `DeepseekV3TopkRouter`.
"""

import jax
import jax.numpy as jnp


def router_scores(logits_ME: jax.Array, score_func: str) -> jax.Array:
    """Affinities s = sigmoid(u·e) (V3) or softmax over experts (V2), in float32."""
    logits_ME = logits_ME.astype(jnp.float32)
    return jax.nn.sigmoid(logits_ME) if score_func == "sigmoid" else jax.nn.softmax(logits_ME, -1)


def group_limit(choice_ME: jax.Array, n_groups: int, n_limited_groups: int) -> jax.Array:
    """Keeps the `n_limited_groups` groups with the largest top-2 sums; masks the rest to -inf."""
    M, E = choice_ME.shape
    group_score_MP = jax.lax.top_k(choice_ME.reshape(M, n_groups, E // n_groups), 2)[0].sum(-1)
    _, kept_MU = jax.lax.top_k(group_score_MP, n_limited_groups)
    keep_MP = jax.nn.one_hot(kept_MU, n_groups, dtype=jnp.bool_).any(-2)
    return jnp.where(jnp.repeat(keep_MP, E // n_groups, axis=-1), choice_ME, -jnp.inf)


def route(
    logits_ME: jax.Array,
    bias_E: jax.Array,
    *,
    n_activated: int,
    n_groups: int = 1,
    n_limited_groups: int = 1,
    score_func: str = "sigmoid",
    route_scale: float = 1.0,
    norm_topk_prob: bool = True,
) -> tuple[jax.Array, jax.Array]:
    """Returns (weights_MA float32, experts_MA int32): biased selection, unbiased weights."""
    scores_ME = router_scores(logits_ME, score_func)
    choice_ME = scores_ME + bias_E.astype(jnp.float32)
    if n_groups > 1:  # device-limited routing
        choice_ME = group_limit(choice_ME, n_groups, n_limited_groups)
    _, experts_MA = jax.lax.top_k(choice_ME, n_activated)
    weights_MA = jnp.take_along_axis(scores_ME, experts_MA, axis=-1)
    if norm_topk_prob:
        weights_MA = weights_MA / (weights_MA.sum(-1, keepdims=True) + 1e-20)
    return weights_MA * route_scale, experts_MA.astype(jnp.int32)
