"""SwiGLU feed-forward (Shazeer 2020), used for dense layers and shared experts."""

import flax.linen as nn
import jax
import jax.numpy as jnp

from deepseek_jax.axes import constrain, dense_init, param


def swiglu(x_BTD, w_gate_DF, w_up_DF, w_down_FD):
    """down(silu(x·gate) ⊙ x·up)."""
    gate_BTF = jnp.einsum("BTD,DF->BTF", x_BTD, w_gate_DF)
    up_BTF = jnp.einsum("BTD,DF->BTF", x_BTD, w_up_DF)
    h_BTF = constrain(jax.nn.silu(gate_BTF) * up_BTF, ("act_batch", "act_seq", "act_mlp"))
    return jnp.einsum("BTF,FD->BTD", h_BTF, w_down_FD)


class MLP(nn.Module):
    dim: int  # D
    inter_dim: int  # F
    dtype: jnp.dtype = jnp.bfloat16

    @nn.compact
    def __call__(self, x_BTD: jax.Array) -> jax.Array:
        D, F = self.dim, self.inter_dim
        w_gate_DF = param(self, "w_gate", ("embed", "mlp"), (D, F), dense_init([0], [1]))
        w_up_DF = param(self, "w_up", ("embed", "mlp"), (D, F), dense_init([0], [1]))
        w_down_FD = param(self, "w_down", ("mlp", "embed"), (F, D), dense_init([0], [1]))
        x_BTD = constrain(x_BTD.astype(self.dtype), ("act_batch", "act_seq", "act_embed"))
        return swiglu(x_BTD, *(w.astype(self.dtype) for w in (w_gate_DF, w_up_DF, w_down_FD)))
