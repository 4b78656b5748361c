"""Decode-cache rows stored as the releases store them (FP8 / FP4 with block scales, or plain floats).

A stored row block is a plain array ("float", "bf16") or a NamedTuple pytree of real packed arrays,
[..., S, ·] per field, whose class names the format, so `load` and `write` need no format argument:

  format   class       per row of X values (R = trailing RoPE dims)                 used by (release)
  "float"  jax.Array   X values in the cache dtype (today's cache)                  –
  "bf16"   jax.Array   X bf16                                                       –
  "fp8"    Fp8Rows     X−R e4m3 bytes, ⌈(X−R)/64⌉ ue8m0 scale bytes, R bf16         V4 window + compressed kv
  "mxfp8"  Mxfp8Rows   X e4m3 bytes, ⌈X/32⌉ ue8m0 scale bytes (RoPE dims included)  V4.1 window kv
  "fp4"    Fp4Rows     ⌈X/2⌉ bytes of two e2m1 codes, ⌈X/32⌉ ue8m0 scale bytes      V4 / V4.1 indexer keys
  "nvfp4"  Nvfp4Rows   ⌈X/2⌉ bytes of two e2m1 codes, ⌈X/16⌉ e4m3 scale bytes       V4.1 compressed entries

Scales are those of the model's own fake-quant (quant.py): "fp8" = `sim_kv` (1×64 on dims [:X−R],
scale 2^⌈log2(max(amax, 1e-4)/448)⌉), "mxfp8" / "nvfp4" / "fp4" = `qat_v41` "window" / "entry" /
"index", "fp4" = `sim_indexer`'s FP4 cast (its input already Hadamard-rotated). V4's "fp8" row is
FlashMLA's DeepSeek-V4 ("MODEL1") FP8 cache token: 448 e4m3 + 128 B of bf16 RoPE dims + 7 ue8m0
bytes = 583 B (FlashMLA pads it to 584; ue8m0, not f32, scales: the release's `scale_fmt`). A
ue8m0 byte b means 2^(b−127) (b = 255: NaN); an e2m1 byte holds the even dim in its low nibble (the
checkpoints' MXFP4 packing). Storing rows that are already on the format's grid (the model's fake-
quant output; "fp8" RoPE dims bf16) is exact: load(store(x)) == x. "nvfp4" keeps that promise with one
rule beyond the QAT: a block the QAT scale e4m3(amax/6) cannot reproduce but e4m3(amax/4) can (an
on-grid block whose largest code is 4, possible only with a subnormal e4m3 scale) keeps the latter.
Other rows are rounded as the QAT rounds them.

Plain arrays are float rows to `load`, `write`, `write_at`, `gather` and `rows_slice` (a write casts
to the array's dtype), so code written against stored rows runs unchanged on today's caches.
`gather` / `rows_slice` pick rows before `load`, so a reader dequantises only the rows (or key chunk)
it uses.
`cache_bytes_per_token` sizes a model's decode cache per storage ("float", "bf16", "released").

Local letters: X row width, R RoPE dims, W scale blocks per row, Z values per block, P packed bytes.
"""

import math
from typing import NamedTuple

import jax
import jax.numpy as jnp
from jax import lax

from deepseek_jax.config import ModelConfig
from deepseek_jax.quant import FP4_MAX, V4_KV_BLOCK, quant, round_sat

E2M1_GRID = (0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0)  # codes 0-7; code | 8 = the negative value
CACHE_STORAGES = ("float", "bf16", "released")


class Fp8Rows(NamedTuple):
    """ "fp8" (V4): e4m3 1×64 with ue8m0 scales on dims [:X−R], RoPE dims bf16."""

    codes: jax.Array  # [..., S, X−R] uint8 e4m3 bytes
    scales: jax.Array  # [..., S, ⌈(X−R)/64⌉] uint8 ue8m0 exponents
    rope: jax.Array  # [..., S, R] bf16


class Mxfp8Rows(NamedTuple):
    """ "mxfp8" (V4.1 window): e4m3 1×32 with ue8m0 scales over the whole row."""

    codes: jax.Array  # [..., S, X] uint8 e4m3 bytes
    scales: jax.Array  # [..., S, ⌈X/32⌉] uint8 ue8m0 exponents


class Fp4Rows(NamedTuple):
    """ "fp4" (MXFP4, indexer keys): e2m1 1×32 with ue8m0 scales."""

    codes: jax.Array  # [..., S, X/2] uint8, two e2m1 codes (low nibble = even dim)
    scales: jax.Array  # [..., S, ⌈X/32⌉] uint8 ue8m0 exponents


