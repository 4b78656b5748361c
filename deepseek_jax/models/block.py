"""One decoder block, composed from config parts, and the pattern a scan segment repeats.

    x <- Memory(x, t)                                  Engram (layers/engram.py) on the layers it lists
    x <- Residual_attn(x, Attn_kind)                   Attn: MLA | MLA + DSA indexer | V4 SWA/CSA/HCA | V4.1
    x <- Residual_ffn(x, FFN_kind)                     FFN: dense SwiGLU | MoE (learned | hash routing)

Residual kinds (model-wide, `model.mhc`):
    plain:  x + F(norm(x))                             x [B, T, D]
    mHC:    y, post, comb = HC(X);  X <- post ⊗ F(norm(y)) + combᵀ X        X [B, T, I, D] (layers/mhc.py)
    single-pass mHC (V4.1): pre, post, comb = HC(X);  X <- post ⊗ F(norm(Σ_i pre'_i X_i)) + combᵀ X,
            pre' = the previous site's pre (carried with the streams: the carry is (X, pre))

V4.1 layers hand shared compressed KV to later layers (`BlockInputs.shared` in, the block's third
output out; models/decoder.py passes a producer's state on).

Parameter names are the parts' roles: `attn_norm`, `attn`, `ffn_norm`, `ffn`, and with mHC
`attn_hc`, `ffn_hc`; a pattern's blocks are `block_0`, `block_1`, ...
"""

from collections.abc import Callable
from typing import Any, NamedTuple

import flax.linen as nn
import jax
import jax.numpy as jnp
from jax.ad_checkpoint import checkpoint_name

from deepseek_jax.axes import constrain
from deepseek_jax.config import ModelConfig
from deepseek_jax.layers.attention import MLA, V4Attention
from deepseek_jax.layers.attention.compressor import CSA_RATIO
from deepseek_jax.layers.attention.v41 import SharedKV, V41Attention
from deepseek_jax.layers.engram import Engram
from deepseek_jax.layers.mhc import STREAMS, HyperConnection, collapse
from deepseek_jax.layers.mlp import MLP
from deepseek_jax.layers.moe.layer import MoE
from deepseek_jax.layers.norms import RMSNorm
from deepseek_jax.models.common import ACT_BTD, ATTENTION_OUT, LayerKind, LayerStats, layer_rope


class BlockInputs(NamedTuple):
    """What every block of a forward pass reads besides the residual (broadcast over the scan)."""

    tokens_BT: jax.Array  # int32 ids (hash routing reads them)
    positions_BT: jax.Array  # int32 RoPE positions
    segment_ids_BT: jax.Array | None  # packed documents (0 = padding); None = one document per row
    cache_index: Any  # int or int32 scalar: the slot the T new tokens are written at (decoding)
    cache_start_B: jax.Array | None  # decoding: slots before start_B[b] hold left padding
    engram_rows: jax.Array | None = None  # [B, T, L_engram, K] int32 host-hashed rows (engram_hash.py)
    span_BT: jax.Array | None = None  # True inside media spans (V4.1: router bias_vl, Engram gated off)
    shared: SharedKV | None = None  # V4.1: the shared compressed KV of the latest producer


