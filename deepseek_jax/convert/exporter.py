"""`deepseek-jax convert export CKPT OUT [--layout L] [--quant none|fp8|release]`: our parameters -> a
checkpoint directory (sharded safetensors + index + config.json + tokenizer when known) that transformers'
`from_pretrained` loads (layout "hf") or in DeepSeek's official names ("official"); each family writes the
first two of its layouts (V4.1: official, hf_text) and says why it refuses the others.

CKPT is a converted checkpoint (OUT of `convert import`) or a run directory (its latest step). Each
checkpoint tensor is built from slices of our arrays read from disk (TensorStore over the Orbax
checkpoint), so memory holds a few tensors at a time; tensors a family quantises row by row (V4.1's
Engram tables, up to 384M rows) are read, converted and written in row chunks. `--quant fp8` stores
the weights the released checkpoints store in FP8 as e4m3 with block scales, so that importing the
export reproduces the FP8-rounded values bit for bit: 128×128 blocks (V3: f32 `weight_scale_inv`,
V4: E8M0 `.scale`), or, for a family with a hook (`HOOKS`, V4.1), exactly the release's dtype and
block per tensor (FP8 32×32, FP4 experts, FP8 table rows, F32 / BF16; `--dtype` does not apply).
`--quant release` asks for the latter and is refused for families without a hook. A family's `row_names`
(article.py: the Engram tables) are written in row chunks too, without a hook.
"""

import json
import math
import re
import shutil
import tempfile
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import tensorstore as ts

from deepseek_jax.config import ModelConfig, load_model_config
from deepseek_jax.convert import v41, v41_release
from deepseek_jax.convert.errors import ConversionError
from deepseek_jax.convert.formats import quantize_fp8
from deepseek_jax.convert.importer import (
    CONFIG_FILE,
    PARAMS_DIR,
    TOKENIZER_FILES,
    abstract_variables,
    expected_shape,
)
from deepseek_jax.convert.safetensors import DTYPES, write_sharded
from deepseek_jax.convert.staging import staging_dir
from deepseek_jax.convert.table import Entry, Family, ckpt_array, entries, get_leaf, iter_leaves

FP8_BLOCK = (128, 128)
QUANTS = ("none", "fp8", "release")
ROW_CHUNK_BYTES = 256 * 2**20  # float32 bytes of the rows read at a time from a tensor written in row chunks


@dataclass(frozen=True)
class Hook:
    """A family's own export: the release's storage per tensor (what `--quant fp8` and `release` write) and,
    for each layout it reads but does not write, why. Families without one (V3, V4) keep the FP8 128×128
    export and have no `--quant release`."""

    specs: Callable  # (official name, shape, written name) -> [(name, dtype code, shape)]: the tensor, then its scale
    quantize: Callable  # (official name, values, written name) -> {name: array} of those specs
    rows: str  # regex over official names: row-local tensors (every spec has the tensor's rows), written in row
    #            chunks whatever --quant
    quantization_config: Mapping  # config.json's
    read_only: Mapping[str, str] = field(default_factory=dict)  # layout -> why it is not written


HOOKS = {v41.FAMILY.name: Hook(v41_release.release_specs, v41_release.quantize_as_released, v41_release.ROWS,
                               v41_release.QUANTIZATION_CONFIG, v41.READ_ONLY)}


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


