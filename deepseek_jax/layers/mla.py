"""Multi-head Latent Attention (DeepSeek-V2 §2.1, V3 §2.1.1), naive and absorbed.

    c_q = RMSNorm(x W_dq)            [q_nope; q_rope] = c_q W_uq      (or x W_q when Q = 0)
    [c_kv; k_rope] = x W_dkv          c_kv <- RMSNorm(c_kv)
    k_nope = c_kv W_uk   v = c_kv W_uv   (per head)      k_rope = RoPE(k_rope), shared by all heads
    out = softmax((q_nope·k_nope + q_rope·k_rope) * scale) v W_o

The naive path builds per-head keys and values (training). The absorbed path folds W_uk into the
query and W_uv after the softmax, so attention runs in the latent space and a decode cache holds
only c_kv and k_rope per token: C + R numbers instead of N(H + R + O).
Reference: deepseek-ai/DeepSeek-V3 inference/model.py `MLA` (`attn_impl` naive | absorb).
"""

from typing import NamedTuple

import flax.linen as nn
import jax
import jax.numpy as jnp

from deepseek_jax.axes import constrain, dense_init, param
from deepseek_jax.config import MLAConfig, RopeConfig
from deepseek_jax.layers.norms import RMSNorm
from deepseek_jax.layers.rope import apply_rope, rope_cos_sin, yarn_inv_freq, yarn_mscale

NEG_INF = -1e30  # finite, so a fully masked row never turns into NaN


class LatentCache(NamedTuple):
    """Per-layer decode cache: what the absorbed path needs of every past token."""

    kv_latent: jax.Array  # [B, S, C], normed c_kv
    k_rope: jax.Array  # [B, S, R], rotated


def masked_softmax(logits_BTNS: jax.Array, mask_BTS: jax.Array) -> jax.Array:
    """Softmax over S in float32 with disallowed keys removed."""
    logits_BTNS = jnp.where(mask_BTS[:, :, None, :], logits_BTNS.astype(jnp.float32), NEG_INF)
    return jax.nn.softmax(logits_BTNS, axis=-1)


def causal_mask(segment_ids_BT: jax.Array | None, B: int, T: int) -> jax.Array:
    """[B, T, S=T]: key s is visible to query t if s <= t and both lie in the same document."""
    mask_TS = jnp.tril(jnp.ones((T, T), jnp.bool_))
    if segment_ids_BT is None:
        return jnp.broadcast_to(mask_TS, (B, T, T))
    return mask_TS & (segment_ids_BT[:, :, None] == segment_ids_BT[:, None, :])


def mla_naive(q_nope_BTNH, q_rope_BTNR, kv_latent_BSC, k_rope_BSR, w_uk_CNH, w_uv_CNO, mask_BTS, scale):
    """Attention with materialised per-head keys and values; returns [B, T, N, O]."""
    k_nope_BSNH = jnp.einsum("BSC,CNH->BSNH", kv_latent_BSC, w_uk_CNH)
    v_BSNO = jnp.einsum("BSC,CNO->BSNO", kv_latent_BSC, w_uv_CNO)
    f32 = jnp.float32
    logits_BTNS = jnp.einsum("BTNH,BSNH->BTNS", q_nope_BTNH, k_nope_BSNH, preferred_element_type=f32)
    logits_BTNS += jnp.einsum("BTNR,BSR->BTNS", q_rope_BTNR, k_rope_BSR, preferred_element_type=f32)
    probs_BTNS = masked_softmax(logits_BTNS * scale, mask_BTS).astype(v_BSNO.dtype)
    return jnp.einsum("BTNS,BSNO->BTNO", probs_BTNS, v_BSNO)


