"""Checkpoint tensor formats (deepseek_jax/convert/formats.py) against float64 statements written
here (per-element formulas and loops over tiles, never the code under test): FP8 dequantisation
with edge tiles and row slices, FP4 nibble order and codes, E8M0 bytes, block inference,
pass-through of integer / float tensors, the quantisers (bit-exact, idempotent) and transformers'
FP8 quantiser."""

import math

import ml_dtypes
import numpy as np
import pytest

from deepseek_jax.convert import formats as F
from deepseek_jax.convert.errors import ConversionError

E4M3, E8M0 = ml_dtypes.float8_e4m3fn, ml_dtypes.float8_e8m0fnu


def e4m3_grid():
    """Non-negative e4m3fn values in code order: subnormals k·2^-9, normals (1 + m/8)·2^e, ≤ 448."""
    sub = [k * 2.0**-9 for k in range(8)]
    normal = [(1 + m / 8) * 2.0**e for e in range(-6, 9) for m in range(8)]
    return np.array([v for v in sub + normal if v <= 448], np.float64)


E2M1_GRID = np.array([0, 0.5, 1, 1.5, 2, 3, 4, 6], np.float64)


def rne(v, grid):
    """Round float64 v to the nearest grid value, ties to the even code, saturating at the max."""
    a = np.minimum(np.abs(v), grid[-1])
    hi = np.clip(np.searchsorted(grid, a), 1, len(grid) - 1)
    lo = hi - 1
    d_lo, d_hi = a - grid[lo], grid[hi] - a
    pick = np.where(d_lo < d_hi, lo, np.where(d_hi < d_lo, hi, np.where(lo % 2 == 0, lo, hi)))
    return np.copysign(grid[pick], v)


def smallest_pow2_exponent(amax, qmax):
    """The least integer e with amax <= qmax·2^e, by exact float64 comparisons."""
    e = math.ceil(math.log2(amax / qmax))
    while amax > qmax * 2.0**e:
        e += 1
    while amax <= qmax * 2.0 ** (e - 1):
        e -= 1
    return e


def e2m1_value(code):
    """Decode one e2m1 code from its bits (sign, 2 exponent bits, 1 mantissa bit, bias 1)."""
    sign = -1.0 if code & 8 else 1.0
    e, m = (code >> 1) & 3, code & 1
    return sign * (m * 0.5 if e == 0 else 2.0 ** (e - 1) * (1 + m / 2))


def e8m0_bytes(s_pow2):
    _, e = np.frexp(np.asarray(s_pow2, np.float64))  # s = 0.5·2^e -> byte = e - 1 + 127
    return (e + 126).astype(np.uint8)


def bits_equal(got, want, what):
    got, want = np.asarray(got), np.asarray(want)
    assert (got.shape, got.dtype) == (want.shape, want.dtype), (what, got.shape, got.dtype)
    bad = got.view(f"u{got.dtype.itemsize}") != want.view(f"u{got.dtype.itemsize}")
    assert not bad.any(), f"{what}: {bad.sum()} differ, e.g. {got[bad][:4]} vs {want[bad][:4]}"


def equal(got, want, what):
    """got (cast to f32) equals want (float64, cast to f32) bit for bit, NaN included."""
    bits_equal(np.asarray(got, np.float32), np.asarray(want, np.float64).astype(np.float32), what)


def random_e4m3(rng, shape):
    return (rng.standard_normal(shape) * 40).astype(np.float32).astype(E4M3)


def test_e8m0_edge_bytes_are_bit_viewed():
    b = np.array([0, 1, 127, 130, 254, 255], np.uint8)
    want = [2.0**-127, 2.0**-126, 1.0, 8.0, 2.0**127, np.nan]
    for s in (b, b.view(E8M0)):  # 2^-127 is an exact f32 subnormal
        got = F.e8m0_to_f32(s)
        assert got.dtype == np.float32
        np.testing.assert_array_equal(got.astype(np.float64), want)
    assert F.e8m0_to_f32(np.array([130], np.uint8))[0] == 8.0  # a numeric cast would give 128
    s = np.array([[0.25, 3.0]], ml_dtypes.bfloat16)
    np.testing.assert_array_equal(F.e8m0_to_f32(s), np.array([[0.25, 3.0]], np.float32))
    with pytest.raises(ConversionError, match="my.scale"):
        F.e8m0_to_f32(np.zeros(2, np.int32), "my.scale")


