"""Strict reading of a checkpoint's `config.json`: every key is either read, checked against the values
the model implements, or known to be informational. Anything else is an error naming the field, so a
checkpoint whose math we do not implement is refused instead of silently loaded wrong."""

from collections.abc import Mapping
from typing import Any

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
