"""The DeepSeek-V3 / V3.2 checkpoint family: rule table (convert/table.py format) and config.json.

Layouts: "hf" = the released checkpoints and what transformers' `save_pretrained` writes
(`model.layers.{i}.self_attn.q_a_proj.weight`, one tensor per routed expert
`mlp.experts.{e}.gate_proj.weight`, MTP layer k at i = num_hidden_layers + k with its `enorm`,
`hnorm`, `eh_proj`, `shared_head.norm` and copies of the embedding and head, which we skip);
transformers' in-memory fused experts (`mlp.experts.gate_up_proj [E, 2F, D]`, `down_proj [E, D, F]`)
are split into those names by the reader (convert/source.py). "official" = DeepSeek's
`inference/convert.py` names (`layers.{i}.attn.wq_a.weight`, `ffn.experts.{e}.w1`, `embed`, `head`,
scales `.scale`), with MTP under `mtp.{k}.` (the demo drops MTP; we keep it there, as V4 does).

V3.2 (`model_type` deepseek_v32) adds the lightning indexer under each attention, MTP included:
`self_attn.indexer.{wq_b, wk, k_norm, weights_proj}`.
"""

import re

from deepseek_jax.config import IndexerConfig, MLAConfig, ModelConfig, MoEConfig, RopeConfig
from deepseek_jax.convert.config_json import (
    check_keys,
    expect,
    quant_block,
    representable,
    require,
    rope_section,
)
from deepseek_jax.convert.errors import ConversionError
from deepseek_jax.convert.table import Family, Rule, Scope, concat, in_block, linear, vector
from deepseek_jax.models.common import LayerKind, layer_kinds, layer_segments

_OFFICIAL = {
    "self_attn": "attn", "mlp": "ffn", "q_a_proj": "wq_a", "q_a_layernorm": "q_norm", "q_b_proj": "wq_b",
    "q_proj": "wq", "kv_a_proj_with_mqa": "wkv_a", "kv_a_layernorm": "kv_norm", "kv_b_proj": "wkv_b",
    "o_proj": "wo", "gate_proj": "w1", "up_proj": "w3", "down_proj": "w2", "input_layernorm": "attn_norm",
    "post_attention_layernorm": "ffn_norm", "e_score_correction_bias": "bias", "shared_head": None,
}  # fmt: skip


def _n(hf: str) -> dict[str, str]:
    """HF name -> {layout: name}: the official name renames each dotted part (None drops it)."""
    parts = [_OFFICIAL.get(p, p) for p in hf.split(".")]
    return {"hf": hf, "official": ".".join(p for p in parts if p is not None)}


def _heads_in(a, cfg):  # [N*K, In] -> [In, N, K]
    return (a.reshape(cfg.mla.n_heads, -1, a.shape[-1]).transpose(2, 0, 1),)


def _heads_in_back(w, cfg):  # [In, N, K] -> [N*K, In]
    return w.transpose(1, 2, 0).reshape(-1, w.shape[0])


def _index_heads_in(a, cfg):  # indexer wq_b [P*Y, Q] -> [Q, P, Y]
    return (a.reshape(cfg.index.index_n_heads, -1, a.shape[-1]).transpose(2, 0, 1),)


def _kv_b(a, cfg):  # [N*(H+O), C] -> w_uk [C, N, H], w_uv [C, N, O]
    m = cfg.mla
    a = a.reshape(m.n_heads, m.qk_nope_head_dim + m.v_head_dim, m.kv_lora_rank)
    return a[:, : m.qk_nope_head_dim].transpose(2, 0, 1), a[:, m.qk_nope_head_dim :].transpose(2, 0, 1)


def _kv_b_back(w_uk, w_uv, cfg):
    a = concat([w_uk.transpose(1, 2, 0), w_uv.transpose(1, 2, 0)], axis=1)
    return a.reshape(-1, a.shape[-1])


def _o(a, cfg):  # [D, N*O] -> [N, O, D]
    return (a.reshape(a.shape[0], cfg.mla.n_heads, cfg.mla.v_head_dim).transpose(1, 2, 0),)


