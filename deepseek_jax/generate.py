"""Sampling with the absorbed-MLA latent cache: greedy, temperature and top-p, stopping at eos.

Prompts of different lengths are left-padded to a common length P; each row's padding slots are
excluded from attention (`cache_start_B`) and its positions start at 0 at its first real token.
The prompt goes into the cache `prefill_chunk` tokens per jitted call (cache_index = slots written so
far; the same tokens as one call, bounded activation memory), then one jitted step per new token.
Models with row positions (V4 / V4.1: compression blocks and windows are a row's own slots) admit no
left padding: prompts of one length share a prefill, each row keeps its own slot count, and all rows
decode in one jitted step, a batch-1 step vmapped over the rows with a [B] cache index (`_row_step`).
A model with Engram gets its n-gram table rows hashed on the host (engram_hash.EngramHashState: the
prompt at prefill, then each new token), with the left padding dead so a row hashes as if unpadded.
A model with DSpark (V4.1) can decode greedily with speculation (`speculative=True`,
`speculative_generate`): drafts verified in one pass, the same tokens as greedy decoding, fewer
main-model passes when the drafts are right (its prefill is one call, its batch rows one length).
Prompts with images, audio or video: generate_media.py (each prefilled with its media, then `decode`).
"""

import copy
import math
from functools import lru_cache, partial

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from deepseek_jax.engram_hash import EngramHashState, compressed_vocab, engram_layout
from deepseek_jax.inspect_model import InputError
from deepseek_jax.models import build_cache, dspark


def check_sampling(max_new_tokens: int, temperature: float = 0.0, top_p: float = 1.0,
                   prefill_chunk: int | None = None, speculative: bool = False, *, flags: bool = False) -> None:
    """An InputError naming the argument (flags: as its CLI flag, --top-p) and its value when a sampling
    argument is out of range. Checked on the host because inside `sample_logits` a negative temperature
    would silently mean greedy and a NaN one garbage."""
    name = (lambda a: "--" + a.replace("_", "-")) if flags else (lambda a: a)  # noqa: E731
    if max_new_tokens < 1:
        raise InputError(f"{name('max_new_tokens')} must be >= 1, got {max_new_tokens}")
    if not (math.isfinite(temperature) and temperature >= 0):
        raise InputError(f"{name('temperature')} must be a finite number >= 0 (0 = greedy), got {temperature}")
    if not 0 < top_p <= 1:  # False for NaN too
        raise InputError(f"{name('top_p')} must be in (0, 1] (1 = no filtering), got {top_p}")
    if prefill_chunk is not None and prefill_chunk < 0:
        raise InputError(f"{name('prefill_chunk')} must be >= 0 (0 = the whole prompt at once), got {prefill_chunk}")
    if speculative and temperature > 0:
        raise InputError(f"speculative decoding is greedy only: {name('temperature')} must be 0, got {temperature}")


def sample_logits(logits_BV: jax.Array, key, temperature: float, top_p: float) -> jax.Array:
    """Greedy when temperature == 0; else temperature scaling and nucleus (top-p) filtering: the smallest
    set of most likely tokens whose mass reaches top_p, never fewer than one (top_p -> 0 tends to greedy)."""
    if temperature <= 0:
        return jnp.argmax(logits_BV, axis=-1).astype(jnp.int32)
    logits_BV = logits_BV.astype(jnp.float32) / temperature
    if top_p < 1.0:
        sorted_BV = jnp.sort(logits_BV, axis=-1)[:, ::-1]
        cum_BV = jnp.cumsum(jax.nn.softmax(sorted_BV, axis=-1), axis=-1)
        # smallest set whose mass reaches top_p: keep a token if the mass before it is < top_p
        # at least the most likely token: with none kept, the index -1 below would keep every token
        n_keep_B = jnp.maximum(jnp.sum(cum_BV - jax.nn.softmax(sorted_BV, axis=-1) < top_p, axis=-1), 1)
        cutoff_B = jnp.take_along_axis(sorted_BV, n_keep_B[:, None] - 1, axis=-1)
        logits_BV = jnp.where(logits_BV < cutoff_B, -jnp.inf, logits_BV)
    return jax.random.categorical(key, logits_BV, axis=-1).astype(jnp.int32)


