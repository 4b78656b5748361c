"""DeepSeek Sparse Attention (V3.2) on MLA with no [T, S] array: the streamed indexer top-k, sparse
attention over the picked latent keys, and the indexer's KL losses (DSA paper §2.1).

Per query block (core.over_query_blocks), keys are walked k_block at a time (stream.py):
- selection: I[t, s] per key chunk with the head sum inside the chunk, merged into a running top-U
  (indexer.streamed_topk: the picks of one `lax.top_k` over all visible keys, ties included);
- sparse stage: MLA in latent space over the U gathered keys (latent.mla_sparse; −1 slots clamped
  and masked), and the KL over the selected set with the indexer scores recomputed at the picks
  (indexer.scores_at);
- dense warm-up: dense naive attention streamed with an online softmax, and the KL over all visible
  keys in two passes over the key chunks: pass 1 the attention (with each head's log-sum-exp) and
  the indexer scores' log-sum-exp, pass 2 Σ_s p_s (log p_s − log q_s) (indexer.kl_chunk).

Letters: N heads, H, R, O MLA head dims, C KV latent, P indexer heads, Y indexer head dim, S key
slots, K keys of a chunk, U keys selected per query.
"""

import jax
import jax.numpy as jnp

from deepseek_jax.layers.attention import stream
from deepseek_jax.layers.attention.indexer import chunk_scores, indexer_kl, kl_chunk, scores_at, streamed_topk
from deepseek_jax.layers.attention.latent import key_visible, mla_sparse, mla_streamed, naive_logits, past_only


def dsa_sparse(queries, index_qw, q_pos, keys, w_ukv, scale, *, topk: int, k_block: int, with_loss: bool):
    """Top-U sparse MLA: (out [B, T, N, O], picks [B, T, U] (−1 = none), KL [B, T] or None).
    keys = (kv_latent [B,S,C], k_rope [B,S,R], index_k [B,S,Y], k_doc [B,S])."""
    (q_slot_BT, q_doc_BT), (iq_BTPY, iw_BTP) = q_pos, index_qw
    kv_latent_BSC, k_rope_BSR, ik_BSY, k_doc_BS = keys
    S = k_doc_BS.shape[1]

    def visible_fn(s_K):  # a ragged last chunk's dead slots (>= S) are dropped by running_topk
        return key_visible(q_slot_BT, q_doc_BT, s_K, k_doc_BS[:, jnp.minimum(s_K, S - 1)])

    with jax.named_scope("indexer"):
        idx_BTU = streamed_topk(iq_BTPY, iw_BTP, ik_BSY, visible_fn, topk, k_block, past_only(q_slot_BT))
    valid_BTU = idx_BTU >= 0
    with jax.named_scope("sparse_attention"):
        out_BTNO, probs_BTNU = mla_sparse(
            *queries, kv_latent_BSC, k_rope_BSR, *w_ukv, jnp.maximum(idx_BTU, 0), valid_BTU, scale
        )
    kl_BT = None
    if with_loss:
        kl_BT = indexer_kl(probs_BTNU, scores_at(iq_BTPY, iw_BTP, ik_BSY, idx_BTU), valid_BTU)
    return out_BTNO, idx_BTU, kl_BT


def dense_warmup(queries, index_qw, q_pos, keys, scale, *, k_block: int):
    """Dense naive attention [B, T, N, O] and the per-query KL [B, T] to the indexer over all visible
    keys, in two passes over the key chunks. keys = (k_nope [B,S,N,H], v [B,S,N,O], k_rope [B,S,R],
    index_k [B,S,Y], k_doc [B,S])."""
    (q_nope_BTNH, q_rope_BTNR), (q_slot_BT, q_doc_BT), (iq_BTPY, iw_BTP) = queries, q_pos, index_qw
    B, T, N, _ = q_nope_BTNH.shape
    v_dtype, O = keys[1].dtype, keys[1].shape[-1]

    def chunk(s_K, live_K, k_nope_BKNH, k_rope_BKR, ik_BKY, k_doc_BK):
        """(main logits [B, T, N, K], indexer scores [B, T, K], visible [B, T, K]) of one chunk."""
        visible_BTK = key_visible(q_slot_BT, q_doc_BT, s_K, k_doc_BK) & live_K
        logits_BTNK = naive_logits(q_nope_BTNH, q_rope_BTNR, k_nope_BKNH, k_rope_BKR, scale)
        return logits_BTNK, chunk_scores(iq_BTPY, ik_BKY, iw_BTP), visible_BTK

    def attend(carry, s_K, live_K, k_nope, v_BKNO, k_rope, ik, k_doc):  # pass 1
        logits_BTNK, scores_BTK, visible_BTK = chunk(s_K, live_K, k_nope, k_rope, ik, k_doc)
        pv = lambda p: jnp.einsum("BTNK,BKNO->BTNO", p.astype(v_dtype), v_BKNO)  # noqa: E731
        no_values = lambda p: jnp.zeros((B, T, 0), jnp.float32)  # noqa: E731
        return (stream.add(carry[0], logits_BTNK, visible_BTK[:, :, None], pv),
                stream.add(carry[1], scores_BTK, visible_BTK, no_values))  # fmt: skip

    needed = past_only(q_slot_BT)
    init = (stream.start((B, T, N), O), stream.start((B, T), 0))
    main, index = stream.scan_keys(attend, init, k_block, keys, needed)
    (out_BTNO, lse_BTN), lse_BT = stream.finish(main), stream.finish(index)[1]

    def kl(kl_BT, s_K, live_K, k_nope, v_BKNO, k_rope, ik, k_doc):  # pass 2
        logits_BTNK, scores_BTK, visible_BTK = chunk(s_K, live_K, k_nope, k_rope, ik, k_doc)
        return kl_BT + kl_chunk(logits_BTNK, lse_BTN, scores_BTK, lse_BT, visible_BTK)

    kl_BT = stream.scan_keys(kl, jnp.zeros((B, T), jnp.float32), k_block, keys, needed)
    return out_BTNO.astype(v_dtype), kl_BT


def dsa_attention(q_nope, q_rope, iq, iw, q_slot, q_doc, *keys, w_ukv, scale, topk, k_block, dense, with_loss):
    """One query block of DSA, for core.over_query_blocks: (out [B, T, N, O], picks [B, T, U] or
    None when dense, KL [B, T] or None). Queries: q_nope [B,T,N,H], q_rope [B,T,N,R], the indexer's
    q [B,T,P,Y] and w [B,T,P], slots and docs [B, T] (latent.key_positions). keys: sparse, those of
    `dsa_sparse`; dense, (k_nope, v, k_rope, index_k, k_doc) (index_k only used with_loss)."""
    queries, index_qw, q_pos = (q_nope, q_rope), (iq, iw), (q_slot, q_doc)
    if not dense:
        return dsa_sparse(queries, index_qw, q_pos, keys, w_ukv, scale, topk=topk, k_block=k_block,
                          with_loss=with_loss)  # fmt: skip
    if with_loss:
        out_BTNO, kl_BT = dense_warmup(queries, index_qw, q_pos, keys, scale, k_block=k_block)
        return out_BTNO, None, kl_BT
    naive_keys = keys[:3] + keys[4:]
    return mla_streamed(queries, q_pos, naive_keys, (None, None), scale, k_block, absorbed=False), None, None
