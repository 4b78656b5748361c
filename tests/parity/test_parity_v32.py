"""Parity with HF transformers' DeepseekV32ForCausalLM (+ the generic MtpModel over its decoder
layer) on a tiny random fp32 model, weights converted through convert/v3.py; and token-by-token
decoding with the DSA cache against our own full forward.

Every V3.2 path is live: one dense and two MoE layers and an MTP block, all DSA; T = 48 > index_topk
= 16, so the selection is sparse for queries t >= 16; group-limited routing with router biases; YaRN.
Requirements (issue 5): max |Δlogit| <= 1e-4, KL(HF‖ours) <= 1e-6 per token, the routed experts of
every MoE layer and the indexer's top-k set of every layer (MTP included) identical; decoding equals
the full forward within 1e-4 (fp32). HF's indexer returns U indices even for queries with fewer
than U visible keys (masked fillers); we mark those -1, so the comparison is over visible keys.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from deepseek_jax.convert import table, v3
from deepseek_jax.convert.source import split_fused
from deepseek_jax.models import build_cache, build_model
from tests.parity.hf_reference import (
    RouterRecorder, _fan_in_, hf_state_dict, our_config, tiny_hf_config, torch, transformers,
)
from tests.utils import kl, per_layer, router_topk_margin

pytestmark = pytest.mark.parity
B, T, TOPK = 2, 48, 16
MIN_MARGIN = 1e-4  # top-k cut gaps (router and indexer); fp32 noise between the stacks is ~1e-6


def tiny_v32_hf_config() -> dict:
    # 8 indexer heads: a score is exactly 0 when every head's ReLU is (probability 2^-P per key), and
    # such exact ties at the top-k cut break differently in torch and XLA; with 4 heads they do occur
    return tiny_hf_config(
        num_hidden_layers=3, index_n_heads=8, index_head_dim=16, index_topk=TOPK,
        mtp_layer_types=["full_attention"], mtp_mlp_layer_types=["sparse"],  # MtpModel's layer kinds
    )  # fmt: skip


def build_hf_v32(hf_cfg: dict, seed: int = 0):
    """(DeepseekV32ForCausalLM, MtpModel), fan-in random init as hf_reference; the indexer's
    LayerNorm bias N(0, 0.1) (a converter that drops it fails)."""
    from transformers.modeling_layers import MtpModel

    config = transformers.DeepseekV32Config(**hf_cfg)
    config._attn_implementation = "eager"
    model = transformers.DeepseekV32ForCausalLM(config).float().eval()
    mtp = MtpModel(model, hf_cfg["num_mtp_layers"]).float().eval()
    gen = torch.Generator().manual_seed(seed)
    named = list(model.named_parameters()) + list(model.named_buffers())
    named += [(n, t) for n, t in list(mtp.named_parameters()) + list(mtp.named_buffers()) if n.startswith("layers.")]
    for name, t in named:
        if name.endswith("k_norm.bias"):
            with torch.no_grad():
                t.copy_(0.1 * torch.randn(t.shape, generator=gen))
        elif "inv_freq" not in name:
            _fan_in_(t, name, gen)
    return model, mtp


class IndexerRecorder:
    """Per HF indexer call, in call order: its scores [B, T, S] (masked entries + finfo.min; taken
    from the Tensor.topk call inside the indexer) and its top-k indices [B, T, U] (its output)."""

    def __init__(self, modules):
        self.records, self._scores, self._inside = [], None, False
        self.handles = [h for m in modules for h in (
            m.register_forward_pre_hook(self._enter), m.register_forward_hook(self._leave))]  # fmt: skip
        self._topk = torch.Tensor.topk
        recorder = self

        def topk(t, *args, **kwargs):
            if recorder._inside:
                recorder._scores = t.detach().numpy().copy()
            return recorder._topk(t, *args, **kwargs)

        torch.Tensor.topk = topk

    def _enter(self, module, args):
        self._inside = True

    def _leave(self, module, args, out):
        self._inside = False
        self.records.append((self._scores, out.numpy().astype(np.int64)))

    def close(self):
        torch.Tensor.topk = self._topk
        for h in self.handles:
            h.remove()


def hf_forward_v32(model, mtp, tokens):
    """Main logits [B, T, V], MTP logits [B, T-1, V], router records, indexer records."""
    ids = torch.from_numpy(tokens).long()
    routers = RouterRecorder(model)
    routers.handles.append(mtp.layers[0].mtp_block.mlp.gate.register_forward_hook(routers._hook))
    indexers = IndexerRecorder(
        [layer.self_attn.indexer for layer in model.model.layers] + [mtp.layers[0].mtp_block.self_attn.indexer]
    )
    try:
        with torch.no_grad():
            h = model.model(input_ids=ids).last_hidden_state
            logits = model.lm_head(h)
            pos = torch.arange(1, T)[None].expand(B, -1)
            mtp_logits = mtp._project_to_logits(mtp.forward_layer(0, h[:, :-1], pos, None, input_ids=ids[:, 1:]))
    finally:
        routers.close()
        indexers.close()
    return logits.numpy(), mtp_logits.numpy(), routers.records, indexers.records


@pytest.fixture(scope="module")
def v32():
    hf_cfg = tiny_v32_hf_config()
    model, mtp = build_hf_v32(hf_cfg)
    cfg = our_config(hf_cfg)
    assert cfg.index is not None and cfg.index.index_topk == TOPK
    variables = table.to_variables(split_fused(hf_state_dict(model, mtp)), v3.FAMILY, cfg, "hf")
    tokens = np.random.default_rng(4).integers(0, hf_cfg["vocab_size"], (B, T))  # margins >= 3e-4
    with jax.default_matmul_precision("highest"):  # our full forward, shared by both tests
        apply = jax.jit(lambda v, t: build_model(cfg).apply(v, t, mutable=["intermediates"]))
        ours = apply(variables, jnp.asarray(tokens))
    return model, mtp, cfg, variables, tokens, ours


def index_margin(scores_BTS, U: int) -> float:
    """Smallest gap at the top-U cut over queries with more than U visible keys."""
    s = np.sort(scores_BTS.astype(np.float64), -1)[..., ::-1]
    visible = (scores_BTS > np.finfo(np.float32).min / 2).sum(-1)
    rows = visible > U
    return float((s[rows][:, U - 1] - s[rows][:, U]).min())


def selection_sets(idx_BTU, scores_BTS) -> np.ndarray:
    """[B, T, S] membership of the selected *visible* keys (-1 and masked fillers dropped)."""
    S = scores_BTS.shape[-1]
    visible = scores_BTS > np.finfo(np.float32).min / 2
    sel = np.zeros(idx_BTU.shape[:2] + (S + 1,), bool)
    np.put_along_axis(sel, np.where(idx_BTU >= 0, idx_BTU, S), True, -1)
    return sel[..., :S] & visible


def our_index_picks(inter, cfg) -> list[np.ndarray]:
    """Our per-layer top-k slots [B, T, U] in HF's call order: main layers, then the MTP block."""
    picks = [np.asarray(a) for a in per_layer(inter, cfg, "attn", "index_topk_BTU", 0)]
    return picks + [np.asarray(inter["mtp_0"]["block"]["attn"]["index_topk_BTU"][0])[:, :-1]]


