"""FP8 / FP4 quantisation simulation ("fake quant": quantise, then dequantise) of the numerics of the
released DeepSeek models. Real checkpoint tensors (numpy) are in `convert/formats.py`.

Formats: e4m3 (`float8_e4m3fn`, max 448, no inf), e2m1 (`float4_e2m1fn`, grid ±{0, .5, 1, 1.5, 2, 3,
4, 6}), e8m0 (`float8_e8m0fnu`, a bare exponent byte b: 2^(b-127), b = 255 is NaN).
Blocks of Z values along one axis share a scale (the official `act_quant` / `fp4_act_quant`):

    amax = max(max_block |x|, floor)        floor: 1e-4 (FP8) | 6·2^-126 (FP4)
    s    = amax · fl(1/qmax)  in f32        qmax:  448 (e4m3) | 6 (e2m1)
    s    = 2^ceil(log2 s)     if ue8m0      (always for FP4; exponent-bit arithmetic, exact)
    x̂    = cast_q(clip(x/s, ±qmax)) · s     cast_q rounds to nearest, ties to even

Weights use 2-D tiles (Z×Z over [in, out]). A last block shorter than Z (dim not divisible) is
zero-padded, i.e. it is a partial block whose scale comes from its real elements; the output has the
input's shape and dtype. Gradients are straight-through (identity, `custom_vjp`), so every fake-quant
function can sit in a training graph; the scales carry no gradient. The array functions are jitted
with their block sizes / axes static (a nested jit inlines into the caller's).

Modes (`QuantSim`, config field `quant_sim`; the official code applies these points in its forward):
  "none"     exact float math (default; what HF transformers and our parity tests use).
  "fp8"      FP8 everywhere the release quantises: V3 / V3.2 numerics, and V4 with FP8 experts + FP8
             indexer (the "FP8 mixed" Base checkpoints).
  "fp8_fp4"  "fp8" plus FP4 where V4 uses it: routed-expert weights (1×32 along `in`) and the V4
             indexer q / k (after a Hadamard rotation, 1×32 blocks). V4 as released.
Points (helper: tensor, format):
  sim_act           input of every FP8/FP4-weight linear; e4m3, 1×128 per token along `in`, ue8m0
  sim_weight        FP8-stored weights (attn projections, shared experts, V4 mtp e/h_proj); 128×128
  sim_expert_weight routed experts [E, in, out]: fp8 128×128, or fp8_fp4 e2m1 1×32 along `in`
  sim_kv            V4 window + compressed KV, non-RoPE dims, 1×64; V3.2 c_kv (no k_rope), 1×128
  sim_indexer       DSA indexer q^I and k^I after RoPE: Hadamard, then fp8 1×128 | fp8_fp4 e2m1 1×32

References: deepseek-ai DeepSeek-V4-Flash inference/kernel.py (`act_quant`, `fp4_act_quant`,
`fast_round_scale`), model.py (`linear`, `Attention`, `Compressor`, `Indexer`), convert.py (FP4 LUT);
DeepSeek-V3.2-Exp inference/model.py (`Indexer`, `rotate_activation`, FP8 KV simulation).

Local letters: Z block size, W blocks along the quantised axis, I / J a weight's flattened in / out.
"""

import functools
from typing import Literal, get_args

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

QuantSim = Literal["none", "fp8", "fp8_fp4"]
QUANT_SIM_MODES: tuple[str, ...] = get_args(QuantSim)

FP8_MAX, FP4_MAX = 448.0, 6.0
FP8_AMAX_FLOOR, FP4_AMAX_FLOOR = 1e-4, 6.0 * 2.0**-126  # the official kernels' floors
ACT_BLOCK, WEIGHT_BLOCK, FP4_BLOCK, V4_KV_BLOCK = 128, 128, 32, 64

_FMT = {  # narrow dtype, largest value, amax floor
    "fp8": (jnp.float8_e4m3fn, FP8_MAX, FP8_AMAX_FLOOR),
    "fp4": (jnp.float4_e2m1fn, FP4_MAX, FP4_AMAX_FLOOR),
}


# ----------------------------------------------------------------------------------------------
# Scales and the straight-through wrapper
# ----------------------------------------------------------------------------------------------


def pow2_ceil(s: jax.Array) -> jax.Array:
    """2^ceil(log2 s) for positive normal f32 s, from the exponent bits (`fast_round_scale`)."""
    bits = lax.bitcast_convert_type(s.astype(jnp.float32), jnp.uint32)
    exponent = (bits >> 23) + ((bits & 0x7FFFFF) != 0).astype(jnp.uint32)
    out = lax.bitcast_convert_type(exponent << 23, jnp.float32)
    return jnp.where(jnp.isfinite(s), out, s)  # NaN / inf amax stays NaN / inf


