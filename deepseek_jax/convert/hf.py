"""One name table between our parameters and HF transformers' DeepseekV3 / DeepseekV32 state dicts,
used both ways, and the `config.json` fields both ways (`model_config_from_hf`, `hf_config_from_model`).

Our variables are `{"params": ..., "router": ...}` with each block stack scanned (leading layer axis).
HF names are per layer: `model.layers.{i}.<name>`, the MTP modules at i = n_layers + k. Each rule
maps one HF tensor to one or more of our arrays (e.g. `kv_b_proj` -> `w_uk`, `w_uv`) with a transform
for each direction. HF keeps routed experts fused in memory (`gate_up_proj [E, 2F, D]`,
`down_proj [E, D, F]`) but `save_pretrained` and the official checkpoints write one tensor per
expert (`mlp.experts.{e}.gate_proj.weight`); both are accepted, and either can be written.

DeepSeek-V3.2 (`model_type` deepseek_v32, `cfg.index` set) adds the lightning indexer under each
attention, MTP layers included: `self_attn.indexer.{wq_b, wk, k_norm, weights_proj}`.

Nothing is dropped silently: an HF tensor no rule consumes, a missing tensor, or a wrong shape is
an error naming it. The only tensors skipped are listed in `SKIPPED` (copies of shared weights).
"""

import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass

import numpy as np

from deepseek_jax.config import IndexerConfig, MLAConfig, ModelConfig, MoEConfig, RopeConfig
from deepseek_jax.models.common import layer_kinds, layer_segments

Arrays = tuple[np.ndarray, ...]


class ConversionError(ValueError):
    """A checkpoint tensor is missing, unexpected or mis-shaped; the message names it."""


@dataclass(frozen=True)
class Rule:
    ours: tuple[str, ...]  # our paths, relative to the scope ("attn/w_uk"); "router:" = router collection
    hf: str  # HF name, relative to the scope
    hf_shape: Callable[[ModelConfig], tuple[int, ...]]
    to_ours: Callable[[np.ndarray, ModelConfig], Arrays]
    to_hf: Callable[..., np.ndarray]  # (*ours, cfg) -> HF array
    when: Callable[[ModelConfig], bool] = lambda cfg: True


def _t(a, cfg):
    return (a.T,)


def _t_back(a, cfg):
    return a.T


def _same(a, cfg):
    return (a,)


def _same_back(a, cfg):
    return a


def linear(ours: str, hf: str, shape, when=lambda cfg: True) -> Rule:
    """HF Linear weight [out, in] <-> our [in, out]."""
    return Rule((ours,), hf, shape, _t, _t_back, when)


def vector(ours: str, hf: str, size, when=lambda cfg: True) -> Rule:
    return Rule((ours,), hf, lambda c: (size(c),), _same, _same_back, when)


def _heads_in(a, cfg):  # [N*K, In] -> [In, N, K]
    m = cfg.mla
    return (a.reshape(m.n_heads, -1, a.shape[-1]).transpose(2, 0, 1),)


def _heads_in_back(w, cfg):  # [In, N, K] -> [N*K, In]
    return w.transpose(1, 2, 0).reshape(-1, w.shape[0])


def _index_heads_in(a, cfg):  # indexer wq_b [P*Y, Q] -> [Q, P, Y]
    return (a.reshape(cfg.index.index_n_heads, -1, a.shape[-1]).transpose(2, 0, 1),)


def _kv_b(a, cfg):  # [N*(H+O), C] -> w_uk [C, N, H], w_uv [C, N, O]
    m = cfg.mla
    a = a.reshape(m.n_heads, m.qk_nope_head_dim + m.v_head_dim, m.kv_lora_rank)
    return a[:, : m.qk_nope_head_dim].transpose(2, 0, 1), a[:, m.qk_nope_head_dim :].transpose(2, 0, 1)


def _kv_b_back(w_uk, w_uv, cfg):
    a = np.concatenate([w_uk.transpose(1, 2, 0), w_uv.transpose(1, 2, 0)], axis=1)
    return a.reshape(-1, a.shape[-1])


def _o(a, cfg):  # [D, N*O] -> [N, O, D]
    m = cfg.mla
    return (a.reshape(a.shape[0], m.n_heads, m.v_head_dim).transpose(1, 2, 0),)


def _o_back(w, cfg):
    return w.transpose(2, 0, 1).reshape(w.shape[2], -1)