PREFILL_CHUNK = 4096  # default prompt tokens per prefill call (memory only: the same tokens)


@partial(jax.jit, static_argnames=("model",))
def _prefill(model: nn.Module, variables, tokens_BP, positions_BP, cache, start_B, engram_rows=None, media=None,
             index=0):
    """Appends the P tokens at slot `index` (0: a whole prompt)."""
    out = model.apply(variables, tokens_BP, positions_BP, cache=cache, cache_index=index, cache_start_B=start_B,
                      mtp=False, engram_rows=engram_rows, media=media)
    return out.logits[:, -1], out.cache, out.captures  # captures: DSpark's windows (speculative decoding)


def prefill(model: nn.Module, variables, tokens_BP, cache, chunk: int | None = None, positions_BP=None,
            start_B=None, engram_rows=None, index: int = 0):
    """(last logits [B, V], cache) after feeding the P tokens tokens_BP into `cache` from slot `index`
    (0: an empty cache), `chunk` tokens per jitted call (None: PREFILL_CHUNK; 0: all at once), each at
    cache_index = the slots written so far. positions_BP / start_B (left padding) and engram_rows
    [B, P, L, K] are sliced alongside."""
    P = tokens_BP.shape[1]
    chunk = PREFILL_CHUNK if chunk is None else chunk
    if chunk < 0:
        raise ValueError(f"prefill_chunk must be >= 0 (0 = the whole prompt in one call), got {chunk}")
    step = chunk or P
    for c in range(0, P, step):
        cut = (slice(None), slice(c, c + step))
        logits_BV, cache, _ = _prefill(model, variables, jnp.asarray(tokens_BP[cut]),
                                       None if positions_BP is None else positions_BP[cut], cache, start_B,
                                       None if engram_rows is None else engram_rows[cut], None, jnp.int32(index + c))
    return logits_BV, cache


@partial(jax.jit, static_argnames=("model",), donate_argnames=("cache",))
def _step(model: nn.Module, variables, token_B, position_B, cache, index, start_B, engram_rows=None):
    positions_B1 = None if position_B is None else position_B[:, None]
    out = model.apply(
        variables, token_B[:, None], positions_B1, cache=cache, cache_index=index,
        cache_start_B=start_B, mtp=False, engram_rows=engram_rows,
    )
    return out.logits[:, -1], out.cache, out.captures


@lru_cache(maxsize=None)
def _batch_axes(cfg) -> tuple[int, ...]:
    """Each cache leaf's batch axis (flattened order): the one axis whose size follows build_cache's batch."""
    two, three = (jax.tree.leaves(jax.eval_shape(partial(build_cache, cfg, b, 256))) for b in (2, 3))
    axes = tuple(tuple(i for i, (m, n) in enumerate(zip(a.shape, b.shape)) if m != n) for a, b in zip(two, three))
    if any(len(a) != 1 for a in axes):
        raise ValueError(f"every cache leaf needs exactly one batch axis, found {axes}")
    return tuple(a[0] for a in axes)


@partial(jax.jit, static_argnames=("model",))
def _row_step(model: nn.Module, variables, token_B, cache, index_B, engram_rows=None):
    """One new token per row at its own slot index_B[b] (rows with their own slot counts: row
    positions): the batch-1 step vmapped over the cache's rows. (last logits [B, V], cache)."""
    axes = jax.tree.unflatten(jax.tree.structure(cache), _batch_axes(model.cfg))

    def one(token, cache_row, index, rows):
        cache_1 = jax.tree.map(jnp.expand_dims, cache_row, axes)
        out = model.apply(variables, token[None, None], cache=cache_1, cache_index=index, mtp=False,
                          engram_rows=None if rows is None else rows[None])
        return out.logits[0, -1], jax.tree.map(jnp.squeeze, out.cache, axes)

    return jax.vmap(one, in_axes=(0, axes, 0, 0), out_axes=(0, axes))(token_B, cache, index_B, engram_rows)