@pytest.mark.parametrize("shape,tile", [((200, 300), 128), ((70, 100), 32)])
def test_dequant_fp8_matches_per_element_reference(shape, tile):
    """128x128 (V3/V4) and 32x32 (V4.1) blocks, inferred from the grid; 70 and 100 are not x32."""
    rng = np.random.default_rng(10)
    q = random_e4m3(rng, shape)  # [out, in]
    s = np.ldexp(1.0, rng.integers(-12, 4, (-(-shape[0] // tile), -(-shape[1] // tile))))
    s = s.astype(np.float32)
    want = np.empty(shape)
    for o in range(shape[0]):
        for i in range(shape[1]):
            want[o, i] = float(q[o, i]) * float(s[o // tile, i // tile])
    B = (tile, tile)
    equal(F.dequant_fp8("w", q, s, B), want, "fp8, f32 scale_inv")
    equal(F.dequant_fp8("w", q.view(np.uint8), e8m0_bytes(s), B), want, "raw bits + e8m0 bytes")
    equal(F.dequant_fp8("w", q, s.astype(E8M0), B), want, "fp8, float8_e8m0fnu")
    equal(F.dequant("w", q, s), want, "block inferred from the grid")
    got = F.dequant("w", q, s.astype(E8M0), config_block=B, rows=(33, 70))
    equal(got, want[33:70], "rows")
    with pytest.raises(ConversionError, match=r"w: missing/mis-shaped scale.*got \("):
        F.dequant_fp8("w", q, s[:, :-1], B)
    if tile == 32:  # a wrong block is rejected, not broadcast
        with pytest.raises(ConversionError, match="w: missing/mis-shaped scale"):
            F.dequant_fp8("w", q, s, (128, 128))


def test_v3_edge_tile_576_rows_is_padded_then_cropped():
    """kv_a_proj_with_mqa-style: 576 rows -> 5 row tiles, the last covering rows 512..575."""
    rng = np.random.default_rng(1)
    q = random_e4m3(rng, (576, 300))
    s = (rng.uniform(0.5, 2, (5, 3)) * 1e-3).astype(np.float32)  # f32, not powers of two
    padded = np.zeros((640, 384))
    padded[:576, :300] = q.astype(np.float64)
    for ti in range(5):
        for tj in range(3):
            padded[ti * 128 : (ti + 1) * 128, tj * 128 : (tj + 1) * 128] *= float(s[ti, tj])
    got = F.dequant("layers.0.self_attn.kv_a_proj_with_mqa.weight", q, s)
    assert got.shape == (576, 300) and got.dtype == np.float32
    equal(got, padded[:576, :300], "576x300 with grid [5, 3]")
    want_last = q[512:, 256:].astype(np.float64) * float(s[4, 2])
    equal(got[512:, 256:], want_last, "rows 512.. use scale row 4")


def test_fp8_row_slices_read_only_their_rows():
    rng = np.random.default_rng(2)
    q = random_e4m3(rng, (576, 300))
    s_bytes = rng.integers(100, 140, (5, 3)).astype(np.uint8)
    full = F.dequant("w", q, s_bytes)
    # poison every row and scale row the slice must not read: NaN codes and NaN (255) scale bytes
    q_poison, s_poison = q.view(np.uint8).copy(), s_bytes.copy()
    q_poison[:100], q_poison[300:] = 0x7F, 0xFF
    s_poison[[3, 4]] = 255  # rows 100..299 need scale rows 0..2 only
    part = F.dequant_fp8("w", q_poison.view(E4M3), s_poison, (128, 128), rows=(100, 300))
    bits_equal(part, full[100:300], "rows (100, 300)")
    bits_equal(F.dequant("w", q, s_bytes, rows=(575, 576)), full[575:], "last row")
    assert F.dequant("w", q, s_bytes, rows=(7, 7)).shape == (0, 300)
    with pytest.raises(ConversionError, match=r"w: rows \(0, 577\) outside"):
        F.dequant("w", q, s_bytes, rows=(0, 577))
    with pytest.raises(ConversionError, match="w: scale .* NaN/inf at tile \\(3, 0\\)"):
        F.dequant_fp8("w", q, s_poison, (128, 128), rows=(100, 400))


def test_engram_1x32_fp8_rows():
    """V4.1 Engram table: F8 [rows, 256] x E8M0 [rows, 8], one scale per 32 channels of a row."""
    rng = np.random.default_rng(3)
    q = random_e4m3(rng, (40, 256))
    s = rng.integers(110, 140, (40, 8)).astype(np.uint8).view(E8M0)
    assert F.infer_block("engram.embed.weight", q.shape, s.shape, None) == (1, 32)
    o, i = np.meshgrid(np.arange(40), np.arange(256), indexing="ij")
    want = q.astype(np.float64) * 2.0 ** (s.view(np.uint8)[o, i // 32].astype(np.float64) - 127)
    equal(F.dequant("engram.embed.weight", q, s), want, "engram 1x32")
    equal(F.dequant("engram.embed.weight", q, s, rows=(13, 29)), want[13:29], "engram rows")


def test_infer_block_candidates():
    # V4.1 dense 32x32 (shape only), V3 128x128 edge tile, FP4 1x32 of the unpacked width
    assert F.infer_block("wq_a", (1280, 5120), (40, 160), (32, 32)) == (32, 32)
    assert F.infer_block("wq_a", (1280, 5120), (40, 160), None) == (32, 32)  # not 128: [10, 40]
    assert F.infer_block("kv_a", (576, 7168), (5, 56), (128, 128)) == (128, 128)
    assert F.infer_block("w1", (8, 2048, 3584), (8, 2048, 224), None, packed=True) == (1, 32)
    # config block preferred when both fit: the 64x64 config wins over 128x128 on a [1, 1] grid
    assert F.infer_block("t", (64, 64), (1, 1), (64, 64)) == (64, 64)
    assert F.infer_block("t", (64, 64), (1, 1), None) == (128, 128)
    tried = r"tried \[\(128, 128\), \(32, 32\), \(1, 32\)\]"
    with pytest.raises(ConversionError, match=r"my\.weight.*\(100, 100\).*\(3, 2\).*" + tried):
        F.infer_block("my.weight", (100, 100), (3, 2), None)
    with pytest.raises(ConversionError, match="my.weight"):
        F.infer_block("my.weight", (4, 100, 100), (1, 1), None)  # leading dims must match


def test_fp4_nibble_order_all_codes_and_negative_zero():
    ones = np.full((1, 1), 127, np.uint8)  # scale 2^0
    byte_0x21 = np.array([[0x21]], np.uint8)  # codes (1, 2)
    np.testing.assert_array_equal(F.dequant_fp4("x", byte_0x21, ones), [[0.5, 1.0]])
    codes = np.arange(16, dtype=np.uint8)
    packed = (codes[0::2] | codes[1::2] << 4).reshape(1, 8)  # low nibble = even column
    got = F.dequant_fp4("x", packed.view(np.int8), ones)[0]
    want = [e2m1_value(c) for c in range(16)]
    np.testing.assert_array_equal(got, want)
    np.testing.assert_array_equal(np.signbit(got), [c >= 8 for c in range(16)])  # code 8 is -0.0
    assert list(F.FP4_LUT) == want


def test_dequant_fp4_matches_per_element_reference():
    rng = np.random.default_rng(11)
    packed = rng.integers(-128, 128, (16, 32), dtype=np.int8)  # [out=16, in/2=32]
    scale = rng.integers(110, 130, (16, 2), dtype=np.uint8)  # e8m0 [out, in/32]
    want = np.empty((16, 64))
    for o in range(16):
        for i in range(64):
            byte = int(packed[o, i // 2]) & 0xFF
            code = byte & 0x0F if i % 2 == 0 else byte >> 4
            want[o, i] = e2m1_value(code) * 2.0 ** (int(scale[o, i // 32]) - 127)
    equal(F.dequant_fp4("w", packed, scale), want, "fp4 dequant")
    equal(F.dequant("w", packed, scale), want, "fp4 detected from I8 + 1x32 grid")
    got = F.dequant("w", packed.view(np.uint8), scale.view(E8M0), fp4=True, rows=(3, 9))
    equal(got, want[3:9], "fp4 rows")
    bits_equal(F.pack_fp4(F.unpack_fp4(packed)), packed, "pack(unpack)")
    with pytest.raises(ConversionError, match=r"w: missing/mis-shaped scale.*scale \(16, 2\)"):
        F.dequant_fp4("w", packed, scale[:, :1])
    for n_in in (48, 47):  # a partial last group (32 + 16), and an odd logical width
        equal(F.dequant_fp4("w", packed[:, :24], scale, n_in=n_in), want[:, :n_in], f"in={n_in}")


def test_integer_and_float_tensors_pass_unchanged():
    tid2eid = np.array([[0, 257], [383, 12]], np.int64)
    got = F.dequant("layers.0.ffn.gate.tid2eid", tid2eid)
    assert got.dtype == np.int64 and got.tolist() == [[0, 257], [383, 12]]
    assert F.dequant("tid2eid", tid2eid, rows=(1, 2)).tolist() == [[383, 12]]
    special = np.array([np.nan, -0.0, np.inf, -np.inf, 1e-45, 3.4e38], np.float32)
    hc = np.concatenate([special, np.random.default_rng(5).standard_normal(58).astype(np.float32)])
    hc[0:1] = np.array([0x7FC12345], np.uint32).view(np.float32)  # a NaN payload survives too
    bits_equal(F.dequant("layers.0.hc_attn_fn", hc), hc, "f32 bit-identical")
    bf16 = hc.astype(ml_dtypes.bfloat16).reshape(8, 8)
    bits_equal(F.dequant("embed.weight", bf16), bf16, "bf16 unchanged (the caller casts)")


def test_dispatch_errors_name_the_tensor():
    rng = np.random.default_rng(6)
    q = random_e4m3(rng, (64, 64))
    with pytest.raises(ConversionError, match=r"attn\.wq_a\.weight: missing scale"):
        F.dequant("attn.wq_a.weight", q)
    one = np.ones((1, 1), np.float32)
    with pytest.raises(ConversionError, match=r"embed\.weight: scale \(1, 1\) given for a bfl"):
        F.dequant("embed.weight", q.astype(ml_dtypes.bfloat16), one)
    s255 = np.full((1, 1), 255, np.uint8)
    with pytest.raises(ConversionError, match=r"attn\.wo\.weight: scale \(1, 1\) is NaN"):
        F.dequant("attn.wo.weight", q, s255)
    packed = rng.integers(-128, 128, (4, 32), dtype=np.int8)
    s_fp4 = np.full((4, 2), 127, np.uint8)
    s_fp4[2, 1] = 255
    with pytest.raises(
        ConversionError, match=r"experts\.0\.w1\.weight: .* NaN/inf at tile \(2, 1\)"
    ):
        F.dequant("experts.0.w1.weight", packed, s_fp4)
    q_nan = q.view(np.uint8).copy()
    q_nan[5, 5] = 0xFF
    with pytest.raises(ConversionError, match=r"wq\.weight: FP8 weight \(64, 64\) has e4m3 NaN"):
        F.dequant("wq.weight", q_nan.view(E4M3), one)
    with pytest.raises(ConversionError, match="w1.weight: FP4 weight .* must be I8/U8 bytes"):
        F.dequant("w1.weight", q, np.ones((64, 4), np.uint8), fp4=True)  # an F8 weight is never FP4
    with pytest.raises(ConversionError, match="w1.weight: scale .* given for a int8"):
        F.dequant("w1.weight", packed, np.ones((1, 1), np.uint8))  # I8 with a non-FP4 grid


def varied_weight(rng, shape, tile):
    """Random weights [..., O, I] whose tiles have magnitudes 10^-30..10^30 (so many scale
    mantissas), an all-zero tile, tiles under the 2^-126 scale floor, values near the f32 max and
    e4m3 rounding midpoints (exact ties under a power-of-two scale)."""
    (O, I), (Y, X) = shape[-2:], tile
    R, C = -(-O // Y), -(-I // X)
    lead = tuple(shape[:-2])
    mag = 10.0 ** rng.uniform(-30, 30, lead + (R, 1, C, 1))
    w = (rng.standard_normal(lead + (R, Y, C, X)) * mag).reshape(lead + (R * Y, C * X))[..., :O, :I]
    w[..., :Y, :X] = 0.0
    if O > Y:
        w[..., Y:, :X] *= 1e-38 / np.abs(w[..., Y:, :X]).max()
    w[..., -1:, -3:] = [1e38, -3e38, 7.0]
    mid = (e4m3_grid()[1:] + e4m3_grid()[:-1]) / 2
    w[..., -2, : min(16, I)] = mid[40 : 40 + min(16, I)]
    return w.astype(np.float32)


def ref_quantize_fp8(w, block, scale_fmt, canonical=True):
    """Per-tile float64 loop: s from amax, q = RNE(fl32(w / s)) on the e4m3 grid (clipped); with
    power-of-two scales a tile whose max |q| is 224 is stored as (2q, s/2) if `canonical`, and a
    tile of zero codes gets scale 1."""
    (O, I), (Y, X) = w.shape, block
    R, C = -(-O // Y), -(-I // X)
    q, s = np.zeros((O, I)), np.zeros((R, C))
    for ti in range(R):
        for tj in range(C):
            t = w[ti * Y : (ti + 1) * Y, tj * X : (tj + 1) * X].astype(np.float64)
            amax = np.abs(t).max()
            if amax == 0:
                s[ti, tj] = 1.0
            elif scale_fmt == "float32":  # f64 quotient rounded once to f32 == f32 division
                s[ti, tj] = max(float(np.float32(amax / 448)), 2.0**-126)
            else:
                s[ti, tj] = 2.0 ** max(smallest_pow2_exponent(amax, 448), -126)
            y = (t / s[ti, tj]).astype(np.float32).astype(np.float64)
            qt = rne(np.clip(y, -448, 448), e4m3_grid())
            pow2 = canonical and scale_fmt == "ue8m0"
            if pow2 and np.abs(qt).max() == 224 and s[ti, tj] > 2.0**-126:
                qt, s[ti, tj] = 2 * qt, s[ti, tj] / 2  # canonical form: the same values
            if canonical and not qt.any():
                s[ti, tj] = 1.0  # all codes ±0 (flushed under the floor): scale 1
            q[ti * Y : (ti + 1) * Y, tj * X : (tj + 1) * X] = qt
    return q, s


def ref_dequant(q, s, block):
    o, i = np.meshgrid(np.arange(q.shape[0]), np.arange(q.shape[1]), indexing="ij")
    return q * s[o // block[0], i // block[1]]


@pytest.mark.parametrize("scale_fmt", ["float32", "ue8m0"])
@pytest.mark.parametrize("shape,block", [((300, 200), (128, 128)), ((70, 100), (32, 32))])
def test_quantize_fp8_matches_float64_reference(shape, block, scale_fmt):
    w = varied_weight(np.random.default_rng(7), shape, block)
    q, s = F.quantize_fp8("w", w, block, scale_fmt)
    want_q, want_s = ref_quantize_fp8(w, block, scale_fmt)
    assert q.dtype == E4M3 and s.dtype == (np.float32 if scale_fmt == "float32" else E8M0)
    equal(q.astype(np.float32), want_q, "codes")
    equal(s.astype(np.float32), want_s, "scales")
    equal(F.dequant("w", q, s), ref_dequant(want_q, want_s, block), "values")
    if scale_fmt == "ue8m0":  # the canonical form changed some tiles, never a value (see ref)
        deepseek_q, deepseek_s = ref_quantize_fp8(w, block, "ue8m0", canonical=False)
        want_v = ref_dequant(deepseek_q, deepseek_s, block)
        equal(F.dequant("w", q, s), want_v, "values = DeepSeek rule's")
        assert (deepseek_s != want_s).any(), "the test data should hit a max code of 224"


SHAPES = [((576, 300), (128, 128)), ((256, 128), (128, 128)), ((33, 7), (128, 128))]
SHAPES += [((3, 130, 260), (128, 128)), ((1000, 700), (32, 32))]


@pytest.mark.parametrize("scale_fmt", ["float32", "ue8m0"])
@pytest.mark.parametrize("shape,block", SHAPES)
def test_quantize_fp8_is_idempotent(shape, block, scale_fmt):
    """import(export(x)) reproduces the FP8-rounded values bit for bit, also for f32 scales."""
    w = varied_weight(np.random.default_rng(8), shape, block)
    q, s = F.quantize_fp8("w", w, block, scale_fmt)
    v = F.dequant("w", q, s)
    q2, s2 = F.quantize_fp8("w", v, block, scale_fmt)
    bits_equal(q2, q, "codes again")
    bits_equal(s2, s, "scales again")
    bits_equal(F.dequant("w", q2, s2), v, "values again")


def hf_quantize(torch, fp8, w, scale_fmt):
    """transformers' `Fp8Quantize`, 128x128 -> (codes as uint8, scale bytes | f32, its config)."""
    from types import SimpleNamespace

    fmt = scale_fmt if scale_fmt == "ue8m0" else None
    hf = SimpleNamespace(
        quantization_config=SimpleNamespace(weight_block_size=[128, 128], scale_fmt=fmt)
    )
    out = fp8.Fp8Quantize(hf)._quantize_one("x.weight", torch.from_numpy(w))
    s = out["x.weight_scale_inv"].view(torch.uint8 if fmt else torch.float32).numpy()
    return out["x.weight"].view(torch.uint8).numpy(), s, hf


def hf_dequant(torch, fp8, hf, q_bytes, s):
    q = torch.from_numpy(np.ascontiguousarray(q_bytes))
    q = q.view(torch.float8_e4m3fn) if q.dtype == torch.uint8 else q
    s = torch.from_numpy(np.ascontiguousarray(s.view(np.uint8) if s.dtype == E8M0 else s))
    return fp8.Fp8Dequantize(hf)._dequantize_one(q, s, output_dtype=torch.float32).numpy()


@pytest.mark.parity
@pytest.mark.slow  # 3-6 s, nearly all of it importing torch + transformers
def test_quantize_fp8_and_dequant_match_transformers():
    """transformers' Fp8Quantize / Fp8Dequantize on a shape dividing 128 (it skips edge tiles).
    Its f32 scale is fl(1 / fl(448 / amax)), within an ulp of our fl(amax / 448), and it multiplies
    by fl(448 / amax) instead of dividing, so codes may differ by one step near a rounding tie."""
    torch = pytest.importorskip("torch")
    fp8 = pytest.importorskip("transformers.integrations.finegrained_fp8")
    rng = np.random.default_rng(9)
    w = (rng.standard_normal((256, 384)) * 10.0 ** rng.uniform(-3, 3, (256, 1))).astype(np.float32)
    w[:128, :128] = rng.uniform(-100, 100, (128, 128))
    w[0, 0] = 230.0  # ue8m0: s = 1 and the max code rounds to 224, so we store (2q, 1/2)
    for scale_fmt in ("float32", "ue8m0"):
        hf_q, hf_s, hf = hf_quantize(torch, fp8, w, scale_fmt)
        q, s = F.quantize_fp8("x.weight", w, scale_fmt=scale_fmt)
        v = F.dequant("x.weight", q, s)
        bits_equal(v, hf_dequant(torch, fp8, hf, q.view(np.uint8), s), f"{scale_fmt} dequant")
        if scale_fmt == "ue8m0":  # same pairs, except where we store the canonical (2q, s/2)
            hf_top = np.abs(hf_q.view(E4M3).astype(np.float32)).reshape(2, 128, 3, 128).max((1, 3))
            same = np.repeat(np.repeat(hf_top != 224, 128, 0), 128, 1)
            assert same.any() and not same.all(), "the data should have both kinds of tile"
            bits_equal(hf_q[same], q.view(np.uint8)[same], "ue8m0 codes")
            bits_equal(hf_s[hf_top != 224], s.view(np.uint8)[hf_top != 224], "ue8m0 scales")
            bits_equal(v, hf_dequant(torch, fp8, hf, hf_q, hf_s.view(E8M0)), "ue8m0 values")
        else:
            assert np.all(np.abs(hf_s.astype(np.float64) - s) <= np.spacing(s)), "scales"
            step = np.abs((hf_q & 0x7F).astype(int) - (q.view(np.uint8) & 0x7F).astype(int))
            assert step.max() <= 1 and (step > 0).mean() < 1e-3, (step.max(), (step > 0).mean())
    packed, s_fp4 = F.quantize_fp4("e.weight", w)
    want = hf_dequant(torch, fp8, hf, packed, s_fp4)
    bits_equal(F.dequant("e.weight", packed, s_fp4), want, "fp4 dequant vs transformers")


def ref_mxfp4(w, group=32, canonical=True):
    """Float64 MXFP4: per 1x`group` group e = least with amax <= 6·2^e (>= -126; all-zero: 0),
    value = RNE(w / 2^e) on the e2m1 grid (ties to the even code) · 2^e; a group whose max |code|
    is 3 is stored as (2·codes, e - 1) when `canonical`, and one of zero codes gets e = 0."""
    O, I = w.shape
    out, exps = np.zeros((O, I)), np.zeros((O, -(-I // group)), int)
    for o in range(O):
        for g in range(exps.shape[1]):
            t = w[o, g * group : (g + 1) * group].astype(np.float64)
            amax = np.abs(t).max()
            e = 0 if amax == 0 else max(smallest_pow2_exponent(amax, 6), -126)
            codes = rne(t / 2.0**e, E2M1_GRID)
            if canonical and np.abs(codes).max() == 3 and e > -126:
                codes, e = 2 * codes, e - 1
            if canonical and not codes.any():
                e = 0
            exps[o, g] = e
            out[o, g * group : (g + 1) * group] = codes * 2.0**e
    return out, exps


@pytest.mark.parametrize("n_in", [64, 48, 47])
def test_quantize_fp4_matches_float64_mxfp4_reference(n_in):
    rng = np.random.default_rng(12)
    w = (rng.standard_normal((24, n_in)) * 10.0 ** rng.uniform(-30, 30, (24, 1))).astype(np.float32)
    w[0] = 0.0
    ties = [0.25, 0.75, 1.25, 1.75, 2.5, 3.5, 5, -0.25, -0.75, -5, 6, 0.1, -0.1, 0]
    w[1, :14] = np.array(ties) * 2.0**-3
    packed, s = F.quantize_fp4("experts.0.w1.weight", w)
    assert packed.dtype == np.int8 and packed.shape == (24, -(-n_in // 2))
    assert s.dtype == E8M0 and s.shape == (24, -(-n_in // 32))
    want, exps = ref_mxfp4(w)
    got = F.dequant_fp4("experts.0.w1.weight", packed, s, n_in=n_in)
    equal(got, want, "mxfp4")
    np.testing.assert_array_equal(np.signbit(got), np.signbit(want))  # -0.1·2^-3 rounds to -0.0
    np.testing.assert_array_equal(s.view(np.uint8).astype(int), exps + 127)
    deepseek, deepseek_exps = ref_mxfp4(w, canonical=False)
    equal(got, deepseek, "values = DeepSeek rule's")
    assert (deepseek_exps != exps).any(), "the test data should hit a max code of 3"
    packed2, s2 = F.quantize_fp4("experts.0.w1.weight", got)
    bits_equal(packed2, packed, "idempotent codes")
    bits_equal(s2, s, "idempotent scales")
    if n_in % 2:
        assert not (packed.view(np.uint8)[:, -1] >> 4).any(), "odd width: the pad nibble is code 0"


def test_quantize_fp4_matches_fake_quant_simulation():
    """Export and the JAX FP4 simulation (quant.fake_quant_fp4) agree on every value."""
    import jax.numpy as jnp

    from deepseek_jax import quant as Q

    w = np.random.default_rng(13).standard_normal((16, 64)).astype(np.float32)
    packed, s = F.quantize_fp4("w", w)
    want = np.asarray(Q.fake_quant_fp4(jnp.asarray(w)))
    equal(F.dequant("w", packed, s), want, "fp4 export vs simulation")
