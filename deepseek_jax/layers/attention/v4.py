"""DeepSeek-V4 attention (as released): shared-KV MQA over a sliding window plus compressed entries.

    c_q = RMSNorm(x W_dq)      q = RoPE_t(rms_norm(c_q W_uq))   [N × X], per-head norm, no weight
    kv  = RoPE_t(RMSNorm(x W_kv))                               [X], one head: key and value
    keys of query t: the window kv_{t−w+1 … t} (w = window_size), plus compressed entries
        HCA (ratio m ≠ 4): every entry z with (z+1)·m ≤ t+1
        CSA (m = 4): the top-`index_topk` of those by the lightning indexer
    p_j = exp(q·k_j / √X) / (Σ_j' exp(q·k_j' / √X) + exp(sink_n))    learned per-head sink, f32
    o   = RoPE_{−t}(Σ_j p_j kv_j)      undoes the values' rotation: o carries relative position
    out = Σ_g W_ob[g] (W_oa[g] o_g)    grouped low-rank output: W groups of P = N/W heads, rank Y

RoPE is interleaved on the last R dims. The caller picks the RopeConfig per layer type: θ =
rope_theta without YaRN for ratio 0, θ = compress_rope_theta with YaRN otherwise; no mscale.
The compressors are in compressor.py, the CSA indexer in indexer.py, the per-query-block math in
v4_stream.py: no [T, T] nor [T, T/m] array. Each query gathers its w window keys by slot; CSA adds
its top-k entries (the indexer streamed over `k_block`-entry chunks with a running top-k) to one
gathered softmax, as the official `sparse_attn`; HCA continues the window's online softmax over the
entries chunk by chunk (visibility from the queries' positions per chunk). `q_block` queries a time,
each block under remat; key-side arrays go through over_query_blocks' keys. Scores and softmax f32.

Indexer loss (ours; `index_loss=True`, CSA layers): V3.2's sparse-stage KL on the picked entries
(indexer.entry_kl); the indexer's inputs are detached, so it learns from the KL alone.

Packed documents (`v4.document_mask`, default on; a full forward given segment_ids): a window key
counts only inside the query's document, and an entry only if every token pooled into it (CSA:
its block and the overlapping previous one) lies there (compressor.entry_segments). Blocks stay
row slots, so a document's first partial block(s) give it no entry (its first entry comes once a
whole block, CSA two, of it has been seen); other documents' entries are never read. This differs
from the released code: HF and the official code attend across documents (document_mask: false
keeps that behaviour; parity tests pass no segment_ids, so they are unaffected).

Decoding: `init_v4_attention_cache` holds a ring buffer of the last w rotated kv (slot = position
mod w), the compressed entries, each compressor's partial block (f32) and, for CSA, the indexer's
keys and state. A call appends T ≥ 1 tokens at `cache_index`; any chunking gives the full
forward's result. Assumptions: positions_BT = cache_index + arange(T) in every row (blocks are row
slots, as in HF and the official code; no left padding), and one document per row (segment_ids
are ignored with a cache). Rows are stored per `formats` (cache_store.py, `model.cache_storage`):
plain arrays, or the release's fp8 kv + fp4 indexer keys, exact on rows already on that grid;
entries and indexer keys are dequantised only where read (v4_stream.py), the w-row window whole.

HF transformers 5.24 (the parity peer) and the official inference/model.py compute the same math;
the official code differs in precision only: (a) its compressor runs in fp32 (HF: model dtype;
here fp32, as official) and rounds the pooled entry to the compute dtype before the norm (here
too); (b) FP8 weights / activations and the QAT casts below; (c) it prefills only at start_pos 0,
then decodes one token at a time (HF and this file take any chunking).
Official quantisation points, simulated when `quant_sim` is "fp8" | "fp8_fp4" (quant.py has the
casts; "none", the default, is exact float math):
  weight: W_dq, W_uq, W_kv, W_oa, W_ob, the indexer's W^I_uq are FP8-stored: e4m3 128×128 tiles of
          the checkpoint's [out, in] matrix (W_oa's [W·Y, P·X]: tiles may span groups)
  act:    input of every FP8 linear (wq_a, wq_b, wkv, wo_b, indexer.wq_b): e4m3 1×128 per token,
          ue8m0 (W_ob's input along the flattened W·Y); W_oa's input is not quantised (bf16 einsum
          on the dequantised weight), nor are the compressors' wkv / wgate and weights_proj
  kv:     window kv and main compressed entries after RoPE, dims [:−R] only: e4m3 1×64
  index:  indexer q and indexer compressed keys after RoPE: Hadamard rotation, then e2m1 1×32
          ("fp8_fp4") or e4m3 1×128 ("fp8"); index scores are taken in the rotated basis

Sharding (logical names): `heads` marks N, the W groups of W_oa, the sink and the indexer heads
(tensor-parallel rules split them); the one K=V head and the compressors are per-token work all
heads share (the official code replicates wkv), their weights split on `embed`; the output rank
is a latent like MLA's and uses `kv_latent`.

References: HF transformers 5.24 models/deepseek_v4/modeling_deepseek_v4.py
(`DeepseekV4Attention`); DeepSeek-V4-Flash inference/model.py (`Attention`, `sparse_attn`);
reference notes §1.4-1.7, §1.12.

Local letters: X head dim (H + R, the shared K=V width), Z compressed entries, U key slots a
query gathers (window + compressed), W output groups (o_groups), P heads per group, Y per-group
output rank (o_lora_rank). The CSA indexer's own tensors stay in indexer.py (`csa_index`, `entry_picks`).
"""

