"""Strict reading of a checkpoint's `config.json`: every key is either read, checked against the values
the model implements, or known to be informational. Anything else is an error naming the field, so a
checkpoint whose math we do not implement is refused instead of silently loaded wrong."""

from collections.abc import Mapping
from typing import Any

from deepseek_jax.config.v41 import EngramConfig
from deepseek_jax.convert.errors import ConversionError

# Keys that do not change the network's math (tokens, training-time options, bookkeeping).
INFORMATIONAL = frozenset(
    {
        "_name_or_path",
        "architectures",
        "auto_map",
        "dtype",
        "torch_dtype",
        "transformers_version",
        "bos_token_id",
        "eos_token_id",
        "pad_token_id",
        "initializer_range",
        "use_cache",
        "attention_dropout",
        "output_router_logits",
        "router_aux_loss_coef",
        "router_jitter_noise",
        "aux_loss_alpha",
        "seq_aux",
        "pretraining_tp",
        "ep_size",
        "chunk_size_feed_forward",
        "id2label",
        "label2id",
        "is_encoder_decoder",
        "output_attentions",
        "output_hidden_states",
        "problem_type",
        "return_dict",
        "model_type",
        "tokenizer_class",
        "torchscript",
        "use_return_dict",
        "tie_encoder_decoder",
        "add_cross_attention",
    }
)
QUANT_KEYS = frozenset(
    {
        "quant_method",
        "fmt",
        "activation_scheme",
        "weight_block_size",
        "scale_fmt",
        "modules_to_not_convert",
        "modules_to_convert",
        "ignored_layers",
        "dequantize",  # transformers' load-time choice, not the checkpoint's math
        "expert_dtype",
    }
)


def check_keys(hf: Mapping, known: set[str] | frozenset[str], where: str = "config.json") -> None:
    unknown = sorted(set(hf) - set(known) - INFORMATIONAL)
    if unknown:
        raise ConversionError(
            f"{where}: fields {unknown} are not implemented by this converter (a setting the model might not "
            "honour); remove them from config.json if they do not change the network's math"
        )


def require(hf: Mapping, keys: tuple[str, ...], where: str = "config.json") -> None:
    """Keys that change the math and have no safe default: missing (or null) is an error naming them."""
    missing = [k for k in keys if hf.get(k) is None]
    if missing:
        raise ConversionError(f"{where}: missing {missing} (each changes the network; no default is assumed)")


def expect(hf: Mapping, key: str, allowed: tuple, default: Any = None, where: str = "config.json") -> Any:
    """hf[key] (or `default`), which must be one of `allowed`."""
    value = hf.get(key, default)
    if value not in allowed:
        raise ConversionError(f"{where}: {key} = {value!r} is not implemented here (supported: {list(allowed)})")
    return value


def rope_section(section: Mapping | None, where: str, kinds: tuple[str, ...] = ("default", "yarn")) -> dict:
    """A `rope_parameters` / `rope_scaling` dict whose type is one we implement (default or yarn); YaRN
    needs its `factor` (transformers would derive one from the context lengths; we do not guess)."""
    section = dict(section or {})
    kind = section.get("rope_type", section.get("type", "default"))
    if kind not in kinds:
        raise ConversionError(f"{where}: rope type {kind!r} is not implemented here (supported: {list(kinds)})")
    if kind == "yarn" and section.get("factor") is None:
        raise ConversionError(f"{where}: YaRN without a factor")
    return section


def quant_block(hf: Mapping, where: str = "config.json") -> tuple[int, int] | None:
    """The FP8 block shape of `quantization_config` (None when the checkpoint is not quantised)."""
    q = hf.get("quantization_config")
    if not q:
        return None
    check_keys(q, QUANT_KEYS, f"{where} quantization_config")
    expect(q, "quant_method", ("fp8",), None, f"{where} quantization_config")
    expect(q, "fmt", ("e4m3", None), None, f"{where} quantization_config")
    expect(q, "activation_scheme", ("dynamic", None), None, f"{where} quantization_config")
    expect(q, "scale_fmt", ("ue8m0", "float", None), None, f"{where} quantization_config")
    expect(q, "expert_dtype", ("fp8", "fp4", "bf16", None), None, f"{where} quantization_config")
    block = q.get("weight_block_size")
    if block is None:
        return None
    if not (isinstance(block, (list, tuple)) and len(block) == 2 and all(isinstance(b, int) and b > 0 for b in block)):
        raise ConversionError(
            f"{where}: quantization_config.weight_block_size must be two positive ints, got {block!r}"
        )
    return int(block[0]), int(block[1])


def representable(family: str, unsupported: dict[str, object]) -> None:
    """Export guard: our config fields whose values the family's `config.json` cannot carry (the
    exported checkpoint would load as another model); `unsupported` maps each offending field to its
    value, empty when the config fits."""
    if unsupported:
        fields = ", ".join(f"model.{k} = {v!r}" for k, v in unsupported.items())
        raise ConversionError(f"a {family} config.json cannot express {fields}: this model has no checkpoint in "
                              "that family's format (it can still be saved and restored with Orbax)")


# ----------------------------------------------------------------------------------------------
# DeepSeek-V4.1's vision tower: `vision_config` (+ top-level `image_token_id`) <-> model.vision
# ----------------------------------------------------------------------------------------------

