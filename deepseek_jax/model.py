"""The DeepSeek-V3 transformer: embedding, scanned block stacks, final norm, head and MTP.

    h = Emb(t);  for each block: h += Attn(norm(h));  h += FFN(norm(h))
    logits = norm(h) W_head

The first `n_dense_layers` blocks use a dense SwiGLU FFN and the rest DeepSeekMoE; each group is
one `nn.scan` stack (parameters stacked on a leading `layers` axis), so compile time does not grow
with depth. MTP (V3 §2.2) chains `num_nextn_predict_layers` extra blocks, module k combining the
depth-(k-1) representation with the embedding of the token k positions ahead:

    h_k = Block_k(W_eh [enorm(Emb(t_{i+k})); hnorm(h_{k-1})]),   logits_k = Head(norm_k(h_k))

h_0 is the main model's output after its final norm (as HF transformers' `MtpModel` and vLLM feed it).

DeepSeek-V3.2 (`cfg.index` set): every block's attention, the MTP blocks' included, is DSA
(layers/dsa.py: lightning indexer, top-k sparse MLA), and the decode cache holds the indexer keys
too. With `index_loss=True` each block also returns its indexer KL L_I (mean over real tokens),
stacked per layer into `ModelOutput.index_loss` [L] and `mtp_index_loss` [K].
"""

from typing import Any, NamedTuple

import flax.linen as nn
import jax
import jax.numpy as jnp

from deepseek_jax.axes import constrain, dense_init, param
from deepseek_jax.config import ModelConfig
from deepseek_jax.layers.dsa import DSACache, SparseMLA
from deepseek_jax.layers.mla import MLA, LatentCache
from deepseek_jax.layers.mlp import MLP
from deepseek_jax.layers.moe.layer import ROUTER_COLLECTION, MoE
from deepseek_jax.layers.norms import RMSNorm

SCAN_COLLECTIONS = {"params": 0, ROUTER_COLLECTION: 0, "intermediates": 0}


class ModelOutput(NamedTuple):
    logits: jax.Array | None  # [B, T, V] float32 (None with return_logits=False)
    mtp_logits: jax.Array | None  # [K, B, T, V] float32; slot i of depth k predicts t_{i+k+1}
    expert_counts: jax.Array | None  # [L_moe, E] int32, real tokens per expert per MoE layer
    mtp_expert_counts: jax.Array | None  # [K, E]
    cache: Any  # updated decode cache, or None
    hidden: jax.Array | None = None  # [B, T, D] after the final norm (what the head reads)
    mtp_hidden: jax.Array | None = None  # [K, B, T, D] after each MTP module's norm
    balance_loss: jax.Array | None = None  # [L_moe] unweighted sequence-wise balance loss
    mtp_balance_loss: jax.Array | None = None  # [K]
    dropped: jax.Array | None = None  # [L_moe] int32, pairs dropped by a capacity-limited dispatch
    mtp_dropped: jax.Array | None = None  # [K]
    index_loss: jax.Array | None = None  # [L] per-layer indexer KL (DSA with index_loss=True)
    mtp_index_loss: jax.Array | None = None  # [K]


class Block(nn.Module):
    """Pre-norm residual block: MLA (DSA when cfg.index is set) then a dense MLP or DeepSeekMoE.
    Returns (x, (cache, MoE aux or None, indexer KL or None))."""

    cfg: ModelConfig
    moe: bool

    @nn.compact
    def __call__(
        self, x_BTD, cache, positions_BT, segment_ids_BT, cache_index, cache_start_B=None, index_loss=False
    ):
        cfg, dtype = self.cfg, jnp.dtype(self.cfg.dtype)
        norm = lambda name: RMSNorm(cfg.dim, cfg.norm_eps, "embed", dtype, name=name)  # noqa: E731
        args = (norm("attn_norm")(x_BTD), positions_BT, segment_ids_BT, cache, cache_index, cache_start_B)
        kl = None
        if cfg.index is None:
            h_BTD, cache = MLA(cfg.mla, cfg.rope, cfg.dim, cfg.norm_eps, dtype, name="attn")(*args)
        else:
            attn = SparseMLA(cfg.mla, cfg.rope, cfg.dim, cfg.norm_eps, dtype, index=cfg.index, name="attn")
            h_BTD, cache, kl = attn(*args, indexer_loss=index_loss)
        x_BTD = x_BTD + h_BTD
        if self.moe:
            mask_BT = None if segment_ids_BT is None else segment_ids_BT > 0
            h_BTD, aux = MoE(cfg.moe, cfg.dim, dtype, name="ffn")(norm("ffn_norm")(x_BTD), mask_BT)
        else:
            h_BTD, aux = MLP(cfg.dim, cfg.inter_dim, dtype, name="ffn")(norm("ffn_norm")(x_BTD)), None
        x_BTD = constrain(x_BTD + h_BTD, ("act_batch", "act_seq", "act_embed"))
        return x_BTD, (cache, aux, kl)


