"""deepseek_jax: DeepSeek MoE language models in JAX + Flax Linen."""

from deepseek_jax.config import Config, ConfigError, ModelConfig, load_config, load_model_config
from deepseek_jax.model import ModelOutput, Transformer, build_cache, build_model, init_cache

__all__ = [
    "Config", "ConfigError", "ModelConfig", "ModelOutput", "Transformer", "build_cache", "build_model",
    "init_cache",
    "load_config", "load_model_config",
]
