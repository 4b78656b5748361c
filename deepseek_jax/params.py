"""Parameter counts of a model config, from `jax.eval_shape` of the model's init (no allocation).

Every parameter falls in one category, by its path and logical axes:

    embedding   the [V, D] token table        head       the [D, V] output projection
    attention   MLA projections and norms     norms      block pre-norms and the final norm
    dense_ffn   SwiGLU of the dense blocks    routed     experts (leaves with an `experts` axis)
    shared      shared experts                router     the [D, E] gate
    mhc         V4 hyper-connection maps (attn_hc, ffn_hc, hc_head)
    engram_table  Engram's hashed n-gram tables (their real rows; `engram_padding` counts the zero rows
                a table is padded with so that it shards evenly, layers/engram.py `table_rows`)
    engram      Engram's projections and gate weights
    mtp_routed, mtp_other   everything under `mtp_*` and `dspark` (V4.1's drafter), split into routed
                experts and the rest (MTP shares the embedding and head, so the checkpoint's copies of
                them are not counted)
    vision, aligner, audio, delimiters   the media front-ends under `media/` (models/media.py): the
                ViT, its pixel-unshuffle aligner, the audio front-end, the learned span delimiters

Activated parameters per token count the routed experts at A/E (top-A of E) and everything else in
the main model in full, except Engram tables, of which a token reads (N − 1)·n_heads rows per Engram
layer; `active` includes the embedding table, `active_no_embedding` leaves it out
(a lookup, not a matmul; DeepSeek's published 36.6B ≈ "37B" is this one, see
tests/test_param_count.py). `mtp_active` is the same for the MTP modules, without embedding or head.
"""

import functools
import math

import flax.linen as nn
import jax

from deepseek_jax.config import ModelConfig
from deepseek_jax.models import LayerKind, build_model, init_inputs, layer_kinds, mtp_kind

CATEGORIES = (
    "embedding", "attention", "norms", "dense_ffn", "routed", "shared", "router", "mhc", "head",
    "engram_table", "engram", "mtp_routed", "mtp_other", "vision", "aligner", "audio", "delimiters",
)
MEDIA = ("vision", "aligner", "audio", "delimiters")  # front-ends: not in a text token's activated count


def param_shapes(cfg: ModelConfig) -> dict[str, tuple[tuple[int, ...], tuple]]:
    """'a/b/c' -> (shape, logical axes) for every parameter, from an abstract init."""
    tokens, kw = init_inputs(cfg)
    abstract = jax.eval_shape(functools.partial(build_model(cfg).init, **kw), jax.random.key(0), tokens)
    is_boxed = lambda x: isinstance(x, nn.Partitioned)  # noqa: E731
    out = {}
    # the selection biases are released tensors (`ffn.gate.bias`, `bias_vl`): counted with the router
    leaves = [(path, leaf) for path, leaf in jax.tree_util.tree_leaves_with_path(abstract["params"], is_leaf=is_boxed)]
    leaves += [(path, leaf) for path, leaf in jax.tree_util.tree_leaves_with_path(
        abstract.get("router", {}), is_leaf=is_boxed) if str(getattr(path[-1], "key", "")).startswith("bias")]
    for path, leaf in leaves:
        name = "/".join(str(getattr(k, "key", k)) for k in path)
        axes = tuple(leaf.names) if is_boxed(leaf) else (None,) * len(leaf.shape)
        out[name] = (tuple(nn.unbox(leaf).shape), axes)
    return out


def category(name: str, axes: tuple) -> str:
    """The CATEGORIES entry of parameter `name` (a '/'-joined path) with logical `axes`."""
    parts = name.split("/")
    if parts[0] == "media":
        return parts[1] if parts[1] in ("vision", "aligner", "audio") else "delimiters"
    if parts[0].startswith("mtp_") or parts[0] == "dspark":
        return "mtp_routed" if "experts" in axes else "mtp_other"
    if "engram" in parts:
        return "engram_table" if parts[-1] == "table" else "engram"
    if parts[0] in ("embedding", "w_head"):
        return {"embedding": "embedding", "w_head": "head"}[parts[0]]
    if "attn" in parts:
        return "attention"
    if "experts" in axes:
        return "routed"
    if "shared" in parts:
        return "shared"
    if parts[-1] in ("w_router", "bias", "bias_vl"):
        return "router"
    if any(p in ("attn_hc", "ffn_hc", "hc_head") for p in parts):
        return "mhc"
    if len(parts) > 1 and parts[-2] in ("attn_norm", "ffn_norm", "final_norm"):
        return "norms"
    if "ffn" in parts:  # what is left of an FFN (routed, shared, router went above): a dense SwiGLU
        return "dense_ffn"
    raise ValueError(f"parameter {name} fits no category; extend deepseek_jax/params.py")


def count_by_category(cfg: ModelConfig) -> dict[str, int]:
    """Parameters per CATEGORIES entry (all layers summed)."""
    counts = dict.fromkeys(CATEGORIES, 0)
    for name, (shape, axes) in param_shapes(cfg).items():
        counts[category(name, axes)] += math.prod(shape)
    return counts


