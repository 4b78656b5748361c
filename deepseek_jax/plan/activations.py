"""Activation memory of one train step per device: what the backward keeps, and the largest working set.

Saved residuals (measured). `jax.ad_checkpoint.saved_residuals` on the loss function lists every array
JAX's AD keeps from the forward for the backward, under the config's `model.remat` policy; it traces on
abstract shapes (`ShapeDtypeStruct`s: nothing is allocated) with no mesh, so the shapes are global.
Residuals that are arguments (parameters, the batch) are left out: the state and the batch are counted
elsewhere. Traced at batch 1 and 2 (the plan's seq_len), the bytes split exactly into a part per
sequence, r(2) − r(1), and a fixed part, 2·r(1) − r(2) (e.g. the head gradient the fused loss keeps,
[D, V] f32). Per device:

    saved = fixed + per_sequence · B / token_shards        token_shards = ways(act_batch ∪ act_seq)

A fixed residual shaped like a large parameter (a bf16 cast of a weight kept for the backward, e.g. with
`model.remat: none`) counts at that parameter's per-device shard (`weight_split`); the rest of the fixed
part counts whole on every device. The fused loss's [D, V] head residual has the head's shape, so it too
counts at the head's shard here; the loss-chunk row below counts it whole (D · V · (f + c)).

Working set (an explicit estimate, per device; c = compute-dtype bytes, f = 4; B_l sequences and
M = B·T / token_shards tokens per device, b = B_l · min(q_block, T / cp) queries per block):

  remat block     the residuals of ONE block, held while its backward runs after the recompute:
                  (r_none(1) − r(1)) / scanned layers · B / token_shards (measured, as above; 0 without
                  remat, where they are already in `saved`)
  attention keys  the key side of the device's sequences (gathered under context parallelism) and its
                  gradient before the reduce-scatter: 2 · B_l · T · key row (plan.context: DSA C+R+Y, +4)
  query block     DSA: the top-k keys gathered per query b · U · (C + R) · c, their logits and
                  probabilities b · N · U · f · 2, the indexer's running top-k b · (U + k_block) · 8 and one
                  key chunk's head scores b · P_idx · k_block · f; dense MLA: b · N · k_block · f · 2;
                  V4: b · N · (w + U + k_block) · f · 2
  MoE dispatch    ring: the gathered tokens and f32 partial outputs M · ep · D · (c + f), plus the expert
                  hidden of the device's M · A pairs (balanced) M · A · F · c · 3; a2a: ep · C · D · (c + f) · 2,
                  C = cf · M · A / ep (cf 0: M · A); ragged_a2a: (ep + 1) · M · A · D · c (the worst-case
                  receive buffer); dense: E · C · D · (c + f) · 2
  loss chunk      one chunk's logits, exponentials and gradient U_l · V · f · 3, the head gradient
                  accumulator D · V · f and the cast head D · V · c (U_l = tokens per chunk per device)

peak = saved + remat block + max(attention keys + query block, MoE dispatch, loss chunk): the phases
of a layer run one after another. Not counted: XLA's fusion temporaries and collective buffers.
"""

import dataclasses
import math

import jax
import jax.numpy as jnp
from jax._src.ad_checkpoint import saved_residuals  # public as jax.ad_checkpoint.print_saved_residuals only

from deepseek_jax.config import Config
from deepseek_jax.losses import auto_chunk_tokens
from deepseek_jax.models import build_model
from deepseek_jax.plan.context import _kinds
from deepseek_jax.program import BATCH_DTYPES
from deepseek_jax.train import loss_fn


def _abstract_batch(cfg: Config, B: int) -> dict:
    """A text batch [B, seq_len] as ShapeDtypeStructs (no sharding); Engram rows when the model has Engram."""
    T = cfg.data.seq_len
    batch = {k: jax.ShapeDtypeStruct((B, T), dt) for k, dt in BATCH_DTYPES.items()}
    if (e := cfg.model.engram) is not None:
        batch["engram_rows"] = jax.ShapeDtypeStruct((B, T, *e.rows_shape), jnp.int32)
    return batch


def residual_bytes(cfg: Config, params, router, B: int, weight_split: dict | None = None) -> tuple[int, float]:
    """(bytes of the residuals AD saves for the loss's backward at [B, seq_len], global shapes, no mesh,
    arguments excluded; the same with every weight-shaped residual scaled to its per-device shard).
    params / router: abstract trees (ShapeDtypeStructs); weight_split: {shape: per-device fraction}."""
    model = build_model(cfg.model)
    res = saved_residuals(lambda p, r, b: loss_fn(p, r, b, model, cfg)[0], params, router, _abstract_batch(cfg, B))
    kept = [(math.prod(a.shape) * jnp.dtype(a.dtype).itemsize, tuple(a.shape)) for a, why in res
            if "from the argument" not in why]
    split = weight_split or {}
    return sum(n for n, _ in kept), sum(n * split.get(shape, 1.0) for n, shape in kept)


def weight_split(params, shardings) -> dict[tuple, float]:
    """{parameter shape (and a scanned stack's per-layer shape): the fraction one device holds}: a residual of
    that shape is a cast or gather of the weight (e.g. a bf16 copy of an expert stack), held
    at the weight's own split on a mesh (an approximation where shapes coincide; matrices of tokens never
    match these shapes at the plan's sizes)."""
    out = {}
    for a, s in zip(jax.tree.leaves(params), jax.tree.leaves(shardings), strict=True):
        frac = math.prod(s.shard_shape(a.shape)) / max(math.prod(a.shape), 1)
        for shape in (tuple(a.shape), tuple(a.shape[1:])):
            if math.prod(shape) >= 2**20:  # only large weights: small shapes could be token arrays
                out[shape] = min(out.get(shape, 1.0), frac)
    return out


