"""Lightning indexers (V3.2 DSA, V4 CSA): which keys each query attends to, and the indexer's KL
training losses.

    I[t, s] = Σ_p w_t,p · ReLU(q^I_t,p · k^I_s)      S_t = TopK_s(I[t, s] over keys s visible to t)

DSA (V3.2-Exp, `DSAIndexer`): keys are the tokens themselves,
    q^I_t = RoPE½(c_q,t W^I_uq)  [P heads × Y]          k^I_s = RoPE½(LayerNorm(x_s W^I_k))  [Y]
    w_t = (x_t W^I_w) · P^-½ · Y^-½,   |S_t| = U = min(index_topk, S)
c_q is the MLA query latent RMSNorm(x W_dq), shared with the main attention (so DSA needs Q > 0).
RoPE½ rotates the *first* R = qk_rope_head_dim dims of q^I and k^I in the non-interleaved
(half-split) layout: DeepSeek's 2025-11-17 fix; the MLA RoPE stays interleaved. HF folds Y^-½
into the dot product before the ReLU; ReLU(a·y) = y·ReLU(a) for y > 0, so it moves into w_t here,
as in the official code. The official code also Hadamard-rotates q^I, k^I and FP8-quantises them
(one scale per Y-vector) for its `fp8_index` kernel, and round-trips c_kv through FP8 to mimic
its FP8 KV cache; the rotation is orthogonal, so scores are unchanged, and HF transformers 5.24
skips all three, as this float path does (no FP8 simulation). The indexer uses the MLA's RoPE
frequencies (YaRN included) and, as in HF, its cos/sin scale mscale/mscale_all_dim (1 as released).

CSA (V4, `CSAIndexer`; reference notes §1.6): keys are compressed entries of a second compressor
at width Y over the CSA blocks (compressor.py); q^I = RoPE_t(c_q W^I_uq), RoPE interleaved on the
last R dims; w as above. Entry z is visible to t iff its block has ended (and, with packed
documents, lies in t's document: compressor.entry_visible); the top-k streams over chunks of
entries (`entry_picks`). Training (ours): `entry_kl`, the sparse-stage KL below on the picks.

Training (DSA paper §2.1): the target p_t is the main attention summed over heads, L1-normalised
over keys, with no gradient. Dense warm-up: L_I = Σ_t KL(p_t ‖ softmax(I_t)) over all visible
keys. Sparse stage: both are restricted to S_t (mla.py detaches the indexer's inputs).

References: DeepSeek_V3_2.pdf §2; HF transformers 5.24 models/deepseek_v32/modeling_deepseek_v32.py
(`DeepseekV32Indexer`) and models/deepseek_v4/modeling_deepseek_v4.py (`DeepseekV4Indexer`);
deepseek-ai/DeepSeek-V3.2-Exp and DeepSeek-V4-Flash inference/model.py (`Indexer`).

Letters: P indexer heads (`index_n_heads`), Y indexer head dim (`index_head_dim`), S keys (Z for
compressed entries), U keys selected per query, X keys in the KL (S or U), N attention heads.
"""

import flax.linen as nn
import jax
import jax.numpy as jnp

from deepseek_jax.axes import dense_init, param
from deepseek_jax.config import IndexerConfig, V4AttentionConfig
from deepseek_jax.layers.attention import stream
from deepseek_jax.layers.attention.compressor import CSA_RATIO, Compressor, entry_visible, write_entries
from deepseek_jax.layers.attention.core import NEG_INF, gather_keys, visible_count, visible_entries
from deepseek_jax.layers.norms import LayerNorm
from deepseek_jax.layers.rope import rope_leading, rope_tail
from deepseek_jax.quant import sim_act, sim_weight

INDEX_NORM_EPS = 1e-6  # the DSA k_norm LayerNorm epsilon, fixed in HF and the official code


def index_scores(
    q_BTPY: jax.Array, k_BSY: jax.Array, w_BTP: jax.Array, mask_BTS: jax.Array
) -> jax.Array:
    """I[t, s] = Σ_p w_t,p · ReLU(q_t,p · k_s) in f32, NEG_INF where s is not visible to t."""
    f32 = jnp.float32
    dots_BTPS = jnp.einsum("BTPY,BSY->BTPS", q_BTPY, k_BSY, preferred_element_type=f32)
    scores_BTS = jnp.einsum("BTPS,BTP->BTS", jax.nn.relu(dots_BTPS), w_BTP.astype(f32))
    return jnp.where(mask_BTS, scores_BTS, NEG_INF)


