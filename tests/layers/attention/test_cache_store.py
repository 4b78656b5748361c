"""Decode-cache storage formats (layers/attention/cache_store.py) against float64 numpy references,
the model's own fake-quant (store∘load exact on it), the release's bytes per token, and the V4 /
V4.1 configs' RoPE reach at 1M tokens."""

import dataclasses
import math
from pathlib import Path

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
import pytest

from deepseek_jax.config import ConfigError, RopeConfig, V4AttentionConfig
from deepseek_jax.config.loader import load_model_config
from deepseek_jax.layers.attention import V4Attention, init_v4_attention_cache
from deepseek_jax.layers.attention import cache_store as cs
from deepseek_jax.layers.rope import yarn_inv_freq
from deepseek_jax.models import build_cache
from deepseek_jax.quant import V4_KV_BLOCK, qat_v41, sim_indexer, sim_kv

CONFIGS = Path(__file__).resolve().parents[3] / "configs" / "model"


def rows(shape, seed=0, spread=(-14.0, 5.0)):
    """Random rows whose scale varies per 16 values over e^spread (floors and subnormal scales included)."""
    rng = np.random.default_rng(seed)
    x = rng.standard_normal(shape)
    mag = np.exp(rng.uniform(*spread, (*shape[:-1], -(-shape[-1] // 16))))
    return (x * np.repeat(mag, 16, axis=-1)[..., : shape[-1]]).astype(np.float32)


# ----------------------------------------------------------------------------------------------
# float64 numpy reference of the formats


def _grid(dtype):
    """(non-negative finite values, their codes) of a narrow float dtype, from all its bit patterns."""
    if dtype == "e2m1":
        return np.array(cs.E2M1_GRID), np.arange(8)
    v = np.arange(256, dtype=np.uint8).view(ml_dtypes.float8_e4m3fn).astype(np.float64)
    keep = np.isfinite(v) & (v >= 0) & ~np.signbit(v)
    return v[keep], np.arange(256)[keep]


def round_grid(y, dtype):
    """Round-to-nearest, ties to the even code, saturating at the largest value (float64)."""
    vals, codes = _grid(dtype)
    a = np.minimum(np.abs(y), vals.max())
    i = np.clip(np.searchsorted(vals, a), 1, len(vals) - 1)
    lo, hi = vals[i - 1], vals[i]
    up = (a - lo > hi - a) | ((a - lo == hi - a) & (codes[i] % 2 == 0))
    return np.sign(y) * np.where(up, hi, lo)


def ref_quant(x, block, code, scale):
    """float64 (x̂, s per block) of 1×block quantisation with a ue8m0 or e4m3 scale."""
    x = np.asarray(x, np.float64)
    N = x.shape[-1]
    W = -(-N // block)
    xb = np.pad(x, [(0, 0)] * (x.ndim - 1) + [(0, W * block - N)]).reshape(*x.shape[:-1], W, block)
    qmax = 448.0 if code == "e4m3" else 6.0
    amax = np.abs(xb).max(-1, keepdims=True)
    if scale == "ue8m0":
        s = 2.0 ** np.ceil(np.log2(np.maximum(amax, 1e-4 if code == "e4m3" else 6 * 2.0**-126) / qmax))
    else:
        s = round_grid(np.maximum(amax, 6 * 2.0**-9) / qmax, "e4m3")
    xq = round_grid(xb / s, code) * s
    return xq.reshape(*x.shape[:-1], -1)[..., :N], s[..., 0]


SPECS = {"fp8": (64, "e4m3", "ue8m0"), "mxfp8": (32, "e4m3", "ue8m0"), "fp4": (32, "e2m1", "ue8m0"),
         "nvfp4": (16, "e2m1", "e4m3")}


def ref_load_store(x, fmt, n_rope=0):
    block, code, scale = SPECS[fmt]
    H = x.shape[-1] - (n_rope if fmt == "fp8" else 0)
    xq, _ = ref_quant(x[..., :H], block, code, scale)
    rope = np.asarray(x[..., H:], np.float32).astype(ml_dtypes.bfloat16).astype(np.float64)
    return np.concatenate([xq, rope], -1)


# ----------------------------------------------------------------------------------------------
# Round trips


def _on_grid_cases():
    x512 = jnp.asarray(rows((2, 6, 512), seed=1))
    x64 = jnp.asarray(rows((3, 5, 64), seed=2))
    bf = lambda a: a.astype(jnp.bfloat16)  # noqa: E731  the release's compute dtype
    return [
        ("fp8 V4 kv (sim_kv, bf16)", "fp8", 64, sim_kv(bf(x512), "fp8_fp4", n_rope=64, block=V4_KV_BLOCK)),
        ("fp8 tiny kv (partial block)", "fp8", 16, sim_kv(bf(x64), "fp8_fp4", n_rope=16, block=V4_KV_BLOCK)),
        ("fp8 kv f32 rows on the bf16 grid", "fp8", 64,
         sim_kv(bf(x512).astype(jnp.float32), "fp8_fp4", n_rope=64, block=V4_KV_BLOCK)),
        ("mxfp8 V4.1 window", "mxfp8", 0, qat_v41(x512, "window")),
        ("nvfp4 V4.1 entries", "nvfp4", 0, qat_v41(x512, "entry")),
        ("fp4 V4.1 index keys", "fp4", 0, qat_v41(x512[..., :128], "index")),
        ("fp4 V4 index keys (sim_indexer)", "fp4", 0, sim_indexer(bf(x512[..., :128]), "fp8_fp4")),
        ("fp4 tiny index keys", "fp4", 0, sim_indexer(x64[..., :32], "fp8_fp4")),
    ]  # fmt: skip


@pytest.mark.parametrize("case", _on_grid_cases(), ids=lambda c: c[0])
def test_round_trip_exact_on_the_models_own_fake_quant(case):
    _, fmt, R, y = case
    stored = jax.jit(cs.store, static_argnums=(1, 2))(y, fmt, R)
    back = jax.jit(cs.load, static_argnums=1)(stored, y.dtype)
    assert back.dtype == y.dtype and back.shape == y.shape
    np.testing.assert_array_equal(np.asarray(back, np.float32), np.asarray(y, np.float32))
    assert all(a.dtype in (jnp.uint8, jnp.bfloat16) for a in jax.tree.leaves(stored))


def test_nvfp4_keeps_a_block_the_qat_scale_cannot_reproduce():
    """A raw block with amax = 9.6·2^-9: QAT scale e4m3(1.6·2^-9) = 2^-8 (subnormal), largest code 4;
    re-applying the QAT to that output moves it, storing it does not."""
    raw = np.linspace(-1, 1, 16) * 9.6 * 2.0**-9
    y = qat_v41(jnp.asarray(raw[None], jnp.float32), "entry")
    assert float(jnp.max(jnp.abs(y))) == 4 * 2.0**-8
    assert not np.array_equal(np.asarray(qat_v41(y, "entry")), np.asarray(y))  # QAT is not idempotent here
    np.testing.assert_array_equal(np.asarray(cs.load(cs.store(y, "nvfp4"))), np.asarray(y))


@pytest.mark.parametrize("fmt,X,R", [("fp8", 512, 64), ("fp8", 64, 16), ("fp8", 100, 0), ("mxfp8", 512, 0),
                                     ("mxfp8", 40, 0), ("fp4", 128, 0), ("fp4", 36, 0), ("nvfp4", 512, 0)])
def test_off_grid_rows_match_float64_reference(fmt, X, R):
    x = rows((2, 7, X), seed=X + R)
    got = np.asarray(cs.load(cs.store(jnp.asarray(x), fmt, R)), np.float64)
    want = ref_load_store(x, fmt, R)
    np.testing.assert_array_equal(got, want)  # same codes and scales as the float64 reference
    block, code, scale = SPECS[fmt]
    H = X - (R if fmt == "fp8" else 0)
    _, s = ref_quant(x[..., :H], block, code, scale)
    s_N = np.repeat(s, block, -1)[..., :H]
    err, ax = np.abs(got[..., :H] - x[..., :H]), np.abs(x[..., :H])
    if code == "e4m3":  # half a step: 2^-4 relative (normal codes), 2^-10·s (subnormal codes)
        bound = np.maximum(2.0**-4 * ax, 2.0**-10 * s_N)
    else:  # e2m1: a quarter of max(|x|, s), plus saturation beyond 6·s (nvfp4's rounded scale)
        bound = 0.25 * np.maximum(ax, s_N) + np.maximum(ax - 6 * s_N, 0)
    assert np.all(err <= bound * (1 + 1e-12))
    np.testing.assert_allclose(got[..., H:], x[..., H:], rtol=2.0**-8, atol=0)  # bf16 RoPE dims: half an ulp


def test_float_formats():
    x = jnp.asarray(rows((2, 3, 8)))
    f, b = cs.store(x, "float"), cs.store(x, "bf16")
    assert f is x and b.dtype == jnp.bfloat16  # plain arrays
    np.testing.assert_array_equal(np.asarray(cs.load(f)), np.asarray(x))
    np.testing.assert_array_equal(np.asarray(cs.load(b, jnp.float32)), np.asarray(x.astype(jnp.bfloat16), np.float32))


def test_packed_bytes_layout():
    """e2m1: low nibble = even dim, bit 3 = sign; ue8m0 byte = 127 + log2 s; e4m3 bytes as ml_dtypes."""
    x = np.zeros((1, 1, 32), np.float32)
    x[0, 0, :4] = [0.5, -6.0, 3.0, -0.0]
    st = cs.store(jnp.asarray(x), "fp4")
    assert st.codes.shape == (1, 1, 16) and st.scales.shape == (1, 1, 1)
    assert int(st.scales[0, 0, 0]) == 127  # amax 6 -> s = 1
    assert int(st.codes[0, 0, 0]) == 1 | (15 << 4) and int(st.codes[0, 0, 1]) == 5 | (8 << 4)
    y = rows((1, 2, 128), seed=5)
    st8 = cs.store(jnp.asarray(y), "fp8", 64)
    _, s = ref_quant(y[..., :64], 64, "e4m3", "ue8m0")
    np.testing.assert_array_equal(np.asarray(st8.scales), 127 + np.log2(s))
    codes = (y[..., :64] / np.repeat(s, 64, -1)).astype(ml_dtypes.float8_e4m3fn).view(np.uint8)
    np.testing.assert_array_equal(np.asarray(st8.codes), codes)


# ----------------------------------------------------------------------------------------------
# Writes


@pytest.mark.parametrize("fmt,R", [("float", 0), ("fp8", 16), ("mxfp8", 0), ("fp4", 0), ("nvfp4", 0)])
def test_write_and_write_at(fmt, R):
    B, S, T, X = 2, 9, 3, 64
    base, new = rows((B, S, X), seed=3), rows((B, T, X), seed=4)
    cache = cs.store(jnp.asarray(base), fmt, R)
    want = np.asarray(cs.load(cache)).copy()
    new_rows = np.asarray(cs.load(cs.store(jnp.asarray(new), fmt, R)))
    got = jax.jit(cs.write)(cache, jnp.asarray(new), jnp.int32(4))  # traced index
    w = want.copy()
    w[:, 4:7] = new_rows
    np.testing.assert_array_equal(np.asarray(cs.load(got)), w)
    assert type(got) is type(cache) and jax.tree.map(lambda a: a.shape, got) == jax.tree.map(lambda a: a.shape, cache)
    # already stored rows, and slots: [T] shared (−1 and S dropped), [B, T] per row
    got = cs.write_at(cache, cs.store(jnp.asarray(new), fmt, R), jnp.array([8, -1, S]))
    w = want.copy()
    w[:, 8] = new_rows[:, 0]
    np.testing.assert_array_equal(np.asarray(cs.load(got)), w)
    slots = np.array([[0, 5, 2], [7, -1, 1]])
    got = jax.jit(cs.write_at)(cache, jnp.asarray(new), jnp.asarray(slots))
    w = want.copy()
    for b in range(B):
        for t in range(T):
            if slots[b, t] >= 0:
                w[b, slots[b, t]] = new_rows[b, t]
    np.testing.assert_array_equal(np.asarray(cs.load(got)), w)


@pytest.mark.parametrize("fmt,X,R", [(f, X, R) for f in cs.FORMATS for X, R in [(512, 64), (64, 16), (128, 0)]])
def test_empty_and_nbytes_per_row(fmt, X, R):
    e = cs.empty((2, 5), X, fmt, R, jnp.float32)
    np.testing.assert_array_equal(np.asarray(cs.load(e)), np.zeros((2, 5, X)))
    leaves = jax.tree.leaves(jax.eval_shape(lambda: cs.store(jnp.zeros((1, 1, X)), fmt, R)))
    assert cs.nbytes_per_row(fmt, X, R) == sum(a.size * a.dtype.itemsize for a in leaves)


def test_release_row_bytes():
    assert cs.nbytes_per_row("fp8", 512, 64) == 583  # FlashMLA V4 token 584 with its pad byte
    assert cs.nbytes_per_row("fp4", 128) == 68  # V4 / V4.1 indexer key
    assert cs.nbytes_per_row("nvfp4", 512) == 288  # V4.1 entry
    assert cs.nbytes_per_row("mxfp8", 512) == 528  # V4.1 window row
    assert cs.nbytes_per_row("bf16", 512) == 1024 and cs.nbytes_per_row("float", 512, 0, jnp.float32) == 2048


def test_bad_input_names_the_field():
    x = jnp.zeros((1, 2, 6))
    with pytest.raises(ValueError, match="cache storage format must be one of"):
        cs.store(x, "int8")
    with pytest.raises(ValueError, match="n_rope \\(7\\) must be in"):
        cs.store(x, "fp8", 7)
    with pytest.raises(ValueError, match="row width 5 must be even"):
        cs.store(jnp.zeros((1, 2, 5)), "fp4")
    with pytest.raises(TypeError, match="not a stored row block"):
        cs.load((x,))


# ----------------------------------------------------------------------------------------------
# Model cache sizes and YaRN reach


def cfg_of(name, *overrides):
    return load_model_config([CONFIGS / f"{name}.yaml"], list(overrides))


@pytest.mark.parametrize("name,per_token,window", [
    ("deepseek_v4_flash", 3471, 43 * 128 * 576),  # reference §1.12: ≈ 3.47 KB, ≈ 3.0 MiB fixed
    ("deepseek_v4_pro", 4970, 61 * 128 * 576),  # ≈ 4.97 KB, ≈ 4.3 MiB
    ("deepseek_v41_flash", 890, 2.7e6),  # V4.1 reference §1.12: 890 B, ≈ 2.7 MB
])  # fmt: skip
def test_released_cache_bytes_match_the_references(name, per_token, window):
    got = cs.cache_bytes_per_token(cfg_of(name), "released")
    assert abs(got.per_token / per_token - 1) < 0.05 and abs(got.window / window - 1) < 0.05
    if name == "deepseek_v4_flash":  # the docstring's derivation
        assert got.per_token == 21 * (583 + 68) / 4 + 20 * 583 / 128 and got.window == 43 * 128 * 583
        assert got.state == 21 * (49152 + 12288) + 20 * 524288
    if name == "deepseek_v41_flash":
        assert got.per_token == 890 and got.window == 40 * 128 * 528


def test_bf16_and_float_cache_bytes():
    flash = cfg_of("deepseek_v4_flash")
    bf16 = cs.cache_bytes_per_token(flash, "bf16")
    assert bf16.per_token == 21 * (1024 + 256) / 4 + 20 * 1024 / 128 and bf16.window == 43 * 128 * 1024
    f32 = cs.cache_bytes_per_token(cfg_of("deepseek_v4_flash", "model.dtype=float32"), "float")
    assert f32.per_token == 2 * bf16.per_token
    assert cs.cache_bytes_per_token(flash, "released", mtp=True).window == 44 * 128 * 583
    v41 = cs.cache_bytes_per_token(cfg_of("deepseek_v41_flash"), "bf16")
    assert v41.per_token == 3 * (1024 + 256) / 2 + (1024 + 256)


def test_cache_storage_config_errors():
    with pytest.raises(ValueError, match="model.cache_storage must be one of"):
        cs.cache_bytes_per_token(cfg_of("tiny_v4"), "fp8")
    with pytest.raises(ValueError, match="needs a V4 / V4.1 model"):
        cs.cache_bytes_per_token(cfg_of("tiny"), "bf16")
    with pytest.raises(ConfigError, match="cache_storage is wired for V4 models only"):
        cfg_of("tiny", "model.cache_storage=bf16")
    with pytest.raises(ConfigError, match="cache_storage"):
        cfg_of("tiny_v4", "model.cache_storage=fp8")
    assert cfg_of("tiny_v4", "model.cache_storage=released").cache_storage == "released"


@pytest.mark.parametrize("name", ["deepseek_v4_flash", "deepseek_v4_pro", "deepseek_v41_flash"])
def test_yarn_reaches_one_million_tokens(name):
    """CSA/HCA RoPE: θ 160000, YaRN ×16 over 65536 (ramp over pair indices 15…25) = 1,048,576 tokens,
    and the slowest rotation's period exceeds it (without YaRN it would not)."""
    cfg = cfg_of(name)
    r, R, theta = cfg.rope, cfg.v4.rope_head_dim, cfg.v4.compress_rope_theta
    assert cfg.max_seq_len == 1_048_576 and r.rope_factor * r.original_seq_len >= 1_048_576
    assert (theta, r.rope_factor, r.original_seq_len, r.beta_fast, r.beta_slow) == (160000.0, 16.0, 65536, 32.0, 1.0)
    corr = lambda b: R * math.log(65536 / (2 * math.pi * b)) / (2 * math.log(theta))  # noqa: E731
    low, high = math.floor(corr(32)), math.ceil(corr(1))
    assert (low, high) == (15, 25)
    base = theta ** -(np.arange(0, R, 2) / R)
    ramp = np.clip((np.arange(R // 2) - low) / (high - low), 0, 1)
    want = base / 16 * ramp + base * (1 - ramp)
    got = yarn_inv_freq(R, theta, r.rope_factor, r.original_seq_len, r.beta_fast, r.beta_slow)
    np.testing.assert_allclose(got, want, rtol=1e-6)
    assert 2 * math.pi / got.min() > 1_048_576 > 2 * math.pi / base.min()


@pytest.mark.parametrize("fmt,R", [("fp8", 16), ("nvfp4", 0), ("fp4", 0)])
def test_gather_and_rows_slice_then_load(fmt, R):
    x = rows((2, 10, 64), seed=7)
    st = cs.store(jnp.asarray(x), fmt, R)
    full = np.asarray(cs.load(st))
    idx = np.array([[[0, 9], [3, 3], [5, 1]], [[8, 2], [0, 0], [7, 4]]])  # [B, T, U]
    got = jax.jit(cs.gather)(st, jnp.asarray(idx))
    np.testing.assert_array_equal(np.asarray(cs.load(got)), full[np.arange(2)[:, None, None], idx])
    np.testing.assert_array_equal(np.asarray(cs.load(cs.rows_slice(st, jnp.int32(3), 4))), full[:, 3:7])


def test_bare_arrays_are_float_rows():
    """Today's plain-array caches go through the same calls unchanged."""
    cache = jnp.asarray(rows((2, 6, 8), seed=8))
    new = jnp.asarray(rows((2, 2, 8), seed=9))
    assert cs.format_of(cache) == ("float", 0)
    np.testing.assert_array_equal(np.asarray(cs.load(cache, jnp.bfloat16)), np.asarray(cache.astype(jnp.bfloat16)))
    want = np.asarray(cache).copy()
    want[:, 1:3] = np.asarray(new)
    np.testing.assert_array_equal(np.asarray(cs.write(cache, new, 1)), want)
    want = np.asarray(cache).copy()
    want[:, 5] = np.asarray(new)[:, 1]
    np.testing.assert_array_equal(np.asarray(cs.write_at(cache, new, jnp.array([-1, 5]))), want)
    got = cs.gather(cache, jnp.zeros((2, 1, 1), jnp.int32))
    np.testing.assert_array_equal(np.asarray(got), np.asarray(cache)[:, :1, None])


# ----------------------------------------------------------------------------------------------
# Wired into the V4 decode cache (model.cache_storage)

V4CFG = V4AttentionConfig(
    n_heads=4, head_dim=32, rope_head_dim=8, q_lora_rank=24, o_groups=2, o_lora_rank=12, window_size=8,
    index_n_heads=4, index_head_dim=16, index_topk=3,
)  # fmt: skip


def _decode_v4(model, params, x, formats, chunks):
    B, T, _ = x.shape
    cache = init_v4_attention_cache(V4CFG, model.compress_ratio, B, T, jnp.bfloat16, formats)
    step = jax.jit(lambda p, x, pos, c, i: model.apply({"params": p}, x, pos, c, i))
    outs, start = [], 0
    for n in chunks:
        pos = jnp.broadcast_to(start + jnp.arange(n), (B, n))
        out, cache = step(params, x[:, start : start + n], pos, cache, jnp.int32(start))
        outs.append(np.asarray(out, np.float32))
        start += n
    return np.concatenate(outs, axis=1), cache


@pytest.mark.slow  # 25-60 s each on a loaded 2-core CPU (a dozen small compiles)
@pytest.mark.parametrize("ratio", [0, 4, 8])
def test_released_storage_decodes_exactly_like_plain_rows(ratio):
    """quant_sim fp8_fp4 in bf16 (the release's numerics): the fp8 window / entries and fp4 indexer
    keys hold the rows the plain bf16 cache holds, so every chunk's output is identical."""
    rope = RopeConfig(rope_theta=160000.0, rope_factor=4.0, original_seq_len=32) if ratio else RopeConfig()
    model = V4Attention(V4CFG, rope, ratio, 64, 1e-6, jnp.bfloat16, quant_sim="fp8_fp4")
    x = jnp.asarray(np.random.default_rng(ratio).standard_normal((2, 24, 64)), jnp.bfloat16)
    params = jax.jit(model.init)(jax.random.key(ratio), x, jnp.broadcast_to(jnp.arange(24), (2, 24)))["params"]
    chunks = (11, 10, 1, 1, 1)
    plain, plain_cache = _decode_v4(model, params, x, cs.PLAIN, chunks)
    released = cs.LayerFormats("fp8", "fp8", "fp4")
    got, cache = _decode_v4(model, params, x, released, chunks)
    np.testing.assert_array_equal(got, plain)
    assert isinstance(cache.window, cs.Fp8Rows) and cache.window.codes.dtype == jnp.uint8
    if ratio == 4:
        assert isinstance(cache.entries, cs.Fp8Rows) and isinstance(cache.index_keys, cs.Fp4Rows)
        keys = np.asarray(plain_cache.index_keys, np.float32)
        np.testing.assert_array_equal(np.asarray(cs.load(cache.index_keys)), keys)
    if ratio:
        np.testing.assert_array_equal(np.asarray(cs.load(cache.entries)), np.asarray(plain_cache.entries, np.float32))


def test_model_cache_follows_cache_storage():
    cfg = cfg_of("tiny_v4", "model.cache_storage=released")
    leaves = jax.tree.leaves(build_cache(cfg, 1, 64))
    assert {str(a.dtype) for a in leaves} == {"uint8", "bfloat16", "float32"}
    with pytest.raises(ConfigError, match="cache_storage is not wired for V4.1"):
        cfg_of("tiny_v41", "model.cache_storage=released")


# ----------------------------------------------------------------------------------------------
# Stored rows read where used (v4_stream.py): per key chunk, or gathered at the picks, then loaded


def _stream_inputs(Z=16, seed=0):
    """A decode-like query block (positions 60…65) over stored entries ("fp8") and indexer keys ("fp4")."""
    rng = np.random.default_rng(seed)
    B, T, N, X, R, P, Y, w = 2, 6, 2, 32, 8, 2, 16, 4
    bf = lambda *s: jnp.asarray(rng.standard_normal(s), jnp.bfloat16)  # noqa: E731
    pos = jnp.asarray(np.broadcast_to(60 + np.arange(T), (B, T)), jnp.int32)
    q = dict(q_BTNX=bf(B, T, N, X), slots_BTU=jnp.asarray(rng.integers(-1, w + T, (B, T, w)), jnp.int32),
             positions_BT=pos, seg_BT=jnp.zeros((B, T), jnp.int32))
    entries = cs.store(jnp.asarray(rows((B, Z, X), seed=seed + 1)), "fp8", R)
    ik = cs.store(jnp.asarray(rows((B, Z, Y), seed=seed + 2)), "fp4")
    k = dict(source_BSX=bf(B, w + T, X), sseg_BS=jnp.zeros((B, w + T), jnp.int32), entries_BZX=entries,
             eseg_BZ=jnp.zeros((B, Z), jnp.int32))
    index = dict(iq_BTPY=bf(B, T, P, Y), iw_BTP=jnp.asarray(rng.random((B, T, P)), jnp.float32), ik_BZY=ik)
    return q, k, index, jnp.asarray(rng.standard_normal(N), jnp.float32)


@pytest.mark.parametrize("k_block", [0, 5, 16])  # 5: a ragged last chunk of stored rows
def test_stored_entries_and_keys_read_per_chunk_equal_loaded_rows(k_block):
    """hca / csa attention on stored rows equal the same calls on the whole rows loaded first (the
    previous path), exactly: outputs, the CSA picks (also = indexer.entry_picks) and the indexer KL."""
    from deepseek_jax.layers.attention.indexer import entry_picks
    from deepseek_jax.layers.attention.v4_stream import csa_attention, hca_attention

    q, k, index, sink = _stream_inputs()
    loaded = lambda d: {n: cs.load(a, jnp.bfloat16) if n in ("entries_BZX", "ik_BZY") else a for n, a in d.items()}  # noqa: E731
    hca = jax.jit(lambda q, k: hca_attention(**q, **k, sink_N=sink, scale=32**-0.5, m=8, k_block=k_block))
    np.testing.assert_array_equal(np.asarray(hca(q, k), np.float32), np.asarray(hca(q, loaded(k)), np.float32))
    csa = jax.jit(lambda q, k, i: csa_attention(**q, **i, **k, sink_N=sink, scale=32**-0.5, topk=3,
                                                k_block=k_block, with_loss=True))
    got, want = csa(q, k, index), csa(q, loaded(k), loaded(index))
    for g, r in zip(got, want):
        np.testing.assert_array_equal(np.asarray(g, np.float32), np.asarray(r, np.float32))
    li = loaded(index)
    picks = entry_picks(li["iq_BTPY"], li["iw_BTP"], li["ik_BZY"], q["positions_BT"], q["seg_BT"], k["eseg_BZ"],
                        topk=3, k_block=k_block)
    np.testing.assert_array_equal(np.asarray(got[1]), np.asarray(picks))
    assert (np.asarray(got[1]) >= 0).sum() > 0


def test_scan_keys_splits_stored_row_pytrees():
    """stream.scan_keys hands the body each chunk as the same pytree (leaves split on axis 1, ragged
    chunk zero-padded and flagged dead): the sum of the loaded rows equals the float64 one."""
    from deepseek_jax.layers.attention import stream

    x = rows((2, 11, 64), seed=3)
    st = cs.store(jnp.asarray(x), "fp8", 16)
    body = lambda c, s_K, live_K, r: c + jnp.sum(jnp.where(live_K[:, None], cs.load(r), 0.0), axis=1)  # noqa: E731
    got = stream.scan_keys(body, jnp.zeros((2, 64)), 4, (st,))
    np.testing.assert_allclose(np.asarray(got), np.asarray(cs.load(st), np.float64).sum(1), rtol=1e-6, atol=1e-6)


@pytest.mark.multidevice
def test_stored_keys_pass_through_context_parallel():
    """over_query_blocks on the cp mesh (8 devices): stored entries (a NamedTuple of [B, Z, ·] leaves,
    all-gathered leaf by leaf) give the single-device HCA output."""
    from deepseek_jax.config import load_config
    from deepseek_jax.layers.attention.core import over_query_blocks
    from deepseek_jax.layers.attention.v4_stream import hca_attention
    from deepseek_jax.sharding import activate, make_mesh, rules
    from tests.utils import ROOT, TOL, assert_close

    q, k, _, sink = _stream_inputs(Z=16)
    seen = []

    def fn(q, k):  # jitted twice: the mesh in force is read when tracing
        def hca(*a):
            seen.append(a[0].shape[1])
            return hca_attention(*a, sink_N=sink, scale=32**-0.5, m=8, k_block=5)

        return over_query_blocks(hca, 4, *q, keys=k)

    q, k = tuple(q.values()), tuple(k.values())  # in hca_attention's order (a dict would be sorted)
    want = jax.jit(fn)(q, k)
    cfg = load_config([ROOT / "configs/model/tiny.yaml", ROOT / "configs/mesh/cp.yaml"]).mesh
    with activate(make_mesh(cfg), rules(cfg)):
        got = jax.jit(fn)(q, k)
    assert seen == [4, 2], seen  # one device: blocks of 4 of T = 6; cp = 8: T padded to 16, 2 queries a shard
    assert_close(np.asarray(got, np.float32), np.asarray(want, np.float32), **TOL["resharded_f32"], what="hca on cp")


def _decode_step_temp(ratio, formats, L, dtype=jnp.float32):
    model = V4Attention(dataclasses.replace(V4CFG, k_block=256), RopeConfig(rope_theta=160000.0, rope_factor=4.0,
                        original_seq_len=32), ratio, 64, 1e-6, dtype, quant_sim="fp8_fp4")
    x8 = jnp.zeros((1, 8, 64), dtype)
    params = jax.eval_shape(lambda: model.init(jax.random.key(0), x8, jnp.arange(8)[None]))["params"]
    cache = jax.eval_shape(lambda: init_v4_attention_cache(model.cfg, ratio, 1, L, dtype, formats))
    step = jax.jit(lambda p, x, pos, c, i: model.apply({"params": p}, x, pos, c, i))
    args = (params, x8[:, :1], jnp.zeros((1, 1), jnp.int32), cache, jnp.int32(0))
    return step.lower(*args).compile().memory_analysis().temp_size_in_bytes


@pytest.mark.slow  # four decode-step compiles (~3 s each)
@pytest.mark.parametrize("ratio", [4, 8])
def test_released_decode_step_holds_no_dequantised_cache_copy(ratio):
    """A 1-token decode step at a 131072-token cache: compiled temp memory with released storage is below
    both the float-storage step's and one whole dequantised copy of the entries (+ indexer keys). f32
    compute (XLA:CPU upcasts bf16 buffers, which would blur the comparison). Measured (CSA / HCA):
    released 1.39 / 1.14 MB, float 2.28 / 2.25 MB, dequantised copy 6.29 / 2.10 MB; loading the whole
    stored rows first (the previous path) took 5.26 / 4.27 MB."""
    L = 131072
    Z = L // ratio
    copy = Z * (V4CFG.head_dim + (V4CFG.index_head_dim if ratio == 4 else 0)) * 4
    released = _decode_step_temp(ratio, cs.LayerFormats("fp8", "fp8", "fp4"), L)
    plain = _decode_step_temp(ratio, cs.PLAIN, L)
    assert released < plain and released < copy, (released, plain, copy)