def _scanned_layers(cfg: Config) -> int:
    """Blocks under the remat policy: the main stack and the MTP modules (models/mtp.py); DSpark's stages
    are not wrapped (their residuals are in `saved`)."""
    m = cfg.model
    return m.n_layers + (m.num_nextn_predict_layers if m.dspark is None else 0)


def saved_memory(cfg: Config, params, router, token_shards: int, split: dict | None = None) -> dict[str, float]:
    """Per-device residual bytes (module docstring): fixed (weight-shaped residuals at their shard),
    per_sequence, saved, remat_block."""
    (r1, w1), (r2, _) = residual_bytes(cfg, params, router, 1, split), residual_bytes(cfg, params, router, 2)
    per_seq, fixed = r2 - r1, 2 * r1 - r2
    fixed_local = fixed - (r1 - w1)  # weight-shaped residuals are in the fixed part: counted at their shard
    B = cfg.data.global_batch_size
    out = {"residual_fixed": fixed_local, "residual_per_sequence": per_seq,
           "saved": fixed_local + per_seq * B / token_shards}
    block = 0.0
    if cfg.model.remat != "none":
        none = dataclasses.replace(cfg, model=dataclasses.replace(cfg.model, remat="none"))
        block = max(0, residual_bytes(none, params, router, 1)[0] - r1) / _scanned_layers(cfg) * B / token_shards
    out["remat_block"] = block
    return out


def working_set(cfg: Config, token_shards: int, B_local: int, cp: int, ep: int) -> dict[str, float]:
    """The module docstring's per-layer working-set estimate, bytes per device by phase."""
    m, T, B = cfg.model, cfg.data.seq_len, cfg.data.global_batch_size
    c, f, D, V = jnp.dtype(m.dtype).itemsize, 4, m.dim, m.vocab_size
    M = B * T / token_shards
    key_row = max(row for _, _, row, _, _ in _kinds(m))
    out = {"attention_keys": 2 * B_local * T * key_row, "query_block": _query_block(m, B_local, T // max(cp, 1), T)}
    out["moe_dispatch"] = _dispatch_bytes(m, M, ep)
    U = min(cfg.train.loss_chunk_tokens or auto_chunk_tokens(V, token_shards), M)
    out["loss_chunk"] = U * V * f * 3 + D * V * (f + c)
    return out


def _query_block(m, B_local: int, T_local: int, T: int) -> float:
    """T_local queries a device, T keys; a k_block of 0 means all T keys in one chunk."""
    f, c = 4, jnp.dtype(m.dtype).itemsize
    if m.mla is not None:
        a, ix = m.mla, m.index
        q = (ix.index_q_block if ix is not None and ix.index_q_block else a.q_block) or T_local
        b, kb = B_local * min(q, T_local), min(a.k_block or T, T)
        if ix is None or ix.index_dense_warmup:
            return b * a.n_heads * kb * f * 2
        U = min(ix.index_topk, T)
        return (b * U * (a.kv_lora_rank + a.qk_rope_head_dim) * c + b * a.n_heads * U * f * 2
                + b * (U + kb) * 8 + b * ix.index_n_heads * kb * f)
    v = m.v4
    b, kb = B_local * min(v.q_block or T_local, T_local), min(v.k_block or T, T)
    return b * v.n_heads * (min(v.window_size, T) + min(v.index_topk, T) + kb) * f * 2


def _dispatch_bytes(m, M: float, ep: int) -> float:
    c, f, D, F = jnp.dtype(m.dtype).itemsize, 4, m.dim, m.moe.moe_inter_dim
    A, E, cf = m.moe.n_activated_experts, m.moe.n_routed_experts, m.moe.capacity_factor
    X = M * A
    hidden = X * F * c * 3
    if ep <= 1 or m.moe.dispatch == "ring":
        return M * max(ep, 1) * D * (c + f) + hidden
    if m.moe.dispatch == "a2a":
        return ep * (X / ep * cf if cf else X) * D * (c + f) * 2 + hidden
    if m.moe.dispatch.startswith("ragged_a2a"):
        return (ep + 1) * X * D * c + hidden
    C = M if cf == 0 else math.ceil(cf * X / E)
    return E * C * D * (c + f) * 2 + hidden


def peak(mem: dict[str, float]) -> float:
    """saved + remat block + the largest phase of the working set (module docstring)."""
    phases = (mem["attention_keys"] + mem["query_block"], mem["moe_dispatch"], mem["loss_chunk"])
    return mem["saved"] + mem["remat_block"] + max(phases)


def fit(state_bytes: float, activation_peak: float, hbm_gib: float, headroom: float) -> dict[str, float | bool]:
    """Whether state + activation peak fit in hbm_gib per device with `headroom` (a fraction) kept free."""
    if not (hbm_gib > 0 and 0 <= headroom < 1):
        raise ValueError(f"--hbm-gib must be > 0 and --headroom in [0, 1), got {hbm_gib} and {headroom}")
    usable = hbm_gib * 2**30 * (1 - headroom)
    need = state_bytes + activation_peak
    return {"hbm": hbm_gib * 2**30, "usable": usable, "need": need, "fits": need <= usable}
