"""The one decoder: embedding, scanned segments of composed blocks, final read, head, MTP.

    x = Emb(t)                          (mHC: copied onto I streams, X [B, T, I, D])
    for each segment: x = scan(Pattern)(x)          blocks composed from config parts (block.py)
    h = norm(x)                         (mHC: norm(HyperHead(X)))
    logits = h W_head;  MTP modules chained on x / h (mtp.py)

Every DeepSeek variant is a config: V3 (MLA, dense prefix + MoE, chain MTP), V3.2 (MLA + DSA
indexer in every block), V4 (shared-KV SWA / CSA / HCA by `compress_ratios`, hash + learned MoE,
mHC streams, stream MTP), and combinations no released model has (e.g. MLA + DSA on mHC streams).

Positions: by default each row's slots (cache_index + arange(T)). A model with V4 attention takes
only those (`cfg.row_positions`: its compression blocks are row slots, as in HF and the official
code), so explicit positions or left-padding starts are refused rather than ignored.
"""

import flax.linen as nn
import jax
import jax.numpy as jnp

from deepseek_jax.axes import dense_init, param
from deepseek_jax.config import ModelConfig
from deepseek_jax.layers.mhc import HyperHead, expand_streams
from deepseek_jax.layers.norms import RMSNorm
from deepseek_jax.models.block import BlockInputs, Pattern
from deepseek_jax.models.common import (
    ModelOutput,
    MTPOutput,
    embed,
    head,
    in_layer_order,
    layer_kinds,
    layer_segments,
    mtp_kind,
    scan_segment,
)
from deepseek_jax.models.mtp import mtp_module, run_mtp


class Decoder(nn.Module):
    cfg: ModelConfig

    def check_call(self, positions_BT, cache_start_B, index_loss: bool) -> None:
        """Arguments this model cannot honour are errors, never silently ignored."""
        cfg = self.cfg
        if cfg.row_positions and (positions_BT is not None or cache_start_B is not None):
            raise ValueError(
                "this model's V4 attention takes each row's own positions (cache_index + arange(T)): "
                "pass positions_BT=None and cache_start_B=None (no per-document positions, no left padding)"
            )
        if index_loss and not any(k.attention == "dsa" for k in layer_kinds(cfg)):
            raise ValueError(
                "index_loss=True needs DSA blocks (model.index with model.mla); this model has none"
            )

    @nn.compact
    def __call__(
        self,
        tokens_BT: jax.Array,
        positions_BT: jax.Array | None = None,
        segment_ids_BT: jax.Array | None = None,
        cache: dict | None = None,
        cache_index: jax.Array | int = 0,
        mtp: bool = True,
        return_logits: bool = True,
        cache_start_B: jax.Array | None = None,
        index_loss: bool = False,
    ) -> ModelOutput:
        """Full forward (cache None) or a decode step that appends T tokens at `cache_index`.

        segment_ids_BT: packed documents (MLA attention stays inside one; 0 marks padding, which the
        MoE statistics skip). With a cache, slots before cache_start_B[b] are never attended to
        (left-padded prompts). return_logits=False skips the head (the loss applies it in chunks
        to `hidden`). index_loss=True also returns each DSA block's indexer KL.
        """
        cfg, dtype = self.cfg, jnp.dtype(self.cfg.dtype)
        self.check_call(positions_BT, cache_start_B, index_loss)
        V, D = cfg.vocab_size, cfg.dim
        embedding_VD = param(
            self, "embedding", ("vocab", "embed"), (V, D), nn.initializers.normal(1.0)
        )
        w_head_DV = param(self, "w_head", ("embed", "vocab"), (D, V), dense_init([0], [1]))
        B, T = tokens_BT.shape
        if positions_BT is None:
            positions_BT = jnp.broadcast_to(cache_index + jnp.arange(T, dtype=jnp.int32), (B, T))
        inputs = BlockInputs(tokens_BT, positions_BT, segment_ids_BT, cache_index, cache_start_B)

        x = embed(embedding_VD, tokens_BT, dtype)
        if cfg.mhc is not None:
            x = expand_streams(x, cfg.mhc.hc_mult)
        x, new_cache, routing, index_kl = self.layers(x, cache, inputs, index_loss)
        h_BTD = (
            x
            if cfg.mhc is None
            else HyperHead(cfg.mhc.hc_mult, D, cfg.mhc.hc_eps, cfg.norm_eps, name="hc_head")(x)
        )
        h_BTD = RMSNorm(D, cfg.norm_eps, "embed", dtype, name="final_norm")(h_BTD.astype(dtype))

        mtp_out = None
        if cfg.num_nextn_predict_layers and mtp and cache is None:
            modules = [
                mtp_module(cfg, mtp_kind(cfg, k), index_loss, f"mtp_{k}")
                for k in range(cfg.num_nextn_predict_layers)
            ]
            carry = h_BTD if cfg.mhc is None else x
            mtp_h, stats = run_mtp(
                modules, carry, inputs, lambda t: embed(embedding_VD, t, dtype), cfg.row_positions
            )
            mtp_logits = jnp.stack([head(h, w_head_DV) for h in mtp_h]) if return_logits else None
            mtp_out = MTPOutput(mtp_logits, mtp_h, stats.routing, stats.index_loss)
        logits = head(h_BTD, w_head_DV) if return_logits else None
        return ModelOutput(logits, h_BTD, new_cache, routing, index_kl, mtp_out)

    def layers(self, x, cache, inputs: BlockInputs, index_loss: bool):
        """The scanned segments: (x, new cache or None, routing stats, indexer KLs) in layer order."""
        new_cache, routing, kls = {}, [], []
        remat = (
            self.cfg.remat if cache is None else "none"
        )  # decoding keeps no activations for a backward
        for seg in layer_segments(layer_kinds(self.cfg)):
            stack = scan_segment(Pattern, seg, remat, cfg=self.cfg, index_loss=index_loss)
            x, (seg_cache, seg_stats) = stack(x, None if cache is None else cache[seg.name], inputs)
            new_cache[seg.name] = seg_cache
            for k, stats in enumerate(seg_stats):
                routing.append((seg.layers(k), stats.routing))
                kls.append((seg.layers(k), stats.index_loss))
        return x, None if cache is None else new_cache, in_layer_order(routing), in_layer_order(kls)
