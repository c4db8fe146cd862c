"""Typed, validated configuration (see schema.py for every key)."""

from sfd_train.config.base import ConfigError, from_mapping, to_dict
from sfd_train.config.loader import build_config, config_help, load_config, save_config
from sfd_train.config.schema import (
    CheckpointConfig,
    Config,
    ModelConfig,
    ObjectiveConfig,
    OptimizerConfig,
    ParallelConfig,
    RunConfig,
    SamplerConfig,
    TrainConfig,
)

__all__ = [
    "CheckpointConfig", "Config", "ConfigError", "ModelConfig", "ObjectiveConfig", "OptimizerConfig",
    "ParallelConfig", "RunConfig", "SamplerConfig", "TrainConfig", "build_config", "config_help",
    "from_mapping", "load_config", "save_config", "to_dict",
]
