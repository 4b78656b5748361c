"""`deepseek-jax convert export CKPT OUT [--layout hf|official] [--quant none|fp8]`: our parameters ->
a checkpoint directory (sharded safetensors + index + config.json + tokenizer when known) that
transformers' `from_pretrained` loads (layout "hf") or in DeepSeek's official names ("official").

CKPT is a converted checkpoint (OUT of `convert import`) or a run directory (its latest step). Each
checkpoint tensor is built from slices of our arrays read from disk (TensorStore over the Orbax
checkpoint), so memory holds a few tensors at a time. `--quant fp8` stores the weights the released
checkpoints store in FP8 as e4m3 with block scales (V3: f32 `weight_scale_inv`; V4: E8M0 `.scale`),
so that importing the export reproduces the FP8-rounded values bit for bit.
"""

import json
import re
import shutil
from collections.abc import Callable
from pathlib import Path

import ml_dtypes
import numpy as np
import tensorstore as ts

from deepseek_jax.config import ModelConfig, load_model_config
from deepseek_jax.convert.errors import ConversionError
from deepseek_jax.convert.formats import quantize_fp8
from deepseek_jax.convert.importer import (
    CONFIG_FILE,
    PARAMS_DIR,
    TOKENIZER_FILES,
    abstract_variables,
    expected_shape,
)
from deepseek_jax.convert.safetensors import write_sharded
from deepseek_jax.convert.staging import staging_dir
from deepseek_jax.convert.table import Entry, Family, ckpt_array, entries, get_leaf

FP8_BLOCK = (128, 128)


class OrbaxReader:
    """Slices of the arrays of an Orbax PyTree checkpoint (OCDBT, zarr or zarr3), read on demand."""

    def __init__(self, directory: Path, prefix: tuple[str, ...] = (), cache_bytes: int = 2 * 2**30):
        self.directory, self.prefix, self._open = directory, prefix, {}
        # A run's checkpoint is chunked per device shard (the whole array when saved on one device), so
        # slice reads would decode the same chunk again and again: keep recently decoded chunks, bounded.
        self.context = ts.Context({"cache_pool": {"total_bytes_limit": cache_bytes}})

    def __call__(self, leaf: tuple[str, ...], index: tuple[int, ...]) -> np.ndarray:
        if leaf not in self._open:
            self._open[leaf] = self._tensorstore(".".join((*self.prefix, *leaf)))
        return np.asarray(self._open[leaf][index].read().result())

    def _tensorstore(self, path: str):
        errors = []
        for driver in ("zarr", "zarr3"):
            spec = {"driver": driver, "kvstore": {"driver": "ocdbt", "base": f"file://{self.directory}/",
                                                  "path": path}}
            try:
                return ts.open(spec, open=True, read=True, context=self.context).result()
            except ValueError as e:
                errors.append(str(e).splitlines()[0])
        raise ConversionError(f"{self.directory}: no array {path} ({'; '.join(errors)})")


def open_checkpoint(ckpt: str | Path) -> tuple[ModelConfig, OrbaxReader, Path]:
    """(model config, reader of our {"params", "router"}, directory with a tokenizer) of a converted
    checkpoint or of a run directory's latest step."""
    ckpt = Path(ckpt).expanduser().absolute()
    if (ckpt / PARAMS_DIR).is_dir():
        return load_model_config([ckpt / CONFIG_FILE]), OrbaxReader(ckpt / PARAMS_DIR), ckpt
    steps = sorted((int(p.name) for p in (ckpt / "checkpoints").glob("*") if p.name.isdigit()), reverse=True)
    if not steps or not (ckpt / "config.yaml").is_file():
        raise ConversionError(f"{ckpt} is neither a converted checkpoint ({PARAMS_DIR}/ + {CONFIG_FILE}) nor a "
                              "run directory with checkpoints/<step>/ and config.yaml")
    state = ckpt / "checkpoints" / str(steps[0]) / "state"
    return load_model_config([ckpt / "config.yaml"]), OrbaxReader(state), ckpt


def _stored_fp8(family: Family, ent: Entry) -> bool:
    return re.search(family.fp8_names, ent.name("official")) is not None


