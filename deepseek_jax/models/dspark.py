"""DSpark block drafting (DeepSeek-V4.1 reference §1.11), the successor of MTP (models/mtp.py).

K stages (`num_nextn_predict_layers`) draft Z = `dspark.block_size` tokens at once from the main model's
target-layer inputs (decoder.py `captures`: per target layer, the mean of the I streams at its input):

    main_x_p    = RMSNorm_main(W_main capture_p)                            [D], per main-model position p
    window^k_p  = RoPE_p(RMSNorm_kv(W_kv^k main_x_p))                       stage k's own kv of main_x
    X^0         = Emb([y, noise × (Z−1)]) on I streams at positions p+1 … p+Z,   pre^0 = e_0 (stream 0)
    X^k, pre^k  = Block_k(X^{k−1}, pre^{k−1})   single-pass mHC block (block.py); V4.1 attention at ratio 0
                  (θ = rope_theta, no YaRN), MoE of `dspark.n_routed_experts` experts, top-`n_activated_experts`
    attention:  the Z draft queries see window^k_{p−w+1 … p} and all Z block keys (no causal mask inside the
                block); sink, inverse RoPE and grouped output as in the backbone (v4.py)
    h_z         = Σ_i pre^K_i X^K_{z,i}                                     the last stage's collapse
    logits_z    = norm(h_z) W_head + E_M[out_z] W_M                         Markov head, rank r
    conf_z      = [h_z ; E_M[out_z]] w_c                                    float32 logit
    out_0 = y,  out_{z+1} = argmax logits_z (drafting) | t_{p+2+z} (training: teacher forcing)

Drafting from the accepted token y at p+1 gives Z tokens for positions p+2 … p+Z+1.

Entry points. Training (`DSpark.__call__`, called by the decoder when `mtp` and no cache): every position
p of the sequence is a draft group at once, its window the main_x of positions ≤ p, its block
[t_{p+1}, noise …], its Markov inputs the true t_{p+1+z}; slot z predicts t_{p+2+z}. Each of the T·Z draft
queries gathers its w + Z keys (V4Attention.attend, `v4.q_block` queries at a time), so memory is
O(B·T·Z·(w+Z)), never [T, T]; the window is not cut at document starts, as the backbone's is not.
Decoding (`draft`): each stage keeps a ring of w window kv (`DraftState`), written with the main_x of
the positions committed since the last draft (the prompt's at prefill), then drafts Z tokens greedily.

The training loss is ours (train.py `_loss_terms`, losses.py `dspark_losses`): the official code has no
loss (reference §6.9). The drafter is trained like MTP: cross-entropy of slot z against t_{p+2+z}, plus a
small BCE teaching the confidence logit whether the slot's argmax is the true token.

Parameters (under `dspark/`; official names `mtp.{k}.…` of the V4.1 checkpoint, reference §4.2):

    stage_k/attn_norm/scale [D] embed                          mtp.{k}.attn_norm.weight
    stage_k/attn_hc/{fn [I, D, Z'], base [Z'], scale [3]}       mtp.{k}.hc_attn_{fn,base,scale}  (Z' = (2+I)·I)
    stage_k/attn/w_dq [D, Q] (embed, q_latent)                  mtp.{k}.attn.wq_a
    stage_k/attn/q_norm/scale [Q] q_latent                      mtp.{k}.attn.q_norm
    stage_k/attn/w_uq [Q, N, X] (q_latent, heads, head_dim)     mtp.{k}.attn.wq_b
    stage_k/attn/w_kv [D, X] (embed, head_dim)                  mtp.{k}.attn.wkv
    stage_k/attn/kv_norm/scale [X] head_dim                     mtp.{k}.attn.kv_norm
    stage_k/attn/sink [N] heads                                 mtp.{k}.attn.attn_sink
    stage_k/attn/w_oa [W, N/W, X, Y] (heads, -, head_dim, kv_latent)  mtp.{k}.attn.wo_a
    stage_k/attn/w_ob [W, Y, D] (heads, kv_latent, embed)       mtp.{k}.attn.wo_b
    stage_k/ffn_norm/scale, stage_k/ffn_hc/*                    mtp.{k}.ffn_norm.weight, hc_ffn_*
    stage_k/ffn/w_router [D, E'] (embed, -)                     mtp.{k}.ffn.gate.weight
    router: stage_k/ffn/bias, bias_vl [E']                      mtp.{k}.ffn.gate.bias, gate.bias_vl
    stage_k/ffn/{w_gate, w_up} [E', D, F], w_down [E', F, D]    mtp.{k}.ffn.experts.{e}.w1, w3, w2
    stage_k/ffn/shared/{w_gate, w_up, w_down}                   mtp.{k}.ffn.shared_experts.w1, w3, w2
    main_proj [n·D, D] (-, embed)                               mtp.0.main_proj (transposed)
    main_norm/scale [D] embed                                   mtp.0.main_norm
    norm/scale [D] embed                                        mtp.{K−1}.norm
    markov_embed [V, r] (vocab, -)                              mtp.{K−1}.markov_head.embed
    markov_head [r, V] (-, vocab)                               mtp.{K−1}.markov_head.head (transposed)
    confidence [D + r, 1] (-, -)                                mtp.{K−1}.confidence_head.proj (transposed)

The embedding and head are the main model's (`embedding`, `w_head`). Local letters: G draft groups
(training: T; decoding: 1), Z block slots, U key slots of a draft query (w window + Z block), X attention
head width, Y Markov rank, P context rows written into the windows, C = n·D captured width, W = D + Y
the confidence head's input.
"""

