"""Attention layers: MLA (optionally with the V3.2 DSA indexer) and DeepSeek-V4's compressed
attention; core.py holds what they share."""

from deepseek_jax.layers.attention.indexer import CSAIndexer, DSAIndexer
from deepseek_jax.layers.attention.mla import MLA, LatentCache, init_mla_cache
from deepseek_jax.layers.attention.v4 import (
    CSACache,
    HCACache,
    SWACache,
    V4Attention,
    init_v4_attention_cache,
)

__all__ = [
    "MLA",
    "CSACache",
    "CSAIndexer",
    "DSAIndexer",
    "HCACache",
    "LatentCache",
    "SWACache",
    "V4Attention",
    "init_mla_cache",
    "init_v4_attention_cache",
]
