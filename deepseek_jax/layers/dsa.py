"""DeepSeek Sparse Attention (V3.2-Exp DSA): lightning indexer, top-k selection, sparse MLA, and the
indexer's KL training losses.

    q^I_t = RoPE½(c_q,t W^I_uq)  [P heads × Y]          k^I_s = RoPE½(LayerNorm(x_s W^I_k))  [Y]
    w_t = (x_t W^I_w) · P^-½ · Y^-½                      I[t, s] = Σ_p w_t,p · ReLU(q^I_t,p · k^I_s)
    S_t = TopK_s(I[t, s] over keys s visible to t),  |S_t| = U = min(index_topk, S)
    out_t = MLA attention of query t over the latent keys {(c_kv,s, k_rope,s) : s ∈ S_t} only

c_q is the MLA query latent RMSNorm(x W_dq), shared with the main attention (so DSA needs Q > 0).
RoPE½ rotates the *first* R = qk_rope_head_dim dims of q^I and k^I in the non-interleaved
(half-split) layout: DeepSeek's 2025-11-17 fix; the MLA RoPE stays interleaved. HF folds Y^-½
into the dot product before the ReLU; ReLU(a·y) = y·ReLU(a) for y > 0, so it moves into w_t here,
as in the official code. The official code also Hadamard-rotates q^I, k^I and FP8-quantises them
(one scale per Y-vector) for its `fp8_index` kernel, and round-trips c_kv through FP8 to mimic
its FP8 KV cache; the rotation is orthogonal, so scores are unchanged, and HF transformers 5.24
skips all three, as this float path does (no FP8 simulation). The indexer uses the MLA's RoPE
frequencies (YaRN included) and, as in HF, its cos/sin scale mscale/mscale_all_dim (1 as released).

Memory: the indexer scores are [B, T, S] by nature (and this XLA path forms the [B, T, P, S]
per-head products that the official kernel fuses). The attention is truly sparse: each query
gathers its U latent keys (C + R numbers each) and attends in latent space (MLA's MQA mode, as the
paper instantiates DSA), so no [T, S] logits or probabilities exist beyond the indexer's; the
gathered keys cost O(B·T·U·(C+R)). `index_q_block` = b runs both b queries at a time under remat
(O(B·b·S·P) + O(B·b·U·(C+R)) live); only the boolean [B, T, S] visibility mask stays whole.

Training (DSA paper §2.1): the target p_t is the main attention summed over heads, L1-normalised
over keys, with no gradient. Dense warm-up: attention stays dense, L_I = Σ_t KL(p_t ‖ softmax(I_t))
over all visible keys. Sparse stage: both are restricted to S_t and the indexer's inputs are
detached, so the indexer learns only from L_I and the main model only from the LM loss.

References: DeepSeek_V3_2.pdf §2; HF transformers 5.24 models/deepseek_v32/modeling_deepseek_v32.py
(`DeepseekV32Indexer`, `DeepseekV32Attention`); deepseek-ai/DeepSeek-V3.2-Exp inference/model.py
(`Indexer`, fixed RoPE in the HF repo's inference/).

Local letters: P indexer heads (`index_n_heads`), Y indexer head dim (`index_head_dim`),
U keys selected per query (min(`index_topk`, S)).
"""

import functools
from typing import NamedTuple

import flax.linen as nn
import jax
import jax.numpy as jnp

from deepseek_jax.axes import constrain, dense_init, param
from deepseek_jax.config import IndexerConfig  # defined with the other configs; importable from here
from deepseek_jax.layers.mla import MLA, NEG_INF, cache_mask, causal_mask, masked_softmax, mla_naive
from deepseek_jax.layers.norms import RMSNorm
from deepseek_jax.layers.rope import apply_rope, rope_cos_sin

INDEX_NORM_EPS = 1e-6  # k_norm LayerNorm epsilon, fixed in HF and the official code


class DSACache(NamedTuple):
    """Per-layer decode cache: MLA's latent cache plus the indexer's keys."""

    kv_latent: jax.Array  # [B, S, C], normed c_kv
    k_rope: jax.Array  # [B, S, R], rotated
    index_k: jax.Array  # [B, S, Y], normed and rotated indexer keys