import dataclasses
from typing import Any, NamedTuple

import flax.linen as nn
import jax
import jax.numpy as jnp

from deepseek_jax.axes import constrain, dense_init, param
from deepseek_jax.config import ModelConfig
from deepseek_jax.layers.attention.v4 import window_slots
from deepseek_jax.layers.attention.v41 import V41Attention
from deepseek_jax.layers.mhc import collapse, expand_streams
from deepseek_jax.layers.moe.layer import MoE, MoEAux
from deepseek_jax.layers.norms import RMSNorm
from deepseek_jax.layers.rope import rope_tail
from deepseek_jax.models.block import Block, BlockInputs
from deepseek_jax.models.common import ACT_BTD, LayerKind, embed, head, layer_rope, shift_left
from deepseek_jax.quant import sim_act, sim_weight

STAGE_KIND = LayerKind("v4", 0, "moe")  # ratio 0: window only, θ = rope_theta without YaRN (layer_rope)


class DSparkOutput(NamedTuple):
    logits: jax.Array | None  # [B, G, Z, V] float32, Markov term included (None with return_logits=False)
    hidden: jax.Array  # [B, G, Z, D] after `norm` (what the head reads)
    markov: jax.Array  # [B, G, Z, Y] E_M[out_z], the Markov head's input (its logits: markov @ W_M)
    confidence: jax.Array  # [B, G, Z] float32 confidence logits
    routing: MoEAux  # per stage, stacked [K, ...]
    tokens: jax.Array | None  # [B, G, Z] drafted out_1 … out_Z (decoding), None in training


class DraftState(NamedTuple):
    """Decoding: each stage's window ring and how many context positions have been written."""

    windows: tuple[jax.Array, ...]  # per stage [B, w, X] kv of main_x, position q at slot q mod w
    position: jax.Array  # int32: context positions written so far (the next one to write)


class TrainWindow(NamedTuple):
    main_x: jax.Array  # [B, T, D]: group p's window is main_x at positions p−w+1 … p


class RingWindow(NamedTuple):
    ring: jax.Array  # [B, w, X] the stage's window before this step
    main_x: jax.Array  # [B, P, D] new context rows at positions start … start+P−1 (the first n_new real)
    start: jax.Array  # int32 position of row 0
    n_new: jax.Array  # int32 rows to write; the block sits after position start + n_new − 1