def _gate_up(a, cfg):  # [E, 2F, D] -> w_gate [E, D, F], w_up [E, D, F]
    F = cfg.moe.moe_inter_dim
    return a[:, :F].transpose(0, 2, 1), a[:, F:].transpose(0, 2, 1)


def _gate_up_back(w_gate, w_up, cfg):
    return np.concatenate([w_gate.transpose(0, 2, 1), w_up.transpose(0, 2, 1)], axis=1)


def _down(a, cfg):  # [E, D, F] -> [E, F, D]
    return (a.transpose(0, 2, 1),)


def _down_back(w, cfg):
    return w.transpose(0, 2, 1)


def _has_q_lora(cfg):
    return cfg.mla.q_lora_rank > 0


def _no_q_lora(cfg):
    return cfg.mla.q_lora_rank == 0


def _has_index(cfg):
    return cfg.index is not None


def _has_shared(cfg):
    return cfg.moe.n_shared_experts > 0


def _d(c):
    return c.dim


def _qk(c):
    return c.mla.n_heads * c.mla.qk_head_dim


_SHARED_F = lambda c: c.moe.n_shared_experts * c.moe.moe_inter_dim  # noqa: E731

ATTN_RULES = (
    vector("attn_norm/scale", "input_layernorm.weight", _d),
    vector("ffn_norm/scale", "post_attention_layernorm.weight", _d),
    linear("attn/w_dq", "self_attn.q_a_proj.weight", lambda c: (c.mla.q_lora_rank, c.dim), _has_q_lora),
    vector("attn/q_norm/scale", "self_attn.q_a_layernorm.weight", lambda c: c.mla.q_lora_rank, _has_q_lora),
    Rule(("attn/w_uq",), "self_attn.q_b_proj.weight", lambda c: (_qk(c), c.mla.q_lora_rank),
         _heads_in, _heads_in_back, _has_q_lora),
    Rule(("attn/w_q",), "self_attn.q_proj.weight", lambda c: (_qk(c), c.dim),
         _heads_in, _heads_in_back, _no_q_lora),
    linear("attn/w_dkv", "self_attn.kv_a_proj_with_mqa.weight",
           lambda c: (c.mla.kv_lora_rank + c.mla.qk_rope_head_dim, c.dim)),
    vector("attn/kv_norm/scale", "self_attn.kv_a_layernorm.weight", lambda c: c.mla.kv_lora_rank),
    Rule(("attn/w_uk", "attn/w_uv"), "self_attn.kv_b_proj.weight",
         lambda c: (c.mla.n_heads * (c.mla.qk_nope_head_dim + c.mla.v_head_dim), c.mla.kv_lora_rank),
         _kv_b, _kv_b_back),
    Rule(("attn/w_o",), "self_attn.o_proj.weight", lambda c: (c.dim, c.mla.n_heads * c.mla.v_head_dim),
         _o, _o_back),
    # V3.2 lightning indexer (P heads of Y dims; its queries read the MLA query latent)
    Rule(("attn/indexer/w_uq",), "self_attn.indexer.wq_b.weight",
         lambda c: (c.index.index_n_heads * c.index.index_head_dim, c.mla.q_lora_rank),
         _index_heads_in, _heads_in_back, _has_index),
    linear("attn/indexer/w_k", "self_attn.indexer.wk.weight", lambda c: (c.index.index_head_dim, c.dim), _has_index),
    vector("attn/indexer/k_norm/scale", "self_attn.indexer.k_norm.weight", lambda c: c.index.index_head_dim,
           _has_index),
    vector("attn/indexer/k_norm/bias", "self_attn.indexer.k_norm.bias", lambda c: c.index.index_head_dim, _has_index),
    linear("attn/indexer/w_weights", "self_attn.indexer.weights_proj.weight",
           lambda c: (c.index.index_n_heads, c.dim), _has_index),
)
DENSE_RULES = ATTN_RULES + (
    linear("ffn/w_gate", "mlp.gate_proj.weight", lambda c: (c.inter_dim, c.dim)),
    linear("ffn/w_up", "mlp.up_proj.weight", lambda c: (c.inter_dim, c.dim)),
    linear("ffn/w_down", "mlp.down_proj.weight", lambda c: (c.dim, c.inter_dim)),
)
MOE_RULES = ATTN_RULES + (
    linear("ffn/w_router", "mlp.gate.weight", lambda c: (c.moe.n_routed_experts, c.dim)),
    vector("router:ffn/bias", "mlp.gate.e_score_correction_bias", lambda c: c.moe.n_routed_experts),
    Rule(("ffn/w_gate", "ffn/w_up"), "mlp.experts.gate_up_proj",
         lambda c: (c.moe.n_routed_experts, 2 * c.moe.moe_inter_dim, c.dim), _gate_up, _gate_up_back),
    Rule(("ffn/w_down",), "mlp.experts.down_proj",
         lambda c: (c.moe.n_routed_experts, c.dim, c.moe.moe_inter_dim), _down, _down_back),
    linear("ffn/shared/w_gate", "mlp.shared_experts.gate_proj.weight", lambda c: (_SHARED_F(c), c.dim), _has_shared),
    linear("ffn/shared/w_up", "mlp.shared_experts.up_proj.weight", lambda c: (_SHARED_F(c), c.dim), _has_shared),
    linear("ffn/shared/w_down", "mlp.shared_experts.down_proj.weight", lambda c: (c.dim, _SHARED_F(c)), _has_shared),
)
MTP_RULES = tuple(  # the MTP block's tensors sit directly under model.layers.{L+k}
    Rule(tuple(f"block/{p}" if not p.startswith("router:") else f"router:block/{p[7:]}" for p in r.ours),
         r.hf, r.hf_shape, r.to_ours, r.to_hf, r.when)
    for r in MOE_RULES
) + (
    vector("enorm/scale", "enorm.weight", _d),
    vector("hnorm/scale", "hnorm.weight", _d),
    linear("w_eh", "eh_proj.weight", lambda c: (c.dim, 2 * c.dim)),
    vector("norm/scale", "shared_head.norm.weight", _d),
)
GLOBAL_RULES = (
    Rule(("embedding",), "model.embed_tokens.weight", lambda c: (c.vocab_size, c.dim), _same, _same_back),
    vector("final_norm/scale", "model.norm.weight", _d),
    linear("w_head", "lm_head.weight", lambda c: (c.vocab_size, c.dim)),
)
# Official checkpoints repeat the embedding and head inside each MTP layer; ours share them.
SKIPPED = (r"model\.layers\.\d+\.embed_tokens\.weight", r"model\.layers\.\d+\.shared_head\.head\.weight")