def test_logits_routing_and_selection_match_hf(v32):
    model, mtp, cfg, variables, tokens, (out, inter) = v32
    hf_logits, hf_mtp, routers, indexers = hf_forward_v32(model, mtp, tokens)
    inter = inter["intermediates"]
    logits, mtp_logits = np.asarray(out.logits), np.asarray(out.mtp.logits[0][:, :-1])
    d_logit, d_mtp = np.abs(logits - hf_logits).max(), np.abs(mtp_logits - hf_mtp).max()
    kl_main, kl_mtp = kl(hf_logits, logits).max(), kl(hf_mtp, mtp_logits).max()
    print(f"\nV3.2 max|Δlogit| main {d_logit:.2e} mtp {d_mtp:.2e}; max KL(HF‖ours) main {kl_main:.2e} "
          f"mtp {kl_mtp:.2e}")
    assert d_logit <= 1e-4 and d_mtp <= 1e-4
    assert kl_main <= 1e-6 and kl_mtp <= 1e-6

    # indexer: the same visible top-k set for every query of every layer (main + MTP)
    picks = our_index_picks(inter, cfg)
    assert len(indexers) == len(picks) == cfg.n_layers + 1
    margins = []
    for layer, ((scores, hf_idx), ours) in enumerate(zip(indexers, picks)):
        assert ours.shape == hf_idx.shape, (layer, ours.shape, hf_idx.shape)
        margins.append(index_margin(scores, TOPK))
        sparse_rows = (selection_sets(hf_idx, scores).sum(-1) < np.arange(1, scores.shape[1] + 1)).sum()
        np.testing.assert_array_equal(selection_sets(ours, scores), selection_sets(hf_idx, scores),
                                      f"indexer top-k, layer {layer}")
        assert sparse_rows > 0, f"layer {layer}: no query dropped a key; sparsity is not exercised"
    print(f"indexer top-{TOPK} sets identical in {len(picks)} layers (MTP incl.); min margin {min(margins):.1e}")
    assert min(margins) > MIN_MARGIN

    # routing: identical experts in every MoE layer, the MTP block's included
    m = cfg.moe
    ours = [np.asarray(a) for a in per_layer(inter, cfg, "ffn", "experts_MA", 0)]
    mtp_experts = np.asarray(inter["mtp_0"]["block"]["ffn"]["experts_MA"][0]).reshape(B, T, -1)
    ours.append(mtp_experts[:, :-1].reshape(-1, m.n_activated_experts))  # HF's MTP sees T - 1 tokens
    assert len(routers) == len(ours) == cfg.n_moe_layers + 1
    r_margins = []
    for layer, ((choice_ME, hf_experts), got) in enumerate(zip(routers, ours)):
        r_margins.append(router_topk_margin(choice_ME, m.n_activated_experts, m.n_expert_groups, m.n_limited_groups))
        np.testing.assert_array_equal(np.sort(got, -1), np.sort(hf_experts, -1), f"MoE layer {layer}")
    print(f"routing identical in {len(ours)} MoE layers (MTP incl.); min top-k margin {min(r_margins):.1e}")
    assert min(r_margins) > MIN_MARGIN


