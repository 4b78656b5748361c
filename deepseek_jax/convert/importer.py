"""`deepseek-jax convert import SRC OUT`: a checkpoint directory (config.json + safetensors, any family
and layout convert/source.py knows, FP8 / FP4 or not) -> a converted checkpoint directory OUT:

    OUT/params/        Orbax PyTree checkpoint of {"params": ..., "router": ...}, our layout
    OUT/config.yaml    a runnable config: the model, train.init_from = OUT, data.tokenizer = OUT's
    OUT/tokenizer.json (+ tokenizer_config.json) copied from SRC when it has them
    OUT/convert.json   where it came from: source, family, layout, dtypes, notes

Streaming: every array is written slice by slice (one layer, or one (layer, expert) pair) as each
checkpoint tensor is read, dequantised and transformed; the stacked arrays never exist in memory
(convert/orbax_writer.py), and each tensor's mapped pages are dropped once consumed. A row-local leaf
(`ROW_LOCAL`: the Engram tables, 384M rows) whose slice exceeds `row_block_bytes` as float32 is read,
dequantised, zero-padded and written in blocks of rows instead. Peak memory is a constant plus a few
checkpoint tensors or row blocks.

Every tensor's name, shape and dtype is checked against the model before any data is read; an
interrupted import leaves only a hidden `.OUT.partial-*` directory, never OUT.
"""

import functools
import hashlib
import json
import math
import re
import shutil
from collections.abc import Callable
from pathlib import Path

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from deepseek_jax.config import Config, DataConfig, ModelConfig, TrainConfig, to_yaml
from deepseek_jax.convert.errors import ConversionError
from deepseek_jax.convert.formats import quant_layout
from deepseek_jax.convert.orbax_writer import LazyArray, write_tree
from deepseek_jax.convert.safetensors import DTYPES
from deepseek_jax.convert.source import Source, open_source
from deepseek_jax.convert.staging import staging_dir
from deepseek_jax.convert.table import Entry, get_leaf, iter_leaves, leaf_pieces
from deepseek_jax.models import build_model, init_inputs

PARAMS_DIR, CONFIG_FILE, INFO_FILE = "params", "config.yaml", "convert.json"
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json")
_FLOAT_CODES = {"F16", "BF16", "F32", "F64"}
ROW_BLOCK_BYTES = 256 * 2**20  # float32 bytes of one row block of a row-streamed leaf
# Leaves whose rule keeps checkpoint row i as our row i and adds zero rows past the checkpoint's (v41.py
# `_pad_rows`): any block of rows converts on its own, so a big one is read and written by rows.
ROW_LOCAL = re.compile(r"(^|/)engram/table$")


def abstract_variables(cfg: ModelConfig) -> dict:
    """{"params", "router"} of the model as ShapeDtypeStructs (nothing allocated)."""
    tokens, kw = init_inputs(cfg)
    out = nn.unbox(jax.eval_shape(functools.partial(build_model(cfg).init, **kw), jax.random.key(0), tokens))
    return {k: out[k] for k in ("params", "router") if k in out}


@functools.lru_cache(maxsize=4096)
def _ckpt_shape(rule, slice_shapes: tuple[tuple[int, ...], ...], cfg: ModelConfig) -> tuple[int, ...]:
    structs = [jax.ShapeDtypeStruct(s, jnp.float32) for s in slice_shapes]
    return tuple(jax.eval_shape(lambda *xs: rule.to_ckpt(*xs, cfg), *structs).shape)


def expected_shape(ent: Entry, abstract: dict, cfg: ModelConfig) -> tuple[int, ...]:
    """The checkpoint shape of `ent`'s tensor, from the model's own variables."""
    shapes = tuple(tuple(get_leaf(abstract, leaf).shape[len(ent.index):]) for leaf in ent.leaves)
    return _ckpt_shape(ent.rule, shapes, cfg)


def _logical(src: Source, name: str) -> tuple[tuple[int, ...], str, str | None]:
    """(shape as it will load, dtype code, "fp8" | "fp4" | None) from the headers only; a scale that
    fits no format is an error here, before any data is read."""
    ref = src.refs[name]
    info = src.files.info(ref.tensor)
    shape = info.shape
    if ref.part is not None:
        F = shape[1] // 2
        shape = (F, shape[2]) if ref.part[0] != "down" else shape[1:]
    if ref.scale is None:
        return tuple(shape), info.dtype, None
    scale = src.files.info(ref.scale)
    kind, _ = quant_layout(src.where(name), DTYPES[info.dtype], shape, scale.shape, src.block)
    return (tuple((*shape[:-1], 2 * shape[-1])) if kind == "fp4" else tuple(shape)), info.dtype, kind


