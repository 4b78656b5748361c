"""DeepSeek-V4.1's vision tower ("DeepSeek-ViT") and its aligner (deepseek_v41_architecture.md §3.2–3.3).

    x = patches W_patch + b_patch                    no class token, no absolute position embedding
    per block:  [q | k | v] = norm1(x) W_qkv + b_qkv          (contiguous split, N heads of Y dims)
                x += Attn(RoPE2D(q), RoPE2D(k), v) W_o + b_o   bidirectional inside one picture, scale Y^-1/2
                [g | u] = norm2(x) W_gate_up;  x += (silu(g) ⊙ u) W_down       (no biases)
    x = norm(x)                                       RMSNorm with weight, statistics in f32
    aligner:  per LLM token the r×r window of its picture's patch features (exact zeros where the
              grid is padded to a multiple of r), channel-major (c·r² + ky·r + kx)
              -> W1 + b1 -> GELU (erf) -> W2 + b2

2D RoPE rotates all Y dims, half-split: frequencies f_i = θ^(−2i/(Y/2)), i < Y/4; the patch at (row
a, col b) has angles (a·f, b·f) (Y/2 of them); channel c < Y/2 turns with channel c + Y/2 by angle c.

Pictures (images and video frames) are packed along a row: `patch_pic` names each patch's picture
(-1 = padding, never attended); `unshuffle` lists each aligner row's r×r window of patch indices.

Local letters (this file): P patches of a row, W ViT width, Y ViT head dim, M aligner rows (LLM
tokens of a row; the contract's `unshuffle [B, M, r²]`), K = r² cells of a window, X the index of a
fused projection's part (q | k | v, gate | up). F is the ViT MLP hidden and the aligner hidden.
"""

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from deepseek_jax.axes import constrain, dense_init, param
from deepseek_jax.config.media import VisionConfig
from deepseek_jax.layers.attention.core import masked_softmax
from deepseek_jax.layers.mlp import swiglu_act
from deepseek_jax.layers.norms import RMSNorm
from deepseek_jax.layers.rope import apply_rope_half

ACT_BPW = ("act_batch", "act_seq", "act_embed")
zeros = nn.initializers.zeros


