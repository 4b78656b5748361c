"""Training losses: chunked next-token cross-entropy and MTP targets.

    main loss     L = (1/Σm) Σ_t m_t · (-log softmax(h_t W_head)[y_t]),  y_t = t_{t+1}
    MTP depth k   L_k the same with y_t = t_{t+k+1};  L_MTP = λ/K Σ_k L_k          (V3 §2.2)
    indexer KL    L_I = mean_t KL(p_t ‖ softmax(I_t)) per DSA layer, summed over layers with weight λ_I
                  (V3.2 §2.1; computed inside the attention, layers/attention/indexer.py, added up in train.py)
    DSpark        L_z the same for draft slot z of every position p, y = t_{p+2+z} (valid iff every hop
                  t_p … t_{p+2+z} stays in one document), logits = [h ; E_M[t_{p+1+z}]] [W_head ; W_M];
                  L_DSpark = mean_z L_z in place of L_MTP (same λ), plus c · BCE(conf_z, 1[argmax = y]),
                  the target detached. Ours: the release has no DSpark loss (V4.1 reference §6.9)

Everything is pure and computed in float32. The cross-entropy returns masked sums, not means, so
the caller can add up chunks, MTP depths and data-parallel shards before a single division.
The routing statistics (balance loss, aux-free bias update) live with the router, layers/moe/balance.py.
Reference: DeepSeek-V3 technical report, arXiv:2412.19437, §2.2.
Local letters: P chunks, U tokens per chunk; DSpark: Z draft slots, Y Markov rank, W = D + Y.
"""

import jax
import jax.numpy as jnp
import numpy as np

from deepseek_jax.axes import constrain
from deepseek_jax.models.common import shift_left


def token_nll(h_UD: jax.Array, w_head_DV: jax.Array, targets_U: jax.Array) -> jax.Array:
    """-log softmax(h W)[y] per token, with float32 logits: logsumexp_v(z_v) - z_y."""
    w_head_DV = w_head_DV.astype(h_UD.dtype)  # as the model's head: compute dtype, f32 accumulation
    logits_UV = jnp.einsum("UD,DV->UV", h_UD, w_head_DV, preferred_element_type=jnp.float32)
    target_logit_U = jnp.take_along_axis(logits_UV, targets_U[:, None], axis=-1)[:, 0]
    return jax.nn.logsumexp(logits_UV, axis=-1) - target_logit_U


LOGITS_PER_CHUNK = 2**26  # f32 logits of one cross-entropy chunk (256 MB): large enough for the
# head's matmuls, small enough to stay near the caches (at V3's vocabulary 512 tokens measured 2.4x
# faster than one 2048-token chunk on the 2-core CPU, experiments/results/bench_peers.md)


MULTI_DEVICE_CHUNK_TOKENS = 4096  # per device, when the tokens are split over devices (below)