def block_stack(cfg: ModelConfig, moe: bool, length: int) -> nn.Module:
    """`length` Blocks under one nn.scan; carries x, scans the cache, broadcasts the rest."""
    scanned = nn.scan(
        Block,
        variable_axes=SCAN_COLLECTIONS,
        split_rngs={"params": True},
        in_axes=(0, nn.broadcast, nn.broadcast, nn.broadcast, nn.broadcast, nn.broadcast),
        length=length,
        metadata_params={nn.PARTITION_NAME: "layers"},
    )
    return scanned(cfg, moe)


class MTPLayer(nn.Module):
    """One multi-token-prediction module (its block is always a MoE block)."""

    cfg: ModelConfig

    @nn.compact
    def __call__(self, h_BTD, emb_BTD, positions_BT, segment_ids_BT, index_loss=False):
        cfg, dtype, D = self.cfg, jnp.dtype(self.cfg.dtype), self.cfg.dim
        norm = lambda name: RMSNorm(D, cfg.norm_eps, "embed", dtype, name=name)  # noqa: E731
        w_eh_ZD = param(self, "w_eh", (None, "embed"), (2 * D, D), dense_init([0], [1]))
        # the embedding half comes first, as in the released checkpoints' eh_proj
        both_BTZ = jnp.concatenate([norm("enorm")(emb_BTD), norm("hnorm")(h_BTD)], axis=-1)
        x_BTD = jnp.einsum("BTZ,ZD->BTD", both_BTZ, w_eh_ZD.astype(dtype))
        block = Block(cfg, moe=True, name="block")
        x_BTD, (_, aux, kl) = block(x_BTD, None, positions_BT, segment_ids_BT, 0, None, index_loss)
        return norm("norm")(x_BTD), aux, kl


def shift_left(x_BT: jax.Array, k: int, fill=0) -> jax.Array:
    """x[:, i + k] at slot i; the last k slots get `fill` (their targets are masked in the loss)."""
    return jnp.concatenate([x_BT[:, k:], jnp.full_like(x_BT[:, :k], fill)], axis=1)


