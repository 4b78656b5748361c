"""experiments/bench_peers.py keeps running: a shrunk smoke run of ours + transformers at each peer's dims, the RSS
wrapper (the case's own peak, not its parent's), the time limit, MaxText's log parser on real log lines, the
ratio columns, and the peer configs against MaxText's own parameter counts. MaxText itself is never run here."""

import importlib.util
import math
import sys

import pytest

from deepseek_jax.config import load_model_config
from deepseek_jax.params import count_params
from tests.utils import ROOT

PATH = ROOT / "experiments" / "bench_peers.py"

# Real lines of a MaxText 0.2.5 run (deepseek4-tiny, sparse_matmul=true, per_device_batch_size=1,
# max_target_length=256, steps=4, indexer_sparse_training=true), between many other lines.
MAXTEXT_LOG = """\
I1205 15:03:31.409070 139925423623040 pyconfig.py:591] Config param dtype: bfloat16
I1205 15:03:31.417674 139925423623040 pyconfig.py:591] Config param remat_policy: full
I1205 15:03:31.418977 139925423623040 pyconfig.py:591] Config param sparse_matmul: True
I1205 15:03:31.421234 139925423623040 pyconfig.py:591] Config param weight_dtype: float32
I1205 15:03:33.505437 139925423623040 checkpointing.py:803] No existing checkpoints found, not restoring checkpoint.
I1205 15:05:00.844752 139925423623040 max_utils.py:823] [train] Total estimated memory size: 0.8 GB, estimated \
output size: 0.3 GB, estimated temp size: 0.5 GB, estimated argument size: 0.3 GB, Estimated host temp size: 0.0 GB.
I1205 15:05:00.961364 139925423623040 metric_logger.py:425] number parameters: 0.027 billion
Memstats: After params initialized:
I1205 15:05:06.099442 139925423623040 metric_logger.py:265] completed step: 0, seconds: 0.281, TFLOP/s/device: \
0.071, Tokens/s/device: 910.206, total_weights: 256, loss: 12.288, lm_loss: 12.288, perplexity: 217021.188, \
moe_lb_loss: 0.000101, indexer_loss: 0.0
I1205 15:05:10.158637 139925423623040 metric_logger.py:265] completed step: 1, seconds: 0.921, TFLOP/s/device: \
0.022, Tokens/s/device: 277.820, total_weights: 256, loss: 12.226, lm_loss: 12.226, perplexity: 203939.625, \
moe_lb_loss: 0.000101, indexer_loss: 0.0
I1205 15:05:14.883219 139925423623040 metric_logger.py:265] completed step: 2, seconds: 4.051, TFLOP/s/device: \
0.005, Tokens/s/device: 63.197, total_weights: 256, loss: 12.171, lm_loss: 12.171, perplexity: 193039.391, \
moe_lb_loss: 0.000101, indexer_loss: 0.0
I1205 15:05:18.275349 139925423623040 metric_logger.py:265] completed step: 3, seconds: 4.047, TFLOP/s/device: \
0.005, Tokens/s/device: 63.260, total_weights: 256, loss: 12.152, lm_loss: 12.152, perplexity: 189457.750, \
moe_lb_loss: 0.000101, indexer_loss: 0.0
"""


@pytest.fixture(scope="module")
def bench():
    spec = importlib.util.spec_from_file_location("bench_peers", PATH)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.mark.slow  # ~40 s per model: three subprocesses (ours compiles the shrunk train step, torch imports)
@pytest.mark.parametrize("model", ["deepseek3-tiny", "deepseek4-tiny"])
def test_shrunk_run_writes_the_table(bench, tmp_path, model):
    out = tmp_path / "bench_peers.md"
    out.write_text("# old\n\n## Reading\nkept by hand\n")
    rows = bench.main(["--shrink", "--batch", "2", "--seq", "32", "--steps", "1", "--warmup", "1",
                       "--models", model, "--out", str(out)])  # fmt: skip
    assert [r["system"].split(" ")[0] for r in rows] == ["this", "transformers"], rows
    for r in rows:
        assert "skip" not in r, r
        assert r["step_s"] > 0 and r["tokens_per_s"] == pytest.approx(64 / r["step_s"]), r
        assert 0.05 < r["rss_gb"] < 4, r  # the case's own peak: JAX or torch plus a tiny model
        assert abs(r["first_loss"] - math.log(512)) < 1.5, r  # random init over the shrunk 512-token vocab
    ours, hf = rows
    assert ours["x_hf"] == pytest.approx(ours["tokens_per_s"] / hf["tokens_per_s"]) and ours["x_maxtext"] is None
    assert ours["compile_s"] > 0 and 0 < ours["temp_gb"] < 1 and ours["dtype"] == "float32"
    text = out.read_text()
    assert text.startswith("# bench_peers") and text.endswith("## Reading\nkept by hand\n")
    assert f"| {model} | this project (jax " in text and f"| {model} | transformers " in text
    assert "--shrink --batch 2 --seq 32" in text and "load average" in text


