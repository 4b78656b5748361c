"""Normalisations, statistics in float32 as DeepSeek and HF compute them: RMSNorm (Zhang & Sennrich
2019), the weightless RMS normalisation of V4's query heads, and the V3.2 indexer's LayerNorm."""

import flax.linen as nn
import jax
import jax.numpy as jnp

from deepseek_jax.axes import param


def rms_norm(x: jax.Array, scale: jax.Array, eps: float) -> jax.Array:
    """scale * x / sqrt(mean(x^2) + eps) over the last axis [..., D]; statistics in float32."""
    x32 = x.astype(jnp.float32)
    normed = x32 * jax.lax.rsqrt(jnp.mean(x32 * x32, axis=-1, keepdims=True) + eps)
    return scale.astype(x.dtype) * normed.astype(x.dtype)


class RMSNorm(nn.Module):
    dim: int  # size of the normalised (last) axis
    eps: float = 1e-6
    axis_name: str = "embed"  # logical name of the scale vector
    dtype: jnp.dtype = jnp.bfloat16

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        scale = param(self, "scale", (self.axis_name,), (self.dim,), nn.initializers.ones)
        return rms_norm(x.astype(self.dtype), scale, self.eps)


def rms_normalize(x: jax.Array, eps: float) -> jax.Array:
    """x / sqrt(mean(x²) + eps) over the last axis [..., D], no weight (V4's per-head query norm);
    statistics in f32."""
    x32 = x.astype(jnp.float32)
    return x * jax.lax.rsqrt(jnp.mean(x32 * x32, axis=-1, keepdims=True) + eps).astype(x.dtype)


def layer_norm(x: jax.Array, scale: jax.Array, bias: jax.Array, eps: float) -> jax.Array:
    """(x − mean) / sqrt(var + eps) · scale + bias over the last axis [..., D]; f32 statistics."""
    x32 = x.astype(jnp.float32)
    mean = jnp.mean(x32, axis=-1, keepdims=True)
    var = jnp.mean(jnp.square(x32 - mean), axis=-1, keepdims=True)
    normed = ((x32 - mean) * jax.lax.rsqrt(var + eps)).astype(x.dtype)
    return normed * scale.astype(x.dtype) + bias.astype(x.dtype)


class LayerNorm(nn.Module):
    """LayerNorm with a learned scale and bias (the V3.2 indexer's key norm)."""

    dim: int  # size of the normalised (last) axis
    eps: float = 1e-6
    axis_name: str = "head_dim"  # logical name of the scale and bias vectors
    dtype: jnp.dtype = jnp.bfloat16

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        scale = param(self, "scale", (self.axis_name,), (self.dim,), nn.initializers.ones)
        bias = param(self, "bias", (self.axis_name,), (self.dim,), nn.initializers.zeros)
        return layer_norm(x.astype(self.dtype), scale, bias, self.eps)