def _put_rows(cache, rows_cache, rows: np.ndarray, cfg):
    """`cache` with its rows `rows` replaced by those of rows_cache (a cache of len(rows) rows)."""
    leaves, tree = jax.tree.flatten(cache)
    put = [x.at[(slice(None),) * a + (rows,)].set(y)
           for x, y, a in zip(leaves, jax.tree.leaves(rows_cache), _batch_axes(cfg))]
    return jax.tree.unflatten(tree, put)


def _engram_state(cfg, engram_map: np.ndarray | None, batch_size: int) -> EngramHashState | None:
    """The host-side Engram hash state of a model with Engram (None without)."""
    if cfg.engram is None:
        return None
    if engram_map is None:
        raise ValueError("the model has Engram (model.engram): generate needs engram_map, the tokenizer's "
                         "compressed vocabulary (engram_hash.compressed_vocab(tokenizer))")
    cmap_V = np.asarray(engram_map, np.int64)
    # ids past the tokenizer's (an embedding larger than the vocabulary) can be sampled: they fold to the pad
    cmap_V = np.pad(cmap_V, (0, max(cfg.vocab_size - len(cmap_V), 0)), constant_values=cmap_V[cfg.engram.pad_id])
    return EngramHashState(engram_layout(cfg.engram), cmap_V, batch_size)


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
    engram_map: np.ndarray | None = None,
    speculative: bool = False,
    stats: dict | None = None,
    prefill_chunk: int | None = None,
) -> list[list[int]]:
    """New token ids for each prompt (eos excluded), at most `max_new_tokens` each. engram_map: the
    tokenizer's compressed vocabulary (`engram_hash.compressed_vocab`), needed iff the model has Engram.
    prefill_chunk: prompt tokens per prefill call (None: PREFILL_CHUNK, 0: one call; the same tokens).
    speculative=True (a DSpark model, greedy): `speculative_generate`, the same tokens (its prefill in
    one call); its acceptance statistics go into `stats` when given."""
    cfg = model.cfg
    check_sampling(max_new_tokens, temperature, top_p, prefill_chunk, speculative)
    check_prompts(prompts, max_new_tokens, cfg.max_seq_len)
    if speculative:  # DSpark drafts verified by the main model: greedy decoding's tokens
        return _speculative(model, variables, prompts, max_new_tokens, eos_id, engram_map, stats)
    B, P = len(prompts), max(len(p) for p in prompts)
    start_B = np.array([P - len(p) for p in prompts], np.int32)
    tokens_BP = np.array([[pad_id] * s + list(p) for s, p in zip(start_B, prompts)], np.int32)
    positions_BP = np.maximum(np.arange(P)[None, :] - start_B[:, None], 0).astype(np.int32)
    engram = _engram_state(cfg, engram_map, B)  # left padding is dead: n-grams start at the prompt
    engram_rows = None if engram is None else engram.step(tokens_BP, np.arange(P)[None, :] < start_B[:, None])
    sampling = (max_new_tokens, eos_id, temperature, top_p, seed)
    if cfg.row_positions and start_B.any():  # no left padding: each row at its own slots
        logits_BV, cache = _row_prefill(model, variables, tokens_BP, start_B, engram_rows, max_new_tokens,
                                        prefill_chunk)
        return decode(model, variables, logits_BV, cache, P - start_B, None, engram, *sampling)
    cache = build_cache(cfg, B, P + max_new_tokens)
    rows = cfg.row_positions  # the model derives each row's positions itself and takes no start slots
    positions_BP, start_B = (None, None) if rows else (positions_BP, start_B)
    logits_BV, cache = prefill(model, variables, tokens_BP, cache, prefill_chunk, positions_BP, start_B, engram_rows)
    return decode(model, variables, logits_BV, cache, P, start_B, engram, *sampling)


