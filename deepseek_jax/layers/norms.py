"""RMSNorm (Zhang & Sennrich 2019) with float32 statistics, as DeepSeek and HF compute it."""

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
