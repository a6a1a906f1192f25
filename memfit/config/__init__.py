"""JSON runtime config: strict section models with DeepSpeed-compatible key names, and the
resolution of a raw config (DeepSpeed's "auto" included) into a MemfitConfig."""

from memfit.config.client import ClientComponents
from memfit.config.components import Resolved
from memfit.config.describe import describe_config
from memfit.config.errors import ConfigError
from memfit.config.models import (
    AioConfig,
    Bf16Config,
    Fp16Config,
    MemfitConfig,
    OffloadOptimizerConfig,
    OptimizerConfig,
    SchedulerConfig,
    ZeroConfig,
)
from memfit.config.resolve import ResolvedConfig, engine_gaps, load_config, resolve_config

__all__ = [
    "AioConfig",
    "Bf16Config",
    "ClientComponents",
    "ConfigError",
    "Fp16Config",
    "MemfitConfig",
    "OffloadOptimizerConfig",
    "OptimizerConfig",
    "Resolved",
    "ResolvedConfig",
    "SchedulerConfig",
    "ZeroConfig",
    "describe_config",
    "engine_gaps",
    "load_config",
    "resolve_config",
]