def check_prompts(prompts: list[list[int]], max_new_tokens: int, max_seq_len: int) -> None:
    """An InputError when there is no prompt, one is empty, or the longest one and max_new_tokens do not fit
    in max_seq_len (naming both)."""
    if not prompts:
        raise InputError("no prompts to complete")
    lengths = [len(p) for p in prompts]
    if min(lengths) == 0:
        raise InputError(f"prompt {lengths.index(0)} is empty: every prompt needs at least one token")
    if max(lengths) + max_new_tokens > max_seq_len:
        raise InputError(f"a prompt of {max(lengths)} tokens + max_new_tokens={max_new_tokens} exceed "
                         f"model.max_seq_len={max_seq_len}")


def _row_prefill(model, variables, tokens_BP, start_B, engram_rows, max_new_tokens, chunk):
    """(last logits [B, V], cache of B rows) of left-padded prompts prefilled without their padding:
    rows of one length together (a cache of their own, then written into their rows)."""
    cfg, (B, P) = model.cfg, tokens_BP.shape
    cache, logits_BV = build_cache(cfg, B, P + max_new_tokens), [None] * B
    for start in np.unique(start_B):
        rows = np.flatnonzero(start_B == start)
        last_RV, rows_cache = prefill(model, variables, tokens_BP[rows, start:],
                                      build_cache(cfg, len(rows), P + max_new_tokens), chunk,
                                      engram_rows=None if engram_rows is None else engram_rows[rows, start:])
        cache = _put_rows(cache, rows_cache, rows, cfg)
        for r, logits_V in zip(rows, last_RV):
            logits_BV[r] = logits_V
    return jnp.stack(logits_BV), cache


def decode(model: nn.Module, variables, logits_BV, cache, P: int, start_B, engram: EngramHashState | None,
           max_new_tokens: int, eos_id: int, temperature: float, top_p: float, seed: int) -> list[list[int]]:
    """The decode loop after a prefill of P slots (last logits `logits_BV`): one jitted step per new
    token. start_B: each row's first real slot (left padding), or None (every row starts at slot 0,
    positions = slots: models with row positions, prompts prefilled with media). P an array [B]: each
    row's own slot count (row positions, prompts of different lengths; start_B None)."""
    B = logits_BV.shape[0]
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
        position_B = None if start_B is None else jnp.asarray(P + i - start_B, jnp.int32)
        engram_rows = None if engram is None else engram.step(token_np[:, None])
        if np.ndim(P):  # rows at their own slots
            logits_BV, cache = _row_step(model, variables, token_B, cache, jnp.asarray(P + i, jnp.int32),
                                         engram_rows)
        else:
            logits_BV, cache, _ = _step(model, variables, token_B, position_B, cache, jnp.int32(P + i), start_B,
                                        engram_rows)
    return out


def sample(model: nn.Module, variables, tokenizer, prompts: list[str], max_new_tokens: int,
           temperature: float = 0.0, top_p: float = 1.0, seed: int = 0, speculative: bool = False,
           stats: dict | None = None, prefill_chunk: int | None = None) -> list[str]:
    """Completions of text prompts (`generate` on their token ids, decoded back to text)."""
    ids = [tokenizer.encode(p) for p in prompts]
    engram_map = None if model.cfg.engram is None else compressed_vocab(tokenizer)
    new = generate(model, variables, ids, max_new_tokens, tokenizer.eos_id, tokenizer.pad_id,
                   temperature, top_p, seed, engram_map, speculative, stats, prefill_chunk)
    return [tokenizer.decode(n) for n in new]


# ----------------------------------------------------------------------------------------------
# Speculative decoding with DSpark drafts (V4.1; models/dspark.py)


