"""Manifold-constrained hyper-connections (mHC; Xie et al. 2026, arXiv 2512.24880; DeepSeek-V4 §2.2).

The residual is I parallel streams X_i ∈ R^D (`hc_mult`). Around each sub-layer F (attention, FFN),
with all of the mHC math in float32:

    r      = rsqrt(mean_{i,d} X_id² + norm_eps)             a weightless RMSNorm of the flattened I·D state
    m      = r · Σ_{i,d} X_id φ_idz                          Z = (2+I)·I mixes, ordered [pre | post | comb]
    pre_i  = σ(α_0 m_i + b_i) + hc_eps                       ∈ (hc_eps, 1 + hc_eps)
    post_j = 2 σ(α_1 m_{I+j} + b_{I+j})                      ∈ (0, 2)
    comb   = Sinkhorn(L),  L_ij = α_2 m_{2I+iI+j} + b_{2I+iI+j}
    y      = Σ_i pre_i X_i                                   the sub-layer input (its own RMSNorm follows)
    X'_j   = post_j F(y) + Σ_i comb_ij X_i                   comb applied transposed: the sum runs over i

Single-pass (V4.1, `MHCConfig.single_pass`): the maps of a site come from the streams at that site, but
the sub-layer input is y = Σ_i pre'_i X_i with pre' the previous site's pre (layer 0's attention: stream
0 alone); the final read is the last site's pre, so there is no head (models/block.py, decoder.py).

Sinkhorn exactly as released (V4 `hc_split_sinkhorn`, transformers `DeepseekV4HyperConnection`):
comb = softmax_j(L) + ε; comb /= (colsum + ε); then (iters − 1) times comb /= (rowsum + ε),
comb /= (colsum + ε). The last step normalises columns, so columns sum to 1 − O(ε) and rows to 1 up to
the unfinished convergence. The head (`HyperHead`) reads the streams once more with its own φ [I·D, I],
b [I], α [1]: x = Σ_i (σ(α m_i + b_i) + ε) X_i; no post and no Sinkhorn.

Degenerate settings (tests/layers/test_mhc.py checks each):
- hc_mult = 1: Z = 3 and comb is 1×1. It is NOT exactly 1: softmax gives 1, +ε gives 1 + ε, the column
  step (1 + ε)/(1 + 2ε), and every later step c ↦ c/(c + ε), whose fixed point is 1 − ε; so
  comb = 1 − ε + O(ε²) (exactly 1 when hc_eps = 0). pre = σ(α_0 m_0 + b_0) + ε and
  post = 2σ(α_1 m_1 + b_1), so the block is X' = post · F(norm(pre · X)) + (1 − ε) X: the plain pre-norm
  residual, the sub-layer's RMSNorm dividing out pre (up to its eps), with a learned per-token gain in
  (0, 2) on the branch. With α = 0 (or φ = 0) and b_post = 0 it is x + F(norm(x)) up to ε.
- φ = 0 (or α = 0): the maps are static, pre = σ(b_pre) + ε, post = 2σ(b_post), comb = Sinkhorn(b_res).
  With b_pre = logit(1/I), b_post = 0, b_res = 0: pre = 1/I + ε, post = 1 and comb = (1 − ε)/I · 11ᵀ
  (uniform stays uniform; u ↦ u/(I u + ε) has fixed point (1 − ε)/I), so y = (1 + Iε) mean_i X_i and
  every X'_j = F(y) + (1 − ε) mean_i X_i. On identical streams (the embedding copied I times) that is the
  plain pre-norm residual block; the head with φ = 0, b = logit(1/I) returns (1 + Iε) mean_i X_i.
- b_res = c·Id with c large: comb → Id, I independent residual streams sharing the sub-layer's output
  with gains post_j.

Local letters: Z = (2 + I)·I mixes. Parameters (float32): fn [I, D, Z] (upstream's [Z, I·D] with
column i·D + d, transposed), base [Z], scale [3]. The D axis takes the `embed` rule, so FSDP splits it
as it splits every other weight's D; the small I and Z axes stay whole.
"""

import flax.linen as nn
import jax
import jax.numpy as jnp

from deepseek_jax.axes import constrain, dense_init, param

