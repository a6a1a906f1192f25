"""JSON runtime config: strict section models with DeepSpeed-compatible key names."""

from memfit.config.errors import ConfigError
from memfit.config.load import load_config
from memfit.config.models import (
    AioConfig,
    Bf16Config,
    MemfitConfig,
    OffloadOptimizerConfig,
    OptimizerConfig,
    SchedulerConfig,
    ZeroConfig,
)

__all__ = [
    "AioConfig",
    "Bf16Config",
    "ConfigError",
    "MemfitConfig",
    "OffloadOptimizerConfig",
    "OptimizerConfig",
    "SchedulerConfig",
    "ZeroConfig",
    "load_config",
]