_EXPERT_RE = re.compile(r"^((?:model\.layers|mtp)\.\d+\.mlp\.experts)\.(\d+)\.(gate_proj|up_proj|down_proj)\.weight$")


def fuse_experts(state: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
    """Per-expert tensors (`...experts.{e}.gate_proj.weight`) -> HF's fused in-memory layout."""
    out, per_layer = {}, {}
    for name, arr in state.items():
        m = _EXPERT_RE.match(name)
        if m is None:
            out[name] = arr
        else:
            per_layer.setdefault(m.group(1), {}).setdefault(m.group(3), {})[int(m.group(2))] = arr
    for prefix, parts in per_layer.items():
        counts = {k: sorted(v) for k, v in parts.items()}
        n = max(len(v) for v in counts.values())
        for kind in ("gate_proj", "up_proj", "down_proj"):
            if counts.get(kind) != list(range(n)):
                have = counts.get(kind, [])
                missing = sorted(set(range(n)) - set(have))
                raise ConversionError(f"{prefix}: {kind} missing for experts {missing}")
        stack = lambda kind: np.stack([parts[kind][e] for e in range(n)])  # noqa: E731
        out[f"{prefix}.gate_up_proj"] = np.concatenate([stack("gate_proj"), stack("up_proj")], axis=1)
        out[f"{prefix}.down_proj"] = stack("down_proj")
    return out


def unfuse_experts(state: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
    """HF's fused expert tensors -> one tensor per expert (the on-disk layout)."""
    out = {}
    for name, arr in state.items():
        if name.endswith(".mlp.experts.gate_up_proj"):
            prefix, F = name[: -len(".gate_up_proj")], arr.shape[1] // 2
            for e in range(arr.shape[0]):
                out[f"{prefix}.{e}.gate_proj.weight"] = arr[e, :F]
                out[f"{prefix}.{e}.up_proj.weight"] = arr[e, F:]
        elif name.endswith(".mlp.experts.down_proj"):
            prefix = name[: -len(".down_proj")]
            for e in range(arr.shape[0]):
                out[f"{prefix}.{e}.down_proj.weight"] = arr[e]
        else:
            out[name] = arr
    return out


def _scopes(cfg: ModelConfig):
    """(our scope keys, HF prefix, rules, repeat index within the scan segment or None), per layer
    in the decoder's plan (models/common.py: segments of pattern slots), then MTP and the globals."""
    for seg in layer_segments(layer_kinds(cfg)):
        for k, kind in enumerate(seg.kinds):
            for r, layer in enumerate(seg.layers(k)):
                rules = DENSE_RULES if kind.ffn == "dense" else MOE_RULES
                yield [seg.name, f"block_{k}"], f"model.layers.{layer}.", rules, r
    for k in range(cfg.num_nextn_predict_layers):
        yield [f"mtp_{k}"], f"model.layers.{cfg.n_layers + k}.", MTP_RULES, None
    yield [], "", GLOBAL_RULES, None


def _split(path: str) -> tuple[str, list[str]]:
    col, _, rest = path.rpartition(":")
    return col or "params", [p for p in rest.split("/") if p]


def _set(tree: dict, keys: list[str], value) -> None:
    for k in keys[:-1]:
        tree = tree.setdefault(k, {})
    tree[keys[-1]] = value


def _get(tree: Mapping, keys: list[str], what: str):
    for k in keys:
        if not isinstance(tree, Mapping) or k not in tree:
            raise ConversionError(f"our variables lack {what}")
        tree = tree[k]
    return tree


def hf_to_variables(state: Mapping[str, np.ndarray], cfg: ModelConfig) -> dict:
    """HF DeepseekV3 state dict (numpy; fused or per-expert) -> our `{"params", "router"}` (float32)."""
    state = fuse_experts({k: np.asarray(v) for k, v in state.items()})
    used, missing, stacks = set(), [], {}
    for scope, prefix, rules, j in _scopes(cfg):
        for rule in filter(lambda r: r.when(cfg), rules):
            name = prefix + rule.hf
            if name not in state:
                missing.append(name)
                continue
            arr, want = state[name], rule.hf_shape(cfg)
            if tuple(arr.shape) != want:
                raise ConversionError(f"tensor {name} has shape {tuple(arr.shape)}, expected {want}")
            used.add(name)
            for path, value in zip(rule.ours, rule.to_ours(arr.astype(np.float32), cfg)):
                col, keys = _split(path)
                key = (col, *scope, *keys)
                if j is None:
                    stacks[key] = value
                else:
                    stacks.setdefault(key, {})[j] = value
    unexpected = sorted(k for k in state if k not in used and not any(re.fullmatch(p, k) for p in SKIPPED))
    if missing or unexpected:
        raise ConversionError(
            f"checkpoint does not match the config: missing {missing[:8]}{'...' if len(missing) > 8 else ''}"
            f" ({len(missing)}), unexpected {unexpected[:8]}{'...' if len(unexpected) > 8 else ''}"
            f" ({len(unexpected)})"
        )
    variables: dict = {}
    for (col, *keys), value in stacks.items():
        if isinstance(value, dict):
            value = np.stack([value[i] for i in range(len(value))])
        _set(variables, [col, *keys], np.ascontiguousarray(value))
    return variables


def variables_to_hf(variables: Mapping, cfg: ModelConfig, per_expert: bool = False) -> dict[str, np.ndarray]:
    """Our variables -> HF names (fused experts, or per-expert on-disk names if `per_expert`)."""
    out = {}
    for scope, prefix, rules, j in _scopes(cfg):
        for rule in filter(lambda r: r.when(cfg), rules):
            arrays = []
            for path in rule.ours:
                col, keys = _split(path)
                full = [col, *scope, *keys]
                arr = np.asarray(_get(variables, full, "/".join(full)))
                arrays.append(arr if j is None else arr[j])
            out[prefix + rule.hf] = np.ascontiguousarray(rule.to_hf(*arrays, cfg))
    return unfuse_experts(out) if per_expert else out


def model_config_from_hf(hf: Mapping, **overrides) -> ModelConfig:
    """Our ModelConfig from an HF DeepseekV3 / V32 `config.json` dict (`overrides` e.g. dtype="float32").
    V3.2 (model_type deepseek_v32, or index_* fields present) gets `index`; HF defaults apply to
    the index fields it omits."""
    rope = dict(hf.get("rope_parameters") or hf.get("rope_scaling") or {})
    yarn = rope.get("rope_type", rope.get("type", "default")) == "yarn"
    fields = dict(
        vocab_size=hf["vocab_size"], dim=hf["hidden_size"], inter_dim=hf["intermediate_size"],
        n_layers=hf["num_hidden_layers"], n_dense_layers=hf.get("first_k_dense_replace", 0),
        norm_eps=hf.get("rms_norm_eps", 1e-6), max_seq_len=hf.get("max_position_embeddings", 4096),
        num_nextn_predict_layers=hf.get("num_nextn_predict_layers", hf.get("num_mtp_layers", 0)),
        mla=MLAConfig(
            n_heads=hf["num_attention_heads"], q_lora_rank=hf.get("q_lora_rank") or 0,
            kv_lora_rank=hf["kv_lora_rank"], qk_nope_head_dim=hf["qk_nope_head_dim"],
            qk_rope_head_dim=hf["qk_rope_head_dim"], v_head_dim=hf["v_head_dim"],
        ),
        moe=MoEConfig(
            n_routed_experts=hf["n_routed_experts"], n_shared_experts=hf.get("n_shared_experts", 1),
            n_activated_experts=hf["num_experts_per_tok"], n_expert_groups=hf.get("n_group") or 1,
            n_limited_groups=hf.get("topk_group") or 1, score_func=hf.get("scoring_func", "sigmoid"),
            route_scale=hf.get("routed_scaling_factor", 1.0), norm_topk_prob=hf.get("norm_topk_prob", True),
            moe_inter_dim=hf["moe_intermediate_size"],
        ),
        rope=RopeConfig(
            rope_theta=rope.get("rope_theta", hf.get("rope_theta", 10000.0)),
            rope_factor=float(rope.get("factor", 1.0)) if yarn else 1.0,
            original_seq_len=rope.get("original_max_position_embeddings", 4096),
            beta_fast=float(rope.get("beta_fast") or 32), beta_slow=float(rope.get("beta_slow") or 1),
            mscale=float(rope.get("mscale") or 1.0), mscale_all_dim=float(rope.get("mscale_all_dim") or 0.0),
        ),
    )
    if hf.get("model_type") == "deepseek_v32" or "index_topk" in hf:
        fields["index"] = IndexerConfig(
            index_n_heads=hf.get("index_n_heads", 64), index_head_dim=hf.get("index_head_dim", 128),
            index_topk=hf.get("index_topk", 2048),
        )
    fields.update(overrides)
    return ModelConfig(**fields)


def hf_config_from_model(cfg: ModelConfig) -> dict:
    """The HF `config.json` dict (DeepseekV3Config / DeepseekV32Config keys) for our config;
    `model_config_from_hf` reads it back (up to our compute-only fields: dtype, moe.impl/dispatch/
    capacity_factor, index.index_dense_warmup/index_q_block)."""
    m, mo, r = cfg.mla, cfg.moe, cfg.rope
    rope = {"rope_type": "yarn" if r.yarn else "default", "rope_theta": r.rope_theta}
    if r.yarn:
        rope.update(factor=r.rope_factor, original_max_position_embeddings=r.original_seq_len,
                    beta_fast=r.beta_fast, beta_slow=r.beta_slow, mscale=r.mscale, mscale_all_dim=r.mscale_all_dim)
    hf = dict(
        model_type="deepseek_v3" if cfg.index is None else "deepseek_v32",
        vocab_size=cfg.vocab_size, hidden_size=cfg.dim, intermediate_size=cfg.inter_dim,
        num_hidden_layers=cfg.n_layers, first_k_dense_replace=cfg.n_dense_layers, rms_norm_eps=cfg.norm_eps,
        max_position_embeddings=cfg.max_seq_len, num_nextn_predict_layers=cfg.num_nextn_predict_layers,
        num_attention_heads=m.n_heads, num_key_value_heads=m.n_heads, q_lora_rank=m.q_lora_rank or None,
        kv_lora_rank=m.kv_lora_rank, qk_nope_head_dim=m.qk_nope_head_dim, qk_rope_head_dim=m.qk_rope_head_dim,
        v_head_dim=m.v_head_dim, n_routed_experts=mo.n_routed_experts, n_shared_experts=mo.n_shared_experts,
        num_experts_per_tok=mo.n_activated_experts, n_group=mo.n_expert_groups, topk_group=mo.n_limited_groups,
        scoring_func=mo.score_func, routed_scaling_factor=mo.route_scale, norm_topk_prob=mo.norm_topk_prob,
        moe_intermediate_size=mo.moe_inter_dim, rope_parameters=rope, tie_word_embeddings=False,
    )
    if cfg.index is not None:
        hf.update(index_n_heads=cfg.index.index_n_heads, index_head_dim=cfg.index.index_head_dim,
                  index_topk=cfg.index.index_topk)
    return hf