def _o_back(w, cfg):
    return w.transpose(2, 0, 1).reshape(w.shape[2], -1)


def _q_lora(kind, cfg):
    return cfg.mla.q_lora_rank > 0


def _no_q_lora(kind, cfg):
    return cfg.mla.q_lora_rank == 0


def _index(kind, cfg):
    return kind.attention == "dsa"


def _shared(kind, cfg):
    return cfg.moe.n_shared_experts > 0


ATTN = (
    vector("attn_norm/scale", _n("input_layernorm.weight")),
    vector("ffn_norm/scale", _n("post_attention_layernorm.weight")),
    linear("attn/w_dq", _n("self_attn.q_a_proj.weight"), _q_lora),
    vector("attn/q_norm/scale", _n("self_attn.q_a_layernorm.weight"), _q_lora),
    Rule(("attn/w_uq",), _n("self_attn.q_b_proj.weight"), _heads_in, _heads_in_back, _q_lora),
    Rule(("attn/w_q",), _n("self_attn.q_proj.weight"), _heads_in, _heads_in_back, _no_q_lora),
    linear("attn/w_dkv", _n("self_attn.kv_a_proj_with_mqa.weight")),
    vector("attn/kv_norm/scale", _n("self_attn.kv_a_layernorm.weight")),
    Rule(("attn/w_uk", "attn/w_uv"), _n("self_attn.kv_b_proj.weight"), _kv_b, _kv_b_back),
    Rule(("attn/w_o",), _n("self_attn.o_proj.weight"), _o, _o_back),
    # V3.2 lightning indexer (P heads of Y dims; its queries read the MLA query latent)
    Rule(("attn/indexer/w_uq",), _n("self_attn.indexer.wq_b.weight"), _index_heads_in, _heads_in_back, _index),
    linear("attn/indexer/w_k", _n("self_attn.indexer.wk.weight"), _index),
    vector("attn/indexer/k_norm/scale", _n("self_attn.indexer.k_norm.weight"), _index),
    vector("attn/indexer/k_norm/bias", _n("self_attn.indexer.k_norm.bias"), _index),
    linear("attn/indexer/w_weights", _n("self_attn.indexer.weights_proj.weight"), _index),
)
DENSE_FFN = tuple(linear(f"ffn/w_{p}", _n(f"mlp.{p}_proj.weight")) for p in ("gate", "up", "down"))
DENSE = ATTN + DENSE_FFN
MOE = ATTN + (
    linear("ffn/w_router", _n("mlp.gate.weight")),
    vector("router:ffn/bias", _n("mlp.gate.e_score_correction_bias")),
    *(linear(f"ffn/w_{p}", _n(f"mlp.experts.{{e}}.{p}_proj.weight"), experts=True) for p in ("gate", "up", "down")),
    *(linear(f"ffn/shared/w_{p}", _n(f"mlp.shared_experts.{p}_proj.weight"), _shared) for p in ("gate", "up", "down")),
)


MTP = tuple(map(in_block, MOE)) + (
    vector("enorm/scale", _n("enorm.weight")),
    vector("hnorm/scale", _n("hnorm.weight")),
    linear("w_eh", _n("eh_proj.weight")),
    vector("norm/scale", _n("shared_head.norm.weight")),
)
GLOBAL = (
    vector("embedding", {"hf": "model.embed_tokens.weight", "official": "embed.weight"}),
    vector("final_norm/scale", {"hf": "model.norm.weight", "official": "norm.weight"}),
    linear("w_head", {"hf": "lm_head.weight", "official": "head.weight"}),
)
# Released checkpoints repeat the embedding and head inside each MTP layer; ours share them.
SKIPPED = (r"model\.layers\.\d+\.embed_tokens\.weight", r"model\.layers\.\d+\.shared_head\.head\.weight",
           r"mtp\.\d+\.(embed|emb)\.weight", r"mtp\.\d+\.head\.weight")