class Transformer(nn.Module):
    cfg: ModelConfig

    def setup_io(self):
        """The embedding table, the head and the final norm (shared with V4Transformer)."""
        cfg = self.cfg
        V, D = cfg.vocab_size, cfg.dim
        self.embedding = param(self, "embedding", ("vocab", "embed"), (V, D), nn.initializers.normal(1.0))
        self.w_head = param(self, "w_head", ("embed", "vocab"), (D, V), dense_init([0], [1]))
        self.final_norm = RMSNorm(D, cfg.norm_eps, "embed", jnp.dtype(cfg.dtype))

    def setup(self):
        cfg = self.cfg
        self.setup_io()
        if cfg.n_dense_layers:
            self.dense_layers = block_stack(cfg, False, cfg.n_dense_layers)
        if cfg.n_moe_layers:
            self.moe_layers = block_stack(cfg, True, cfg.n_moe_layers)
        self.mtp = [MTPLayer(cfg) for _ in range(cfg.num_nextn_predict_layers)]  # mtp_0, mtp_1, ...

    def embed(self, tokens_BT):
        # the lookup reads a whole table (gathered once, as FSDP gathers any weight): a lookup into a
        # D-split table would make the backward's scatter re-layout the batch-split cotangent
        table_VD = constrain(self.embedding, (None, None))
        emb_BTD = jnp.take(table_VD, tokens_BT, axis=0).astype(jnp.dtype(self.cfg.dtype))
        return constrain(emb_BTD, ("act_batch", "act_seq", "act_embed"))

    def head(self, h_BTD):
        w_head_DV = self.w_head.astype(h_BTD.dtype)
        logits_BTV = jnp.einsum("BTD,DV->BTV", h_BTD, w_head_DV, preferred_element_type=jnp.float32)
        return constrain(logits_BTV, ("act_batch", "act_seq", "act_vocab"))

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

        segment_ids_BT: packed documents (attention stays inside one; 0 marks padding). With a
        cache, slots before cache_start_B[b] are never attended to (left-padded prompts).
        return_logits=False skips the head (the loss applies it in chunks to `hidden`).
        index_loss=True (DSA models) also returns each block's indexer KL.
        """
        B, T = tokens_BT.shape
        if positions_BT is None:
            positions_BT = jnp.broadcast_to(cache_index + jnp.arange(T, dtype=jnp.int32), (B, T))
        x_BTD = self.embed(tokens_BT)
        new_cache, aux, kls = {}, None, []
        for stack in ("dense_layers", "moe_layers"):
            if not hasattr(self, stack):
                continue
            layer_cache = None if cache is None else cache[stack]
            x_BTD, (layer_cache, stack_aux, kl_L) = getattr(self, stack)(
                x_BTD, layer_cache, positions_BT, segment_ids_BT, cache_index, cache_start_B, index_loss
            )
            new_cache[stack] = layer_cache
            aux = stack_aux if stack == "moe_layers" else aux
            kls += [] if kl_L is None else [kl_L]
        h_BTD = self.final_norm(x_BTD)
        mtp_h, mtp_aux, mtp_kl = None, None, None
        if self.mtp and mtp and cache is None:
            mtp_h, mtp_aux, mtp_kl = self.mtp_forward(h_BTD, tokens_BT, positions_BT, segment_ids_BT, index_loss)
        logits = mtp_logits = None
        if return_logits:
            logits = self.head(h_BTD)
            mtp_logits = None if mtp_h is None else jnp.stack([self.head(h) for h in mtp_h])
        return ModelOutput(
            logits, mtp_logits,
            None if aux is None else aux.counts, None if mtp_aux is None else mtp_aux.counts,
            None if cache is None else new_cache,
            hidden=h_BTD, mtp_hidden=mtp_h,
            balance_loss=None if aux is None else aux.balance_loss,
            mtp_balance_loss=None if mtp_aux is None else mtp_aux.balance_loss,
            dropped=None if aux is None else aux.dropped,
            mtp_dropped=None if mtp_aux is None else mtp_aux.dropped,
            index_loss=jnp.concatenate(kls) if kls else None, mtp_index_loss=mtp_kl,
        )

    def mtp_forward(self, h_BTD, tokens_BT, positions_BT, segment_ids_BT, index_loss=False):
        """Chains the MTP modules; returns their normed outputs [K, B, T, D], stacked MoE aux and
        indexer KLs [K] (None unless DSA with index_loss)."""
        hidden, auxes, kls = [], [], []
        for k, layer in enumerate(self.mtp, start=1):
            segs = None if segment_ids_BT is None else shift_left(segment_ids_BT, k)
            emb_BTD = self.embed(shift_left(tokens_BT, k))
            h_BTD, aux, kl = layer(h_BTD, emb_BTD, shift_left(positions_BT, k), segs, index_loss)
            hidden.append(h_BTD)
            auxes.append(aux)
            kls.append(kl)
        stack = lambda *xs: jnp.stack(xs)  # noqa: E731
        return jnp.stack(hidden), jax.tree.map(stack, *auxes), jax.tree.map(stack, *kls)


def init_cache(cfg: ModelConfig, batch: int, max_len: int, dtype=None) -> dict:
    """An empty absorbed-MLA decode cache: per stack, [L, B, S, C] latents and [L, B, S, R] keys
    (DSA: a DSACache, with the indexer keys [L, B, S, Y] too)."""
    dtype = jnp.dtype(dtype or cfg.dtype)
    C, R = cfg.mla.kv_lora_rank, cfg.mla.qk_rope_head_dim

    def stack(n):
        zeros = lambda width: jnp.zeros((n, batch, max_len, width), dtype)  # noqa: E731
        if cfg.index is None:
            return LatentCache(zeros(C), zeros(R))
        return DSACache(zeros(C), zeros(R), zeros(cfg.index.index_head_dim))

    cache = {}
    if cfg.n_dense_layers:
        cache["dense_layers"] = stack(cfg.n_dense_layers)
    if cfg.n_moe_layers:
        cache["moe_layers"] = stack(cfg.n_moe_layers)
    return cache


def build_model(cfg: ModelConfig) -> nn.Module:
    """The one registry of model variants: V4 blocks on mHC streams (`cfg.v4`), else V3 / V3.2."""
    if cfg.v4 is not None:
        from deepseek_jax.model_v4 import V4Transformer  # model_v4 builds on this module

        return V4Transformer(cfg)
    return Transformer(cfg)


def build_cache(cfg: ModelConfig, batch: int, max_len: int, dtype=None) -> dict:
    """An empty decode cache for `build_model(cfg)`."""
    if cfg.v4 is not None:
        from deepseek_jax.model_v4 import init_v4_cache

        return init_v4_cache(cfg, batch, max_len, dtype)
    return init_cache(cfg, batch, max_len, dtype)


def router_bias_rows(cfg: ModelConfig) -> list[tuple[tuple[str, ...], tuple[int, ...]]]:
    """Each main-model selection bias in the `router` collection: (its path, the rows of
    `ModelOutput.expert_counts` its stacked [n, E] array holds, in order)."""
    if cfg.v4 is not None:
        from deepseek_jax.model_v4 import v4_bias_rows

        return v4_bias_rows(cfg)
    return [(("moe_layers", "ffn", "bias"), tuple(range(cfg.n_moe_layers)))] if cfg.n_moe_layers else []
