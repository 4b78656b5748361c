"""The DeepSeek-V4 transformer (as released 2026-04-24): mHC streams around shared-KV attention and MoE.

    X_0 = [Emb(t)] * I                                       I = hc_mult residual streams [B, T, I, D]
    per layer:  y, post, comb = HC_attn(X);  X <- post ⊗ Attn_r(norm(y)) + combᵀ X
                y, post, comb = HC_ffn(X);   X <- post ⊗ MoE(norm(y), t) + combᵀ X
    logits = norm(HyperHead(X)) W_head

Attn_r is the layer's attention type by its compress ratio r (`compress_ratios[l]`): 0 = sliding
window only, 4 = CSA (compressed entries + lightning-indexer top-k), larger = HCA. Its RoPE is the
main one (θ = rope_theta, no YaRN) for r = 0 and the compressed one (θ = compress_rope_theta, YaRN
from `rope`) otherwise. The first `moe.n_hash_layers` MoE layers route by the token id (tid2eid).

Layers differ in kind (ratio, hash), so the stack is run-length encoded into segments: each
segment repeats a pattern of one or two kinds and is one `nn.scan` over the repeats (V4-Flash:
layers 0-1 [SWA, hash] x2, layer 2 [CSA, hash], layers 3-42 [HCA, CSA] x20), so compile time is
bounded by the number of segments, not the depth. Parameters of segment `layers_3_42` are stacked
[repeats, ...] per pattern slot `block_0`, `block_1`; layer l = start + repeat * period + slot.

MTP (depth k, §1.9 of the reference): Z = e_proj(enorm(Emb(t_{i+k}))) + h_proj(hnorm(X_{k-1}))
per stream, one SWA block with learned routing, then its own HyperHead and norm, the shared head.
X_0 is the main model's final streams before its HyperHead.
"""

import dataclasses
from typing import NamedTuple

import flax.linen as nn
import jax
import jax.numpy as jnp

from deepseek_jax.axes import constrain, dense_init, param
from deepseek_jax.config import ModelConfig
from deepseek_jax.layers.mhc import HyperConnection, HyperHead
from deepseek_jax.layers.moe.layer import MoE
from deepseek_jax.layers.norms import RMSNorm
from deepseek_jax.layers.v4_attention import V4Attention, init_v4_attention_cache
from deepseek_jax.model import SCAN_COLLECTIONS, ModelOutput, Transformer, shift_left
from deepseek_jax.quant import sim_act, sim_weight

STREAMS = ("act_batch", "act_seq", None, "act_embed")  # [B, T, I, D]


class Segment(NamedTuple):
    start: int  # first layer
    kinds: tuple[tuple[int, bool], ...]  # the pattern: (compress ratio, hash routing) per slot
    repeats: int

    @property
    def name(self) -> str:
        end = self.start + len(self.kinds) * self.repeats - 1
        return f"layers_{self.start}" if end == self.start else f"layers_{self.start}_{end}"


def layer_kinds(cfg: ModelConfig) -> list[tuple[int, bool]]:
    """(compress ratio, hash routing) of each main-model layer."""
    return [(cfg.compress_ratios[i], i < cfg.moe.n_hash_layers) for i in range(cfg.n_layers)]


def layer_segments(kinds: list[tuple[int, bool]]) -> list[Segment]:
    """Greedy run-length encoding: period 1 if it repeats, else period 2 if that repeats, else 1."""
    segments, i = [], 0
    while i < len(kinds):
        for period in (1, 2):
            pattern, reps = tuple(kinds[i : i + period]), 1
            while tuple(kinds[i + reps * period : i + (reps + 1) * period]) == pattern:
                reps += 1
            if reps >= 2:
                break
        else:
            pattern, reps = (kinds[i],), 1
        segments.append(Segment(i, pattern, reps))
        i += len(pattern) * reps
    return segments


def layer_rope(cfg: ModelConfig, ratio: int):
    """The main RoPE (no YaRN) for sliding-window layers, the compressed one for CSA / HCA."""
    if ratio == 0:
        return dataclasses.replace(cfg.rope, rope_factor=1.0)
    return dataclasses.replace(cfg.rope, rope_theta=cfg.v4.compress_rope_theta)