def rope_2d_cos_sin(patch_pos_BP2: jax.Array, head_dim: int, theta: float):
    """cos, sin [B, P, Y/2] of the half-split 2D RoPE: angles (row·f_0 … row·f_{Y/4−1}, col·f_0 …),
    f_i = θ^(−2i/(Y/2))."""
    inv_freq = theta ** (-2.0 * np.arange(head_dim // 4) / (head_dim // 2))  # float64 on the host
    angles_BP2Q = patch_pos_BP2.astype(jnp.float32)[..., None] * jnp.asarray(inv_freq, jnp.float32)
    angles_BPR = angles_BP2Q.reshape(*patch_pos_BP2.shape[:-1], head_dim // 2)
    return jnp.cos(angles_BPR), jnp.sin(angles_BPR)


def picture_mask(patch_pic_BP: jax.Array) -> jax.Array:
    """[B, P, S=P]: key s is visible to query p iff both lie in the same picture and s is no padding
    (a padding query sees nothing: masked_softmax keeps it finite)."""
    return (patch_pic_BP[:, :, None] == patch_pic_BP[:, None, :]) & (patch_pic_BP[:, None, :] >= 0)


def vision_attention(x_BPW, w_qkv_W3NY, b_qkv_3NY, w_o_NYW, b_o_W, cos_BPR, sin_BPR, mask_BPS):
    """Fused-qkv multi-head attention with the 2D RoPE on q and k, softmax in f32."""
    qkv_BP3NY = jnp.einsum("BPW,WXNY->BPXNY", x_BPW, w_qkv_W3NY) + b_qkv_3NY
    q_BPNY, k_BPNY, v_BPNY = (qkv_BP3NY[:, :, i] for i in range(3))
    cos_BP1R, sin_BP1R = cos_BPR[:, :, None, :], sin_BPR[:, :, None, :]
    q_BPNY = apply_rope_half(q_BPNY, cos_BP1R, sin_BP1R)
    k_BPNY = apply_rope_half(k_BPNY, cos_BP1R, sin_BP1R)
    logits_BPNS = jnp.einsum("BPNY,BSNY->BPNS", q_BPNY, k_BPNY) * q_BPNY.shape[-1] ** -0.5
    probs_BPNS = masked_softmax(logits_BPNS, mask_BPS).astype(v_BPNY.dtype)
    out_BPNY = jnp.einsum("BPNS,BSNY->BPNY", probs_BPNS, v_BPNY)
    return jnp.einsum("BPNY,NYW->BPW", out_BPNY, w_o_NYW) + b_o_W


class VisionAttention(nn.Module):
    """`attn.wqkv` [W -> 3W] and `attn.wo` [W -> W], both with bias; q | k | v contiguous, heads
    contiguous inside each (official `.view(..., N, Y)`)."""

    cfg: VisionConfig
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x_BPW, cos_BPR, sin_BPR, mask_BPS):
        W, N, Y = self.cfg.hidden_size, self.cfg.num_heads, self.cfg.head_dim
        ws = (
            param(self, "w_qkv", ("embed", None, "heads", "head_dim"), (W, 3, N, Y), dense_init([0], [1, 2, 3])),
            param(self, "b_qkv", (None, "heads", "head_dim"), (3, N, Y), zeros),
            param(self, "w_o", ("heads", "head_dim", "embed"), (N, Y, W), dense_init([0, 1], [2])),
            param(self, "b_o", ("embed",), (W,), zeros),
        )
        return vision_attention(x_BPW, *(w.astype(self.dtype) for w in ws), cos_BPR, sin_BPR, mask_BPS)


class VisionMLP(nn.Module):
    """`mlp.w1` [W -> 2F] split [gate | up], SiLU(gate)·up, `mlp.w2` [F -> W]; no biases."""

    cfg: VisionConfig
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x_BPW):
        W, F = self.cfg.hidden_size, self.cfg.intermediate_size
        w_gate_up_W2F = param(self, "w_gate_up", ("embed", None, "mlp"), (W, 2, F), dense_init([0], [1, 2]))
        w_down_FW = param(self, "w_down", ("mlp", "embed"), (F, W), dense_init([0], [1]))
        h_BP2F = jnp.einsum("BPW,WXF->BPXF", x_BPW, w_gate_up_W2F.astype(self.dtype))
        h_BPF = swiglu_act(h_BP2F[:, :, 0], h_BP2F[:, :, 1])
        return jnp.einsum("BPF,FW->BPW", h_BPF, w_down_FW.astype(self.dtype))


class VisionBlock(nn.Module):
    """x += attn(norm1 x); x += mlp(norm2 x). One step of the scan over the ViT layers."""

    cfg: VisionConfig
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x_BPW, cos_BPR, sin_BPR, mask_BPS):
        W, eps = self.cfg.hidden_size, self.cfg.norm_eps
        h_BPW = RMSNorm(W, eps, "embed", self.dtype, name="norm1")(x_BPW)
        x_BPW = x_BPW + VisionAttention(self.cfg, self.dtype, name="attn")(h_BPW, cos_BPR, sin_BPR, mask_BPS)
        h_BPW = RMSNorm(W, eps, "embed", self.dtype, name="norm2")(x_BPW)
        x_BPW = x_BPW + VisionMLP(self.cfg, self.dtype, name="mlp")(h_BPW)
        return constrain(x_BPW, ACT_BPW), None