import functools
from typing import NamedTuple

import flax.linen as nn
import jax
import jax.numpy as jnp

from deepseek_jax.axes import constrain, dense_init, param
from deepseek_jax.config import RopeConfig, V4AttentionConfig
from deepseek_jax.layers.attention.cache_store import PLAIN, LayerFormats, empty, load, n_rows, write_at
from deepseek_jax.layers.attention.compressor import (
    CSA_RATIO,
    Compressor,
    CompressorState,
    empty_state,
    entry_segments,
    write_entries,
)
from deepseek_jax.layers.attention.core import gather_keys, over_query_blocks
from deepseek_jax.layers.attention.indexer import CSAIndexer, csa_index, mean_over_tokens
from deepseek_jax.layers.attention.v4_stream import csa_attention, hca_attention, sink_softmax, swa_attention
from deepseek_jax.layers.norms import RMSNorm, rms_normalize
from deepseek_jax.layers.rope import rope_cos_sin, rope_tail, yarn_inv_freq
from deepseek_jax.quant import V4_KV_BLOCK, sim_act, sim_indexer, sim_kv, sim_weight


class WindowKeys(NamedTuple):
    """What every V4 / V4.1 layer computes before its compressed entries (`V4Attention.window_keys`)."""

    c_q: jax.Array  # [B, T, Q] the query latent (the indexer's input too)
    q: jax.Array  # [B, T, N, X] rotated queries
    kv: jax.Array  # [B, T, X] the new tokens' rotated K=V
    rope: tuple  # (cos [B, T, R/2], sin, inv_freq) at the query positions
    start: jax.Array | int  # the new tokens' first slot
    source: jax.Array  # [B, S, X] the key source so far: [ring buffer,] new tokens
    slots: jax.Array  # [B, T, w] each query's window slots in it (−1 = none)


class SWACache(NamedTuple):
    """Sliding-window-only layer (ratio 0)."""

    window: jax.Array  # [B, w, X] rotated kv of the last w positions, slot = position mod w


class HCACache(NamedTuple):
    window: jax.Array  # [B, w, X]
    # [B, max_len // m, X] compressed entries (normed, rotated), entry z = block z
    entries: jax.Array
    state: CompressorState  # the partial block


class CSACache(NamedTuple):
    window: jax.Array  # [B, w, X]
    entries: jax.Array  # [B, max_len // 4, X]
    state: CompressorState  # partial block and the last complete block's overlap half
    index_keys: jax.Array  # [B, max_len // 4, index_head_dim] the indexer compressor's entries
    index_state: CompressorState


