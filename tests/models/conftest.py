"""Fixtures of the model tests."""

import jax
import pytest

from deepseek_jax.config import load_model_config
from deepseek_jax.models import build_model
from tests.utils import CONFIGS


@pytest.fixture(scope="session")
def tiny_model():
    """A factory: tiny_model(name, overrides, T) -> (cfg, model, variables, tokens [2, T]), the model
    of configs/model/<name>.yaml with `overrides`, its variables initialised (key 0) on the first 4 of
    the random tokens (key 1)."""

    def build(name: str, overrides: list[str], T: int):
        cfg = load_model_config([CONFIGS / "model" / f"{name}.yaml"], overrides)
        model = build_model(cfg)
        tokens = jax.random.randint(jax.random.key(1), (2, T), 0, cfg.vocab_size)
        variables = jax.jit(model.init)(jax.random.key(0), tokens[:, :4])
        return cfg, model, variables, tokens

    return build
