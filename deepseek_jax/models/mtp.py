"""Multi-token prediction (V3 §2.2; V4 §1.9 of the reference notes): module k predicts the token
k + 1 places ahead from the depth-(k−1) representation and the embedding of the token k ahead.

Two kinds, by the model's residual kind:
    chain (plain residual, V3):  h_k = Block_k(W_eh [enorm(Emb(t_{i+k})); hnorm(h_{k-1})])
                                 h_0 = the main model's final-normed output (as HF `MtpModel`, vLLM)
    streams (mHC, V4):           Z_k = e_proj(enorm(Emb(t_{i+k}))) + h_proj(hnorm(X_{k-1})) per stream
                                 X_k = Block_k(Z_k);  h_k = HyperHead_k(X_k)
                                 X_0 = the main model's final streams before its HyperHead
Then logits_k = Head(norm_k(h_k)) with the shared head. Each block is the model's attention kind
for layer n_layers + k with a learned-routing MoE.

Positions: models with per-document positions shift them with the tokens (slot i runs at the
position of t_{i+k}); row-position models (V4 attention: its compression blocks are row slots)
run every depth at the row's own positions.
"""

import flax.linen as nn
import jax
import jax.numpy as jnp

from deepseek_jax.axes import dense_init, param
from deepseek_jax.config import ModelConfig
from deepseek_jax.layers.mhc import HyperHead
from deepseek_jax.layers.norms import RMSNorm
from deepseek_jax.models.block import Block, BlockInputs
from deepseek_jax.models.common import LayerKind, remat_policy, shift_left
from deepseek_jax.quant import sim_act, sim_weight


class ChainMTP(nn.Module):
    """One V3 MTP module on a plain residual: returns (normed output, the next depth's input, stats)."""

    cfg: ModelConfig
    kind: LayerKind
    index_loss: bool = False

    @nn.compact
    def __call__(self, h_BTD, emb_BTD, inputs: BlockInputs):
        cfg, dtype, D = self.cfg, jnp.dtype(self.cfg.dtype), self.cfg.dim
        norm = lambda name: RMSNorm(D, cfg.norm_eps, "embed", dtype, name=name)  # noqa: E731
        w_eh_ZD = param(self, "w_eh", (None, "embed"), (2 * D, D), dense_init([0], [1]))
        # the embedding half comes first, as in the released checkpoints' eh_proj
        both_BTZ = jnp.concatenate([norm("enorm")(emb_BTD), norm("hnorm")(h_BTD)], axis=-1)
        x_BTD = jnp.einsum("BTZ,ZD->BTD", both_BTZ, w_eh_ZD.astype(dtype))
        x_BTD, (_, stats, _, _) = Block(cfg, self.kind, self.index_loss, name="block")(
            x_BTD, None, inputs
        )
        h_BTD = norm("norm")(x_BTD)
        return h_BTD, h_BTD, stats


class StreamMTP(nn.Module):
    """One V4 MTP module on mHC streams: returns (normed output, its streams, stats)."""

    cfg: ModelConfig
    kind: LayerKind
    index_loss: bool = False

    @nn.compact
    def __call__(self, x_BTID, emb_BTD, inputs: BlockInputs):
        cfg, dtype, D = self.cfg, jnp.dtype(self.cfg.dtype), self.cfg.dim
        norm = lambda name: RMSNorm(D, cfg.norm_eps, "embed", dtype, name=name)  # noqa: E731
        w_e_DD = param(self, "w_e", ("embed", None), (D, D), dense_init([0], [1]))
        w_h_DD = param(self, "w_h", ("embed", None), (D, D), dense_init([0], [1]))
        q = cfg.quant_sim  # e_proj / h_proj are FP8 linears (quant.py)
        w_e_DD, w_h_DD = (sim_weight(w, q).astype(dtype) for w in (w_e_DD, w_h_DD))
        e_BTD = jnp.einsum("BTD,DE->BTE", sim_act(norm("enorm")(emb_BTD), q), w_e_DD)
        h_BTID = jnp.einsum("BTID,DE->BTIE", sim_act(norm("hnorm")(x_BTID), q), w_h_DD)
        z_BTID = h_BTID + e_BTD[:, :, None, :]
        z_BTID, (_, stats, _, _) = Block(cfg, self.kind, self.index_loss, name="block")(
            z_BTID, None, inputs
        )
        y_BTD = HyperHead(cfg.mhc.hc_mult, D, cfg.mhc.hc_eps, cfg.norm_eps, name="hc_head")(z_BTID)
        return norm("norm")(y_BTD.astype(dtype)), z_BTID, stats


def mtp_module(cfg: ModelConfig, kind: LayerKind, index_loss: bool, name: str) -> nn.Module:
    """The MTP kind of the model's residual kind, under the model's remat policy like the main blocks (MTP
    runs in full forwards only): without it a full-size MTP block keeps every inner activation."""
    cls = ChainMTP if cfg.mhc is None else StreamMTP
    wrap, policy = remat_policy(cfg.remat)
    if wrap:
        cls = nn.remat(cls, policy=policy)
    return cls(cfg, kind, index_loss, name=name)


def mtp_inputs(inputs: BlockInputs, k: int, row_positions: bool) -> BlockInputs:
    """Depth k's block inputs: tokens and documents shifted by k; positions too unless row positions."""
    segs = None if inputs.segment_ids_BT is None else shift_left(inputs.segment_ids_BT, k)
    positions_BT = inputs.positions_BT if row_positions else shift_left(inputs.positions_BT, k)
    return BlockInputs(shift_left(inputs.tokens_BT, k), positions_BT, segs, 0, None)


def run_mtp(modules, carry, inputs: BlockInputs, embed_fn, row_positions: bool):
    """Chains the modules: (normed outputs [K, B, T, D], per-depth LayerStats)."""
    hidden, stats = [], []
    for k, module in enumerate(modules, start=1):
        inputs_k = mtp_inputs(inputs, k, row_positions)
        h_BTD, carry, s = module(carry, embed_fn(inputs_k.tokens_BT), inputs_k)
        hidden.append(h_BTD)
        stats.append(s)
    return jnp.stack(hidden), jax.tree.map(lambda *a: jnp.stack(a), *stats)