def chunk_scores(q_BTPY: jax.Array, k_BKY: jax.Array, w_BTP: jax.Array) -> jax.Array:
    """I[t, k] = Σ_p w_t,p · ReLU(q_t,p · k_k) [B, T, K] in f32 for one chunk of keys, heads summed
    inside the chunk (never a [B, T, P, S] array)."""
    f32 = jnp.float32
    dots_BTPK = jnp.einsum("BTPY,BKY->BTPK", q_BTPY, k_BKY, preferred_element_type=f32)
    return jnp.einsum("BTPK,BTP->BTK", jax.nn.relu(dots_BTPK), w_BTP.astype(f32))


def streamed_topk(q_BTPY, w_BTP, k_BSY, visible_fn, topk: int, k_block: int, needed=None) -> jax.Array:
    """The top-min(topk, S) keys [B, T, U] by I[t, s] among those visible_fn(s_K) -> [B, T, K] (bool)
    allows (−1 = none), keys scored k_block at a time with a running top-k (stream.running_topk): the
    same picks as `select_topk` over a whole [B, T, S] score array, ties to the lower slot included."""
    B, T = w_BTP.shape[:2]

    def score(s_K, live_K, k_BKY):
        return jnp.where(visible_fn(s_K), chunk_scores(q_BTPY, k_BKY, w_BTP), -jnp.inf)

    return stream.running_topk(score, topk, k_block, (k_BSY,), (B, T), needed)


def scores_at(q_BTPY: jax.Array, w_BTP: jax.Array, k_BSY: jax.Array, idx_BTU: jax.Array) -> jax.Array:
    """I[t, idx[t, u]] [B, T, U] f32, recomputed on the selected keys only (differentiable in q, w and
    k; slots −1 read key 0, the caller masks them)."""
    k_BTUY = gather_keys(k_BSY, jnp.maximum(idx_BTU, 0))
    dots_BTPU = jnp.einsum("BTPY,BTUY->BTPU", q_BTPY, k_BTUY, preferred_element_type=jnp.float32)
    return jnp.einsum("BTPU,BTP->BTU", jax.nn.relu(dots_BTPU), w_BTP.astype(jnp.float32))


def select_topk(
    scores_BTS: jax.Array, mask_BTS: jax.Array, topk: int
) -> tuple[jax.Array, jax.Array]:
    """Indices [B, T, U] of the U = min(topk, S) best keys per query, and whether each is visible:
    a query with fewer than U visible keys gets them all plus masked fillers flagged False."""
    U = min(topk, scores_BTS.shape[-1])
    _, idx_BTU = jax.lax.top_k(jnp.where(mask_BTS, scores_BTS, NEG_INF), U)
    return idx_BTU, jnp.take_along_axis(mask_BTS, idx_BTU, axis=-1)


def select_entries(iq_BTPY, ik_BZY, iw_BTP, positions_BT, m: int, topk: int) -> jax.Array:
    """The CSA indexer's top-k compressed entries [B, T, U] per query (−1 = none), among those
    visible to t, from a whole [B, T, Z] score array: the small-T reference of `entry_picks`."""
    visible_BTZ = visible_entries(positions_BT, ik_BZY.shape[1], m)
    scores_BTZ = index_scores(iq_BTPY, ik_BZY, iw_BTP, visible_BTZ)
    idx_BTU, valid_BTU = select_topk(scores_BTZ, visible_BTZ, topk)
    return jnp.where(valid_BTU, idx_BTU, -1)


def entry_picks(iq_BTPY, iw_BTP, ik_BZY, positions_BT, seg_BT, eseg_BZ, *, topk: int, k_block: int):
    """The CSA indexer's top-k entries [B, T, U] (−1 = none) among those visible to each query
    (compressor.entry_visible: block ended, same document), scored k_block entries at a time with a
    running top-k (no [T, Z] array; chunks past the block's last position skipped): exactly
    `select_entries`' picks. Row-local in T; ik is key-side (over_query_blocks' keys)."""
    if ik_BZY.shape[1] == 0:  # a cache shorter than one block holds no entries
        return jnp.full((*positions_BT.shape, 0), -1, jnp.int32)
    visible = lambda s_K: entry_visible(s_K, positions_BT, seg_BT, eseg_BZ, CSA_RATIO)  # noqa: E731
    needed = lambda s_K: s_K[0] < jnp.max(visible_count(positions_BT, CSA_RATIO))  # noqa: E731
    return streamed_topk(iq_BTPY, iw_BTP, ik_BZY, visible, topk, k_block, needed)


def entry_kl(probs_BTNU: jax.Array, iq_BTPY, iw_BTP, ik_BZY, picks_BTU: jax.Array) -> jax.Array:
    """V4 CSA indexer KL [B, T] (ours, the V3.2 sparse stage on compressed entries): the main
    attention's probabilities on the picked entries (heads summed, renormalised over the picks, no
    gradient) against the softmax of the indexer's scores recomputed at the picks (`scores_at`)."""
    return indexer_kl(probs_BTNU, scores_at(iq_BTPY, iw_BTP, ik_BZY, picks_BTU), picks_BTU >= 0)


