"""MLA's attention math as pure functions (the layer is mla.py, DSA's parts dsa.py): which keys a
query sees, and dense attention naive (per-head keys) or absorbed (latent keys: decoding, and training
where `MLAConfig.absorbed_training`), streamed over key chunks, sparse over gathered keys, or through a fused kernel.

Visibility is computed per key chunk from the queries' slots and document ids and the keys' document
ids (`key_visible`), never stored as a [T, S] mask: key slot s is visible to the query at slot t iff
s <= t and both are in the same document. `mla_streamed` walks the keys k_block at a time with an
online softmax (stream.py), skipping chunks wholly in a query block's future, so a query block holds
one chunk's [b, N, k_block] logits. The whole-mask `mla_naive` / `mla_absorbed` stay as oracles.

Letters: N heads, H q/k head dim without rope, R rope dim, O value head dim, C KV latent, S key
slots, K keys of a chunk, U keys selected per query.
"""

import jax
import jax.numpy as jnp

from deepseek_jax.config import ConfigError
from deepseek_jax.layers.attention import stream
from deepseek_jax.layers.attention.core import gather_keys, masked_softmax
from deepseek_jax.sharding import context_axes


def key_visible(q_slot_BT, q_doc_BT, s_K, k_doc_BK) -> jax.Array:
    """[B, T, K]: key slot s is visible to the query at slot t iff s <= t and both carry the same
    document id (segment ids; with a cache, 0 for real slots and -1 for a left-padded prompt's)."""
    causal_BTK = s_K[None, None, :] <= q_slot_BT[:, :, None]
    return causal_BTK & (k_doc_BK[:, None, :] == q_doc_BT[:, :, None])


def key_positions(B, T, S, segment_ids_BT, cached: bool, cache_index, start_B):
    """(q_slot [B, T], q_doc [B, T], k_doc [B, S]): what `key_visible` compares. A full forward:
    slots 0..T-1, docs = segment ids (0 without). A cache: slots cache_index + t; key slots
    before start_B[b] (a left-padded prompt's padding) get doc -1, so no query sees them."""
    i32 = jnp.int32
    if not cached:
        doc_BT = jnp.zeros((B, T), i32) if segment_ids_BT is None else jnp.asarray(segment_ids_BT, i32)
        return jnp.broadcast_to(jnp.arange(T, dtype=i32), (B, T)), doc_BT, doc_BT
    q_slot_BT = jnp.broadcast_to(cache_index + jnp.arange(T, dtype=i32), (B, T)).astype(i32)
    k_doc_BS = jnp.zeros((B, S), i32)
    if start_B is not None:
        k_doc_BS = jnp.where(jnp.arange(S)[None, :] >= start_B[:, None], 0, -1).astype(i32)
    return q_slot_BT, jnp.zeros((B, T), i32), k_doc_BS


def past_only(q_slot_BT):
    """`needed` for stream.scan_keys: a key chunk is walked iff it starts at or before the block's
    last query slot (chunks wholly in the block's future are skipped)."""
    last = jnp.max(q_slot_BT)
    return lambda s_K: s_K[0] <= last


def naive_logits(q_nope_BTNH, q_rope_BTNR, k_nope_BKNH, k_rope_BKR, scale) -> jax.Array:
    """(q_nope·k_nope + q_rope·k_rope) * scale [B, T, N, K] in f32, with per-head keys k_nope."""
    f32 = jnp.float32
    logits_BTNK = jnp.einsum("BTNH,BKNH->BTNK", q_nope_BTNH, k_nope_BKNH, preferred_element_type=f32)
    logits_BTNK += jnp.einsum("BTNR,BKR->BTNK", q_rope_BTNR, k_rope_BKR, preferred_element_type=f32)
    return logits_BTNK * scale


def naive_keys(kv_latent_BSC, w_uk_CNH, w_uv_CNO):
    """Per-head keys k_nope [B, S, N, H] and values v [B, S, N, O] (the naive path, O(S) memory)."""
    k_nope_BSNH = jnp.einsum("BSC,CNH->BSNH", kv_latent_BSC, w_uk_CNH)
    return k_nope_BSNH, jnp.einsum("BSC,CNO->BSNO", kv_latent_BSC, w_uv_CNO)


