"""deepspeed.zero on memfit: GatheredParameters, to read or change whole parameters at ZeRO stage
3, and Init, which memfit does not implement (it partitions the model in memfit.initialize)."""

import contextlib

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
    """deepspeed.zero.Init: enabled=False is a plain context (as in DeepSpeed); enabled=True is
    refused, with the way to get the same memory behaviour."""

    def __init__(self, module=None, *args, enabled=True, **kwargs):
        self.enabled = enabled

    def __enter__(self):
        if self.enabled:
            raise NotImplementedError(
                "deepspeed.zero.Init: not implemented by memfit; build the model without it: memfit.initialize "
                "(or deepspeed.initialize) at ZeRO stage 3 keeps on each rank only the tensors it owns"
            )
        return self

    def __exit__(self, *exc):
        return False


def register_external_parameter(module, parameter) -> None:
    """DeepSpeed's registration of a parameter a module's forward uses without owning: memfit
    gathers any parameter where it is used, so there is nothing to register."""


__all__ = ["GatheredParameters", "Init", "register_external_parameter"]
