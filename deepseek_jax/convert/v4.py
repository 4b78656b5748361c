"""The DeepSeek-V4 checkpoint family: rule table (convert/table.py format) and config.json.

Layouts:
- "official": DeepSeek's release names (`layers.{i}.attn.wq_a.weight` + `.scale`, `ffn.experts.{e}.w1`,
  `hc_attn_fn`, `embed.weight`, `head.weight`, `norm.weight`, `hc_head_fn`; MTP under `mtp.{k}.` with
  `e_proj`, `h_proj`, `enorm`, `hnorm`, `norm`, `hc_head_*`);
- "hf": what transformers' `save_pretrained` writes: the official names under `model.layers.{i}.`, plus
  `model.embed_tokens.weight`, `model.norm.weight`, `model.hc_head.hc_*` and `head.weight`
  (transformers renames them when it loads);
- "hf_memory": transformers' in-memory names (`model.layers.{i}.self_attn.q_a_proj.weight`,
  `mlp.experts.gate_up_proj [E, 2F, D]` split by the reader into per-expert `gate_proj`/`up_proj`,
  `attn_hc.fn`, `lm_head.weight`), MTP under `mtp.{k}.` in the same spelling.
Layer kinds decide which rules apply: a compressor for ratio > 0, the indexer for CSA (ratio 4),
`tid2eid` for hash-routed layers and the selection bias otherwise.

mHC `fn` is the checkpoint's [Z, I·D] (column i·D + d) and ours [I, D, Z].
"""

import numpy as np

from deepseek_jax.config import MHCConfig, ModelConfig, MoEConfig, RopeConfig, V4AttentionConfig
from deepseek_jax.convert.config_json import (
    check_keys,
    expect,
    quant_block,
    representable,
    require,
    rope_section,
)
from deepseek_jax.convert.errors import ConversionError
from deepseek_jax.convert.table import Family, Rule, Scope, in_block, same_ckpt, same_ours, t_ckpt, t_ours
from deepseek_jax.models.common import LayerKind, layer_kinds, layer_segments, mtp_kind

CSA_RATIO = 4


def _heads(n, d):  # [n*d, In] <-> ours [In, n, d]
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


def _int64(w, c):  # tid2eid is stored int64; we hold int32 (ids < 2^31, never through a float)
    return w.astype(np.int64) if isinstance(w, np.ndarray) else w


LIN, VEC = (t_ours, t_ckpt), (same_ours, same_ckpt)
HEADS_Q = _heads(lambda c: c.v4.n_heads, lambda c: c.v4.head_dim)
HEADS_I = _heads(lambda c: c.v4.index_n_heads, lambda c: c.v4.index_head_dim)


def _when(test):
    return lambda kind, cfg: test(kind)


ALWAYS = _when(lambda kind: True)
COMPRESSED = _when(lambda kind: kind.ratio > 0)
CSA = _when(lambda kind: kind.ratio == CSA_RATIO)
LEARNED = _when(lambda kind: kind.ffn == "moe")
HASHED = _when(lambda kind: kind.ffn == "hash")


def SHARED(kind, cfg):  # noqa: N802 (a rule condition, named like the others)
    return cfg.moe.n_shared_experts > 0


def _r(ours, official: str, hf: str, fns=VEC, when=ALWAYS, experts=False, hf_disk: str | None = None) -> Rule:
    """A block rule: `official` is also the on-disk HF spelling unless `hf_disk` says otherwise (transformers
    saves the attention's `kv_norm` as `norm`); `hf` is the in-memory one."""
    ours = ours if isinstance(ours, tuple) else (ours,)
    names = {"official": official, "hf": hf_disk or official, "hf_memory": hf}
    return Rule(ours, names, fns[0], fns[1], when, experts)