def block_scale(amax: jax.Array, qmax: float, floor: float, ue8m0: bool) -> jax.Array:
    """The dequantisation scale of a block from its max |x| (f32, as the official kernels)."""
    s = jnp.maximum(amax.astype(jnp.float32), floor) * jnp.float32(1.0 / qmax)
    return pow2_ceil(s) if ue8m0 else s


@functools.partial(jax.custom_vjp, nondiff_argnums=(0,))
def _ste(fn, x):
    return fn(x)


def _ste_fwd(fn, x):
    return fn(x), None


def _ste_bwd(fn, _, g):
    return (g,)


_ste.defvjp(_ste_fwd, _ste_bwd)


def _check_block(block: int) -> None:
    if not (isinstance(block, int) and block > 0):
        raise ValueError(f"quantisation block size must be a positive int, got {block!r}")


# ----------------------------------------------------------------------------------------------
# Activations: 1×Z blocks along one axis
# ----------------------------------------------------------------------------------------------


def round_sat(y: jax.Array, fmt: str) -> jax.Array:
    """Saturating round-to-nearest-even cast of already scaled values to e4m3 | e2m1 codes."""
    qdtype, qmax, _ = _FMT[fmt]
    return jnp.clip(y, -qmax, qmax).astype(qdtype)


def _quant_last(x, fmt: str, block: int, ue8m0: bool):
    """x [..., N] -> (codes [..., W, Z] in the narrow dtype, scales [..., W, 1] f32), zero-padded."""
    _, qmax, floor = _FMT[fmt]
    N = x.shape[-1]
    W = -(-N // block)
    x_N = x.astype(jnp.float32)
    x_WZ = jnp.pad(x_N, [(0, 0)] * (x.ndim - 1) + [(0, W * block - N)]).reshape(*x.shape[:-1], W, block)
    s_W1 = block_scale(jnp.max(jnp.abs(x_WZ), axis=-1, keepdims=True), qmax, floor, ue8m0)
    return round_sat(x_WZ / s_W1, fmt), s_W1


@functools.partial(jax.jit, static_argnames=("fmt", "block", "ue8m0"))
def quant(x: jax.Array, fmt: str = "fp8", block: int = ACT_BLOCK, *, ue8m0: bool = True):
    """Real block quantisation along the last dim: (codes [..., N] e4m3 | e2m1, scales [..., W] f32),
    e.g. for an FP8 KV cache. FP4 scales are always powers of two (`ue8m0` is ignored)."""
    _check_block(block)
    if fmt not in _FMT:
        raise ValueError(f"quant: fmt must be 'fp8' or 'fp4', got {fmt!r}")
    q_WZ, s_W1 = _quant_last(x, fmt, block, ue8m0 or fmt == "fp4")
    N = x.shape[-1]
    return q_WZ.reshape(*x.shape[:-1], -1)[..., :N], s_W1[..., 0]


@functools.partial(jax.jit, static_argnames=("block", "dtype"))
def dequant(q: jax.Array, s: jax.Array, block: int, dtype=jnp.float32) -> jax.Array:
    """Inverse of `quant`: codes [..., N] · scales [..., W] repeated over blocks of `block`."""
    s_N = jnp.repeat(s.astype(jnp.float32), block, axis=-1)[..., : q.shape[-1]]
    return (q.astype(jnp.float32) * s_N).astype(dtype)


def _fake_last(x, fmt: str, block: int, ue8m0: bool):
    q_WZ, s_W1 = _quant_last(x, fmt, block, ue8m0)
    xq = (q_WZ.astype(jnp.float32) * s_W1).reshape(*x.shape[:-1], -1)[..., : x.shape[-1]]
    return xq.astype(x.dtype)


def _fake_axis(x, fmt: str, block: int, ue8m0: bool, axis: int):
    return jnp.moveaxis(_fake_last(jnp.moveaxis(x, axis, -1), fmt, block, ue8m0), -1, axis)


@functools.partial(jax.jit, static_argnames=("block", "ue8m0", "axis"))
def fake_quant_fp8(x: jax.Array, block: int = ACT_BLOCK, *, ue8m0: bool = True, axis: int = -1) -> jax.Array:
    """e4m3 quantise-dequantise in 1×`block` blocks along `axis` (the official `act_quant(...,
    inplace=True)`); straight-through gradient. Returns x's shape and dtype."""
    _check_block(block)
    return _ste(functools.partial(_fake_axis, fmt="fp8", block=block, ue8m0=ue8m0, axis=axis), x)


@functools.partial(jax.jit, static_argnames=("block", "axis"))
def fake_quant_fp4(x: jax.Array, block: int = FP4_BLOCK, *, axis: int = -1) -> jax.Array:
    """e2m1 quantise-dequantise in 1×`block` blocks along `axis` with power-of-two scales (MXFP4,
    the official `fp4_act_quant(..., inplace=True)`); straight-through gradient."""
    _check_block(block)
    return _ste(functools.partial(_fake_axis, fmt="fp4", block=block, ue8m0=True, axis=axis), x)


def _fake_fp4_e4m3(x, block: int):
    """e2m1 codes with an e4m3 scale per block: s = e4m3(max(amax, 6·2^-9) / 6), x̂ = e2m1(x / s)·s."""
    N = x.shape[-1]
    W = -(-N // block)
    x_WZ = jnp.pad(x.astype(jnp.float32), [(0, 0)] * (x.ndim - 1) + [(0, W * block - N)])
    x_WZ = x_WZ.reshape(*x.shape[:-1], W, block)
    amax_W1 = jnp.maximum(jnp.max(jnp.abs(x_WZ), axis=-1, keepdims=True), FP4_MAX * 2.0**-9)
    s_W1 = (amax_W1 / FP4_MAX).astype(jnp.float8_e4m3fn).astype(jnp.float32)
    xq = round_sat(x_WZ / s_W1, "fp4").astype(jnp.float32) * s_W1
    return xq.reshape(*x.shape[:-1], -1)[..., :N].astype(x.dtype)


@functools.partial(jax.jit, static_argnames=("block",))
def fake_quant_fp4_e4m3(x: jax.Array, block: int = 16) -> jax.Array:
    """e2m1 quantise-dequantise in 1×`block` blocks along the last dim with e4m3 scales (NVFP4-style;
    V4.1's compressed-KV QAT, blocks of 16); straight-through gradient."""
    _check_block(block)
    return _ste(functools.partial(_fake_fp4_e4m3, block=block), x)


# ----------------------------------------------------------------------------------------------
# Weights: Z×Z tiles over the flattened [in, out] matrix
# ----------------------------------------------------------------------------------------------


def _fake_tiles(w, block: int, ue8m0: bool, n_in: int, n_batch: int):
    lead = w.shape[:n_batch]
    I = int(np.prod(w.shape[n_batch : n_batch + n_in]))
    J = int(np.prod(w.shape[n_batch + n_in :]))
    WI, WJ = -(-I // block), -(-J // block)
    w_IJ = w.astype(jnp.float32).reshape(*lead, I, J)
    pad = [(0, 0)] * n_batch + [(0, WI * block - I), (0, WJ * block - J)]
    w_tiles = jnp.pad(w_IJ, pad).reshape(*lead, WI, block, WJ, block)
    amax = jnp.max(jnp.abs(w_tiles), axis=(-3, -1), keepdims=True)
    s = block_scale(amax, FP8_MAX, FP8_AMAX_FLOOR, ue8m0)
    q = round_sat(w_tiles / s, "fp8")
    wq_IJ = (q.astype(jnp.float32) * s).reshape(*lead, WI * block, WJ * block)[..., :I, :J]
    return wq_IJ.reshape(w.shape).astype(w.dtype)


@functools.partial(jax.jit, static_argnames=("n_in", "n_batch", "block", "ue8m0"))
def fake_quant_fp8_weight(
    w: jax.Array, *, n_in: int = 1, n_batch: int = 0, block: int = WEIGHT_BLOCK, ue8m0: bool = True
) -> jax.Array:
    """e4m3 quantise-dequantise of a weight laid out [batch..., in..., out...] (our layout, e.g.
    w_uq_QNK: n_in=1; w_o_NOD: n_in=2; w_gate_EDF: n_batch=1) in `block`×`block` tiles of the
    flattened [in, out] matrix, as the checkpoint's [out, in] 128×128 blocks (square tiles from the
    origin are transpose-invariant). Straight-through gradient."""
    _check_block(block)
    if not (n_batch >= 0 and n_in >= 1 and n_batch + n_in < w.ndim):
        raise ValueError(f"fake_quant_fp8_weight: need n_batch >= 0, n_in >= 1 and an out axis; "
                         f"got n_batch={n_batch}, n_in={n_in} for shape {w.shape}")
    return _ste(functools.partial(_fake_tiles, block=block, ue8m0=ue8m0, n_in=n_in, n_batch=n_batch), w)


# ----------------------------------------------------------------------------------------------
# Hadamard rotation (indexer q / k before their quantisation)
# ----------------------------------------------------------------------------------------------


@jax.jit
def hadamard(x: jax.Array) -> jax.Array:
    """x · H_n / √n along the last dim [..., n], n a power of 2, Sylvester order (H_2n = [[H, H],
    [H, -H]], as `fast_hadamard_transform`); orthogonal and symmetric, so dot products are kept."""
    n = x.shape[-1]
    if n < 1 or n & (n - 1):
        raise ValueError(f"hadamard: last dim must be a power of 2, got {n}")
    y = x.astype(jnp.float32)
    h = 1
    while h < n:  # butterflies on pairs (i, i + h) inside blocks of 2h
        y = y.reshape(*x.shape[:-1], n // (2 * h), 2, h)
        y = jnp.stack([y[..., 0, :] + y[..., 1, :], y[..., 0, :] - y[..., 1, :]], axis=-2)
        h *= 2
    return (y.reshape(x.shape) * n**-0.5).astype(x.dtype)


# ----------------------------------------------------------------------------------------------
# Mode helpers: the policy of where each format applies, so layers only pass `cfg.quant_sim`
# ----------------------------------------------------------------------------------------------


def _mode(mode: str) -> str:
    if mode not in QUANT_SIM_MODES:
        raise ValueError(f"quant_sim must be one of {QUANT_SIM_MODES}, got {mode!r}")
    return mode


def sim_act(x: jax.Array, mode: str) -> jax.Array:
    """Input of an FP8/FP4-weight linear, contracted over its last dim: e4m3 1×128, ue8m0."""
    return x if _mode(mode) == "none" else fake_quant_fp8(x, ACT_BLOCK)


def sim_weight(w: jax.Array, mode: str, *, n_in: int = 1, n_batch: int = 0) -> jax.Array:
    """An FP8-stored weight [batch..., in..., out...]: e4m3 128×128 tiles, ue8m0."""
    return w if _mode(mode) == "none" else fake_quant_fp8_weight(w, n_in=n_in, n_batch=n_batch)


def sim_expert_weight(w_EIJ: jax.Array, mode: str) -> jax.Array:
    """Routed-expert weights [E, in, out]: "fp8" 128×128 e4m3 tiles; "fp8_fp4" e2m1 1×32 along in."""
    if _mode(mode) == "none":
        return w_EIJ
    if mode == "fp8":
        return fake_quant_fp8_weight(w_EIJ, n_in=1, n_batch=1)
    return fake_quant_fp4(w_EIJ, FP4_BLOCK, axis=-2)


def sim_kv(kv: jax.Array, mode: str, *, n_rope: int = 0, block: int = ACT_BLOCK) -> jax.Array:
    """A cached KV entry [..., C]: e4m3 on dims [:C - n_rope] in 1×`block` (V4: n_rope=64, block=64;
    V3.2 c_kv: n_rope=0, block=128); the trailing RoPE dims stay as they are."""
    if _mode(mode) == "none":
        return kv
    C = kv.shape[-1]
    nope = fake_quant_fp8(kv[..., : C - n_rope], block)
    return jnp.concatenate([nope, kv[..., C - n_rope :]], axis=-1) if n_rope else nope


def qat_v41(x: jax.Array, site: str) -> jax.Array:
    """V4.1's fake-quant, applied even in float32 (HF and the release): "window" kv e4m3 1×32 ue8m0
    over the whole vector, "entry" compressed kv e2m1 1×16 with e4m3 scales, "index" indexer q / k
    e2m1 1×32 ue8m0. Skipped when the last dim is not a multiple of the block (as HF does)."""
    block = {"window": 32, "entry": 16, "index": FP4_BLOCK}[site]
    if x.shape[-1] % block:
        return x
    if site == "window":
        return fake_quant_fp8(x, block)
    return fake_quant_fp4_e4m3(x, block) if site == "entry" else fake_quant_fp4(x, block)


def sim_indexer(x: jax.Array, mode: str) -> jax.Array:
    """Indexer q^I or k^I [..., Y] after RoPE: Hadamard-rotated, then "fp8" e4m3 1×128 (V3.2) or
    "fp8_fp4" e2m1 1×32 (V4). Apply to both q and k: scores stay in the rotated basis."""
    if _mode(mode) == "none":
        return x
    x = hadamard(x)
    return fake_quant_fp8(x, ACT_BLOCK) if mode == "fp8" else fake_quant_fp4(x, FP4_BLOCK)