def check_tensors(src: Source, abstract: dict) -> None:
    """Shape and dtype of every checkpoint tensor against the model, before any data is read."""
    bad = []
    for ent in src.entries():
        name = ent.name(src.layout)
        shape, code, quant = _logical(src, name)
        want = expected_shape(ent, abstract, src.cfg)
        integer = np.issubdtype(get_leaf(abstract, ent.leaves[0]).dtype, np.integer)
        if shape != want:  # (an odd FP4 width would unpack one column too many: refused too)
            bad.append(f"{name}: shape {list(shape)}, the model needs {list(want)}")
        elif integer and (DTYPES[code].kind not in "iu" or quant):
            bad.append(f"{name}: dtype {code}, the model needs integers")
        elif not integer and quant is None and code not in _FLOAT_CODES:
            what = "an FP8 weight without its scale" if code == "F8_E4M3" else f"dtype {code}"
            bad.append(f"{name}: {what} where the model needs floats")
    if bad:
        raise ConversionError(f"{src.directory}: {len(bad)} tensors do not fit the model: " + "; ".join(bad[:6]))


def _checked(src: Source, name: str, a: np.ndarray, cfg: ModelConfig) -> np.ndarray:
    if a.dtype.kind in "iu":
        E = cfg.moe.n_routed_experts
        if a.size and (a.min() < 0 or a.max() >= E):
            raise ConversionError(f"{src.directory}: {src.where(name)} holds expert ids in [{a.min()}, {a.max()}], "
                                  f"outside [0, {E}) (n_routed_experts)")
    elif not np.isfinite(a).all():
        raise ConversionError(f"{src.directory}: {src.where(name)} holds non-finite values")
    return a


def _leaf_dtype(src: Source, leaf: tuple[str, ...], pieces, struct, dtype) -> np.dtype:
    """Integers stay int32; the router collection and what the releases keep in float32 (mHC, sinks,
    compressor position biases, selection biases) stay float32 whatever `dtype` asks."""
    if np.issubdtype(struct.dtype, np.integer):
        return np.dtype(struct.dtype)
    keep32 = leaf[0] == "router" or any(re.search(src.family.f32_names, e.name("official")) for _, e, _ in pieces)
    return np.dtype(np.float32) if keep32 else np.dtype(dtype)


def lazy_tree(src: Source, abstract: dict, dtype, row_block_bytes: int = ROW_BLOCK_BYTES) -> dict:
    """{"params", "router"} of LazyArrays that read, dequantise and transform one tensor per slice (or
    one block of rows, see `_block_rows`); every leaf of the model must be covered."""
    tree: dict = {}
    pieces_of = leaf_pieces(src.entries())
    uncovered = sorted("/".join(p) for p, _ in iter_leaves(abstract) if p not in pieces_of)
    if uncovered:
        raise ConversionError(f"the {src.family.name} table does not cover {uncovered[:6]} of this model")
    for leaf, pieces in pieces_of.items():
        struct = get_leaf(abstract, leaf)
        out_dtype = _leaf_dtype(src, leaf, pieces, struct, dtype)
        rows = _block_rows(leaf, pieces, struct.shape, row_block_bytes)
        if rows is None:
            listed = functools.partial(_slices, src, pieces, out_dtype)
        else:
            listed = functools.partial(_row_blocks, src, pieces, struct.shape[len(pieces[0][0]):], out_dtype, rows)
        node = tree
        for key in leaf[:-1]:
            node = node.setdefault(key, {})
        node[leaf[-1]] = LazyArray(struct.shape, out_dtype, listed, rows)
    return tree


def _slices(src: Source, pieces, out_dtype) -> list:
    return [(idx, functools.partial(_produce, src, ent, k, out_dtype)) for idx, ent, k in pieces]


def _produce(src: Source, ent: Entry, k: int, out_dtype) -> np.ndarray:
    """Our slice from one whole checkpoint tensor."""
    name = ent.name(src.layout)
    a = _checked(src, name, src.load(name), src.cfg)
    a = a.astype(np.int32, copy=False) if a.dtype.kind in "iu" else a  # floats: transform as stored
    out = np.ascontiguousarray(ent.rule.to_ours(a, src.cfg)[k]).astype(out_dtype, copy=False)
    out = out if not np.shares_memory(out, a) else out.copy()  # never a view of the mapped file
    src.release(name)  # its pages leave RSS (see SafetensorsDir.release)
    return out


