"""experiments/bench_attention.py keeps running: its variants at a tiny width and one short T
(query blocking on), and the table's formatting of skipped rows, without the real sizes."""

import importlib.util

import pytest

from tests.utils import ROOT

PATH = ROOT / "experiments" / "bench_attention.py"


@pytest.fixture(scope="module")
def bench():
    spec = importlib.util.spec_from_file_location("bench_attention", PATH)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.mark.slow  # ~20 s of CPU, mostly the two init and two forward compiles
def test_quick_tiny_runs(bench, tmp_path):
    """DSA and V4 CSA, the two variants with the most code paths; each costs an init and a forward
    compile, so the others are only built, not run, here (the dense ratio: the test below)."""
    out = tmp_path / "bench_attention.md"
    tiny = ["--quick", "--seqs", "96", "--variants", "dsa", "v4_csa", "--dim", "32",
            "--heads", "2", "--dsa-topk", "16", "--v4-topk", "4", "--window", "16",
            "--dsa-q-block", "32", "--v4-q-block", "32", "--runs", "1"]  # fmt: skip
    tiny += ["--out", str(out)]
    rows = bench.main(tiny)
    assert [r["variant"] for r in rows] == ["dsa", "v4_csa"]
    for r in rows:
        assert r["run_s"] is not None and r["run_s"] > 0 and 0 < r["peak_gb"] < 1, r
    text = out.read_text()
    assert text.startswith("# bench_attention") and "--dsa-topk 16" in text
    assert "| dsa |" in text and "| v4_csa |" in text and "| 96 |" in text


def test_table_marks_skipped_rows(bench):
    common = {"keys": "k", "q_block": 0, "compile_s": 1.0, "peak_gb": 9.0, "runs": "1, the first"}
    rows = [
        {**common, "variant": "mla", "T": 1024, "run_s": 2.0, "skip": None},
        {**common, "variant": "mla", "T": 4096, "run_s": None, "skip": "no (peak > --max-run-gb)"},
        {**common, "variant": "dsa", "T": 1024, "run_s": 1.0, "skip": None},
        {**common, "variant": "dsa", "T": 4096, "run_s": 8.0, "skip": None},
    ]
    lines = bench.fmt_table(rows)
    assert "| not run | - | - |" in lines[3] and "no (peak > --max-run-gb)" in lines[3]
    assert lines[4].endswith("| 1.000 | 0.50 | - |")  # half of dense at the same T
    assert lines[5].endswith("| 8.000 | - | 8.0 (vs 1K) |")  # no dense time at 4K
