"""The DeepSeek-V4.1 checkpoint family: rule table (convert/table.py format), config.json, release storage.

Layouts (shared/reference/deepseek_v41_architecture.md §4.2-§4.3):
- "official": the release: `layers.{i}.attn.wq_a.weight` + `.scale`, `attn.compressor.wkv`, `attn.indexer.
  {wq_b, weights_proj, wk, k_norm}`, `ffn.gate.{bias, bias_vl}`, `ffn.experts.{e}.w1`, `hc_attn_fn`,
  `engram.{embed.weight (+ .scale), wkv.weight, q_weight, k_weight}`, `embed`, `norm`, `head`; DSpark
  `mtp.{k}.*` (a block), `mtp.0.main_{proj,norm}`, last stage `norm`, `markov_head.*`, `confidence_head.proj`.
- "hf_text": transformers' text-only revision 0a2080b4 in memory (tests/golden/v41): `model.` + the official
  names, `lm_head.weight`; the unused `engram.embed.scale` of a float table is skipped.
- "hf": transformers' vision-language revision in memory (`model.language_model.layers.{i}.self_attn.
  q_a_proj`, `attn_hc.fn`, fused `mlp.experts.gate_up_proj`, `model.language_model.engram_tables.{i}`,
  `.weight_scale_inv`) [unconfirmed: inferred from module names, reference §4.3]. Read only.
transformers loads no DSpark: every layout keeps `mtp.{k}.`. Vision (`vision_config` -> model.vision): `vision.*`,
`aligner.*`, `image_*` (§4.2) -> `media/`; hf_text: under `model.` (ours: that revision has none), hf: `model.visual.`,
attn.qkv / attn.proj [unconfirmed, §4.3]. A checkpoint without a vision_config: skipped with a note.
Ours: kv sources hold the compressor (with the release's `attn.indexer.wk` / `k_norm`), index sources the
indexer queries; w_kv[x, u, d] = wkv[u·D + d, x]; tables get zero rows up to `table_rows` (import only).
The release's dtypes and blocks per tensor: convert/v41_release.py (what `convert export --quant fp8` writes).
"""

import functools

import numpy as np

from deepseek_jax.config import MHCConfig, ModelConfig, MoEConfig, RopeConfig, V4AttentionConfig
from deepseek_jax.config.v41 import DSparkConfig, SharedKVConfig
from deepseek_jax.convert import config_json, v4
from deepseek_jax.convert.config_json import check_keys, expect, quant_block, representable, require, rope_section
from deepseek_jax.convert.errors import ConversionError
from deepseek_jax.convert.table import Dropped, Family, Rule, Scope
from deepseek_jax.convert.v4 import HEADS_I, HEADS_Q, LIN, SHARED, VEC, _when
from deepseek_jax.convert.v41_release import F32_NAMES, FP8_NAMES
from deepseek_jax.convert.v41_release import quantize_as_released as quantize_as_released  # re-exported
from deepseek_jax.convert.v41_release import release_specs as release_specs
from deepseek_jax.convert.v41_release import stored_as as stored_as
from deepseek_jax.layers.engram import table_rows
from deepseek_jax.models.common import layer_kinds, layer_segments
from deepseek_jax.models.dspark import STAGE_KIND

LAYOUTS = ("official", "hf_text", "hf")  # export writes the first two
READ_ONLY = {"hf": "its names are inferred from transformers' module names, not confirmed against a state dict "
                   "(reference §4.3)"}  # layout -> why export refuses it


def _r(ours, official: str, hf: str, fns=VEC, when=_when(lambda kind: True), experts=False) -> Rule:
    """A block rule: `official` is also the hf_text spelling (under `model.`); `hf` the VL one."""
    ours = ours if isinstance(ours, tuple) else (ours,)
    return Rule(ours, {"official": official, "hf_text": official, "hf": hf}, fns[0], fns[1], when, experts)


