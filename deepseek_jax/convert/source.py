"""A checkpoint directory as the converter sees it: `config.json` read strictly, the family detected
from its `model_type`, the naming layout detected from the tensor names, scales paired with their
weights, transformers' in-memory fused experts split per expert, and every tensor loaded on demand
(memory-mapped, dequantised to float32 when it is FP8 / FP4, integers kept exact).

Nothing is read but headers until `load`; `open_source` checks names, shapes and dtypes of every
tensor against the model before any data is touched.
"""

import json
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from deepseek_jax.config import ModelConfig
from deepseek_jax.convert import article, v3, v4, v41
from deepseek_jax.convert.config_json import quant_block
from deepseek_jax.convert.errors import ConversionError
from deepseek_jax.convert.formats import dequant
from deepseek_jax.convert.safetensors import SafetensorsDir
from deepseek_jax.convert.table import Entry, Family, check_names, entries

FAMILIES: tuple[Family, ...] = (v3.FAMILY, v4.FAMILY, v41.FAMILY, article.FAMILY)
_FUSED = re.compile(r"^(.*\.experts)\.(gate_up_proj|down_proj)$")
_SCALE_SUFFIXES = (".weight_scale_inv", ".scale")
_FLOAT_CODES = {"F16", "BF16", "F32", "F64"}


def family_of(hf: Mapping, where: str = "config.json") -> Family:
    model_type = hf.get("model_type")
    if model_type is None and {"dim", "n_layers", "kv_source_layers"} <= set(hf):
        model_type = "deepseek_v41"  # V4.1's inference/config.json: flat official keys, no model_type
    for fam in FAMILIES:
        if model_type in fam.model_types:
            return fam
    supported = [t for fam in FAMILIES for t in fam.model_types]
    raise ConversionError(f"{where}: model_type {model_type!r} is not supported (supported: {supported})")


@dataclass(frozen=True)
class Ref:
    """Where a logical tensor lives: a file tensor, optionally one expert's part of a fused tensor."""

    tensor: str
    part: tuple[str, int] | None = None  # ("gate" | "up" | "down", expert)
    scale: str | None = None


@dataclass
class Source:
    directory: Path
    hf: dict  # config.json
    family: Family
    cfg: ModelConfig  # as the checkpoint holds it (MTP dropped when its tensors are absent)
    layout: str
    files: SafetensorsDir
    refs: dict[str, Ref]
    block: tuple[int, int] | None  # FP8 block from quantization_config
    notes: list[str] = field(default_factory=list)  # said once to the user (e.g. "no MTP tensors")

    def entries(self) -> list[Entry]:
        return entries(self.family, self.cfg)

    def load(self, name: str, rows: tuple[int, int] | None = None) -> np.ndarray:
        """The tensor `name` (this layout's spelling): FP8 / FP4 dequantised to float32, other floats
        as stored, integers exact. `rows` = (r0, r1): only those rows of [..., out, in] (and the scale
        rows they need) are read."""
        ref = self.refs[name]
        a = self.files.read(ref.tensor)
        if ref.part is not None:
            kind, e = ref.part
            F = a.shape[1] // 2
            a = a[e, :F] if kind == "gate" else a[e, F:] if kind == "up" else a[e]
        scale = None if ref.scale is None else self.files.read(ref.scale)
        return dequant(self.where(name), a, scale, config_block=self.block, rows=rows)

    def where(self, name: str) -> str:
        """'tensor (expert e of fused tensor) in shard file' for messages."""
        ref = self.refs[name]
        part = "" if ref.part is None else f" ({ref.part[0]} part of expert {ref.part[1]})"
        return f"{ref.tensor}{part} in {self.files.info(ref.tensor).file.name}"

    def release(self, name: str, rows: tuple[int, int] | None = None) -> None:
        """Drops the pages of `name` (and its scale) once its values are consumed: see SafetensorsDir.release.
        `rows` = (r0, r1) of a 2-D tensor: only the pages of those rows (and of the scale rows they need)."""
        ref = self.refs[name]
        for tensor in (ref.tensor, ref.scale):
            if tensor is None:
                continue
            if rows is None:
                self.files.release(tensor)
            else:
                _release_rows(self.files, tensor, rows, self.files.info(ref.tensor).shape[0])


