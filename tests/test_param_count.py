"""Parameter counts of the full-size DeepSeek-V3 config vs the published figures (eval_shape: free).

Published (deepseek-ai/DeepSeek-V3 README.md, README_WEIGHTS.md, the V3 report):
  * "685B total on Hugging Face = 671B main model + 14B MTP module";
  * main model 671B, "36.6B activated (including 0.9B for the output head)" (README_WEIGHTS.md as
    revised; an earlier text said 36.7B "including 0.9B embedding and 0.9B head"); report: 37B;
  * MTP: "11.5B unique parameters, excluding the shared 0.9B embedding and 0.9B output head".

What our counts say (run pytest with -s for the table):
  * main = 671.03B, embedding and head included: within 0.01% of 671B.
  * MTP: our `mtp_0` holds 11.61B = the extra transformer block (11.507B, the published "11.5B")
    + eh_proj [2D, D] (0.10B) + three norms. The HF checkpoint also stores *copies* of the
    embedding and head under `model.layers.61` (`embed_tokens`, `shared_head.head`), 2·V·D =
    1.85B, so its MTP weights are 13.46B and main + that = 684.49B, the "685B" (0.07% off;
    with the two shared, 682.64B is 0.35% off). "14B" is 685 − 671, a difference of rounded
    totals, not a count: neither reading is within 0.5% of 14e9 (13.46B: 3.8% off; 11.61B: 17%),
    so the tests pin the 685B total and the 11.5B block instead.
  * activated: routed experts at 8/256, the rest in full. Without the embedding lookup (with the
    head) it is 36.63B, the published 36.6B (and 1.0% from "37B"); with the embedding it is
    37.55B, 2.3% above 36.7B and 1.5% above 37B. So DeepSeek's activated count omits the
    embedding table (a gather, no FLOPs) and counts the head.
"""

import functools
import math

import pytest

from deepseek_jax.config import load_model_config, to_dict
from deepseek_jax.params import count_params, param_shapes, param_summary
from tests.utils import ROOT

CONFIGS = ROOT / "configs" / "model"
V3_671B = CONFIGS / "deepseek_v3_671b.yaml"


def rel_err(got: float, want: float) -> float:
    return abs(got - want) / want


@functools.cache
def v3_counts() -> tuple[object, dict[str, int]]:
    """The 671B config and its counts; abstract init only, so about a second on a CPU."""
    cfg = load_model_config([V3_671B])
    print(f"\nDeepSeek-V3 671B parameters ({V3_671B.name}):\n{param_summary(cfg)}")
    return cfg, count_params(cfg)


@functools.cache
def tiny_counts(*overrides: str) -> tuple[object, dict[str, int]]:
    cfg = load_model_config([CONFIGS / "tiny.yaml"], list(overrides))
    return cfg, count_params(cfg)


def test_main_model_is_671b():
    _, c = v3_counts()
    print(f"main model: {c['main']:,} ({c['main'] / 1e9:.3f}B)")
    assert rel_err(c["main"], 671e9) < 0.005, c["main"]


def test_mtp_block_is_the_published_11_5b():
    cfg, c = v3_counts()
    shapes = param_shapes(cfg)
    block = sum(math.prod(s) for n, (s, _) in shapes.items() if n.startswith("mtp_0/block/"))
    print(f"mtp_0: {c['mtp']:,}; its transformer block: {block:,}")
    assert rel_err(block, 11.5e9) < 0.005, block
    D = cfg.dim
    assert c["mtp"] - block == 2 * D * D + 3 * D  # eh_proj + enorm, hnorm, final norm; nothing else


def test_total_with_checkpoint_copies_is_685b():
    cfg, c = v3_counts()
    copies = 2 * cfg.vocab_size * cfg.dim  # model.layers.61.{embed_tokens, shared_head.head}
    mtp_as_stored = c["mtp"] + copies
    stored_total = c["main"] + mtp_as_stored
    print(f"MTP as stored on HF (with embedding/head copies): {mtp_as_stored / 1e9:.3f}B; "
          f"total {stored_total / 1e9:.3f}B; with them shared {c['total'] / 1e9:.3f}B")
    assert rel_err(stored_total, 685e9) < 0.001
    assert rel_err(c["total"], 685e9) > 0.001  # the shared-weights total is the worse match
    assert rel_err(685e9 - c["main"], 14e9) < 0.005  # "14B" is the difference of the totals


def test_activated_is_published_36_6b_without_embedding():
    cfg, c = v3_counts()
    print(f"activated: {c['active_no_embedding'] / 1e9:.3f}B without embedding, "
          f"{c['active'] / 1e9:.3f}B with; MTP activated {c['mtp_active'] / 1e9:.3f}B")
    assert rel_err(c["active_no_embedding"], 36.6e9) < 0.005
    assert rel_err(c["active_no_embedding"], 37e9) < 0.011  # the report's rounded "37B"
    assert rel_err(c["active"], 37e9) > 0.011  # counting the embedding lookup overshoots
    assert c["active"] - c["active_no_embedding"] == cfg.vocab_size * cfg.dim


def test_active_counts_only_top_k_routed_experts():
    cfg, c = v3_counts()
    A, E = cfg.moe.n_activated_experts, cfg.moe.n_routed_experts
    assert c["active"] == c["main"] - c["routed"] * (E - A) // E
    # published ingredients: per layer MLA 187.1M; 9 activated experts of 3·D·2048 each
    assert c["attention"] == cfg.n_layers * 187_107_328
    assert c["routed"] // cfg.n_moe_layers == E * 3 * cfg.dim * cfg.moe.moe_inter_dim