class Nvfp4Rows(NamedTuple):
    """ "nvfp4" (V4.1 compressed entries): e2m1 1×16 with e4m3 scales."""

    codes: jax.Array  # [..., S, X/2] uint8, two e2m1 codes (low nibble = even dim)
    scales: jax.Array  # [..., S, ⌈X/16⌉] uint8 e4m3 bytes


StoredRows = jax.Array | Fp8Rows | Mxfp8Rows | Fp4Rows | Nvfp4Rows
_TYPES = {"float": jax.Array, "bf16": jax.Array, "fp8": Fp8Rows, "mxfp8": Mxfp8Rows, "fp4": Fp4Rows,
          "nvfp4": Nvfp4Rows}
FORMATS = tuple(_TYPES)
_BLOCK = {Fp8Rows: V4_KV_BLOCK, Mxfp8Rows: 32, Fp4Rows: 32, Nvfp4Rows: 16}


def _check_format(fmt: str, X: int, n_rope: int) -> None:
    if fmt not in _TYPES:
        raise ValueError(f"cache storage format must be one of {FORMATS}, got {fmt!r}")
    if not 0 <= n_rope <= X:
        raise ValueError(f"cache storage {fmt!r}: n_rope ({n_rope}) must be in [0, row width {X}]")
    if fmt in ("fp4", "nvfp4") and X % 2:
        raise ValueError(f"cache storage {fmt!r} packs two e2m1 codes a byte: row width {X} must be even")


# ----------------------------------------------------------------------------------------------
# Byte codecs (pure, elementwise)


def _ue8m0_byte(s: jax.Array) -> jax.Array:
    """Power-of-two f32 scales -> their exponent byte (NaN / inf -> 255)."""
    return (lax.bitcast_convert_type(s.astype(jnp.float32), jnp.uint32) >> 23).astype(jnp.uint8)


def _ue8m0_value(b: jax.Array) -> jax.Array:
    """Exponent byte -> 2^(b−127) f32 (255 -> NaN; 0 -> 0, never written: the smallest scale stored is 2^-126)."""
    s = lax.bitcast_convert_type(b.astype(jnp.uint32) << 23, jnp.float32)
    return jnp.where(b == 255, jnp.nan, s)


def _e4m3_byte(v: jax.Array) -> jax.Array:
    return lax.bitcast_convert_type(v.astype(jnp.float8_e4m3fn), jnp.uint8)


def _e4m3_value(b: jax.Array) -> jax.Array:
    return lax.bitcast_convert_type(b, jnp.float8_e4m3fn).astype(jnp.float32)


def _pack_e2m1(v: jax.Array) -> jax.Array:
    """Values on the e2m1 grid [..., X] (X even) -> [..., X/2] bytes: sign bit 3, magnitude index 0-2."""
    v = v.astype(jnp.float32)
    thresholds = jnp.asarray(E2M1_GRID[1:], jnp.float32)
    mag = jnp.sum(jnp.abs(v)[..., None] >= thresholds, axis=-1).astype(jnp.uint8)
    code = mag | (jnp.signbit(v).astype(jnp.uint8) << 3)
    return code[..., 0::2] | (code[..., 1::2] << 4)


def _unpack_e2m1(b: jax.Array) -> jax.Array:
    """[..., P] bytes -> [..., 2P] f32 values."""
    lut = jnp.asarray(E2M1_GRID + tuple(-g for g in E2M1_GRID), jnp.float32)
    code = jnp.stack([b & 0xF, b >> 4], axis=-1).reshape(*b.shape[:-1], 2 * b.shape[-1])
    return lut[code.astype(jnp.int32)]


def _dequant(v: jax.Array, s_W: jax.Array, block: int) -> jax.Array:
    """Code values [..., N] × their block's scale [..., W] -> f32 [..., N]."""
    return v * jnp.repeat(s_W, block, axis=-1)[..., : v.shape[-1]]