def csa_index(indexer, x_BTD, c_q_BTQ, rope_BT, cache, start, *, sim):
    """A CSA layer's indexer tensors: q [B, T, P, Y], w [B, T, P], keys [B, Z, Y] (this call's
    complete blocks written into the cache's) and its compressor state. `indexer` is the layer's
    bound CSAIndexer, rope_BT its (cos, sin, inv_freq), `sim` the quantisation hook at the indexer's
    cast point. Its inputs are detached: the top-k passes no gradient, so the indexer learns only
    from `entry_kl` (as V3.2's sparse stage) and the KL trains nothing else."""
    x_BTD, c_q_BTQ = jax.lax.stop_gradient(x_BTD), jax.lax.stop_gradient(c_q_BTQ)
    iq_BTPY, iw_BTP, ik_BZY, n_done, state = indexer(
        x_BTD, c_q_BTQ, rope_BT[0], rope_BT[1], None if cache is None else cache.index_state, start, rope_BT[2]
    )
    iq_BTPY, ik_BZY = sim(iq_BTPY), sim(ik_BZY)
    if cache is not None:
        ik_BZY = write_entries(cache.index_keys, ik_BZY, start // CSA_RATIO, n_done)
    return iq_BTPY, iw_BTP, ik_BZY, state


class DSAIndexer(nn.Module):
    """The V3.2 lightning indexer's projections: queries, keys and per-head weights of I[t, s]."""

    cfg: IndexerConfig
    dim: int  # D
    q_lora_rank: int  # Q
    dtype: jnp.dtype = jnp.bfloat16

    @nn.compact
    def __call__(self, x_BTD, c_q_BTQ, cos_BTr, sin_BTr) -> tuple[jax.Array, jax.Array, jax.Array]:
        """q [B, T, P, Y] and k [B, T, Y], rotated; w [B, T, P] f32 with P^-½ · Y^-½ folded in."""
        c, D, Q = self.cfg, self.dim, self.q_lora_rank
        P, Y = c.index_n_heads, c.index_head_dim
        w_uq_QPY = param(
            self, "w_uq", ("q_latent", "heads", "head_dim"), (Q, P, Y), dense_init([0], [1, 2])
        )
        w_k_DY = param(self, "w_k", ("embed", "head_dim"), (D, Y), dense_init([0], [1]))
        w_weights_DP = param(self, "w_weights", ("embed", "heads"), (D, P), dense_init([0], [1]))
        q_BTPY = jnp.einsum(
            "BTQ,QPY->BTPY", c_q_BTQ.astype(self.dtype), w_uq_QPY.astype(self.dtype)
        )
        k_BTY = jnp.einsum("BTD,DY->BTY", x_BTD.astype(self.dtype), w_k_DY.astype(self.dtype))
        k_BTY = LayerNorm(Y, INDEX_NORM_EPS, "head_dim", self.dtype, name="k_norm")(k_BTY)
        q_BTPY = rope_leading(q_BTPY, cos_BTr[:, :, None], sin_BTr[:, :, None])
        k_BTY = rope_leading(k_BTY, cos_BTr, sin_BTr)
        # head weights stay f32, as HF keeps `weights_proj` in f32 (`_keep_in_fp32_modules`)
        w_BTP = jnp.einsum("BTD,DP->BTP", x_BTD.astype(jnp.float32), w_weights_DP) * (P * Y) ** -0.5
        return q_BTPY, k_BTY, w_BTP


class CSAIndexer(nn.Module):
    """The V4 lightning indexer's queries, head weights and compressed keys (CSA layers)."""

    cfg: V4AttentionConfig
    dim: int  # D
    norm_eps: float = 1e-6
    dtype: jnp.dtype = jnp.bfloat16
    quant_sim: str = "none"  # FP8 simulation of W^I_uq and its input c_q (quant.py)

    @nn.compact
    def __call__(self, x_BTD, c_q_BTQ, cos_BTr, sin_BTr, state, start, inv_freq):
        """q [B, T, P, Y] (rotated at t), w [B, T, P] f32 with (P·Y)^-½ folded in, and the
        compressor's (keys [B, Z, Y], n_done, state)."""
        c, D = self.cfg, self.dim
        P, Y, Q = c.index_n_heads, c.index_head_dim, c.q_lora_rank
        w_uq_QPY = param(
            self, "w_uq", ("q_latent", "heads", "head_dim"), (Q, P, Y), dense_init([0], [1, 2])
        )
        w_weights_DP = param(self, "w_weights", ("embed", "heads"), (D, P), dense_init([0], [1]))
        w_uq_QPY = sim_weight(w_uq_QPY, self.quant_sim).astype(self.dtype)
        q_BTPY = jnp.einsum("BTQ,QPY->BTPY", sim_act(c_q_BTQ, self.quant_sim), w_uq_QPY)
        q_BTPY = rope_tail(q_BTPY, cos_BTr[:, :, None], sin_BTr[:, :, None])
        # ReLU(a)·Y^-½ = ReLU(a·Y^-½): HF's scale on the dot product moves into w (as official)
        w_BTP = jnp.einsum("BTD,DP->BTP", x_BTD.astype(jnp.float32), w_weights_DP) * (P * Y) ** -0.5
        keys = Compressor(CSA_RATIO, Y, D, self.norm_eps, self.dtype, name="compressor")(
            x_BTD, state, start, inv_freq
        )
        return q_BTPY, w_BTP, *keys


# ----------------------------------------------------------------------------------------------
# The indexer KL losses (DSA paper §2.1)


def indexer_kl(attn_probs_BTNX: jax.Array, scores_BTX: jax.Array, mask_BTX: jax.Array) -> jax.Array:
    """Per-query KL(p ‖ softmax(I)) [B, T] over the keys X where mask is True; p = the attention
    summed over heads, L1-normalised, with no gradient (DSA paper §2.1)."""
    f32 = jnp.float32
    p_BTX = jnp.where(mask_BTX, jax.lax.stop_gradient(attn_probs_BTNX.astype(f32)).sum(2), 0.0)
    p_BTX = p_BTX / jnp.maximum(p_BTX.sum(-1, keepdims=True), jnp.finfo(f32).tiny)
    log_q_BTX = jax.nn.log_softmax(jnp.where(mask_BTX, scores_BTX.astype(f32), NEG_INF), axis=-1)
    terms_BTX = jax.scipy.special.xlogy(p_BTX, p_BTX) - p_BTX * log_q_BTX
    return jnp.sum(jnp.where(mask_BTX, terms_BTX, 0.0), axis=-1)


def indexer_loss_dense(attn_probs_BTNS, scores_BTS, mask_BTS) -> jax.Array:
    """Dense warm-up KL [B, T]: target and indexer distribution over all visible keys."""
    return indexer_kl(attn_probs_BTNS, scores_BTS, mask_BTS)


def indexer_loss_sparse(attn_probs_BTNU, scores_BTS, idx_BTU, valid_BTU) -> jax.Array:
    """Sparse-stage KL [B, T] over the selected set: the sparse attention's probabilities (already
    restricted to S_t) against the softmax of the indexer scores gathered at S_t."""
    return indexer_kl(attn_probs_BTNU, jnp.take_along_axis(scores_BTS, idx_BTU, axis=-1), valid_BTU)


def kl_chunk(logits_BTNK, lse_BTN, scores_BTK, lse_BT, visible_BTK) -> jax.Array:
    """One key chunk's share [B, T] of the dense warm-up KL, Σ_k p_k (log p_k − log q_k) over its
    visible keys: p_k = mean_h exp(logits_h,k − lse_h), the main attention with each head's
    log-sum-exp over ALL visible keys (no gradient), and log q_k = I_k − lse_I, lse_I the indexer
    scores' log-sum-exp over all visible keys. Summed over every chunk: `indexer_kl` over all keys."""
    f32 = jnp.float32
    lse_BTN1 = jax.lax.stop_gradient(lse_BTN.astype(f32))[..., None]
    logits_BTNK = jnp.where(visible_BTK[:, :, None], jax.lax.stop_gradient(logits_BTNK.astype(f32)), lse_BTN1)
    p_BTK = jnp.where(visible_BTK, jnp.exp(logits_BTNK - lse_BTN1).mean(2), 0.0)
    log_q_BTK = jnp.where(visible_BTK, scores_BTK.astype(f32) - lse_BT[..., None], 0.0)
    terms_BTK = jax.scipy.special.xlogy(p_BTK, p_BTK) - p_BTK * log_q_BTK
    return jnp.sum(jnp.where(visible_BTK, terms_BTK, 0.0), axis=-1)


def mean_over_tokens(kl_BT: jax.Array, mask_BT: jax.Array | None) -> jax.Array:
    """Mean per-token KL over real tokens (mask_BT False = padding); the paper sums over t."""
    if mask_BT is None:
        return jnp.mean(kl_BT)
    return jnp.sum(jnp.where(mask_BT, kl_BT, 0.0)) / jnp.maximum(jnp.sum(mask_BT), 1)