SOURCE = _when(lambda kind: kind.share in ("source", "candidate"))  # owns a compressor and the indexer keys
POOLED = _when(lambda kind: kind.share in ("source", "candidate") and kind.ratio > 1)  # gated pooling
INDEXER = _when(lambda kind: kind.share in ("source", "candidate", "reindex"))  # its own indexer queries
LEARNED = _when(lambda kind: kind.ffn == "moe")
MEMORY = _when(lambda kind: kind.memory != "none")


def VL(kind, cfg):  # noqa: N802 (a rule condition, named like the others)
    return kind.ffn == "moe" and cfg.moe.vl_bias


HEADS_KV = v4._heads(lambda c: c.mhc.hc_mult + 1, lambda c: c.dim)  # wkv [(I+1)·D, X] <-> [X, I+1, D]
BIAS_VL = _r("router:ffn/bias_vl", "ffn.gate.bias_vl", "mlp.gate.e_score_correction_bias_vl", VEC, VL)
ENGRAM = (  # an Engram layer's projections (its table: `table_rule`); shared with convert/article.py
    _r("engram/w_kv", "engram.wkv.weight", "engram.wkv.weight", HEADS_KV, MEMORY),
    _r("engram/q_weight", "engram.q_weight", "engram.q_weight", VEC, MEMORY),
    _r("engram/k_weight", "engram.k_weight", "engram.k_weight", VEC, MEMORY),
)
BLOCK = (
    _r("attn/w_dq", "attn.wq_a.weight", "self_attn.q_a_proj.weight", LIN),
    _r("attn/q_norm/scale", "attn.q_norm.weight", "self_attn.q_a_norm.weight"),
    _r("attn/w_uq", "attn.wq_b.weight", "self_attn.q_b_proj.weight", HEADS_Q),
    _r("attn/w_kv", "attn.wkv.weight", "self_attn.kv_proj.weight", LIN),
    _r("attn/kv_norm/scale", "attn.kv_norm.weight", "self_attn.kv_norm.weight"),
    _r("attn/w_oa", "attn.wo_a.weight", "self_attn.o_a_proj.weight", (v4._o_a, v4._o_a_back)),
    _r("attn/w_ob", "attn.wo_b.weight", "self_attn.o_b_proj.weight", (v4._o_b, v4._o_b_back)),
    _r("attn/sink", "attn.attn_sink", "self_attn.sinks"),
    _r("attn/compressor/w_kv", "attn.compressor.wkv.weight", "self_attn.compressor.kv_proj.weight", LIN, SOURCE),
    _r("attn/compressor/w_gate", "attn.compressor.wgate.weight", "self_attn.compressor.gate_proj.weight", LIN, POOLED),
    _r("attn/compressor/norm/scale", "attn.compressor.norm.weight", "self_attn.compressor.kv_norm.weight", VEC, SOURCE),
    _r("attn/compressor/w_k", "attn.indexer.wk.weight", "self_attn.indexer.k_proj.weight", LIN, SOURCE),
    _r("attn/compressor/k_norm/scale", "attn.indexer.k_norm.weight", "self_attn.indexer.k_norm.weight", VEC, SOURCE),
    _r("attn/indexer/w_uq", "attn.indexer.wq_b.weight", "self_attn.indexer.q_b_proj.weight", HEADS_I, INDEXER),
    _r("attn/indexer/w_weights", "attn.indexer.weights_proj.weight", "self_attn.indexer.weights_proj.weight", LIN,
       INDEXER),
    _r("attn_norm/scale", "attn_norm.weight", "input_layernorm.weight"),
    _r("ffn_norm/scale", "ffn_norm.weight", "post_attention_layernorm.weight"),
    *(_r(f"{s}_hc/fn", f"hc_{s}_fn", f"{s}_hc.fn", (v4._hc_fn, v4._hc_fn_back)) for s in ("attn", "ffn")),
    *(_r(f"{s}_hc/{p}", f"hc_{s}_{p}", f"{s}_hc.{p}") for s in ("attn", "ffn") for p in ("base", "scale")),
    _r("ffn/w_router", "ffn.gate.weight", "mlp.gate.weight", LIN),
    _r("router:ffn/bias", "ffn.gate.bias", "mlp.gate.e_score_correction_bias", VEC, LEARNED),
    BIAS_VL,
    _r("ffn/w_gate", "ffn.experts.{e}.w1.weight", "mlp.experts.{e}.gate_proj.weight", LIN, experts=True),
    _r("ffn/w_up", "ffn.experts.{e}.w3.weight", "mlp.experts.{e}.up_proj.weight", LIN, experts=True),
    _r("ffn/w_down", "ffn.experts.{e}.w2.weight", "mlp.experts.{e}.down_proj.weight", LIN, experts=True),
    *(_r(f"ffn/shared/w_{p}", f"ffn.shared_experts.w{w}.weight", f"mlp.shared_experts.{p}_proj.weight", LIN,
         SHARED) for p, w in (("gate", 1), ("up", 3), ("down", 2))),
    *ENGRAM,
)


