"""Tiny checkpoint directories as users meet them: written by transformers' `save_pretrained` from
random tiny V3 / V3.2 / V4 models, the same weights rewritten in DeepSeek's official names, with or
without MTP tensors, and FP8 (block scales) / FP4 (V4 routed experts) quantised variants. Each
variant comes with a *reference* directory: the same (dequantised) values in transformers' layout,
which transformers itself loads to give the logits and routing our import must reproduce."""

import json
import re
import shutil
from pathlib import Path

import numpy as np
import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

from deepseek_jax.convert import table  # noqa: E402
from deepseek_jax.convert.formats import dequant, quantize_fp4, quantize_fp8  # noqa: E402
from deepseek_jax.convert.safetensors import SafetensorsDir  # noqa: E402
from deepseek_jax.convert.source import family_of  # noqa: E402
from tests.parity.hf_reference import build_hf_model, tiny_hf_config  # noqa: E402
from tests.parity.test_parity_v4 import HF_CONFIG as V4_CONFIG  # noqa: E402
from tests.parity.test_parity_v4 import _randomise  # noqa: E402
from tests.parity.test_parity_v32 import build_hf_v32, tiny_v32_hf_config  # noqa: E402
from tests.utils import write_checkpoint  # noqa: E402

torch.set_num_threads(1)
BLOCK = [16, 16]  # FP8 tiles small enough that the tiny weights have several, edge tiles included


def hf_model(family: str):
    """A random tiny transformers model (float32, eval) of `family` in v3 | v32 | v4."""
    if family == "v3":
        return build_hf_model(tiny_hf_config(num_mtp_layers=1))[0]
    if family == "v32":
        return build_hf_v32(tiny_v32_hf_config())[0]
    config = transformers.DeepseekV4Config(**{**V4_CONFIG, "num_nextn_predict_layers": 1})
    config._attn_implementation = "eager"
    model = transformers.DeepseekV4ForCausalLM(config).float().eval()
    _randomise(model, torch.Generator().manual_seed(0))
    return model


def read_all(directory: Path) -> dict[str, np.ndarray]:
    with SafetensorsDir(directory) as sd:
        return {n: np.array(sd.read(n)) for n in sd.names()}


def _quantise(tensors: dict, ents, layout: str, family, fp4: bool) -> tuple[dict, dict]:
    """(checkpoint tensors with FP8 / FP4 weights and their scales, the dequantised values)."""
    out, deq = dict(tensors), dict(tensors)
    suffix = family.scale_suffix[layout]
    for ent in ents:
        name, official = ent.name(layout), ent.name("official")
        if fp4 and ".experts." in official:
            q, s = quantize_fp4(name, tensors[name])
        elif re.search(family.fp8_names, official):
            q, s = quantize_fp8(name, tensors[name], tuple(BLOCK), family.scale_fmt)
        else:
            continue
        out[name], out[name.removesuffix(".weight") + suffix] = q, s
        deq[name] = dequant(name, q, s, config_block=tuple(BLOCK))
    return out, deq


def variant(tmp: Path, family: str, layout: str, quant: str, mtp: bool, base: Path) -> tuple[Path, Path]:
    """(checkpoint directory, reference directory in transformers' on-disk layout)."""
    config = json.loads((base / "config.json").read_text())
    fam = family_of(config)
    state = read_all(base)
    cfg = fam.config_from_json(config, dtype="float32", num_nextn_predict_layers=1 if mtp else 0)
    if mtp:  # transformers saves no MTP tensors: add random ones under their checkpoint names
        rng = np.random.default_rng(7)
        for ent in table.entries(fam, cfg):
            if fam.is_mtp(ent.name("hf"), cfg.n_layers) and ent.name("hf") not in state:
                shape = _shape_of(ent, state, fam, cfg)
                state[ent.name("hf")] = (rng.standard_normal(shape) / np.sqrt(shape[-1])).astype(np.float32) + (
                    1.0 if len(shape) == 1 else 0.0
                )
    named = (
        state if layout == "hf" else table.from_variables(table.to_variables(state, fam, cfg, "hf"), fam, cfg, layout)
    )
    tensors, deq = (
        (named, named)
        if quant == "none"
        else _quantise(named, table.entries(fam, cfg), layout, fam, fp4=quant == "fp8_fp4")
    )
    if quant != "none":
        config = {
            **config,
            "quantization_config": {
                "quant_method": "fp8",
                "fmt": "e4m3",
                "activation_scheme": "dynamic",
                "weight_block_size": BLOCK,
            },
        }
    src = write_checkpoint(tmp / f"{family}_{layout}_{quant}_{'mtp' if mtp else 'nomtp'}", tensors, config, 40_000)
    ref_state = (
        deq if layout == "hf" else table.from_variables(table.to_variables(deq, fam, cfg, layout), fam, cfg, "hf")
    )
    ref = tmp / f"{src.name}_reference"
    ref.mkdir()
    shutil.copy(base / "config.json", ref / "config.json")
    write_checkpoint(ref / "w", {n: a for n, a in ref_state.items() if not fam.is_mtp(n, cfg.n_layers)}, config,
                     40_000)
    for f in (ref / "w").iterdir():
        if f.name != "config.json":
            f.rename(ref / f.name)
    return src, ref


def _shape_of(ent, state, fam, cfg) -> tuple[int, ...]:
    """An MTP tensor's shape: that of the same tensor in the last main layer (MTP-only ones: D or D x 2D)."""
    name = ent.name("hf")
    m = re.match(r"(model\.layers\.\d+\.|mtp\.\d+\.)(.*)", name)
    twin = f"model.layers.{cfg.n_layers - 1}.{m.group(2)}"
    if twin in state:
        return state[twin].shape
    if "hc_head" in name:
        return state[f"model.hc_head.{m.group(2).replace('hc_head_', 'hc_')}"].shape
    return (cfg.dim, 2 * cfg.dim) if "eh_proj" in name else (cfg.dim, cfg.dim) if "_proj" in name else (cfg.dim,)
