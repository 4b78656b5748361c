"""Exact numpy (de)quantisation of DeepSeek checkpoint tensors: FP8 block-scaled weights, packed
FP4 (MXFP4) experts, E8M0 scales; and the inverse quantisers used for export and synthetic tests.

Formats (`shared/reference/checkpoint_formats.md` §2.2, §3.1, §4, §6.3):
  FP8   `F8_E4M3` weight [..., out, in] (`float8_e4m3fn`: max 448, no inf, NaN at 0x7F / 0xFF) and a
        scale grid [..., ⌈out/b0⌉, ⌈in/b1⌉]: F32 `weight_scale_inv` (V3, a multiplier despite the
        name) or `F8_E8M0` `.scale` (V4). Blocks 128×128 (V3, V4) or 32×32 (V4.1 dense); the V4.1
        Engram table is 1×32. Edge tiles are padded, then cropped (§2.3), so for every real (i, j):
            W[i, j] = q[i, j] · s[i // b0, j // b1]
  FP4   `I8` weight [..., out, ⌈in/2⌉], two e2m1 codes a byte, LOW nibble = even column; codes 0-7 =
        0, .5, 1, 1.5, 2, 3, 4, 6 and 8-15 their negatives (8 = -0.0); `F8_E8M0` scale
        [..., out, ⌈in/32⌉] (1×32 groups along `in`, last group may be partial).
  E8M0  a bare exponent byte b: 2^(b - 127); b = 0 is 2^-127 (an f32 subnormal, exact), b = 255 NaN.
Bytes are always bit-viewed, never numerically cast: `uint8(130).astype(float8_e8m0fnu)` is 128,
the byte means 2^3; an int8 -> uint8 numeric cast would corrupt packed bytes >= 128 (§6.3).

Which path `dequant` takes is decided by dtypes and the scale grid, never by the tensor's name:
an F8_E4M3 weight is FP8 (never FP4); an int8/uint8 weight is packed FP4 when asked (`fp4=True`) or
when its scale grid is [..., out, ⌈2·cols/32⌉] (the 1×32 grid of the unpacked width); any other
uint8 weight is raw e4m3 bits. The FP8 block comes from `infer_block`: the first candidate whose
ceil-division reproduces the grid (never shape // grid: 576 / 5 is not 128).

Quantisers follow DeepSeek / transformers (`Fp8Quantize`): zero-pad to whole tiles, per-tile
s = amax / 448 (ue8m0: rounded up to 2^⌈log2⌉; s = 1 if all codes are 0), q = RNE(clip(w/s, ±448)),
crop; MXFP4 s = 2^⌈log2(amax/6)⌉. All are idempotent bit for bit, quantize(dequant(quantize(w))) ==
quantize(w): exactly so for f32 scales (`_fp8_codes`); power-of-two scales need one canonical form
(`_canonical_pow2`), which keeps DeepSeek's values.

Local letters: P packed columns (⌈I/2⌉), R / C scale-grid rows / columns, Y / X tile height / width.
"""

import ml_dtypes
import numpy as np

from deepseek_jax.convert.errors import ConversionError

E4M3, E8M0, E2M1 = ml_dtypes.float8_e4m3fn, ml_dtypes.float8_e8m0fnu, ml_dtypes.float4_e2m1fn
FP8_MAX, FP4_MAX, FP4_GROUP = 448.0, 6.0, 32
BLOCK_CANDIDATES = ((128, 128), (32, 32), (1, FP4_GROUP))  # tried after the config's block
FP4_LUT = np.array([0, 0.5, 1, 1.5, 2, 3, 4, 6, -0.0, -0.5, -1, -1.5, -2, -3, -4, -6], np.float32)
MIN_SCALE_EXP = -126  # scales are floored at 2^-126, the smallest normal f32: q·s stays exact
_FLOAT_DTYPES = {np.dtype(d) for d in (np.float16, np.float32, np.float64, ml_dtypes.bfloat16)}