def init_draft_state(cfg: ModelConfig, batch: int, dtype=None) -> DraftState:
    """Empty window rings, one per stage."""
    ring = jnp.zeros((batch, cfg.v4.window_size, cfg.v4.head_dim), jnp.dtype(dtype or cfg.dtype))
    return DraftState((ring,) * cfg.num_nextn_predict_layers, jnp.int32(0))


# ----------------------------------------------------------------------------------------------
# Pure functions


def train_key_slots(T: int, Z: int, w: int) -> jax.Array:
    """[T·Z, w+Z] key slots of every draft query in a source [T context rows ; T·Z block rows]:
    group p's window (positions p−w+1 … p, −1 before 0), then all Z keys of its own block."""
    win_TU = window_slots(T, w, 0, 0)
    blk_TZ = T + jnp.arange(T)[:, None] * Z + jnp.arange(Z)[None, :]
    slots_TZU = jnp.concatenate([jnp.broadcast_to(win_TU[:, None, :], (T, Z, w)),
                                 jnp.broadcast_to(blk_TZ[:, None, :], (T, Z, Z))], axis=-1)
    return slots_TZU.reshape(T * Z, w + Z)


def ring_key_slots(p, w: int, Z: int) -> jax.Array:
    """[Z, w+Z] key slots in a source [w ring slots ; Z block rows] for a block after position p."""
    pos_U = p - w + 1 + jnp.arange(w)
    win_U = jnp.where(pos_U >= 0, pos_U % w, -1)
    slots_U = jnp.concatenate([win_U, w + jnp.arange(Z)])
    return jnp.broadcast_to(slots_U, (Z, w + Z))


def ring_write_rows(ring_BUX: jax.Array, kv_BPX: jax.Array, start, n) -> jax.Array:
    """Writes rows j < n (the last w of them) at slot (start + j) mod w; rows j ≥ n are padding."""
    w, P = ring_BUX.shape[1], kv_BPX.shape[1]
    j_P = jnp.arange(P)
    slot_P = jnp.where((j_P < n) & (j_P >= n - w), (start + j_P) % w, w)  # w: out of range, dropped
    return ring_BUX.at[:, slot_P].set(kv_BPX.astype(ring_BUX.dtype), mode="drop")


def markov_draft(logits_BZV, y_B, embed_VY, head_YV):
    """Greedy Markov refinement: out_0 = y, logits_z += E_M[out_z] W_M, out_{z+1} = argmax logits_z.
    Returns (drafts out_1 … out_Z [B, Z], inputs out_0 … out_{Z−1} [B, Z], corrected logits [B, Z, V])."""
    out_B, drafts, inputs, logits = y_B, [], [], []
    for z in range(logits_BZV.shape[1]):
        inputs.append(out_B)
        m_BY = jnp.take(embed_VY, out_B, axis=0)
        logits.append(logits_BZV[:, z] + jnp.einsum("BY,YV->BV", m_BY, head_YV, preferred_element_type=jnp.float32))
        out_B = jnp.argmax(logits[-1], axis=-1).astype(jnp.int32)
        drafts.append(out_B)
    return jnp.stack(drafts, 1), jnp.stack(inputs, 1), jnp.stack(logits, 1)


# ----------------------------------------------------------------------------------------------
# Modules


