"""The one registry of model variants, keyed by the config: nothing else asks which family it has.

`build_model(cfg)` is the decoder (every variant is a config of it), `build_cache` its empty decode
cache, `router_bias_rows` where each selection bias sits and which rows of the routing counts
update it, `converter(cfg)` the checkpoint name table (V3 / V3.2, V4, V4.1 or the article's MLA on mHC)
the config has.
"""

from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from deepseek_jax.config import ConfigError, ModelConfig
from deepseek_jax.layers.attention import init_mla_cache, init_v4_attention_cache
from deepseek_jax.layers.attention.cache_store import storage_formats
from deepseek_jax.layers.attention.v41 import init_v41_attention_cache
from deepseek_jax.layers.engram import init_engram_cache
from deepseek_jax.models.common import (
    LayerKind,
    ModelOutput,
    MTPOutput,
    check_remat_backend,
    layer_kinds,
    layer_segments,
    mtp_kind,
)
from deepseek_jax.models.decoder import Decoder
from deepseek_jax.models.media import init_media

__all__ = [
    "BiasRows",
    "Decoder",
    "LayerKind",
    "MTPOutput",
    "ModelOutput",
    "build_cache",
    "build_model",
    "check_remat_backend",
    "converter",
    "init_inputs",
    "layer_kinds",
    "layer_segments",
    "mtp_kind",
    "router_bias_rows",
]


def build_model(cfg: ModelConfig) -> Decoder:
    return Decoder(cfg)


def init_inputs(cfg: ModelConfig, T: int = 8) -> tuple[jax.Array, dict]:
    """A one-row dummy batch for `model.init`: tokens [1, T] and the keyword arguments the model
    requires with them (Engram: all-zero row ids [1, T, L_engram, K]; vision / video / audio: a
    small dummy `media`, so that every media parameter is created)."""
    tokens, kwargs = jnp.zeros((1, T), jnp.int32), {}
    if cfg.engram is not None:
        kwargs["engram_rows"] = jnp.zeros((1, T, *cfg.engram.rows_shape), jnp.int32)
    if (media := init_media(cfg, T)) is not None:
        kwargs["media"] = media
    return tokens, kwargs


def _layer_cache(cfg: ModelConfig, kind: LayerKind, batch: int, max_len: int, dtype):
    if kind.memory != "none":  # (attention, memory) caches
        streams = 1 if cfg.mhc is None else cfg.mhc.hc_mult
        memory = init_engram_cache(cfg.engram, streams, cfg.dim, batch, dtype)
        return _layer_cache(cfg, kind._replace(memory="none"), batch, max_len, dtype), memory
    if kind.attention == "v4" and cfg.shared_kv is not None:
        return init_v41_attention_cache(cfg.v4, kind.ratio, kind.share, batch, max_len, dtype)
    if kind.attention == "v4":  # rows stored per model.cache_storage (cache_store.py)
        formats = storage_formats(cfg, cfg.cache_storage)
        return init_v4_attention_cache(cfg.v4, kind.ratio, batch, max_len, dtype, formats)
    return init_mla_cache(
        cfg.mla, cfg.index if kind.attention == "dsa" else None, batch, max_len, dtype
    )


def build_cache(cfg: ModelConfig, batch: int, max_len: int, dtype=None) -> dict:
    """An empty decode cache: per segment, a tuple over its pattern slots of per-layer caches
    stacked [repeats, ...] (MLA: latents and rope keys, + indexer keys for DSA; V4: window ring,
    compressed entries, compressor and indexer state)."""
    dtype = jnp.dtype(dtype or cfg.dtype)
    cache = {}
    for seg in layer_segments(layer_kinds(cfg)):
        slots = []
        for kind in seg.kinds:
            one = _layer_cache(cfg, kind, batch, max_len, dtype)
            slots.append(jax.tree.map(lambda a: jnp.broadcast_to(a, (seg.repeats, *a.shape)), one))
        cache[seg.name] = tuple(slots)
    return cache


class BiasRows(NamedTuple):
    """A selection bias in the `router` collection and the routing counts that update it."""

    path: tuple[str, ...]  # e.g. ("layers_3_42", "block_1", "ffn", "bias"), stacked [R, E]
    # "main": ModelOutput.routing.counts; "mtp": .mtp.routing.counts; "dspark": .dspark.routing.counts;
    # "main_vl": the main routing's `counts_vl` (media-span tokens), which update a main block's `bias_vl`
    source: str
    rows: tuple[int, ...] | int  # the counts' rows, in the bias's order (an int: an unstacked [E])


def router_bias_rows(cfg: ModelConfig) -> list[BiasRows]:
    """Every learned-routing MoE layer's bias, MTP (or DSpark's stages) included (hash-routed and dense
    layers have none); then, with moe.vl_bias (V4.1), each main block's `bias_vl` with the same rows of
    `counts_vl` (source "main_vl"). MTP's and DSpark's MoEs hold a bias_vl too (the checkpoint's), but no
    span_BT reaches them: their counts_vl are always zero, so they are not listed and never move."""
    kinds = layer_kinds(cfg)
    moe_row = np.cumsum([k.ffn != "dense" for k in kinds]) - 1  # layer -> row of routing.counts
    rows = []
    for seg in layer_segments(kinds):
        for k, kind in enumerate(seg.kinds):
            if kind.ffn == "moe":
                rows.append(
                    BiasRows(
                        (seg.name, f"block_{k}", "ffn", "bias"),
                        "main",
                        tuple(int(moe_row[layer]) for layer in seg.layers(k)),
                    )
                )
    for k in range(cfg.num_nextn_predict_layers):
        if cfg.dspark is not None:  # V4.1: the MTP layers are DSpark stages (models/dspark.py)
            rows.append(BiasRows(("dspark", f"stage_{k}", "ffn", "bias"), "dspark", k))
        else:
            rows.append(BiasRows((f"mtp_{k}", "block", "ffn", "bias"), "mtp", k))
    if cfg.moe.vl_bias:  # only the main blocks' bias_vl see span tokens (see the docstring)
        rows += [BiasRows((*r.path[:-1], "bias_vl"), "main_vl", r.rows) for r in rows if r.source == "main"]
    return rows


def converter(cfg: ModelConfig):
    """The checkpoint family (convert/table.py `Family`) of this composition: `convert.v3.FAMILY`
    (DeepSeek-V3 / V3.2: MLA blocks on a plain residual), `convert.article.FAMILY` (MLA / DSA blocks on
    mHC streams, the article's model: official names per part, no release), `convert.v4.FAMILY`
    (DeepSeek-V4: V4 attention on mHC streams) or `convert.v41.FAMILY` (DeepSeek-V4.1: the same with
    `shared_kv`)."""
    from deepseek_jax.convert import article, v3, v4, v41  # the converters read the registry's layer plan

    attention = {k.attention for k in layer_kinds(cfg)}
    if attention <= {"mla", "dsa"}:
        return v3.FAMILY if cfg.mhc is None else article.FAMILY
    if attention == {"v4"} and cfg.mhc is not None:
        return v4.FAMILY if cfg.shared_kv is None else v41.FAMILY
    raise ConfigError(
        f"no released checkpoint layout holds this composition (attention {sorted(attention)}, "
        f"residual {'mHC' if cfg.mhc else 'plain'}): it can be trained and saved with Orbax, not converted"
    )
