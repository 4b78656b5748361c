"""What every decoder shares: the per-layer plan (kinds and scan segments), embedding and head,
output types, and the remat policies of the scanned blocks.

A model is a list of layer kinds read off its config (`layer_kinds`): which attention, which FFN,
which memory before the block. Runs of kinds are encoded into segments; each segment repeats a
pattern of one or two kinds and is one `nn.scan` over the repeats, so compile time grows with the
number of segments, not with depth (V4-Flash: 43 layers in 3 segments; V3: 2). Parameters of
segment `layers_3_42` are stacked [repeats, ...] per pattern slot `block_0`, `block_1`; layer
l = start + repeat · period + slot.
"""

import dataclasses
from typing import Any, NamedTuple

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from deepseek_jax.axes import constrain
from deepseek_jax.config import ConfigError, ModelConfig, RopeConfig
from deepseek_jax.layers.attention.compressor import CSA_RATIO
from deepseek_jax.layers.moe.layer import ROUTER_COLLECTION, MoEAux

SCAN_COLLECTIONS = {"params": 0, ROUTER_COLLECTION: 0, "intermediates": 0}
ACT_BTD = ("act_batch", "act_seq", "act_embed")


class LayerKind(NamedTuple):
    """The parts of one block; equal kinds share a scan."""

    attention: str  # "mla" | "dsa" (MLA + lightning indexer) | "v4" (shared-KV; by `ratio`)
    ratio: int  # V4 compress ratio: 0 sliding window only, 4 CSA, other HCA; 0 for MLA kinds
    ffn: str  # "dense" (SwiGLU) | "moe" (learned routing) | "hash" (token-id routing)
    memory: str = "none"  # a memory read before the block: "engram_j" (table j of model.engram) | "none"
    share: str = "none"  # V4.1 shared-KV role (layers/attention/v41.py): source | candidate | reindex |
    # reuse; "none" otherwise (V4, MLA, ratio-0 layers)
    capture: bool = False  # the block's input (mean of the streams) is handed to DSpark (V4.1)

    @property
    def produces(self) -> bool:
        """A layer whose state (entries, keys, picks) later layers read: it is its own scan segment."""
        return self.share in ("source", "candidate", "reindex")


class Segment(NamedTuple):
    start: int  # first layer
    kinds: tuple[LayerKind, ...]  # the repeated pattern, one kind per slot
    repeats: int

    @property
    def name(self) -> str:
        end = self.start + len(self.kinds) * self.repeats - 1
        return f"layers_{self.start}" if end == self.start else f"layers_{self.start}_{end}"

    def layers(self, slot: int) -> list[int]:
        """The layer index of each repeat of pattern slot `slot`."""
        return [self.start + r * len(self.kinds) + slot for r in range(self.repeats)]


def attention_kind(cfg: ModelConfig, layer: int) -> tuple[str, int]:
    """(attention, ratio) of layer `layer` (MTP layers follow the main ones)."""
    if cfg.v4 is not None:
        return "v4", cfg.compress_ratios[layer]
    return ("mla" if cfg.index is None else "dsa"), 0


def share_role(cfg: ModelConfig, layer: int) -> str:
    """A main layer's role in V4.1's shared-KV schedule (`LayerKind.share`)."""
    s = cfg.shared_kv
    if s is None or layer >= cfg.n_layers or cfg.compress_ratios[layer] == 0:
        return "none"
    if layer == s.candidate_source_layer:
        return "candidate"
    if layer in s.kv_source_layers:
        return "source"
    return "reindex" if layer in s.index_source_layers else "reuse"


def layer_kinds(cfg: ModelConfig) -> list[LayerKind]:
    """The kind of each main-model layer: the first n_dense_layers have a dense FFN, the next
    moe.n_hash_layers route by token id, the rest by the learned router; Engram before the layers
    `engram.layer_ids` lists; V4.1's shared-KV role."""
    kinds = []
    engram = () if cfg.engram is None else cfg.engram.layer_ids
    for layer in range(cfg.n_layers):
        moe_index = layer - cfg.n_dense_layers
        ffn = "dense" if moe_index < 0 else "hash" if moe_index < cfg.moe.n_hash_layers else "moe"
        memory = f"engram_{engram.index(layer)}" if layer in engram else "none"
        capture = cfg.dspark is not None and layer in cfg.dspark.target_layers
        kinds.append(LayerKind(*attention_kind(cfg, layer), ffn, memory, share_role(cfg, layer), capture))
    return kinds


