"""The name table between our DeepSeek-V4 variables and HF transformers' DeepseekV4 state dict, both ways.

HF names are per layer (`model.layers.{l}.self_attn.q_a_proj.weight`, ...); ours are per segment of
the decoder's plan (models/common.py: `params/layers_3_42/block_1/attn/w_dq`, stacked over repeats: layer l = start +
repeat * period + slot). Layer kinds decide which rules apply: a compressor for ratio > 0, the
indexer for CSA (ratio 4), `tid2eid` for hash-routed layers and the selection bias otherwise.

HF transformers does not instantiate V4's MTP module; its tensors, when a checkpoint has them, use
HF-style names under `mtp.{k}.` (the released `mtp.0.*` with HF's renames: `e_proj`, `h_proj`,
`enorm`, `hnorm`, `norm`, `hc_head.hc_*`, and the block's `self_attn` / `mlp` / `attn_hc` / `ffn_hc`
/ norms). A config with MTP converting a state dict without them is an error naming the tensors.

mHC `fn` is HF's [Z, I·D] (column i·D + d) and ours [I, D, Z]. Routed experts are HF's fused
`gate_up_proj [E, 2F, D]` / `down_proj [E, D, F]` or per-expert tensors, as for V3.
"""

from collections.abc import Mapping

import flax.linen as nn
import jax
import numpy as np

from deepseek_jax.config import MHCConfig, ModelConfig, MoEConfig, RopeConfig, V4AttentionConfig
from deepseek_jax.convert.hf import (
    ConversionError, _down, _down_back, _gate_up, _gate_up_back, _get, _same, _same_back, _set, _split, _t,
    _t_back, fuse_experts, unfuse_experts,
)
from deepseek_jax.models.common import LayerKind, layer_kinds, layer_segments, mtp_kind

CSA_RATIO = 4


def _heads(n, d):  # HF [n*d, In] <-> ours [In, n, d]
    return (lambda a, c: (a.T.reshape(a.shape[1], n(c), d(c)),), lambda w, c: w.reshape(w.shape[0], -1).T)


def _hc_fn(a, c):  # [Z, I*D] -> [I, D, Z]
    return (a.reshape(a.shape[0], c.mhc.hc_mult, c.dim).transpose(1, 2, 0),)


def _hc_fn_back(w, c):
    return w.transpose(2, 0, 1).reshape(w.shape[2], -1)