class DSparkAttention(V41Attention):
    """V4.1 attention at ratio 0 whose window holds kv of main_x (`TrainWindow` | `RingWindow`) and
    whose block keys are unmasked; V4Attention's query, key_value, attend and output."""

    block_size: int = 1  # Z

    @nn.compact
    def __call__(self, x_BMD, positions_BM, ctx):
        """(out [B, M, D], the context with its ring updated). M = G·Z draft tokens, group-major."""
        w, Z, M = self.cfg.window_size, self.block_size, x_BMD.shape[1]
        x_BMD = constrain(x_BMD.astype(self.dtype), ACT_BTD)
        rows_BPD = ctx.main_x.astype(self.dtype)
        B, P, _ = rows_BPD.shape
        start = 0 if isinstance(ctx, TrainWindow) else ctx.start
        row_positions_BP = jnp.broadcast_to(start + jnp.arange(P, dtype=jnp.int32), (B, P))
        cos_BSr, sin_BSr, _ = self.rotary(jnp.concatenate([positions_BM, row_positions_BP], axis=1))
        cos_BMr, sin_BMr = cos_BSr[:, :M], sin_BSr[:, :M]
        _, q_BMNX = self.query(x_BMD, cos_BMr, sin_BMr)
        kv_BSX = self.key_value(jnp.concatenate([x_BMD, rows_BPD], axis=1), cos_BSr, sin_BSr)  # one W_kv call
        block_BMX, rows_BPX = kv_BSX[:, :M], kv_BSX[:, M:]
        if isinstance(ctx, TrainWindow):
            source_BSX = jnp.concatenate([rows_BPX, block_BMX], axis=1)
            slots_MU = train_key_slots(P, Z, w)
        else:
            ctx = ctx._replace(ring=ring_write_rows(ctx.ring, rows_BPX, ctx.start, ctx.n_new))
            source_BSX = jnp.concatenate([ctx.ring.astype(self.dtype), block_BMX], axis=1)
            slots_MU = jnp.tile(ring_key_slots(ctx.start + ctx.n_new - 1, w, Z), (M // Z, 1))
        o_BMNX = self.attend(q_BMNX, source_BSX, jnp.broadcast_to(slots_MU, (B, *slots_MU.shape)))
        o_BMNX = rope_tail(o_BMNX, cos_BMr[:, :, None], -sin_BMr[:, :, None])  # RoPE at −t
        return self.output(o_BMNX), ctx


class DSparkStage(Block):
    """One stage: Block's single-pass mHC residuals around DSpark attention and a DSpark MoE. The
    window context travels in Block's `cache` slot (and comes back with its ring updated)."""

    def attention(self, h_BTD, ctx, inputs: BlockInputs):
        cfg, dtype = self.cfg, jnp.dtype(self.cfg.dtype)
        attn = DSparkAttention(cfg.v4, layer_rope(cfg, self.kind), 0, cfg.dim, cfg.norm_eps, dtype, cfg.quant_sim,
                               q_head_norm=False, role="swa", shared_cfg=cfg.shared_kv,
                               block_size=cfg.dspark.block_size, name="attn")
        out_BTD, ctx = attn(h_BTD, inputs.positions_BT, ctx)
        return out_BTD, ctx, None, None

    def ffn(self, h_BTD, inputs: BlockInputs):
        cfg, d = self.cfg, self.cfg.dspark
        moe_cfg = dataclasses.replace(cfg.moe, n_routed_experts=d.n_routed_experts, n_hash_layers=0,
                                      n_activated_experts=d.n_activated_experts, n_expert_groups=1, n_limited_groups=1)
        mask_BT = None if inputs.segment_ids_BT is None else inputs.segment_ids_BT > 0
        moe = MoE(moe_cfg, cfg.dim, jnp.dtype(cfg.dtype), quant_sim=cfg.quant_sim, name="ffn")
        return moe(h_BTD, mask_BT, None, inputs.span_BT)


class DSpark(nn.Module):
    """The drafter (module docstring): `__call__` trains on every position, `draft` decodes."""

    cfg: ModelConfig

    def __call__(self, tokens_BT, captures_BTC, embedding_VD, w_head_DV, segment_ids_BT=None,
                 return_logits: bool = True) -> DSparkOutput:
        """Teacher-forced drafts of every position p: block [t_{p+1}, noise …], Markov inputs t_{p+1+z}
        (slot z predicts t_{p+2+z}; slots past the row end read 0 and are masked by the loss)."""
        d = self.cfg.dspark
        Z, (B, T) = d.block_size, tokens_BT.shape
        markov_BTZ = jnp.stack([shift_left(tokens_BT, 1 + z) for z in range(Z)], axis=-1)
        block_BTZ = markov_BTZ.at[..., 1:].set(d.noise_token_id)
        positions_BTZ = jnp.broadcast_to(jnp.arange(T)[:, None] + 1 + jnp.arange(Z)[None, :], (B, T, Z))
        mask_BT = None if segment_ids_BT is None else segment_ids_BT > 0
        out, _ = self.run(block_BTZ, captures_BTC, lambda k, main_x: TrainWindow(main_x), positions_BTZ, mask_BT,
                          embedding_VD, w_head_DV, markov_BTZ, return_logits)
        return out

    def draft(self, y_B, rows_BPC, state: DraftState, n_new, embedding_VD, w_head_DV, markov_BZ=None):
        """(DSparkOutput of one group (G = 1; `tokens`: drafts for positions p+2 … p+Z+1), new state):
        writes the first n_new rows of captures (positions state.position …, p the last) into the
        windows, then drafts greedily from y at p+1 (or teacher-forced by markov_BZ = out_0 … out_{Z−1})."""
        Z, noise = self.cfg.dspark.block_size, self.cfg.dspark.noise_token_id
        p = state.position + n_new - 1
        B = y_B.shape[0]
        block_B1Z = jnp.concatenate([y_B[:, None], jnp.full((B, Z - 1), noise, jnp.int32)], axis=1)[:, None]
        positions_B1Z = jnp.broadcast_to(p + 1 + jnp.arange(Z, dtype=jnp.int32), (B, 1, Z))
        ctx_of = lambda k, main_x: RingWindow(state.windows[k], main_x, state.position, n_new)  # noqa: E731
        markov_B1Z = None if markov_BZ is None else markov_BZ[:, None]
        out, ctxs = self.run(block_B1Z, rows_BPC, ctx_of, positions_B1Z, None, embedding_VD, w_head_DV, markov_B1Z)
        return out, DraftState(tuple(c.ring for c in ctxs), state.position + n_new)

    @nn.compact
    def run(self, block_BGZ, rows_BPC, ctx_of, positions_BGZ, mask_BG, embedding_VD, w_head_DV,
            markov_BGZ=None, return_logits: bool = True) -> tuple[DSparkOutput, list[Any]]:
        """The stages and heads on G draft groups; markov_BGZ None = greedy Markov drafting (G = 1)."""
        cfg, dtype = self.cfg, jnp.dtype(self.cfg.dtype)
        (B, G, Z), D, I = block_BGZ.shape, cfg.dim, cfg.mhc.hc_mult
        main_x_BPD = self.main_x(rows_BPC)
        x_BMID = expand_streams(embed(embedding_VD, block_BGZ.reshape(B, G * Z), dtype), I)
        carry = (x_BMID, jnp.broadcast_to(jax.nn.one_hot(0, I), (B, G * Z, I)))  # pre^0 = e_0
        segs_BM = None if mask_BG is None else jnp.repeat(mask_BG, Z, axis=1).astype(jnp.int32)
        inputs = BlockInputs(block_BGZ.reshape(B, G * Z), positions_BGZ.reshape(B, G * Z), segs_BM, 0, None)
        ctxs, stats = [], []
        for k in range(cfg.num_nextn_predict_layers):
            stage = DSparkStage(cfg, STAGE_KIND, name=f"stage_{k}")
            carry, (ctx, layer_stats, _, _) = stage(carry, ctx_of(k, main_x_BPD), inputs)
            ctxs.append(ctx)
            stats.append(layer_stats.routing)
        h_BGZD = collapse(*carry).reshape(B, G, Z, D)
        hidden_BGZD = RMSNorm(D, cfg.norm_eps, "embed", dtype, name="norm")(h_BGZD.astype(dtype))
        out = self.heads(h_BGZD, hidden_BGZD, block_BGZ[..., 0], markov_BGZ, w_head_DV, return_logits)
        return out._replace(routing=jax.tree.map(lambda *a: jnp.stack(a), *stats)), ctxs

    def main_x(self, rows_BPC):
        """main_x = RMSNorm_main(W_main capture) [B, P, D] (an FP8 linear in the release)."""
        cfg, dtype = self.cfg, jnp.dtype(self.cfg.dtype)
        C, D = len(cfg.dspark.target_layers) * cfg.dim, cfg.dim
        w_main_CD = param(self, "main_proj", (None, "embed"), (C, D), dense_init([0], [1]))
        x_BPD = jnp.einsum("BPC,CD->BPD", sim_act(rows_BPC.astype(dtype), cfg.quant_sim),
                           sim_weight(w_main_CD, cfg.quant_sim).astype(dtype))
        return RMSNorm(D, cfg.norm_eps, "embed", dtype, name="main_norm")(x_BPD)

    def heads(self, h_BGZD, hidden_BGZD, y_BG, markov_BGZ, w_head_DV, return_logits: bool) -> DSparkOutput:
        """Head + Markov head (teacher-forced, or greedy from y when markov_BGZ is None) and confidence."""
        cfg, dtype = self.cfg, jnp.dtype(self.cfg.dtype)
        V, D, Y = cfg.vocab_size, cfg.dim, cfg.dspark.markov_rank
        embed_VY = param(self, "markov_embed", ("vocab", None), (V, Y), nn.initializers.normal(1.0)).astype(dtype)
        head_YV = param(self, "markov_head", (None, "vocab"), (Y, V), dense_init([0], [1])).astype(dtype)
        w_conf_W1 = param(self, "confidence", (None, None), (D + Y, 1), dense_init([0], [1]))
        B, G, Z, _ = h_BGZD.shape
        tokens_BGZ, logits_BGZV = None, None
        if markov_BGZ is None:  # drafting: G = 1
            base_BZV = head(hidden_BGZD[:, 0], w_head_DV)
            tokens_BZ, markov_BGZ, logits_BZV = markov_draft(base_BZV, y_BG[:, 0], embed_VY, head_YV)
            tokens_BGZ, markov_BGZ, logits_BGZV = tokens_BZ[:, None], markov_BGZ[:, None], logits_BZV[:, None]
        m_BGZY = jnp.take(embed_VY, markov_BGZ, axis=0)
        if logits_BGZV is None and return_logits:
            base_BMV = head(hidden_BGZD.reshape(B, G * Z, D), w_head_DV).reshape(B, G, Z, V)
            logits_BGZV = base_BMV + jnp.einsum("BGZY,YV->BGZV", m_BGZY, head_YV, preferred_element_type=jnp.float32)
        feats_BGZW = jnp.concatenate([h_BGZD, m_BGZY], axis=-1).astype(jnp.float32)
        conf_BGZ = jnp.einsum("BGZW,W->BGZ", feats_BGZW, w_conf_W1[:, 0])
        return DSparkOutput(logits_BGZV, hidden_BGZD, m_BGZY, conf_BGZ, None, tokens_BGZ)


def draft(cfg: ModelConfig, variables, y_B, rows_BPC, state: DraftState, n_new):
    """`DSpark.draft` with the model's variables (its `dspark` subtrees and the shared embedding / head):
    (drafts [B, Z], confidence logits [B, Z], new DraftState)."""
    params, router = nn.unbox(variables["params"]), nn.unbox(variables.get("router", {}))
    sub = {"params": params["dspark"], "router": router.get("dspark", {})}
    out, state = DSpark(cfg).apply(sub, y_B, rows_BPC, state, jnp.asarray(n_new, jnp.int32), params["embedding"],
                                   params["w_head"], method="draft")
    return out.tokens[:, 0], out.confidence[:, 0], state