def auto_chunk_tokens(vocab_size: int, batch_shards: int = 1) -> int:
    """Tokens per device per cross-entropy chunk for `train.loss_chunk_tokens: 0`. On one batch shard
    the largest power of two with at most LOGITS_PER_CHUNK logits (at least 8). With the tokens split
    over devices every chunk's head gradient dW [D, V] is all-reduced inside the chunk loop (the carry
    is replicated), so there fewer, larger chunks: MULTI_DEVICE_CHUNK_TOKENS (the default before
    the auto size)."""
    if batch_shards > 1:
        return MULTI_DEVICE_CHUNK_TOKENS
    return max(8, 1 << max(0, (LOGITS_PER_CHUNK // vocab_size).bit_length() - 1))


def chunked_cross_entropy(
    h_MD: jax.Array, w_head_DV: jax.Array, targets_M: jax.Array, mask_M: jax.Array, chunk: int
) -> tuple[jax.Array, jax.Array]:
    """(Σ_t mask_t · NLL_t, Σ_t mask_t) without ever holding [M, V] logits.

    The M tokens are padded to U·P (U = chunk, P = ceil(M/U) chunks) and walked chunk by chunk, so
    memory holds one chunk's [U, V] logits, never [M, V]. Chunk p holds the strided tokens p, P + p,
    2P + p, ...: when M is sharded over devices, every chunk then takes tokens from every shard and
    the U axis keeps M's sharding (contiguous chunks would put the sharding on the P axis that the
    loop walks through). Differentiated, the chunk's gradients are formed in the same pass as its
    loss (`_fused_nll_sum`): the logits are computed and exponentiated once, not again in the
    backward as a rematerialised chunk would.
    """
    M, D = h_MD.shape
    U = min(chunk, M)
    P = -(-M // U)
    pad = U * P - M
    mask_M = mask_M.astype(jnp.bool_)
    targets_M = jnp.where(mask_M, targets_M, 0)  # masked slots may hold any id (e.g. -1 fill)
    # as the model's head: cast once, f32 accumulation. Gathered (over FSDP) once, outside the
    # chunk loop: otherwise every chunk re-gathers it, forward and backward.
    w_head_DV = constrain(w_head_DV.astype(h_MD.dtype), (None, "act_vocab"))
    h_PUD = jnp.pad(h_MD, ((0, pad), (0, 0))).reshape(U, P, D).swapaxes(0, 1)
    targets_PU = jnp.pad(targets_M, (0, pad)).reshape(U, P).T
    mask_PU = jnp.pad(mask_M, (0, pad)).reshape(U, P).T.astype(jnp.float32)
    return _fused_nll_sum(h_PUD, w_head_DV, targets_PU, mask_PU), mask_M.sum(dtype=jnp.float32)


def _chunk_nll(h_UD, w_DV, targets_U, mask_U):
    """(Σ mask · NLL over one chunk, its f32 logits [U, V], their logsumexp [U])."""
    logits_UV = jnp.einsum("UD,DV->UV", h_UD, w_DV, preferred_element_type=jnp.float32)
    lse_U = jax.nn.logsumexp(logits_UV, axis=-1)
    target_logit_U = jnp.take_along_axis(logits_UV, targets_U[:, None], axis=-1)[:, 0]
    return (mask_U * (lse_U - target_logit_U)).sum(), logits_UV, lse_U


@jax.custom_vjp
def _fused_nll_sum(h_PUD, w_DV, targets_PU, mask_PU):
    """Σ mask · NLL over P chunks of U tokens (h_PUD, targets_PU, mask_PU f32) with one head w_DV."""
    return jax.lax.map(lambda xs: _chunk_nll(xs[0], w_DV, *xs[1:])[0], (h_PUD, targets_PU, mask_PU)).sum()


def _fused_nll_fwd(h_PUD, w_DV, targets_PU, mask_PU):
    """The loss and, in the same chunk loop, its gradients: per chunk, with g = mask · (softmax(z) −
    onehot(y)) [U, V], dh = g Wᵀ and dW += hᵀ g (f32 accumulation; fed to the matmuls in h's dtype)."""

    def chunk(dw_DV, xs):
        h_UD, targets_U, mask_U = xs
        logits_UV = jnp.einsum("UD,DV->UV", h_UD, w_DV, preferred_element_type=jnp.float32)
        max_U = jax.lax.stop_gradient(logits_UV.max(axis=-1))
        e_UV = jnp.exp(logits_UV - max_U[:, None])  # the one exponential pass
        sum_U = e_UV.sum(axis=-1)
        target_logit_U = jnp.take_along_axis(logits_UV, targets_U[:, None], axis=-1)[:, 0]
        loss = (mask_U * (max_U + jnp.log(sum_U) - target_logit_U)).sum()
        probs_UV = e_UV / sum_U[:, None]
        onehot_UV = jnp.arange(w_DV.shape[1])[None, :] == targets_U[:, None]
        g_UV = ((probs_UV - onehot_UV) * mask_U[:, None]).astype(h_UD.dtype)
        dh_UD = jnp.einsum("UV,DV->UD", g_UV, w_DV, preferred_element_type=jnp.float32)
        dw_DV = dw_DV + jnp.einsum("UD,UV->DV", h_UD, g_UV, preferred_element_type=jnp.float32)
        return dw_DV, (loss, dh_UD.astype(h_UD.dtype))

    dw0_DV = constrain(jnp.zeros(w_DV.shape, jnp.float32), (None, "act_vocab"))
    dw_DV, (loss_P, dh_PUD) = jax.lax.scan(chunk, dw0_DV, (h_PUD, targets_PU, mask_PU))
    zeros = (np.zeros(targets_PU.shape, jax.dtypes.float0), jnp.zeros_like(mask_PU))
    return loss_P.sum(), (dh_PUD, dw_DV.astype(w_DV.dtype), zeros)


def _fused_nll_bwd(residuals, ct):
    dh_PUD, dw_DV, zeros = residuals
    return ((dh_PUD * ct).astype(dh_PUD.dtype), (dw_DV * ct).astype(dw_DV.dtype), *zeros)


_fused_nll_sum.defvjp(_fused_nll_fwd, _fused_nll_bwd)


def next_token_targets(
    tokens_BT: jax.Array, loss_mask_BT: jax.Array, k: int = 1
) -> tuple[jax.Array, jax.Array]:
    """Targets k positions ahead: y_t = tokens[t + k], valid iff loss_mask[t .. t+k-1] all hold.

    `loss_mask[t]` says that tokens[t+1] continues the document of tokens[t] (false at a document's
    last token and on padding), so a k-hop target is valid only when every hop stays inside one
    document. k = 1 is the main loss; k = 2 is MTP depth 1 (slot t predicts t + 2). The last k
    slots of a row have no target and are masked.
    """
    loss_mask_BT = loss_mask_BT.astype(jnp.bool_)
    valid_BT = loss_mask_BT & (jnp.arange(tokens_BT.shape[1]) < tokens_BT.shape[1] - k)
    for j in range(1, k):  # hop j: from t + j to t + j + 1
        valid_BT = valid_BT & shift_left(loss_mask_BT, j)
    return shift_left(tokens_BT, k), valid_BT


DSPARK_CONFIDENCE_WEIGHT = 0.1  # c: the confidence BCE next to the draft cross-entropy (both times λ)


def chunked_nll_and_hits(
    h_MD: jax.Array, w_head_DV: jax.Array, targets_M: jax.Array, chunk: int
) -> tuple[jax.Array, jax.Array]:
    """(NLL [M], argmax == target [M] bool, no gradient) chunk by chunk in chunked_cross_entropy's
    strided chunks, each under remat: never [M, V] logits."""
    M, D = h_MD.shape
    U = min(chunk, M)
    P = -(-M // U)
    w_head_DV = constrain(w_head_DV.astype(h_MD.dtype), (None, "act_vocab"))
    h_PUD = jnp.pad(h_MD, ((0, U * P - M), (0, 0))).reshape(U, P, D).swapaxes(0, 1)
    targets_PU = jnp.pad(targets_M, (0, U * P - M)).reshape(U, P).T

    @jax.checkpoint
    def chunk_stats(xs):
        h_UD, targets_U = xs
        logits_UV = jnp.einsum("UD,DV->UV", h_UD, w_head_DV, preferred_element_type=jnp.float32)
        target_logit_U = jnp.take_along_axis(logits_UV, targets_U[:, None], axis=-1)[:, 0]
        hit_U = jax.lax.stop_gradient(jnp.argmax(logits_UV, axis=-1) == targets_U)
        return jax.nn.logsumexp(logits_UV, axis=-1) - target_logit_U, hit_U

    nll_PU, hit_PU = jax.lax.map(chunk_stats, (h_PUD, targets_PU))
    return nll_PU.T.reshape(-1)[:M], hit_PU.T.reshape(-1)[:M]


def dspark_losses(hidden_BTZD, markov_BTZY, conf_BTZ, w_head_DV, w_markov_YV, tokens_BT, loss_mask_BT, chunk: int):
    """(mean over slots z of the masked mean NLL of t_{p+2+z}, masked mean confidence BCE): the DSpark
    loss (module docstring; models/dspark.py DSparkOutput gives hidden, markov and conf)."""
    B, T, Z, D = hidden_BTZD.shape
    feats_MW = jnp.concatenate([hidden_BTZD, markov_BTZY.astype(hidden_BTZD.dtype)], axis=-1).reshape(B * T * Z, -1)
    w_WV = jnp.concatenate([w_head_DV, w_markov_YV], axis=0)  # the Markov term is linear in E_M[out]
    targets, masks = zip(*(next_token_targets(tokens_BT, loss_mask_BT, z + 2) for z in range(Z)))
    mask_BTZ = jnp.stack(masks, axis=-1)
    targets_BTZ = jnp.where(mask_BTZ, jnp.stack(targets, axis=-1), 0)
    nll_M, hit_M = chunked_nll_and_hits(feats_MW, w_WV, targets_BTZ.reshape(-1), chunk)
    m_BTZ = mask_BTZ.astype(jnp.float32)
    per_slot_Z = (nll_M.reshape(B, T, Z) * m_BTZ).sum((0, 1)) / jnp.maximum(m_BTZ.sum((0, 1)), 1)
    conf_BTZ = conf_BTZ.astype(jnp.float32)  # BCE with logits: softplus(c) − y·c
    bce_BTZ = jax.nn.softplus(conf_BTZ) - hit_M.reshape(B, T, Z).astype(jnp.float32) * conf_BTZ
    return per_slot_Z.mean(), (bce_BTZ * m_BTZ).sum() / jnp.maximum(m_BTZ.sum(), 1)
