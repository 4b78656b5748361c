"""The article composition's checkpoint layout (convert/table.py format) and config.json: MLA blocks, with
or without V3.2's lightning indexer (DSA), on V4's mHC residual streams, with V4's MoE refinements and, as
configured, V4.1's Engram, media-span router bias and vision tower, our video and audio front-ends, and V4's
stream MTP (configs/model/deepseek_v4_article.yaml; tiny_article.yaml, tiny_composed.yaml).

No DeepSeek release holds this composition, so its one layout, "official", spells each part as the release
that has it (shared/reference/checkpoint_formats.md) and the exporter writes exactly what the importer reads:
- attention (V3.2, `inference/convert.py` names): `layers.{i}.attn.{wq_a, q_norm, wq_b | wq, wkv_a, kv_norm,
  wkv_b, wo}`, `attn_norm`, `ffn_norm`; DSA `attn.indexer.{wq_b, wk, k_norm (weight, bias), weights_proj}`;
- mHC (V4): `layers.{i}.hc_{attn,ffn}_{fn,base,scale}`, `hc_head_{fn,base,scale}`;
- MoE (V4): `ffn.gate.{weight, bias}`, `ffn.gate.tid2eid` (hash layers), `ffn.experts.{e}.w{1,2,3}`,
  `ffn.shared_experts.w{1,2,3}`; dense layers (V3) `ffn.w{1,2,3}`; media-span bias (V4.1) `ffn.gate.bias_vl`;
- Engram (V4.1): `layers.{i}.engram.{embed.weight, wkv.weight, q_weight, k_weight}` (tables at their real rows);
- vision (V4.1): `vision.*`, `aligner.*`, `image_{start,newline,end}`;
- MTP (V4): `mtp.{k}.` + a block's names, `e_proj`, `h_proj`, `enorm`, `hnorm`, `norm`, `hc_head_*`;
- `embed.weight`, `norm.weight`, `head.weight`.
Ours, in the same style (no release has them): `video_{start,end}` [D] and `video_frame` [max_frames, D];
`audio.conv.{i}.{weight [C, I, 3] (torch Conv1d), bias}`, `audio.aligner.w{1,2}.{weight, bias}`,
`audio_{start,end}`. There is no "hf" layout: transformers has no class for this composition.

config.json (model_type `deepseek_v4_article`, ours): the keys of the release configs for the parts they
describe (DeepseekV32Config's attention, index and `rope_parameters`; V4's `hc_*`, `swiglu_limit`,
`num_hash_layers`; V4.1's `gate_temp`, `engram_*`, `vision_config` + `image_token_id`), and a `deepseek_jax`
section with our field names for everything else (video, audio, `moe.weight_before_down` / `vl_bias`, compute
choices): exactly the fields whose values those keys do not give, so import rebuilds the exact ModelConfig.
`--quant fp8`: the weights V3.2 / V4 / V4.1 store as FP8 (attention and indexer projections, experts, MTP
projections, `engram.wkv`), e4m3 with V4's 128×128 E8M0 `.scale`; everything else as `--dtype` (mHC and
router biases F32).
"""

import dataclasses

from deepseek_jax.config import (
    ConfigError,
    IndexerConfig,
    MHCConfig,
    MLAConfig,
    ModelConfig,
    MoEConfig,
    build,
    to_dict,
)
from deepseek_jax.convert import config_json, v3, v4, v41
from deepseek_jax.convert.config_json import check_keys, expect, quant_block, require
from deepseek_jax.convert.errors import ConversionError
from deepseek_jax.convert.table import Family, Rule, Scope, in_block, linear, vector
from deepseek_jax.convert.v41_release import TABLE_NAMES
from deepseek_jax.models.common import LayerKind, layer_kinds, layer_segments, mtp_kind

MODEL_TYPE, SECTION, LAYOUTS = "deepseek_v4_article", "deepseek_jax", ("official",)
OTHER_KIND = LayerKind("mla", 0, "dense")  # scopes outside the blocks: their rules hold for any kind