HIGHEST = jax.lax.Precision.HIGHEST  # mHC is specified in float32; keep TPU/GPU matmuls from rounding to bf16
STREAMS = ("act_batch", "act_seq", None, "act_embed")
SCALE_INIT = 0.01  # α, "initialised small" (mHC paper, appendix Table 5)


def mixes(x_BTID: jax.Array, fn_IDZ: jax.Array, norm_eps: float) -> jax.Array:
    """m = rsqrt(mean(vec(X)²) + eps) · vec(X) φ, float32 [B, T, Z] (the norm after the matmul, as V4)."""
    x_BTID = x_BTID.astype(jnp.float32)
    r_BT = jax.lax.rsqrt(jnp.mean(jnp.square(x_BTID), axis=(-2, -1)) + norm_eps)
    return jnp.einsum("BTID,IDZ->BTZ", x_BTID, fn_IDZ.astype(jnp.float32), precision=HIGHEST) * r_BT[..., None]


def sinkhorn(logits_BTIJ: jax.Array, iters: int, eps: float) -> jax.Array:
    """V4's Sinkhorn-Knopp: row softmax + eps, a column step, then (iters - 1) row and column steps."""
    comb_BTIJ = jax.nn.softmax(logits_BTIJ.astype(jnp.float32), axis=-1) + eps
    comb_BTIJ = comb_BTIJ / (comb_BTIJ.sum(-2, keepdims=True) + eps)

    def rows_then_columns(_, c_BTIJ):
        c_BTIJ = c_BTIJ / (c_BTIJ.sum(-1, keepdims=True) + eps)
        return c_BTIJ / (c_BTIJ.sum(-2, keepdims=True) + eps)

    # a rolled loop: XLA compiles it ~10x faster than 19 unrolled steps (forward and gradient)
    return jax.lax.fori_loop(0, iters - 1, rows_then_columns, comb_BTIJ)


def split_mixes(mix_BTZ, scale_3, base_Z, n_streams: int, iters: int, hc_eps: float):
    """The [pre | post | comb] split: (pre_BTI, post_BTI, comb_BTIJ), float32."""
    I = n_streams
    z_BTZ = mix_BTZ.astype(jnp.float32)
    scale_3, base_Z = scale_3.astype(jnp.float32), base_Z.astype(jnp.float32)
    pre_BTI = jax.nn.sigmoid(z_BTZ[..., :I] * scale_3[0] + base_Z[:I]) + hc_eps
    post_BTI = 2 * jax.nn.sigmoid(z_BTZ[..., I:2 * I] * scale_3[1] + base_Z[I:2 * I])
    logits_BTIJ = (z_BTZ[..., 2 * I:] * scale_3[2] + base_Z[2 * I:]).reshape(*z_BTZ.shape[:-1], I, I)
    return pre_BTI, post_BTI, sinkhorn(logits_BTIJ, iters, hc_eps)


def collapse(x_BTID: jax.Array, pre_BTI: jax.Array) -> jax.Array:
    """y = Σ_i pre_i X_i in float32, returned in X's dtype; [B, T, D]."""
    y_BTD = jnp.einsum("BTI,BTID->BTD", pre_BTI, x_BTID.astype(jnp.float32), precision=HIGHEST)
    return y_BTD.astype(x_BTID.dtype)


def expand(f_BTD: jax.Array, x_BTID: jax.Array, post_BTI: jax.Array, comb_BTIJ: jax.Array) -> jax.Array:
    """X'_j = post_j F + Σ_i comb_ij X_i (comb transposed) in float32, returned in X's dtype."""
    mixed_BTJD = jnp.einsum("BTIJ,BTID->BTJD", comb_BTIJ, x_BTID.astype(jnp.float32), precision=HIGHEST)
    new_BTJD = post_BTI[..., None] * f_BTD.astype(jnp.float32)[:, :, None, :] + mixed_BTJD
    return new_BTJD.astype(x_BTID.dtype)


def hc_pre(x_BTID, fn_IDZ, scale_3, base_Z, *, iters: int, hc_eps: float, norm_eps: float):
    """The sub-layer input and the maps for hc_post: (y_BTD, post_BTI, comb_BTIJ)."""
    pre_BTI, post_BTI, comb_BTIJ = split_mixes(
        mixes(x_BTID, fn_IDZ, norm_eps), scale_3, base_Z, x_BTID.shape[-2], iters, hc_eps
    )
    return collapse(x_BTID, pre_BTI), post_BTI, comb_BTIJ


