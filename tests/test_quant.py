"""FP8 / FP4 fake quantisation (deepseek_jax/quant.py) against a numpy float64 reference: rounding to
nearest-even onto the e4m3 / e2m1 grids, saturation, block scales (incl. ue8m0 powers of two),
partial blocks, straight-through gradients, idempotence, the Hadamard rotation and the mode helpers
(checkpoint tensors: tests/convert/test_formats.py). Rounding and scales are compared bit-equal."""

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
import pytest

from deepseek_jax import quant as Q

# ----------------------------------------------------------------------------------------------
# numpy float64 reference
# ----------------------------------------------------------------------------------------------


def grid(fmt):
    """Non-negative representable values in code order (so ties-to-even = even index)."""
    if fmt == "fp4":
        return np.array([0, 0.5, 1, 1.5, 2, 3, 4, 6], np.float64)
    sub = [k * 2.0**-9 for k in range(8)]  # e4m3 subnormals: exponent 0, bias 7
    normal = [(1 + m / 8) * 2.0**e for e in range(-6, 9) for m in range(8)]
    return np.array([v for v in sub + normal if v <= 448], np.float64)  # 1.875·2^8 is the NaN code


def rne(v, fmt):
    """Round float64 v to the nearest grid value, ties to even code, saturating at the max."""
    g = grid(fmt)
    a = np.minimum(np.abs(v), g[-1])
    hi = np.clip(np.searchsorted(g, a), 1, len(g) - 1)
    lo = hi - 1
    d_lo, d_hi = a - g[lo], g[hi] - a
    pick = np.where(d_lo < d_hi, lo, np.where(d_hi < d_lo, hi, np.where(lo % 2 == 0, lo, hi)))
    return np.copysign(g[pick], v)


QMAX = {"fp8": 448.0, "fp4": 6.0}
FLOOR = {"fp8": 1e-4, "fp4": 6 * 2.0**-126}


def ref_scale(amax_f32, fmt, ue8m0):
    s = np.maximum(amax_f32, np.float32(FLOOR[fmt])).astype(np.float32) * np.float32(1 / QMAX[fmt])
    if not ue8m0:
        return s
    m, e = np.frexp(s.astype(np.float64))  # s = m·2^e, m in [0.5, 1)
    return np.where(m == 0.5, s, np.ldexp(1.0, e)).astype(np.float32)


