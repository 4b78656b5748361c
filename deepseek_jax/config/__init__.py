"""Typed, frozen configs and the strict YAML loader.

  errors.py  ConfigError, the one error every invariant raises
  model.py   the model's parts (RoPE, MLA, DSA indexer, V4 attention, MoE, mHC) and ModelConfig
  run.py     mesh, data, optim and train sections, and Config (the whole run)
  checks.py  invariants across sections, run by the loader on every Config
  loader.py  YAML files + `include:` + `a.b=value` overrides -> Config, and back (to_dict, to_yaml)
"""

from deepseek_jax.config.checks import CHECKS, check_config
from deepseek_jax.config.errors import ConfigError
from deepseek_jax.config.loader import (
    build,
    load_config,
    load_dict,
    load_model_config,
    parse_override,
    to_dict,
    to_yaml,
)
from deepseek_jax.config.media import AudioConfig, VideoConfig, VisionConfig
from deepseek_jax.config.model import (
    IndexerConfig,
    MHCConfig,
    MLAConfig,
    ModelConfig,
    MoEConfig,
    Remat,
    RopeConfig,
    V4AttentionConfig,
)
from deepseek_jax.config.run import (
    MESH_AXES,
    Config,
    DataConfig,
    MeshConfig,
    OptimConfig,
    TrainConfig,
)
from deepseek_jax.config.v41 import DSparkConfig, EngramConfig, SharedKVConfig

__all__ = [
    "AudioConfig",
    "VideoConfig",
    "VisionConfig",
    "CHECKS",
    "MESH_AXES",
    "Config",
    "ConfigError",
    "DSparkConfig",
    "DataConfig",
    "EngramConfig",
    "IndexerConfig",
    "MHCConfig",
    "MLAConfig",
    "MeshConfig",
    "MoEConfig",
    "ModelConfig",
    "OptimConfig",
    "Remat",
    "RopeConfig",
    "SharedKVConfig",
    "TrainConfig",
    "V4AttentionConfig",
    "build",
    "check_config",
    "load_config",
    "load_dict",
    "load_model_config",
    "parse_override",
    "to_dict",
    "to_yaml",
]