ATTN = (
    _r("attn/w_dq", "attn.wq_a.weight", "self_attn.q_a_proj.weight", LIN),
    _r("attn/q_norm/scale", "attn.q_norm.weight", "self_attn.q_a_norm.weight"),
    _r("attn/w_uq", "attn.wq_b.weight", "self_attn.q_b_proj.weight", HEADS_Q),
    _r("attn/w_kv", "attn.wkv.weight", "self_attn.kv_proj.weight", LIN),
    _r("attn/kv_norm/scale", "attn.kv_norm.weight", "self_attn.kv_norm.weight", hf_disk="attn.norm.weight"),
    _r("attn/w_oa", "attn.wo_a.weight", "self_attn.o_a_proj.weight", (_o_a, _o_a_back)),
    _r("attn/w_ob", "attn.wo_b.weight", "self_attn.o_b_proj.weight", (_o_b, _o_b_back)),
    _r("attn/sink", "attn.attn_sink", "self_attn.sinks"),
    _r("attn/compressor/w_kv", "attn.compressor.wkv.weight", "self_attn.compressor.kv_proj.weight", LIN, COMPRESSED),
    _r("attn/compressor/w_gate", "attn.compressor.wgate.weight", "self_attn.compressor.gate_proj.weight", LIN,
       COMPRESSED),
    _r("attn/compressor/ape", "attn.compressor.ape", "self_attn.compressor.position_bias", VEC, COMPRESSED),
    _r("attn/compressor/norm/scale", "attn.compressor.norm.weight", "self_attn.compressor.kv_norm.weight", VEC,
       COMPRESSED),
    _r("attn/indexer/w_uq", "attn.indexer.wq_b.weight", "self_attn.compressor.indexer.q_b_proj.weight", HEADS_I, CSA),
    _r("attn/indexer/w_weights", "attn.indexer.weights_proj.weight",
       "self_attn.compressor.indexer.scorer.weights_proj.weight", LIN, CSA),
    _r("attn/indexer/compressor/w_kv", "attn.indexer.compressor.wkv.weight",
       "self_attn.compressor.indexer.kv_proj.weight", LIN, CSA),
    _r("attn/indexer/compressor/w_gate", "attn.indexer.compressor.wgate.weight",
       "self_attn.compressor.indexer.gate_proj.weight", LIN, CSA),
    _r("attn/indexer/compressor/ape", "attn.indexer.compressor.ape", "self_attn.compressor.indexer.position_bias",
       VEC, CSA),
    _r("attn/indexer/compressor/norm/scale", "attn.indexer.compressor.norm.weight",
       "self_attn.compressor.indexer.kv_norm.weight", VEC, CSA),
)
NORMS = (
    _r("attn_norm/scale", "attn_norm.weight", "input_layernorm.weight"),
    _r("ffn_norm/scale", "ffn_norm.weight", "post_attention_layernorm.weight"),
)
HC = (  # the two mHC sites of a block (shared with convert/article.py)
    *(_r(f"{s}_hc/fn", f"hc_{s}_fn", f"{s}_hc.fn", (_hc_fn, _hc_fn_back)) for s in ("attn", "ffn")),
    *(_r(f"{s}_hc/{p}", f"hc_{s}_{p}", f"{s}_hc.{p}") for s in ("attn", "ffn") for p in ("base", "scale")),
)
MOE = (  # V4's MoE: router, selection bias (learned layers) or tid2eid (hash layers), experts, shared experts
    _r("ffn/w_router", "ffn.gate.weight", "mlp.gate.weight", LIN),
    _r("router:ffn/bias", "ffn.gate.bias", "mlp.gate.e_score_correction_bias", VEC, LEARNED),
    _r("router:ffn/tid2eid", "ffn.gate.tid2eid", "mlp.gate.tid2eid", (same_ours, _int64), HASHED),
    _r("ffn/w_gate", "ffn.experts.{e}.w1.weight", "mlp.experts.{e}.gate_proj.weight", LIN, experts=True),
    _r("ffn/w_up", "ffn.experts.{e}.w3.weight", "mlp.experts.{e}.up_proj.weight", LIN, experts=True),
    _r("ffn/w_down", "ffn.experts.{e}.w2.weight", "mlp.experts.{e}.down_proj.weight", LIN, experts=True),
    *(_r(f"ffn/shared/w_{p}", f"ffn.shared_experts.w{w}.weight", f"mlp.shared_experts.{p}_proj.weight", LIN,
         SHARED) for p, w in (("gate", 1), ("up", 3), ("down", 2))),
)
BLOCK = ATTN + NORMS + HC + MOE
HEAD = tuple(  # the mHC head that merges the streams before the final norm
    Rule((f"hc_head/{p}",), {"official": f"hc_head_{p}", "hf": f"model.hc_head.hc_{p}",
                             "hf_memory": f"model.hc_head.hc_{p}"},
         *((_hc_fn, _hc_fn_back) if p == "fn" else VEC))
    for p in ("fn", "base", "scale")
)


