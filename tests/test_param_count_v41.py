"""DeepSeek-V4.1-Flash's parameter count (eval_shape: free) against the total derived from the released
tensor shapes (../shared/reference/deepseek_v41_architecture.md §4.4: 763,205,315,794 with the vision
tower), category by category and exactly.

Counted as the checkpoint holds them: every weight, the selection biases `bias` / `bias_vl` (our router
collection), the Engram tables' real rows (each table is padded with zero rows so it shards evenly:
reported apart as `engram_padding`), DSpark's three stages, the vision tower, aligner and image
delimiters, and the shared embedding / head once.
Activated per token: 6 of 384 experts in 40 layers, every other backbone weight, the Engram projections and
the 2 × 24 table rows a token reads, the head: 16.79B, 16.13B without the input embedding (§4.4); the
vision tower runs once per image, not per token, and is not in the activated count.
"""

import functools

import pytest

from deepseek_jax.config import load_model_config
from deepseek_jax.params import count_params, param_summary
from tests.utils import ROOT

VISION = 411_842_560 + 73_410_560 + 3 * 5120  # vision tower, aligner, image delimiters (§4.4)
TOTAL_WITH_VISION = 763_205_315_794
BACKBONE = 551_566_180_464  # embed + head + 40 layers (routed included), no Engram / DSpark / vision
ENGRAM_TABLES = (384_006_168 + 384_016_682) * 256
ENGRAM_PROJECTIONS = 2 * (25600 * 6144 + 2 * 4 * 5120)
DSPARK = 4_772_152_438 + 4_693_504_118 + 4_759_705_974
ACTIVE = 8_493_465_600 + 6_660_554_864 + 2 * 129280 * 5120 + ENGRAM_PROJECTIONS + 2 * 24 * 256


@functools.cache
def flash():
    cfg = load_model_config([ROOT / "configs" / "model" / "deepseek_v41_flash.yaml"])
    print(f"\nDeepSeek-V4.1-Flash parameters:\n{param_summary(cfg)}")
    return cfg, count_params(cfg)


@pytest.mark.slow  # the abstract V4.1-Flash init (~10 s)
def test_v41_flash_total_is_the_shape_derived_count():
    _, c = flash()
    assert c["total"] == TOTAL_WITH_VISION == 763_205_315_794
    assert (c["vision"], c["aligner"], c["delimiters"]) == (411_842_560, 73_410_560, 3 * 5120)
    assert c["media"] == VISION and c["audio"] == 0
    assert c["mtp"] == DSPARK
    assert c["engram_table"] == ENGRAM_TABLES == 196_613_849_600
    assert c["engram"] == ENGRAM_PROJECTIONS
    assert c["main"] - c["engram_table"] - c["engram"] - c["media"] == BACKBONE
    assert 0 <= c["engram_padding"] < 2 * 1024 * 256  # < one row block per table


@pytest.mark.slow  # shares the abstract init above
def test_v41_flash_activated_per_token():
    cfg, c = flash()
    assert c["active"] == ACTIVE  # 16.79B
    assert c["active_no_embedding"] == ACTIVE - cfg.vocab_size * cfg.dim  # 16.13B
    print(f"activated {c['active'] / 1e9:.2f}B ({c['active_no_embedding'] / 1e9:.2f}B without the embedding)")