def ref_fake(x, fmt, block, ue8m0=True):
    """Reference fake quant along the last dim; the last block is zero-padded (partial)."""
    x32 = np.asarray(x, np.float32)
    N = x32.shape[-1]
    W = -(-N // block)
    xb = np.pad(x32, [(0, 0)] * (x32.ndim - 1) + [(0, W * block - N)]).reshape(*x32.shape[:-1], W, block)
    s = ref_scale(np.abs(xb).max(-1, keepdims=True), fmt, ue8m0)
    y = np.clip(xb / s, -QMAX[fmt], QMAX[fmt])  # f32 division, as the kernel
    out = (rne(y.astype(np.float64), fmt) * s).astype(np.float32)
    return out.reshape(*x32.shape[:-1], -1)[..., :N], s[..., 0]


def ref_fake_weight(w_IJ, block=128):
    """Reference 128×128 tile fake quant of one [in, out] matrix (loops over tiles)."""
    w = np.asarray(w_IJ, np.float32)
    out = np.empty_like(w)
    for i in range(0, w.shape[0], block):
        for j in range(0, w.shape[1], block):
            t = w[i : i + block, j : j + block]
            s = ref_scale(np.abs(t).max(), "fp8", True)
            out[i : i + block, j : j + block] = rne((t / s).astype(np.float64), "fp8") * s
    return out


def equal(got, want, what):
    got, want = np.asarray(got, np.float64), np.asarray(want, np.float64)
    assert got.shape == want.shape, (what, got.shape, want.shape)
    bad = ~((got == want) | (np.isnan(got) & np.isnan(want)))
    print(f"{what}: {bad.sum()} / {bad.size} differ, max |err| {np.abs(got - want).max():.3e}")
    assert not bad.any(), f"{what}: first mismatch {got[bad][:4]} vs {want[bad][:4]}"


def log_uniform_blocks(rng, rows, cols, lo=-8, hi=6):
    """Blocks whose magnitudes span many decades (one decade per row), plus a zero and a tiny row."""
    x = rng.standard_normal((rows, cols)) * 10.0 ** rng.uniform(lo, hi, (rows, 1))
    x[0] = 0.0
    x[1] *= 1e-9 / np.abs(x[1]).max()  # amax below the FP8 floor
    return x.astype(np.float32)


# ----------------------------------------------------------------------------------------------
# rounding, scales, blocks
# ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("fmt", ["fp8", "fp4"])
def test_grid_rounding_matches_reference_and_ml_dtypes(fmt):
    """With the block max = qmax the scale is exactly 1, so x̂ is x rounded onto the grid: grid points,
    midpoints (ties), midpoints ± 1 f32 ulp and ± 2^-12 relative (a double rounding via f16 would fail)."""
    g = grid(fmt).astype(np.float32)
    mid = ((g[1:] + g[:-1]) / 2).astype(np.float32)
    vals = np.concatenate([g, mid, np.nextafter(mid, 0), np.nextafter(mid, 1e9),
                           mid * (1 + 2.0**-12), mid * (1 - 2.0**-12)]).astype(np.float32)
    vals = vals * np.where(np.arange(vals.size) % 2, -1, 1).astype(np.float32)
    block = 128 if fmt == "fp8" else 32
    cols = block - 1
    vals = np.pad(vals, (0, -vals.size % cols))
    x = np.concatenate([np.full((vals.size // cols, 1), QMAX[fmt], np.float32), vals.reshape(-1, cols)], 1)
    _, s = Q.quant(jnp.asarray(x), fmt, block)
    equal(s, np.ones_like(s), f"{fmt} grid-test scales")
    fake = Q.fake_quant_fp8(x, block) if fmt == "fp8" else Q.fake_quant_fp4(x, block)
    narrow = ml_dtypes.float8_e4m3fn if fmt == "fp8" else ml_dtypes.float4_e2m1fn
    want = rne(x.astype(np.float64), fmt)
    equal(want, x.astype(narrow).astype(np.float64), f"{fmt} reference vs ml_dtypes")
    equal(fake, rne(x.astype(np.float64), fmt), f"{fmt} fake quant vs reference rounding")


@pytest.mark.parametrize(("fmt", "block", "ue8m0"), [("fp8", 128, True), ("fp8", 64, True),
                                                     ("fp8", 128, False), ("fp4", 32, True)])
def test_block_scales_match_reference(fmt, block, ue8m0):
    rng = np.random.default_rng(0)
    x = log_uniform_blocks(rng, 24, 2 * block)
    want, want_s = ref_fake(x, fmt, block, ue8m0)
    if fmt == "fp8":
        got = Q.fake_quant_fp8(jnp.asarray(x), block, ue8m0=ue8m0)
    else:
        got = Q.fake_quant_fp4(jnp.asarray(x), block)
    q, s = Q.quant(jnp.asarray(x), fmt, block, ue8m0=ue8m0)
    equal(got, want, f"{fmt} block {block} ue8m0={ue8m0} fake quant")
    equal(s, want_s, f"{fmt} block {block} ue8m0={ue8m0} scales")
    equal(Q.dequant(q, s, block), want, f"{fmt} quant -> dequant")
    if ue8m0:
        m, _ = np.frexp(np.asarray(s, np.float64))
        assert np.all(m == 0.5), "ue8m0 scales must be powers of two"


@pytest.mark.parametrize("fmt", ["fp8", "fp4"])
def test_saturating_cast(fmt):
    """Out-of-range values clip to ±qmax (e4m3fn has no inf: an unclipped cast would give NaN);
    amax-derived scales keep |x/s| <= qmax, so this is the guard, tested directly."""
    y = np.array([QMAX[fmt], 500.0, 1e30, np.inf, -7.0, -1e30, -np.inf, np.nan], np.float32)
    got = np.asarray(Q.round_sat(jnp.asarray(y), fmt), np.float64)
    want = rne(np.where(np.isnan(y), 0, y).astype(np.float64), fmt)
    want[-1] = np.nan if fmt == "fp8" else want[-1]  # NaN: e4m3fn keeps it; e2m1 has no NaN
    equal(got[:-1], want[:-1], f"{fmt} saturation")
    assert np.isnan(got[-1]) == (fmt == "fp8")


def test_bf16_input_keeps_dtype_and_matches_reference():
    x = log_uniform_blocks(np.random.default_rng(1), 8, 128, -3, 3).astype(jnp.bfloat16)
    got = Q.fake_quant_fp8(jnp.asarray(x))
    want, _ = ref_fake(np.asarray(x, np.float32), "fp8", 128)
    assert got.dtype == jnp.bfloat16
    equal(got, want.astype(jnp.bfloat16), "bf16 fake quant")


@pytest.mark.parametrize(("fmt", "N", "block"), [("fp8", 100, 64), ("fp4", 40, 32)])
def test_partial_last_block_is_zero_padded(fmt, N, block):
    """N % block != 0: the last block is partial (its scale from its own elements), as zero padding."""
    x = np.random.default_rng(2).standard_normal((3, N)).astype(np.float32)
    x[:, block:] *= 1e-3  # the partial block has a much smaller scale than the first
    fq = Q.fake_quant_fp8 if fmt == "fp8" else Q.fake_quant_fp4
    got = fq(jnp.asarray(x), block)
    equal(got, ref_fake(x, fmt, block)[0], f"{fmt} N={N} block={block}")
    pieces = np.concatenate([fq(jnp.asarray(x[:, :block]), block), fq(jnp.asarray(x[:, block:]), block)], -1)
    equal(got, pieces, f"{fmt} partial block == separately quantised piece")
    q, s = Q.quant(jnp.asarray(x), fmt, block)
    assert q.shape == (3, N) and s.shape == (3, -(-N // block))
    with pytest.raises(ValueError, match="block size"):
        fq(jnp.asarray(x), 0)


def test_axis_argument_blocks_along_that_axis():
    x = np.random.default_rng(3).standard_normal((2, 64, 5)).astype(np.float32)
    got = Q.fake_quant_fp4(jnp.asarray(x), 32, axis=-2)
    want = np.swapaxes(ref_fake(np.swapaxes(x, -1, -2), "fp4", 32)[0], -1, -2)
    equal(got, want, "fp4 along axis -2")


def test_weight_tiles_match_reference_and_are_transpose_invariant():
    """[E, in, J1, J2] with in=200, out=3·50=150: 128×128 tiles with partial edge tiles."""
    w = np.random.default_rng(4).standard_normal((2, 200, 3, 50)).astype(np.float32)
    w[0, 128:, :, :] *= 1e-4  # tiles with different scales
    got = Q.fake_quant_fp8_weight(jnp.asarray(w), n_in=1, n_batch=1)
    want = np.stack([ref_fake_weight(w[e].reshape(200, 150)).reshape(200, 3, 50) for e in range(2)])
    equal(got, want, "fp8 weight tiles (E=2, in=200, out=3x50)")
    w_OI = np.transpose(w[1].reshape(200, 150))  # the checkpoint's [out, in] layout
    equal(Q.fake_quant_fp8_weight(jnp.asarray(w_OI)), want[1].reshape(200, 150).T, "transposed layout")
    with pytest.raises(ValueError, match="n_in"):
        Q.fake_quant_fp8_weight(jnp.asarray(w), n_in=3, n_batch=1)


# ----------------------------------------------------------------------------------------------
# training use: straight-through gradients, idempotence
# ----------------------------------------------------------------------------------------------


FAKES = {
    "fp8_act": lambda x: Q.fake_quant_fp8(x, 64),
    "fp4_act": lambda x: Q.fake_quant_fp4(x, 32),
    "fp8_weight": lambda x: Q.fake_quant_fp8_weight(x, n_in=1),
    "sim_kv_v4": lambda x: Q.sim_kv(x, "fp8", n_rope=32, block=64),
    "sim_indexer_fp4": lambda x: Q.sim_indexer(x, "fp8_fp4"),
}


def test_straight_through_gradient():
    x = jnp.asarray(np.random.default_rng(5).standard_normal((6, 128)).astype(np.float32))
    c = jnp.asarray(np.random.default_rng(6).standard_normal((6, 128)).astype(np.float32))
    for name, f in FAKES.items():
        g = jax.grad(lambda v, f=f: jnp.sum(c * f(v)))(x)
        if name == "sim_indexer_fp4":  # STE through the quantiser, exact gradient through H (H = Hᵀ)
            want = Q.hadamard(c)
            np.testing.assert_allclose(g, want, rtol=1e-5, atol=1e-6)
        else:
            equal(g, c, f"{name} gradient")
    g_jit = jax.jit(jax.grad(lambda v: jnp.sum(c * Q.fake_quant_fp8(v))))(x)
    equal(g_jit, c, "jit(grad(fake_quant_fp8))")


def test_idempotent():
    """q(q(x)) == q(x) for power-of-two scales: the re-quantised block's scale is s or s/2, and both
    grids contain every value of the first."""
    x = jnp.asarray(log_uniform_blocks(np.random.default_rng(7), 16, 256, -4, 4))
    for name, f in FAKES.items():
        if name == "sim_indexer_fp4":
            continue  # the rotation is not idempotent; its quantiser is covered by fp4_act
        once = f(x)
        equal(f(once), once, f"{name} idempotence")


# ----------------------------------------------------------------------------------------------
# Hadamard, mode helpers
# ----------------------------------------------------------------------------------------------


def sylvester(n):
    h = np.ones((1, 1))
    while h.shape[0] < n:
        h = np.block([[h, h], [h, -h]])
    return h


def test_hadamard_matches_sylvester_matrix():
    x = np.random.default_rng(8).standard_normal((3, 4, 128))
    got = Q.hadamard(jnp.asarray(x, jnp.float32))
    want = x @ sylvester(128) / np.sqrt(128)
    err = np.abs(np.asarray(got, np.float64) - want).max()
    print(f"hadamard vs numpy f64: max |err| {err:.2e}")
    np.testing.assert_allclose(got, want, rtol=0, atol=1e-5)
    np.testing.assert_allclose(Q.hadamard(got), x, rtol=0, atol=1e-5)  # H/√n is an involution
    with pytest.raises(ValueError, match="power of 2"):
        Q.hadamard(jnp.zeros((2, 48)))


def test_mode_helpers():
    assert Q.QUANT_SIM_MODES == ("none", "fp8", "fp8_fp4")
    rng = np.random.default_rng(9)
    x = jnp.asarray(rng.standard_normal((2, 3, 192)).astype(np.float32))
    for helper in (Q.sim_act, Q.sim_weight, Q.sim_expert_weight, Q.sim_kv, Q.sim_indexer):
        y = x[..., :128] if helper is Q.sim_indexer else x
        assert helper(y, "none") is y
        with pytest.raises(ValueError, match="quant_sim"):
            helper(y, "fp16")
    equal(Q.sim_act(x, "fp8"), ref_fake(np.asarray(x), "fp8", 128)[0], "sim_act")
    kv = Q.sim_kv(x, "fp8", n_rope=64, block=64)
    equal(kv[..., 128:], x[..., 128:], "sim_kv rope dims untouched")
    equal(kv[..., :128], ref_fake(np.asarray(x[..., :128]), "fp8", 64)[0], "sim_kv nope dims")
    w_EIJ = x[:, :, :64].transpose(0, 2, 1)  # [E=2, in=64, out=3]
    want = np.swapaxes(ref_fake(np.swapaxes(np.asarray(w_EIJ), 1, 2), "fp4", 32)[0], 1, 2)
    equal(Q.sim_expert_weight(w_EIJ, "fp8_fp4"), want, "sim_expert_weight fp4 along in")
    equal(Q.sim_expert_weight(w_EIJ, "fp8"), Q.fake_quant_fp8_weight(w_EIJ, n_batch=1), "expert fp8")
    q = x[..., :128]
    equal(Q.sim_indexer(q, "fp8"), Q.fake_quant_fp8(Q.hadamard(q)), "sim_indexer fp8")
    s_fp4 = jnp.einsum("abd,abd->ab", Q.sim_indexer(q, "fp8_fp4"), Q.sim_indexer(q, "fp8_fp4"))
    rel = float(jnp.max(jnp.abs(s_fp4 / jnp.einsum("abd,abd->ab", q, q) - 1)))
    print(f"indexer q·q after Hadamard + FP4, max rel change {rel:.3f}")
    assert rel < 0.25  # rotated basis: scores survive the rotation, only the FP4 error remains


def test_config_field_lists_the_same_modes():
    """`ModelConfig.quant_sim` spells the modes inline (config.py stays jax-free); keep them in step."""
    import typing

    from deepseek_jax.config import ModelConfig

    hints = typing.get_type_hints(ModelConfig)
    if "quant_sim" not in hints:
        pytest.skip("ModelConfig.quant_sim not added yet")
    assert typing.get_args(hints["quant_sim"]) == Q.QUANT_SIM_MODES
    assert ModelConfig.__dataclass_fields__["quant_sim"].default == "none"
