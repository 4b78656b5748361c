"""The audio front-end (ours; docs/multimodal.md): log-mel frames -> LM-width audio tokens.

    for each stride s in conv_strides:   x <- GELU_erf(Conv1d_{k=3, pad 1, stride s}(x · [t < n]) + b),
                                         n <- ⌈n / s⌉
    tokens = W_p2 · GELU_erf(W_p1 · x + b_p1) + b_p2

Frames at or beyond a clip's valid length n are zeroed before every convolution, so a clip's tokens
equal those of the clip run alone without padding (the convolution's own padding is zeros too). A
clip of F frames gives `AudioConfig.n_tokens(F)` tokens; tokens past n_tokens(n) are filler the merge
never reads.

Local letters (this file): A clips of a row, F log-mel frames, N mel bins, C conv channels, U tokens
of a clip (conv outputs), I a conv's input channels, Z a flattened batch of clips (B·A).
"""

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from deepseek_jax.axes import dense_init, param
from deepseek_jax.config.media import AudioConfig

zeros = nn.initializers.zeros


def conv1d_k3(x_ZFI: jax.Array, w_3IC: jax.Array, b_C: jax.Array, stride: int) -> jax.Array:
    """Conv1d, kernel 3, zero padding 1, stride s: out[u] = b + Σ_k x[s·u + k − 1] W[k]; ⌈F/s⌉ outputs."""
    F = x_ZFI.shape[1]
    U = -(-F // stride)
    x_pad = jnp.pad(x_ZFI, ((0, 0), (1, 1), (0, 0)))
    taps = [x_pad[:, k : k + stride * (U - 1) + 1 : stride] for k in range(3)]
    return sum(jnp.einsum("ZUI,IC->ZUC", tap_ZUI, w_3IC[k]) for k, tap_ZUI in enumerate(taps)) + b_C


def audio_frontend(mel_ZFN, mel_len_Z, convs, strides, w_p1_CD, b_p1_D, w_p2_DD, b_p2_D):
    """Tokens [Z, U, D] of each clip; `convs` = [(w [3, I, C], b [C])] per stride."""
    x, n_Z = mel_ZFN, mel_len_Z
    for (w_3IC, b_C), s in zip(convs, strides):
        valid_ZF = jnp.arange(x.shape[1])[None, :] < n_Z[:, None]
        x = jax.nn.gelu(conv1d_k3(jnp.where(valid_ZF[..., None], x, 0), w_3IC, b_C, s), approximate=False)
        n_Z = -(-n_Z // s)
    h_ZUD = jax.nn.gelu(jnp.einsum("ZUC,CD->ZUD", x, w_p1_CD) + b_p1_D, approximate=False)
    return h_ZUD @ w_p2_DD + b_p2_D


class AudioFrontEnd(nn.Module):
    """log-mel [B, A, F, n_mels] and valid lengths [B, A] -> tokens [B, A, n_tokens(F), out_dim].

    Params: `w_conv{i}` [3, I, C] (I = n_mels for i = 0, else C), `b_conv{i}` [C]; projector `w_proj1`
    [C, D], `b_proj1` [D], `w_proj2` [D, D], `b_proj2` [D]."""

    cfg: AudioConfig
    out_dim: int  # D, the LM width
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, mel_BAFN: jax.Array, mel_len_BA: jax.Array) -> jax.Array:
        cfg, D, dt = self.cfg, self.out_dim, self.dtype
        C = cfg.conv_channels
        convs = []
        for i, _ in enumerate(cfg.conv_strides):
            I = cfg.n_mels if i == 0 else C
            w = param(self, f"w_conv{i}", (None, None, "mlp"), (3, I, C), dense_init([0, 1], [2]))
            convs.append((w.astype(dt), param(self, f"b_conv{i}", ("mlp",), (C,), zeros).astype(dt)))
        proj = (
            param(self, "w_proj1", ("mlp", "embed"), (C, D), dense_init([0], [1])),
            param(self, "b_proj1", ("embed",), (D,), zeros),
            param(self, "w_proj2", (None, "embed"), (D, D), dense_init([0], [1])),
            param(self, "b_proj2", ("embed",), (D,), zeros),
        )
        B, A, F, N = mel_BAFN.shape
        tokens_ZUD = audio_frontend(mel_BAFN.reshape(B * A, F, N).astype(dt), mel_len_BA.reshape(B * A), convs,
                                    cfg.conv_strides, *(w.astype(dt) for w in proj))
        return tokens_ZUD.reshape(B, A, cfg.n_tokens(F), D)