def _blocks(x: jax.Array, block: int) -> jax.Array:
    """[..., N] -> [..., W, Z] f32, the last block zero-padded."""
    N = x.shape[-1]
    W = -(-N // block)
    x = jnp.pad(x.astype(jnp.float32), [(0, 0)] * (x.ndim - 1) + [(0, W * block - N)])
    return x.reshape(*x.shape[:-1], W, block)


def nvfp4_quant(x: jax.Array, block: int = 16) -> tuple[jax.Array, jax.Array]:
    """(e2m1 values f32 [..., N], e4m3 scales f32 [..., W]) of `qat_v41`'s "entry" cast: s =
    e4m3(max(amax, 6·2^-9)/6), except a block exactly representable with e4m3(amax/4) (and not
    with the QAT scale) keeps that one, so that re-storing fake-quantised rows is exact."""
    N = x.shape[-1]
    x_WZ = _blocks(x, block)
    amax_W1 = jnp.maximum(jnp.max(jnp.abs(x_WZ), axis=-1, keepdims=True), FP4_MAX * 2.0**-9)

    def at(s_W1):
        s_W1 = s_W1.astype(jnp.float8_e4m3fn).astype(jnp.float32)
        v_WZ = round_sat(x_WZ / s_W1, "fp4").astype(jnp.float32)
        return v_WZ, s_W1, jnp.all(v_WZ * s_W1 == x_WZ, axis=-1, keepdims=True)

    v1, s1, exact1 = at(amax_W1 / FP4_MAX)
    v2, s2, exact2 = at(amax_W1 / 4.0)
    alt_W1 = exact2 & ~exact1
    v_WZ, s_W1 = jnp.where(alt_W1, v2, v1), jnp.where(alt_W1, s2, s1)
    return v_WZ.reshape(*x.shape[:-1], -1)[..., :N], s_W1[..., 0]


# ----------------------------------------------------------------------------------------------
# store / load / write


def store(rows: jax.Array, fmt: str, n_rope: int = 0) -> StoredRows:
    """Rows [..., X] in storage format `fmt` (module docstring). `n_rope`: the trailing RoPE dims,
    kept bf16 by "fp8"; the other formats store every dim alike and ignore it."""
    X = rows.shape[-1]
    _check_format(fmt, X, n_rope)
    if fmt in ("float", "bf16"):
        return rows.astype(jnp.bfloat16) if fmt == "bf16" else rows
    if fmt in ("fp8", "mxfp8"):
        H = X - n_rope if fmt == "fp8" else X
        q, s = quant(rows[..., :H], "fp8", _BLOCK[_TYPES[fmt]], ue8m0=True)
        codes, scales = lax.bitcast_convert_type(q, jnp.uint8), _ue8m0_byte(s)
        if fmt == "mxfp8":
            return Mxfp8Rows(codes, scales)
        return Fp8Rows(codes, scales, rows[..., H:].astype(jnp.bfloat16))
    if fmt == "fp4":
        q, s = quant(rows, "fp4", _BLOCK[Fp4Rows])
        return Fp4Rows(_pack_e2m1(q.astype(jnp.float32)), _ue8m0_byte(s))
    v, s = nvfp4_quant(rows, _BLOCK[Nvfp4Rows])
    return Nvfp4Rows(_pack_e2m1(v), _e4m3_byte(s))


def load(stored: StoredRows, dtype=jnp.float32) -> jax.Array:
    """The rows [..., X] a stored block holds, in `dtype` (dequantised in f32, then cast)."""
    kind = type(stored)
    if isinstance(stored, jax.Array):
        return stored.astype(dtype)
    if kind not in _BLOCK:
        raise TypeError(f"cache_store.load: not a stored row block: {kind.__name__}")
    block = _BLOCK[kind]
    if kind in (Fp8Rows, Mxfp8Rows):
        x = _dequant(_e4m3_value(stored.codes), _ue8m0_value(stored.scales), block)
        if kind is Fp8Rows:
            x = jnp.concatenate([x, stored.rope.astype(jnp.float32)], axis=-1)
        return x.astype(dtype)
    scale = _ue8m0_value if kind is Fp4Rows else _e4m3_value
    return _dequant(_unpack_e2m1(stored.codes), scale(stored.scales), block).astype(dtype)


def format_of(stored: StoredRows) -> tuple[str, int]:
    """(format, n_rope) that re-stores rows like `stored` ("float" for a plain array of any dtype)."""
    kind = type(stored)
    if isinstance(stored, jax.Array):
        return "float", 0
    if kind is Fp8Rows:
        return "fp8", stored.rope.shape[-1]
    fmt = {Mxfp8Rows: "mxfp8", Fp4Rows: "fp4", Nvfp4Rows: "nvfp4"}.get(kind)
    if fmt is None:
        raise TypeError(f"cache_store: not a stored row block: {kind.__name__}")
    return fmt, 0


def _as_stored(stored: StoredRows, new) -> StoredRows:
    """`new` rows [B, T, X] (or already stored like `stored`), in `stored`'s format and dtypes."""
    if isinstance(stored, jax.Array):
        return jnp.asarray(new).astype(stored.dtype)
    if type(new) is not type(stored):
        new = store(new, *format_of(stored))
    return jax.tree.map(lambda a, n: n.astype(a.dtype), stored, new)


def write(stored: StoredRows, new, index) -> StoredRows:
    """`stored` [B, S, ·] with rows [index, index + T) replaced by `new` ([B, T, X] rows, stored
    here, or a block stored like `stored`): dynamic_update_slice, so index may be traced (clamped
    to S − T as lax.dynamic_update_slice does)."""
    new = _as_stored(stored, new)
    index = jnp.asarray(index, jnp.int32)
    return jax.tree.map(
        lambda a, n: lax.dynamic_update_slice(a, n, (jnp.int32(0), index) + (jnp.int32(0),) * (a.ndim - 2)),
        stored, new,
    )  # fmt: skip


def write_at(stored: StoredRows, new, slots) -> StoredRows:
    """`stored` [B, S, ·] with row t of `new` ([B, T, X] or stored) written at slot slots[t] ([T],
    same for every row) or slots[b, t] ([B, T]); slots outside [0, S) are dropped (ring buffers,
    entries written at computed slots, rows to skip)."""
    new = _as_stored(stored, new)
    slots = jnp.asarray(slots, jnp.int32)
    slots = jnp.where(slots < 0, n_rows(stored), slots)  # negative: dropped, never wrapped
    if slots.ndim == 1:
        return jax.tree.map(lambda a, n: a.at[:, slots].set(n, mode="drop"), stored, new)
    b_B1 = jnp.arange(slots.shape[0])[:, None]
    return jax.tree.map(lambda a, n: a.at[b_B1, slots].set(n, mode="drop"), stored, new)


def n_rows(stored: StoredRows) -> int:
    """S, the rows of a stored block [B, S, ·]."""
    return jax.tree.leaves(stored)[0].shape[1]


def gather(stored: StoredRows, idx_BTU: jax.Array) -> StoredRows:
    """The stored rows at slots idx [B, ...] of each batch row (leaves [B, ..., ·]), indexed like x[idx]:
    a negative slot wraps (−1 reads the last row) and one ≥ S is clamped, so clamp −1 (none) slots to 0
    and mask them yourself. Gather first, then `load` only what a query block reads."""
    return jax.tree.map(lambda a: jax.vmap(lambda a_S, i: a_S[i])(a, idx_BTU), stored)


def rows_slice(stored: StoredRows, start, size: int) -> StoredRows:
    """Rows [start, start + size) of a stored block [B, S, ·] (a key chunk; start may be traced)."""
    return jax.tree.map(lambda a: lax.dynamic_slice_in_dim(a, start, size, axis=1), stored)


def empty(lead: tuple[int, ...], X: int, fmt: str, n_rope: int = 0, dtype=jnp.float32) -> StoredRows:
    """An all-zero stored block [*lead, ·] of rows of width X (loads as zeros)."""
    shapes = jax.eval_shape(lambda: store(jnp.zeros((*lead, X), dtype), fmt, n_rope))
    return jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), shapes)