MTP_OWN = tuple(  # MTP's own head: `hc_head_fn` officially, `hc_head.hc_fn` in HF
    Rule(r.ours, {"official": r.names["official"], "hf": r.names["official"],
                  "hf_memory": r.names["hf_memory"].removeprefix("model.")}, r.to_ours, r.to_ckpt)
    for r in HEAD
) + (
    _r("w_e", "e_proj.weight", "e_proj.weight", LIN),
    _r("w_h", "h_proj.weight", "h_proj.weight", LIN),
    *(_r(f"{p}/scale", f"{p}.weight", f"{p}.weight") for p in ("enorm", "hnorm", "norm")),
)  # the MTP layer's tensors outside its block (shared with convert/article.py)
MTP = tuple(map(in_block, BLOCK)) + MTP_OWN
GLOBAL = HEAD + (
    Rule(("embedding",), {"official": "embed.weight", "hf": "model.embed_tokens.weight",
                          "hf_memory": "model.embed_tokens.weight"}, *VEC),
    Rule(("final_norm/scale",), {"official": "norm.weight", "hf": "model.norm.weight",
                                 "hf_memory": "model.norm.weight"}, *VEC),
    Rule(("w_head",), {"official": "head.weight", "hf": "head.weight", "hf_memory": "lm_head.weight"}, *LIN),
)
# The official converter drops MTP copies of the embedding and head; so do we if a checkpoint has them.
SKIPPED = (r"mtp\.\d+\.(emb|embed)(\.weight)?", r"mtp\.\d+\.(head|shared_head\.head)\.weight")


def scopes(cfg: ModelConfig):
    for seg in layer_segments(layer_kinds(cfg)):
        for r in range(seg.repeats):
            for k, kind in enumerate(seg.kinds):
                layer = seg.start + r * len(seg.kinds) + k
                prefix = {"official": f"layers.{layer}.", "hf": f"model.layers.{layer}.",
                          "hf_memory": f"model.layers.{layer}."}
                yield Scope((seg.name, f"block_{k}"), r, prefix, BLOCK, kind)
    for k in range(cfg.num_nextn_predict_layers):
        yield Scope((f"mtp_{k}",), None, dict.fromkeys(FAMILY.layouts, f"mtp.{k}."), MTP, mtp_kind(cfg, k))
    yield Scope((), None, dict.fromkeys(FAMILY.layouts, ""), GLOBAL, LayerKind("v4", 0, "moe"))


def is_mtp(name: str, n_layers: int) -> bool:
    return name.startswith("mtp.")


_TYPES = ("sliding_attention", "compressed_sparse_attention", "heavily_compressed_attention")
_READ = {
    "vocab_size", "hidden_size", "moe_intermediate_size", "num_hidden_layers", "rms_norm_eps",
    "max_position_embeddings", "num_nextn_predict_layers", "num_attention_heads", "num_key_value_heads",
    "head_dim", "qk_rope_head_dim", "partial_rotary_factor", "q_lora_rank", "o_groups", "o_lora_rank",
    "sliding_window", "index_n_heads", "index_head_dim", "index_topk", "compress_rope_theta", "rope_theta",
    "rope_parameters", "rope_scaling", "layer_types", "compress_rates", "compress_ratios", "mlp_layer_types",
    "num_hash_layers", "hc_mult", "hc_sinkhorn_iters", "hc_eps", "n_routed_experts", "n_shared_experts",
    "num_experts_per_tok", "scoring_func", "routed_scaling_factor", "norm_topk_prob", "swiglu_limit",
    "topk_method", "hidden_act", "tie_word_embeddings", "attention_bias", "mlp_bias", "quantization_config",
    "expert_dtype", "compress_rate_csa", "compress_rate_hca",
}  # fmt: skip


REQUIRED = (  # the keys every V4-style config.json must have (V4.1's text_config too)
    "vocab_size", "hidden_size", "moe_intermediate_size", "num_hidden_layers", "num_attention_heads", "head_dim",
    "q_lora_rank", "o_groups", "o_lora_rank", "sliding_window", "index_n_heads", "index_head_dim", "index_topk",
    "hc_mult", "hc_sinkhorn_iters", "hc_eps", "n_routed_experts", "n_shared_experts", "num_experts_per_tok",
    "routed_scaling_factor", "swiglu_limit", "rms_norm_eps", "norm_topk_prob",
)  # fmt: skip