def _plan(family: Family, cfg: ModelConfig, layout: str, quant: str, dtype: str):
    """[(name, dtype code, shape, entry, role)] with role "plain" | "fp8" | "scale"."""
    abstract = abstract_variables(cfg)
    out = []
    for ent in entries(family, cfg):
        name, shape = ent.name(layout), expected_shape(ent, abstract, cfg)
        if np.issubdtype(get_leaf(abstract, ent.leaves[0]).dtype, np.integer):
            out.append((name, "I64", shape, ent, "plain"))
        elif quant == "fp8" and _stored_fp8(family, ent) and len(shape) == 2:
            grid = tuple(-(-n // b) for n, b in zip(shape, FP8_BLOCK))
            scale = name.removesuffix(".weight") + family.scale_suffix[layout]
            out.append((name, "F8_E4M3", shape, ent, "fp8"))
            out.append((scale, "F32" if family.scale_fmt == "float32" else "F8_E8M0", grid, ent, "scale"))
        else:
            keep32 = dtype == "float32" or re.search(family.f32_names, ent.name("official"))
            out.append((name, "F32" if keep32 else "BF16", shape, ent, "plain"))
    return out


def export_checkpoint(ckpt: str | Path, out: str | Path, *, layout: str = "hf", quant: str = "none",
                      dtype: str = "float32", max_shard_bytes: int = 5 * 2**30,
                      log: Callable[[str], None] = print) -> Path:
    from deepseek_jax.models import converter

    out = Path(out).expanduser().absolute()
    if out.exists():
        raise ConversionError(f"{out} already exists; choose a new output directory")
    if quant not in ("none", "fp8") or dtype not in ("float32", "bfloat16"):
        raise ConversionError(f"--quant must be none|fp8 and --dtype float32|bfloat16, got {quant!r}, {dtype!r}")
    cfg, read, home = open_checkpoint(ckpt)
    family = converter(cfg)
    if layout not in family.layouts[:2]:
        raise ConversionError(f"--layout {layout!r}: {family.name} exports {list(family.layouts[:2])}")
    plan = _plan(family, cfg, layout, quant, dtype)
    scales: dict = {}  # scale name -> the scale its weight's quantisation made (written right after it)
    pow2 = _pow2_scales(family, cfg)

    def produce(name: str) -> np.ndarray:
        _, code, _, ent, role = by_name[name]
        if role == "scale":
            return scales.pop(name)
        a = ckpt_array(ent, read, cfg)
        if role == "fp8":
            q, s = quantize_fp8(name, a, FP8_BLOCK, "ue8m0" if pow2 else "float32")
            s = s.astype(np.float32) if family.scale_fmt == "float32" else s  # E8M0 -> f32 is exact
            scales[name.removesuffix(".weight") + family.scale_suffix[layout]] = s
            return q
        return a.astype(np.int64) if code == "I64" else a.astype(np.float32 if code == "F32" else ml_dtypes.bfloat16)

    by_name = {p[0]: p for p in plan}
    log(f"{ckpt}: {family.name} -> {out} ({layout} names, {len(plan)} tensors, quant {quant})")
    staging = staging_dir(out)
    try:
        write_sharded(staging, [(n, c, s) for n, c, s, _, _ in plan], produce, max_shard_bytes)
        (staging / "config.json").write_text(json.dumps(_config_json(family, cfg, quant, dtype), indent=1))
        for f in TOKENIZER_FILES:
            if (home / f).is_file():
                shutil.copy(home / f, staging / f)
        staging.rename(out)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return out


def _pow2_scales(family: Family, cfg: ModelConfig) -> bool:
    """FP8 scales rounded up to powers of two (ue8m0): stored as E8M0 bytes, or as F32 (V3.2)."""
    return family.scale_fmt == "ue8m0" or family.pow2_scales(cfg)


def _config_json(family: Family, cfg: ModelConfig, quant: str, dtype: str) -> dict:
    pow2 = _pow2_scales(family, cfg)
    hf = family.config_to_json(cfg)
    hf["dtype"] = dtype
    if quant == "fp8":
        hf["quantization_config"] = {"quant_method": "fp8", "fmt": "e4m3", "activation_scheme": "dynamic",
                                     "weight_block_size": list(FP8_BLOCK)}
        if pow2:
            hf["quantization_config"]["scale_fmt"] = "ue8m0"
    return hf