def scopes(cfg: ModelConfig):
    """Every layer of the decoder's plan (segments of pattern slots, stacked over repeats), the MTP
    layers, then the globals."""
    for seg in layer_segments(layer_kinds(cfg)):
        for k, kind in enumerate(seg.kinds):
            for r, layer in enumerate(seg.layers(k)):
                prefix = {"hf": f"model.layers.{layer}.", "official": f"layers.{layer}."}
                yield Scope((seg.name, f"block_{k}"), r, prefix, DENSE if kind.ffn == "dense" else MOE, kind)
    mtp_attention = "dsa" if cfg.index is not None else "mla"
    for k in range(cfg.num_nextn_predict_layers):
        prefix = {"hf": f"model.layers.{cfg.n_layers + k}.", "official": f"mtp.{k}."}
        yield Scope((f"mtp_{k}",), None, prefix, MTP, LayerKind(mtp_attention, 0, "moe"))
    yield Scope((), None, {"hf": "", "official": ""}, GLOBAL, LayerKind("mla", 0, "dense"))


def is_mtp(name: str, n_layers: int) -> bool:
    m = re.match(r"(?:model\.)?layers\.(\d+)\.", name)
    return name.startswith("mtp.") or (m is not None and int(m.group(1)) >= n_layers)


_READ = {
    "vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "first_k_dense_replace",
    "rms_norm_eps", "max_position_embeddings", "num_nextn_predict_layers", "num_mtp_layers",
    "num_attention_heads", "num_key_value_heads", "q_lora_rank", "kv_lora_rank", "qk_nope_head_dim",
    "qk_rope_head_dim", "v_head_dim", "qk_head_dim", "head_dim", "n_routed_experts", "n_shared_experts",
    "num_experts_per_tok", "n_group", "topk_group", "scoring_func", "routed_scaling_factor", "norm_topk_prob",
    "moe_intermediate_size", "rope_parameters", "rope_scaling", "rope_theta", "index_n_heads", "index_head_dim",
    "index_topk", "topk_method", "hidden_act", "tie_word_embeddings", "attention_bias", "mlp_bias",
    "moe_layer_freq", "rope_interleave", "quantization_config", "mlp_layer_types", "layer_types",
    "mtp_layer_types", "mtp_mlp_layer_types",
}  # fmt: skip


_REQUIRED = (
    "vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads", "kv_lora_rank",
    "qk_nope_head_dim", "qk_rope_head_dim", "v_head_dim", "n_routed_experts", "num_experts_per_tok",
    "moe_intermediate_size", "routed_scaling_factor", "n_group", "topk_group", "first_k_dense_replace",
    "n_shared_experts", "rms_norm_eps", "norm_topk_prob",
)  # fmt: skip


def _check_semantics(hf) -> None:
    """Values that would change the math in a way we do not implement: errors naming the field."""
    check_keys(hf, _READ)
    require(hf, _REQUIRED)
    if "q_lora_rank" not in hf:  # null = full-rank queries; absent is ambiguous
        raise ConversionError("config.json: missing ['q_lora_rank'] (null for full-rank queries)")
    expect(hf, "hidden_act", ("silu",), "silu")
    expect(hf, "scoring_func", ("sigmoid", "softmax"), "sigmoid")
    expect(hf, "topk_method", ("noaux_tc",), "noaux_tc")
    for key in ("tie_word_embeddings", "attention_bias", "mlp_bias"):
        expect(hf, key, (False,), False)
    expect(hf, "rope_interleave", (True,), True)  # MLA rope dims are stored interleaved (as released)
    expect(hf, "moe_layer_freq", (1,), 1)
    expect(hf, "num_key_value_heads", (hf["num_attention_heads"], None), None)
    for key in ("qk_head_dim", "head_dim"):  # derived by transformers; must agree when present
        want = hf["qk_nope_head_dim"] + hf["qk_rope_head_dim"] if key == "qk_head_dim" else hf["qk_rope_head_dim"]
        expect(hf, key, (want, None), None)
    dense = hf.get("first_k_dense_replace", 0)
    if hf.get("mlp_layer_types") is not None:
        want = ["dense"] * dense + ["sparse"] * (hf["num_hidden_layers"] - dense)
        expect({"mlp_layer_types": list(hf["mlp_layer_types"])}, "mlp_layer_types", (want,))
    attention = ("indexed_attention",) if hf.get("model_type") == "deepseek_v32" else ("full_attention",)
    for key in ("layer_types", "mtp_layer_types"):  # transformers' names for the attention of each layer
        for value in hf.get(key) or []:
            expect({key: value}, key, attention + ("full_attention",))
    for value in hf.get("mtp_mlp_layer_types") or []:
        expect({"mtp_mlp_layer_types": value}, "mtp_mlp_layer_types", ("sparse",))
    quant_block(hf)


