"""Rotary position embedding with DeepSeek's YaRN extension, computed from positions on the fly.

DeepSeek-V3 `inference/model.py` (`precompute_freqs_cis`, `apply_rotary_emb`): RoPE rotates
*interleaved* pairs (x0, x1), (x2, x3), ... of the trailing R dims. YaRN (Peng et al. 2023) blends
interpolated and original frequencies with a linear ramp between the dims that complete
`beta_fast` and `beta_slow` rotations over `original_seq_len`, and tempers attention by
mscale = 0.1 * m * ln(s) + 1. No table sized by the maximum position is built: angles are
positions x inverse frequencies, so any position works.

Layout variants: `apply_rope` (interleaved, all R dims; MLA), `rope_tail` (interleaved, last R dims;
V4), `apply_rope_half` / `rope_leading` (half-split, first R dims; the V3.2 indexer after DeepSeek's
2025-11-17 fix). Letters: R rotated dims, X a vector's full width.
"""

import math

import jax
import jax.numpy as jnp
import numpy as np


def _correction_dim(n_rotations: float, dim: int, theta: float, seq_len: int) -> float:
    """The (fractional) dim index whose wavelength fits `n_rotations` times into `seq_len`."""
    return dim * math.log(seq_len / (n_rotations * 2 * math.pi)) / (2 * math.log(theta))


def yarn_inv_freq(
    dim: int,
    theta: float,
    factor: float = 1.0,
    original_seq_len: int = 4096,
    beta_fast: float = 32.0,
    beta_slow: float = 1.0,
) -> np.ndarray:
    """Inverse frequencies [dim/2] (float32); plain RoPE when factor == 1."""
    inv_freq = 1.0 / theta ** (np.arange(0, dim, 2, dtype=np.float64) / dim)
    if factor <= 1:
        return inv_freq.astype(np.float32)
    low = max(math.floor(_correction_dim(beta_fast, dim, theta, original_seq_len)), 0)
    high = min(math.ceil(_correction_dim(beta_slow, dim, theta, original_seq_len)), dim - 1)
    if low == high:
        high += 0.001  # the reference's guard against a zero-width ramp
    ramp = np.clip((np.arange(dim // 2, dtype=np.float64) - low) / (high - low), 0, 1)
    keep = 1 - ramp  # 1: dim keeps its original frequency (extrapolation), 0: interpolated
    inv_freq = inv_freq / factor * (1 - keep) + inv_freq * keep
    return inv_freq.astype(np.float32)


def yarn_mscale(factor: float, mscale: float) -> float:
    """YaRN's attention temperature 0.1 * mscale * ln(factor) + 1 (1 when factor <= 1)."""
    return 1.0 if factor <= 1 else 0.1 * mscale * math.log(factor) + 1.0


def rope_cos_sin(positions: jax.Array, inv_freq: np.ndarray, scale: float = 1.0):
    """cos, sin of shape [..., R/2] for integer positions [...] (float32 angles)."""
    angles = positions.astype(jnp.float32)[..., None] * jnp.asarray(inv_freq, jnp.float32)
    return jnp.cos(angles) * scale, jnp.sin(angles) * scale


def apply_rope(x: jax.Array, cos: jax.Array, sin: jax.Array) -> jax.Array:
    """Rotates interleaved pairs of x [..., R] by angles whose cos/sin broadcast to [..., R/2]."""
    x32 = x.astype(jnp.float32)
    x_even, x_odd = x32[..., 0::2], x32[..., 1::2]
    out = jnp.stack([x_even * cos - x_odd * sin, x_odd * cos + x_even * sin], axis=-1)
    return out.reshape(x.shape).astype(x.dtype)


def apply_rope_half(x: jax.Array, cos: jax.Array, sin: jax.Array) -> jax.Array:
    """Non-interleaved RoPE on x [..., R]: halves (a, b) -> (a cos − b sin, b cos + a sin);
    cos/sin broadcast to [..., R/2] (HF `rotate_half` with cos = cat(cos, cos))."""
    x32 = x.astype(jnp.float32)
    a, b = jnp.split(x32, 2, axis=-1)
    return jnp.concatenate([a * cos - b * sin, b * cos + a * sin], axis=-1).astype(x.dtype)


def rope_leading(x: jax.Array, cos: jax.Array, sin: jax.Array) -> jax.Array:
    """Non-interleaved RoPE on the first R = 2·cos.shape[-1] dims of x [..., X] (layout
    [rope | nope]; the V3.2 indexer's)."""
    R = 2 * cos.shape[-1]
    return jnp.concatenate([apply_rope_half(x[..., :R], cos, sin), x[..., R:]], axis=-1)


def rope_tail(x: jax.Array, cos: jax.Array, sin: jax.Array) -> jax.Array:
    """Interleaved RoPE on the last R = 2·cos.shape[-1] dims of x [..., X] (layout [nope | rope];
    V4's)."""
    R = 2 * cos.shape[-1]
    return jnp.concatenate([x[..., : x.shape[-1] - R], apply_rope(x[..., -R:], cos, sin)], axis=-1)