# ----------------------------------------------------------------------------------------------
# Lightning indexer


def apply_rope_half(x: jax.Array, cos: jax.Array, sin: jax.Array) -> jax.Array:
    """Non-interleaved RoPE on x [..., R]: halves (a, b) -> (a cos − b sin, b cos + a sin);
    cos/sin broadcast to [..., R/2] (HF `rotate_half` with cos = cat(cos, cos))."""
    x32 = x.astype(jnp.float32)
    a, b = jnp.split(x32, 2, axis=-1)
    return jnp.concatenate([a * cos - b * sin, b * cos + a * sin], axis=-1).astype(x.dtype)


def layer_norm(x: jax.Array, scale: jax.Array, bias: jax.Array, eps: float) -> jax.Array:
    """(x − mean) / sqrt(var + eps) · scale + bias over the last axis [..., Y]; statistics in f32."""
    x32 = x.astype(jnp.float32)
    mean = jnp.mean(x32, axis=-1, keepdims=True)
    var = jnp.mean(jnp.square(x32 - mean), axis=-1, keepdims=True)
    normed = ((x32 - mean) * jax.lax.rsqrt(var + eps)).astype(x.dtype)
    return normed * scale.astype(x.dtype) + bias.astype(x.dtype)


def rope_leading(x: jax.Array, cos: jax.Array, sin: jax.Array) -> jax.Array:
    """RoPE½ on the first 2·cos.shape[-1] dims of x [..., Y] (layout [rope | nope])."""
    R = 2 * cos.shape[-1]
    return jnp.concatenate([apply_rope_half(x[..., :R], cos, sin), x[..., R:]], axis=-1)


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


class LayerNorm(nn.Module):
    dim: int  # size of the normalised (last) axis
    eps: float = INDEX_NORM_EPS
    axis_name: str = "head_dim"  # logical name of the scale and bias vectors
    dtype: jnp.dtype = jnp.bfloat16

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        scale = param(self, "scale", (self.axis_name,), (self.dim,), nn.initializers.ones)
        bias = param(self, "bias", (self.axis_name,), (self.dim,), nn.initializers.zeros)
        return layer_norm(x.astype(self.dtype), scale, bias, self.eps)


class Indexer(nn.Module):
    """The lightning indexer's projections: queries, keys and per-head weights of I[t, s]."""

    cfg: IndexerConfig
    dim: int  # D
    q_lora_rank: int  # Q
    dtype: jnp.dtype = jnp.bfloat16

    @nn.compact
    def __call__(self, x_BTD, c_q_BTQ, cos_BTr, sin_BTr) -> tuple[jax.Array, jax.Array, jax.Array]:
        """q [B, T, P, Y] and k [B, T, Y], rotated; w [B, T, P] in f32 with P^-½ · Y^-½ folded in."""
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


# ----------------------------------------------------------------------------------------------
# Sparse MLA and the indexer losses


def gather_keys(x_BSX: jax.Array, idx_BTU: jax.Array) -> jax.Array:
    """[B, T, U, X]: per query, the rows of x at its selected key slots (X any trailing size)."""
    return jax.vmap(lambda x_SX, idx_TU: x_SX[idx_TU])(x_BSX, idx_BTU)


