"""DeepSeek routing: affinities, biased selection (V3 §2.1.2), group-limited top-k, hash routing (V4).

    s = sigmoid(u·e) (V3) | softmax(u·e) (V2) | sqrt(softplus(u·e)) (V4)
    learned:  idx = topk(s + b)                    hash:  idx = tid2eid[token]
    g = s[idx] / Σ s[idx] · route_scale            (unbiased scores, renormalised, both kinds)

Local letters: P expert groups, U kept groups, W experts per group.

The bias b_e (`e_score_correction_bias`) only decides *which* experts are chosen; the weights
come from the unbiased scores, so adjusting b_e balances load without an auxiliary loss. V4's
first `n_hash_layers` MoE layers choose by a fixed [V, A] token-id table instead and have no bias;
their weights still come from the learned router's scores.
Reference: DeepSeek-V3/V4 inference/model.py `Gate`; transformers `DeepseekV3TopkRouter`,
`DeepseekV4TopKRouter`, `DeepseekV4HashRouter`.
"""

import jax
import jax.numpy as jnp


def router_scores(logits_ME: jax.Array, score_func: str) -> jax.Array:
    """Affinities s = sigmoid(u·e) (V3), softmax over experts (V2) or sqrt(softplus(u·e)) (V4), float32."""
    logits_ME = logits_ME.astype(jnp.float32)
    if score_func == "sigmoid":
        return jax.nn.sigmoid(logits_ME)
    if score_func == "softmax":
        return jax.nn.softmax(logits_ME, -1)
    assert score_func == "sqrtsoftplus", score_func
    return jnp.sqrt(jax.nn.softplus(logits_ME))


def group_limit(choice_ME: jax.Array, n_groups: int, n_limited_groups: int) -> jax.Array:
    """Keeps the `n_limited_groups` groups with the largest top-2 sums; masks the rest to -inf."""
    M, E = choice_ME.shape
    group_score_MP = jax.lax.top_k(choice_ME.reshape(M, n_groups, E // n_groups), 2)[0].sum(-1)
    _, kept_MU = jax.lax.top_k(group_score_MP, n_limited_groups)
    keep_MP = jax.nn.one_hot(kept_MU, n_groups, dtype=jnp.bool_).any(-2)
    return jnp.where(jnp.repeat(keep_MP, E // n_groups, axis=-1), choice_ME, -jnp.inf)


def routing_weights(scores_ME, experts_MA, route_scale: float, norm_topk_prob: bool) -> jax.Array:
    """g = s[idx] (/ Σ s[idx]) · route_scale, from the unbiased scores; float32 [M, A]."""
    weights_MA = jnp.take_along_axis(scores_ME, experts_MA, axis=-1)
    if norm_topk_prob:
        weights_MA = weights_MA / (weights_MA.sum(-1, keepdims=True) + 1e-20)
    return weights_MA * route_scale


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
    return routing_weights(scores_ME, experts_MA, route_scale, norm_topk_prob), experts_MA.astype(jnp.int32)


def hash_route(
    logits_ME: jax.Array,
    tokens_M: jax.Array,
    tid2eid_VA: jax.Array,
    *,
    score_func: str = "sqrtsoftplus",
    route_scale: float = 1.0,
    norm_topk_prob: bool = True,
) -> tuple[jax.Array, jax.Array]:
    """V4 hash routing: experts fixed per token id by the table, weights from the learned scores."""
    experts_MA = jnp.take(tid2eid_VA, tokens_M, axis=0).astype(jnp.int32)
    scores_ME = router_scores(logits_ME, score_func)
    return routing_weights(scores_ME, experts_MA, route_scale, norm_topk_prob), experts_MA


def random_hash_table(key: jax.Array, V: int, E: int, A: int) -> jax.Array:
    """A [V, A] int32 table of A distinct experts per token id, uniform over experts (an init for
    training from scratch; converted checkpoints bring their own table)."""
    _, experts_VA = jax.lax.top_k(jax.random.uniform(key, (V, E)), A)
    return experts_VA.astype(jnp.int32)
