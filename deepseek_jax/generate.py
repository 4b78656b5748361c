"""Sampling with the absorbed-MLA latent cache: greedy, temperature and top-p, stopping at eos.

Prompts of different lengths are left-padded to a common length P; each row's padding slots are
excluded from attention (`cache_start_B`) and its positions start at 0 at its first real token.
One jitted prefill over the prompts, then one jitted step per new token.
"""

from functools import partial

import jax
import jax.numpy as jnp
import numpy as np

import flax.linen as nn

from deepseek_jax.models import build_cache


def sample_logits(logits_BV: jax.Array, key, temperature: float, top_p: float) -> jax.Array:
    """Greedy when temperature == 0; else temperature scaling and nucleus (top-p) filtering."""
    if temperature <= 0:
        return jnp.argmax(logits_BV, axis=-1).astype(jnp.int32)
    logits_BV = logits_BV.astype(jnp.float32) / temperature
    if top_p < 1.0:
        sorted_BV = jnp.sort(logits_BV, axis=-1)[:, ::-1]
        cum_BV = jnp.cumsum(jax.nn.softmax(sorted_BV, axis=-1), axis=-1)
        # smallest set whose mass reaches top_p: keep a token if the mass before it is < top_p
        n_keep_B = jnp.sum(cum_BV - jax.nn.softmax(sorted_BV, axis=-1) < top_p, axis=-1)
        cutoff_B = jnp.take_along_axis(sorted_BV, n_keep_B[:, None] - 1, axis=-1)
        logits_BV = jnp.where(logits_BV < cutoff_B, -jnp.inf, logits_BV)
    return jax.random.categorical(key, logits_BV, axis=-1).astype(jnp.int32)


@partial(jax.jit, static_argnames=("model",))
def _prefill(model: nn.Module, variables, tokens_BP, positions_BP, cache, start_B):
    out = model.apply(variables, tokens_BP, positions_BP, cache=cache, cache_index=0, cache_start_B=start_B, mtp=False)
    return out.logits[:, -1], out.cache


@partial(jax.jit, static_argnames=("model",), donate_argnames=("cache",))
def _step(model: nn.Module, variables, token_B, position_B, cache, index, start_B):
    positions_B1 = None if position_B is None else position_B[:, None]
    out = model.apply(
        variables, token_B[:, None], positions_B1, cache=cache, cache_index=index,
        cache_start_B=start_B, mtp=False,
    )
    return out.logits[:, -1], out.cache


def generate(
    model: nn.Module,
    variables,
    prompts: list[list[int]],
    max_new_tokens: int,
    eos_id: int,
    pad_id: int = 0,
    temperature: float = 0.0,
    top_p: float = 1.0,
    seed: int = 0,
) -> list[list[int]]:
    """New token ids for each prompt (eos excluded), at most `max_new_tokens` each."""
    cfg = model.cfg
    B, P = len(prompts), max(len(p) for p in prompts)
    if min(len(p) for p in prompts) == 0:
        raise ValueError("every prompt needs at least one token")
    if P + max_new_tokens > cfg.max_seq_len:
        raise ValueError(f"prompt ({P}) + new tokens ({max_new_tokens}) exceed model.max_seq_len={cfg.max_seq_len}")
    start_B = np.array([P - len(p) for p in prompts], np.int32)
    if cfg.row_positions and start_B.any():  # row positions admit no left padding: one prompt at a time
        return [generate(model, variables, [p], max_new_tokens, eos_id, pad_id, temperature, top_p, seed + i)[0]
                for i, p in enumerate(prompts)]
    tokens_BP = np.array([[pad_id] * s + list(p) for s, p in zip(start_B, prompts)], np.int32)
    positions_BP = np.maximum(np.arange(P)[None, :] - start_B[:, None], 0).astype(np.int32)
    cache = build_cache(cfg, B, P + max_new_tokens)
    rows = cfg.row_positions  # the model derives each row's positions itself and takes no start slots
    positions_BP, start_B = (None, None) if rows else (positions_BP, start_B)
    logits_BV, cache = _prefill(model, variables, tokens_BP, positions_BP, cache, start_B)
    key = jax.random.key(seed)
    done = np.zeros(B, bool)
    out: list[list[int]] = [[] for _ in range(B)]
    for i in range(max_new_tokens):
        key, sub = jax.random.split(key)
        token_B = sample_logits(logits_BV, sub, temperature, top_p)
        token_np = np.asarray(token_B)
        for b in range(B):
            if not done[b]:
                done[b] = token_np[b] == eos_id
                if not done[b]:
                    out[b].append(int(token_np[b]))
        if done.all() or i == max_new_tokens - 1:
            break
        position_B = None if rows else jnp.asarray(P + i - start_B, jnp.int32)
        logits_BV, cache = _step(model, variables, token_B, position_B, cache, jnp.int32(P + i), start_B)
    return out


def sample(model: nn.Module, variables, tokenizer, prompts: list[str], max_new_tokens: int,
           temperature: float = 0.0, top_p: float = 1.0, seed: int = 0) -> list[str]:
    """Completions of text prompts (`generate` on their token ids, decoded back to text)."""
    ids = [tokenizer.encode(p) for p in prompts]
    new = generate(model, variables, ids, max_new_tokens, tokenizer.eos_id, tokenizer.pad_id,
                   temperature, top_p, seed)
    return [tokenizer.decode(n) for n in new]
