"""DeepSeek-V4 attention per query block, with no [T, T] nor [T, T/m] array (v4.py is the layer).

Each query gathers its w window keys from the key source ([ring buffer,] new tokens) by slot, then:
    SWA:  softmax with sink over the window alone
    CSA:  the indexer's top-k entries (indexer.entry_picks, streamed over entry chunks) are gathered
          too; one softmax with sink over window + picks ([b, w + k] logits), as the official
          `sparse_attn` walks its concatenated indices
    HCA:  the window's logits open an online softmax (stream.py) that then walks the compressed
          entries k_block at a time, visibility (z+1)·m ≤ t+1 evaluated per chunk from the queries'
          positions (chunks wholly in the block's future skipped); the sink joins the denominator at
          the end. Memory O(b·(w + k_block)) per block instead of O(b·T/m).
Document masking (packed rows): a window key counts only inside the query's document (the key
source's segment ids), an entry only if every token pooled into it does (compressor.entry_segments).
Without it (released behaviour, or decoding) the segment arrays are zeros and every key passes.

Every function is row-local in T and takes key-side arrays ([B, S, ...]) as arguments, never from
a closure: they run under core.over_query_blocks(keys=...) (context-parallel ready).

Stored cache rows (cache_store.py, `model.cache_storage`): the compressed entries and the indexer keys
may arrive as stored rows (FP8 / FP4 pytrees, or plain arrays of any float dtype). They are
dequantised to the key source's dtype only where read: one k_block chunk at a time inside the scans
(HCA entries, indexer scores), and after the gather at the picks (CSA entries), never as a whole
[B, Z, ·] copy. Plain arrays take the same path (load = a cast), so results are unchanged.

Letters as in v4.py: X head dim (K = V), U window slots (w) or window + picks, Z compressed
entries, K entries of a chunk, P / Y indexer heads / dim.
"""

import jax.numpy as jnp

from deepseek_jax.layers.attention import stream
from deepseek_jax.layers.attention.cache_store import gather, load, n_rows
from deepseek_jax.layers.attention.compressor import CSA_RATIO, entry_visible
from deepseek_jax.layers.attention.core import NEG_INF, gather_keys, visible_count
from deepseek_jax.layers.attention.indexer import chunk_scores, entry_kl


def window_gather(slots_BTU, seg_BT, source_BSX, sseg_BS):
    """(kv [B, T, U, X] at each query's window slots, valid [B, T, U]): slot ≥ 0 and the key's
    segment (sseg, the key source's) equals the query's."""
    idx_BTU = jnp.maximum(slots_BTU, 0)
    kseg_BTU = gather_keys(sseg_BS[..., None], idx_BTU)[..., 0]
    return gather_keys(source_BSX, idx_BTU), (slots_BTU >= 0) & (kseg_BTU == seg_BT[:, :, None])


def sink_softmax(q_BTNX, kv_BTUX, valid_BTU, sink_N, scale):
    """(out [B, T, N, X], probs [B, T, N, U] f32): softmax over the gathered keys with exp(sink_n)
    added to the denominator only; K = V = kv."""
    logits_BTNU = jnp.einsum("BTNX,BTUX->BTNU", q_BTNX, kv_BTUX, preferred_element_type=jnp.float32)
    logits_BTNU = jnp.where(valid_BTU[:, :, None, :], logits_BTNU * scale, NEG_INF)
    sink_N1 = sink_N.astype(jnp.float32)[:, None]
    max_BTN1 = jnp.maximum(jnp.max(logits_BTNU, axis=-1, keepdims=True), sink_N1)
    exp_BTNU = jnp.exp(logits_BTNU - max_BTN1)
    probs_BTNU = exp_BTNU / (jnp.sum(exp_BTNU, axis=-1, keepdims=True) + jnp.exp(sink_N1 - max_BTN1))
    return jnp.einsum("BTNU,BTUX->BTNX", probs_BTNU.astype(kv_BTUX.dtype), kv_BTUX), probs_BTNU


def swa_attention(q_BTNX, slots_BTU, seg_BT, source_BSX, sseg_BS, *, sink_N, scale):
    """Sliding-window-only layer: [B, T, N, X]."""
    kv_BTUX, valid_BTU = window_gather(slots_BTU, seg_BT, source_BSX, sseg_BS)
    return sink_softmax(q_BTNX, kv_BTUX, valid_BTU, sink_N, scale)[0]