def mtp_kind(cfg: ModelConfig, k: int) -> LayerKind:
    """MTP module k's block: the attention configured for layer n_layers + k, learned-routing MoE."""
    return LayerKind(*attention_kind(cfg, cfg.n_layers + k), "moe")


def layer_segments(kinds: list[LayerKind]) -> list[Segment]:
    """Greedy run-length encoding: period 1 if it repeats, else period 2 if that repeats, else 1.
    A kind that produces shared state (V4.1 sources and indexers) is always a segment of its own."""
    produces = lambda kind: getattr(kind, "produces", False)  # noqa: E731 (any hashable kind encodes)
    segments, i = [], 0
    while i < len(kinds):
        if produces(kinds[i]):
            segments.append(Segment(i, (kinds[i],), 1))
            i += 1
            continue
        for period in (1, 2):
            pattern, reps = tuple(kinds[i : i + period]), 1
            if any(map(produces, pattern)):
                continue
            while tuple(kinds[i + reps * period : i + (reps + 1) * period]) == pattern:
                reps += 1
            if reps >= 2:
                break
        else:
            pattern, reps = (kinds[i],), 1
        segments.append(Segment(i, pattern, reps))
        i += len(pattern) * reps
    return segments


def has_index_loss(cfg: ModelConfig) -> bool:
    """Whether the model has blocks with an indexer KL (`index_loss=True`): DSA blocks (V3.2), or V4
    CSA layers (not V4.1's shared-KV indexers), main or MTP."""
    kinds = layer_kinds(cfg) + [mtp_kind(cfg, k) for k in range(cfg.num_nextn_predict_layers)]
    v4_csa = lambda k: k.attention == "v4" and k.ratio == CSA_RATIO and cfg.shared_kv is None  # noqa: E731
    return any(k.attention == "dsa" or v4_csa(k) for k in kinds)


def layer_rope(cfg: ModelConfig, kind: LayerKind) -> RopeConfig:
    """MLA: the model's RoPE. V4: the main θ without YaRN for sliding-window layers, the compressed
    θ with the model's YaRN for CSA / HCA layers."""
    if kind.attention != "v4":
        return cfg.rope
    if kind.ratio == 0:
        return dataclasses.replace(cfg.rope, rope_factor=1.0)
    return dataclasses.replace(cfg.rope, rope_theta=cfg.v4.compress_rope_theta)


# ----------------------------------------------------------------------------------------------
# Outputs


class MTPOutput(NamedTuple):
    logits: jax.Array | None  # [K, B, T, V] float32; slot i of depth k predicts t_{i+k+1}
    hidden: jax.Array  # [K, B, T, D] after each module's norm (what the head reads)
    routing: MoEAux  # per depth, stacked [K, ...]
    index_loss: jax.Array | None  # [K] indexer KL of DSA / V4 CSA blocks (with index_loss=True)


class ModelOutput(NamedTuple):
    logits: jax.Array | None  # [B, T, V] float32 (None with return_logits=False)
    hidden: jax.Array  # [B, T, D] after the final norm (what the head reads)
    cache: Any  # the updated decode cache, or None
    routing: (
        MoEAux | None
    )  # per MoE layer in layer order: counts [L_moe, E] (text), counts_vl [L_moe, E] (media spans), balance_loss,
    # dropped [L_moe]
    index_loss: jax.Array | None  # [L_dsa or L_csa] per-layer indexer KL (DSA / V4 CSA blocks, index_loss=True)
    mtp: MTPOutput | None  # None without MTP modules, with mtp=False, or when decoding
    captures: jax.Array | None = None  # [B, T, n_targets · D]: DSpark's target-layer inputs (V4.1)
    dspark: Any = None  # models/dspark.py DSparkOutput: teacher-forced drafts of every position (training)


