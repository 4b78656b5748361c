"""Multi-head Latent Attention (DeepSeek-V2 §2.1, V3 §2.1.1), naive, absorbed and, with the V3.2
lightning indexer (DSA), sparse.

    c_q = RMSNorm(x W_dq)            [q_nope; q_rope] = c_q W_uq      (or x W_q when Q = 0)
    [c_kv; k_rope] = x W_dkv          c_kv <- RMSNorm(c_kv)
    k_nope = c_kv W_uk   v = c_kv W_uv   (per head)      k_rope = RoPE(k_rope), shared by all heads
    out = softmax((q_nope·k_nope + q_rope·k_rope) * scale) v W_o

The naive path builds per-head keys and values (training). The absorbed path folds W_uk into the
query and W_uv after the softmax, so attention runs in the latent space and a decode cache holds
only c_kv and k_rope per token: C + R numbers instead of N(H + R + O).

No [T, S] array exists on any path (latent.py): queries run `mla.q_block` at a time under remat
(core.over_query_blocks, every key-side array passed as `keys`), keys `mla.k_block` at a time with
an online softmax, visibility (s <= t, same document; with a cache s <= cache_index + t and
s >= cache_start_B[b]) computed per chunk from the queries' slots and the keys' document ids.
`attention_impl` cudnn sends dense MLA training / prefill with no cache, no indexer, no segment ids
and no context split to cuDNN's fused flash attention instead (latent.use_kernel, kernel_attention:
no [T, S] array either); packed documents, decoding, DSA and context parallelism stream.

DSA (V3.2-Exp; dsa.py, indexer.py has the indexer's equations): with `index` set, an indexer
submodule scores every visible key and each query attends in latent space to its top-U only (MLA's
MQA mode, as the paper instantiates DSA): it gathers its U latent keys (C + R numbers each); the
indexer's scores are streamed over key chunks into a running top-U. The decode cache also holds
the indexer keys. Training (DSA paper §2.1): dense warm-up, attention stays dense (naive) and the
indexer learns the KL to it over all visible keys; sparse stage, both are restricted to S_t and
the indexer's inputs are detached, so it learns only from its KL and the main model only from the
LM loss.

References: deepseek-ai/DeepSeek-V3 inference/model.py `MLA` (`attn_impl` naive | absorb);
DeepSeek_V3_2.pdf §2; HF transformers 5.24 models/deepseek_v32/modeling_deepseek_v32.py
(`DeepseekV32Attention`).

Letters: N heads, H q/k head dim without rope, R rope dim, O value head dim, Q query latent,
C KV latent, S key slots, U keys selected per query (min(`index_topk`, S)), P indexer heads,
Y indexer head dim; r = R/2 (cos/sin).
"""

import functools
from typing import NamedTuple

import flax.linen as nn
import jax
import jax.numpy as jnp

from deepseek_jax.axes import constrain, dense_init, param
from deepseek_jax.config import IndexerConfig, MLAConfig, RopeConfig
from deepseek_jax.layers.attention.core import cache_write, over_query_blocks
from deepseek_jax.layers.attention.dsa import dsa_attention
from deepseek_jax.layers.attention.indexer import DSAIndexer, mean_over_tokens
from deepseek_jax.layers.attention.latent import (
    check_kernel,
    kernel_attention,
    key_positions,
    merge_cheaper,
    mla_streamed,
    naive_keys,
    use_kernel,
)
from deepseek_jax.layers.norms import RMSNorm
from deepseek_jax.layers.rope import apply_rope, rope_cos_sin, yarn_inv_freq, yarn_mscale


class LatentCache(NamedTuple):
    """Per-layer decode cache: what the absorbed (or sparse) path needs of every past token."""

    kv_latent: jax.Array  # [B, S, C], normed c_kv
    k_rope: jax.Array  # [B, S, R], rotated
    index_k: jax.Array | None = None  # [B, S, Y] normed, rotated indexer keys (DSA only)


def init_mla_cache(
    cfg: MLAConfig, index: IndexerConfig | None, batch: int, max_len: int, dtype
) -> LatentCache:
    """An empty decode cache for one layer, up to max_len tokens."""
    zeros = lambda width: jnp.zeros((batch, max_len, width), dtype)  # noqa: E731
    index_k = None if index is None else zeros(index.index_head_dim)
    return LatentCache(zeros(cfg.kv_lora_rank), zeros(cfg.qk_rope_head_dim), index_k)