def _pad_rows(a, cfg):  # [rows, H] -> [table_rows(rows), H]: zero rows, never addressed (layers/engram.py)
    return (np.pad(a, ((0, table_rows(a.shape[0]) - a.shape[0]), (0, 0))),)


@functools.cache
def table_rule(j: int) -> Rule:
    """Engram table j (of `engram.layer_ids`): the release's rows, ours padded with zero rows."""
    names = {"official": "embed.weight", "hf_text": "embed.weight", "hf": "weight"}
    return Rule(("engram/table",), names, _pad_rows, lambda w, c: w[: c.engram.num_embeddings[j]])


def _d(ours: str, name: str, fns=VEC) -> Rule:  # a DSpark tensor: the official name in every layout
    return Rule((ours,), dict.fromkeys(LAYOUTS, name), *fns)


DSPARK_FIRST = (_d("main_proj", "main_proj.weight", LIN), _d("main_norm/scale", "main_norm.weight"))
DSPARK_LAST = (_d("norm/scale", "norm.weight"), _d("markov_embed", "markov_head.embed.weight"),
               _d("markov_head", "markov_head.head.weight", LIN), _d("confidence", "confidence_head.proj.weight", LIN))
GLOBAL = tuple(Rule((ours,), dict(zip(LAYOUTS, names)), *fns) for ours, names, fns in (
    ("embedding", ("embed.weight", "model.embed.weight", "model.language_model.embed_tokens.weight"), VEC),
    ("final_norm/scale", ("norm.weight", "model.norm.weight", "model.language_model.norm.weight"), VEC),
    ("w_head", ("head.weight", "lm_head.weight", "lm_head.weight"), LIN)))
DROPPED = (Dropped(r"(model\.)?(vision|visual|aligner)\..+|(model\.)?image_(start|end|newline)(\.weight)?",
                   "vision tower / aligner / image delimiter (config.json has no vision_config)"),)


def _v(ours: str, official: str, hf: str | None = None, fns=VEC) -> Rule:  # a vision rule; hf_text = official
    return Rule((ours,), {"official": official, "hf_text": official, "hf": hf or official}, *fns)


def _split(n):  # fused [n·Out, In] <-> ours [In, n, ...]: qkv [3W, W] -> [W, 3, N, Y]; w1 [2F, W] -> [W, 2, F]
    return (lambda a, c: (a.T.reshape(a.shape[1], *n(c), -1),), lambda w, c: w.reshape(w.shape[0], -1).T)


def _lead(n):  # [Out, n·k] <-> ours [n, k, Out]: wo [W, N·Y] -> [N, Y, W]; aligner.w1 [F, W·r²] -> [W, r², F]
    return (lambda a, c: (a.T.reshape(n(c), -1, a.shape[0]),), lambda w, c: w.reshape(-1, w.shape[-1]).T)


N = lambda c: c.vision.num_heads  # noqa: E731
QKV_BIAS = (lambda a, c: (a.reshape(3, N(c), -1),), lambda w, c: w.reshape(-1))  # [3W] <-> [3, N, Y]
VISION_TOWER = (_v("w_patch", "patch_embed.proj.weight", fns=LIN), _v("b_patch", "patch_embed.proj.bias"),
                _v("norm/scale", "norm.weight"))
