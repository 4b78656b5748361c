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
The compressors are in compressor.py, the CSA indexer in indexer.py. Attention gathers each
query's key slots (window + compressed) from one key source, as the official `sparse_attn` does:
memory O(T·U·X), bounded by `q_block` queries at a time, as is the CSA indexer's scoring and top-k
(its [b, P, Z] f32 products, b = q_block, each block under remat). Scores and softmax are f32.

Decoding: `init_v4_attention_cache` holds a ring buffer of the last w rotated kv (slot = position
mod w), the compressed entries, each compressor's partial block (f32) and, for CSA, the indexer's
keys and state. A call appends T ≥ 1 tokens at `cache_index`; any chunking gives the full
forward's result. Assumptions: positions_BT = cache_index + arange(T) in every row (blocks are row
slots, as in HF and the official code; no left padding), and one document per row. Packed
documents are not supported (the paper compresses each separately, which needs a segment-aware
block layout), so there is no segment_ids argument.

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
output rank (o_lora_rank). The CSA indexer's own tensors stay in indexer.py (`csa_topk`).
"""

from typing import NamedTuple

import flax.linen as nn
import jax
import jax.numpy as jnp

from deepseek_jax.axes import constrain, dense_init, param
from deepseek_jax.config import RopeConfig, V4AttentionConfig
from deepseek_jax.layers.attention.compressor import (
    CSA_RATIO,
    Compressor,
    CompressorState,
    empty_state,
    write_entries,
)
from deepseek_jax.layers.attention.core import (
    NEG_INF,
    gather_keys,
    over_query_blocks,
    visible_entries,
)
from deepseek_jax.layers.attention.indexer import CSAIndexer, csa_topk
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
    cfg: V4AttentionConfig, compress_ratio: int, batch: int, max_len: int, dtype=jnp.float32
):
    """An empty decode cache for one layer, up to max_len tokens (compressor state in f32)."""
    X, B = cfg.head_dim, batch
    window = jnp.zeros((B, cfg.window_size, X), dtype)
    if compress_ratio == 0:
        return SWACache(window)
    m, Z = compress_ratio, max_len // compress_ratio
    entries = jnp.zeros((B, Z, X), dtype)
    if m != CSA_RATIO:
        return HCACache(window, entries, empty_state(B, m, X, overlap=False))
    width = cfg.index_head_dim  # the indexer compressor's entries
    return CSACache(
        window, entries, empty_state(B, m, X, overlap=True),
        jnp.zeros((B, Z, width), dtype), empty_state(B, m, width, overlap=True),
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
    w, T = ring_BSX.shape[1], kv_BTX.shape[1]
    n = min(T, w)
    slot_T = (start + T - n + jnp.arange(n)) % w
    return ring_BSX.at[:, slot_T].set(kv_BTX[:, T - n :].astype(ring_BSX.dtype))


def sink_attention(q_BTNX, kv_BSX, idx_BTU, sink_N, scale) -> jax.Array:
    """Each query attends to its gathered slots (idx −1 = none); the sink only adds exp(sink_n)
    to the softmax denominator. K = V = kv. Returns [B, T, N, X]."""
    kv_BTUX = gather_keys(kv_BSX, jnp.maximum(idx_BTU, 0))
    logits_BTNU = jnp.einsum("BTNX,BTUX->BTNU", q_BTNX, kv_BTUX, preferred_element_type=jnp.float32)
    logits_BTNU = jnp.where((idx_BTU >= 0)[:, :, None, :], logits_BTNU * scale, NEG_INF)
    sink_N1 = sink_N.astype(jnp.float32)[:, None]
    max_BTN1 = jnp.maximum(jnp.max(logits_BTNU, axis=-1, keepdims=True), sink_N1)
    exp_BTNU = jnp.exp(logits_BTNU - max_BTN1)
    probs_BTNU = exp_BTNU / (
        jnp.sum(exp_BTNU, axis=-1, keepdims=True) + jnp.exp(sink_N1 - max_BTN1)
    )
    return jnp.einsum("BTNU,BTUX->BTNX", probs_BTNU.astype(kv_BTUX.dtype), kv_BTUX)


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

    def compressed(self, x_BTD, c_q_BTQ, rope_BT, positions_BT, cache, start, offset):
        """Compressed entries [B, Z, X] to append to the key source (which holds `offset` slots
        before them), each query's slots in it [B, T, Z or topk] (−1 = none), new cache fields."""
        m, inv_freq = self.compress_ratio, rope_BT[2]
        X, D = self.cfg.head_dim, self.dim
        comp = Compressor(m, X, D, self.norm_eps, self.dtype, name="compressor")
        new_BZX, n_done, state = comp(
            x_BTD, None if cache is None else cache.state, start, inv_freq
        )
        new_BZX = self.sim("kv", new_BZX)
        entries_BZX = new_BZX
        if cache is not None:
            entries_BZX = write_entries(cache.entries, new_BZX, start // m, n_done)
        Z = entries_BZX.shape[1]
        if m != CSA_RATIO:  # HCA: every visible entry
            visible_BTZ = visible_entries(positions_BT, Z, m)
            slots_BTZ = jnp.where(visible_BTZ, offset + jnp.arange(Z), -1)
            return entries_BZX, slots_BTZ, (entries_BZX, state)

        indexer = CSAIndexer(
            self.cfg, self.dim, self.norm_eps, self.dtype, self.quant_sim, name="indexer"
        )
        idx_BTU, index_keys, index_state = csa_topk(
            indexer, x_BTD, c_q_BTQ, rope_BT, positions_BT, cache, start,
            sim=lambda a: self.sim("index", a), topk=self.cfg.index_topk, q_block=self.cfg.q_block,
            dtype=self.dtype,
        )  # fmt: skip
        self.sow("intermediates", "index_topk_BTU", idx_BTU)
        slots_BTU = jnp.where(idx_BTU >= 0, offset + idx_BTU, -1)
        return entries_BZX, slots_BTU, (entries_BZX, state, index_keys, index_state)

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

    def attend(self, q_BTNX, source_BSX, slots_BTU):
        """Sink attention of each query over its slots of the key source, q_block queries a time."""
        c = self.cfg
        sink_N = param(self, "sink", ("heads",), (c.n_heads,), nn.initializers.zeros)
        fn = lambda q, i: sink_attention(q, source_BSX, i, sink_N, c.head_dim**-0.5)  # noqa: E731
        return over_query_blocks(fn, c.q_block, q_BTNX, slots_BTU)

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
            source_BSX = jnp.concatenate([cache.window.astype(self.dtype), kv_BTX], axis=1)
        slots_BTU = jnp.broadcast_to(window_slots(T, c.window_size, start, ring), (B, T, c.window_size))
        return WindowKeys(c_q_BTQ, q_BTNX, kv_BTX, (cos_BTr, sin_BTr, inv_freq), start, source_BSX, slots_BTU)

    def attend_and_project(self, w: "WindowKeys", source_BSX, slots_BTU) -> jax.Array:
        """Sink attention of the queries over their slots, RoPE at −t, grouped output: [B, T, D]."""
        cos_BTr, sin_BTr, _ = w.rope
        o_BTNX = self.attend(w.q, source_BSX, slots_BTU)
        o_BTNX = rope_tail(o_BTNX, cos_BTr[:, :, None], -sin_BTr[:, :, None])  # RoPE at −t
        o_BTNX = constrain(o_BTNX, ("act_batch", "act_seq", "act_heads", None))
        return self.output(o_BTNX)

    @nn.compact
    def __call__(
        self,
        x_BTD: jax.Array,
        positions_BT: jax.Array,
        cache: SWACache | HCACache | CSACache | None = None,
        cache_index: jax.Array | int = 0,
    ):
        """(out [B, T, D], updated cache or None). Without a cache, positions are slots 0 … T−1."""
        x_BTD = constrain(x_BTD.astype(self.dtype), ("act_batch", "act_seq", "act_embed"))
        w = self.window_keys(x_BTD, positions_BT, cache, cache_index)
        source_BSX, slots_BTU = w.source, w.slots
        fields = () if cache is None else (ring_write(cache.window, w.kv, w.start),)
        if self.compress_ratio:
            entries_BZX, cslots_BTU, cfields = self.compressed(
                x_BTD, w.c_q, w.rope, positions_BT, cache, w.start, source_BSX.shape[1]
            )
            source_BSX = jnp.concatenate([source_BSX, entries_BZX.astype(self.dtype)], axis=1)
            slots_BTU = jnp.concatenate([slots_BTU, cslots_BTU], axis=-1)
            fields += cfields
        out_BTD = self.attend_and_project(w, source_BSX, slots_BTU)
        return out_BTD, None if cache is None else type(cache)(*fields)