def test_tiny_counts_match_closed_form():
    """The category sums equal hand-written formulas, so a miscategorised leaf shows up."""
    cfg, c = tiny_counts()
    D, V, F, m, mo = cfg.dim, cfg.vocab_size, cfg.inter_dim, cfg.mla, cfg.moe
    N, Q, C, R = m.n_heads, m.q_lora_rank, m.kv_lora_rank, m.qk_rope_head_dim
    H, O = m.qk_nope_head_dim, m.v_head_dim
    # w_dq, q_norm, w_uq, w_dkv, kv_norm, w_uk, w_uv, w_o
    attn = D * Q + Q + Q * N * (H + R) + D * (C + R) + C + C * N * H + C * N * O + N * O * D
    routed = mo.n_routed_experts * 3 * D * mo.moe_inter_dim
    # + the router weight and its selection bias (the router collection's `bias`, a released tensor)
    moe = routed + mo.n_shared_experts * 3 * D * mo.moe_inter_dim + (D + 1) * mo.n_routed_experts
    want = {
        "embedding": V * D, "head": D * V, "attention": cfg.n_layers * attn,
        "dense_ffn": cfg.n_dense_layers * 3 * D * F, "routed": cfg.n_moe_layers * routed,
        "norms": (2 * cfg.n_layers + 1) * D,  # two per block and the final norm
        "mtp": attn + moe + 2 * D * D + 5 * D,  # block, w_eh, enorm/hnorm/norm + the block's two
    }
    assert {k: c[k] for k in want} == want
    assert c["main"] == c["total"] - c["mtp"]


@pytest.mark.parametrize("n_mtp", [0, 2])
def test_mtp_depth_scales_the_mtp_count(n_mtp):
    _, one = tiny_counts()
    _, c = tiny_counts(f"model.num_nextn_predict_layers={n_mtp}")
    assert c["mtp"] == n_mtp * one["mtp"]
    assert c["main"] == one["main"]


def test_summary_lists_every_total():
    cfg, c = v3_counts()
    table = param_summary(cfg)  # recounts; a second abstract init
    for key in ("embedding", "head", "main", "mtp", "total", "active", "active_no_embedding"):
        assert f"{c[key]:,}" in table, key


def test_671b_yaml_holds_the_published_config():
    """Our field names for deepseek-ai/DeepSeek-V3 config_671B.json and HF config.json."""
    want = {
        "vocab_size": 129280, "dim": 7168, "inter_dim": 18432, "n_layers": 61, "n_dense_layers": 3,
        "norm_eps": 1e-6, "max_seq_len": 163840, "num_nextn_predict_layers": 1, "dtype": "bfloat16",
        "mla": {"n_heads": 128, "q_lora_rank": 1536, "kv_lora_rank": 512, "qk_nope_head_dim": 128,
                "qk_rope_head_dim": 64, "v_head_dim": 128},
        "moe": {"n_routed_experts": 256, "n_shared_experts": 1, "n_activated_experts": 8,
                "n_expert_groups": 8, "n_limited_groups": 4, "score_func": "sigmoid",
                "route_scale": 2.5, "norm_topk_prob": True, "moe_inter_dim": 2048},
        "rope": {"rope_theta": 10000.0, "rope_factor": 40.0, "original_seq_len": 4096,
                 "beta_fast": 32.0, "beta_slow": 1.0, "mscale": 1.0, "mscale_all_dim": 1.0},
    }
    got = to_dict(v3_counts()[0])
    for key, value in want.items():
        subset = {k: got[key][k] for k in value} if isinstance(value, dict) else got[key]
        assert subset == value, key


# ----------------------------------------------------------------------------------------------
# DeepSeek-V3.2-Exp: V3 + the lightning indexer in every layer (deepseek_v32_671b.yaml)

V32_671B = CONFIGS / "deepseek_v32_671b.yaml"


@functools.cache
def v32_counts() -> tuple[object, dict[str, int]]:
    cfg = load_model_config([V32_671B])
    return cfg, count_params(cfg)


def test_v32_671b_is_v3_plus_one_indexer_per_layer():
    """Published for DeepSeek-V3.2-Exp: "671B" (its model card / V3.1-Terminus base) and "685B" on
    Hugging Face (main model + MTP layer as stored, embedding/head copies included, as for V3).
    The indexer adds P·Y·Q + D·Y + 2Y + D·P = 13,959,424 per layer, 62 layers with the MTP one."""
    (cfg, c), (_, v3) = v32_counts(), v3_counts()
    ic, D, Q = cfg.index, cfg.dim, cfg.mla.q_lora_rank
    P, Y = ic.index_n_heads, ic.index_head_dim
    per_layer = P * Y * Q + D * Y + 2 * Y + D * P
    assert per_layer == 13_959_424
    assert c["main"] - v3["main"] == cfg.n_layers * per_layer
    assert c["mtp"] - v3["mtp"] == per_layer
    stored_total = c["total"] + 2 * cfg.vocab_size * cfg.dim  # + model.layers.61 embedding/head copies
    print(f"\nV3.2 main {c['main'] / 1e9:.3f}B (published 671B), stored total {stored_total / 1e9:.3f}B "
          f"(published 685B), indexer {cfg.n_layers + 1} x {per_layer:,}")
    assert rel_err(c["main"], 671e9) < 0.01
    assert rel_err(stored_total, 685e9) < 0.01


def test_v32_671b_yaml_holds_the_published_config():
    """config_671B_v3.2.json / HF config.json: V3's values (as in deepseek_v3_671b.yaml) + index_*."""
    cfg, _ = v32_counts()
    got, v3 = to_dict(cfg), to_dict(v3_counts()[0])
    assert got.pop("index") == {"index_n_heads": 64, "index_head_dim": 128, "index_topk": 2048,
                                "index_dense_warmup": False, "index_q_block": 0}
    v3.pop("index")
    assert got == v3