@partial(jax.jit, static_argnames=("model",))
def _forward(model: nn.Module, variables, tokens_BT, cache, index, engram_rows=None):
    """Logits [B, T, V], the new cache and DSpark's captures [B, T, C] of T tokens appended at `index`.
    Nothing is donated: verification must leave the cache it started from intact."""
    out = model.apply(variables, tokens_BT, cache=cache, cache_index=index, mtp=False, engram_rows=engram_rows)
    return out.logits, out.cache, out.captures


@partial(jax.jit, static_argnames=("cfg",))
def _draft(cfg, variables, y_B, rows_BPC, state: dspark.DraftState, n_new):
    """(Z greedy drafts [B, Z] after y, new DraftState): models/dspark.py `draft`."""
    drafts_BZ, _, state = dspark.draft(cfg, variables, y_B, rows_BPC, state, n_new)
    return drafts_BZ, state


def _speculative(model, variables, prompts, max_new_tokens, eos_id, engram_map, stats):
    """`generate(..., speculative=True)`: the tokens of `speculative_generate`, its statistics into `stats`."""
    tokens, spec_stats = speculative_generate(model, variables, prompts, max_new_tokens, eos_id, engram_map)
    if stats is not None:
        stats.update(spec_stats)
    return tokens


def _accepted(greedy_BT: np.ndarray, drafts_BZ: np.ndarray) -> int:
    """Drafts every row accepts: the longest prefix where the main model's greedy token (after y,
    d_1, …) equals the draft, minimised over rows (rows share one cache position)."""
    match_BZ = greedy_BT[:, : drafts_BZ.shape[1]] == drafts_BZ
    return int(np.cumprod(match_BZ, axis=1).sum(axis=1).min())


def _spec_stats(steps: int, accepted: int, Z: int) -> dict:
    return {"steps": steps, "drafted": steps * Z, "accepted": accepted,
            "accepted_per_step": accepted / max(steps, 1), "acceptance_rate": accepted / max(steps * Z, 1)}