class LayerStats(NamedTuple):
    """What one block reports: its MoE statistics and its indexer KL (None where it has none)."""

    routing: MoEAux | None
    index_loss: jax.Array | None


def in_layer_order(items: list[tuple[list[int], Any]]) -> Any:
    """Stacked per-slot statistics [(layer indices, pytree with leading [R])] -> one pytree with
    leading [n] in layer order; None when there are none."""
    items = [(layers, v) for layers, v in items if v is not None]
    if not items:
        return None
    order = np.argsort(np.concatenate([layers for layers, _ in items]), kind="stable")
    stacked = jax.tree.map(lambda *a: jnp.concatenate(a), *[v for _, v in items])
    if (order == np.arange(order.size)).all():
        return stacked
    return jax.tree.map(lambda a: a[order], stacked)


# ----------------------------------------------------------------------------------------------
# Embedding, head, shifts


def embed(table_VD: jax.Array, tokens_BT: jax.Array, dtype) -> jax.Array:
    """Rows of the table in the compute dtype. The lookup reads a whole table (gathered once, as
    FSDP gathers any weight): a lookup into a D-split table would make the backward's scatter
    re-layout the batch-split cotangent."""
    table_VD = constrain(table_VD, (None, None))
    return constrain(jnp.take(table_VD, tokens_BT, axis=0).astype(dtype), ACT_BTD)


def head(h_BTD: jax.Array, w_head_DV: jax.Array) -> jax.Array:
    """Logits [B, T, V] in float32 from the compute-dtype hidden state."""
    logits_BTV = jnp.einsum(
        "BTD,DV->BTV", h_BTD, w_head_DV.astype(h_BTD.dtype), preferred_element_type=jnp.float32
    )
    return constrain(logits_BTV, ("act_batch", "act_seq", "act_vocab"))


def shift_left(x_BT: jax.Array, k: int, fill=0) -> jax.Array:
    """x[:, i + k] at slot i; the last k slots get `fill` (their targets are masked in the loss)."""
    return jnp.concatenate([x_BT[:, k:], jnp.full_like(x_BT[:, :k], fill)], axis=1)


# ----------------------------------------------------------------------------------------------
# Remat

ATTENTION_OUT = "attention_out"  # checkpoint_name of each block's attention output


def remat_policy(name: str):
    """(wrap?, jax.checkpoint policy) for `model.remat`."""
    policies = jax.checkpoint_policies
    table = {
        "none": (False, None),
        "full": (True, None),  # save nothing: recompute the whole block in the backward
        "save_dots": (
            True,
            policies.dots_with_no_batch_dims_saveable,
        ),  # projections, not attention
        "save_attention": (True, policies.save_only_these_names(ATTENTION_OUT)),
        "offload": (True, policies.offload_dot_with_no_batch_dims("device", "pinned_host")),
    }
    if name not in table:
        raise ConfigError(f"model.remat={name!r}: expected one of {sorted(table)}")
    return table[name]


def check_remat_backend(cfg: ModelConfig, platform: str) -> None:
    """remat=offload needs a host memory space XLA:CPU does not have; say so before compiling."""
    if cfg.remat == "offload" and platform == "cpu":
        raise ConfigError(
            "model.remat=offload moves saved activations to pinned host memory, which needs a GPU "
            "or TPU; on CPU use none | full | save_dots | save_attention"
        )


def scan_segment(block_cls: type[nn.Module], seg: Segment, remat: str, **attrs) -> nn.Module:
    """`block_cls(kinds=seg.kinds, **attrs)` under nn.scan over the segment's repeats (and under
    jax.checkpoint with the remat policy): carries the residual, scans caches, broadcasts inputs."""
    wrap, policy = remat_policy(remat)
    if wrap:
        block_cls = nn.remat(
            block_cls, policy=policy, prevent_cse=False
        )  # scan prevents CSE already
    scanned = nn.scan(
        block_cls,
        variable_axes=SCAN_COLLECTIONS,
        split_rngs={"params": True},
        in_axes=(0, nn.broadcast),
        length=seg.repeats,
        metadata_params={nn.PARTITION_NAME: "layers"},
    )
    return scanned(kinds=seg.kinds, name=seg.name, **attrs)