def _check_semantics(hf) -> None:
    check_keys(hf, _READ)
    require(hf, REQUIRED)
    expect(hf, "hidden_act", ("silu",), "silu")
    expect(hf, "scoring_func", ("sqrtsoftplus", "sigmoid", "softmax"), "sqrtsoftplus")
    expect(hf, "topk_method", ("noaux_tc",), "noaux_tc")
    for key in ("tie_word_embeddings", "attention_bias", "mlp_bias"):
        expect(hf, key, (False,), False)
    expect(hf, "num_key_value_heads", (1, None), None)  # one shared K = V head
    expect(hf, "expert_dtype", ("fp4", "fp8", "bf16", None), None)
    quant_block(hf)


def _ratios(hf, n: int) -> list[int]:
    """Per-layer compress ratio from `layer_types` + `compress_rates` (transformers' form) or the
    official per-layer `compress_ratios`."""
    rates = {_TYPES[1]: hf.get("compress_rate_csa", 4), _TYPES[2]: hf.get("compress_rate_hca", 128),
             **(hf.get("compress_rates") or {}), _TYPES[0]: 0}
    if rates[_TYPES[1]] != CSA_RATIO:
        raise ConversionError(f"config.json compress_rates[{_TYPES[1]}] = {rates[_TYPES[1]]}: CSA is ratio 4 here")
    if hf.get("layer_types"):
        unknown = sorted(set(hf["layer_types"]) - set(_TYPES))
        if unknown:
            raise ConversionError(f"config.json layer_types: {unknown} not implemented (supported: {list(_TYPES)})")
        return [rates[t] for t in hf["layer_types"][:n]]
    if "compress_ratios" not in hf:
        raise ConversionError("config.json needs layer_types (+ compress_rates) or compress_ratios")
    ratios, mtp = [int(x) for x in hf["compress_ratios"]], hf.get("num_nextn_predict_layers", 0)
    if len(ratios) not in (n, n + mtp) or any(ratios[n:]):
        raise ConversionError(f"config.json compress_ratios: {len(ratios)} entries, want num_hidden_layers ({n}) "
                              f"or + num_nextn_predict_layers ({mtp}) with the MTP entries 0 (sliding window)")
    return ratios[:n]


def _hash_layers(hf, n: int) -> int:
    mlp_types = hf.get("mlp_layer_types") or ["hash_moe"] * hf.get("num_hash_layers", 3) + ["moe"] * n
    if len(mlp_types) < n:
        raise ConversionError(f"config.json mlp_layer_types: {len(mlp_types)} entries for {n} layers")
    n_hash = sum(t == "hash_moe" for t in mlp_types[:n])
    if mlp_types[:n_hash] != ["hash_moe"] * n_hash or set(mlp_types[:n]) - {"hash_moe", "moe"}:
        raise ConversionError(f"config.json mlp_layer_types: hash_moe layers must lead, then moe; got {mlp_types[:n]}")
    return n_hash