def _release_rows(files: SafetensorsDir, tensor: str, rows: tuple[int, int], n_rows: int) -> None:
    """madvise DONTNEED over rows [r0, r1) of a weight of `n_rows` rows, in `tensor` (the weight, or its
    scale grid with proportionally fewer rows), rounded out to whole pages: a page dropped that other
    rows share is read from the file again if they are touched (the mapping is read-only)."""
    info = files.info(tensor)
    if not info.nbytes:
        return
    R, row_bytes = info.shape[0], info.nbytes // info.shape[0]
    files.release(tensor, (rows[0] * R // n_rows * row_bytes, -(-rows[1] * R // n_rows) * row_bytes))


def _refs(files: SafetensorsDir, family: Family) -> dict[str, Ref]:
    """Logical names -> Ref: scales folded into their weights, fused experts split. A scale the family
    skips stays a name of its own next to a float weight (V4.1's `engram.embed.scale` of a float table)."""
    names = set(files.names())
    scales = {}
    for n in names:
        for suffix in _SCALE_SUFFIXES:
            base = n[: -len(suffix)] + ".weight" if n.endswith(suffix) else None
            if base is None or base not in names or base == n:
                continue
            unused = files.info(base).dtype in _FLOAT_CODES and any(re.fullmatch(p, n) for p in family.skipped)
            if not unused:
                scales[base] = n
    refs = {}
    for n in sorted(names - set(scales.values())):
        m = _FUSED.match(n)
        if m is None:
            refs[n] = Ref(n, None, scales.get(n))
            continue
        info = files.info(n)
        parts = ("gate", "up") if m.group(2) == "gate_up_proj" else ("down",)
        for e in range(info.shape[0]):
            for kind in parts:
                refs[f"{m.group(1)}.{e}.{kind}_proj.weight"] = Ref(n, (kind, e))
    return refs


def _pick_layout(family: Family, cfg: ModelConfig, have: set[str], where: Path) -> str:
    """The layout whose names cover most of the checkpoint (ties and no match are errors)."""
    score = {lay: len(have & {e.name(lay) for e in entries(family, cfg)}) for lay in family.layouts}
    best = max(score.values())
    winners = [lay for lay, s in score.items() if s == best]
    if best == 0 or len(winners) > 1:
        sample = sorted(have)[:5]
        raise ConversionError(
            f"{where}: tensor names match no {family.name} layout (matches per layout {score}); names look like "
            f"{sample}"
        )
    return winners[0]


def read_config(directory: Path) -> dict:
    path = directory / "config.json"
    if not path.is_file():
        raise ConversionError(f"{directory}: no config.json (a checkpoint directory holds config.json and "
                              "model.safetensors or model.safetensors.index.json + shards)")
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise ConversionError(f"{path}: not valid JSON: {e}") from None


def open_source(directory: str | Path, **overrides) -> Source:
    """Reads config.json and the shard headers; picks the family and layout; drops MTP from the
    config when the checkpoint has no MTP tensors (noted once); checks every tensor's name, shape and
    dtype against the model (`overrides`: ModelConfig fields, e.g. dtype="float32")."""
    directory = Path(directory).expanduser()
    hf = read_config(directory)
    family = family_of(hf, str(directory / "config.json"))
    cfg = family.config_from_json(hf, **overrides)
    files = SafetensorsDir(directory)
    refs = _refs(files, family)
    notes = []
    if cfg.num_nextn_predict_layers and not any(family.is_mtp(n, cfg.n_layers) for n in refs):
        notes.append(f"{directory} holds no MTP tensors (config.json says num_nextn_predict_layers="
                     f"{cfg.num_nextn_predict_layers}): the model is loaded without MTP")
        cfg = family.config_from_json(hf, **{**overrides, "num_nextn_predict_layers": 0})
    layout = _pick_layout(family, cfg, set(refs), directory)
    src = Source(directory, hf, family, cfg, layout, files, refs, quant_block(hf), notes)
    expected = {e.name(layout) for e in src.entries()}
    for d in family.dropped:  # tensors this model does not hold (not those it maps): one note each
        hits = sorted(n for n in refs if re.fullmatch(d.pattern, n) and n not in expected)
        if hits:
            notes.append(f"{directory}: {len(hits)} {d.what} tensors ({hits[0]}, ...) are skipped")
    check_names(set(refs), expected, family.ignored, str(directory))
    return src



def split_fused(state: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
    """An in-memory state dict with transformers' fused experts (`experts.gate_up_proj [E, 2F, D]`,
    `experts.down_proj [E, D, F]`) -> per-expert `experts.{e}.{gate,up,down}_proj.weight` views."""
    out = {}
    for n, a in state.items():
        m = _FUSED.match(n)
        if m is None:
            out[n] = a
        elif m.group(2) == "gate_up_proj":
            F = a.shape[1] // 2
            for e in range(a.shape[0]):
                out[f"{m.group(1)}.{e}.gate_proj.weight"], out[f"{m.group(1)}.{e}.up_proj.weight"] = a[e, :F], a[e, F:]
        else:
            out.update({f"{m.group(1)}.{e}.down_proj.weight": a[e] for e in range(a.shape[0])})
    return out