class VisionTower(nn.Module):
    """Patches of packed pictures [B, P, 3p²] -> ViT features [B, P, W] after the final norm.

    Params: `w_patch` [3p², W], `b_patch` [W]; `blocks/` stacked [num_layers, ...] (norm1/scale, attn/w_qkv
    [W, 3, N, Y], attn/b_qkv [3, N, Y], attn/w_o [N, Y, W], attn/b_o [W], norm2/scale,
    mlp/w_gate_up [W, 2, F], mlp/w_down [F, W]); `norm/scale` [W]."""

    cfg: VisionConfig
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, patches_BPC: jax.Array, patch_pos_BP2: jax.Array, patch_pic_BP: jax.Array) -> jax.Array:
        c = self.cfg
        C, W = c.patch_dim, c.hidden_size
        w_patch_CW = param(self, "w_patch", (None, "embed"), (C, W), dense_init([0], [1]))
        b_patch_W = param(self, "b_patch", ("embed",), (W,), zeros)
        x_BPW = jnp.einsum("BPC,CW->BPW", patches_BPC.astype(self.dtype), w_patch_CW.astype(self.dtype))
        x_BPW = constrain(x_BPW + b_patch_W.astype(self.dtype), ACT_BPW)
        cos_BPR, sin_BPR = rope_2d_cos_sin(patch_pos_BP2, c.head_dim, c.rope_theta)
        blocks = nn.scan(
            VisionBlock,
            variable_axes={"params": 0},
            split_rngs={"params": True},
            in_axes=(nn.broadcast, nn.broadcast, nn.broadcast),
            length=c.num_layers,
            metadata_params={nn.PARTITION_NAME: "layers"},
        )
        x_BPW, _ = blocks(c, self.dtype, name="blocks")(x_BPW, cos_BPR, sin_BPR, picture_mask(patch_pic_BP))
        return RMSNorm(W, c.norm_eps, "embed", self.dtype, name="norm")(x_BPW)


def unshuffle_windows(feats_BPW: jax.Array, unshuffle_BMK: jax.Array) -> jax.Array:
    """[B, M, W, K]: each aligner row's r×r window of patch features, channel-major (flattened index
    c·K + ky·r + kx); index -1 (the grid padded to a multiple of r) gives exact zeros."""
    rows_BMKW = jax.vmap(lambda f_PW, i_MK: f_PW[i_MK])(feats_BPW, jnp.maximum(unshuffle_BMK, 0))
    rows_BMKW = jnp.where((unshuffle_BMK >= 0)[..., None], rows_BMKW, 0)
    return rows_BMKW.transpose(0, 1, 3, 2)


def aligner_mlp(x_BMWK, w1_WKF, b1_F, w2_FD, b2_D):
    """W2 · GELU_erf(W1 · x + b1) + b2 on the flattened window (W1 is [W·K, F] viewed as [W, K, F])."""
    h_BMF = jnp.einsum("BMWK,WKF->BMF", x_BMWK, w1_WKF) + b1_F
    return jnp.einsum("BMF,FD->BMD", jax.nn.gelu(h_BMF, approximate=False), w2_FD) + b2_D


class Aligner(nn.Module):
    """ViT features [B, P, W] + windows [B, M, r²] -> LLM token features [B, M, out_dim].

    Params: `w1` [W, r², F] (official `aligner.w1.weight` [F, W·r²], transposed and viewed), `b1` [F],
    `w2` [F, out_dim], `b2` [out_dim]; F = cfg.aligner_hidden or out_dim."""

    cfg: VisionConfig
    out_dim: int  # D, the LM width
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, feats_BPW: jax.Array, unshuffle_BMK: jax.Array) -> jax.Array:
        W, K, D = self.cfg.hidden_size, self.cfg.downsample_ratio**2, self.out_dim
        F = self.cfg.aligner_hidden or D
        ws = (
            param(self, "w1", ("embed", None, "mlp"), (W, K, F), dense_init([0, 1], [2])),
            param(self, "b1", ("mlp",), (F,), zeros),
            param(self, "w2", ("mlp", "embed"), (F, D), dense_init([0], [1])),
            param(self, "b2", ("embed",), (D,), zeros),
        )
        x_BMWK = unshuffle_windows(feats_BPW.astype(self.dtype), unshuffle_BMK)
        out_BMD = aligner_mlp(x_BMWK, *(w.astype(self.dtype) for w in ws))
        return constrain(out_BMD, ACT_BPW)