def init_v4_attention_cache(
    cfg: V4AttentionConfig, compress_ratio: int, batch: int, max_len: int, dtype=jnp.float32,
    formats: LayerFormats = PLAIN,
):
    """An empty decode cache for one layer, up to max_len tokens (compressor state in f32), rows
    stored in `formats` (cache_store.storage_formats; plain arrays in `dtype` by default)."""
    X, B, R = cfg.head_dim, batch, cfg.rope_head_dim
    window = empty((B, cfg.window_size), X, formats.window, R, dtype)
    if compress_ratio == 0:
        return SWACache(window)
    m, Z = compress_ratio, max_len // compress_ratio
    entries = empty((B, Z), X, formats.entries, R, dtype)
    if m != CSA_RATIO:
        return HCACache(window, entries, empty_state(B, m, X, overlap=False))
    width = cfg.index_head_dim  # the indexer compressor's entries
    return CSACache(
        window, entries, empty_state(B, m, X, overlap=True),
        empty((B, Z), width, formats.index_keys, 0, dtype), empty_state(B, m, width, overlap=True),
    )  # fmt: skip


# ----------------------------------------------------------------------------------------------
# Pure functions


def window_slots(T: int, w: int, start, ring: int) -> jax.Array:
    """[T, w] key-source slots of each query's window (−1 before position 0). The source is `ring`
    (0, or w) ring-buffer slots holding positions < start at slot q mod w, then the T new tokens."""
    q_TU = start + jnp.arange(T)[:, None] - w + 1 + jnp.arange(w)[None, :]  # key positions
    slot_TU = jnp.where(q_TU >= start, ring + q_TU - start, q_TU % w)
    return jnp.where(q_TU >= 0, slot_TU, -1)


def ring_write(ring_BSX: jax.Array, kv_BTX: jax.Array, start) -> jax.Array:
    """Writes the last min(T, w) new tokens at slot = position mod w (no slot is written twice)."""
    w, T = n_rows(ring_BSX), kv_BTX.shape[1]
    n = min(T, w)
    slot_T = (start + T - n + jnp.arange(n)) % w
    return write_at(ring_BSX, kv_BTX[:, T - n :], slot_T)  # plain arrays or stored rows (cache_store)


def sink_attention(q_BTNX, kv_BSX, idx_BTU, sink_N, scale) -> jax.Array:
    """Each query attends to its gathered slots (idx −1 = none); the sink only adds exp(sink_n)
    to the softmax denominator. K = V = kv. Returns [B, T, N, X]."""
    kv_BTUX = gather_keys(kv_BSX, jnp.maximum(idx_BTU, 0))
    return sink_softmax(q_BTNX, kv_BTUX, idx_BTU >= 0, sink_N, scale)[0]


def sim_wo_a(w_oa_WPXY: jax.Array, mode: str) -> jax.Array:
    """W_oa's FP8 simulation in the checkpoint's layout: 128×128 tiles of its [W·Y, P·X] matrix."""
    if mode == "none":
        return w_oa_WPXY
    # in (P, X), out (W, Y)
    w_PXWY = sim_weight(jnp.transpose(w_oa_WPXY, (1, 2, 0, 3)), mode, n_in=2)
    return jnp.transpose(w_PXWY, (2, 0, 1, 3))


def grouped_output(o_BTNX, w_oa_WPXY, w_ob_WYD, act=lambda u: u) -> jax.Array:
    """Group g (heads g·P … g·P + P − 1) goes through its own rank-Y map, then W_ob mixes the groups
    (`act`: the hook on W_ob's input)."""
    B, T, _, X = o_BTNX.shape
    W, P = w_oa_WPXY.shape[:2]
    u_BTWY = jnp.einsum("BTWPX,WPXY->BTWY", o_BTNX.reshape(B, T, W, P, X), w_oa_WPXY)
    return jnp.einsum("BTWY,WYD->BTD", act(u_BTWY), w_ob_WYD)


# ----------------------------------------------------------------------------------------------
# The layer