def mla_sparse(
    q_nope_BTNH,
    q_rope_BTNR,
    kv_latent_BSC,
    k_rope_BSR,
    w_uk_CNH,
    w_uv_CNO,
    idx_BTU,
    valid_BTU,
    scale,
) -> tuple[jax.Array, jax.Array]:
    """MLA in latent space over each query's selected keys only: (out [B, T, N, O], probs [B, T, N, U]).
    Same math as `mla_absorbed`, with [B, S] keys replaced by the gathered [B, T, U] ones."""
    f32 = jnp.float32
    kv_latent_BTUC = gather_keys(kv_latent_BSC, idx_BTU)
    k_rope_BTUR = gather_keys(k_rope_BSR, idx_BTU)
    q_latent_BTNC = jnp.einsum("BTNH,CNH->BTNC", q_nope_BTNH, w_uk_CNH)
    logits_BTNU = jnp.einsum(
        "BTNC,BTUC->BTNU", q_latent_BTNC, kv_latent_BTUC, preferred_element_type=f32
    )
    logits_BTNU += jnp.einsum(
        "BTNR,BTUR->BTNU", q_rope_BTNR, k_rope_BTUR, preferred_element_type=f32
    )
    probs_BTNU = masked_softmax(logits_BTNU * scale, valid_BTU)
    ctx_BTNC = jnp.einsum(
        "BTNU,BTUC->BTNC", probs_BTNU.astype(kv_latent_BTUC.dtype), kv_latent_BTUC
    )
    return jnp.einsum("BTNC,CNO->BTNO", ctx_BTNC, w_uv_CNO), probs_BTNU


def mla_probs(
    q_nope_BTNH, q_rope_BTNR, kv_latent_BSC, k_rope_BSR, w_uk_CNH, mask_BTS, scale
) -> jax.Array:
    """Dense MLA attention probabilities [B, T, N, S] (f32), the dense warm-up's KL target."""
    f32 = jnp.float32
    q_latent_BTNC = jnp.einsum("BTNH,CNH->BTNC", q_nope_BTNH, w_uk_CNH)
    logits_BTNS = jnp.einsum(
        "BTNC,BSC->BTNS", q_latent_BTNC, kv_latent_BSC, preferred_element_type=f32
    )
    logits_BTNS += jnp.einsum("BTNR,BSR->BTNS", q_rope_BTNR, k_rope_BSR, preferred_element_type=f32)
    return masked_softmax(logits_BTNS * scale, mask_BTS)


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


def dsa_attention(queries, keys, index_qw, w_ukv, mask_BTS, scale, *, topk, dense, with_loss):
    """Indexer scores, then top-k sparse (or, in the dense warm-up, dense) MLA attention.

    queries = (q_nope [B,T,N,H], q_rope [B,T,N,R]), keys = (kv_latent [B,S,C], k_rope [B,S,R],
    index_k [B,S,Y]), index_qw = (index_q [B,T,P,Y], index_w [B,T,P]), w_ukv = (w_uk, w_uv).
    Returns out [B, T, N, O], the selected slots [B, T, U] (-1 = none; None when dense) and the
    per-query indexer KL [B, T] (None unless with_loss). Row-local in T: see over_query_blocks.
    """
    (q_nope_BTNH, q_rope_BTNR), (kv_latent_BSC, k_rope_BSR, ik_BSY) = queries, keys
    (iq_BTPY, iw_BTP), (w_uk_CNH, w_uv_CNO) = index_qw, w_ukv
    with jax.named_scope("indexer"):
        scores_BTS = index_scores(iq_BTPY, ik_BSY, iw_BTP, mask_BTS)
    attn = (q_nope_BTNH, q_rope_BTNR, kv_latent_BSC, k_rope_BSR, w_uk_CNH)
    if dense:
        out_BTNO = mla_naive(*attn, w_uv_CNO, mask_BTS, scale)
        probs_BTNS = mla_probs(*attn, mask_BTS, scale) if with_loss else None
        kl_BT = indexer_loss_dense(probs_BTNS, scores_BTS, mask_BTS) if with_loss else None
        return out_BTNO, None, kl_BT
    idx_BTU, valid_BTU = select_topk(scores_BTS, mask_BTS, topk)
    with jax.named_scope("sparse_attention"):
        out_BTNO, probs_BTNU = mla_sparse(*attn, w_uv_CNO, idx_BTU, valid_BTU, scale)
    kl_BT = indexer_loss_sparse(probs_BTNU, scores_BTS, idx_BTU, valid_BTU) if with_loss else None
    return out_BTNO, jnp.where(valid_BTU, idx_BTU, -1), kl_BT