def test_rss_is_the_case_alone(bench):
    """A case that holds 256 MB reports about that; an empty one reports a few MB, however large the caller
    (this pytest process, with JAX imported) is: ru_maxrss would have inherited the caller's size."""
    fill = "b = bytearray(256 * 2**20); b[::4096] = b'x' * len(b[::4096])"
    big = bench.measured([sys.executable, "-c", fill], {}, timeout=60)
    small = bench.measured([sys.executable, "-c", "pass"], {}, timeout=60)
    assert big["rc"] == 0 and small["rc"] == 0, (big["out"], small["out"])
    assert 0.25 < big["rss_gb"] < 0.35 and small["rss_gb"] < 0.05, (big["rss_gb"], small["rss_gb"])


def test_case_killed_at_the_time_limit(bench):
    run = bench.measured([sys.executable, "-c", "import time; time.sleep(60)"], {}, timeout=1)
    assert run["rc"] is None and run["wall_s"] < 30
    assert bench.failure(run, 1) == "killed at --time-limit 1 s"
    crashed = bench.measured([sys.executable, "-c", "raise SystemExit('bad | input')"], {}, timeout=60)
    assert bench.failure(crashed, 60) == "failed (rc 1: bad / input)"  # a | would split the table cell


def test_maxtext_log_parser(bench):
    got = bench.parse_maxtext_log(MAXTEXT_LOG, warmup=2)
    assert got["times"] == [4.051, 4.047] and got["first_loss"] == 12.288 and got["dtype"] == "bfloat16"
    assert got["temp_gb"] == 0.5 and got["compile_s"] == pytest.approx(60 + 27.339315)  # 15:03:33.5 -> 15:05:00.8
    assert got["notes"] == "weights float32, remat full, its memory line: total 0.8 GB, temp 0.5 GB"
    assert bench.parse_maxtext_log(MAXTEXT_LOG, warmup=0)["times"] == [0.281, 0.921, 4.051, 4.047]
    with pytest.raises(ValueError, match="after 4 warm-up steps"):
        bench.parse_maxtext_log(MAXTEXT_LOG, warmup=4)


def test_ratios_against_the_best_maxtext_row(bench):
    ns = bench.parse(["--batch", "2", "--seq", "10", "--steps", "2"])
    row = lambda system, times, model="m": {"model": model, "system": system, "times": times,  # noqa: E731
                                            "variant": "v", "dtype": "float32"}
    rows = [row("this project (jax 0.10.2)", [9.0, 1.0, 1.0]), row("transformers 5.25", [4.0, 4.0]),
            row("MaxText 0.2.5 (jax 0.12)", [2.0, 2.0]), row("MaxText 0.2.5 (jax 0.12)", [5.0, 5.0]),
            row("this project (jax 0.10.2)", [1.0, 1.0], model="other"),
            {"model": "m", "system": "x", "variant": "v", "skip": "no"}]
    bench.add_rates(rows, ns)
    assert rows[0]["step_s"] == 1.0 and rows[0]["tokens_per_s"] == 20.0  # the warm-up step is not timed
    assert rows[0]["x_maxtext"] == 2.0 and rows[0]["x_hf"] == 4.0  # best MaxText: 2 s/step
    assert rows[4]["x_maxtext"] is None and rows[4]["x_hf"] is None  # no peer of its dims
    assert "x_maxtext" not in rows[1] and "step_s" not in rows[5]
    lines = bench.fmt_table(rows)
    assert lines[2].startswith("| m | this project (jax 0.10.2) |") and "| 2.00 | 4.00 |" in lines[2]
    assert "| not run: no |" in lines[7]


def test_flags(bench, tmp_path):
    ns = bench.parse(["--ours", "model.remat=full model.moe.impl=dense", "--ours", "model.remat=save_dots"])
    assert ns.ours == [["model.remat=full", "model.moe.impl=dense"], ["model.remat=save_dots"]]
    for bad in (["--shrink", "--maxtext-python", sys.executable], ["--maxtext-python", str(tmp_path / "nope")],
                ["--maxtext-python", sys.executable],  # an interpreter without maxtext
                ["--steps", "0"], ["--models", "deepseek2-tiny"]):
        with pytest.raises(SystemExit):
            bench.parse(bad)


# MaxText prints "number parameters: 0.034 billion" (deepseek3-tiny) and "0.027 billion" (deepseek4-tiny)
@pytest.mark.parametrize("model, billions", [("deepseek3-tiny", 0.034), ("deepseek4-tiny", 0.027)])
def test_peer_configs_have_maxtexts_size(bench, model, billions):
    cfg = load_model_config([ROOT / bench.PEERS[model]])
    assert round(count_params(cfg)["total"] / 1e9, 3) == billions
    small = load_model_config([ROOT / bench.PEERS[model]], bench.shrink_overrides(bench.PEERS[model]))
    assert small.n_layers == 4 and small.vocab_size == 512 and small.n_dense_layers <= 1
    assert small.compress_ratios == cfg.compress_ratios[:4]  # V4: SWA, SWA, CSA, HCA; V3: none