def test_config_json_round_trips_through_hf_config(v32):
    """Our config -> config.json -> transformers.DeepseekV32Config -> ours again."""
    cfg = v32[2]
    hf = transformers.DeepseekV32Config(**v3.config_to_json(cfg))
    assert hf.model_type == "deepseek_v32" and hf.index_topk == TOPK and hf.index_n_heads == 8
    assert v3.config_from_json(hf.to_dict(), dtype=cfg.dtype) == cfg


def test_token_by_token_decoding_matches_full_forward(v32):
    """One token at a time from the first, past index_topk: the cache's indexer keys give the full
    forward's selections, so the logits agree (fp32, 1e-4). (Chunked prefill:
    tests/layers/attention/test_dsa.py.)"""
    _, _, cfg, variables, tokens, (out, _) = v32
    model, full = build_model(cfg), out.logits
    with jax.default_matmul_precision("highest"):
        step = jax.jit(lambda v, t, c, i: model.apply(v, t, cache=c, cache_index=i)[0::2][:2])
        cache, pieces = build_cache(cfg, B, max_len=T + 4), []
        for t in range(T):
            logits, cache = step(variables, tokens[:, t : t + 1], cache, jnp.int32(t))
            pieces.append(logits)
    decoded = jnp.concatenate(pieces, axis=1)
    err = float(jnp.abs(decoded - full).max())
    print(f"\nV3.2 decode vs full forward: max|Δlogit| = {err:.2e} over {T} positions (index_topk {TOPK})")
    assert all(c.index_k.shape[-1] == 16 for seg in cache.values() for c in seg)  # DSA caches everywhere
    np.testing.assert_allclose(np.asarray(decoded), np.asarray(full), rtol=1e-4, atol=1e-4)