class V4Block(nn.Module):
    """One layer on the streams: mHC around attention, then mHC around the MoE."""

    cfg: ModelConfig
    ratio: int
    hash_routing: bool

    @nn.compact
    def __call__(self, x_BTID, cache, tokens_BT, positions_BT, segment_ids_BT, cache_index):
        cfg, dtype, D = self.cfg, jnp.dtype(self.cfg.dtype), self.cfg.dim
        h = cfg.mhc
        norm = lambda name: RMSNorm(D, cfg.norm_eps, "embed", dtype, name=name)  # noqa: E731
        hc = lambda name: HyperConnection(  # noqa: E731
            h.hc_mult, D, h.hc_sinkhorn_iters, h.hc_eps, cfg.norm_eps, name=name
        )
        attn = V4Attention(
            cfg.v4, layer_rope(cfg, self.ratio), self.ratio, D, cfg.norm_eps, dtype, cfg.quant_sim, name="attn"
        )
        attn_hc = hc("attn_hc")
        y_BTD, post_BTI, comb_BTII = attn_hc.hc_pre(x_BTID)
        f_BTD, cache = attn(norm("attn_norm")(y_BTD.astype(dtype)), positions_BT, cache, cache_index)
        x_BTID = attn_hc.hc_post(f_BTD, x_BTID, post_BTI, comb_BTII)
        ffn_hc = hc("ffn_hc")
        y_BTD, post_BTI, comb_BTII = ffn_hc.hc_pre(x_BTID)
        mask_BT = None if segment_ids_BT is None else segment_ids_BT > 0
        moe = MoE(cfg.moe, D, dtype, hash_routing=self.hash_routing, vocab_size=cfg.vocab_size,
                  quant_sim=cfg.quant_sim, name="ffn")
        f_BTD, aux = moe(norm("ffn_norm")(y_BTD.astype(dtype)), mask_BT, tokens_BT)
        x_BTID = ffn_hc.hc_post(f_BTD, x_BTID, post_BTI, comb_BTII)
        return constrain(x_BTID.astype(dtype), STREAMS), (cache, aux)


class Pattern(nn.Module):
    """One period of a segment: its blocks in order; caches and MoE aux stacked over the slots."""

    cfg: ModelConfig
    kinds: tuple[tuple[int, bool], ...]

    @nn.compact
    def __call__(self, x_BTID, caches, tokens_BT, positions_BT, segment_ids_BT, cache_index):
        new_caches, auxes = [], []
        for k, (ratio, hashed) in enumerate(self.kinds):
            cache = None if caches is None else caches[k]
            x_BTID, (cache, aux) = V4Block(self.cfg, ratio, hashed, name=f"block_{k}")(
                x_BTID, cache, tokens_BT, positions_BT, segment_ids_BT, cache_index
            )
            new_caches.append(cache)
            auxes.append(aux)
        return x_BTID, (tuple(new_caches), jax.tree.map(lambda *a: jnp.stack(a), *auxes))


def segment_stack(cfg: ModelConfig, seg: Segment) -> nn.Module:
    scanned = nn.scan(
        Pattern,
        variable_axes=SCAN_COLLECTIONS,
        split_rngs={"params": True},
        in_axes=(0, nn.broadcast, nn.broadcast, nn.broadcast, nn.broadcast),
        length=seg.repeats,
        metadata_params={nn.PARTITION_NAME: "layers"},
    )
    return scanned(cfg, seg.kinds, name=seg.name)


class V4MTPLayer(nn.Module):
    """One V4 multi-token-prediction module: returns (normed output, its streams, MoE aux)."""

    cfg: ModelConfig

    @nn.compact
    def __call__(self, x_BTID, emb_BTD, tokens_BT, positions_BT, segment_ids_BT):
        cfg, dtype, D = self.cfg, jnp.dtype(self.cfg.dtype), self.cfg.dim
        norm = lambda name: RMSNorm(D, cfg.norm_eps, "embed", dtype, name=name)  # noqa: E731
        w_e_DD = param(self, "w_e", ("embed", None), (D, D), dense_init([0], [1]))
        w_h_DD = param(self, "w_h", ("embed", None), (D, D), dense_init([0], [1]))
        q = cfg.quant_sim  # e_proj / h_proj are FP8 linears (quant.py)
        w_e_DD, w_h_DD = (sim_weight(w, q).astype(dtype) for w in (w_e_DD, w_h_DD))
        e_BTD = jnp.einsum("BTD,DE->BTE", sim_act(norm("enorm")(emb_BTD), q), w_e_DD)
        h_BTID = jnp.einsum("BTID,DE->BTIE", sim_act(norm("hnorm")(x_BTID), q), w_h_DD)
        z_BTID = h_BTID + e_BTD[:, :, None, :]
        ratio = cfg.compress_ratios[cfg.n_layers]
        z_BTID, (_, aux) = V4Block(cfg, ratio, False, name="block")(
            z_BTID, None, tokens_BT, positions_BT, segment_ids_BT, 0
        )
        y_BTD = HyperHead(cfg.mhc.hc_mult, D, cfg.mhc.hc_eps, cfg.norm_eps, name="hc_head")(z_BTID)
        return norm("norm")(y_BTD.astype(dtype)), z_BTID, aux


