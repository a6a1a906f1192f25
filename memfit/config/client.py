"""What memfit.initialize was given besides the config: an optimizer (a torch.optim.Optimizer
class that receives optimizer.params, a built optimizer, or a factory params -> optimizer) and a
scheduler factory. "auto" in optimizer.params and scheduler.params is resolved from these."""

import inspect
from dataclasses import dataclass
from typing import Any


@dataclass(frozen=True)
class ClientComponents:
    optimizer: Any = None
    lr_scheduler: Any = None

    @property
    def optimizer_class(self) -> type | None:
        """The class that config optimizer.params are passed to, if one was given."""
        if self.optimizer is None:
            return None
        import torch  # here, not at the top: `memfit config check` runs without torch

        is_class = inspect.isclass(self.optimizer) and issubclass(self.optimizer, torch.optim.Optimizer)
        return self.optimizer if is_class else None

    @property
    def built_optimizer(self) -> "torch.optim.Optimizer | None":  # noqa: F821
        if self.optimizer is None:
            return None
        import torch

        return self.optimizer if isinstance(self.optimizer, torch.optim.Optimizer) else None

    @property
    def optimizer_factory(self):
        """A callable that builds the optimizer itself, so config optimizer.params are not used."""
        if self.optimizer is None or self.optimizer_class is not None or self.built_optimizer is not None:
            return None
        if getattr(self.optimizer, "uses_config", False):  # memfit.deepspeed's groups over the config's optimizer
            return None
        return self.optimizer

    def describe_optimizer(self) -> str:
        if self.optimizer_class is not None:
            return f"the optimizer class {self.optimizer_class.__name__} passed to memfit.initialize"
        if self.built_optimizer is not None:
            return f"the {type(self.built_optimizer).__name__} passed to memfit.initialize"
        return "the optimizer factory passed to memfit.initialize"

    def hyperparameters(self) -> dict[str, Any]:
        """Values read off a built optimizer: its first param group, then its defaults; tensors
        become numbers and tuples lists, as a config would hold them."""
        optimizer = self.built_optimizer
        if optimizer is None:
            return {}
        values = {**optimizer.defaults, **{k: v for k, v in optimizer.param_groups[0].items() if k != "params"}}
        return {key: _as_config_value(value) for key, value in values.items()}


def _as_config_value(value):
    import torch

    if isinstance(value, torch.Tensor) and value.numel() == 1:
        return value.item()
    if isinstance(value, tuple):
        return [_as_config_value(item) for item in value]
    return value