def over_query_blocks(fn, block: int, *args_BT):
    """fn(*args_BT) computed `block` queries (axis 1 of every arg) at a time, each block under remat,
    so only one block's [block, S] scores and [block, U] gathered keys are live, forward and
    backward. fn must be row-local in T (every output's axis 1 is T); block 0 = all at once.
    A ragged last block is padded with fully masked queries (finite, then dropped)."""
    T = args_BT[0].shape[1]
    if block == 0 or block >= T:
        return fn(*args_BT)
    n = -(-T // block)

    def split(a):  # [B, T, ...] -> [n, B, block, ...]
        a = jnp.pad(a, [(0, 0), (0, n * block - T)] + [(0, 0)] * (a.ndim - 2))
        return jnp.moveaxis(a.reshape(a.shape[0], n, block, *a.shape[2:]), 1, 0)

    def merge(a):  # [n, B, block, ...] -> [B, T, ...]
        return jnp.moveaxis(a, 0, 1).reshape(a.shape[1], n * block, *a.shape[3:])[:, :T]

    out = jax.lax.map(jax.checkpoint(lambda xs: fn(*xs)), tuple(split(a) for a in args_BT))
    return jax.tree.map(merge, out)


# ----------------------------------------------------------------------------------------------
# The MLA module with DSA


def cache_write(cache: DSACache, kv_latent_BTC, k_rope_BTR, index_k_BTY, index) -> DSACache:
    """Writes T new entries at slots [index, index + T) of each of the cache's arrays."""
    new = (kv_latent_BTC, k_rope_BTR, index_k_BTY)
    return DSACache(
        *(
            jax.lax.dynamic_update_slice_in_dim(c, n.astype(c.dtype), index, 1)
            for c, n in zip(cache, new)
        )
    )


class SparseMLA(MLA):
    """MLA whose queries attend only to the indexer's top-k keys. Parameters: MLA's (same names,
    shapes and axes, q_lora path only) plus `indexer/*`. Returns (out, cache, indexer KL or None)."""

    index: IndexerConfig | None = None  # required; a default only because MLA's fields have them

    def project(self, x_BTD, cos_BTr, sin_BTr):
        """c_q, q_nope, q_rope (rotated), kv_latent, k_rope (rotated): MLA's projections."""
        c, D, N, K = self.cfg, self.dim, self.cfg.n_heads, self.cfg.qk_head_dim
        Q, C, R = c.q_lora_rank, c.kv_lora_rank, c.qk_rope_head_dim
        w_dq_DQ = param(self, "w_dq", ("embed", "q_latent"), (D, Q), dense_init([0], [1]))
        w_uq_QNK = param(
            self, "w_uq", ("q_latent", "heads", "head_dim"), (Q, N, K), dense_init([0], [1, 2])
        )
        c_q_BTQ = jnp.einsum("BTD,DQ->BTQ", x_BTD, w_dq_DQ.astype(self.dtype))
        c_q_BTQ = RMSNorm(Q, self.norm_eps, "q_latent", self.dtype, name="q_norm")(c_q_BTQ)
        q_BTNK = jnp.einsum("BTQ,QNK->BTNK", c_q_BTQ, w_uq_QNK.astype(self.dtype))
        q_rope_BTNR = apply_rope(
            q_BTNK[..., c.qk_nope_head_dim :], cos_BTr[:, :, None], sin_BTr[:, :, None]
        )
        w_dkv_DC = param(self, "w_dkv", ("embed", "kv_latent"), (D, C + R), dense_init([0], [1]))
        kv_BTC = jnp.einsum("BTD,DC->BTC", x_BTD, w_dkv_DC.astype(self.dtype))
        kv_latent_BTC = RMSNorm(C, self.norm_eps, "kv_latent", self.dtype, name="kv_norm")(
            kv_BTC[..., :C]
        )
        k_rope_BTR = apply_rope(kv_BTC[..., C:], cos_BTr, sin_BTr)
        return c_q_BTQ, q_BTNK[..., : c.qk_nope_head_dim], q_rope_BTNR, kv_latent_BTC, k_rope_BTR

    def head_weights(self):
        """w_uk [C, N, H], w_uv [C, N, O] (compute dtype) and w_o [N, O, D] (f32), as in MLA."""
        c, N, C = self.cfg, self.cfg.n_heads, self.cfg.kv_lora_rank
        H, O, head_init = c.qk_nope_head_dim, c.v_head_dim, dense_init([0], [1, 2])
        w_uk_CNH = param(self, "w_uk", ("kv_latent", "heads", "head_dim"), (C, N, H), head_init)
        w_uv_CNO = param(self, "w_uv", ("kv_latent", "heads", "head_dim"), (C, N, O), head_init)
        w_o_NOD = param(
            self, "w_o", ("heads", "head_dim", "embed"), (N, O, self.dim), dense_init([0, 1], [2])
        )
        return w_uk_CNH.astype(self.dtype), w_uv_CNO.astype(self.dtype), w_o_NOD

    @nn.compact
    def __call__(
        self,
        x_BTD: jax.Array,
        positions_BT: jax.Array,
        segment_ids_BT: jax.Array | None = None,
        cache: DSACache | None = None,
        cache_index: jax.Array | int = 0,
        cache_start_B: jax.Array | None = None,
        indexer_loss: bool = False,
    ) -> tuple[jax.Array, DSACache | None, jax.Array | None]:
        """indexer_loss: also return the layer's mean per-token indexer KL (else None)."""
        c, ic = self.cfg, self.index
        assert ic is not None, "SparseMLA needs an IndexerConfig"
        ic.check_against(c.q_lora_rank, c.qk_rope_head_dim)
        B, T, _ = x_BTD.shape
        x_BTD = constrain(x_BTD.astype(self.dtype), ("act_batch", "act_seq", "act_embed"))
        inv_freq, cos_scale, scale = self.setup_rope()
        cos_BTr, sin_BTr = rope_cos_sin(positions_BT, inv_freq, cos_scale)  # the indexer's too (HF)
        c_q_BTQ, q_nope_BTNH, q_rope_BTNR, kv_latent_BTC, k_rope_BTR = self.project(
            x_BTD, cos_BTr, sin_BTr
        )
        # Sparse stage: the indexer learns only from its KL (paper §2.1), so its inputs are detached.
        detach = (lambda a: a) if ic.index_dense_warmup else jax.lax.stop_gradient
        indexer = Indexer(ic, self.dim, c.q_lora_rank, self.dtype, name="indexer")
        iq_BTPY, ik_BTY, iw_BTP = indexer(detach(x_BTD), detach(c_q_BTQ), cos_BTr, sin_BTr)
        w_uk_CNH, w_uv_CNO, w_o_NOD = self.head_weights()

        if cache is None:  # training / full forward
            mask_BTS, keys = causal_mask(segment_ids_BT, B, T), (kv_latent_BTC, k_rope_BTR, ik_BTY)
        else:  # decoding: append to the cache, attend over its slots
            cache = cache_write(cache, kv_latent_BTC, k_rope_BTR, ik_BTY, cache_index)
            mask_BTS = cache_mask(B, T, cache.kv_latent.shape[1], cache_index, cache_start_B)
            keys = tuple(a.astype(self.dtype) for a in cache)
        core = functools.partial(
            dsa_attention, keys=keys, w_ukv=(w_uk_CNH, w_uv_CNO), scale=scale, topk=ic.index_topk,
            dense=ic.index_dense_warmup, with_loss=indexer_loss,
        )  # fmt: skip
        out_BTNO, idx_BTU, kl_BT = over_query_blocks(
            lambda qn, qr, iq, iw, m: core((qn, qr), index_qw=(iq, iw), mask_BTS=m),
            ic.index_q_block, q_nope_BTNH, q_rope_BTNR, iq_BTPY, iw_BTP, mask_BTS,
        )  # fmt: skip
        if idx_BTU is not None:
            self.sow("intermediates", "index_topk_BTU", idx_BTU)
        real_BT = None if segment_ids_BT is None else segment_ids_BT > 0  # segment 0 = padding
        kl = None if kl_BT is None else mean_over_tokens(kl_BT, real_BT)
        out_BTNO = constrain(out_BTNO, ("act_batch", "act_seq", "act_heads", None))
        return jnp.einsum("BTNO,NOD->BTD", out_BTNO, w_o_NOD.astype(self.dtype)), cache, kl