def mla_naive(
    q_nope_BTNH, q_rope_BTNR, kv_latent_BSC, k_rope_BSR, w_uk_CNH, w_uv_CNO, mask_BTS, scale
):
    """Attention with materialised per-head keys and values and a whole [B, T, S] mask: the dense
    oracle the streamed path (`mla_streamed`) is tested against; returns [B, T, N, O]."""
    k_nope_BSNH, v_BSNO = naive_keys(kv_latent_BSC, w_uk_CNH, w_uv_CNO)
    logits_BTNS = naive_logits(q_nope_BTNH, q_rope_BTNR, k_nope_BSNH, k_rope_BSR, scale)
    probs_BTNS = masked_softmax(logits_BTNS, mask_BTS).astype(v_BSNO.dtype)
    return jnp.einsum("BTNS,BSNO->BTNO", probs_BTNS, v_BSNO)


def _key_axes(kv_latent: jax.Array) -> tuple[str, str]:
    """Einsum letters of the keys' leading axes and of the key axis: shared keys [B, S, ...] or
    keys gathered per query [B, T, U, ...]."""
    return ("BS", "S") if kv_latent.ndim == 3 else ("BTU", "U")


def latent_scores(q_latent_BTNC, q_rope_BTNR, kv_latent, k_rope, scale) -> jax.Array:
    """(q_latent·c + q_rope·k_rope) * scale in f32 over shared [B, S, ...] or gathered
    [B, T, U, ...] keys: [B, T, N, S or U]."""
    keys, k = _key_axes(kv_latent)
    f32 = jnp.float32
    logits = jnp.einsum(
        f"BTNC,{keys}C->BTN{k}", q_latent_BTNC, kv_latent, preferred_element_type=f32
    )
    logits += jnp.einsum(f"BTNR,{keys}R->BTN{k}", q_rope_BTNR, k_rope, preferred_element_type=f32)
    return logits * scale


def latent_logits(q_nope_BTNH, q_rope_BTNR, w_uk_CNH, kv_latent, k_rope, scale) -> jax.Array:
    """q·k = (W_ukᵀ q_nope)·c + q_rope·k_rope, times scale, in f32; per-head keys are never built.
    Keys kv_latent [B, S, C], k_rope [B, S, R] give [B, T, N, S]; keys gathered per query,
    [B, T, U, C] and [B, T, U, R], give [B, T, N, U]."""
    q_latent_BTNC = jnp.einsum("BTNH,CNH->BTNC", q_nope_BTNH, w_uk_CNH)
    return latent_scores(q_latent_BTNC, q_rope_BTNR, kv_latent, k_rope, scale)


def latent_attention(q_nope_BTNH, q_rope_BTNR, kv_latent, k_rope, w_uk_CNH, w_uv_CNO, mask, scale):
    """MLA in latent space over shared or gathered keys (see `latent_logits`; mask [B, T, S or U]):
    (out [B, T, N, O], probs [B, T, N, S or U] in f32). W_uv is applied after the softmax."""
    keys, k = _key_axes(kv_latent)
    probs = masked_softmax(
        latent_logits(q_nope_BTNH, q_rope_BTNR, w_uk_CNH, kv_latent, k_rope, scale), mask
    )
    ctx_BTNC = jnp.einsum(f"BTN{k},{keys}C->BTNC", probs.astype(kv_latent.dtype), kv_latent)
    return jnp.einsum("BTNC,CNO->BTNO", ctx_BTNC, w_uv_CNO), probs


def mla_absorbed(
    q_nope_BTNH, q_rope_BTNR, kv_latent_BSC, k_rope_BSR, w_uk_CNH, w_uv_CNO, mask_BTS, scale
):
    """The naive oracle's attention computed in latent space with a whole mask: [B, T, N, O]."""
    args = (kv_latent_BSC, k_rope_BSR, w_uk_CNH, w_uv_CNO, mask_BTS, scale)
    return latent_attention(q_nope_BTNH, q_rope_BTNR, *args)[0]


