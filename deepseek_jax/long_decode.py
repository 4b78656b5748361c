"""Decoding after a long context: chunked prefill of a random context, then timed one-token steps.

`decode_at(cfg, context_len, n_new, chunk)` is the long-context benchmark's measurement (e.g.
configs/model/tiny_v4_1m.yaml at 1,000,000+ tokens): the prefill's wall time, the median decode step
after it, and the cache's size (every leaf's nbytes; per token = (that − the fixed part, the cache of
length 0: windows and compressor states) / cache length). The context is random token ids; the new
tokens are greedy. `check_tail` also feeds the context's last tokens a second way (one-token steps
instead of one chunk) and reports the largest logit difference between the two paths.
"""

import time

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from deepseek_jax.generate import PREFILL_CHUNK, _engram_state, _step, prefill
from deepseek_jax.models import build_cache, build_model, init_inputs


def cache_nbytes(cache) -> int:
    """Bytes of a cache pytree (arrays or ShapeDtypeStructs)."""
    return int(sum(x.size * jnp.dtype(x.dtype).itemsize for x in jax.tree.leaves(cache)))


def random_variables(model: nn.Module, seed: int = 0):
    """The model's initialised variables (unboxed), for timing and cache measurements."""
    tokens, kwargs = init_inputs(model.cfg, 8)
    return nn.unbox(jax.jit(model.init)(jax.random.key(seed), tokens, **kwargs))


def _one_token_steps(model, variables, tokens_1T, cache, index: int, engram):
    """(last logits [1, V], cache) after T one-token `_step`s from slot `index`."""
    for t in range(tokens_1T.shape[1]):
        rows = None if engram is None else engram.step(tokens_1T[:, t : t + 1])
        logits_1V, cache, _ = _step(model, variables, jnp.asarray(tokens_1T[:, t]), None, cache,
                                    jnp.int32(index + t), None, rows)
    return logits_1V, cache


def _timed_prefill(model, variables, tokens_1P, cache, chunk: int, rows):
    """(last logits, cache, seconds, tokens per second after the first call, which compiles)."""
    P = tokens_1P.shape[1]
    first = min(chunk or P, P)
    start = time.perf_counter()
    logits_1V, cache = prefill(model, variables, tokens_1P[:, :first], cache, 0,
                               engram_rows=None if rows is None else rows[:, :first])
    jax.block_until_ready(logits_1V)
    after_first = time.perf_counter()
    if P > first:
        logits_1V, cache = prefill(model, variables, tokens_1P[:, first:], cache, chunk,
                                   engram_rows=None if rows is None else rows[:, first:], index=first)
    jax.block_until_ready(logits_1V)
    end = time.perf_counter()
    return logits_1V, cache, end - start, (P - first) / max(end - after_first, 1e-9)


def decode_at(cfg, context_len: int, n_new: int = 8, chunk: int = PREFILL_CHUNK, variables=None, seed: int = 0,
              check_tail: int = 0) -> dict:
    """Prefills `context_len` random tokens `chunk` at a time, then decodes `n_new` greedy tokens at
    positions context_len … context_len + n_new − 1. dict(prefill_s, prefill_tokens_per_s (after the
    first call, which compiles; a ragged last chunk compiles too), step_ms (median step after the first,
    which compiles), cache_bytes, fixed_bytes, bytes_per_token, first_position, finite (every step's
    logits), tokens; with check_tail = k > 0: tail_max_abs_diff, the largest |logit difference| at the
    context's last token between its last k tokens prefilled as one chunk (timed in prefill_s) and fed
    one a step)."""
    if not (0 <= check_tail < context_len and n_new >= 1 and context_len + n_new <= cfg.max_seq_len):
        raise ValueError(f"decode_at: need 0 <= check_tail ({check_tail}) < context_len ({context_len}), n_new "
                         f"({n_new}) >= 1 and context_len + n_new <= model.max_seq_len ({cfg.max_seq_len})")
    model = build_model(cfg)
    variables = random_variables(model, seed) if variables is None else variables
    L, head = context_len + n_new, context_len - check_tail
    tokens_1L = np.random.default_rng(seed).integers(1, cfg.vocab_size, (1, L)).astype(np.int32)
    fold = None if cfg.engram is None else np.arange(cfg.vocab_size) % cfg.engram.compressed_vocab_size
    engram = _engram_state(cfg, fold, 1)
    rows = None if engram is None else engram.step(tokens_1L[:, :context_len])
    logits_1V, cache, prefill_s, rate = _timed_prefill(model, variables, tokens_1L[:, :head],
                                                       build_cache(cfg, 1, L), chunk, rows)
    out = {"context_len": context_len, "first_position": context_len, "prefill_tokens_per_s": rate}
    if check_tail:  # the last k tokens as one chunk; the same from a copy of the cache, one token a step
        twin, start = jax.tree.map(jnp.copy, cache), time.perf_counter()
        logits_1V, cache = prefill(model, variables, tokens_1L[:, head:context_len], cache, 0,
                                   engram_rows=None if rows is None else rows[:, head:], index=head)
        prefill_s += time.perf_counter() - start
        twin_engram = _engram_state(cfg, fold, 1)
        if twin_engram is not None:
            twin_engram.step(tokens_1L[:, :head])
        step_1V, _ = _one_token_steps(model, variables, tokens_1L[:, head:context_len], twin, head, twin_engram)
        out["tail_max_abs_diff"] = float(jnp.max(jnp.abs(step_1V - logits_1V)))
    times, finite, new = [], bool(jnp.isfinite(logits_1V).all()), []
    for i in range(n_new):
        token_1 = jnp.argmax(logits_1V, axis=-1).astype(jnp.int32)
        new.append(int(token_1[0]))
        start = time.perf_counter()
        logits_1V, cache = _one_token_steps(model, variables, np.asarray(token_1)[:, None], cache,
                                            context_len + i, engram)
        jax.block_until_ready(logits_1V)
        times.append(time.perf_counter() - start)
        finite &= bool(jnp.isfinite(logits_1V).all())
    total, fixed = cache_nbytes(cache), cache_nbytes(jax.eval_shape(lambda: build_cache(cfg, 1, 0)))
    out.update(prefill_s=prefill_s, step_ms=1e3 * float(np.median(times[1:] if n_new > 1 else times)),
               cache_bytes=total, fixed_bytes=fixed, bytes_per_token=(total - fixed) / L, finite=finite, tokens=new)
    return out
