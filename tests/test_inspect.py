"""`inspect`: abstract on full-size configs (nothing allocated), a concrete forward on tiny."""


import numpy as np
import pytest

from deepseek_jax.cli import main
from deepseek_jax.config import load_config
from deepseek_jax.inspect_model import inspect
from deepseek_jax.params import count_params
from tests.utils import CONFIGS

FULL_SIZE = sorted(CONFIGS.glob("model/deepseek_*.yaml"))


def test_full_size_configs_are_listed():
    assert {p.stem for p in FULL_SIZE} >= {
        "deepseek_v3_671b",
        "deepseek_v32_671b",
        "deepseek_v4_flash",
        "deepseek_v4_pro",
    }


@pytest.mark.slow  # 3-6 s each: three eval_shape traces of a full-size model
@pytest.mark.parametrize("path", FULL_SIZE, ids=lambda p: p.stem)
def test_full_size_is_abstract(path, capsys):
    cfg = load_config([path]).model
    result = inspect(cfg, batch=2, seq_len=8)
    out = capsys.readouterr().out
    assert result["abstract"] and "logits" not in result
    assert "concrete forward skipped" in out and "abstract forward on 2x8 tokens" in out
    assert result["param_bytes"] >= 4 * count_params(cfg)["total"]  # f32 parameters, + router bias
    shapes = {name: shape for name, shape, _ in result["outputs"]}
    assert shapes["logits"] == (2, 8, cfg.vocab_size)


@pytest.mark.slow  # initialises and compiles the tiny model (10-40 s on 2 cores, cold cache)
def test_tiny_runs_forward_and_abstract_matches(capsys):
    cfg = load_config([CONFIGS / "model" / "tiny.yaml"]).model
    concrete = inspect(cfg, batch=2, seq_len=16)
    assert not concrete["abstract"] and "next-token loss" in capsys.readouterr().out
    assert (
        concrete["logits"].shape == (2, 16, cfg.vocab_size)
        and np.isfinite(concrete["logits"]).all()
    )
    abstract = inspect(
        cfg, batch=2, seq_len=16, budget_bytes=0
    )  # forced: the same shapes, no forward
    assert abstract["abstract"] and abstract["outputs"] == concrete["outputs"]
    assert abstract["param_bytes"] == concrete["param_bytes"]


@pytest.mark.slow
def test_cli_inspect_on_full_size_config(capsys):
    """The README's command: parameter table and abstract forward, exit code 0."""
    assert (
        main(["inspect", str(CONFIGS / "model" / "deepseek_v4_flash.yaml"), "--seq-len", "8"]) == 0
    )
    out = capsys.readouterr().out
    assert "main model" in out and "concrete forward skipped" in out