MOE = v3.ATTN + v4.HC + v4.MOE + (v41.BIAS_VL,) + v41.ENGRAM  # v3.ATTN holds the attn / ffn norms
DENSE = v3.ATTN + v4.HC + v3.DENSE_FFN + v41.ENGRAM
MTP = tuple(map(in_block, MOE)) + v4.MTP_OWN


def _o(name: str) -> dict[str, str]:
    return {"official": name}


def _conv_ours(a, cfg):  # torch Conv1d [C, I, 3] -> ours [3, I, C]
    return (a.transpose(2, 1, 0),)


def _conv_ckpt(w, cfg):
    return w.transpose(2, 1, 0)


VIDEO = tuple(vector(n, _o(n)) for n in ("video_start", "video_end", "video_frame"))
AUDIO_MARKS = tuple(vector(n, _o(n)) for n in ("audio_start", "audio_end"))
AUDIO_ALIGNER = tuple(r for i in (1, 2) for r in (linear(f"w_proj{i}", _o(f"aligner.w{i}.weight")),
                                                  vector(f"b_proj{i}", _o(f"aligner.w{i}.bias"))))


def _audio_convs(n: int) -> tuple[Rule, ...]:
    return tuple(r for i in range(n) for r in (Rule((f"w_conv{i}",), _o(f"conv.{i}.weight"), _conv_ours, _conv_ckpt),
                                               vector(f"b_conv{i}", _o(f"conv.{i}.bias"))))


def scopes(cfg: ModelConfig):
    """Each main layer (its block, then its Engram table), the MTP layers, the media front-ends, the globals."""
    for seg in layer_segments(layer_kinds(cfg)):
        for k, kind in enumerate(seg.kinds):
            for r, layer in enumerate(seg.layers(k)):
                rules = DENSE if kind.ffn == "dense" else MOE
                yield Scope((seg.name, f"block_{k}"), r, _o(f"layers.{layer}."), rules, kind)
                if kind.memory != "none":
                    rule = v41.table_rule(int(kind.memory.removeprefix("engram_")))
                    yield Scope((seg.name, f"block_{k}"), r, _o(f"layers.{layer}.engram."), (rule,), kind)
    for k in range(cfg.num_nextn_predict_layers):
        yield Scope((f"mtp_{k}",), None, _o(f"mtp.{k}."), MTP, mtp_kind(cfg, k))
    if cfg.vision is not None:
        yield from v41.vision_scopes(cfg, _o("vision."), _o(""))
    if cfg.video is not None:
        yield Scope(("media",), None, _o(""), VIDEO, OTHER_KIND)
    if cfg.audio is not None:
        rules = _audio_convs(len(cfg.audio.conv_strides)) + AUDIO_ALIGNER
        yield Scope(("media", "audio"), None, _o("audio."), rules, OTHER_KIND)
        yield Scope(("media",), None, _o(""), AUDIO_MARKS, OTHER_KIND)
    yield Scope((), None, _o(""), v4.GLOBAL, OTHER_KIND)


# ----------------------------------------------------------------------------------------------
# config.json: the releases' keys for their parts + our `deepseek_jax` section for the rest
# ----------------------------------------------------------------------------------------------

_REQUIRED = (
    "vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "first_k_dense_replace", "rms_norm_eps",
    "max_position_embeddings", "num_nextn_predict_layers", "num_attention_heads", "kv_lora_rank",
    "qk_nope_head_dim", "qk_rope_head_dim", "v_head_dim", "hc_mult", "hc_sinkhorn_iters", "hc_eps",
    "n_routed_experts", "n_shared_experts", "num_experts_per_tok", "n_group", "topk_group", "scoring_func",
    "routed_scaling_factor", "norm_topk_prob", "moe_intermediate_size", "swiglu_limit", "num_hash_layers",
    "gate_temp",
)  # fmt: skip
_INDEX = ("index_n_heads", "index_head_dim", "index_topk")
_ENGRAM = ("engram_layer_ids", "engram_num_embeddings", "engram_pad_token_id", "engram_pad_id",
           *(key for key, _ in config_json.ENGRAM_KEYS.values()))