VISION_BLOCK = (
    _v("norm1/scale", "norm1.weight"), _v("norm2/scale", "norm2.weight"),
    _v("attn/w_qkv", "attn.wqkv.weight", "attn.qkv.weight", _split(lambda c: (3, N(c)))),
    _v("attn/b_qkv", "attn.wqkv.bias", "attn.qkv.bias", QKV_BIAS),
    _v("attn/w_o", "attn.wo.weight", "attn.proj.weight", _lead(N)), _v("attn/b_o", "attn.wo.bias", "attn.proj.bias"),
    _v("mlp/w_gate_up", "mlp.w1.weight", fns=_split(lambda c: (2,))), _v("mlp/w_down", "mlp.w2.weight", fns=LIN),
)
MEDIA = (_v("aligner/w1", "aligner.w1.weight", fns=_lead(lambda c: c.vision.hidden_size)),
         _v("aligner/b1", "aligner.w1.bias"), _v("aligner/w2", "aligner.w2.weight", fns=LIN),
         _v("aligner/b2", "aligner.w2.bias"), *(_v(n, n) for n in ("image_start", "image_newline", "image_end")))


SKIPPED = (r"model\.layers\.\d+\.engram\.embed\.scale",)  # hf_text: a float table's scale, unused by transformers


def scopes(cfg: ModelConfig):
    """Each main layer (its block, then its Engram table), the DSpark stages and heads, the globals."""
    for seg in layer_segments(layer_kinds(cfg)):
        for k, kind in enumerate(seg.kinds):
            for r, layer in enumerate(seg.layers(k)):
                prefix = {"official": f"layers.{layer}.", "hf_text": f"model.layers.{layer}.",
                          "hf": f"model.language_model.layers.{layer}."}
                yield Scope((seg.name, f"block_{k}"), r, prefix, BLOCK, kind)
                if kind.memory != "none":
                    table = {"official": f"layers.{layer}.engram.", "hf_text": f"model.layers.{layer}.engram.",
                             "hf": f"model.language_model.engram_tables.{layer}."}
                    rule = table_rule(int(kind.memory.removeprefix("engram_")))
                    yield Scope((seg.name, f"block_{k}"), r, table, (rule,), kind)
    K = cfg.num_nextn_predict_layers if cfg.dspark is not None else 0  # (the representable guard refuses MTP)
    for k in range(K):
        yield Scope(("dspark", f"stage_{k}"), None, dict.fromkeys(LAYOUTS, f"mtp.{k}."), BLOCK,
                    STAGE_KIND, cfg.dspark.n_routed_experts)
    for k, rules in ((0, DSPARK_FIRST), (K - 1, DSPARK_LAST)) if K else ():
        yield Scope(("dspark",), None, dict.fromkeys(LAYOUTS, f"mtp.{k}."), rules, STAGE_KIND)
    if cfg.vision is not None:
        tower = {"official": "vision.", "hf_text": "model.vision.", "hf": "model.visual."}
        yield from vision_scopes(cfg, tower, {"official": "", "hf_text": "model.", "hf": "model."})
    yield Scope((), None, dict.fromkeys(LAYOUTS, ""), GLOBAL, STAGE_KIND)


def vision_scopes(cfg: ModelConfig, tower: dict[str, str], media: dict[str, str]):
    """The ViT (blocks along its scan axis) under the `tower` prefixes, the aligner and the image delimiters
    under the `media` ones: our `media/` (shared with convert/article.py)."""
    yield Scope(("media", "vision"), None, tower, VISION_TOWER, STAGE_KIND)
    for b in range(cfg.vision.num_layers):
        prefix = {lay: f"{p}blocks.{b}." for lay, p in tower.items()}
        yield Scope(("media", "vision", "blocks"), b, prefix, VISION_BLOCK, STAGE_KIND)
    yield Scope(("media",), None, media, MEDIA, STAGE_KIND)


