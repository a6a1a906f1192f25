"""What users of torch.optim.Optimizer rely on beyond the math, shared by CPUAdamW, GaLoreAdamW
and FRUGAL: torch's implementation switches (foreach, fused, differentiable), copies and pickles
that keep the optimizer's own settings, and clear refusals of tensors the math does not cover
(complex parameters, sparse gradients)."""

import torch


def check_implementation_flags(name: str, *, foreach, fused, differentiable, has_fused: bool) -> None:
    """torch's AdamW switches. foreach and fused choose an implementation in torch, not a result:
    accepted (a fused=True where no fused step exists is refused); differentiable=True would ask
    for a step autograd can follow, which these optimizers (stepping under no_grad) do not give."""
    for flag, value in (("foreach", foreach), ("fused", fused), ("differentiable", differentiable)):
        if value is not None and not isinstance(value, bool):
            raise ValueError(f"Invalid {flag}: {value!r} (expected None, True or False)")
    if foreach and fused:
        raise RuntimeError("`fused` and `foreach` cannot be `True` together.")
    if differentiable:
        raise ValueError(f"differentiable=True: {name} steps under torch.no_grad; its step cannot be differentiated")
    if fused and not has_fused:
        raise ValueError(f"fused=True: {name} has no fused implementation; leave fused as None or False")


def check_real(name: str, param: torch.Tensor) -> None:
    if param.is_complex():
        raise ValueError(
            f"params: {name} does not support complex parameters (got {param.dtype}); "
            "pass torch.view_as_real(param) views instead"
        )


def dense_grad(name: str, param: torch.Tensor) -> torch.Tensor:
    grad = param.grad
    if grad.is_sparse:
        raise RuntimeError(f"{name} does not support sparse gradients")
    return grad


class KeepsSettings:
    """Mixin for a torch.optim.Optimizer subclass: deepcopy and pickle keep the attributes named in
    `settings` (torch's Optimizer pickles only defaults, state and param_groups)."""

    settings: tuple[str, ...] = ()

    def __getstate__(self) -> dict:
        return {**super().__getstate__(), **{key: getattr(self, key) for key in self.settings}}