_READ = {*_REQUIRED, *_INDEX, *_ENGRAM, "q_lora_rank", "rope_parameters", "vision_config", "image_token_id",
         "hidden_act", "topk_method", "tie_word_embeddings", "quantization_config", SECTION}


def _official_json(cfg: ModelConfig) -> dict:
    """The release configs' keys for the parts they describe."""
    m, mo, h = cfg.mla, cfg.moe, cfg.mhc
    hf = dict(
        model_type=MODEL_TYPE, vocab_size=cfg.vocab_size, hidden_size=cfg.dim, intermediate_size=cfg.inter_dim,
        num_hidden_layers=cfg.n_layers, first_k_dense_replace=cfg.n_dense_layers, rms_norm_eps=cfg.norm_eps,
        max_position_embeddings=cfg.max_seq_len, num_nextn_predict_layers=cfg.num_nextn_predict_layers,
        num_attention_heads=m.n_heads, q_lora_rank=m.q_lora_rank or None, kv_lora_rank=m.kv_lora_rank,
        qk_nope_head_dim=m.qk_nope_head_dim, qk_rope_head_dim=m.qk_rope_head_dim, v_head_dim=m.v_head_dim,
        rope_parameters=v3.rope_to_json(cfg.rope), hc_mult=h.hc_mult, hc_sinkhorn_iters=h.hc_sinkhorn_iters,
        hc_eps=h.hc_eps, n_routed_experts=mo.n_routed_experts, n_shared_experts=mo.n_shared_experts,
        num_experts_per_tok=mo.n_activated_experts, n_group=mo.n_expert_groups, topk_group=mo.n_limited_groups,
        scoring_func=mo.score_func, routed_scaling_factor=mo.route_scale, norm_topk_prob=mo.norm_topk_prob,
        moe_intermediate_size=mo.moe_inter_dim, swiglu_limit=mo.swiglu_limit, num_hash_layers=mo.n_hash_layers,
        gate_temp=mo.gate_temp, hidden_act="silu", topk_method="noaux_tc", tie_word_embeddings=False,
    )
    if cfg.index is not None:
        hf.update({key: getattr(cfg.index, key) for key in _INDEX})
    if cfg.engram is not None:
        hf.update(config_json.engram_json(cfg.engram))
    if cfg.vision is not None:  # fields V4.1's vision_config cannot hold travel in the section
        hf.update(config_json.vision_to_json(dataclasses.replace(cfg.vision, aligner_hidden=0, pad_value=127)))
    return hf