# config.json: the composite one (`text_config`), a bare text config, or inference/config.json
RELEASED_RATIOS = (0, 0) + (2,) * 18 + (1,) * 20
RELEASED_KV, RELEASED_INDEX = [2, 8, 14, 20], [2, 8, 14, 20, 24, 28, 32, 36]
_FLAT = {  # inference/config.json key -> text_config key
    "dim": "hidden_size", "moe_inter_dim": "moe_intermediate_size", "n_layers": "num_hidden_layers",
    "n_mtp_layers": "num_nextn_predict_layers", "n_heads": "num_attention_heads",
    "n_activated_experts": "num_experts_per_tok", "score_func": "scoring_func", "route_scale": "routed_scaling_factor",
    "rope_head_dim": "qk_rope_head_dim", "norm_eps": "rms_norm_eps", "window_size": "sliding_window",
    "kv_source_layers": "kv_source_layer_ids", "index_source_layers": "index_source_layer_ids",
    "candidate_source_layer": "candidate_source_layer_id", "dspark_n_activated_experts": "dspark_num_experts_per_tok",
}  # fmt: skip
_FLAT_YARN = {"rope_factor": "factor", "original_seq_len": "original_max_position_embeddings",
              "beta_fast": "beta_fast", "beta_slow": "beta_slow"}
_DSPARK = {"target_layers": ("dspark_target_layer_ids", None), "block_size": ("dspark_block_size", 5),
           "noise_token_id": ("dspark_noise_token_id", 128799), "n_routed_experts": ("dspark_n_routed_experts", 128),
           "markov_rank": ("dspark_markov_rank", 256), "n_activated_experts": ("dspark_num_experts_per_tok", 3)}
_READ = {
    *v4.REQUIRED, "model_type", "max_position_embeddings", "num_nextn_predict_layers", "num_key_value_heads",
    "qk_rope_head_dim", "partial_rotary_factor", "compress_rope_theta", "rope_theta", "rope_parameters",
    "rope_scaling", "layer_types", "compress_ratios", "kv_source_layer_ids", "index_source_layer_ids",
    "candidate_source_layer_id", "candidate_topk_blocks", "candidate_block_size", "num_hash_layers", "scoring_func",
    "gate_temp", "topk_method", "hidden_act", "tie_word_embeddings", "attention_bias", "mlp_bias",
    "quantization_config", "expert_dtype", "engram_layer_ids", "engram_num_embeddings", "engram_pad_id",
    "engram_pad_token_id", *(key for key, _ in (*config_json.ENGRAM_KEYS.values(), *_DSPARK.values())),
}  # fmt: skip


def text_config(hf) -> dict:
    """The text model's keys from any of the three forms (the vision config: config_json.vision_from_json)."""
    if "text_config" in hf:
        check_keys(hf, {"text_config", "vision_config", "image_token_id", "quantization_config", "tie_word_embeddings"})
        expect(hf, "tie_word_embeddings", (False, None), None)
        quant_block(hf)
        return dict(hf["text_config"])
    if "dim" in hf and "n_layers" in hf:  # inference/config.json
        text = {_FLAT.get(k, k): v for k, v in hf.items()
                if k not in _FLAT_YARN and not k.startswith("vision_") and k != "image_token_id"}
        factor = hf.get("rope_factor", 1)
        if factor > 1:
            text["rope_scaling"] = {"rope_type": "yarn", **{v: hf[k] for k, v in _FLAT_YARN.items() if k in hf}}
        text.setdefault("max_position_embeddings", int(hf.get("original_seq_len", 65536) * factor))
        text.setdefault("norm_topk_prob", True)  # the official gate always renormalises (reference §1.9)
        return text
    return dict(hf)


