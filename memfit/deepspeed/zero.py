"""deepspeed.zero on memfit: GatheredParameters, to read or change whole parameters at ZeRO stage
3, and Init, which builds a model without holding its parameters in memory (memfit.zero_init)."""

import contextlib
import warnings

import torch


class GatheredParameters:
    """Within the context, params (one tensor or an iterable) are whole on every rank; every rank
    must enter it with the same tensors. modifier_rank: the rank whose changes are kept; at the
    exit its values go to every rank and to the owner's optimizer master copy. None: read only
    (changes are dropped at stage 3). Below stage 3 it does nothing, as in DeepSpeed."""

    def __init__(self, params, modifier_rank=None, fwd_module=None, enabled=True):
        if isinstance(params, torch.Tensor):
            params = [params]
        self.params = [p for p in params if p is not None] if params is not None else []
        self.modifier_rank = modifier_rank
        self.enabled = enabled
        holders = {id(h): h for h in (getattr(p, "memfit_params", None) for p in self.params) if h is not None}
        if len(holders) > 1:
            raise ValueError("GatheredParameters: the parameters belong to more than one memfit engine")
        self.holder = next(iter(holders.values()), None)
        self._context = contextlib.nullcontext()

    def __enter__(self):
        if self.enabled and self.holder is not None:
            self._context = self.holder.gathered(self.params, modifier_rank=self.modifier_rank)
        self._context.__enter__()
        return self

    def __exit__(self, *exc):
        return self._context.__exit__(*exc)


class Init:
    """deepspeed.zero.Init on memfit.zero_init: with a config at ZeRO stage 3 and offload_param
    "nvme", modules built inside (and `module`, built already) keep their parameters' values on
    NVMe until memfit.initialize fills each rank's parameter store; with any other config they
    are built normally (memfit partitions the model in initialize). enabled=False is a plain
    context, as in DeepSpeed.
    config_dict_or_path (or config): the memfit/DeepSpeed config; None reads MEMFIT_CONFIG.
    DeepSpeed's other arguments (data_parallel_group, remote_device, pin_memory, dtype, mpu...)
    are accepted and ignored, with a warning when given: memfit takes where parameters rest from
    zero_optimization.offload_param, their compute dtype from bf16/fp16 (at initialize), and the
    ranks from torch.distributed."""

    def __init__(
        self,
        module=None,
        data_parallel_group=None,
        mem_efficient_linear=True,
        remote_device=None,
        pin_memory=False,
        config_dict_or_path=None,
        config=None,
        enabled=True,
        dtype=None,
        mpu=None,
        **kwargs,
    ):
        self.enabled = enabled
        self.config = config_dict_or_path if config_dict_or_path is not None else config
        given = dict(data_parallel_group=data_parallel_group, remote_device=remote_device, dtype=dtype, mpu=mpu)
        ignored = [name for name, value in given.items() if value is not None] + sorted(kwargs)
        ignored += ["pin_memory"] if pin_memory else []
        ignored += ["mem_efficient_linear"] if not mem_efficient_linear else []
        if enabled and ignored:
            warnings.warn(
                f"deepspeed.zero.Init: {', '.join(ignored)} ignored: memfit takes where parameters rest from "
                "zero_optimization.offload_param, their dtype from bf16/fp16 and the ranks from torch.distributed",
                UserWarning,
                stacklevel=2,
            )
        if enabled and module is not None:  # a module built already: its parameters go to NVMe now
            from memfit.runtime.zero.deferred_init import defer_module

            defer_module(module, self.config)
        self._context = contextlib.nullcontext()

    def __enter__(self):
        if self.enabled:
            from memfit.runtime.zero.deferred_init import zero_init

            self._context = zero_init(self.config)
        self._context.__enter__()
        return self

    def __exit__(self, *exc):
        return self._context.__exit__(*exc)


def register_external_parameter(module, parameter) -> None:
    """DeepSpeed's registration of a parameter a module's forward uses without owning: memfit
    gathers any parameter where it is used, so there is nothing to register."""


__all__ = ["GatheredParameters", "Init", "register_external_parameter"]