def mla_absorbed(q_nope_BTNH, q_rope_BTNR, kv_latent_BSC, k_rope_BSR, w_uk_CNH, w_uv_CNO, mask_BTS, scale):
    """The same attention computed in latent space: q·k = (W_ukᵀ q_nope)·c + q_rope·k_rope."""
    f32 = jnp.float32
    q_latent_BTNC = jnp.einsum("BTNH,CNH->BTNC", q_nope_BTNH, w_uk_CNH)
    logits_BTNS = jnp.einsum("BTNC,BSC->BTNS", q_latent_BTNC, kv_latent_BSC, preferred_element_type=f32)
    logits_BTNS += jnp.einsum("BTNR,BSR->BTNS", q_rope_BTNR, k_rope_BSR, preferred_element_type=f32)
    probs_BTNS = masked_softmax(logits_BTNS * scale, mask_BTS).astype(kv_latent_BSC.dtype)
    ctx_BTNC = jnp.einsum("BTNS,BSC->BTNC", probs_BTNS, kv_latent_BSC)
    return jnp.einsum("BTNC,CNO->BTNO", ctx_BTNC, w_uv_CNO)


def cache_write(cache: LatentCache, kv_latent_BTC, k_rope_BTR, index) -> LatentCache:
    """Writes T new entries at slots [index, index + T)."""
    dtype = cache.kv_latent.dtype
    return LatentCache(
        jax.lax.dynamic_update_slice_in_dim(cache.kv_latent, kv_latent_BTC.astype(dtype), index, 1),
        jax.lax.dynamic_update_slice_in_dim(cache.k_rope, k_rope_BTR.astype(dtype), index, 1),
    )


def cache_mask(B: int, T: int, S: int, index, start_B: jax.Array | None = None) -> jax.Array:
    """[B, T, S]: slot s is visible to query slot index + t if s <= index + t and s >= start_B[b]
    (slots before start_B hold a left-padded prompt's padding)."""
    mask_BTS = jnp.broadcast_to(jnp.arange(S)[None, :] <= index + jnp.arange(T)[:, None], (B, T, S))
    if start_B is not None:
        mask_BTS = mask_BTS & (jnp.arange(S)[None, None, :] >= start_B[:, None, None])
    return mask_BTS