class V4Transformer(Transformer):
    """Embedding, the segment stacks on I streams, HyperHead, final norm, head; MTP as above."""

    def setup(self):
        cfg = self.cfg
        self.setup_io()
        self.hc_head = HyperHead(cfg.mhc.hc_mult, cfg.dim, cfg.mhc.hc_eps, cfg.norm_eps)
        self.segments = layer_segments(layer_kinds(cfg))
        self.stacks = [segment_stack(cfg, seg) for seg in self.segments]
        self.mtp = [V4MTPLayer(cfg) for _ in range(cfg.num_nextn_predict_layers)]

    def __call__(
        self, tokens_BT, positions_BT=None, segment_ids_BT=None, cache=None, cache_index=0,
        mtp=True, return_logits=True, cache_start_B=None, index_loss=False,
    ) -> ModelOutput:
        """As `Transformer.__call__`, except: attention positions are the row's own (cache_index +
        arange(T)) whatever positions_BT says, since V4's compression blocks are row slots (HF and
        the official code alike), so packed documents attend across their boundaries (segment ids
        still mask padding out of the MoE statistics and the loss); no left padding in decoding
        (cache_start_B must be None or zeros); index_loss is ignored (no V4 indexer loss yet)."""
        cfg = self.cfg
        B, T = tokens_BT.shape
        positions_BT = jnp.broadcast_to(cache_index + jnp.arange(T, dtype=jnp.int32), (B, T))
        x_BTD = self.embed(tokens_BT)
        x_BTID = jnp.broadcast_to(x_BTD[:, :, None, :], (B, T, cfg.mhc.hc_mult, cfg.dim))
        new_cache, auxes = {}, []
        for seg, stack in zip(self.segments, self.stacks):
            seg_cache = None if cache is None else cache[seg.name]
            x_BTID, (seg_cache, aux) = stack(
                x_BTID, seg_cache, tokens_BT, positions_BT, segment_ids_BT, cache_index
            )
            new_cache[seg.name] = seg_cache
            auxes.append(jax.tree.map(lambda a: a.reshape(-1, *a.shape[2:]), aux))  # [reps*period, ...]
        aux = jax.tree.map(lambda *a: jnp.concatenate(a), *auxes)
        h_BTD = self.final_norm(self.hc_head(x_BTID).astype(jnp.dtype(cfg.dtype)))
        mtp_h, mtp_aux = None, None
        if self.mtp and mtp and cache is None:
            mtp_h, mtp_aux = self.mtp_forward(x_BTID, tokens_BT, positions_BT, segment_ids_BT)
        logits = mtp_logits = None
        if return_logits:
            logits = self.head(h_BTD)
            mtp_logits = None if mtp_h is None else jnp.stack([self.head(h) for h in mtp_h])
        return ModelOutput(
            logits, mtp_logits, aux.counts, None if mtp_aux is None else mtp_aux.counts,
            None if cache is None else new_cache,
            hidden=h_BTD, mtp_hidden=mtp_h, balance_loss=aux.balance_loss,
            mtp_balance_loss=None if mtp_aux is None else mtp_aux.balance_loss,
            dropped=aux.dropped, mtp_dropped=None if mtp_aux is None else mtp_aux.dropped,
        )

    def mtp_forward(self, x_BTID, tokens_BT, positions_BT, segment_ids_BT):
        hidden, auxes = [], []
        for k, layer in enumerate(self.mtp, start=1):
            segs = None if segment_ids_BT is None else shift_left(segment_ids_BT, k)
            tokens_k = shift_left(tokens_BT, k)
            # slot i holds h_i and Emb(t_{i+k}); its attention runs at the row's positions
            h_BTD, x_BTID, aux = layer(x_BTID, self.embed(tokens_k), tokens_k, positions_BT, segs)
            hidden.append(h_BTD)
            auxes.append(aux)
        return jnp.stack(hidden), jax.tree.map(lambda *xs: jnp.stack(xs), *auxes)


def init_v4_cache(cfg: ModelConfig, batch: int, max_len: int, dtype=None) -> dict:
    """Per segment, a tuple over its pattern slots of per-layer caches stacked [repeats, ...]."""
    dtype = jnp.dtype(dtype or cfg.dtype)
    cache = {}
    for seg in layer_segments(layer_kinds(cfg)):
        slots = []
        for ratio, _ in seg.kinds:
            one = init_v4_attention_cache(cfg.v4, ratio, batch, max_len, dtype)
            slots.append(jax.tree.map(lambda a: jnp.broadcast_to(a, (seg.repeats, *a.shape)), one))
        cache[seg.name] = tuple(slots)
    return cache


def v4_bias_rows(cfg: ModelConfig) -> list[tuple[tuple[str, ...], tuple[int, ...]]]:
    """model.router_bias_rows for V4: one stacked bias per learned-routing pattern slot."""
    rows = []
    for seg in layer_segments(layer_kinds(cfg)):
        P = len(seg.kinds)
        for k, (_, hashed) in enumerate(seg.kinds):
            if not hashed:
                layers = tuple(seg.start + r * P + k for r in range(seg.repeats))
                rows.append(((seg.name, f"block_{k}", "ffn", "bias"), layers))
    return rows