def nbytes_per_row(fmt: str, X: int, n_rope: int = 0, dtype=jnp.float32) -> int:
    """Bytes one stored row of width X takes (`dtype`: the "float" format's)."""
    _check_format(fmt, X, n_rope)
    if fmt in ("float", "bf16"):
        return X * (2 if fmt == "bf16" else jnp.dtype(dtype).itemsize)
    block = _BLOCK[_TYPES[fmt]]
    if fmt == "fp8":
        return (X - n_rope) + math.ceil((X - n_rope) / block) + 2 * n_rope
    if fmt == "mxfp8":
        return X + math.ceil(X / block)
    return X // 2 + math.ceil(X / block)


# ----------------------------------------------------------------------------------------------
# Cache size of a model


class LayerFormats(NamedTuple):
    """The storage format of each kind of cached row."""

    window: str  # the window ring's kv rows
    entries: str  # compressed kv entries
    index_keys: str  # the indexer's keys


PLAIN = LayerFormats("float", "float", "float")  # today's caches: plain arrays in the cache dtype


class CacheBytes(NamedTuple):
    per_token: float  # bytes per token of context, all layers (the part that grows with the context)
    window: int  # fixed bytes per sequence: every layer's window ring
    state: int  # fixed bytes per sequence: the compressors' partial blocks (f32)


