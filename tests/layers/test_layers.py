"""Norms, RoPE + YaRN and SwiGLU against independent float64 numpy references."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from deepseek_jax.layers.mlp import MLP, swiglu
from deepseek_jax.layers.norms import RMSNorm, rms_norm
from deepseek_jax.layers.rope import apply_rope, rope_cos_sin, yarn_inv_freq, yarn_mscale
from tests.utils import TOL, assert_close

pytestmark = pytest.mark.usefixtures("highest_precision")  # tests/layers/conftest.py


def rng(seed=0):
    return np.random.default_rng(seed)


# ----------------------------------------------------------------------------------------------
# RMSNorm


def np_rms_norm(x, scale, eps):
    x = x.astype(np.float64)
    return scale.astype(np.float64) * x / np.sqrt(np.mean(x * x, axis=-1, keepdims=True) + eps)


@pytest.mark.parametrize("shape", [(16,), (5, 16), (2, 3, 16), (2, 1, 3, 8)], ids=str)
def test_rms_norm_matches_numpy(shape):
    r = rng(1)
    x = (r.standard_normal(shape) * 3 + 0.5).astype(np.float32)
    scale = r.uniform(0.5, 1.5, shape[-1]).astype(np.float32)
    got = jax.jit(rms_norm, static_argnums=2)(x, scale, 1e-6)
    assert got.dtype == jnp.float32 and got.shape == shape
    assert_close(got, np_rms_norm(x, scale, 1e-6), **TOL["layer_f32"], what="rms_norm")


def test_rms_norm_eps_matters():
    x = np.full((1, 4), 1e-3, np.float32)  # mean(x^2) = 1e-6: eps = 1e-6 halves the variance term
    got = rms_norm(x, np.ones(4, np.float32), 1e-6)
    assert_close(got, np_rms_norm(x, np.ones(4), 1e-6), **TOL["layer_f32"], what="rms_norm eps")
    assert abs(float(got[0, 0]) - 1 / math.sqrt(2)) < 1e-5


def test_rms_norm_bf16_in_bf16_out():
    r = rng(2)
    x = r.standard_normal((3, 4, 32)).astype(np.float32)
    scale = r.uniform(0.5, 1.5, 32).astype(np.float32)
    got = rms_norm(jnp.asarray(x, jnp.bfloat16), jnp.asarray(scale), 1e-6)
    assert got.dtype == jnp.bfloat16
    want = np_rms_norm(np.asarray(jnp.asarray(x, jnp.bfloat16), np.float64), scale, 1e-6)
    assert_close(got, want, **TOL["bf16"], what="rms_norm bf16")


def test_rms_norm_module_casts_to_compute_dtype():
    x = rng(3).standard_normal((2, 3, 8)).astype(np.float32)
    norm = RMSNorm(8, 1e-6, dtype=jnp.bfloat16)
    variables = norm.init(jax.random.key(0), x)
    assert variables["params"]["scale"].value.dtype == jnp.float32  # params stay f32
    got = norm.apply(variables, x)
    assert got.dtype == jnp.bfloat16
    assert_close(got, np_rms_norm(x, np.ones(8), 1e-6), **TOL["bf16"], what="RMSNorm bf16")


# ----------------------------------------------------------------------------------------------
# YaRN frequencies (DeepSeek-V3 inference/model.py precompute_freqs_cis, re-derived here)


def np_plain_inv_freq(dim, theta):
    return np.array([1.0 / theta ** (2 * i / dim) for i in range(dim // 2)], np.float64)


def np_yarn_inv_freq(dim, theta, factor, orig_len, beta_fast, beta_slow):
    def correction_dim(n_rot):
        return dim * math.log(orig_len / (n_rot * 2 * math.pi)) / (2 * math.log(theta))

    low = max(math.floor(correction_dim(beta_fast)), 0)
    high = min(math.ceil(correction_dim(beta_slow)), dim - 1)
    if low == high:
        high += 0.001
    inv = np_plain_inv_freq(dim, theta)
    out = np.empty(dim // 2)
    for i in range(dim // 2):
        ramp = min(max((i - low) / (high - low), 0.0), 1.0)
        smooth = 1 - ramp
        out[i] = inv[i] / factor * (1 - smooth) + inv[i] * smooth
    return out, low, high


@pytest.mark.parametrize("dim,theta", [(16, 10000.0), (64, 10000.0), (8, 500.0)])
def test_yarn_inv_freq_factor_one_is_plain_rope(dim, theta):
    got = yarn_inv_freq(dim, theta, 1.0)
    assert got.shape == (dim // 2,)
    assert_close(got, np_plain_inv_freq(dim, theta), rtol=1e-6, atol=0, what="plain inv_freq")


YARN_CASES = {
    "v3_671b": (64, 10000.0, 40.0, 4096, 32.0, 1.0),  # the released DeepSeek-V3 setting
    "tiny": (16, 10000.0, 4.0, 256, 32.0, 1.0),  # configs/model/tiny.yaml
    "short_ctx": (32, 10000.0, 8.0, 32, 32.0, 1.0),
    "low_eq_high": (8, 10000.0, 4.0, 4, 32.0, 1.0),  # floor == ceil: the zero-width-ramp guard
}


@pytest.mark.parametrize("case", sorted(YARN_CASES))
def test_yarn_inv_freq_matches_numpy(case):
    dim, theta, factor, orig, bf, bs = YARN_CASES[case]
    want, low, high = np_yarn_inv_freq(dim, theta, factor, orig, bf, bs)
    got = yarn_inv_freq(dim, theta, factor, orig, bf, bs)
    assert got.dtype == np.float32
    assert_close(got, want, rtol=1e-6, atol=0, what=f"yarn inv_freq {case}")
    if case == "low_eq_high":
        assert math.isclose(high - low, 0.001), (low, high)
    # Not vacuous: the fastest dims keep their frequency, the slowest are divided by the factor.
    plain = np_plain_inv_freq(dim, theta)
    assert np.isclose(got[0], plain[0], rtol=1e-6)
    assert np.isclose(got[-1], plain[-1] / factor, rtol=1e-6)


def test_yarn_inv_freq_v3_ramp_endpoints():
    # V3: correction dims 10.47 (beta_fast) and 22.51 (beta_slow) give low = 10, high = 23.
    _, low, high = np_yarn_inv_freq(64, 10000.0, 40.0, 4096, 32.0, 1.0)
    assert (low, high) == (10, 23)
    got, plain = yarn_inv_freq(64, 10000.0, 40.0, 4096), np_plain_inv_freq(64, 10000.0)
    np.testing.assert_allclose(got[: low + 1], plain[: low + 1], rtol=1e-6)
    np.testing.assert_allclose(got[high:], plain[high:] / 40, rtol=1e-6)
    mid = got[low + 1 : high] / plain[low + 1 : high]
    assert np.all((mid < 1) & (mid > 1 / 40)) and np.all(np.diff(mid) < 0)


@pytest.mark.parametrize(
    "factor,mscale,want",
    [
        (40.0, 1.0, 0.1 * math.log(40) + 1),
        (40.0, 0.707, 0.1 * 0.707 * math.log(40) + 1),
        (4.0, 1.0, 0.1 * math.log(4) + 1),
        (1.0, 1.0, 1.0),
        (0.5, 1.0, 1.0),
    ],
)
def test_yarn_mscale(factor, mscale, want):
    assert yarn_mscale(factor, mscale) == pytest.approx(want, rel=1e-12)


# ----------------------------------------------------------------------------------------------
# RoPE on interleaved pairs


def np_rope(x, positions, inv_freq, scale=1.0):
    """(x[2i] + i x[2i+1]) * scale * e^{i pos inv_freq_i}, back to interleaved reals; float64."""
    x = x.astype(np.float64)
    z = x[..., 0::2] + 1j * x[..., 1::2]
    angles = positions.astype(np.float64)[..., None] * inv_freq.astype(np.float64)
    z = z * scale * np.exp(1j * angles)
    out = np.empty_like(x)
    out[..., 0::2], out[..., 1::2] = z.real, z.imag
    return out


@jax.jit
def _rope_bt(x_BTNR, positions_BT, inv_freq):
    cos, sin = rope_cos_sin(positions_BT, inv_freq)
    return apply_rope(x_BTNR, cos[:, :, None], sin[:, :, None])


def test_apply_rope_matches_complex_reference():
    r = rng(4)
    B, T, N, R = 2, 6, 3, 16
    x = r.standard_normal((B, T, N, R)).astype(np.float32)
    positions = r.integers(0, 32, (B, T))  # small: f32 angles carry ~pos*6e-8 rad of error
    inv_freq = yarn_inv_freq(R, 10000.0, 4.0, 16)
    got = _rope_bt(x, positions, inv_freq)
    want = np_rope(x, positions[:, :, None], inv_freq)
    assert_close(got, want, **TOL["layer_f32"], what="apply_rope")
    # not the identity, and not a de-interleaved (rotate_half) layout
    assert np.abs(np.asarray(got) - x).max() > 0.1


def test_rope_cos_sin_scale_multiplies_output():
    r = rng(5)
    x = r.standard_normal((4, 8)).astype(np.float32)
    positions, inv_freq = np.arange(4), yarn_inv_freq(8, 10000.0)
    cos, sin = rope_cos_sin(jnp.asarray(positions), inv_freq, scale=1.3)
    got = apply_rope(x, cos, sin)
    assert_close(got, np_rope(x, positions, inv_freq, 1.3), **TOL["layer_f32"], what="scaled rope")


def test_rope_preserves_pair_norms():
    r = rng(6)
    x = r.standard_normal((3, 5, 2, 16)).astype(np.float32)
    positions = r.integers(0, 1000, (3, 5))
    got = np.asarray(_rope_bt(x, positions, yarn_inv_freq(16, 10000.0)), np.float64)
    pair_norm = lambda a: np.hypot(a[..., 0::2], a[..., 1::2])
    assert_close(pair_norm(got), pair_norm(x.astype(np.float64)), **TOL["layer_f32"], what="norms")


def test_rope_dot_product_depends_only_on_offset():
    r = rng(7)
    q, k = r.standard_normal((2, 16)).astype(np.float32)
    inv_freq = yarn_inv_freq(16, 10000.0, 4.0, 16)

    @jax.jit
    def scores(m, n):  # <rope(q, m), rope(k, n)> for vectors of positions m, n
        cos_m, sin_m = rope_cos_sin(m, inv_freq)
        cos_n, sin_n = rope_cos_sin(n, inv_freq)
        q_m = apply_rope(jnp.broadcast_to(q, (m.size, 16)), cos_m, sin_m)
        k_n = apply_rope(jnp.broadcast_to(k, (n.size, 16)), cos_n, sin_n)
        return jnp.sum(q_m * k_n, axis=-1)

    score = lambda m, n: float(scores(jnp.array([m]), jnp.array([n]))[0])

    m = jnp.array([3, 5, 11, 20, 37])
    same_offset = np.asarray(scores(m, m - 3))
    np.testing.assert_allclose(same_offset, same_offset[0], rtol=1e-5, atol=1e-5)
    assert abs(score(5, 2) - score(5, 4)) > 1e-2  # the offset itself does change the score
    assert abs(score(2, 5) - score(5, 2)) > 1e-2  # and its sign (rotation direction)


def test_apply_rope_keeps_bf16():
    x = jnp.asarray(rng(8).standard_normal((2, 8)), jnp.bfloat16)
    cos, sin = rope_cos_sin(jnp.arange(2), yarn_inv_freq(8, 10000.0))
    assert apply_rope(x, cos, sin).dtype == jnp.bfloat16


# ----------------------------------------------------------------------------------------------
# SwiGLU


def np_swiglu(x, w_gate, w_up, w_down):
    x, w_gate, w_up, w_down = (a.astype(np.float64) for a in (x, w_gate, w_up, w_down))
    gate, up = x @ w_gate, x @ w_up
    return (gate / (1 + np.exp(-gate)) * up) @ w_down


def test_swiglu_matches_numpy():
    r = rng(9)
    B, T, D, F = 2, 5, 8, 12
    x = r.standard_normal((B, T, D)).astype(np.float32)
    ws = [
        (r.standard_normal(s) / np.sqrt(s[0])).astype(np.float32) for s in [(D, F), (D, F), (F, D)]
    ]
    got = jax.jit(swiglu)(x, *ws)
    assert_close(got, np_swiglu(x, *ws), **TOL["layer_f32"], what="swiglu")


def test_mlp_module_matches_numpy():
    x = rng(10).standard_normal((2, 3, 8)).astype(np.float32)
    mlp = MLP(8, 12, dtype=jnp.float32)
    params = jax.jit(mlp.init)(jax.random.key(0), x)["params"]
    shapes = {k: v.value.shape for k, v in params.items()}
    assert shapes == {"w_gate": (8, 12), "w_up": (8, 12), "w_down": (12, 8)}
    assert params["w_down"].names == ("mlp", "embed")  # logical axes travel with the parameter
    got = jax.jit(mlp.apply)({"params": params}, x)
    want = np_swiglu(x, *(np.asarray(params[k].value) for k in ("w_gate", "w_up", "w_down")))
    assert_close(got, want, **TOL["layer_f32"], what="MLP")