def mla_streamed(queries, q_pos, keys, w_ukv, scale, k_block: int, *, absorbed: bool) -> jax.Array:
    """Dense MLA [B, T, N, O] over key chunks of k_block with an online softmax (stream.py): no
    [T, S] array. queries = (q_nope, q_rope), q_pos = (q_slot [B, T], q_doc [B, T]). Naive:
    keys = (k_nope [B,S,N,H], v [B,S,N,O], k_rope [B,S,R], k_doc [B,S]). Absorbed: keys =
    (kv_latent [B,S,C], k_rope [B,S,R], k_doc [B,S]), W_uk folded into the query and W_uv applied
    after; w_uk None means q_nope already is the latent query [B,T,N,C], w_uv None returns the latent
    context [B,T,N,C] (the caller merged them into its own weights, `merge_cheaper`). Absorbed, the
    softmax scale is folded into the queries (T·N·(C + R) products instead of T·N·S); naive, it scales
    the f32 logits as HF does."""
    (q_nope_BTNH, q_rope_BTNR), (q_slot_BT, q_doc_BT), (w_uk_CNH, w_uv_CNO) = queries, q_pos, w_ukv
    B, T, N, _ = q_nope_BTNH.shape
    if absorbed and w_uk_CNH is not None:
        q_nope_BTNH = jnp.einsum("BTNH,CNH->BTNC", q_nope_BTNH, w_uk_CNH)
    if absorbed:  # scaled in f32, then rounded once to the compute dtype (the scale itself never is)
        q_nope_BTNH, q_rope_BTNR = ((q.astype(jnp.float32) * scale).astype(q.dtype) for q in (q_nope_BTNH, q_rope_BTNR))

    def logits_fn(*chunks):
        if absorbed:
            return latent_scores(q_nope_BTNH, q_rope_BTNR, chunks[0], chunks[1], 1.0)
        return naive_logits(q_nope_BTNH, q_rope_BTNR, chunks[0], chunks[2], scale)  # HF: f32 logits x scale

    def values_fn(p_BTNK, *chunks):
        if absorbed:
            return jnp.einsum("BTNK,BKC->BTNC", p_BTNK.astype(chunks[0].dtype), chunks[0])
        return jnp.einsum("BTNK,BKNO->BTNO", p_BTNK.astype(chunks[1].dtype), chunks[1])

    def visible_fn(s_K, live_K, *chunks):
        return (key_visible(q_slot_BT, q_doc_BT, s_K, chunks[-1]) & live_K)[:, :, None]

    O = keys[0].shape[-1] if absorbed else keys[1].shape[-1]
    out, _ = stream.flash_attention(
        logits_fn, values_fn, visible_fn, k_block, keys, (B, T, N), O, needed=past_only(q_slot_BT)
    )
    if absorbed and w_uv_CNO is None:
        return out.astype(keys[0].dtype)
    if absorbed:
        return jnp.einsum("BTNC,CNO->BTNO", out.astype(w_uv_CNO.dtype), w_uv_CNO)
    return out.astype(keys[1].dtype)


def merge_cheaper(X: int, H: int, C: int, M: int) -> bool:
    """Whether M tokens' X-wide inputs meet the latent C through one merged [X, N, C] weight more
    cheaply than through the H-wide head, counting the merge itself: M·X·C + X·H·C < M·(X·H + H·C)
    multiply-adds per head. The query side (X = Q or D, H = qk_nope_head_dim: W_uq·W_ukᵀ) and the
    output side (X = D, H = v_head_dim: W_uv·W_o) of absorbed MLA both ask it. MaxText's
    deepseek3-tiny (Q 32, D 64, C 16, H 128) training: yes; V3 (Q 1536, D 7168, C 512, H 128): no;
    decoding one token (M = batch) rarely."""
    return M * X * C + X * H * C < M * (X * H + H * C)


def mla_sparse(
    q_nope_BTNH,
    q_rope_BTNR,
    kv_latent_BSC,
    k_rope_BSR,
    w_uk_CNH,
    w_uv_CNO,
    idx_BTU,
    valid_BTU,
    scale,
) -> tuple[jax.Array, jax.Array]:
    """MLA in latent space over each query's selected keys only: (out [B, T, N, O], probs
    [B, T, N, U] f32). The absorbed path's math with the [B, S] keys replaced by gathered ones;
    idx_BTU must be in range (clamp −1 slots and mark them invalid)."""
    kv_latent_BTUC = gather_keys(kv_latent_BSC, idx_BTU)
    k_rope_BTUR = gather_keys(k_rope_BSR, idx_BTU)
    args = (kv_latent_BTUC, k_rope_BTUR, w_uk_CNH, w_uv_CNO, valid_BTU, scale)
    return latent_attention(q_nope_BTNH, q_rope_BTNR, *args)


