"""experiments/bench_long_context.py keeps running: a tiny smoke run of its subprocess cases (forward and
decode of two kinds, at one short T), its estimate, work model and table helpers, the timeout path."""

import importlib.util
import math

import pytest

from deepseek_jax.config import V4AttentionConfig
from tests.utils import ROOT

PATH = ROOT / "experiments" / "bench_long_context.py"


@pytest.fixture(scope="module")
def bench():
    spec = importlib.util.spec_from_file_location("bench_long_context", PATH)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


TINY = ["--dim", "32", "--window", "16", "--v4-topk", "8", "--dsa-topk", "16", "--q-block", "64", "--k-block", "128",
        "--runs", "1", "--decode-runs", "1"]  # fmt: skip


@pytest.mark.slow  # ~30 s: four subprocesses, each imports jax and compiles one case
def test_tiny_run_writes_the_table(bench, tmp_path):
    out = tmp_path / "bench_long_context.md"
    rows = bench.main(["--seqs", "256", "--types", "v4_hca16", "csa_gather", "--modes", "forward", "decode",
                       *TINY, "--out", str(out)])  # fmt: skip
    assert [(r["mode"], r["kind"]) for r in rows] == [
        ("forward", "v4_hca16"), ("forward", "csa_gather"), ("decode", "v4_hca16")]  # no decode of csa_gather
    for r in rows:
        assert r["skip"] is None and r["run_s"] > 0 and 0 < r["rss_gb"] < 4 and 0 <= r["xla_gb"] < 1, r
    text = out.read_text()
    assert text.startswith("# bench_long_context") and "--types v4_hca16 csa_gather" in text
    assert "| forward | v4_hca16 |" in text and "| decode | v4_hca16 |" in text and "| 256 |" in text


def test_child_killed_at_the_time_limit(bench):
    ns = bench.parse(["--seqs", "256", "--time-limit", "0.05", *TINY])
    row = bench.run_child("v4_swa", "forward", 256, ns)
    assert row["skip"].startswith("no (killed at --time-limit"), row


def test_cap_flag(bench):
    assert bench.parse(["--cap", "mla=65536", "dsa=16384"]).cap == {"mla": 65536, "dsa": 16384}
    for bad in (["--cap", "mla"], ["--cap", "nope=4"]):
        with pytest.raises(SystemExit):
            bench.parse(bad)


def test_estimate_uses_the_observed_growth(bench):
    assert bench.estimate([], 4096) is None
    assert bench.estimate([(1024, 1.0)], 4096) == pytest.approx(16.0)  # one point: quadratic
    assert bench.estimate([(1024, 1.0), (2048, 2.0)], 8192) == pytest.approx(8.0)  # linear seen
    assert bench.estimate([(1024, 1.0), (2048, 1.5)], 4096) == pytest.approx(3.0)  # clamped to >= 1
    assert bench.estimate([(1024, 1.0), (2048, 2.0 ** 1.5)], 4096) == pytest.approx(2.0 ** 3)


def test_work_model(bench):
    """The arithmetic of the Reading: HCA's T²/(2m) pairs, CSA's indexer T²/8 x P·Y plus (k + w) keys per
    query, the gather alone linear; ratios from 64K to 1M (16x T)."""
    ns = bench.parse([])
    r = {k: bench.work(k, 2**20, ns) / bench.work(k, 2**16, ns) for k in bench.TYPES}
    assert r["v4_swa"] == pytest.approx(16) and r["csa_gather"] == pytest.approx(16)
    assert r["mla"] == pytest.approx(256) and 16 < r["v4_hca128"] < 256 and 16 < r["v4_csa"] < 256
    T, head, PY = 2**16, 2 * 64 * 4, 4 * 32
    assert bench.work("v4_csa", T, ns) == T * T / 8 * PY + T * (512 + 128) * head
    assert bench.work("v4_hca128", T, ns) == (T * T / 256 + T * 128) * head
    assert math.isclose(r["v4_hca128"], (2**40 / 256 + 2**20 * 128) / (2**32 / 256 + 2**16 * 128))


def test_with_blocks_sets_every_block_field(bench):
    cfg = V4AttentionConfig(n_heads=2, head_dim=32, rope_head_dim=8, q_lora_rank=32, o_groups=2, o_lora_rank=16,
                            window_size=8, index_n_heads=2, index_head_dim=16, index_topk=4)  # fmt: skip
    new = bench.with_blocks(cfg, 64, 256)
    assert new.q_block == 64 and new.k_block == 256 and new.window_size == 8


def test_table_compares_with_own_64k(bench):
    ns = bench.parse([])
    common = {"compile_s": 1.0, "temp_gb": 0.1, "xla_gb": 0.2, "rss_gb": 0.5, "runs": "3 after warm-up",
              "skip": None}  # fmt: skip
    rows = [
        {**common, "mode": "forward", "kind": "v4_swa", "T": 65536, "run_s": 2.0},
        {**common, "mode": "forward", "kind": "v4_swa", "T": 2**20, "run_s": 40.0},
        {**common, "mode": "forward", "kind": "mla", "T": 2**20, "run_s": None, "skip": "no (est. 9 s > --time-limit)"},
    ]
    lines = bench.fmt_table(rows, ns)
    assert lines[2].endswith("| 2 | yes (3 after warm-up) | - | - |")
    assert "| 1M |" in lines[3] and lines[3].endswith("| 40 | yes (3 after warm-up) | 20 | 16 |")
    assert lines[4].endswith("| - | no (est. 9 s > --time-limit) | - | - |")
    model = bench.fmt_model_table([{"mode": "model", "kind": "model", "T": 65536, "run_s": 3.0, "step_ms": 2.0,
                                    "bytes_per_token": 49.0, "fixed_mb": 0.1, "rss_gb": 0.6, "finite": True,
                                    "skip": None}], ns)  # fmt: skip
    assert model[-1] == "| 64K | 3.0 | 2.00 | - | 49 | 0.10 | 0.60 | True | yes |"