def _block_rows(leaf: tuple[str, ...], pieces, shape: tuple[int, ...], budget: int) -> int | None:
    """Rows per block of a `ROW_LOCAL` leaf whose [rows, width] slices exceed `budget` bytes as float32
    (None: written slice by slice)."""
    slice_shape = shape[len(pieces[0][0]):]
    if (not ROW_LOCAL.search("/".join(leaf)) or len(slice_shape) != 2 or any(len(e.leaves) != 1 for _, e, _ in pieces)
            or math.prod(slice_shape) * 4 <= budget):
        return None
    return max(1, budget // (slice_shape[1] * 4))


def _row_blocks(src: Source, pieces, shape: tuple[int, int], out_dtype, rows: int) -> list:
    """(index, produce) per block of `rows` rows of each slice [P, H] (LazyArray.rows)."""
    out = []
    for idx, ent, _ in pieces:
        name = ent.name(src.layout)
        have = _logical(src, name)[0]
        if len(have) != 2 or have[1] != shape[1] or have[0] > shape[0]:
            raise ConversionError(f"{src.directory}: {src.where(name)} is {list(have)}; its rows do not fit "
                                  f"our {list(shape)} row by row")
        for b in range(-(-shape[0] // rows)):
            r0, r1 = b * rows, min((b + 1) * rows, shape[0])
            out.append(((*idx, b), functools.partial(_produce_rows, src, name, have[0], shape[1], out_dtype, r0, r1)))
    return out


def _produce_rows(src: Source, name: str, n: int, width: int, out_dtype, r0: int, r1: int) -> np.ndarray:
    """Rows [r0, r1) of our slice: the checkpoint's rows there (of its `n`) dequantised, zeros past them."""
    out = np.empty((r1 - r0, width), out_dtype)
    m = max(0, min(r1, n) - r0)
    if m:
        out[:m] = _checked(src, name, src.load(name, rows=(r0, r0 + m)), src.cfg)  # a copy, cast as the slice path
        src.release(name, rows=(r0, r0 + m))
    out[m:] = 0
    return out


def run_config(cfg: ModelConfig, out: Path, tokenizer: Path | None) -> Config:
    data = DataConfig(tokenizer=str(tokenizer) if tokenizer else "", seq_len=min(256, cfg.max_seq_len),
                      tokenizer_vocab_size=max(259, min(4096, cfg.vocab_size)))
    tag = hashlib.sha1(str(out).encode()).hexdigest()[:8]  # two imports named alike get their own runs
    return Config(model=cfg, data=data, train=TrainConfig(init_from=str(out), run_dir=f"runs/{out.name}-{tag}"))


def import_checkpoint(src_dir: str | Path, out: str | Path, *, dtype: str = "float32",
                      log: Callable[[str], None] = print, row_block_bytes: int = ROW_BLOCK_BYTES,
                      **overrides) -> Path:
    """Converts SRC into OUT (which must not exist); returns OUT. `overrides`: ModelConfig fields;
    `row_block_bytes`: float32 bytes per row block of a row-streamed leaf (`_block_rows`)."""
    out = Path(out).expanduser().absolute()
    if out.exists():
        raise ConversionError(f"{out} already exists; choose a new output directory")
    if dtype not in ("float32", "bfloat16"):
        raise ConversionError(f"--dtype must be float32 or bfloat16, got {dtype!r}")
    src = open_source(src_dir, **overrides)
    for note in src.notes:
        log(note)
    abstract = abstract_variables(src.cfg)
    check_tensors(src, abstract)
    log(f"{src.directory}: {src.family.name}, layout {src.layout!r}, {len(src.refs)} tensors -> {out}")
    tree = lazy_tree(src, abstract, jnp.dtype(dtype), row_block_bytes)
    staging = staging_dir(out)
    try:
        write_tree(staging / PARAMS_DIR, tree)
        tok = _copy_tokenizer(src.directory, staging)
        (staging / CONFIG_FILE).write_text(to_yaml(run_config(src.cfg, out, out / tok if tok else None)))
        info = dict(source=str(src.directory), family=src.family.name, layout=src.layout, dtype=dtype,
                    model_type=src.hf.get("model_type"), notes=src.notes, block=src.block)
        (staging / INFO_FILE).write_text(json.dumps(info, indent=1))
        staging.rename(out)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
        src.files.close()
    return out


def _copy_tokenizer(src: Path, dst: Path) -> str | None:
    copied = [f for f in TOKENIZER_FILES if (src / f).is_file() and shutil.copy(src / f, dst / f)]
    return "tokenizer.json" if "tokenizer.json" in copied else None
