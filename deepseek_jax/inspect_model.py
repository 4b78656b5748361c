"""The current main job: build a model from a config, print its parameters, run a forward pass.

(The training loop replaces this as the main job when it lands.)
"""

import time

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from deepseek_jax.config import ModelConfig
from deepseek_jax.model import build_model
from deepseek_jax.params import param_summary


class InputError(ValueError):
    """Token ids or shapes that the model cannot take; the message names them."""


def check_tokens(tokens_BT: np.ndarray, cfg: ModelConfig) -> None:
    """Host-side validation: inside jit an out-of-range id would be clamped silently."""
    tokens_BT = np.asarray(tokens_BT)
    if tokens_BT.ndim != 2 or not np.issubdtype(tokens_BT.dtype, np.integer):
        raise InputError(f"tokens must be an integer array [batch, seq], got {tokens_BT.dtype} {tokens_BT.shape}")
    if tokens_BT.shape[1] > cfg.max_seq_len:
        raise InputError(f"sequence length {tokens_BT.shape[1]} exceeds model.max_seq_len={cfg.max_seq_len}")
    bad = (tokens_BT < 0) | (tokens_BT >= cfg.vocab_size)
    if bad.any():
        b, t = map(int, np.argwhere(bad)[0])
        raise InputError(
            f"token id {int(tokens_BT[b, t])} at [{b}, {t}] is outside [0, vocab_size={cfg.vocab_size})"
        )


def inspect(cfg: ModelConfig, batch: int = 2, seq_len: int = 64, seed: int = 0) -> dict:
    """Initialises the model, prints its parameter table, runs and times one jitted forward pass."""
    print(param_summary(cfg))
    model = build_model(cfg)
    tokens_BT = np.random.default_rng(seed).integers(0, cfg.vocab_size, (batch, seq_len))
    check_tokens(tokens_BT, cfg)
    t0 = time.perf_counter()
    variables = nn.unbox(jax.jit(model.init)(jax.random.key(seed), jnp.asarray(tokens_BT)))
    jax.block_until_ready(variables)
    t_init = time.perf_counter() - t0
    forward = jax.jit(model.apply)
    t0 = time.perf_counter()
    out = jax.block_until_ready(forward(variables, jnp.asarray(tokens_BT)))
    t_first = time.perf_counter() - t0
    t0 = time.perf_counter()
    out = jax.block_until_ready(forward(variables, jnp.asarray(tokens_BT)))
    t_step = time.perf_counter() - t0
    logits = np.asarray(out.logits)
    nll = -np.take_along_axis(
        jax.nn.log_softmax(logits[:, :-1]), tokens_BT[:, 1:, None], -1
    ).mean()
    print(f"\nforward on {batch}x{seq_len} random tokens ({jax.devices()[0].platform}):")
    print(f"  logits {logits.shape}, finite: {bool(np.isfinite(logits).all())}")
    print(f"  next-token loss {nll:.3f} (uniform would be ln V = {np.log(cfg.vocab_size):.3f})")
    if out.mtp_logits is not None:
        print(f"  MTP logits {tuple(out.mtp_logits.shape)}")
    if out.expert_counts is not None:
        counts = np.asarray(out.expert_counts)
        print(f"  tokens per expert, MoE layer 0: {counts[0].tolist()}")
    print(f"  init {t_init:.1f}s, first forward (compile) {t_first:.1f}s, next forward {t_step * 1e3:.1f}ms")
    return {"logits": logits, "loss": float(nll)}