def speculative_generate(model: nn.Module, variables, prompts: list[list[int]], max_new_tokens: int, eos_id: int,
                         engram_map: np.ndarray | None = None, media=None) -> tuple[list[list[int]], dict]:
    """Greedy decoding with DSpark drafting: (new tokens per prompt, eos excluded, exactly those of greedy
    `generate`; stats: steps, drafted, accepted, accepted_per_step, acceptance_rate).

    Each step drafts Z tokens from the last token y, verifies [y, d_1 … d_Z] in ONE main-model pass on
    the current cache, accepts the longest prefix d_1 … d_n the main model's greedy tokens agree with, and
    commits by re-running [y, d_1 … d_n] on the cache from before verification (caches are values, so it
    is still there; V4.1's windows and compressor states cannot be rolled back otherwise); when all Z are
    accepted the verification pass is the commit, when none is, greedy decoding's own step. Its last
    logits give the next y (n + 1 new tokens per step) and its captures the rows DSpark's windows take.
    The prefill is greedy decoding's too, media (`MediaInputs` of the prompts, generate_media.py) merged
    in; drafting reads only the main model's captures. Rows of a batch share one position: they accept
    the fewest drafts any of them does. Prompts of different lengths run one at a time (text only)."""
    cfg = model.cfg
    if cfg.dspark is None:
        raise InputError("speculative decoding drafts with DSpark: the model has no model.dspark")
    check_sampling(max_new_tokens)
    check_prompts(prompts, max_new_tokens, cfg.max_seq_len)
    if len({len(p) for p in prompts}) > 1:  # row positions: no left padding
        return _one_at_a_time(model, variables, prompts, max_new_tokens, eos_id, engram_map, media)
    B, P, Z = len(prompts), len(prompts[0]), cfg.dspark.block_size
    tokens_BP = np.array(prompts, np.int32)
    engram = _engram_state(cfg, engram_map, B)
    # the cache of greedy `generate`: verification past the budget writes nothing that is read (dropped)
    cache = build_cache(cfg, B, P + max_new_tokens)
    dead_BP = None if media is None else np.asarray(media.slots) >= 0  # no n-gram crosses a media span
    last_BV, cache, rows_BPC = _prefill(model, variables, tokens_BP, None, cache, None,
                                        None if engram is None else engram.step(tokens_BP, dead_BP), media)
    y_B = jnp.argmax(last_BV, axis=-1).astype(jnp.int32)
    state, n_new, pos = dspark.init_draft_state(cfg, B), P, P  # pos: y's position
    out, done = [[] for _ in range(B)], np.zeros(B, bool)
    _emit(out, done, np.asarray(y_B)[:, None], eos_id, max_new_tokens)
    steps = accepted = 0
    while pos + 1 - P < max_new_tokens and not done.all():
        drafts_BZ, state = _draft(cfg, variables, y_B, rows_BPC, state, jnp.int32(n_new))
        verify_BT = jnp.concatenate([y_B[:, None], drafts_BZ], axis=1)
        before = copy.deepcopy(engram)
        logits_BTV, cache_v, rows_v = _forward(model, variables, verify_BT, cache, jnp.int32(pos),
                                               None if engram is None else engram.step(np.asarray(verify_BT)))
        n = _accepted(np.asarray(jnp.argmax(logits_BTV, axis=-1)), np.asarray(drafts_BZ))
        last_BV = logits_BTV[:, -1]
        if n < Z:  # commit [y, d_1 … d_n] from the cache verification started from
            engram = before
            rows_e = None if engram is None else engram.step(np.asarray(verify_BT[:, : n + 1]))
            if n == 0:  # greedy decoding's step (it may take the old cache's buffers: nothing else reads it)
                last_BV, cache_v, rows_v = _step(model, variables, y_B, None, cache, jnp.int32(pos), None, rows_e)
            else:
                logits_BTV, cache_v, rows_v = _forward(model, variables, verify_BT[:, : n + 1], cache,
                                                       jnp.int32(pos), rows_e)
                last_BV = logits_BTV[:, -1]
        cache, y_B = cache_v, jnp.argmax(last_BV, axis=-1).astype(jnp.int32)
        _emit(out, done, np.concatenate([np.asarray(drafts_BZ[:, :n]), np.asarray(y_B)[:, None]], 1), eos_id,
              max_new_tokens)
        rows_BPC = jnp.pad(rows_v, ((0, 0), (0, Z - n), (0, 0)))  # one draft shape: Z + 1 rows, n + 1 real
        steps, accepted, n_new, pos = steps + 1, accepted + n, n + 1, pos + n + 1
    return out, _spec_stats(steps, accepted, Z)


def _one_at_a_time(model, variables, prompts, max_new_tokens, eos_id, engram_map, media):
    """`speculative_generate` of text prompts of different lengths, each alone; with media (MediaInputs
    of the whole batch, not split per prompt here) a ValueError."""
    if media is not None:
        raise ValueError(f"speculative_generate with media takes prompts of one length (no left padding), got "
                         f"lengths {[len(p) for p in prompts]}: run each prompt with its own media")
    runs = [speculative_generate(model, variables, [p], max_new_tokens, eos_id, engram_map) for p in prompts]
    steps, accepted = sum(r[1]["steps"] for r in runs), sum(r[1]["accepted"] for r in runs)
    return [r[0][0] for r in runs], _spec_stats(steps, accepted, model.cfg.dspark.block_size)


def _emit(out: list[list[int]], done: np.ndarray, tokens_BN: np.ndarray, eos_id: int, limit: int) -> None:
    """Appends new tokens to each unfinished row (an eos finishes it; at most `limit` per row)."""
    for b, row in enumerate(tokens_BN):
        for token in row:
            if done[b] or len(out[b]) >= limit:
                break
            done[b] = token == eos_id
            if not done[b]:
                out[b].append(int(token))