def _o_a(a, c):  # [W*Y, P*X] -> [W, P, X, Y]
    v = c.v4
    return (a.reshape(v.o_groups, v.o_lora_rank, v.n_heads // v.o_groups, v.head_dim).transpose(0, 2, 3, 1),)


def _o_a_back(w, c):
    W, P, X, Y = w.shape
    return w.transpose(0, 3, 1, 2).reshape(W * Y, P * X)


def _o_b(a, c):  # [D, W*Y] -> [W, Y, D]
    return (a.T.reshape(c.v4.o_groups, c.v4.o_lora_rank, -1),)


def _o_b_back(w, c):
    return w.reshape(-1, w.shape[-1]).T


def _tid2eid(a, c):
    return (a.astype(np.int32),)


def _tid2eid_back(w, c):
    return w.astype(np.int64)


LIN, VEC = (_t, _t_back), (_same, _same_back)
ALWAYS = lambda kind: True  # noqa: E731
COMPRESSED = lambda kind: kind.ratio > 0  # noqa: E731
CSA = lambda kind: kind.ratio == CSA_RATIO  # noqa: E731
# (our path, HF name, (to ours, to HF), when(kind)); kind = the layer's models.LayerKind
ATTN = (
    ("attn/w_dq", "self_attn.q_a_proj.weight", LIN, ALWAYS),
    ("attn/q_norm/scale", "self_attn.q_a_norm.weight", VEC, ALWAYS),
    ("attn/w_uq", "self_attn.q_b_proj.weight", _heads(lambda c: c.v4.n_heads, lambda c: c.v4.head_dim), ALWAYS),
    ("attn/w_kv", "self_attn.kv_proj.weight", LIN, ALWAYS),
    ("attn/kv_norm/scale", "self_attn.kv_norm.weight", VEC, ALWAYS),
    ("attn/w_oa", "self_attn.o_a_proj.weight", (_o_a, _o_a_back), ALWAYS),
    ("attn/w_ob", "self_attn.o_b_proj.weight", (_o_b, _o_b_back), ALWAYS),
    ("attn/sink", "self_attn.sinks", VEC, ALWAYS),
    ("attn/compressor/w_kv", "self_attn.compressor.kv_proj.weight", LIN, COMPRESSED),
    ("attn/compressor/w_gate", "self_attn.compressor.gate_proj.weight", LIN, COMPRESSED),
    ("attn/compressor/ape", "self_attn.compressor.position_bias", VEC, COMPRESSED),
    ("attn/compressor/norm/scale", "self_attn.compressor.kv_norm.weight", VEC, COMPRESSED),
    ("attn/indexer/w_uq", "self_attn.compressor.indexer.q_b_proj.weight",
     _heads(lambda c: c.v4.index_n_heads, lambda c: c.v4.index_head_dim), CSA),
    ("attn/indexer/w_weights", "self_attn.compressor.indexer.scorer.weights_proj.weight", LIN, CSA),
    ("attn/indexer/compressor/w_kv", "self_attn.compressor.indexer.kv_proj.weight", LIN, CSA),
    ("attn/indexer/compressor/w_gate", "self_attn.compressor.indexer.gate_proj.weight", LIN, CSA),
    ("attn/indexer/compressor/ape", "self_attn.compressor.indexer.position_bias", VEC, CSA),
    ("attn/indexer/compressor/norm/scale", "self_attn.compressor.indexer.kv_norm.weight", VEC, CSA),
)
BLOCK = ATTN + (
    ("attn_norm/scale", "input_layernorm.weight", VEC, ALWAYS),
    ("ffn_norm/scale", "post_attention_layernorm.weight", VEC, ALWAYS),
    *((f"{site}_hc/fn", f"{site}_hc.fn", (_hc_fn, _hc_fn_back), ALWAYS) for site in ("attn", "ffn")),
    *((f"{site}_hc/{p}", f"{site}_hc.{p}", VEC, ALWAYS) for site in ("attn", "ffn") for p in ("base", "scale")),
    ("ffn/w_router", "mlp.gate.weight", LIN, ALWAYS),
    ("router:ffn/bias", "mlp.gate.e_score_correction_bias", VEC, lambda kind: kind.ffn == "moe"),
    ("router:ffn/tid2eid", "mlp.gate.tid2eid", (_tid2eid, _tid2eid_back), lambda kind: kind.ffn == "hash"),
    (("ffn/w_gate", "ffn/w_up"), "mlp.experts.gate_up_proj", (_gate_up, _gate_up_back), ALWAYS),
    ("ffn/w_down", "mlp.experts.down_proj", (_down, _down_back), ALWAYS),
    *((f"ffn/shared/w_{p}", f"mlp.shared_experts.{p}_proj.weight", LIN, ALWAYS) for p in ("gate", "up", "down")),
)
HEAD = (
    ("hc_head/fn", "hc_head.hc_fn", (_hc_fn, _hc_fn_back), ALWAYS),
    ("hc_head/base", "hc_head.hc_base", VEC, ALWAYS),
    ("hc_head/scale", "hc_head.hc_scale", VEC, ALWAYS),
)


def _in_block(path):
    if isinstance(path, tuple):
        return tuple(_in_block(p) for p in path)
    return f"router:block/{path[7:]}" if path.startswith("router:") else f"block/{path}"


MTP = tuple((_in_block(p), n, f, w) for p, n, f, w in BLOCK) + HEAD + (
    ("w_e", "e_proj.weight", LIN, ALWAYS),
    ("w_h", "h_proj.weight", LIN, ALWAYS),
    *((f"{p}/scale", f"{p}.weight", VEC, ALWAYS) for p in ("enorm", "hnorm", "norm")),
)
GLOBAL = (
    ("embedding", "model.embed_tokens.weight", VEC, ALWAYS),
    ("final_norm/scale", "model.norm.weight", VEC, ALWAYS),
    ("w_head", "lm_head.weight", LIN, ALWAYS),
) + tuple((f"hc_head/{p.split('/')[1]}", f"model.{n}", f, w) for p, n, f, w in HEAD)


def _scopes(cfg: ModelConfig):
    """(our scope keys, repeat index or None, HF prefix, rules, kind) for every layer and the globals."""
    for seg in layer_segments(layer_kinds(cfg)):
        for r in range(seg.repeats):
            for k, kind in enumerate(seg.kinds):
                layer = seg.start + r * len(seg.kinds) + k
                yield [seg.name, f"block_{k}"], r, f"model.layers.{layer}.", BLOCK, kind
    for k in range(cfg.num_nextn_predict_layers):
        yield [f"mtp_{k}"], None, f"mtp.{k}.", MTP, mtp_kind(cfg, k)
    yield [], None, "", GLOBAL, LayerKind("v4", 0, "moe")


def _paths(path) -> tuple[str, ...]:
    return path if isinstance(path, tuple) else (path,)


def _full(scope: list[str], path: str) -> list[str]:
    col, keys = _split(path)
    return [col] + scope + keys


def hf_to_variables(state: Mapping[str, np.ndarray], cfg: ModelConfig) -> dict:
    """HF DeepseekV4 state dict (numpy; fused or per-expert experts) -> our `{"params", "router"}`.
    Shapes are checked against the model's own abstract variables by `check_shapes`."""
    state = fuse_experts({k: np.asarray(v) for k, v in state.items()})
    used, missing, stacks = set(), [], {}
    for scope, r, prefix, rules, kind in _scopes(cfg):
        for path, name, (to_ours, _), when in rules:
            if not when(kind):
                continue
            if prefix + name not in state:
                missing.append(prefix + name)
                continue
            used.add(prefix + name)
            arr = state[prefix + name]
            arr = arr if arr.dtype.kind in "iu" else arr.astype(np.float32)
            for p, value in zip(_paths(path), to_ours(arr, cfg)):
                key = tuple(_full(scope, p))
                if r is None:
                    stacks[key] = value
                else:
                    stacks.setdefault(key, {})[r] = value
    unexpected = sorted(set(state) - used)
    if missing or unexpected:
        raise ConversionError(
            f"V4 checkpoint does not match the config: missing {missing[:8]} ({len(missing)}), "
            f"unexpected {unexpected[:8]} ({len(unexpected)})"
            + (" (no mtp.* tensors: set model.num_nextn_predict_layers: 0)" if any(
                m.startswith("mtp.") for m in missing) and not any(k.startswith("mtp.") for k in state) else "")
        )
    variables: dict = {}
    for key, value in stacks.items():
        if isinstance(value, dict):
            value = np.stack([value[i] for i in range(len(value))])
        _set(variables, list(key), np.ascontiguousarray(value))
    return variables


def check_shapes(variables: Mapping, abstract: Mapping) -> None:
    """Every converted array has the shape of the model's variable at its path (both ways complete);
    `abstract` may hold boxed (logically partitioned) leaves, as `jax.eval_shape(model.init)` gives."""
    abstract = nn.unbox(abstract)
    want = {jax.tree_util.keystr(p): a.shape for p, a in jax.tree_util.tree_leaves_with_path(abstract)}
    got = {jax.tree_util.keystr(p): a.shape for p, a in jax.tree_util.tree_leaves_with_path(variables)}
    bad = [f"{k}: {got[k]} != {want[k]}" for k in got.keys() & want.keys() if tuple(got[k]) != tuple(want[k])]
    if bad or got.keys() != want.keys():
        raise ConversionError(
            f"converted V4 variables do not fit the model: shape mismatches {bad[:6]}, missing "
            f"{sorted(want.keys() - got.keys())[:6]}, extra {sorted(got.keys() - want.keys())[:6]}"
        )


def variables_to_hf(variables: Mapping, cfg: ModelConfig, per_expert: bool = False) -> dict[str, np.ndarray]:
    """Our V4 variables -> HF names (fused experts, or per-expert on-disk names if `per_expert`)."""
    out = {}
    for scope, r, prefix, rules, kind in _scopes(cfg):
        for path, name, (_, to_hf), when in rules:
            if not when(kind):
                continue
            arrays = []
            for p in _paths(path):
                full = _full(scope, p)
                arr = np.asarray(_get(variables, full, "/".join(full)))
                arrays.append(arr if r is None else arr[r])
            out[prefix + name] = np.ascontiguousarray(to_hf(*arrays, cfg))
    return unfuse_experts(out) if per_expert else out


_TYPES = ("sliding_attention", "compressed_sparse_attention", "heavily_compressed_attention")


def model_config_from_hf(hf: Mapping, **overrides) -> ModelConfig:
    """Our ModelConfig from an HF DeepseekV4 `config.json` dict (HF's post-init form: `layer_types`,
    `compress_rates`, `mlp_layer_types`, nested `rope_parameters`; or the legacy per-layer
    `compress_ratios` / `num_hash_layers`). `overrides` replace top-level fields (e.g. dtype)."""
    n = hf["num_hidden_layers"]
    rates = {**{_TYPES[1]: 4, _TYPES[2]: 128}, **(hf.get("compress_rates") or {}), _TYPES[0]: 0}
    if rates[_TYPES[1]] != CSA_RATIO:
        raise ConversionError(f"compress_rates[{_TYPES[1]}] = {rates[_TYPES[1]]}: CSA is ratio 4 here")
    if hf.get("layer_types"):
        ratios = [rates[t] for t in hf["layer_types"][:n]]
    else:
        ratios = list(hf["compress_ratios"][:n])
    mlp_types = hf.get("mlp_layer_types") or ["hash_moe"] * hf.get("num_hash_layers", 3) + ["moe"] * n
    n_hash = sum(t == "hash_moe" for t in mlp_types[:n])
    if mlp_types[:n_hash] != ["hash_moe"] * n_hash:
        raise ConversionError(f"mlp_layer_types: hash_moe layers must lead, got {mlp_types[:n]}")
    rp = hf.get("rope_parameters") or {}
    main, comp = rp.get("main", {}), rp.get("compress", rp)
    head_dim = hf["head_dim"]
    rope_dim = int(hf.get("qk_rope_head_dim") or round(head_dim * (hf.get("partial_rotary_factor") or 0.125)))
    mtp = hf.get("num_nextn_predict_layers", 0)
    yarn = comp.get("rope_type", "default") == "yarn"
    fields = dict(
        vocab_size=hf["vocab_size"], dim=hf["hidden_size"], inter_dim=hf["moe_intermediate_size"],
        n_layers=n, n_dense_layers=0, norm_eps=hf.get("rms_norm_eps", 1e-6),
        max_seq_len=hf.get("max_position_embeddings", 4096), num_nextn_predict_layers=mtp,
        compress_ratios=tuple(ratios) + (0,) * mtp,
        v4=V4AttentionConfig(
            n_heads=hf["num_attention_heads"], head_dim=head_dim, rope_head_dim=rope_dim,
            q_lora_rank=hf["q_lora_rank"], o_groups=hf["o_groups"], o_lora_rank=hf["o_lora_rank"],
            window_size=hf["sliding_window"], index_n_heads=hf["index_n_heads"],
            index_head_dim=hf["index_head_dim"], index_topk=hf["index_topk"],
            compress_rope_theta=float(comp.get("rope_theta", hf.get("compress_rope_theta", 160000.0))),
        ),
        mhc=MHCConfig(hc_mult=hf["hc_mult"], hc_sinkhorn_iters=hf["hc_sinkhorn_iters"], hc_eps=hf["hc_eps"]),
        moe=MoEConfig(
            n_routed_experts=hf["n_routed_experts"], n_shared_experts=hf.get("n_shared_experts", 1),
            n_activated_experts=hf["num_experts_per_tok"], score_func=hf.get("scoring_func", "sqrtsoftplus"),
            route_scale=hf.get("routed_scaling_factor", 1.0), norm_topk_prob=hf.get("norm_topk_prob", True),
            moe_inter_dim=hf["moe_intermediate_size"], swiglu_limit=float(hf.get("swiglu_limit") or 0.0),
            weight_before_down=True, n_hash_layers=n_hash,
        ),
        rope=RopeConfig(
            rope_theta=float(main.get("rope_theta", hf.get("rope_theta", 10000.0))),
            rope_factor=float(comp.get("factor", 1.0)) if yarn else 1.0,
            original_seq_len=comp.get("original_max_position_embeddings", 4096),
            beta_fast=float(comp.get("beta_fast") or 32), beta_slow=float(comp.get("beta_slow") or 1),
        ),
    )
    fields.update(overrides)
    return ModelConfig(**fields)


def hf_config_from_model(cfg: ModelConfig) -> dict:
    """The HF `config.json` dict (DeepseekV4Config keys) for our V4 config; read back by
    `model_config_from_hf` up to our compute-only fields (dtype, moe.impl/dispatch, v4.q_block)."""
    v, mo, r, n = cfg.v4, cfg.moe, cfg.rope, cfg.n_layers
    ratios = cfg.compress_ratios[:n]
    hca = sorted({x for x in ratios if x not in (0, CSA_RATIO)})
    if len(hca) > 1:
        raise ConversionError(f"HF DeepseekV4Config has one HCA ratio; compress_ratios has {hca}")
    comp = {"rope_type": "yarn" if r.yarn else "default", "rope_theta": v.compress_rope_theta}
    if r.yarn:
        comp.update(factor=r.rope_factor, original_max_position_embeddings=r.original_seq_len,
                    beta_fast=r.beta_fast, beta_slow=r.beta_slow)
    return dict(
        model_type="deepseek_v4", vocab_size=cfg.vocab_size, hidden_size=cfg.dim, num_hidden_layers=n,
        rms_norm_eps=cfg.norm_eps, max_position_embeddings=cfg.max_seq_len,
        num_nextn_predict_layers=cfg.num_nextn_predict_layers, num_attention_heads=v.n_heads,
        num_key_value_heads=1, head_dim=v.head_dim, partial_rotary_factor=v.rope_head_dim / v.head_dim,
        q_lora_rank=v.q_lora_rank, o_groups=v.o_groups, o_lora_rank=v.o_lora_rank,
        sliding_window=v.window_size, index_n_heads=v.index_n_heads, index_head_dim=v.index_head_dim,
        index_topk=v.index_topk, rope_theta=r.rope_theta, compress_rope_theta=v.compress_rope_theta,
        rope_parameters={"main": {"rope_type": "default", "rope_theta": r.rope_theta}, "compress": comp},
        layer_types=[_TYPES[0] if x == 0 else _TYPES[1] if x == CSA_RATIO else _TYPES[2] for x in ratios],
        compress_rates={_TYPES[1]: CSA_RATIO, _TYPES[2]: hca[0] if hca else 128},
        mlp_layer_types=["hash_moe" if i < mo.n_hash_layers else "moe" for i in range(n)],
        hc_mult=cfg.mhc.hc_mult, hc_sinkhorn_iters=cfg.mhc.hc_sinkhorn_iters, hc_eps=cfg.mhc.hc_eps,
        n_routed_experts=mo.n_routed_experts, n_shared_experts=mo.n_shared_experts,
        num_experts_per_tok=mo.n_activated_experts, scoring_func=mo.score_func,
        routed_scaling_factor=mo.route_scale, norm_topk_prob=mo.norm_topk_prob,
        moe_intermediate_size=mo.moe_inter_dim, swiglu_limit=mo.swiglu_limit, tie_word_embeddings=False,
    )