def _cdiv(a: int, b: int) -> int:
    return -(-a // b)


def _grid(shape, block) -> tuple:
    """Scale-grid shape [..., ⌈out/b0⌉, ⌈in/b1⌉] of a weight [..., out, in]."""
    return (*shape[:-2], _cdiv(shape[-2], block[0]), _cdiv(shape[-1], block[1]))


# ----------------------------------------------------------------------------------------------
# Scales
# ----------------------------------------------------------------------------------------------


def e8m0_to_f32(s, name: str = "scale") -> np.ndarray:
    """Scale tensor -> f32. E8M0 (uint8 bytes or `float8_e8m0fnu`): 2^(b - 127) built from the bits
    (b = 0 -> 2^-127 subnormal, b = 255 -> NaN). Float scales (V3 `weight_scale_inv`) are cast."""
    s = np.asarray(s)
    if s.dtype in (np.dtype(np.uint8), np.dtype(E8M0)):
        b = s.view(np.uint8).astype(np.uint32)
        bits = np.where(b == 0, np.uint32(1 << 22), b << 23)  # 2^-127 = mantissa MSB of a subnormal
        bits = np.where(b == 255, np.uint32(0x7FC00000), bits)
        return bits.astype(np.uint32).view(np.float32)
    if s.dtype in _FLOAT_DTYPES:
        return s.astype(np.float32)
    raise ConversionError(f"{name}: scale {s.shape} has dtype {s.dtype}; want E8M0/uint8/float")


def _e8m0_from_exponent(e: np.ndarray) -> np.ndarray:
    """Integer exponents e in [-127, 127] -> `float8_e8m0fnu` 2^e (byte e + 127)."""
    return (np.asarray(e) + 127).astype(np.uint8).view(E8M0)


def _ceil_log2(x: np.ndarray) -> np.ndarray:
    """⌈log2 x⌉ for positive float64 x, exactly (frexp: x = m·2^e, m in [0.5, 1))."""
    m, e = np.frexp(x)
    return np.where(m == 0.5, e - 1, e)


def _reject_nan_scale(name: str, s: np.ndarray, scale_shape, r0: int = 0) -> None:
    bad = ~np.isfinite(s)
    if bad.any():
        tile = tuple(int(i) for i in np.argwhere(bad)[0])
        tile = (*tile[:-2], tile[-2] + r0, tile[-1]) if len(tile) >= 2 else tile
        raise ConversionError(
            f"{name}: scale {tuple(scale_shape)} is NaN/inf at tile {tile} (E8M0 byte "
            f"255 or a non-finite float); the weight would dequantise to NaN"
        )


# ----------------------------------------------------------------------------------------------
# Block size and row ranges
# ----------------------------------------------------------------------------------------------


def infer_block(
    name: str,
    weight_shape,
    scale_shape,
    config_block: tuple[int, int] | None = None,
    packed: bool = False,
) -> tuple[int, int]:
    """The (rows, cols) block whose ceil-division maps weight [..., out, in] onto the scale grid
    [..., R, C]. Tried in order: `config_block`, 128×128, 32×32, 1×32. Two candidates can both fit
    only on an axis that fits in one block, where they dequantise identically. `packed`: FP4 bytes,
    in = 2 · cols."""
    weight_shape, scale_shape = tuple(weight_shape), tuple(scale_shape)
    logical = weight_shape
    if packed and weight_shape:  # FP4 bytes: the grid counts unpacked columns
        logical = (*weight_shape[:-1], 2 * weight_shape[-1])
    tried = [tuple(config_block)] if config_block else []
    tried += [b for b in BLOCK_CANDIDATES if b not in tried]
    if len(logical) >= 2 and len(scale_shape) == len(logical):
        for block in tried:
            if _grid(logical, block) == scale_shape:
                return block
    raise ConversionError(
        f"{name}: no block maps weight {weight_shape} (logical {logical}) onto scale "
        f"grid {scale_shape}; tried {tried}"
    )


def _row_range(name: str, rows, shape) -> tuple[int, int]:
    if len(shape) < 2:
        raise ConversionError(f"{name}: tensor {tuple(shape)} has no row axis [..., out, in]")
    n_out = shape[-2]
    r0, r1 = (0, n_out) if rows is None else (int(rows[0]), int(rows[1]))
    if not 0 <= r0 <= r1 <= n_out:
        raise ConversionError(f"{name}: rows {rows} outside [0, {n_out}] of tensor {tuple(shape)}")
    return r0, r1


def _scale_rows(name: str, scale, scale_shape, rows_per_tile: int, r0: int, r1: int) -> np.ndarray:
    """f32 scale [..., r1 - r0, C] of out rows [r0, r1); reads only the grid rows needed."""
    t0 = r0 // rows_per_tile
    s = e8m0_to_f32(np.asarray(scale)[..., t0 : _cdiv(r1, rows_per_tile), :], name)
    _reject_nan_scale(name, s, scale_shape, t0)
    off = r0 - t0 * rows_per_tile
    return np.repeat(s, rows_per_tile, axis=-2)[..., off : off + r1 - r0, :]


def _times_col_groups(w: np.ndarray, s: np.ndarray, cols_per_tile: int) -> np.ndarray:
    """w [..., r, I] *= s [..., r, C] repeated `cols_per_tile` times along I (last tile cropped), in
    place: splitting the last axis of a column slice is always a view, so no weight-sized temp."""
    I = w.shape[-1]
    full = I // cols_per_tile
    body = w[..., : full * cols_per_tile].reshape(*w.shape[:-1], full, cols_per_tile)
    body *= s[..., :full, None]
    if full * cols_per_tile < I:
        w[..., full * cols_per_tile :] *= s[..., full : full + 1]
    return w


# ----------------------------------------------------------------------------------------------
# FP8 and FP4 dequantisation
# ----------------------------------------------------------------------------------------------


def _as_e4m3(name: str, q) -> np.ndarray:
    q = np.asarray(q)
    if q.dtype == np.uint8:
        return q.view(E4M3)  # raw F8_E4M3 bits
    if q.dtype != E4M3:
        raise ConversionError(f"{name}: FP8 weight {q.shape} is {q.dtype}; want F8_E4M3 / uint8")
    return q


def dequant_fp8(
    name: str, q, scale, block: tuple[int, int], rows: tuple[int, int] | None = None
) -> np.ndarray:
    """FP8 weight q [..., out, in] (e4m3 or its uint8 bits) · block scale [..., R, C] -> f32
    [..., r1 - r0, in]; W[i, j] = q[i, j] · s[i // b0, j // b1]. `rows` = (r0, r1) reads only
    those rows of q and the scale rows they need, and equals full[..., r0:r1, :]."""
    q = _as_e4m3(name, q)
    scale_shape, want = tuple(np.shape(scale)), _grid(q.shape, block)
    if scale_shape != want:
        raise ConversionError(
            f"{name}: missing/mis-shaped scale: weight {q.shape} with block {tuple(block)} "
            f"needs scale {want}, got {scale_shape}"
        )
    r0, r1 = _row_range(name, rows, q.shape)
    s_rC = _scale_rows(name, scale, scale_shape, block[0], r0, r1)
    q_rI = q[..., r0:r1, :]
    if ((q_rI.view(np.uint8) & 0x7F) == 0x7F).any():
        raise ConversionError(f"{name}: FP8 weight {q.shape} has e4m3 NaN codes in rows {r0}..{r1}")
    return _times_col_groups(q_rI.astype(np.float32), s_rC, block[1])


def unpack_fp4(packed) -> np.ndarray:
    """int8/uint8 [..., P], two e2m1 codes a byte (low nibble = even column) -> f32 [..., 2P]."""
    b = np.asarray(packed).view(np.uint8)  # bit view: a numeric cast breaks bytes >= 128
    codes = np.stack([b & 0x0F, b >> 4], axis=-1).reshape(*b.shape[:-1], 2 * b.shape[-1])
    return FP4_LUT[codes]


def _pack_codes(codes: np.ndarray) -> np.ndarray:
    """e2m1 codes (uint8, 0..15) [..., 2P] -> int8 [..., P], even column in the low nibble."""
    return (codes[..., 0::2] | (codes[..., 1::2] << 4)).view(np.int8)


def pack_fp4(values) -> np.ndarray:
    """Inverse of `unpack_fp4`: values on the e2m1 grid [..., 2P] -> int8 [..., P]."""
    v = np.asarray(values, np.float32)
    fp4 = v.astype(E2M1)
    if v.shape[-1] % 2 or not np.array_equal(fp4.astype(np.float32), v):
        raise ConversionError(f"pack_fp4: values {v.shape} need an even last dim and e2m1 values")
    return _pack_codes(fp4.view(np.uint8) & 0x0F)


def dequant_fp4(
    name: str, packed, scale, rows: tuple[int, int] | None = None, n_in: int | None = None
) -> np.ndarray:
    """Packed FP4 weight [..., out, P] · E8M0 scale [..., out, ⌈I/32⌉] -> f32 [..., r1 - r0, I];
    W[o, i] = LUT[code(o, i)] · 2^(b[o, i // 32] - 127). `n_in`: the logical width I (default 2P;
    2P - 1 when odd)."""
    b = np.asarray(packed)
    if b.dtype not in (np.dtype(np.int8), np.dtype(np.uint8)) or b.ndim < 2:
        raise ConversionError(f"{name}: FP4 weight {b.shape} is {b.dtype}; want I8 [..., out, P]")
    P = b.shape[-1]
    I = 2 * P if n_in is None else int(n_in)
    if not 2 * P - 1 <= I <= 2 * P:
        raise ConversionError(f"{name}: n_in={I} does not fit packed FP4 weight {b.shape}")
    scale_shape, want = tuple(np.shape(scale)), (*b.shape[:-1], _cdiv(I, FP4_GROUP))
    if scale_shape != want:
        raise ConversionError(
            f"{name}: missing/mis-shaped scale: packed FP4 weight {b.shape} (in={I}) "
            f"needs scale {want}, got {scale_shape}"
        )
    r0, r1 = _row_range(name, rows, b.shape)
    s_rC = _scale_rows(name, scale, scale_shape, 1, r0, r1)
    w_rI = _times_col_groups(unpack_fp4(b[..., r0:r1, :])[..., :I], s_rC, FP4_GROUP)
    return np.ascontiguousarray(w_rI)


# ----------------------------------------------------------------------------------------------
# The converter's entry point
# ----------------------------------------------------------------------------------------------


def _is_fp4_grid(weight_shape, scale_shape) -> bool:
    """Scale [..., out, ⌈2·P/32⌉] for bytes [..., out, P]: one scale per 32 unpacked columns."""
    return len(weight_shape) >= 2 and tuple(scale_shape) == _fp4_grid(weight_shape)


def _fp4_grid(weight_shape) -> tuple:
    return (*weight_shape[:-1], _cdiv(2 * weight_shape[-1], FP4_GROUP))


def quant_layout(name: str, weight_dtype, weight_shape, scale_shape, config_block=None,
                 fp4: bool = False) -> tuple[str, tuple[int, int] | None]:
    """How a weight with a scale dequantises, from dtypes and shapes only (headers suffice):
    ("fp4", None) for int8/uint8 bytes with `fp4` or a 1×32 grid of the unpacked width; ("fp8", block)
    for e4m3 (or its raw uint8 bits) with the block `infer_block` finds; anything else an error."""
    dt, weight_shape, scale_shape = np.dtype(weight_dtype), tuple(weight_shape), tuple(scale_shape)
    is_byte = dt in (np.dtype(np.int8), np.dtype(np.uint8))
    if fp4 and not is_byte:
        raise ConversionError(f"{name}: FP4 weight {weight_shape} must be I8/U8 bytes, got {dt}")
    if is_byte and (fp4 or _is_fp4_grid(weight_shape, scale_shape)):
        return "fp4", None
    if dt == E4M3 or dt == np.uint8:
        return "fp8", infer_block(name, weight_shape, scale_shape, config_block)
    want = f"the FP4 grid {_fp4_grid(weight_shape)}" if is_byte else "none"
    raise ConversionError(
        f"{name}: scale {scale_shape} given for a {dt} weight {weight_shape}; "
        f"only F8_E4M3 and packed-FP4 I8 weights carry scales (want {want})"
    )


def dequant(name: str, weight, scale=None, *, config_block=None, rows=None, fp4: bool = False):
    """One checkpoint tensor -> its values. Without a scale the array comes back unchanged (float
    dtypes as stored, integers bit exact; the caller casts), rows-sliced if asked. With a scale: the
    path `quant_layout` picks (`dequant_fp4` or `dequant_fp8`; uint8 not on the FP4 grid = raw e4m3
    bits). Result f32; NaN is an error."""
    w = np.asarray(weight)
    if scale is None:
        if w.dtype == E4M3 or fp4:
            raise ConversionError(f"{name}: missing scale for quantised {w.dtype} weight {w.shape}")
        if rows is None:
            return w
        r0, r1 = _row_range(name, rows, w.shape)
        return w[..., r0:r1, :]
    kind, block = quant_layout(name, w.dtype, w.shape, np.shape(scale), config_block, fp4)
    if kind == "fp4":
        return dequant_fp4(name, w, scale, rows)
    return dequant_fp8(name, w, scale, block, rows)


# ----------------------------------------------------------------------------------------------
# Quantisation (export, synthetic checkpoints)
# ----------------------------------------------------------------------------------------------


def _finite_f32(name: str, w) -> np.ndarray:
    w = np.asarray(w)
    if w.ndim < 2:
        raise ConversionError(f"{name}: cannot quantise {w.shape}; want [..., out, in]")
    w = w.astype(np.float32)
    if not np.isfinite(w).all():
        raise ConversionError(f"{name}: cannot quantise weight {w.shape} holding NaN/inf")
    return w


def _pad_to(w: np.ndarray, rows: int, cols: int) -> np.ndarray:
    pad = [(0, 0)] * (w.ndim - 2) + [(0, rows - w.shape[-2]), (0, cols - w.shape[-1])]
    return np.pad(w, pad)  # zeros cannot change a tile's amax


def _round_to(y: np.ndarray, narrow, qmax: float) -> np.ndarray:
    """Round-to-nearest-even onto the e4m3 | e2m1 grid (ml_dtypes' cast), saturating at ±qmax (the
    e4m3fn cast alone would turn overflow into NaN); returned as f32 grid values."""
    return np.clip(y, -qmax, qmax).astype(narrow).astype(np.float32)


def _pow2_exponent(amax: np.ndarray, qmax: float) -> np.ndarray:
    """DeepSeek's power-of-two scale exponent, e = max(⌈log2(amax / qmax)⌉, -126) (exact in float64;
    the same as rounding the f32 amax / qmax up, `fast_round_scale`); an all-zero block gets 0."""
    with np.errstate(divide="ignore"):
        e = np.maximum(_ceil_log2(amax.astype(np.float64) / qmax), MIN_SCALE_EXP)
    return np.where(amax == 0, 0, e).astype(np.int32)


def _canonical_pow2(y: np.ndarray, e: np.ndarray, qmax: float, axes) -> tuple:
    """Power-of-two scales: a block whose largest |code| rounded to exactly qmax / 2 (amax / 2^e in
    (qmax/2, ~1.07·qmax/2)) holds the same values as (2·codes, e - 1), and re-quantising them
    picks e - 1 (their amax / qmax is exactly 2^(e-1)). Storing that form makes quantize(dequant(
    quantize(w))) == quantize(w) bit for bit; the values stay DeepSeek's, only the pair differs from
    `fast_round_scale`'s in such blocks (about 7% of random FP8 tiles). Doubling is exact on both
    grids (every code involved is at most qmax / 2). Zero codes get e = 0, as in `_zero_one`."""
    top = np.abs(y).max(axis=axes, keepdims=True)
    halve = (top == qmax / 2) & (e > MIN_SCALE_EXP)
    return np.where(halve, 2 * y, y), np.where(top == 0, 0, np.where(halve, e - 1, e))


def _zero_one(s: np.ndarray, y: np.ndarray, axes) -> np.ndarray:
    """Scale 1 for a block whose codes are all ±0: all-zero weights (transformers' rule) or a block
    so far under the 2^-126 floor that it flushes to zero; re-quantising its zeros would give 1."""
    return np.where(np.abs(y).max(axis=axes, keepdims=True) == 0, np.float32(1), s)


def _fp8_codes(tiles: np.ndarray, amax: np.ndarray, scale_fmt: str) -> tuple:
    """Per-tile scale s [..., R, 1, C, 1] (f32) and codes RNE(clip(fl(w / s), ±448)) as f32 values.

    "float32": s = max(fl(amax / 448), 2^-126) (transformers' `Fp8Quantize`), `_zero_one`.
    Re-quantising v = fl(q·s) is exact: v's tile amax is fl(448·s) (the amax element rounds to
    q = ±448) and fl(fl(448·s) / 448) == s for every s of this form (checked exhaustively over all
    2^31 positive finite f32 amax, floor included); each other element gives fl(fl(q·s) / s) within
    2^-23 relative of q, far inside e4m3's rounding interval, so rounds back to q. The floor keeps
    s normal: with a subnormal s, q·s would lose bits.
    "ue8m0": s = 2^e from `_pow2_exponent`, made canonical by `_canonical_pow2`; q·s is exact."""
    if scale_fmt == "float32":
        s = np.maximum(amax / np.float32(FP8_MAX), np.float32(2.0**MIN_SCALE_EXP))
        y = _round_to(tiles / s, E4M3, FP8_MAX)
        return _zero_one(s, y, (-3, -1)), y
    if scale_fmt != "ue8m0":
        raise ConversionError(f"quantize_fp8: scale_fmt is 'float32' or 'ue8m0', not {scale_fmt!r}")
    e = _pow2_exponent(amax, FP8_MAX)
    y = _round_to(tiles / np.ldexp(np.float32(1), e), E4M3, FP8_MAX)
    y, e = _canonical_pow2(y, e, FP8_MAX, (-3, -1))
    return np.ldexp(np.float32(1), e), y


def quantize_fp8(name: str, w, block: tuple[int, int] = (128, 128), scale_fmt: str = "float32"):
    """w [..., out, in] -> (q e4m3 [..., out, in], scale [..., R, C]): f32 `weight_scale_inv`, or
    `float8_e8m0fnu` powers of two for scale_fmt "ue8m0". Zero-pad to whole tiles, per-tile
    amax / 448, q = RNE(clip(fl(w / s), ±448)) (an f32 division, then RNE), crop. Idempotent:
    quantize_fp8(dequant(q, s)) == (q, s) bit for bit (see `_fp8_codes`)."""
    w = _finite_f32(name, w)
    Y, X = block
    O, I = w.shape[-2:]
    R, C = _cdiv(O, Y), _cdiv(I, X)
    tiles = _pad_to(w, R * Y, C * X).reshape(*w.shape[:-2], R, Y, C, X)
    s, y = _fp8_codes(tiles, np.abs(tiles).max(axis=(-3, -1), keepdims=True), scale_fmt)
    q_OI = np.ascontiguousarray(y.reshape(*w.shape[:-2], R * Y, C * X)[..., :O, :I].astype(E4M3))
    s_RC = np.ascontiguousarray(s[..., :, 0, :, 0])
    return q_OI, (_e8m0_from_exponent(np.frexp(s_RC)[1] - 1) if scale_fmt == "ue8m0" else s_RC)


def quantize_fp4(name: str, w, group: int = FP4_GROUP):
    """MXFP4: w [..., out, in] -> (packed int8 [..., out, ⌈in/2⌉], E8M0 [..., out, ⌈in/group⌉]).
    Per group s = 2^max(⌈log2(amax / 6)⌉, -126) (zero codes: 1), codes = RNE(w / s) on the e2m1
    grid (w / s is exact: s is a power of two), canonical as in `_canonical_pow2`, so idempotent;
    an odd last column is padded with code 0."""
    w = _finite_f32(name, w)
    I = w.shape[-1]
    G = _cdiv(I, group)
    x = _pad_to(w, w.shape[-2], G * group).reshape(*w.shape[:-1], G, group)
    e = _pow2_exponent(np.abs(x).max(axis=-1, keepdims=True), FP4_MAX)
    y, e = _canonical_pow2(_round_to(x / np.ldexp(np.float32(1), e), E2M1, FP4_MAX), e, FP4_MAX, -1)
    codes = y.astype(E2M1).view(np.uint8).reshape(*w.shape[:-1], G * group)[..., :I] & 0x0F
    if I % 2:  # the high nibble of the last byte is padding: code 0
        codes = np.concatenate([codes, np.zeros_like(codes[..., :1])], axis=-1)
    return _pack_codes(codes), _e8m0_from_exponent(e[..., 0])
