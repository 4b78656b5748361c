"""SwiGLU feed-forward (Shazeer 2020), used for dense layers and shared experts.

    y = W_down (silu(min(x W_gate, lim)) ⊙ clip(x W_up, -lim, lim))

V4 clamps both halves at `swiglu_limit` (lim = 10; 0 turns the clamp off, as V3): the gate only from
above, the linear half both ways (official `Expert.forward`, transformers `DeepseekV4MLP`).

`quant_sim` ("none" | "fp8" | "fp8_fp4", quant.py) simulates the release's FP8 linears (the shared
experts): each weight in e4m3 128×128 tiles, each linear's input (x, and h before W_down) in e4m3
1×128 blocks per token.
"""

import flax.linen as nn
import jax
import jax.numpy as jnp

from deepseek_jax.axes import constrain, dense_init, param
from deepseek_jax.quant import sim_act, sim_weight


def swiglu_act(gate, up, limit: float = 0.0):
    """silu(gate) ⊙ up, with V4's clamp (gate <= limit, |up| <= limit) when limit > 0; any shape."""
    if limit > 0:
        gate, up = jnp.minimum(gate, limit), jnp.clip(up, -limit, limit)
    return jax.nn.silu(gate) * up


def swiglu(x_BTD, w_gate_DF, w_up_DF, w_down_FD, limit: float = 0.0, quant_sim: str = "none"):
    """down(silu(x·gate) ⊙ x·up), clamped when limit > 0; the linears' inputs FP8-simulated per
    `quant_sim` (the weights are the caller's)."""
    x_BTD = sim_act(x_BTD, quant_sim)
    gate_BTF = jnp.einsum("BTD,DF->BTF", x_BTD, w_gate_DF)
    up_BTF = jnp.einsum("BTD,DF->BTF", x_BTD, w_up_DF)
    h_BTF = constrain(swiglu_act(gate_BTF, up_BTF, limit), ("act_batch", "act_seq", "act_mlp"))
    return jnp.einsum("BTF,FD->BTD", sim_act(h_BTF, quant_sim), w_down_FD)


class MLP(nn.Module):
    dim: int  # D
    inter_dim: int  # F
    dtype: jnp.dtype = jnp.bfloat16
    swiglu_limit: float = 0.0  # clamp (V4: 10); 0 = off
    quant_sim: str = "none"  # FP8 simulation of the weights and the linears' inputs (docstring)

    @nn.compact
    def __call__(self, x_BTD: jax.Array) -> jax.Array:
        D, F = self.dim, self.inter_dim
        w_gate_DF = param(self, "w_gate", ("embed", "mlp"), (D, F), dense_init([0], [1]))
        w_up_DF = param(self, "w_up", ("embed", "mlp"), (D, F), dense_init([0], [1]))
        w_down_FD = param(self, "w_down", ("mlp", "embed"), (F, D), dense_init([0], [1]))
        x_BTD = constrain(x_BTD.astype(self.dtype), ("act_batch", "act_seq", "act_embed"))
        ws = (sim_weight(w, self.quant_sim).astype(self.dtype) for w in (w_gate_DF, w_up_DF, w_down_FD))
        return swiglu(x_BTD, *ws, limit=self.swiglu_limit, quant_sim=self.quant_sim)