# VisionConfig field -> (transformers' `vision_config` key, inference/config.json key); HF class defaults are the
# released values (DeepseekV41VisionConfig @a290b39f), as are VisionConfig's
VISION_KEYS = {
    "hidden_size": ("hidden_size", "vision_dim"), "num_heads": ("num_attention_heads", "vision_n_heads"),
    "intermediate_size": ("intermediate_size", "vision_inter_dim"),
    "num_layers": ("num_hidden_layers", "vision_n_layers"), "patch_size": ("patch_size", "vision_patch_size"),
    "downsample_ratio": ("downsample_ratio", "vision_downsample_ratio"),
    "rope_theta": ("rope_theta", "vision_rope_theta"), "min_pixels": ("min_pixels", "vision_min_pixels"),
    "max_image_tokens": ("max_image_tokens", "vision_max_n_token"),
    "max_wh_ratio": ("max_wh_ratio", "vision_max_wh_ratio"),
    "norm_eps": ("rms_norm_eps", "vision_norm_eps"),  # not in transformers' class (fixed 1e-6 as released): ours
}  # fmt: skip


def vision_from_json(hf: Mapping):
    """model.vision from a composite config.json (`vision_config`, top-level `image_token_id`) or a flat
    inference/config.json (`vision_*` keys); None when the checkpoint has no vision tower."""
    from deepseek_jax.config.errors import ConfigError
    from deepseek_jax.config.media import VisionConfig

    if "text_config" in hf or "vision_config" in hf:
        section, where, k = hf.get("vision_config"), "config.json vision_config", 0
        if section is None:
            return None
        check_keys(section, {key for key, _ in VISION_KEYS.values()} | {"model_type"}, where)
        expect(section, "model_type", ("deepseek_v41_vision", None), None, where)
    else:
        section, where, k = hf, "config.json", 1
        if not any(str(key).startswith("vision_") for key in hf):
            return None
        unknown = sorted(key for key in hf if str(key).startswith("vision_")
                         and key not in {flat for _, flat in VISION_KEYS.values()})
        if unknown:
            raise ConversionError(f"{where}: fields {unknown} are not implemented by this converter")
    fields = {f: section[keys[k]] for f, keys in VISION_KEYS.items() if section.get(keys[k]) is not None}
    if not isinstance(fields.get("max_wh_ratio", 0), int) or isinstance(fields.get("max_wh_ratio"), bool):
        raise ConversionError(f"{where}: max_wh_ratio = {fields['max_wh_ratio']!r} must be an integer or null")
    fields.update({f: float(fields[f]) for f in ("rope_theta", "norm_eps") if f in fields})
    try:
        # absent: VisionConfig's default, transformers' DeepseekV41Config one (`<｜deepseek_image｜>`)
        return VisionConfig(image_token_id=int(hf.get("image_token_id", VisionConfig.image_token_id)), **fields)
    except (ConfigError, TypeError) as e:
        raise ConversionError(f"{where}: {e}") from None


def vision_to_json(vision) -> dict:
    """The composite config.json's `vision_config` section and top-level `image_token_id` of model.vision."""
    representable("DeepSeek-V4.1", {k: v for k, v, ok in (
        ("vision.aligner_hidden", vision.aligner_hidden, vision.aligner_hidden == 0),
        ("vision.pad_value", vision.pad_value, vision.pad_value == 127)) if not ok})
    section = {"model_type": "deepseek_v41_vision"}
    for field, (key, _) in VISION_KEYS.items():
        value = getattr(vision, field)
        if field == "max_wh_ratio":
            value = value or None  # 0 = no cap = transformers' None
        if field != "norm_eps" or value != 1e-6:
            section[key] = value
    return {"vision_config": section, "image_token_id": vision.image_token_id}


# model.engram field -> (config.json key, transformers' default): V4.1's `engram_*` keys
ENGRAM_KEYS = {k: (f"engram_{k}", d) for k, d in (("max_ngram_size", 4), ("n_heads", 8), ("head_dim", 256),
                                                  ("vocab_size", 16_000_000), ("compressed_vocab_size", 99092))}


def engram_from_json(t) -> EngramConfig | None:
    """model.engram from V4.1's `engram_*` keys; None without layers (V4.1 and the article layout)."""
    if not t.get("engram_layer_ids"):
        return None
    require(t, ("engram_num_embeddings",), "config.json text_config")
    pads = {t[k] for k in ("engram_pad_token_id", "engram_pad_id") if t.get(k) is not None}
    if len(pads) > 1:
        raise ConversionError(f"config.json: engram_pad_token_id and engram_pad_id disagree ({sorted(pads)})")
    return EngramConfig(layer_ids=tuple(t["engram_layer_ids"]), num_embeddings=tuple(t["engram_num_embeddings"]),
                        pad_id=pads.pop() if pads else 2, **{k: t.get(key, d) for k, (key, d) in ENGRAM_KEYS.items()})


def engram_json(e: EngramConfig) -> dict:
    """The `engram_*` keys of model.engram (read back by `engram_from_json`)."""
    return dict(engram_layer_ids=list(e.layer_ids), engram_num_embeddings=list(e.num_embeddings),
                engram_pad_token_id=e.pad_id, **{key: getattr(e, k) for k, (key, _) in ENGRAM_KEYS.items()})