_ALLOWED = {  # values the model implements (absent: the first)
    "hidden_act": ("silu", None), "scoring_func": ("sqrtsoftplus", "sigmoid", "softmax", None),
    "topk_method": ("noaux_tc", None), "tie_word_embeddings": (False, None), "attention_bias": (False, None),
    "mlp_bias": (False, None), "num_key_value_heads": (1, None), "num_hash_layers": (0, None),  # learned gates
    "expert_dtype": ("fp4", "fp8", "bf16", None), "model_type": ("deepseek_v41_text", "deepseek_v41", None),
}  # fmt: skip


def _check_semantics(t) -> None:
    check_keys(t, _READ, "config.json text_config")
    require(t, v4.REQUIRED, "config.json text_config")
    for key, allowed in _ALLOWED.items():
        expect(t, key, allowed, None, "config.json text_config")
    quant_block(t, "config.json text_config")


def _schedule(t, n: int, n_mtp: int) -> tuple[list[int], SharedKVConfig]:
    """Main-layer ratios and the shared-KV roles; absent lists take transformers' defaults (§1.1)."""
    ratios = t.get("compress_ratios")
    if ratios is None:
        lead = min(2, n)
        ratios = RELEASED_RATIOS if n == 40 else (0,) * lead + (2,) * ((n - lead + 1) // 2) + (1,) * ((n - lead) // 2)
    ratios = [int(x) for x in ratios]
    if len(ratios) not in (n, n + n_mtp) or any(ratios[n:]):
        raise ConversionError(f"config.json compress_ratios: {len(ratios)} entries, want num_hidden_layers ({n}) or "
                              f"+ num_nextn_predict_layers ({n_mtp}) with the DSpark entries 0 (sliding window)")
    main, kv, index = ratios[:n], t.get("kv_source_layer_ids"), t.get("index_source_layer_ids")
    if kv is None:  # the first layer of each run of equal non-zero ratios
        kv = RELEASED_KV if tuple(main) == RELEASED_RATIOS else [
            i for i, r in enumerate(main) if r > 0 and (i == 0 or main[i - 1] != r)]
    if index is None:
        index = RELEASED_INDEX if list(kv) == RELEASED_KV else list(kv)
    candidate = t.get("candidate_source_layer_id")
    if t.get("layer_types") is not None:  # transformers' derived names: kv sources compress, the rest slide
        want = ["shared_compressed_attention" if i in kv else "sliding_attention" for i in range(n)]
        expect({"layer_types": list(t["layer_types"])[:n]}, "layer_types", (want,))
    return main, SharedKVConfig(
        kv_source_layers=tuple(kv), index_source_layers=tuple(index),
        candidate_source_layer=int((kv[-1] if kv else -1) if candidate is None else candidate),
        candidate_topk_blocks=t.get("candidate_topk_blocks", 2048),
        candidate_block_size=t.get("candidate_block_size", 8))


def _dspark(t, n: int, n_mtp: int, kv) -> DSparkConfig | None:
    if n_mtp == 0:
        return None
    fields = {k: t.get(key, d) for k, (key, d) in _DSPARK.items()}
    targets = fields.pop("target_layers") or sorted(i for i in range(n) if i not in kv)[-3:]  # not kv sources
    return DSparkConfig(target_layers=tuple(targets), **fields)


def _rope(t) -> tuple[RopeConfig, float]:
    """(RoPE of the model, θ of the compressed layers): `rope_parameters` {main, compress} or `rope_scaling`."""
    rp = t.get("rope_parameters") or {}
    main = rope_section(rp.get("main", {}), "config.json rope_parameters.main", ("default",))
    comp = rope_section(rp.get("compress", rp) or t.get("rope_scaling"), "config.json rope_parameters.compress")
    expect(comp, "attention_factor", (1.0, None), None, "config.json rope_parameters.compress")  # no YaRN mscale
    yarn = comp.get("rope_type", comp.get("type", "default")) == "yarn"
    rope = RopeConfig(
        rope_theta=float(main.get("rope_theta", t.get("rope_theta", 10000.0))),
        rope_factor=float(comp.get("factor", 1.0)) if yarn else 1.0,
        original_seq_len=int(comp.get("original_max_position_embeddings", 4096)),
        beta_fast=float(comp.get("beta_fast") or 32), beta_slow=float(comp.get("beta_slow") or 1),
    )
    return rope, float(comp.get("rope_theta", t.get("compress_rope_theta", 160000.0)))


def config_from_json(hf, **overrides) -> ModelConfig:
    """Our ModelConfig from a DeepSeek-V4.1 config.json dict (`overrides`: ModelConfig fields;
    num_nextn_predict_layers=0 drops DSpark)."""
    t = text_config(hf)
    _check_semantics(t)
    n = t["num_hidden_layers"]
    n_mtp = overrides.get("num_nextn_predict_layers", t.get("num_nextn_predict_layers", 3))
    main, shared = _schedule(t, n, t.get("num_nextn_predict_layers", 3))
    rope, compress_theta = _rope(t)
    rope_dim = t.get("qk_rope_head_dim") or round(t["head_dim"] * (t.get("partial_rotary_factor") or 0.125))
    fields = dict(
        vocab_size=t["vocab_size"], dim=t["hidden_size"], inter_dim=t["moe_intermediate_size"], n_layers=n,
        n_dense_layers=0, norm_eps=t["rms_norm_eps"], max_seq_len=t.get("max_position_embeddings", 1 << 20),
        num_nextn_predict_layers=n_mtp, compress_ratios=tuple(main) + (0,) * n_mtp, rope=rope,
        v4=V4AttentionConfig(
            n_heads=t["num_attention_heads"], head_dim=t["head_dim"], rope_head_dim=int(rope_dim),
            q_lora_rank=t["q_lora_rank"], o_groups=t["o_groups"], o_lora_rank=t["o_lora_rank"],
            window_size=t["sliding_window"], index_n_heads=t["index_n_heads"], index_head_dim=t["index_head_dim"],
            index_topk=t["index_topk"], compress_rope_theta=compress_theta,
            document_mask=False,  # V4.1 attends across documents (config/model.py refuses true)
        ),
        mhc=MHCConfig(hc_mult=t["hc_mult"], hc_sinkhorn_iters=t["hc_sinkhorn_iters"], hc_eps=t["hc_eps"],
                      single_pass=True),
        moe=MoEConfig(
            n_routed_experts=t["n_routed_experts"], n_shared_experts=t["n_shared_experts"],
            n_activated_experts=t["num_experts_per_tok"], score_func=t.get("scoring_func", "sqrtsoftplus"),
            route_scale=t["routed_scaling_factor"], norm_topk_prob=t["norm_topk_prob"],
            moe_inter_dim=t["moe_intermediate_size"], swiglu_limit=float(t["swiglu_limit"]),
            weight_before_down=True, gate_temp=float(t.get("gate_temp", 1.0)), vl_bias=True,
        ),
        shared_kv=shared, engram=config_json.engram_from_json(t), dspark=_dspark(t, n, n_mtp, shared.kv_source_layers),
        vision=config_json.vision_from_json(hf),
    )
    fields.update(overrides)
    return ModelConfig(**fields)


def config_to_json(cfg: ModelConfig) -> dict:
    """The composite config.json (DeepseekV41Config, `text_config` keys as released, `vision_config`) for our
    config; read back by `config_from_json` up to our compute-only fields (dtype, moe.impl / dispatch,
    v4.q_block, shared_kv.qat, engram optimizer settings) and `inter_dim` (= moe_inter_dim)."""
    v, mo, r, s, n, e, d = cfg.v4, cfg.moe, cfg.rope, cfg.shared_kv, cfg.n_layers, cfg.engram, cfg.dspark
    representable("DeepSeek-V4.1", {k: val for k, val, ok in (
        ("shared_kv", s, s is not None), ("mhc.single_pass", cfg.mhc.single_pass, cfg.mhc.single_pass),
        ("moe.vl_bias", mo.vl_bias, mo.vl_bias), ("moe.n_hash_layers", mo.n_hash_layers, mo.n_hash_layers == 0),
        ("moe.n_expert_groups", mo.n_expert_groups, mo.n_expert_groups == 1),
        ("moe.n_limited_groups", mo.n_limited_groups, mo.n_limited_groups == 1),
        ("moe.weight_before_down", mo.weight_before_down, mo.weight_before_down),
        ("engram.variant", e and e.variant, e is None or e.variant == "v41"),
        ("engram.seed", e and e.seed, e is None or e.seed == 0),
        ("num_nextn_predict_layers (MTP without dspark)", cfg.num_nextn_predict_layers,
         d is not None or cfg.num_nextn_predict_layers == 0),
        ("compress_ratios (DSpark)", cfg.compress_ratios[n:], not any(cfg.compress_ratios[n:])),
        ("video", cfg.video, cfg.video is None), ("audio", cfg.audio, cfg.audio is None),  # our extensions
    ) if not ok})
    yarn = {"rope_type": "yarn", "factor": r.rope_factor, "original_max_position_embeddings": r.original_seq_len,
            "beta_fast": r.beta_fast, "beta_slow": r.beta_slow}
    text = dict(
        model_type="deepseek_v41_text", vocab_size=cfg.vocab_size, hidden_size=cfg.dim,
        moe_intermediate_size=mo.moe_inter_dim, num_hidden_layers=n, num_attention_heads=v.n_heads,
        num_key_value_heads=1, head_dim=v.head_dim, qk_rope_head_dim=v.rope_head_dim, q_lora_rank=v.q_lora_rank,
        o_lora_rank=v.o_lora_rank, o_groups=v.o_groups, hidden_act="silu", swiglu_limit=mo.swiglu_limit,
        rms_norm_eps=cfg.norm_eps, tie_word_embeddings=False, max_position_embeddings=cfg.max_seq_len,
        rope_theta=r.rope_theta, rope_scaling=yarn if r.yarn else None, n_routed_experts=mo.n_routed_experts,
        n_shared_experts=mo.n_shared_experts, num_experts_per_tok=mo.n_activated_experts, scoring_func=mo.score_func,
        topk_method="noaux_tc", norm_topk_prob=mo.norm_topk_prob, routed_scaling_factor=mo.route_scale,
        gate_temp=mo.gate_temp, sliding_window=v.window_size, compress_ratios=list(cfg.compress_ratios),
        compress_rope_theta=v.compress_rope_theta, kv_source_layer_ids=list(s.kv_source_layers),
        index_source_layer_ids=list(s.index_source_layers), index_n_heads=v.index_n_heads,
        index_head_dim=v.index_head_dim, index_topk=v.index_topk, candidate_source_layer_id=s.candidate_source_layer,
        candidate_topk_blocks=s.candidate_topk_blocks, candidate_block_size=s.candidate_block_size,
        hc_mult=cfg.mhc.hc_mult, hc_sinkhorn_iters=cfg.mhc.hc_sinkhorn_iters, hc_eps=cfg.mhc.hc_eps,
        engram_layer_ids=[], engram_num_embeddings=[], num_nextn_predict_layers=cfg.num_nextn_predict_layers,
    )
    if e is not None:
        text.update(config_json.engram_json(e))
    if d is not None:
        text.update({key: getattr(d, k) for k, (key, _) in _DSPARK.items()})
    vision = {} if cfg.vision is None else config_json.vision_to_json(cfg.vision)
    return dict(architectures=["DeepseekV41ForCausalLM"], model_type="deepseek_v41", text_config=text, **vision)


FAMILY = Family(
    name="DeepSeek-V4.1", model_types=("deepseek_v41", "deepseek_v41_text"), layouts=LAYOUTS, scopes=scopes,
    config_from_json=config_from_json, config_to_json=config_to_json, skipped=SKIPPED, dropped=DROPPED,
    is_mtp=lambda name, n_layers: name.startswith("mtp."), fp8_names=FP8_NAMES, f32_names=F32_NAMES,
    scale_fmt="ue8m0", scale_suffix={"official": ".scale", "hf_text": ".scale", "hf": ".weight_scale_inv"},
)
