"""The typed configuration tree, its YAML loader and its generated reference."""

from kdrl.config.docs import render_markdown
from kdrl.config.loader import config_from_dict, config_to_dict, dump_config, load_config
from kdrl.config.schema import (
    Config,
    GRPOConfig,
    MicroBatchSpec,
    RolloutConfig,
    StudentConfig,
    TeacherConfig,
)
from kdrl.config.validate import ConfigError, validate

__all__ = [
    "Config",
    "ConfigError",
    "GRPOConfig",
    "MicroBatchSpec",
    "RolloutConfig",
    "StudentConfig",
    "TeacherConfig",
    "config_from_dict",
    "config_to_dict",
    "dump_config",
    "load_config",
    "render_markdown",
    "validate",
]