class MLA(nn.Module):
    cfg: MLAConfig
    rope: RopeConfig
    dim: int  # D
    norm_eps: float = 1e-6
    dtype: jnp.dtype = jnp.bfloat16

    def setup_rope(self):
        rope, R = self.rope, self.cfg.qk_rope_head_dim
        inv_freq = yarn_inv_freq(
            R, rope.rope_theta, rope.rope_factor, rope.original_seq_len, rope.beta_fast, rope.beta_slow
        )
        # HF folds mscale/mscale_all_dim into cos/sin and mscale_all_dim^2 into the softmax scale;
        # the official code uses mscale for both, which is the same when the two are equal.
        cos_scale = yarn_mscale(rope.rope_factor, rope.mscale) / yarn_mscale(
            rope.rope_factor, rope.mscale_all_dim
        )
        softmax_scale = self.cfg.qk_head_dim**-0.5 * yarn_mscale(rope.rope_factor, rope.mscale_all_dim) ** 2
        return inv_freq, cos_scale, softmax_scale

    def query(self, x_BTD):
        c, D, N, K = self.cfg, self.dim, self.cfg.n_heads, self.cfg.qk_head_dim
        head_init = dense_init([0], [1, 2])
        if c.q_lora_rank > 0:
            Q = c.q_lora_rank
            w_dq_DQ = param(self, "w_dq", ("embed", "q_latent"), (D, Q), dense_init([0], [1]))
            w_uq_QNK = param(self, "w_uq", ("q_latent", "heads", "head_dim"), (Q, N, K), head_init)
            c_q_BTQ = jnp.einsum("BTD,DQ->BTQ", x_BTD, w_dq_DQ.astype(self.dtype))
            c_q_BTQ = RMSNorm(Q, self.norm_eps, "q_latent", self.dtype, name="q_norm")(c_q_BTQ)
            q_BTNK = jnp.einsum("BTQ,QNK->BTNK", c_q_BTQ, w_uq_QNK.astype(self.dtype))
        else:
            w_q_DNK = param(self, "w_q", ("embed", "heads", "head_dim"), (D, N, K), head_init)
            q_BTNK = jnp.einsum("BTD,DNK->BTNK", x_BTD, w_q_DNK.astype(self.dtype))
        return q_BTNK[..., : c.qk_nope_head_dim], q_BTNK[..., c.qk_nope_head_dim :]

    @nn.compact
    def __call__(
        self,
        x_BTD: jax.Array,
        positions_BT: jax.Array,
        segment_ids_BT: jax.Array | None = None,
        cache: LatentCache | None = None,
        cache_index: jax.Array | int = 0,
        cache_start_B: jax.Array | None = None,
    ) -> tuple[jax.Array, LatentCache | None]:
        c, D, N = self.cfg, self.dim, self.cfg.n_heads
        C, R, H, O = c.kv_lora_rank, c.qk_rope_head_dim, c.qk_nope_head_dim, c.v_head_dim
        B, T, _ = x_BTD.shape
        x_BTD = constrain(x_BTD.astype(self.dtype), ("act_batch", "act_seq", "act_embed"))
        inv_freq, cos_scale, scale = self.setup_rope()
        cos_BTr, sin_BTr = rope_cos_sin(positions_BT, inv_freq, cos_scale)

        q_nope_BTNH, q_rope_BTNR = self.query(x_BTD)
        q_rope_BTNR = apply_rope(q_rope_BTNR, cos_BTr[:, :, None], sin_BTr[:, :, None])

        w_dkv_DC = param(self, "w_dkv", ("embed", "kv_latent"), (D, C + R), dense_init([0], [1]))
        kv_BTC = jnp.einsum("BTD,DC->BTC", x_BTD, w_dkv_DC.astype(self.dtype))
        kv_latent_BTC = RMSNorm(C, self.norm_eps, "kv_latent", self.dtype, name="kv_norm")(kv_BTC[..., :C])
        k_rope_BTR = apply_rope(kv_BTC[..., C:], cos_BTr, sin_BTr)

        head_init = dense_init([0], [1, 2])
        w_uk_CNH = param(self, "w_uk", ("kv_latent", "heads", "head_dim"), (C, N, H), head_init)
        w_uv_CNO = param(self, "w_uv", ("kv_latent", "heads", "head_dim"), (C, N, O), head_init)
        w_o_NOD = param(self, "w_o", ("heads", "head_dim", "embed"), (N, O, D), dense_init([0, 1], [2]))
        w_uk_CNH, w_uv_CNO = w_uk_CNH.astype(self.dtype), w_uv_CNO.astype(self.dtype)

        if cache is None:  # training / full forward: per-head keys and values
            mask_BTS = causal_mask(segment_ids_BT, B, T)
            out_BTNO = mla_naive(
                q_nope_BTNH, q_rope_BTNR, kv_latent_BTC, k_rope_BTR, w_uk_CNH, w_uv_CNO, mask_BTS, scale
            )
        else:  # decoding: append to the latent cache, attend in latent space
            cache = cache_write(cache, kv_latent_BTC, k_rope_BTR, cache_index)
            mask_BTS = cache_mask(B, T, cache.kv_latent.shape[1], cache_index, cache_start_B)
            kv_latent_BSC, k_rope_BSR = (a.astype(self.dtype) for a in cache)
            out_BTNO = mla_absorbed(
                q_nope_BTNH, q_rope_BTNR, kv_latent_BSC, k_rope_BSR, w_uk_CNH, w_uv_CNO, mask_BTS, scale
            )
        out_BTNO = constrain(out_BTNO, ("act_batch", "act_seq", "act_heads", None))
        return jnp.einsum("BTNO,NOD->BTD", out_BTNO, w_o_NOD.astype(self.dtype)), cache