def count_params(cfg: ModelConfig) -> dict[str, int]:
    """Per-category counts + `main mtp total active active_no_embedding mtp_active`."""
    counts = count_by_category(cfg)
    e = cfg.engram
    rows = 0 if e is None else sum(e.num_embeddings) * e.head_dim  # the real rows; the rest is padding
    padding, counts["engram_table"] = counts["engram_table"] - rows, rows
    mtp = counts["mtp_routed"] + counts["mtp_other"]
    main = sum(counts.values()) - mtp
    A, E = cfg.moe.n_activated_experts, cfg.moe.n_routed_experts
    read = 0 if e is None else len(e.layer_ids) * e.n_columns * e.head_dim  # table rows a token reads
    media = sum(counts[k] for k in MEDIA)  # run once per picture / clip, not per token
    active = main - media - counts["routed"] + counts["routed"] * A // E - rows + read
    dspark = cfg.dspark
    mtp_A_E = (A, E) if dspark is None else (dspark.n_activated_experts, dspark.n_routed_experts)
    return {
        **counts,
        "engram_padding": padding,
        "media": media,
        "main": main,
        "mtp": mtp,
        "total": main + mtp,
        "active": active,
        "active_no_embedding": active - counts["embedding"],
        "mtp_active": counts["mtp_other"] + counts["mtp_routed"] * mtp_A_E[0] // mtp_A_E[1],
    }


def _row(label: str, n: int, note: str = "") -> str:
    return f"{label:<34}{n:>18,}  {n / 1e9:>9.3f}B  {note}".rstrip()


def param_summary(cfg: ModelConfig) -> str:
    """A table of parameter counts: embedding, per-layer blocks, head, MTP, totals and activated."""
    c, L, Ld, Lm = count_params(cfg), cfg.n_layers, cfg.n_dense_layers, cfg.n_moe_layers
    E, A = cfg.moe.n_routed_experts, cfg.moe.n_activated_experts
    per = lambda key, n: c[key] // n if n else 0  # noqa: E731
    rows = [
        _row("embedding [V, D]", c["embedding"]),
        _row("attention, per layer (mean)", per("attention", L), f"x {L}"),
        _row("dense FFN, per layer", per("dense_ffn", Ld), f"x {Ld}"),
        _row("MoE routed experts, per layer", per("routed", Lm), f"x {Lm}, {E} experts, top-{A}"),
        _row("MoE shared experts, per layer", per("shared", Lm), f"x {Lm}"),
        _row("MoE router, per layer", per("router", Lm), f"x {Lm}"),
        _row("mHC maps (all)", c["mhc"]),
        *([_row("Engram tables (real rows)", c["engram_table"], f"+ {c['engram_padding']:,} padding"),
           _row("Engram projections", c["engram"])] if cfg.engram else []),
        *([_row(f"media: {k}", c[k]) for k in MEDIA if c[k]]),
        _row("norms (all)", c["norms"]),
        _row("head [D, V]", c["head"]),
        _row("main model", c["main"]),
        _row("MTP modules", c["mtp"], f"x {cfg.num_nextn_predict_layers}, embedding/head shared"),
        _row("total", c["total"]),
        _row("activated per token", c["active"], "incl. embedding" + (", not media" if c["media"] else "")),
        _row("activated per token, no embedding", c["active_no_embedding"]),
        _row("MTP activated per token", c["mtp_active"], "without embedding and head"),
    ]
    return "\n".join([f"{'parameters':<34}{'count':>18}", *rows])


def train_flops_per_token(cfg: ModelConfig, seq_len: int) -> float:
    """Model FLOPs per trained token (forward + backward = 3 x forward), for MFU.

    Matmuls: 6 x activated parameters, without the embedding lookup but with the head, plus each
    MTP module and its pass through the head. Causal attention: per layer and token, q.k over
    (H+R) and p.v over O for T/2 keys on average, 2 FLOPs per multiply-add, times 3.
    """
    c, K = count_params(cfg), cfg.num_nextn_predict_layers
    matmul = c["active_no_embedding"] + K * (c["mtp_active"] + c["head"])
    return 6.0 * matmul + 3.0 * 2 * attention_macs_per_token(cfg, seq_len)


def _layer_attention_macs(cfg: ModelConfig, kind: LayerKind, T: int) -> float:
    """One layer's attention multiply-adds per token (see attention_macs_per_token)."""
    if kind.attention != "v4":
        m, keys, index = cfg.mla, T / 2, 0.0
        if kind.attention == "dsa":
            index = cfg.index.index_n_heads * cfg.index.index_head_dim * T / 2
            keys = min(keys, cfg.index.index_topk)
        return m.n_heads * (m.qk_head_dim + m.v_head_dim) * keys + index
    v, keys, index = cfg.v4, min(cfg.v4.window_size, T / 2), 0.0
    if kind.ratio == 4:
        keys += min(v.index_topk, T / 8)
        index = v.index_n_heads * v.index_head_dim * T / 8
    elif kind.ratio:
        keys += T / (2 * kind.ratio)
    return v.n_heads * 2 * v.head_dim * keys + index


def attention_macs_per_token(cfg: ModelConfig, seq_len: int) -> float:
    """Score + value multiply-adds per token, summed over layers (MTP included), averaged over the
    positions of a causal sequence. MLA: all earlier keys (V3.2 DSA: at most index_topk of them, its
    indexer's O(T) scores over P heads of Y dims counted too). V4: window + compressed entries (CSA:
    at most index_topk, plus its indexer over T/4 entries; HCA: all T/m), head_dim for q·k and p·v."""
    kinds = layer_kinds(cfg) + [mtp_kind(cfg, k) for k in range(cfg.num_nextn_predict_layers)]
    return sum(_layer_attention_macs(cfg, kind, seq_len) for kind in kinds)
