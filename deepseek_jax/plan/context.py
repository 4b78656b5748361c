"""Context-parallel collective volume per attention layer (analytic; layers/attention/context.py).

With the sequence split over cp devices (`act_seq` rules), every attention layer's query blocks run on
T/cp queries against the whole key side of their sequences. Per device and step (result-bytes
convention of `plan.hlo`, c = compute-dtype bytes, B_l = sequences per device, K = B_l · Σ rows · width
· c = the key side of the local sequences):

  keys, by layer kind (S rows of width w each; every MLA row also carries its int32 document id):
    MLA   dense (naive, training): per-head k_nope and v + the rope key: T × (N(H + O) + R)
    DSA   sparse: latent + rope key + indexer keys T × (C + R + Y); dense warm-up: T × (N(H + O) + R + Y)
          (decoding would gather C + R (+ Y): the cache's latent keys; this module counts a train step)
    SWA   window kv source: T × X (whole, under all_gather; the window itself needs only a halo of
          2·(W−1) rows per device, W = window_size, two chunks per device with the dual-chunk swap)
    CSA   + compressed entries T/m × X + indexer keys T/m × Y      HCA   + compressed entries T/m × X
    V4.1  as V4 by ratio; indexer keys only on index-source layers (others reuse their picks)
  all_gather  forward all-gather of K (again in the backward when the layer is rematerialised) and a
              reduce-scatter of the key gradients (K / cp).
  ring        K / cp passed cp − 1 times with collective-permutes in the forward, and in the backward
              the keys again plus their gradient accumulators: 3·(cp − 1)·K / cp (+ (cp − 1)·K / cp
              with remat). Not implemented (docs/sharding.md): listed for the comparison.
  permute     the dual-chunk-swap reorder of the q args and back of the outputs, forward and backward:
              2 · B_l · T/cp · (q row + out row) bytes (an upper bound: every row taken to move).
Approximations: q rows count the queries (N·(H+R) for MLA, N·X for V4), one int32 position and the
indexer's queries and weights; outputs N·O (MLA) or N·X (V4).
"""

import math
from typing import NamedTuple

import jax.numpy as jnp

from deepseek_jax.config import ModelConfig


class ContextLayer(NamedTuple):
    layer: str  # "3" or "mtp 0"
    kind: str  # MLA | DSA | SWA | CSA | HCA (+ ratio)
    key_bytes: int  # K: the key side of this device's sequences
    all_gather: int  # bytes, all_gather strategy (all-gather + reduce-scatter)
    ring: int  # bytes, ring strategy (collective-permutes)
    permute: int  # bytes, the q / output reorder (both strategies)
    halo: int  # bytes a window-only exchange would need (V4 layers), else 0
    cp: int  # devices the sequence is split over


def _kinds(m: ModelConfig) -> list[tuple[str, str, int, int, int]]:
    """(layer, kind, key row bytes per token, q row bytes, out row bytes) for every attention layer."""
    c = jnp.dtype(m.dtype).itemsize
    n = m.n_layers + m.num_nextn_predict_layers
    names = [str(i) if i < m.n_layers else f"mtp {i - m.n_layers}" for i in range(n)]
    if m.mla is not None:
        a, ix = m.mla, m.index
        naive = ix is None or ix.index_dense_warmup  # mla.MLA.attend: per-head keys (latent.naive_keys)
        width = a.n_heads * (a.qk_nope_head_dim + a.v_head_dim) if naive else a.kv_lora_rank
        key = (width + a.qk_rope_head_dim) * c + 4  # + the keys' int32 document ids (k_doc)
        q, out = a.n_heads * a.qk_head_dim * c + 4, a.n_heads * a.v_head_dim * c
        if ix is not None:
            key, q = key + ix.index_head_dim * c, q + ix.index_n_heads * (ix.index_head_dim * c + 4)
        return [(name, "DSA" if ix else "MLA", key, q, out) for name in names]
    v, sk, rows = m.v4, m.shared_kv, []
    for i, (name, r) in enumerate(zip(names, m.compress_ratios)):
        indexer = (i in sk.index_source_layers) if sk is not None and i < m.n_layers else r == 4
        key = v.head_dim * c * 1.0 + (v.head_dim * c / r if r else 0) + (v.index_head_dim * c / r if indexer else 0)
        q = v.n_heads * v.head_dim * c + 4 + (v.index_n_heads * (v.index_head_dim * c + 4) if indexer else 0)
        kind = "SWA" if r == 0 else f"{'CSA' if indexer else 'HCA'} m={r}"
        rows.append((name, kind, key, q, v.n_heads * v.head_dim * c))
    return rows


def context_volume(m: ModelConfig, B_local: int, T: int, cp: int) -> list[ContextLayer]:
    """Per attention layer, the context-parallel bytes one device moves per train step (module doc)."""
    if cp <= 1:
        return []
    remat = m.remat != "none"
    out = []
    for name, kind, key_row, q_row, out_row in _kinds(m):
        K = int(B_local * T * key_row)
        ag = K * (1 + remat) + K // cp
        ring = (3 + remat) * (cp - 1) * K // cp
        permute = 2 * B_local * (T // cp) * (q_row + out_row)
        halo = B_local * 2 * (m.v4.window_size - 1) * m.v4.head_dim * jnp.dtype(m.dtype).itemsize if m.v4 else 0
        out.append(ContextLayer(name, kind, K, ag, ring, int(permute), int(halo), cp))
    return out


def context_parts(m: ModelConfig, B_local: int, T: int, cp: int) -> list[tuple[str, int, int]]:
    """`context_volume` as (collective kind, count, bytes) parts of `analytic.estimate` (all_gather)."""
    layers = context_volume(m, B_local, T, cp)
    if not layers:
        return []
    n, remat = len(layers), int(m.remat != "none")
    K = sum(x.key_bytes for x in layers)
    return [("all-gather", n * (1 + remat), K * (1 + remat)), ("reduce-scatter", n, K // cp),
            ("collective-permute", 4 * n, sum(x.permute for x in layers))]


def context_rows(layers: list[ContextLayer], T: int) -> list[str]:
    """The report's table: per layer and in total, both strategies."""
    if not layers:
        return []
    cp = layers[0].cp
    mib = lambda n: f"{n / 2**20:>12.2f}"  # noqa: E731
    lines = [f"context parallelism over {cp} devices at seq_len {T} (per device, per step, MiB; analytic):",
             f"  {'layer':<8}{'kind':<10}{'keys':>12}{'all_gather':>12}{'ring':>12}{'q permute':>12}{'halo':>12}"]
    for x in layers:
        lines.append(f"  {x.layer:<8}{x.kind:<10}{mib(x.key_bytes)}{mib(x.all_gather)}{mib(x.ring)}"
                     f"{mib(x.permute)}{mib(x.halo)}")
    tot = [math.fsum(getattr(x, f) for x in layers) for f in ("key_bytes", "all_gather", "ring", "permute", "halo")]
    lines.append(f"  {'total':<18}" + "".join(mib(t) for t in tot))
    return lines