def kernel_attention(queries, k_nope_BSNH, v_BSNO, k_rope_BSR, segment_ids_BT, scale, implementation):
    """Dense causal MLA through `jax.nn.dot_product_attention` (`implementation` "cudnn": flash
    attention, no [T, S] logits; "xla": the same call's reference): [B, T, N, O]. Heads are
    [k_nope; k_rope] (H + R); every head dim is zero-padded to the largest of H + R and O (the
    public API wants one head dim; zeros change neither q·k nor the output's first O dims).
    Packed documents need a boolean [B, 1, T, S] mask, built only when segment ids are given (the
    layer never gives them: `use_kernel` streams packed documents instead)."""
    q_nope_BTNH, q_rope_BTNR = queries
    B, S, N, _ = k_nope_BSNH.shape
    R, O = k_rope_BSR.shape[-1], v_BSNO.shape[-1]
    k_rope_BSNR = jnp.broadcast_to(k_rope_BSR[:, :, None, :], (B, S, N, R)).astype(k_nope_BSNH.dtype)
    q_BTNK = jnp.concatenate([q_nope_BTNH, q_rope_BTNR.astype(q_nope_BTNH.dtype)], axis=-1)
    k_BSNK = jnp.concatenate([k_nope_BSNH, k_rope_BSNR], axis=-1)
    width = max(q_BTNK.shape[-1], O)
    pad = lambda a: jnp.pad(a, [(0, 0)] * 3 + [(0, width - a.shape[-1])]).astype(q_BTNK.dtype)  # noqa: E731
    mask = None
    if segment_ids_BT is not None:
        mask = segment_ids_BT[:, None, :, None] == segment_ids_BT[:, None, None, :]
    out = jax.nn.dot_product_attention(
        pad(q_BTNK), pad(k_BSNK), pad(v_BSNO), mask=mask, scale=scale, is_causal=True,
        implementation=implementation,
    )  # fmt: skip
    return out[..., :O].astype(v_BSNO.dtype)


def use_kernel(impl: str, *, segmented: bool, cached: bool, indexed: bool) -> bool:
    """Whether dense MLA runs through the fused kernel: `model.attention_impl` cudnn, a full forward
    (no cache) without the DSA indexer, no packed documents (segment ids would need a [B, 1, T, S]
    mask, and cuDNN a [T, S] bias) and no context split (the kernel is not a `keys=` query-block
    function); everything else streams (`mla_streamed`). Raises ConfigError for an unknown impl."""
    if impl not in ("xla", "cudnn"):
        raise ConfigError(f"model.attention_impl must be xla or cudnn, got {impl!r}")
    return impl == "cudnn" and not (segmented or cached or indexed or context_axes().seq)


def check_kernel(impl: str, dtype, head_dim: int) -> None:
    """Raises ConfigError, naming model.attention_impl, when the cuDNN kernel cannot run here."""
    if impl == "xla":
        return
    if impl != "cudnn":
        raise ConfigError(f"model.attention_impl must be xla or cudnn, got {impl!r}")
    backend = jax.default_backend()
    if backend != "gpu":
        raise ConfigError(
            f"model.attention_impl=cudnn needs an NVIDIA GPU with cuDNN; this backend is {backend!r} "
            "(use attention_impl: xla, the streamed path)"
        )
    if jnp.dtype(dtype) not in (jnp.dtype(jnp.bfloat16), jnp.dtype(jnp.float16)):
        raise ConfigError(f"model.attention_impl=cudnn needs model.dtype bfloat16, got {jnp.dtype(dtype)}")
    if head_dim % 8 or head_dim > 256:
        raise ConfigError(
            f"model.attention_impl=cudnn: head dim {head_dim} (max of H + R and O) must be a multiple of 8 "
            "and <= 256 (cuDNN flash attention, Hopper or newer)"
        )
