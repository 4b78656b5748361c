"""DeepSeek-V4.1 tensors stored as released (shared/reference/deepseek_v41_architecture.md §2.7, §4.1-§4.2),
what `convert export --quant fp8 | release` writes for this family (exporter.py `HOOKS`).

  fp8    F8_E4M3 + F8_E8M0 `.scale` [⌈out/32⌉, ⌈in/32⌉]: the attention projections (not the compressor's),
         indexer wq_b, shared experts, engram.wkv, mtp.0.main_proj
  fp4    routed experts: I8 [out, ⌈in/2⌉] (two e2m1 a byte) + F8_E8M0 [out, ⌈in/32⌉]
  table  Engram tables: F8_E4M3 [rows, H] + F8_E8M0 [rows, ⌈H/32⌉] (1×32 blocks: each row quantises on its
         own, so a table is quantised and written in row chunks, `ROWS`)
  f32    mHC, attention sinks, gate bias and bias_vl;   bf16: the rest (embed, head, norms, compressor,
         indexer wk / weights_proj, gate, Engram q_weight / k_weight, DSpark heads, vision, aligner)
Names are matched on the official spelling; a tensor written in another layout (hf_text: `model.` + the
official names) is passed as `out`, and its scale is `out` minus `.weight` plus `.scale`.
"""

import math
import re

import ml_dtypes
import numpy as np

from deepseek_jax.convert.formats import quantize_fp4, quantize_fp8

FP8_BLOCK, TABLE_BLOCK = (32, 32), (1, 32)  # release tiles: dense weights; Engram table rows
FP4_NAMES = r"(^|\.)ffn\.experts\.\d+\.w[123]\.weight$"
TABLE_NAMES = r"(^|\.)engram\.embed\.weight$"
FP8_NAMES = r"^(?!.*compressor\.|vision\.|aligner\.).*\.(wq_a|wq_b|wkv|wo_a|wo_b|w1|w2|w3|main_proj)\.weight$"
F32_NAMES = r"(^|\.)hc_|attn_sink$|ffn\.gate\.bias(_vl)?$"
ROWS = TABLE_NAMES  # quantised row by row: the exporter streams these in row chunks
# config.json `quantization_config` of the release (reference §1.1)
QUANTIZATION_CONFIG = {"quant_method": "fp8", "activation_scheme": "dynamic", "weight_block_size": list(FP8_BLOCK),
                       "scale_fmt": "ue8m0", "expert_dtype": "fp4"}


def stored_as(name: str) -> str:
    """How the release stores the official tensor `name`: fp4 | table | fp8 | f32 | bf16."""
    for kind, pattern in (("fp4", FP4_NAMES), ("table", TABLE_NAMES), ("fp8", FP8_NAMES), ("f32", F32_NAMES)):
        if re.search(pattern, name):
            return kind
    return "bf16"


def _scale_name(out: str) -> str:
    return out.removesuffix(".weight") + ".scale"


def release_specs(name: str, shape: tuple[int, ...], out: str | None = None) -> list[tuple[str, str, tuple[int, ...]]]:
    """[(name, safetensors dtype, shape)] the release stores for one official tensor: the tensor, then its
    `.scale` if quantised; written as `out` (default `name`)."""
    kind, out = stored_as(name), name if out is None else out
    if kind in ("fp4", "table", "fp8"):
        O, I = shape
        grid = (O if kind != "fp8" else math.ceil(O / FP8_BLOCK[0]), math.ceil(I / 32))
        weight = (out, "I8", (O, math.ceil(I / 2))) if kind == "fp4" else (out, "F8_E4M3", tuple(shape))
        return [weight, (_scale_name(out), "F8_E8M0", grid)]
    return [(out, "F32" if kind == "f32" else "BF16", tuple(shape))]


def quantize_as_released(name: str, a: np.ndarray, out: str | None = None) -> dict[str, np.ndarray]:
    """One official tensor as the release stores it (`release_specs`, written as `out`); the quantisers are
    idempotent, so importing the result gives exactly its dequantised values, and re-exporting those the
    same bytes."""
    kind, out = stored_as(name), name if out is None else out
    if kind == "fp4":
        q, s = quantize_fp4(out, a)
    elif kind in ("fp8", "table"):
        q, s = quantize_fp8(out, a, TABLE_BLOCK if kind == "table" else FP8_BLOCK, "ue8m0")
    else:
        return {out: np.asarray(a, np.float32 if kind == "f32" else ml_dtypes.bfloat16)}
    return {out: q, _scale_name(out): s}