def _from_official(hf) -> ModelConfig:
    """The ModelConfig the release keys give (our schema's defaults for every other field)."""
    check_keys(hf, _READ)
    require(hf, _REQUIRED)
    if "q_lora_rank" not in hf:  # null = full-rank queries; absent is ambiguous
        raise ConversionError("config.json: missing ['q_lora_rank'] (null for full-rank queries)")
    if any(key in hf for key in _INDEX):
        require(hf, _INDEX)
    for key, allowed in (("hidden_act", "silu"), ("topk_method", "noaux_tc"), ("tie_word_embeddings", False)):
        expect(hf, key, (allowed,), allowed)
    quant_block(hf)
    try:
        return ModelConfig(
            vocab_size=hf["vocab_size"], dim=hf["hidden_size"], inter_dim=hf["intermediate_size"],
            n_layers=hf["num_hidden_layers"], n_dense_layers=hf["first_k_dense_replace"], norm_eps=hf["rms_norm_eps"],
            max_seq_len=hf["max_position_embeddings"], num_nextn_predict_layers=hf["num_nextn_predict_layers"],
            mla=MLAConfig(n_heads=hf["num_attention_heads"], q_lora_rank=hf["q_lora_rank"] or 0,
                          kv_lora_rank=hf["kv_lora_rank"], qk_nope_head_dim=hf["qk_nope_head_dim"],
                          qk_rope_head_dim=hf["qk_rope_head_dim"], v_head_dim=hf["v_head_dim"]),
            index=IndexerConfig(**{key: hf[key] for key in _INDEX}) if "index_topk" in hf else None,
            rope=v3.rope_from_json(hf),
            mhc=MHCConfig(hc_mult=hf["hc_mult"], hc_sinkhorn_iters=hf["hc_sinkhorn_iters"], hc_eps=hf["hc_eps"]),
            moe=MoEConfig(
                n_routed_experts=hf["n_routed_experts"], n_shared_experts=hf["n_shared_experts"],
                n_activated_experts=hf["num_experts_per_tok"], n_expert_groups=hf["n_group"],
                n_limited_groups=hf["topk_group"], score_func=hf["scoring_func"],
                route_scale=hf["routed_scaling_factor"], norm_topk_prob=hf["norm_topk_prob"],
                moe_inter_dim=hf["moe_intermediate_size"], swiglu_limit=float(hf["swiglu_limit"]),
                n_hash_layers=hf["num_hash_layers"], gate_temp=float(hf["gate_temp"]),
            ),
            engram=config_json.engram_from_json(hf), vision=config_json.vision_from_json(hf),
        )
    except (ConfigError, TypeError, ValueError) as e:  # ValueError: a non-numeric swiglu_limit / gate_temp
        raise ConversionError(f"config.json: {e}") from None


def _diff(ours: dict, base: dict) -> dict:
    """The entries of `ours` (nested) that differ from `base`'s."""
    out = {}
    for key, value in ours.items():
        if isinstance(value, dict) and isinstance(base.get(key), dict):
            value = _diff(value, base[key])
            if value:
                out[key] = value
        elif value != base.get(key):
            out[key] = value
    return out


def _merge(base: dict, over: dict) -> dict:
    out = dict(base)
    for key, value in over.items():
        out[key] = _merge(base[key], value) if isinstance(value, dict) and isinstance(base.get(key), dict) else value
    return out


def config_to_json(cfg: ModelConfig) -> dict:
    """config.json of our config: the release keys, plus the `deepseek_jax` section when they do not give
    every field (read back exactly by `config_from_json`)."""
    hf = _official_json(cfg)
    ours = _diff(to_dict(cfg), to_dict(_from_official(hf)))
    return {**hf, SECTION: ours} if ours else hf


def config_from_json(hf, **overrides) -> ModelConfig:
    """Our ModelConfig from config.json (`overrides`: ModelConfig fields, e.g. num_nextn_predict_layers=0)."""
    section = hf.get(SECTION) or {}
    if not isinstance(section, dict):
        raise ConversionError(f"config.json {SECTION}: expected a mapping of model fields, got {section!r}")
    base = _from_official({k: v for k, v in hf.items() if k != SECTION})
    try:
        cfg = build(ModelConfig, _merge(to_dict(base), section), prefix="model.")
    except ConfigError as e:
        raise ConversionError(f"config.json {SECTION}: {e}") from None
    return dataclasses.replace(cfg, **overrides)


FAMILY = Family(
    name="article composition (MLA / DSA on mHC)", model_types=(MODEL_TYPE,), layouts=LAYOUTS, scopes=scopes,
    config_from_json=config_from_json, config_to_json=config_to_json,
    is_mtp=lambda name, n_layers: name.startswith("mtp."), skipped=v4.SKIPPED,
    fp8_names=r"^(?!vision\.|aligner\.|audio\.).*\.(wq_a|wq_b|wq|wkv_a|wkv_b|wo|wk|wkv|w1|w2|w3|e_proj|h_proj)\.weight$",
    f32_names=r"(^|\.)hc_|ffn\.gate\.bias(_vl)?$", scale_fmt="ue8m0", scale_suffix={"official": ".scale"},
    row_names=TABLE_NAMES,
    not_offered=(("hf", "transformers has no class for MLA / DSA blocks on mHC streams; write --layout official"),),
)
