"""One decoder block, composed from config parts, and the pattern a scan segment repeats.

    x <- Memory(x, t)                                  (the memory slot; empty until Engram lands)
    x <- Residual_attn(x, Attn_kind)                   Attn: MLA | MLA + DSA indexer | V4 SWA/CSA/HCA
    x <- Residual_ffn(x, FFN_kind)                     FFN: dense SwiGLU | MoE (learned | hash routing)

Residual kinds (model-wide, `model.mhc`):
    plain:  x + F(norm(x))                             x [B, T, D]
    mHC:    y, post, comb = HC(X);  X <- post ⊗ F(norm(y)) + combᵀ X        X [B, T, I, D] (layers/mhc.py)

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
from deepseek_jax.layers.mhc import STREAMS, HyperConnection
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


class Block(nn.Module):
    """Memory slot, then residual(attention), then residual(FFN); returns (x, (cache, LayerStats))."""

    cfg: ModelConfig
    kind: LayerKind
    index_loss: bool = False  # DSA blocks also return their indexer KL

    def residual(self, name: str, x, sublayer: Callable):
        """x + F(norm(x)), or the mHC update of the streams around F; returns (x, F's extra)."""
        cfg, dtype = self.cfg, jnp.dtype(self.cfg.dtype)
        norm = RMSNorm(cfg.dim, cfg.norm_eps, "embed", dtype, name=f"{name}_norm")
        if cfg.mhc is None:
            f_BTD, extra = sublayer(norm(x))
            return x + f_BTD, extra
        h = cfg.mhc
        hc = HyperConnection(
            h.hc_mult, cfg.dim, h.hc_sinkhorn_iters, h.hc_eps, cfg.norm_eps, name=f"{name}_hc"
        )
        y_BTD, post_BTI, comb_BTII = hc.hc_pre(x)
        f_BTD, extra = sublayer(norm(y_BTD.astype(dtype)))
        return hc.hc_post(f_BTD, x, post_BTI, comb_BTII), extra

    def attention(self, h_BTD, cache, inputs: BlockInputs):
        """(out [B, T, D], cache, indexer KL or None) of this kind's attention."""
        cfg, kind, dtype = self.cfg, self.kind, jnp.dtype(self.cfg.dtype)
        rope = layer_rope(cfg, kind)
        if kind.attention == "v4":
            attn = V4Attention(
                cfg.v4, rope, kind.ratio, cfg.dim, cfg.norm_eps, dtype, cfg.quant_sim, name="attn"
            )
            out_BTD, cache = attn(h_BTD, inputs.positions_BT, cache, inputs.cache_index)
            return out_BTD, cache, None
        index = cfg.index if kind.attention == "dsa" else None
        attn = MLA(cfg.mla, rope, cfg.dim, cfg.norm_eps, dtype, index=index, name="attn")
        return attn(
            h_BTD, inputs.positions_BT, inputs.segment_ids_BT, cache, inputs.cache_index,
            inputs.cache_start_B, self.index_loss and index is not None,
        )  # fmt: skip

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
        return moe(h_BTD, mask_BT, inputs.tokens_BT)

    def memory(self, x, inputs: BlockInputs):
        """The memory read before the block: the slot Engram fills; kind.memory "none" reads nothing."""
        if self.kind.memory != "none":
            raise ValueError(f"layer kind {self.kind}: no memory module named {self.kind.memory!r}")
        return x

    @nn.compact
    def __call__(self, x, cache, inputs: BlockInputs):
        x = self.memory(x, inputs)
        kl = None

        def attention(h_BTD):
            nonlocal cache, kl
            out_BTD, cache, kl = self.attention(h_BTD, cache, inputs)
            return checkpoint_name(out_BTD, ATTENTION_OUT), None

        x, _ = self.residual("attn", x, attention)
        x, routing = self.residual("ffn", x, lambda h_BTD: self.ffn(h_BTD, inputs))
        x = constrain(
            x.astype(jnp.dtype(self.cfg.dtype)), ACT_BTD if self.cfg.mhc is None else STREAMS
        )
        return x, (cache, LayerStats(routing, kl))


class Pattern(nn.Module):
    """One period of a scan segment: its blocks in order; caches and statistics per slot."""

    cfg: ModelConfig
    kinds: tuple[LayerKind, ...]
    index_loss: bool = False

    @nn.compact
    def __call__(self, x, caches, inputs: BlockInputs):
        new_caches, stats = [], []
        for k, kind in enumerate(self.kinds):
            cache = None if caches is None else caches[k]
            x, (cache, layer_stats) = Block(self.cfg, kind, self.index_loss, name=f"block_{k}")(
                x, cache, inputs
            )
            new_caches.append(cache)
            stats.append(layer_stats)
        return x, (tuple(new_caches), tuple(stats))
