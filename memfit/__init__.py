"""memfit: a memory-efficient distributed training runtime for PyTorch.

Importing memfit initializes no CUDA context and compiles nothing; the native extension
(memfit._C) is built at install time and loaded on first use of memfit.io.
"""

from memfit.config import ConfigError
from memfit.runtime import lifecycle as _lifecycle  # noqa: F401  (notes the launcher's pid as early as possible)

__version__ = "0.1.0"


def initialize(model, config=None, *, optimizer=None, lr_scheduler=None):
    """Builds a training engine; see memfit.runtime.build.initialize."""
    from memfit.runtime.build import initialize as build

    return build(model, config, optimizer=optimizer, lr_scheduler=lr_scheduler)


def zero_init(config=None):
    """A context in which a model is built with its parameters' values on NVMe, never all in
    memory, for ZeRO stage 3 with offload_param "nvme" (any other config builds normally); see
    memfit.runtime.zero.deferred_init. config: as for initialize (None: MEMFIT_CONFIG)."""
    from memfit.runtime.zero.deferred_init import zero_init as deferred

    return deferred(config)


__all__ = ["ConfigError", "__version__", "initialize", "zero_init"]