def storage_formats(cfg: ModelConfig, storage: str) -> LayerFormats:
    """Row formats of a `model.cache_storage`: "float" / "bf16" everywhere, or "released": V4 "fp8"
    window and entries + "fp4" indexer keys; V4.1 (model.shared_kv) "mxfp8" window, "nvfp4" entries,
    "fp4" keys (the formats of its QAT)."""
    if storage not in CACHE_STORAGES:
        raise ValueError(f"model.cache_storage must be one of {CACHE_STORAGES}, got {storage!r}")
    if storage != "released":
        return LayerFormats(storage, storage, storage)
    return LayerFormats("mxfp8", "nvfp4", "fp4") if cfg.shared_kv is not None else LayerFormats("fp8", "fp8", "fp4")


def _state_bytes(m: int, X: int, overlap: bool) -> int:
    # lazy: the storage functions above stay importable by compressor.py / indexer.py (no cycle)
    from deepseek_jax.layers.attention.compressor import empty_state

    shapes = jax.eval_shape(lambda: empty_state(1, m, X, overlap))
    return sum(a.size * a.dtype.itemsize for a in jax.tree.leaves(shapes))


def cache_bytes_per_token(cfg: ModelConfig, storage: str, mtp: bool = False) -> CacheBytes:
    """Decode-cache size of a V4 / V4.1 model with rows stored per `storage` (`storage_formats`); MTP /
    DSpark windows counted when `mtp`. A layer of ratio m > 0 adds one entry per m tokens; V4 CSA
    (m = 4) also one indexer key; in V4.1 only the kv sources hold entries and keys. V4-Flash,
    "released" (X = 512, R = 64, index keys 128 wide; reference §1.12 ignores the fp8 scales):
        fp8 row  = 448 e4m3 + 7 ue8m0 + 64·2 bf16 = 583 B;   fp4 key = 64 + 4 = 68 B
        per token = 21 CSA · (583 + 68)/4 + 20 HCA · 583/128 = 3417.8 + 91.1 = 3508.8 B
                    (reference: 21·(576 + 68)/4 + 20·576/128 = 3471 B ≈ 3.47 KB; +1.1%)
        window   = 43 · 128 · 583 B = 3.21 MB (reference 43·128·576 B = 3.02 MiB);
        state    = 21 CSA · (49152 + 12288) + 20 HCA · 524288 B = 11.78 MB, f32 as
                   `compressor.empty_state` holds it (kv + gate [m, 2X] and overlap halves [m, X]
                   for CSA and its indexer, kv + gate [m, X] for HCA): the HCA blocks dominate.
    V4-Pro: 30·651/4 + 31·583/128 = 5023.7 B (reference ≈ 4.97 KB). V4.1-Flash: nvfp4 entry 256 + 32
    = 288 B, fp4 key 68 B, sources 2, 8, 14 (ratio 2) and 20 (ratio 1): 3·356/2 + 356 = 890 B
    (reference 890 B); window 40 · 128 · (512 + 16) B = 2.70 MB."""
    from deepseek_jax.layers.attention.compressor import CSA_RATIO

    if cfg.v4 is None:
        raise ValueError("cache_bytes_per_token: needs a V4 / V4.1 model (model.v4)")
    v4, f = cfg.v4, storage_formats(cfg, storage)
    X, R, Y = v4.head_dim, v4.rope_head_dim, v4.index_head_dim
    n = cfg.n_layers + (cfg.num_nextn_predict_layers if mtp else 0)
    ratios = cfg.compress_ratios[:n]
    entry = nbytes_per_row(f.entries, X, R, cfg.dtype)
    key = nbytes_per_row(f.index_keys, Y, 0, cfg.dtype)
    window = n * v4.window_size * nbytes_per_row(f.window, X, R, cfg.dtype)
    if cfg.shared_kv is not None:
        sources = [ratios[i] for i in cfg.shared_kv.kv_source_layers]
        per_token = sum((entry + key) / m for m in sources)
        return CacheBytes(per_token, window, sum(_state_bytes(m, X, False) for m in sources))
    per_token, state = 0.0, 0
    for m in (m for m in ratios if m > 0):
        csa = m == CSA_RATIO
        per_token += (entry + (key if csa else 0)) / m
        state += _state_bytes(m, X, csa) + (_state_bytes(m, Y, True) if csa else 0)
    return CacheBytes(per_token, window, state)


__all__ = [
    "CACHE_STORAGES", "E2M1_GRID", "FORMATS", "CacheBytes", "Fp4Rows", "Fp8Rows", "LayerFormats",
    "Mxfp8Rows", "Nvfp4Rows", "PLAIN", "StoredRows", "cache_bytes_per_token", "empty", "format_of", "gather", "load",
    "n_rows", "nbytes_per_row", "nvfp4_quant", "rows_slice", "storage_formats", "store", "write", "write_at",
]  # fmt: skip