def config_from_json(hf, **overrides) -> ModelConfig:
    """Our ModelConfig from a DeepseekV4 `config.json` dict: transformers' post-init form
    (`layer_types`, `compress_rates`, `mlp_layer_types`, nested `rope_parameters`) or the official
    one (`compress_ratios` with the MTP entry last, `num_hash_layers`, `rope_scaling`)."""
    _check_semantics(hf)
    n = hf["num_hidden_layers"]
    rp = hf.get("rope_parameters") or {}
    main = rope_section(rp.get("main", {}), "config.json rope_parameters.main", ("default",))
    comp = rope_section(rp.get("compress", rp) or hf.get("rope_scaling"), "config.json rope_parameters.compress")
    head_dim = hf["head_dim"]
    rope_dim = int(hf.get("qk_rope_head_dim") or round(head_dim * (hf.get("partial_rotary_factor") or 0.125)))
    mtp = overrides.get("num_nextn_predict_layers", hf.get("num_nextn_predict_layers", 0))
    yarn = comp.get("rope_type", comp.get("type", "default")) == "yarn"
    expect(comp, "attention_factor", (1.0, None), None, "config.json rope_parameters.compress")  # no YaRN mscale
    fields = dict(
        vocab_size=hf["vocab_size"], dim=hf["hidden_size"], inter_dim=hf["moe_intermediate_size"],
        n_layers=n, n_dense_layers=0, norm_eps=hf["rms_norm_eps"],
        max_seq_len=hf.get("max_position_embeddings", 4096), num_nextn_predict_layers=mtp,
        compress_ratios=tuple(_ratios(hf, n)) + (0,) * mtp,
        v4=V4AttentionConfig(
            n_heads=hf["num_attention_heads"], head_dim=head_dim, rope_head_dim=rope_dim,
            q_lora_rank=hf["q_lora_rank"], o_groups=hf["o_groups"], o_lora_rank=hf["o_lora_rank"],
            window_size=hf["sliding_window"], index_n_heads=hf["index_n_heads"],
            index_head_dim=hf["index_head_dim"], index_topk=hf["index_topk"],
            compress_rope_theta=float(comp.get("rope_theta", hf.get("compress_rope_theta", 160000.0))),
        ),
        mhc=MHCConfig(hc_mult=hf["hc_mult"], hc_sinkhorn_iters=hf["hc_sinkhorn_iters"], hc_eps=hf["hc_eps"]),
        moe=MoEConfig(
            n_routed_experts=hf["n_routed_experts"], n_shared_experts=hf["n_shared_experts"],
            n_activated_experts=hf["num_experts_per_tok"], score_func=hf.get("scoring_func", "sqrtsoftplus"),
            route_scale=hf["routed_scaling_factor"], norm_topk_prob=hf["norm_topk_prob"],
            moe_inter_dim=hf["moe_intermediate_size"], swiglu_limit=float(hf["swiglu_limit"]),
            weight_before_down=True, n_hash_layers=_hash_layers(hf, n),
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


def config_to_json(cfg: ModelConfig) -> dict:
    """The `config.json` dict (DeepseekV4Config keys) for our V4 config; read back by
    `config_from_json` up to our compute-only fields (dtype, moe.impl / dispatch, v4.q_block)."""
    v, mo, r, n = cfg.v4, cfg.moe, cfg.rope, cfg.n_layers
    representable("DeepSeek-V4", {k: val for k, val, ok in (
        ("moe.n_expert_groups", mo.n_expert_groups, mo.n_expert_groups == 1),
        ("moe.n_limited_groups", mo.n_limited_groups, mo.n_limited_groups == 1),
        ("moe.weight_before_down", mo.weight_before_down, mo.weight_before_down),
        ("compress_ratios (MTP)", cfg.compress_ratios[n:], not any(cfg.compress_ratios[n:])),
    ) if not ok})
    ratios = cfg.compress_ratios[:n]
    hca = sorted({x for x in ratios if x not in (0, CSA_RATIO)})
    if len(hca) > 1:
        raise ConversionError(f"DeepseekV4Config has one HCA ratio; model.compress_ratios has {hca}")
    comp = {"rope_type": "yarn" if r.yarn else "default", "rope_theta": v.compress_rope_theta}
    if r.yarn:
        comp.update(factor=r.rope_factor, original_max_position_embeddings=r.original_seq_len,
                    beta_fast=r.beta_fast, beta_slow=r.beta_slow, attention_factor=1.0)  # V4: no mscale
    return dict(
        architectures=["DeepseekV4ForCausalLM"], model_type="deepseek_v4", vocab_size=cfg.vocab_size,
        hidden_size=cfg.dim, num_hidden_layers=n, rms_norm_eps=cfg.norm_eps, max_position_embeddings=cfg.max_seq_len,
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
        hidden_act="silu",
    )


FAMILY = Family(
    name="DeepSeek-V4", model_types=("deepseek_v4",), layouts=("hf", "official", "hf_memory"), scopes=scopes,
    config_from_json=config_from_json, config_to_json=config_to_json, is_mtp=is_mtp, skipped=SKIPPED,
    fp8_names=r"^(?!.*compressor\.).*\.(wq_a|wq_b|wkv|wo_a|wo_b|w1|w2|w3|e_proj|h_proj)\.weight$",
    f32_names=r"(^|\.)hc_|attn_sink$|\.ape$|ffn\.gate\.bias$", scale_fmt="ue8m0",
    scale_suffix={"hf": ".scale", "official": ".scale", "hf_memory": ".weight_scale_inv"},
)