def _plan(family: Family, cfg: ModelConfig, layout: str, quant: str, dtype: str, hook: Hook | None):
    """[(name, dtype code, shape, entry, role)]; role "plain" | "fp8" | "scale" (its weight's scale) |
    "hook" (the family's quantiser) | "rows" (read and converted in row chunks)."""
    abstract = abstract_variables(cfg)
    ents = entries(family, cfg)
    covered = {leaf for ent in ents for leaf in ent.leaves}
    uncovered = sorted("/".join(p) for p, _ in iter_leaves(abstract) if p not in covered)
    if uncovered:  # (the importer refuses such a table too: nothing is dropped silently)
        raise ConversionError(f"the {family.name} table does not cover {uncovered[:6]} of this model")
    rows = hook.rows if hook is not None else family.row_names
    out = []
    for ent in ents:
        name, shape, official = ent.name(layout), expected_shape(ent, abstract, cfg), ent.name("official")
        by_rows = re.search(rows, official) is not None
        if np.issubdtype(get_leaf(abstract, ent.leaves[0]).dtype, np.integer):
            out.append((name, "I64", shape, ent, "plain"))
        elif hook is not None and quant != "none":
            weight, *scales = hook.specs(official, shape, name)
            role = "rows" if by_rows else "hook" if scales else "plain"
            out += [(*weight, ent, role), *((*s, ent, "scale") for s in scales)]
        elif quant == "fp8" and _stored_fp8(family, ent) and len(shape) == 2:
            grid = tuple(-(-n // b) for n, b in zip(shape, FP8_BLOCK))
            scale = name.removesuffix(".weight") + family.scale_suffix[layout]
            out.append((name, "F8_E4M3", shape, ent, "fp8"))
            out.append((scale, "F32" if family.scale_fmt == "float32" else "F8_E8M0", grid, ent, "scale"))
        else:
            keep32 = dtype == "float32" or re.search(family.f32_names, ent.name("official"))
            out.append((name, "F32" if keep32 else "BF16", shape, ent, "rows" if by_rows else "plain"))
    return out


class _Producer:
    """`produce(name)` for `write_sharded`: each planned tensor from our arrays, in plan order; a weight's
    scale (made with it) waits in `pending` until its turn, right after it."""

    def __init__(self, plan, family: Family, cfg: ModelConfig, layout: str, hook: Hook | None, read, where: Path):
        self.by_name, self.family, self.cfg, self.layout = {p[0]: p for p in plan}, family, cfg, layout
        self.hook, self.read, self.where, self.pending = hook, read, where, {}
        self.specs_of: dict = {}  # id(entry) -> its planned (name, code, shape)s: a tensor, then its scale
        for n, code, shape, ent, _ in plan:
            self.specs_of.setdefault(id(ent), []).append((n, code, shape))

    def __call__(self, name: str) -> np.ndarray:
        _, code, _, ent, role = self.by_name[name]
        if role == "scale":
            return self.pending.pop(name)
        if role == "rows":
            made = _by_rows(ent, self.specs_of[id(ent)], self._convert(ent, name, code), self.read, self.cfg,
                            self.where)
        else:
            made = self._convert(ent, name, code)(ckpt_array(ent, self.read, self.cfg))
        self.pending.update((n, a) for n, a in made.items() if n != name)
        return made[name]

    def _convert(self, ent: Entry, name: str, code: str) -> Callable[[np.ndarray], dict[str, np.ndarray]]:
        """Checkpoint values (the whole tensor, or some of its rows) -> {file name: array}."""
        if self.by_name[name][4] == "fp8":
            return self._fp8(name)
        if code in ("F8_E4M3", "I8"):  # a family's release storage: its own quantiser
            return lambda a: self.hook.quantize(ent.name("official"), a, name)
        return lambda a: {name: a.astype(DTYPES[code])}

    def _fp8(self, name: str):
        pow2, float_scale = _pow2_scales(self.family, self.cfg), self.family.scale_fmt == "float32"
        scale = name.removesuffix(".weight") + self.family.scale_suffix[self.layout]

        def convert(a):
            q, s = quantize_fp8(name, a, FP8_BLOCK, "ue8m0" if pow2 else "float32")
            return {name: q, scale: s.astype(np.float32) if float_scale else s}  # E8M0 -> f32 is exact

        return convert


def _by_rows(ent: Entry, specs, convert, read, cfg: ModelConfig, where: Path) -> dict[str, np.ndarray]:
    """Every file tensor of `ent` (`specs`, all with the checkpoint tensor's rows) converted in chunks of
    rows, each into a memory map of an unlinked temporary file under `where` (file-backed pages the kernel
    writes back and drops): process memory holds one chunk whatever the rows (a released table has 384M).
    Rows past the checkpoint tensor's (our table's zero padding) are never read; `to_ckpt` of such a
    rule is a row crop, so it applies chunk by chunk."""
    R = specs[0][2][0]
    if any(shape[0] != R for _, _, shape in specs):
        raise ConversionError(f"{specs[0][0]}: {specs} are not all of {R} rows; cannot write them by rows")
    out = {}
    for n, code, shape in specs:
        with tempfile.TemporaryFile(dir=where) as f:  # the map keeps the file until the array is freed
            out[n] = np.memmap(f, DTYPES[code], "w+", shape=shape)
    step = max(1, ROW_CHUNK_BYTES // (4 * math.prod(specs[0][2][1:])))
    for r0 in range(0, R, step):
        rows = slice(r0, min(R, r0 + step))
        chunk = ent.rule.to_ckpt(*(read(leaf, (*ent.index, rows)) for leaf in ent.leaves), cfg)
        for n, a in convert(np.ascontiguousarray(chunk)).items():
            out[n][rows] = a
    return out


def _check_options(family: Family, layout: str | None, quant: str, dtype: str) -> tuple[str, Hook | None]:
    """(the layout to write, default the family's first; the family's hook), or an error saying why not."""
    hook = HOOKS.get(family.name)
    if quant not in QUANTS or dtype not in ("float32", "bfloat16"):
        raise ConversionError(f"--quant must be {'|'.join(QUANTS)} and --dtype float32|bfloat16, got {quant!r}, "
                              f"{dtype!r}")
    if quant == "release" and hook is None:
        raise ConversionError(f"--quant release: {family.name} has no release-format export here; --quant fp8 "
                              f"writes its FP8 weights with {FP8_BLOCK[0]}×{FP8_BLOCK[1]} block scales")
    layout = family.layouts[0] if layout is None else layout
    if layout not in family.layouts[:2]:
        why, refused = (hook.read_only if hook else {}).get(layout, "read only"), dict(family.not_offered)
        what = (f"reads but does not write it ({why})" if layout in family.layouts
                else f"has no such layout ({refused[layout]})" if layout in refused else "has no such layout")
        raise ConversionError(f"--layout {layout!r}: {family.name} {what}; it writes {list(family.layouts[:2])}")
    return layout, hook


def export_checkpoint(ckpt: str | Path, out: str | Path, *, layout: str | None = None, quant: str = "none",
                      dtype: str = "float32", max_shard_bytes: int = 5 * 2**30,
                      log: Callable[[str], None] = print) -> Path:
    """Writes CKPT to OUT (which must not exist) in `layout` (None: the family's first) and returns OUT."""
    from deepseek_jax.models import converter

    out = Path(out).expanduser().absolute()
    if out.exists():
        raise ConversionError(f"{out} already exists; choose a new output directory")
    cfg, read, home = open_checkpoint(ckpt)
    family = converter(cfg)
    layout, hook = _check_options(family, layout, quant, dtype)
    plan = _plan(family, cfg, layout, quant, dtype, hook)
    released = ": the release's dtypes and blocks" if hook is not None and quant != "none" else ""
    log(f"{ckpt}: {family.name} -> {out} ({layout} names, {len(plan)} tensors, quant {quant}{released})")
    staging = staging_dir(out)
    try:
        produce = _Producer(plan, family, cfg, layout, hook, read, staging)
        write_sharded(staging, [(n, c, s) for n, c, s, _, _ in plan], produce, max_shard_bytes)
        hf = _config_json(family, cfg, quant, dtype, hook)
        (staging / "config.json").write_text(json.dumps(hf, indent=1))
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


def _config_json(family: Family, cfg: ModelConfig, quant: str, dtype: str, hook: Hook | None = None) -> dict:
    pow2 = _pow2_scales(family, cfg)
    hf = family.config_to_json(cfg)
    hf["dtype"] = dtype
    if hook is not None and quant != "none":
        hf["dtype"] = "bfloat16"  # the release's unquantised weights (F32 ones excepted)
        hf["quantization_config"] = dict(hook.quantization_config)
    elif quant == "fp8":
        hf["quantization_config"] = {"quant_method": "fp8", "fmt": "e4m3", "activation_scheme": "dynamic",
                                     "weight_block_size": list(FP8_BLOCK)}
        if pow2:
            hf["quantization_config"]["scale_fmt"] = "ue8m0"
    return hf
