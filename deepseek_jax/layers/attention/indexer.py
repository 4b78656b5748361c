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
last R dims; w as above. Entry z is visible to t iff its block has ended (core.visible_entries).

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
from deepseek_jax.layers.attention.compressor import CSA_RATIO, Compressor, write_entries
from deepseek_jax.layers.attention.core import NEG_INF, over_query_blocks, visible_entries
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
    visible to t. Row-local in T (the caller runs q_block queries at a time)."""
    visible_BTZ = visible_entries(positions_BT, ik_BZY.shape[1], m)
    scores_BTZ = index_scores(iq_BTPY, ik_BZY, iw_BTP, visible_BTZ)
    idx_BTU, valid_BTU = select_topk(scores_BTZ, visible_BTZ, topk)
    return jnp.where(valid_BTU, idx_BTU, -1)


def csa_topk(indexer, x_BTD, c_q_BTQ, rope_BT, positions_BT, cache, start, *, sim, topk, q_block, dtype):
    """A CSA layer's selection: (top-k entries per query [B, T, U] (−1 = none), the indexer's keys
    [B, Z, Y] with this call's complete blocks written into the cache's, its compressor state).
    `indexer` is the layer's bound CSAIndexer, rope_BT its (cos, sin, inv_freq), `sim` the layer's
    quantisation hook at the indexer's cast point; scoring runs q_block queries at a time."""
    iq_BTPY, iw_BTP, ik_BZY, n_done, state = indexer(
        x_BTD, c_q_BTQ, rope_BT[0], rope_BT[1], None if cache is None else cache.index_state, start, rope_BT[2]
    )
    iq_BTPY, ik_BZY = sim(iq_BTPY), sim(ik_BZY)
    if cache is not None:
        ik_BZY = write_entries(cache.index_keys, ik_BZY, start // CSA_RATIO, n_done)
    ik_c_BZY = ik_BZY.astype(dtype)
    pick = lambda iq, iw, pos: select_entries(iq, ik_c_BZY, iw, pos, CSA_RATIO, topk)  # noqa: E731
    return over_query_blocks(pick, q_block, iq_BTPY, iw_BTP, positions_BT), ik_BZY, state


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


def mean_over_tokens(kl_BT: jax.Array, mask_BT: jax.Array | None) -> jax.Array:
    """Mean per-token KL over real tokens (mask_BT False = padding); the paper sums over t."""
    if mask_BT is None:
        return jnp.mean(kl_BT)
    return jnp.sum(jnp.where(mask_BT, kl_BT, 0.0)) / jnp.maximum(jnp.sum(mask_BT), 1)