class Block(nn.Module):
    """Memory slot, then residual(attention), then residual(FFN); returns (x, (cache, LayerStats))."""

    cfg: ModelConfig
    kind: LayerKind
    index_loss: bool = False  # DSA and V4 CSA blocks also return their indexer KL

    def residual(self, name: str, x, sublayer: Callable, pre_BTI=None):
        """x + F(norm(x)), or the mHC update of the streams around F; returns (x, F's extra, this
        site's pre for the next site when single-pass, else None)."""
        cfg, dtype = self.cfg, jnp.dtype(self.cfg.dtype)
        norm = RMSNorm(cfg.dim, cfg.norm_eps, "embed", dtype, name=f"{name}_norm")
        if cfg.mhc is None:
            f_BTD, extra = sublayer(norm(x))
            return x + f_BTD, extra, None
        h = cfg.mhc
        hc = HyperConnection(
            h.hc_mult, cfg.dim, h.hc_sinkhorn_iters, h.hc_eps, cfg.norm_eps, name=f"{name}_hc"
        )
        if not h.single_pass:
            y_BTD, post_BTI, comb_BTII = hc.hc_pre(x)
            f_BTD, extra = sublayer(norm(y_BTD.astype(dtype)))
            return hc.hc_post(f_BTD, x, post_BTI, comb_BTII), extra, None
        new_pre_BTI, post_BTI, comb_BTII = hc.maps(x)
        y_BTD = constrain(collapse(x, pre_BTI), ACT_BTD)  # the previous site's pre
        f_BTD, extra = sublayer(norm(y_BTD.astype(dtype)))
        return hc.hc_post(f_BTD, x, post_BTI, comb_BTII), extra, new_pre_BTI

    def attention(self, h_BTD, cache, inputs: BlockInputs):
        """(out [B, T, D], cache, indexer KL or None, SharedKV handed on or None) of this kind's attention."""
        cfg, kind, dtype = self.cfg, self.kind, jnp.dtype(self.cfg.dtype)
        rope = layer_rope(cfg, kind)
        if kind.attention == "v4" and cfg.shared_kv is not None:
            role = "swa" if kind.ratio == 0 else kind.share
            attn = V41Attention(cfg.v4, rope, kind.ratio, cfg.dim, cfg.norm_eps, dtype, cfg.quant_sim,
                                q_head_norm=False, role=role, shared_cfg=cfg.shared_kv, name="attn")
            out_BTD, cache, shared = attn(h_BTD, inputs.positions_BT, cache, inputs.cache_index, inputs.shared)
            return out_BTD, cache, None, shared
        if kind.attention == "v4":
            attn = V4Attention(
                cfg.v4, rope, kind.ratio, cfg.dim, cfg.norm_eps, dtype, cfg.quant_sim, name="attn"
            )
            with_kl = self.index_loss and kind.ratio == CSA_RATIO  # the V4 CSA indexer KL (v4.py)
            outs = attn(h_BTD, inputs.positions_BT, cache, inputs.cache_index, inputs.segment_ids_BT, with_kl)
            return outs[0], outs[1], outs[2] if with_kl else None, None
        index = cfg.index if kind.attention == "dsa" else None
        attn = MLA(cfg.mla, rope, cfg.dim, cfg.norm_eps, dtype, index=index, attention_impl=cfg.attention_impl,
                   name="attn")
        out_BTD, cache, kl = attn(
            h_BTD, inputs.positions_BT, inputs.segment_ids_BT, cache, inputs.cache_index,
            inputs.cache_start_B, self.index_loss and index is not None,
        )  # fmt: skip
        return out_BTD, cache, kl, None

    def ffn(self, h_BTD, inputs: BlockInputs):
        """(out [B, T, D], MoE statistics or None) of this kind's FFN."""
        cfg, kind, dtype = self.cfg, self.kind, jnp.dtype(self.cfg.dtype)
        if kind.ffn == "dense":
            return MLP(cfg.dim, cfg.inter_dim, dtype, name="ffn")(h_BTD), None
        mask_BT = None if inputs.segment_ids_BT is None else inputs.segment_ids_BT > 0
        moe = MoE(
            cfg.moe,
            cfg.dim,
            dtype,
            hash_routing=kind.ffn == "hash",
            vocab_size=cfg.vocab_size,
            quant_sim=cfg.quant_sim,
            name="ffn",
        )
        return moe(h_BTD, mask_BT, inputs.tokens_BT, inputs.span_BT)

    def memory(self, x, cache, inputs: BlockInputs):
        """The memory read before the block, Engram table j for kind.memory "engram_j": (x, its cache)."""
        if self.kind.memory == "none":
            return x, cache
        cfg, e = self.cfg, self.cfg.engram
        j = int(self.kind.memory.removeprefix("engram_"))
        if inputs.engram_rows is None:
            raise ValueError(
                "this model has Engram layers: pass engram_rows [B, T, L_engram, K] (host-hashed row ids, "
                "engram_hash.hash_rows or EngramHashState)"
            )
        keep_BT = None if inputs.segment_ids_BT is None else inputs.segment_ids_BT > 0
        if inputs.span_BT is not None:
            keep_BT = ~inputs.span_BT if keep_BT is None else keep_BT & ~inputs.span_BT
        engram = Engram(e, n_rows=e.num_embeddings[j], dim=cfg.dim, n_streams=1 if cfg.mhc is None else
                        cfg.mhc.hc_mult, norm_eps=cfg.norm_eps, dtype=jnp.dtype(cfg.dtype), name="engram")
        return engram(x, inputs.engram_rows[:, :, j], keep_BT, inputs.segment_ids_BT, cache)

    @nn.compact
    def __call__(self, carry, cache, inputs: BlockInputs):
        """carry: the residual x, or (streams, pre) with single-pass mHC. Returns (carry, (cache,
        LayerStats, the SharedKV this layer hands on or None, its DSpark capture or None))."""
        x, pre_BTI = carry if isinstance(carry, tuple) else (carry, None)
        paired = cache is not None and self.kind.memory != "none"  # decoding: (attention, memory) caches
        cache, memory_cache = cache if paired else (cache, None)
        x, memory_cache = self.memory(x, memory_cache, inputs)
        # DSpark reads a target layer's input: the mean of the streams after its memory
        capture_BTD = (x.mean(axis=2) if self.cfg.mhc else x) if self.kind.capture else None
        kl = shared = None

        def attention(h_BTD):
            nonlocal cache, kl, shared
            out_BTD, cache, kl, shared = self.attention(h_BTD, cache, inputs)
            return checkpoint_name(out_BTD, ATTENTION_OUT), None

        x, _, pre_BTI = self.residual("attn", x, attention, pre_BTI)
        x, routing, pre_BTI = self.residual("ffn", x, lambda h_BTD: self.ffn(h_BTD, inputs), pre_BTI)
        x = constrain(
            x.astype(jnp.dtype(self.cfg.dtype)), ACT_BTD if self.cfg.mhc is None else STREAMS
        )
        cache = (cache, memory_cache) if paired else cache
        carry = x if pre_BTI is None else (x, pre_BTI)
        return carry, (cache, LayerStats(routing, kl), shared, capture_BTD)


class Pattern(nn.Module):
    """One period of a scan segment: its blocks in order; caches and statistics per slot."""

    cfg: ModelConfig
    kinds: tuple[LayerKind, ...]
    index_loss: bool = False

    @nn.compact
    def __call__(self, x, caches, inputs: BlockInputs):
        new_caches, stats, captures = [], [], []
        for k, kind in enumerate(self.kinds):
            cache = None if caches is None else caches[k]
            x, (cache, layer_stats, shared, capture) = Block(
                self.cfg, kind, self.index_loss, name=f"block_{k}"
            )(x, cache, inputs)
            new_caches.append(cache)
            stats.append(layer_stats)
            captures.append(capture)
        return x, (tuple(new_caches), tuple(stats), shared, tuple(captures))
