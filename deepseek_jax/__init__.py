"""deepseek_jax: DeepSeek MoE language models in JAX + Flax Linen."""

from deepseek_jax.config import Config, ConfigError, ModelConfig, load_config, load_model_config
from deepseek_jax.models import Decoder, ModelOutput, build_cache, build_model

__all__ = [
    "Config", "ConfigError", "Decoder", "ModelConfig", "ModelOutput", "build_cache", "build_model",
    "load_config", "load_model_config",
]