def rope_from_json(hf) -> RopeConfig:
    """RoPE / YaRN from `rope_parameters` (or `rope_scaling`) as DeepseekV3Config writes it (also read by
    convert/article.py): YaRN's attention temperature comes from mscale / mscale_all_dim, never
    `attention_factor`."""
    rope = rope_section(hf.get("rope_parameters") or hf.get("rope_scaling"), "config.json rope_parameters")
    yarn = rope.get("rope_type", rope.get("type", "default")) == "yarn"
    expect(rope, "attention_factor", (None,), None, "config.json rope_parameters")  # mscale comes from mscale*
    if yarn and (rope.get("mscale") is None) != (rope.get("mscale_all_dim") is None):
        raise ConversionError("config.json rope_parameters: give both mscale and mscale_all_dim or neither "
                              "(transformers ignores one alone; we would not)")
    return RopeConfig(
        rope_theta=rope.get("rope_theta", hf.get("rope_theta", 10000.0)),
        rope_factor=float(rope.get("factor", 1.0)) if yarn else 1.0,
        original_seq_len=rope.get("original_max_position_embeddings", 4096),
        beta_fast=float(rope.get("beta_fast") or 32), beta_slow=float(rope.get("beta_slow") or 1),
        mscale=float(rope.get("mscale", 1.0)), mscale_all_dim=float(rope.get("mscale_all_dim", 0.0)),
    )


def rope_to_json(r: RopeConfig) -> dict:
    """`rope_parameters` of DeepseekV3Config for our RoPE (read back by `rope_from_json`)."""
    rope = {"rope_type": "yarn" if r.yarn else "default", "rope_theta": r.rope_theta}
    if r.yarn:
        rope.update(factor=r.rope_factor, original_max_position_embeddings=r.original_seq_len,
                    beta_fast=r.beta_fast, beta_slow=r.beta_slow, mscale=r.mscale, mscale_all_dim=r.mscale_all_dim)
    return rope


def config_from_json(hf, **overrides) -> ModelConfig:
    """Our ModelConfig from a DeepseekV3 / V32 `config.json` dict (`overrides`: e.g. dtype="float32")."""
    _check_semantics(hf)
    rope = rope_from_json(hf)
    fields = dict(
        vocab_size=hf["vocab_size"], dim=hf["hidden_size"], inter_dim=hf["intermediate_size"],
        n_layers=hf["num_hidden_layers"], n_dense_layers=hf["first_k_dense_replace"], norm_eps=hf["rms_norm_eps"],
        max_seq_len=hf.get("max_position_embeddings", 4096),
        num_nextn_predict_layers=hf.get("num_nextn_predict_layers", hf.get("num_mtp_layers", 0)),
        mla=MLAConfig(
            n_heads=hf["num_attention_heads"], q_lora_rank=hf.get("q_lora_rank") or 0,
            kv_lora_rank=hf["kv_lora_rank"], qk_nope_head_dim=hf["qk_nope_head_dim"],
            qk_rope_head_dim=hf["qk_rope_head_dim"], v_head_dim=hf["v_head_dim"],
        ),
        moe=MoEConfig(
            n_routed_experts=hf["n_routed_experts"], n_shared_experts=hf["n_shared_experts"],
            n_activated_experts=hf["num_experts_per_tok"], n_expert_groups=hf["n_group"],
            n_limited_groups=hf["topk_group"], score_func=hf.get("scoring_func", "sigmoid"),
            route_scale=hf["routed_scaling_factor"], norm_topk_prob=hf["norm_topk_prob"],
            moe_inter_dim=hf["moe_intermediate_size"],
        ),
        rope=rope,
    )
    if hf.get("model_type") == "deepseek_v32" or "index_topk" in hf:
        fields["index"] = IndexerConfig(
            index_n_heads=hf.get("index_n_heads", 64), index_head_dim=hf.get("index_head_dim", 128),
            index_topk=hf.get("index_topk", 2048),
        )
    fields.update(overrides)
    return ModelConfig(**fields)