# ----------------------------------------------------------------------------------------------
# The layer


class MLA(nn.Module):
    """MLA; with `index`, DSA: the lightning indexer is a submodule (`indexer/*`) and attention is
    top-k sparse. Parameters are created in one fixed order (query, kv, [indexer], heads): Flax
    derives init values from it, and converters and golden sharding specs from the names."""

    cfg: MLAConfig
    rope: RopeConfig
    dim: int  # D
    norm_eps: float = 1e-6
    dtype: jnp.dtype = jnp.bfloat16
    index: IndexerConfig | None = None  # the DSA lightning indexer (V3.2), or None
    attention_impl: str = "xla"  # model.attention_impl: xla (streamed) | cudnn (latent.use_kernel says when)

    def setup_rope(self):
        rope, R = self.rope, self.cfg.qk_rope_head_dim
        inv_freq = yarn_inv_freq(
            R,
            rope.rope_theta,
            rope.rope_factor,
            rope.original_seq_len,
            rope.beta_fast,
            rope.beta_slow,
        )
        # HF folds mscale/mscale_all_dim into cos/sin and mscale_all_dim^2 into the softmax scale;
        # the official code uses mscale for both, which is the same when the two are equal.
        cos_scale = yarn_mscale(rope.rope_factor, rope.mscale) / yarn_mscale(
            rope.rope_factor, rope.mscale_all_dim
        )
        softmax_scale = (
            self.cfg.qk_head_dim**-0.5 * yarn_mscale(rope.rope_factor, rope.mscale_all_dim) ** 2
        )
        return inv_freq, cos_scale, softmax_scale

    def query(self, x_BTD, cos_BTr, sin_BTr):
        """c_q [B, T, Q] (None when Q = 0); the input of the non-rotated query dims and their weight,
        (c_q or x [B, T, X], w [X, N, H]), for `query_nope`; and q_rope [B, T, N, R] (rotated)."""
        c, D, N, K = self.cfg, self.dim, self.cfg.n_heads, self.cfg.qk_head_dim
        head_init, c_q_BTQ = dense_init([0], [1, 2]), None
        if c.q_lora_rank > 0:
            Q = c.q_lora_rank
            w_dq_DQ = param(self, "w_dq", ("embed", "q_latent"), (D, Q), dense_init([0], [1]))
            w_uq_QNK = param(self, "w_uq", ("q_latent", "heads", "head_dim"), (Q, N, K), head_init)
            c_q_BTQ = jnp.einsum("BTD,DQ->BTQ", x_BTD, w_dq_DQ.astype(self.dtype))
            c_q_BTQ = RMSNorm(Q, self.norm_eps, "q_latent", self.dtype, name="q_norm")(c_q_BTQ)
            src_BTX, w_XNK = c_q_BTQ, w_uq_QNK.astype(self.dtype)
        else:
            w_q_DNK = param(self, "w_q", ("embed", "heads", "head_dim"), (D, N, K), head_init)
            src_BTX, w_XNK = x_BTD, w_q_DNK.astype(self.dtype)
        H = c.qk_nope_head_dim
        q_rope_BTNR = jnp.einsum("BTX,XNR->BTNR", src_BTX, w_XNK[..., H:])
        q_rope_BTNR = apply_rope(q_rope_BTNR, cos_BTr[:, :, None], sin_BTr[:, :, None])
        return c_q_BTQ, (src_BTX, w_XNK[..., :H]), q_rope_BTNR

    @staticmethod
    def query_nope(src_BTX, w_XNH, w_uk_CNH=None):
        """q_nope [B, T, N, H]; given w_uk, the latent query [B, T, N, C] through the merged weight
        W_XNH·W_ukᵀ [X, N, C] (absorbed attention where `merge_cheaper` says so)."""
        if w_uk_CNH is None:
            return jnp.einsum("BTX,XNH->BTNH", src_BTX, w_XNH)
        return jnp.einsum("BTX,XNC->BTNC", src_BTX, jnp.einsum("XNH,CNH->XNC", w_XNH, w_uk_CNH))

    def key_value(self, x_BTD, cos_BTr, sin_BTr):
        """kv_latent [B, T, C] (normed) and k_rope [B, T, R] (rotated): what the cache holds."""
        D, C, R = self.dim, self.cfg.kv_lora_rank, self.cfg.qk_rope_head_dim
        w_dkv_DC = param(self, "w_dkv", ("embed", "kv_latent"), (D, C + R), dense_init([0], [1]))
        kv_BTC = jnp.einsum("BTD,DC->BTC", x_BTD, w_dkv_DC.astype(self.dtype))
        kv_latent_BTC = RMSNorm(C, self.norm_eps, "kv_latent", self.dtype, name="kv_norm")(
            kv_BTC[..., :C]
        )
        return kv_latent_BTC, apply_rope(kv_BTC[..., C:], cos_BTr, sin_BTr)

    def head_weights(self):
        """w_uk [C, N, H], w_uv [C, N, O] (compute dtype) and w_o [N, O, D] (f32)."""
        c, N, C = self.cfg, self.cfg.n_heads, self.cfg.kv_lora_rank
        H, O, head_init = c.qk_nope_head_dim, c.v_head_dim, dense_init([0], [1, 2])
        w_uk_CNH = param(self, "w_uk", ("kv_latent", "heads", "head_dim"), (C, N, H), head_init)
        w_uv_CNO = param(self, "w_uv", ("kv_latent", "heads", "head_dim"), (C, N, O), head_init)
        w_o_NOD = param(
            self, "w_o", ("heads", "head_dim", "embed"), (N, O, self.dim), dense_init([0, 1], [2])
        )
        return w_uk_CNH.astype(self.dtype), w_uv_CNO.astype(self.dtype), w_o_NOD

    def indexer(self, x_BTD, c_q_BTQ, cos_BTr, sin_BTr):
        """The DSA indexer's q [B, T, P, Y], k [B, T, Y], w [B, T, P] (MLA's RoPE, as in HF).
        Sparse stage: the indexer learns only from its KL (paper §2.1): its inputs are detached."""
        c, ic = self.cfg, self.index
        detach = (lambda a: a) if ic.index_dense_warmup else jax.lax.stop_gradient
        indexer = DSAIndexer(ic, self.dim, c.q_lora_rank, self.dtype, name="indexer")
        return indexer(detach(x_BTD), detach(c_q_BTQ), cos_BTr, sin_BTr)

    def attend(self, queries, keys: LatentCache, index_qw, w_ukv, pos, scale, cached, index_loss):
        """out [B, T, N, O] (the latent context [B, T, N, C] when w_ukv's W_uv is None: merged into
        W_o by the caller) and the per-query indexer KL [B, T] (or None), streamed over key chunks;
        pos = (q_slot [B, T], q_doc [B, T], k_doc [B, S]) (latent.key_positions). Without the
        indexer: a full forward in the cheaper form (`MLAConfig.absorbed_training`), absorbed (latent
        keys) when decoding."""
        c, ic, k_doc_BS = self.cfg, self.index, pos[2]
        naive = (not cached and not c.absorbed_training) if ic is None else ic.index_dense_warmup
        if naive:  # per-head keys and values, O(S) memory, computed once for every query block
            keys = (*naive_keys(keys.kv_latent, *w_ukv), keys.k_rope, keys.index_k)
        keys = tuple(a for a in keys if a is not None) + (k_doc_BS,)
        if ic is None:
            fn = functools.partial(mla_streamed, w_ukv=w_ukv, scale=scale, k_block=c.k_block, absorbed=not naive)
            attend = lambda qn, qr, slot, doc, *k: fn((qn, qr), (slot, doc), k)  # noqa: E731
            return over_query_blocks(attend, c.q_block, *queries, *pos[:2], keys=keys), None
        fn = functools.partial(
            dsa_attention, w_ukv=w_ukv, scale=scale, topk=ic.index_topk, k_block=c.k_block,
            dense=ic.index_dense_warmup, with_loss=index_loss,
        )  # fmt: skip
        q_block = ic.index_q_block or c.q_block
        out_BTNO, idx_BTU, kl_BT = over_query_blocks(fn, q_block, *queries, *index_qw, *pos[:2], keys=keys)
        if idx_BTU is not None:
            self.sow("intermediates", "index_topk_BTU", idx_BTU)
        return out_BTNO, kl_BT

    @nn.compact
    def __call__(
        self,
        x_BTD: jax.Array,
        positions_BT: jax.Array,
        segment_ids_BT: jax.Array | None = None,
        cache: LatentCache | None = None,
        cache_index: jax.Array | int = 0,
        cache_start_B: jax.Array | None = None,
        index_loss: bool = False,
    ) -> tuple[jax.Array, LatentCache | None, jax.Array | None]:
        """(out [B, T, D], the updated cache or None, the layer's mean per-token indexer KL when
        index_loss, else None). With a cache, the T new tokens are written at cache_index."""
        c, ic = self.cfg, self.index
        if ic is None and index_loss:
            raise ValueError("MLA: index_loss=True needs the DSA indexer (index=IndexerConfig)")
        if ic is not None:
            ic.check_against(c.q_lora_rank, c.qk_rope_head_dim)
        B, T, _ = x_BTD.shape
        x_BTD = constrain(x_BTD.astype(self.dtype), ("act_batch", "act_seq", "act_embed"))
        inv_freq, cos_scale, scale = self.setup_rope()
        cos_BTr, sin_BTr = rope_cos_sin(positions_BT, inv_freq, cos_scale)  # the indexer's too
        c_q_BTQ, nope_in, q_rope_BTNR = self.query(x_BTD, cos_BTr, sin_BTr)
        kv_latent_BTC, k_rope_BTR = self.key_value(x_BTD, cos_BTr, sin_BTr)
        iq_BTPY = ik_BTY = iw_BTP = None
        if ic is not None:
            iq_BTPY, ik_BTY, iw_BTP = self.indexer(x_BTD, c_q_BTQ, cos_BTr, sin_BTr)
        w_uk_CNH, w_uv_CNO, w_o_NOD = self.head_weights()
        kernel = use_kernel(self.attention_impl, segmented=segment_ids_BT is not None, cached=cache is not None,
                            indexed=ic is not None)  # fmt: skip
        # absorbed dense attention: W_uq·W_ukᵀ and W_uv·W_o merged where that is cheaper (latent.merge_cheaper)
        absorbed = ic is None and not kernel and (cache is not None or c.absorbed_training)
        X, C = nope_in[0].shape[-1], c.kv_lora_rank
        merge_q = absorbed and merge_cheaper(X, c.qk_nope_head_dim, C, B * T)
        merge_o = absorbed and merge_cheaper(self.dim, c.v_head_dim, C, B * T)
        q_nope_BTNH = self.query_nope(*nope_in, w_uk_CNH if merge_q else None)

        keys = LatentCache(kv_latent_BTC, k_rope_BTR, ik_BTY)
        queries = (q_nope_BTNH, q_rope_BTNR)
        w_ukv = (None if merge_q else w_uk_CNH, None if merge_o else w_uv_CNO)
        if kernel:  # a fused kernel: causal, one document, the whole sequence on this device
            check_kernel(self.attention_impl, self.dtype, max(c.qk_head_dim, c.v_head_dim))
            k_nope_BSNH, v_BSNO = naive_keys(kv_latent_BTC, *w_ukv)
            out_BTNO = kernel_attention(queries, k_nope_BSNH, v_BSNO, k_rope_BTR, None, scale, self.attention_impl)
            kl_BT = None
        else:
            if cache is not None:  # decoding: append to the cache, attend over its slots
                cache = cache_write(cache, keys, cache_index)
                keys = LatentCache(*(None if a is None else a.astype(self.dtype) for a in cache))
            S = keys.kv_latent.shape[1]
            pos = key_positions(B, T, S, segment_ids_BT, cache is not None, cache_index, cache_start_B)
            out_BTNO, kl_BT = self.attend(queries, keys, (iq_BTPY, iw_BTP), w_ukv, pos, scale, cache is not None,
                                          index_loss)  # fmt: skip
        real_BT = None if segment_ids_BT is None else segment_ids_BT > 0  # segment 0 = padding
        kl = None if kl_BT is None else mean_over_tokens(kl_BT, real_BT)
        out_BTNO = constrain(out_BTNO, ("act_batch", "act_seq", "act_heads", None))
        if merge_o:  # out_BTNO is the latent context [B, T, N, C]
            w_CND = jnp.einsum("CNO,NOD->CND", w_uv_CNO, w_o_NOD.astype(self.dtype))
            return jnp.einsum("BTNC,CND->BTD", out_BTNO, w_CND), cache, kl
        return jnp.einsum("BTNO,NOD->BTD", out_BTNO, w_o_NOD.astype(self.dtype)), cache, kl