class V4Attention(nn.Module):
    cfg: V4AttentionConfig
    rope: RopeConfig  # this layer type's RoPE (see the module docstring)
    compress_ratio: int  # m: 0 = sliding window only, 4 = CSA, other = HCA
    dim: int  # D
    norm_eps: float = 1e-6
    dtype: jnp.dtype = jnp.bfloat16
    quant_sim: str = "none"  # the release's FP8/FP4 simulation: none | fp8 | fp8_fp4 (docstring)
    q_head_norm: bool = True  # V4's weightless RMSNorm of each query head (V4.1 has none)

    def sim(self, site: str, x: jax.Array) -> jax.Array:
        """Quantisation simulation at an official cast point: "act" (a linear's input, blocks along
        the last dim), "kv" (non-RoPE dims, 1×64), "index" (Hadamard, then the indexer's format)."""
        if site == "act":
            return sim_act(x, self.quant_sim)
        if site == "kv":
            return sim_kv(x, self.quant_sim, n_rope=self.cfg.rope_head_dim, block=V4_KV_BLOCK)
        if site == "index":
            return sim_indexer(x, self.quant_sim)
        raise ValueError(f"V4Attention.sim: unknown site {site!r}")

    def weight(self, w: jax.Array, n_in: int = 1) -> jax.Array:
        """An FP8-stored projection [in..., out...] (n_in input axes), simulated, compute dtype."""
        return sim_weight(w, self.quant_sim, n_in=n_in).astype(self.dtype)

    def rotary(self, positions_BT):
        """(cos, sin) [B, T, R/2] at the positions and inv_freq of this layer type's RoPE (YaRN
        without mscale: cos/sin unscaled)."""
        r = self.rope
        yarn = (r.rope_factor, r.original_seq_len, r.beta_fast, r.beta_slow)
        inv_freq = yarn_inv_freq(self.cfg.rope_head_dim, r.rope_theta, *yarn)
        return *rope_cos_sin(positions_BT, inv_freq), inv_freq

    def query(self, x_BTD, cos_BTr, sin_BTr):
        """c_q [B, T, Q] (the indexer's input too) and q [B, T, N, X], normed per head, rotated."""
        c, D = self.cfg, self.dim
        N, X, Q = c.n_heads, c.head_dim, c.q_lora_rank
        w_dq_DQ = param(self, "w_dq", ("embed", "q_latent"), (D, Q), dense_init([0], [1]))
        w_uq_QNX = param(
            self, "w_uq", ("q_latent", "heads", "head_dim"), (Q, N, X), dense_init([0], [1, 2])
        )
        c_q_BTQ = jnp.einsum("BTD,DQ->BTQ", self.sim("act", x_BTD), self.weight(w_dq_DQ))
        c_q_BTQ = RMSNorm(Q, self.norm_eps, "q_latent", self.dtype, name="q_norm")(c_q_BTQ)
        q_BTNX = jnp.einsum("BTQ,QNX->BTNX", self.sim("act", c_q_BTQ), self.weight(w_uq_QNX))
        if self.q_head_norm:
            q_BTNX = rms_normalize(q_BTNX, self.norm_eps)
        q_BTNX = rope_tail(q_BTNX, cos_BTr[:, :, None], sin_BTr[:, :, None])
        return c_q_BTQ, constrain(q_BTNX, ("act_batch", "act_seq", "act_heads", None))

    def key_value(self, x_BTD, cos_BTr, sin_BTr):
        """The shared K=V head [B, T, X]: normed, rotated at t."""
        D, X = self.dim, self.cfg.head_dim
        w_kv_DX = param(self, "w_kv", ("embed", "head_dim"), (D, X), dense_init([0], [1]))
        kv_BTX = jnp.einsum("BTD,DX->BTX", self.sim("act", x_BTD), self.weight(w_kv_DX))
        kv_BTX = RMSNorm(X, self.norm_eps, "head_dim", self.dtype, name="kv_norm")(kv_BTX)
        return self.sim("kv", rope_tail(kv_BTX, cos_BTr, sin_BTr))

    def entries(self, x_BTD, inv_freq, cache, start):
        """The layer's compressed entries [B, Z, X] (the cache's, this call's complete blocks written
        in; without a cache the T tokens' blocks) and its compressor state."""
        m, X = self.compress_ratio, self.cfg.head_dim
        comp = Compressor(m, X, self.dim, self.norm_eps, self.dtype, name="compressor")
        new_BZX, n_done, state = comp(x_BTD, None if cache is None else cache.state, start, inv_freq)
        new_BZX = self.sim("kv", new_BZX)
        if cache is None:
            return new_BZX, state
        return write_entries(cache.entries, new_BZX, start // m, n_done), state

    def output(self, o_BTNX):
        """Grouped low-rank output projection [B, T, N, X] -> [B, T, D]."""
        c, D = self.cfg, self.dim
        N, X, W, Y = c.n_heads, c.head_dim, c.o_groups, c.o_lora_rank
        w_oa_WPXY = param(
            self, "w_oa", ("heads", None, "head_dim", "kv_latent"), (W, N // W, X, Y),
            dense_init([1, 2], [3], [0]),
        )  # fmt: skip
        w_ob_WYD = param(
            self, "w_ob", ("heads", "kv_latent", "embed"), (W, Y, D), dense_init([0, 1], [2])
        )
        w_oa_WPXY = sim_wo_a(w_oa_WPXY, self.quant_sim).astype(self.dtype)
        # W_ob's input is one [W·Y] vector per token: its 1×128 blocks run across the groups
        act = lambda u: self.sim("act", u.reshape(*u.shape[:2], -1)).reshape(u.shape)  # noqa: E731
        return grouped_output(o_BTNX, w_oa_WPXY, self.weight(w_ob_WYD, n_in=2), act)

    def sink(self) -> jax.Array:
        """The per-head sink logits [N] (f32)."""
        return param(self, "sink", ("heads",), (self.cfg.n_heads,), nn.initializers.zeros)

    def attend(self, q_BTNX, source_BSX, slots_BTU):
        """Sink attention of each query over its slots of the key source, q_block queries a time."""
        fn = functools.partial(sink_attention, sink_N=self.sink(), scale=self.cfg.head_dim**-0.5)
        return over_query_blocks(lambda q, i, kv: fn(q, kv, i), self.cfg.q_block, q_BTNX, slots_BTU,
                                 keys=(source_BSX,))

    def window_keys(self, x_BTD, positions_BT, cache, cache_index) -> "WindowKeys":
        """The layer's queries and its sliding-window key source (module docstring): the ring buffer's
        w slots (decoding) then the T new tokens' kv, and each query's window slots in it."""
        c = self.cfg
        B, T, _ = x_BTD.shape
        cos_BTr, sin_BTr, inv_freq = self.rotary(positions_BT)
        c_q_BTQ, q_BTNX = self.query(x_BTD, cos_BTr, sin_BTr)
        kv_BTX = self.key_value(x_BTD, cos_BTr, sin_BTr)
        start = 0 if cache is None else cache_index
        ring = 0 if cache is None else c.window_size
        source_BSX = kv_BTX  # the key source: [ring buffer,] new tokens[, compressed entries]
        if cache is not None:
            source_BSX = jnp.concatenate([load(cache.window, self.dtype), kv_BTX], axis=1)
        slots_BTU = jnp.broadcast_to(window_slots(T, c.window_size, start, ring), (B, T, c.window_size))
        return WindowKeys(c_q_BTQ, q_BTNX, kv_BTX, (cos_BTr, sin_BTr, inv_freq), start, source_BSX, slots_BTU)

    def attend_and_project(self, w: "WindowKeys", source_BSX, slots_BTU) -> jax.Array:
        """Sink attention of the queries over their slots, RoPE at −t, grouped output: [B, T, D]."""
        return self.project(w, self.attend(w.q, source_BSX, slots_BTU))

    def project(self, w: "WindowKeys", o_BTNX) -> jax.Array:
        """The attention output [B, T, N, X] rotated back (RoPE at −t), grouped output: [B, T, D]."""
        cos_BTr, sin_BTr, _ = w.rope
        o_BTNX = rope_tail(o_BTNX.astype(self.dtype), cos_BTr[:, :, None], -sin_BTr[:, :, None])
        o_BTNX = constrain(o_BTNX, ("act_batch", "act_seq", "act_heads", None))
        return self.output(o_BTNX)

    def documents(self, segment_ids_BT, cache, w: "WindowKeys", Z: int):
        """Segment ids of the queries [B, T], of the key source [B, S] and of the entries [B, Z]
        (compressor.entry_segments): the documents when `document_mask` and a full forward gets
        segment_ids, else zeros (every key passes; decoding holds one document per row)."""
        B, T = w.q.shape[:2]
        S = w.source.shape[1]
        if not (self.cfg.document_mask and segment_ids_BT is not None and cache is None):
            return jnp.zeros((B, T), jnp.int32), jnp.zeros((B, S), jnp.int32), jnp.zeros((B, Z), jnp.int32)
        seg_BT = segment_ids_BT.astype(jnp.int32)
        eseg_BZ = entry_segments(seg_BT, self.compress_ratio, Z) if self.compress_ratio else jnp.zeros((B, 0))
        return seg_BT, seg_BT, eseg_BZ  # no cache: the key source is the T tokens

    def compressed_attention(self, x_BTD, w: "WindowKeys", positions_BT, segment_ids_BT, cache, index_loss):
        """HCA / CSA: (o [B, T, N, X], the cache fields after the window's, and with index_loss (the
        indexer KL [B, T], whether the query picked any entry [B, T]) else None)."""
        c, m, inv_freq = self.cfg, self.compress_ratio, w.rope[2]
        entries_BZX, state = self.entries(x_BTD, inv_freq, cache, w.start)
        seg_BT, sseg_BS, eseg_BZ = self.documents(segment_ids_BT, cache, w, n_rows(entries_BZX))
        keys = (w.source, sseg_BS, entries_BZX, eseg_BZ)  # entries (and ik) as stored: loaded per chunk / pick
        if m != CSA_RATIO:
            fn = functools.partial(hca_attention, sink_N=self.sink(), scale=c.head_dim**-0.5, m=m,
                                   k_block=c.k_block)
            o_BTNX = over_query_blocks(fn, c.q_block, w.q, w.slots, positions_BT, seg_BT, keys=keys)
            return o_BTNX, (entries_BZX, state), None
        indexer = CSAIndexer(c, self.dim, self.norm_eps, self.dtype, self.quant_sim, name="indexer")
        iq_BTPY, iw_BTP, ik_BZY, index_state = csa_index(
            indexer, x_BTD, w.c_q, w.rope, cache, w.start, sim=lambda a: self.sim("index", a)
        )
        fn = functools.partial(csa_attention, sink_N=self.sink(), scale=c.head_dim**-0.5, topk=c.index_topk,
                               k_block=c.k_block, with_loss=index_loss)
        o_BTNX, picks_BTU, kl_BT = over_query_blocks(
            fn, c.q_block, w.q, w.slots, positions_BT, seg_BT, iq_BTPY, iw_BTP, keys=(*keys, ik_BZY)
        )
        self.sow("intermediates", "index_topk_BTU", picks_BTU)
        kl = None if kl_BT is None else (kl_BT, (picks_BTU >= 0).any(-1))
        return o_BTNX, (entries_BZX, state, ik_BZY, index_state), kl

    @nn.compact
    def __call__(
        self,
        x_BTD: jax.Array,
        positions_BT: jax.Array,
        cache: SWACache | HCACache | CSACache | None = None,
        cache_index: jax.Array | int = 0,
        segment_ids_BT: jax.Array | None = None,
        index_loss: bool = False,
    ):
        """(out [B, T, D], updated cache or None), and with index_loss (CSA layers only) the layer's
        mean per-token indexer KL over real tokens (segment id > 0) that picked an entry as a third output. Without a
        cache, positions are slots 0 … T−1; segment_ids_BT: packed documents (module docstring)."""
        if index_loss and self.compress_ratio != CSA_RATIO:
            raise ValueError(f"V4Attention: index_loss=True needs a CSA layer (ratio 4), got {self.compress_ratio}")
        x_BTD = constrain(x_BTD.astype(self.dtype), ("act_batch", "act_seq", "act_embed"))
        w = self.window_keys(x_BTD, positions_BT, cache, cache_index)
        fields = () if cache is None else (ring_write(cache.window, w.kv, w.start),)
        kl = None
        if self.compress_ratio:
            o_BTNX, cfields, kl = self.compressed_attention(x_BTD, w, positions_BT, segment_ids_BT, cache,
                                                            index_loss)
            fields += cfields
        else:
            seg_BT, sseg_BS, _ = self.documents(segment_ids_BT, cache, w, 0)
            fn = functools.partial(swa_attention, sink_N=self.sink(), scale=self.cfg.head_dim**-0.5)
            o_BTNX = over_query_blocks(fn, self.cfg.q_block, w.q, w.slots, seg_BT, keys=(w.source, sseg_BS))
        out = (self.project(w, o_BTNX), None if cache is None else type(cache)(*fields))
        if not index_loss:
            return out
        kl_BT, picked_BT = kl  # queries with no visible entry yet (first tokens, a document's first block)
        real_BT = picked_BT if segment_ids_BT is None else picked_BT & (segment_ids_BT > 0)  # 0 = padding
        return *out, mean_over_tokens(kl_BT, real_BT)