def config_to_json(cfg: ModelConfig) -> dict:
    """The `config.json` dict (DeepseekV3Config / DeepseekV32Config keys) for our config; read back by
    `config_from_json` up to our compute-only fields (dtype, moe.impl / dispatch, index warm-up)."""
    m, mo, r = cfg.mla, cfg.moe, cfg.rope
    representable("DeepSeek-V3", {k: v for k, v, ok in (
        ("moe.score_func", mo.score_func, mo.score_func == "sigmoid"),  # transformers' V3 router is sigmoid only
        ("moe.swiglu_limit", mo.swiglu_limit, mo.swiglu_limit == 0),
        ("moe.weight_before_down", mo.weight_before_down, not mo.weight_before_down),
        ("moe.n_hash_layers", mo.n_hash_layers, mo.n_hash_layers == 0),
    ) if not ok})
    hf = dict(
        architectures=["DeepseekV3ForCausalLM" if cfg.index is None else "DeepseekV32ForCausalLM"],
        model_type="deepseek_v3" if cfg.index is None else "deepseek_v32",
        vocab_size=cfg.vocab_size, hidden_size=cfg.dim, intermediate_size=cfg.inter_dim,
        num_hidden_layers=cfg.n_layers, first_k_dense_replace=cfg.n_dense_layers, rms_norm_eps=cfg.norm_eps,
        max_position_embeddings=cfg.max_seq_len, num_nextn_predict_layers=cfg.num_nextn_predict_layers,
        num_attention_heads=m.n_heads, num_key_value_heads=m.n_heads, q_lora_rank=m.q_lora_rank or None,
        kv_lora_rank=m.kv_lora_rank, qk_nope_head_dim=m.qk_nope_head_dim, qk_rope_head_dim=m.qk_rope_head_dim,
        v_head_dim=m.v_head_dim, n_routed_experts=mo.n_routed_experts, n_shared_experts=mo.n_shared_experts,
        num_experts_per_tok=mo.n_activated_experts, n_group=mo.n_expert_groups, topk_group=mo.n_limited_groups,
        scoring_func=mo.score_func, routed_scaling_factor=mo.route_scale, norm_topk_prob=mo.norm_topk_prob,
        moe_intermediate_size=mo.moe_inter_dim, rope_parameters=rope_to_json(r), tie_word_embeddings=False,
        hidden_act="silu", topk_method="noaux_tc",
    )
    if cfg.index is not None:
        hf.update(index_n_heads=cfg.index.index_n_heads, index_head_dim=cfg.index.index_head_dim,
                  index_topk=cfg.index.index_topk)
    return hf


FAMILY = Family(
    name="DeepSeek-V3 / V3.2", model_types=("deepseek_v3", "deepseek_v32"), layouts=("hf", "official"),
    scopes=scopes, config_from_json=config_from_json, config_to_json=config_to_json, is_mtp=is_mtp,
    skipped=SKIPPED, fp8_names=r"(^|\.)(wq_a|wq_b|wq|wkv_a|wkv_b|wo|w1|w2|w3|wk)\.weight$",
    f32_names=r"ffn\.gate\.bias$", scale_fmt="float32", scale_suffix={"hf": ".weight_scale_inv", "official": ".scale"},
    pow2_scales=lambda cfg: cfg.index is not None,  # V3.2 ships F32 scales rounded up to powers of two (ue8m0)
)