def stored_entry_picks(iq_BTPY, iw_BTP, ik_BZY, positions_BT, seg_BT, eseg_BZ, *, topk: int, k_block: int, dtype):
    """indexer.entry_picks over indexer keys that may be stored rows: each k_block chunk is loaded
    (dequantised to `dtype`) inside the running top-k. The same picks as entry_picks(…, load(ik, dtype), …)."""
    B, T = positions_BT.shape
    if n_rows(ik_BZY) == 0:  # a cache shorter than one block holds no entries
        return jnp.full((B, T, 0), -1, jnp.int32)

    def score(s_K, live_K, ik_BKY):
        visible_BTK = entry_visible(s_K, positions_BT, seg_BT, eseg_BZ, CSA_RATIO)
        return jnp.where(visible_BTK, chunk_scores(iq_BTPY, load(ik_BKY, dtype), iw_BTP), -jnp.inf)

    needed = lambda s_K: s_K[0] < jnp.max(visible_count(positions_BT, CSA_RATIO))  # noqa: E731
    return stream.running_topk(score, topk, k_block, (ik_BZY,), (B, T), needed)


def csa_attention(q_BTNX, slots_BTU, positions_BT, seg_BT, iq_BTPY, iw_BTP, source_BSX, sseg_BS, entries_BZX,
                  eseg_BZ, ik_BZY, *, sink_N, scale, topk: int, k_block: int, with_loss: bool):
    """CSA: (out [B, T, N, X], the picked entries [B, T, U] (−1 = none), the indexer KL [B, T] or None).
    entries / ik may be stored rows (module docstring); the KL (training: plain rows) reads ik whole."""
    dtype = source_BSX.dtype
    picks_BTU = stored_entry_picks(iq_BTPY, iw_BTP, ik_BZY, positions_BT, seg_BT, eseg_BZ, topk=topk,
                                   k_block=k_block, dtype=dtype)
    kv_BTWX, valid_BTW = window_gather(slots_BTU, seg_BT, source_BSX, sseg_BS)
    picked_BTUX = load(gather(entries_BZX, jnp.maximum(picks_BTU, 0)), dtype)  # gather the rows, then load
    kv_BTUX = jnp.concatenate([kv_BTWX, picked_BTUX], axis=2)
    valid_BTU = jnp.concatenate([valid_BTW, picks_BTU >= 0], axis=2)
    out_BTNX, probs_BTNU = sink_softmax(q_BTNX, kv_BTUX, valid_BTU, sink_N, scale)
    w = slots_BTU.shape[2]
    kl_BT = entry_kl(probs_BTNU[..., w:], iq_BTPY, iw_BTP, load(ik_BZY, dtype), picks_BTU) if with_loss else None
    return out_BTNX, picks_BTU, kl_BT


def hca_attention(q_BTNX, slots_BTU, positions_BT, seg_BT, source_BSX, sseg_BS, entries_BZX, eseg_BZ, *,
                  sink_N, scale, m: int, k_block: int):
    """HCA: one online softmax over the window, then every visible entry chunk by chunk (each chunk
    loaded from stored rows on its own): [B, T, N, X]."""
    B, T, N, X = q_BTNX.shape
    dtype = source_BSX.dtype
    kv_BTUX, valid_BTU = window_gather(slots_BTU, seg_BT, source_BSX, sseg_BS)
    logits_BTNU = jnp.einsum("BTNX,BTUX->BTNU", q_BTNX, kv_BTUX, preferred_element_type=jnp.float32) * scale
    r = stream.add(stream.start((B, T, N), X, sink_N), logits_BTNU, valid_BTU[:, :, None, :],
                   lambda p: jnp.einsum("BTNU,BTUX->BTNX", p.astype(dtype), kv_BTUX,
                                        preferred_element_type=jnp.float32))

    def chunk(r, s_K, live_K, e_BKX, eseg_BK):  # one chunk of the entries (stored rows) and their documents
        e_BKX = load(e_BKX, dtype)
        ended_BTK = s_K[None, None, :] < visible_count(positions_BT, m)[:, :, None]
        visible_BTK = live_K & ended_BTK & (eseg_BK[:, None, :] == seg_BT[:, :, None])
        logits_BTNK = jnp.einsum("BTNX,BKX->BTNK", q_BTNX, e_BKX,
                                 preferred_element_type=jnp.float32) * scale
        return stream.add(r, logits_BTNK, visible_BTK[:, :, None, :],
                          lambda p: jnp.einsum("BTNK,BKX->BTNX", p.astype(dtype), e_BKX,
                                               preferred_element_type=jnp.float32))

    needed = lambda s_K: s_K[0] < jnp.max(visible_count(positions_BT, m))  # noqa: E731
    if n_rows(entries_BZX):  # a cache shorter than one block holds no entries
        r = stream.scan_keys(chunk, r, k_block, (entries_BZX, eseg_BZ), needed)
    return stream.finish(r, sink_N)[0].astype(dtype)
