"""Parameter counts of the full-size DeepSeek-V4 configs vs the published figures (eval_shape: free).

Published (deepseek-ai/DeepSeek-V4-Flash and -Pro model cards, 2026-04-24): Flash "284B total / 13B
activated", Pro "1.6T / 49B"; both exclude the MTP module (as V3's 671B did). The headline figures are
rounded to two or three significant digits, so each test checks two things: (1) our count is within
1% of the count derived from the released tensor shapes (../shared/reference/deepseek_v4_architecture.md
§0, §1.13: Flash 284.3B, Pro 1,573B main; activated without the embedding table 13.3B / 48.9B), and
(2) it rounds to the headline at the headline's precision. Pro's 1,573B is 1.7% below a literal 1.6T:
"1.6T" is 1.573T rounded, not a count.

Activated = routed experts at 6/E + everything else in the main model, without the embedding lookup
(DeepSeek's convention, see test_param_count.py for V3), the head included.
"""

import functools

import pytest

from deepseek_jax.config import load_model_config
from deepseek_jax.params import count_params, param_summary
from tests.utils import ROOT

CONFIGS = ROOT / "configs" / "model"
# name: (derived main, derived active w/o embedding, headline main, headline active, headline digits)
PUBLISHED = {
    "deepseek_v4_flash": (284.3e9, 13.3e9, 284e9, 13e9, 3),
    "deepseek_v4_pro": (1573e9, 48.9e9, 1.6e12, 49e9, 2),
}


@functools.cache
def counts(name: str) -> dict[str, int]:
    cfg = load_model_config([CONFIGS / f"{name}.yaml"])
    print(f"\n{name} parameters:\n{param_summary(cfg)}")
    return count_params(cfg)


def _round_sig(x: float, digits: int) -> float:
    return float(f"{x:.{digits - 1}e}")


@pytest.mark.parametrize("name", sorted(PUBLISHED))
def test_v4_counts_match_published(name):
    c = counts(name)
    main, active, head_main, head_active, digits = PUBLISHED[name]
    got_main, got_active = c["main"], c["active_no_embedding"]
    print(f"{name}: main {got_main / 1e9:.2f}B (derived {main / 1e9:.1f}B, headline {head_main / 1e9:.0f}B), "
          f"activated {got_active / 1e9:.2f}B (derived {active / 1e9:.1f}B, headline {head_active / 1e9:.0f}B), "
          f"MTP {c['mtp'] / 1e9:.2f}B")
    assert abs(got_main - main) / main < 0.01
    assert abs(got_active - active) / active < 0.01
    assert _round_sig(got_main, digits) == head_main
    assert _round_sig(got_active, 2) == head_active


def test_v4_flash_categories():
    c = counts("deepseek_v4_flash")
    cfg = load_model_config([CONFIGS / "deepseek_v4_flash.yaml"])
    E, F, D = cfg.moe.n_routed_experts, cfg.moe.moe_inter_dim, cfg.dim
    assert c["routed"] == 43 * E * 3 * D * F  # 277.0B, every layer MoE
    assert c["dense_ffn"] == 0 and c["mhc"] > 0
    assert c["mtp"] > 0 and c["total"] == c["main"] + c["mtp"]
