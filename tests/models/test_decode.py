"""Decoding with the absorbed-MLA latent cache gives the full forward's logits (fp32, 1e-4)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from deepseek_jax.models import build_cache


@pytest.fixture(scope="module")
def tiny(tiny_model):
    return tiny_model("tiny", ["model.dtype=float32", "model.vocab_size=512"], T=40)


def test_cache_holds_only_latent_and_rope_key(tiny):
    cfg, *_ = tiny
    cache = build_cache(cfg, batch=2, max_len=48)
    C, R = cfg.mla.kv_lora_rank, cfg.mla.qk_rope_head_dim
    per_token = sum(a.shape[-1] for a in jax.tree.leaves(cache)) // len(cache)  # one slot per segment
    assert per_token == C + R  # numbers cached per token per layer
    assert cache["layers_1_3"][0].kv_latent.shape == (cfg.n_moe_layers, 2, 48, C)


def test_token_by_token_decoding_matches_full_forward(tiny):
    cfg, model, variables, tokens = tiny
    B, T = tokens.shape
    with jax.default_matmul_precision("highest"):
        full = jax.jit(lambda v, t: model.apply(v, t, mtp=False).logits)(variables, tokens)
        step = jax.jit(lambda v, t, c, i: model.apply(v, t, cache=c, cache_index=i)[0::2][:2])  # (logits, cache)
        cache = build_cache(cfg, B, max_len=T + 8)
        prefill = 13  # a prompt, then one token at a time
        logits, cache = step(variables, tokens[:, :prefill], cache, jnp.int32(0))
        pieces = [logits]
        for t in range(prefill, T):
            logits, cache = step(variables, tokens[:, t : t + 1], cache, jnp.int32(t))
            pieces.append(logits)
    decoded = jnp.concatenate(pieces, axis=1)
    err = float(jnp.abs(decoded - full).max())
    print(f"\ndecode vs full forward: max|Δlogit| = {err:.2e} over {T} positions")
    np.testing.assert_allclose(np.asarray(decoded), np.asarray(full), rtol=1e-4, atol=1e-4)