def hc_head(x_BTID, fn_IDJ, scale_1, base_J, *, hc_eps: float, norm_eps: float) -> jax.Array:
    """The final read of the streams: Σ_i (σ(α m_i + b_i) + ε) X_i; [B, T, D] in X's dtype."""
    m_BTJ = mixes(x_BTID, fn_IDJ, norm_eps)
    pre_BTJ = jax.nn.sigmoid(m_BTJ * scale_1.astype(jnp.float32)[0] + base_J.astype(jnp.float32)) + hc_eps
    return collapse(x_BTID, pre_BTJ)


def expand_streams(x_BTD: jax.Array, hc_mult: int) -> jax.Array:
    """The embedding copied onto the I streams, [B, T, I, D] (V4 `Transformer.forward`)."""
    return jnp.broadcast_to(x_BTD[:, :, None, :], (*x_BTD.shape[:2], hc_mult, x_BTD.shape[-1]))


def _fn_param(module: nn.Module, I: int, D: int, Z: int) -> jax.Array:
    return param(module, "fn", (None, "embed", None), (I, D, Z), dense_init([0, 1], [2]))


class HyperConnection(nn.Module):
    """One mHC site (around attention or around the FFN): `hc_pre` before the sub-layer, `hc_post` after."""

    hc_mult: int  # I
    dim: int  # D
    sinkhorn_iters: int = 20
    hc_eps: float = 1e-6
    norm_eps: float = 1e-6

    def setup(self):
        I, D = self.hc_mult, self.dim
        Z = (2 + I) * I
        self.fn_IDZ = _fn_param(self, I, D, Z)
        self.base_Z = param(self, "base", (None,), (Z,), nn.initializers.zeros)
        self.scale_3 = param(self, "scale", (None,), (3,), nn.initializers.constant(SCALE_INIT))

    def hc_pre(self, x_BTID: jax.Array) -> tuple[jax.Array, jax.Array, jax.Array]:
        """(y_BTD in X's dtype, post_BTI, comb_BTIJ float32): the sub-layer input and the maps."""
        x_BTID = constrain(x_BTID, STREAMS)
        y_BTD, post_BTI, comb_BTIJ = hc_pre(
            x_BTID, self.fn_IDZ, self.scale_3, self.base_Z,
            iters=self.sinkhorn_iters, hc_eps=self.hc_eps, norm_eps=self.norm_eps,
        )
        return constrain(y_BTD, ("act_batch", "act_seq", "act_embed")), post_BTI, comb_BTIJ

    def maps(self, x_BTID: jax.Array) -> tuple[jax.Array, jax.Array, jax.Array]:
        """(pre_BTI, post_BTI, comb_BTIJ) of this site, float32, without collapsing (single-pass mHC:
        the sub-layer input is collapsed with the previous site's pre)."""
        x_BTID = constrain(x_BTID, STREAMS)
        return split_mixes(mixes(x_BTID, self.fn_IDZ, self.norm_eps), self.scale_3, self.base_Z,
                           self.hc_mult, self.sinkhorn_iters, self.hc_eps)

    def hc_post(self, f_BTD, x_BTID, post_BTI, comb_BTIJ) -> jax.Array:
        """The new streams [B, T, I, D] (in X's dtype) from the sub-layer output F and the old streams."""
        return constrain(expand(f_BTD, x_BTID, post_BTI, comb_BTIJ), STREAMS)


class HyperHead(nn.Module):
    """The final learned read of the streams (V4 `hc_head`), before the model's final norm."""

    hc_mult: int  # I
    dim: int  # D
    hc_eps: float = 1e-6
    norm_eps: float = 1e-6

    @nn.compact
    def __call__(self, x_BTID: jax.Array) -> jax.Array:
        I, D = self.hc_mult, self.dim
        fn_IDJ = _fn_param(self, I, D, I)
        base_J = param(self, "base", (None,), (I,), nn.initializers.zeros)
        scale_1 = param(self, "scale", (None,), (1,), nn.initializers.constant(SCALE_INIT))
        y_BTD = hc_head(constrain(x_BTID, STREAMS), fn_IDJ, scale_1, base_J, hc_eps=self.hc_eps,
                        norm_eps=self.norm_eps)
        return constrain(y_BTD, ("act_batch", "act_seq", "act_embed"))
