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
from deepseek_jax.layers.mhc import HyperHead, collapse, expand_streams
from deepseek_jax.layers.norms import RMSNorm
from deepseek_jax.media.slots import MediaInputs
from deepseek_jax.models.block import BlockInputs, Pattern
from deepseek_jax.models.common import (
    ModelOutput,
    MTPOutput,
    embed,
    has_index_loss,
    head,
    in_layer_order,
    layer_kinds,
    layer_segments,
    mtp_kind,
    scan_segment,
)
from deepseek_jax.models.dspark import DSpark
from deepseek_jax.models.media import MediaEmbed, check_media
from deepseek_jax.models.mtp import mtp_module, run_mtp


class Decoder(nn.Module):
    cfg: ModelConfig

    def check_call(self, positions_BT, cache_start_B, index_loss: bool, engram_rows, tokens_shape,
                   media=None) -> None:
        """Arguments this model cannot honour are errors, never silently ignored."""
        cfg = self.cfg
        if media is not None:
            check_media(cfg, media, tuple(tokens_shape))
        if cfg.row_positions and (positions_BT is not None or cache_start_B is not None):
            raise ValueError(
                "this model's V4 attention takes each row's own positions (cache_index + arange(T)): "
                "pass positions_BT=None and cache_start_B=None (no per-document positions, no left padding)"
            )
        if cfg.engram is not None:
            L, K = cfg.engram.rows_shape
            if engram_rows is None or engram_rows.shape != (*tokens_shape, L, K):
                got = None if engram_rows is None else tuple(engram_rows.shape)
                raise ValueError(
                    f"this model has Engram: engram_rows must be [B, T, {L}, {K}] int32 row ids for tokens "
                    f"{tuple(tokens_shape)} (engram_hash.hash_rows), got {got}"
                )
        if index_loss and not has_index_loss(cfg):
            raise ValueError(
                "index_loss=True needs DSA blocks (model.index with model.mla) or V4 CSA layers "
                "(model.v4, compress ratio 4, no shared_kv); this model has none"
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
        engram_rows: jax.Array | None = None,
        span_BT: jax.Array | None = None,
        media: MediaInputs | None = None,
    ) -> ModelOutput:
        """Full forward (cache None) or a decode step that appends T tokens at `cache_index`.

        segment_ids_BT: packed documents (MLA attention stays inside one, V4 attention too with
        v4.document_mask; 0 marks padding, which the MoE statistics skip). With a cache, slots before
        cache_start_B[b] are never attended to (left-padded prompts). return_logits=False skips the
        head (the loss applies it in chunks to `hidden`). index_loss=True also returns each DSA / V4
        CSA block's indexer KL. engram_rows [B, T, L_engram, K] int32: Engram's host-hashed rows
        (engram_hash.py), required when the model has Engram. span_BT: True on media-span tokens
        (V4.1 router bias_vl; Engram gated off there).
        media: images / video / audio (media/slots.py) merged into their spans; span_BT defaults to slots >= 0.
        """
        cfg, dtype = self.cfg, jnp.dtype(self.cfg.dtype)
        self.check_call(positions_BT, cache_start_B, index_loss, engram_rows, tokens_BT.shape, media)
        span_BT = media.span_mask() if media is not None and span_BT is None else span_BT
        V, D = cfg.vocab_size, cfg.dim
        embedding_VD = param(
            self, "embedding", ("vocab", "embed"), (V, D), nn.initializers.normal(1.0)
        )
        w_head_DV = param(self, "w_head", ("embed", "vocab"), (D, V), dense_init([0], [1]))
        B, T = tokens_BT.shape
        if positions_BT is None:
            positions_BT = jnp.broadcast_to(cache_index + jnp.arange(T, dtype=jnp.int32), (B, T))
        inputs = BlockInputs(tokens_BT, positions_BT, segment_ids_BT, cache_index, cache_start_B,
                             engram_rows, span_BT)

        x = self.embed_tokens(embedding_VD, tokens_BT, media, dtype)
        x, new_cache, routing, index_kl, captures = self.layers(x, cache, inputs, index_loss)
        h_BTD = self.read_streams(x)
        x = x[0] if isinstance(x, tuple) else x
        h_BTD = RMSNorm(D, cfg.norm_eps, "embed", dtype, name="final_norm")(h_BTD.astype(dtype))

        mtp_out, dspark_out = None, self.drafts(captures, embedding_VD, w_head_DV, inputs, mtp, cache, return_logits)
        if cfg.num_nextn_predict_layers and mtp and cache is None and cfg.dspark is None:
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
        return ModelOutput(logits, h_BTD, new_cache, routing, index_kl, mtp_out, captures, dspark_out)

    def embed_tokens(self, embedding_VD, tokens_BT, media: MediaInputs | None, dtype):
        """The token embeddings, media spans merged in (models/media.py), then copied onto the mHC
        streams (single-pass mHC carries (X, pre) with layer 0's attention reading stream 0 alone)."""
        cfg, (B, T) = self.cfg, tokens_BT.shape
        x = embed(embedding_VD, tokens_BT, dtype)
        if media is not None:
            x = MediaEmbed(cfg, name="media")(x, media)
        if cfg.mhc is not None:
            x = expand_streams(x, cfg.mhc.hc_mult)
        if cfg.mhc is not None and cfg.mhc.single_pass:  # layer 0's attention reads stream 0 alone
            x = (x, jnp.broadcast_to(jax.nn.one_hot(0, cfg.mhc.hc_mult), (B, T, cfg.mhc.hc_mult)))
        return x

    def drafts(self, captures, embedding_VD, w_head_DV, inputs: BlockInputs, mtp: bool, cache, return_logits: bool):
        """V4.1: the MTP layers are DSpark stages (dspark.py DSparkOutput), drafting at every position
        when `mtp` and no cache (as MTP runs); None otherwise."""
        if self.cfg.dspark is None or not mtp or cache is not None:
            return None
        return DSpark(self.cfg, name="dspark")(inputs.tokens_BT, captures, embedding_VD, w_head_DV,
                                               inputs.segment_ids_BT, return_logits)

    def read_streams(self, x):
        """The final read [B, T, D]: x (plain residual), the HyperHead of the streams (mHC), or the
        streams collapsed with the last site's pre (single-pass mHC: no head of its own)."""
        cfg = self.cfg
        if isinstance(x, tuple):
            return collapse(*x)
        if cfg.mhc is None:
            return x
        return HyperHead(cfg.mhc.hc_mult, cfg.dim, cfg.mhc.hc_eps, cfg.norm_eps, name="hc_head")(x)

    def layers(self, x, cache, inputs: BlockInputs, index_loss: bool):
        """The scanned segments: (x, new cache or None, routing stats, indexer KLs, DSpark captures)
        in layer order.
        A segment that produces V4.1 shared KV (one layer) hands it to the segments after it."""
        new_cache, routing, kls, captures = {}, [], [], []
        remat = (
            self.cfg.remat if cache is None else "none"
        )  # decoding keeps no activations for a backward
        for seg in layer_segments(layer_kinds(self.cfg)):
            stack = scan_segment(Pattern, seg, remat, cfg=self.cfg, index_loss=index_loss)
            x, (seg_cache, seg_stats, shared, seg_captures) = stack(
                x, None if cache is None else cache[seg.name], inputs
            )
            if seg.kinds[0].produces:
                inputs = inputs._replace(shared=jax.tree.map(lambda a: a[0], shared))
            new_cache[seg.name] = seg_cache
            for k, stats in enumerate(seg_stats):
                routing.append((seg.layers(k), stats.routing))
                kls.append((seg.layers(k), stats.index_loss))
                captures.append((seg.layers(k), seg_captures[k]))
        captured = in_layer_order(captures)  # [n_targets, B, T, D] -> [B, T, n_targets · D]
        captured = None if captured is None else jnp.concatenate(list(captured), axis=-1)
        new_cache = None if cache is None else new_cache
        return x, new_cache, in_layer_order(routing), in_layer_order(kls), captured
