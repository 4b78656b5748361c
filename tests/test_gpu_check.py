"""experiments/gpu_check.sh, the prepared accelerator check, keeps working where CI runs it (CPU): the
--small run writes its three rows with finite numbers and the emulated ragged_a2a agreeing with ring;
a check whose process dies still gets its FAILED row; the published-peak table and the ~1B-activated
config's size. The GPU branch itself needs a lent GPU (issue 15)."""

import importlib.util
import math
import os
import re
import subprocess
import sys

import pytest

from deepseek_jax.config import load_model_config
from deepseek_jax.params import count_params
from tests.utils import ROOT

SCRIPT = ROOT / "experiments" / "gpu_check.sh"
NUMBER = re.compile(r"(?<![\w.])-?(?:\d[\d,]*\.?\d*(?:e[+-]?\d+)?|nan|inf)(?![\w.])", re.I)


@pytest.fixture(scope="module")
def gpu_check():
    spec = importlib.util.spec_from_file_location("gpu_check", ROOT / "experiments" / "gpu_check.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def run_script(tmp_path, *args: str) -> tuple[subprocess.CompletedProcess, dict[str, list[str]]]:
    """The script on CPU with OUT=tmp_path; (the process, table rows by check label -> cells)."""
    env = {**os.environ, "OUT": str(tmp_path), "PYTHON": sys.executable, "JAX_PLATFORMS": "cpu"}
    proc = subprocess.run(["bash", str(SCRIPT), *args], env=env, capture_output=True, text=True, timeout=180)
    table = (tmp_path / "gpu_check.md").read_text()
    rows = {}
    for line in table.splitlines():
        cells = [c.strip() for c in re.split(r"(?<!\\)\|", line)[1:-1]]
        if cells and re.fullmatch(r"\d \w+", cells[0]):
            rows[cells[0]] = cells
    return proc, rows


def numbers(text: str) -> list[float]:
    return [float(n.replace(",", "")) for n in NUMBER.findall(text)]


@pytest.mark.slow  # ~60 s: four Python processes, five small compiles on 2 cores
def test_small_run_on_cpu(tmp_path):
    proc, rows = run_script(tmp_path, "--small")
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "no GPU visible" in proc.stdout
    assert list(rows) == ["1 mfu", "2 ep", "3 attention"], rows
    mfu, ep, attention = rows.values()
    for row in rows.values():
        assert numbers(row[3]) and all(math.isfinite(x) for x in numbers(row[3])), row
    assert mfu[2] == "PASSED", mfu
    assert re.search(r"tokens/s, .* MFU \d+\.\d% of .*measured float32 matmul peak", mfu[3]), mfu
    assert ep[2] == "PASSED", ep
    assert "NOT exercised" in ep[3] and "ragged_a2a_emulated on 8 CPU devices" in ep[3], ep
    assert "routing counts identical" in ep[3], ep
    assert attention[2].startswith("skipped: model.attention_impl=cudnn needs an NVIDIA GPU"), attention
    assert re.search(r"xla: loss \d+\.\d+, step \d", attention[3]), attention


@pytest.mark.slow  # ~15 s: four processes that import JAX and stop at argument parsing
def test_a_dead_check_process_still_gets_its_row(tmp_path):
    proc, rows = run_script(tmp_path, "--small", "--mfu-batch", "zero")  # argparse exits 2 in every check
    assert proc.returncode != 0
    assert list(rows) == ["1 mfu", "2 ep", "3 attention"], rows
    assert all(r[2] == "FAILED: process exit 2" for r in rows.values()), rows


def test_published_peaks(gpu_check):
    assert gpu_check.published_peak("NVIDIA H100 80GB HBM3") == 989.4e12
    assert gpu_check.published_peak("NVIDIA H100 PCIe") == 756.0e12
    assert gpu_check.published_peak("NVIDIA H200") == 989.4e12
    assert gpu_check.published_peak("NVIDIA A100-SXM4-80GB") == 312.0e12
    assert gpu_check.published_peak("NVIDIA L4") is None


def test_gpu_config_is_about_1b_active():
    """The MFU check's model: ~1.0B activated (±10%) with and without the embedding."""
    c = count_params(load_model_config([ROOT / "configs/model/gpu_check_v4_1b.yaml"]))
    assert 0.9e9 <= c["active_no_embedding"] <= 1.1e9 and 0.9e9 <= c["active"] <= 1.1e9, c
    assert c["total"] < 3e9, c  # f32 params + AdamW moments stay under 36 GiB of an 80 GB H100
