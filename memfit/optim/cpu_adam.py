"""CPUAdamW: Adam/AdamW for CPU tensors on the fused kernel (memfit.optim.fused_adam), in the
manner of DeepSpeedCPUAdam, as a plain torch.optim.Optimizer.

Design:
- fp32 parameters are stepped in place. bf16/fp16 parameters get an fp32 master copy in their
  state; the kernel reads the 16-bit gradient and writes the 16-bit parameter in the same pass,
  so updates smaller than the parameter's precision accumulate in the master instead of being
  rounded away.
- One kernel call per (param group, step count, dtypes): the calls of thousands of small tensors
  are batched, and the kernel's threads spread over all of their elements.
- The state holds tensors and integers only: step (int), exp_avg, exp_avg_sq (fp32, the
  parameter's shape) and master (fp32) for 16-bit parameters. A load keeps that state in fp32,
  where torch's Optimizer would cast it to the parameter's dtype.
- Gradients with inf or nan update the state like torch's AdamW does (they spread into it);
  the engine checks and skips through fused_adam_step(nonfinite="skip").
- Threads: torch.get_num_threads().
"""

import numbers
import warnings
from collections.abc import Callable

import torch

from memfit.optim.contract import check_implementation_flags
from memfit.optim.exact_state import ExactStateLoading
from memfit.optim.fused_adam import GRAD_DTYPES, adam_constants, step_tensors

_STATE_TENSORS = ("master", "exp_avg", "exp_avg_sq")
_KERNEL_DTYPES = frozenset(GRAD_DTYPES)
_TORCH_ONLY_SETTINGS = ("amsgrad", "maximize", "capturable", "differentiable")


class CPUAdamW(ExactStateLoading, torch.optim.Optimizer):
    def __init__(
        self,
        params,
        lr: float = 1e-3,
        betas: tuple[float, float] = (0.9, 0.999),
        eps: float = 1e-8,
        weight_decay: float = 1e-2,
        *,
        adamw_mode: bool = True,
        bias_correction: bool = True,
        foreach: bool | None = None,
        fused: bool | None = None,
        differentiable: bool = False,
    ):
        check_implementation_flags(
            "CPUAdamW", foreach=foreach, fused=fused, differentiable=differentiable, has_fused=True
        )
        check_hyperparameters(lr, betas, eps, weight_decay)
        defaults = dict(
            lr=lr,
            betas=tuple(betas),
            eps=eps,
            weight_decay=weight_decay,
            adamw_mode=adamw_mode,
            bias_correction=bias_correction,
        )
        # Where state tensors come from: the engine's host tier points this at its arena.
        self.allocate_state: Callable[[tuple, torch.dtype], torch.Tensor] = _zeros
        super().__init__(params, defaults)

    def __getstate__(self) -> dict:
        # a copy allocates its state with torch: the host arena belongs to the engine that set it
        return {**super().__getstate__(), "allocate_state": _zeros}

    def master_of(self, param: torch.Tensor) -> torch.Tensor | None:
        """The fp32 master of a 16-bit parameter, once it has one (None for fp32 parameters,
        which are their own master)."""
        return self.state[param].get("master") if param in self.state else None

    def set_master(self, param: torch.Tensor, value: torch.Tensor) -> None:
        """Gives a 16-bit parameter its fp32 master (a checkpoint's value); value is copied."""
        state = self.state[param]
        if "master" not in state:
            state["master"] = self.allocate_state(tuple(param.shape), torch.float32)
        state["master"].copy_(value)

    def add_param_group(self, param_group: dict) -> None:
        super().add_param_group(param_group)
        group_index = len(self.param_groups) - 1
        group = self.param_groups[group_index]
        try:
            check_hyperparameters(group["lr"], group["betas"], group["eps"], group["weight_decay"])
            for param_index, param in enumerate(group["params"]):
                _check_param(param, param_index, group_index)
        except ValueError:
            self.param_groups.pop()
            raise
        group["betas"] = tuple(group["betas"])

    @torch.no_grad()
    def step(self, closure=None, *, grad_scale: float = 1.0):
        """torch's step; grad_scale multiplies every gradient inside the kernel's one pass (loss
        un-scaling and clipping at no extra pass over the gradients)."""
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group_index, group in enumerate(self.param_groups):
            batches: dict[tuple, list] = {}  # (step, grad dtype, param_out dtype) -> kernel rows
            stepped, strided_back = [], []  # strided_back: (parameter, the contiguous copy stepped)
            for param_index, param in enumerate(group["params"]):
                grad = param.grad
                if grad is None:
                    continue
                # The common case in few attribute reads: this loop runs once per tensor per step.
                if not (param.is_cpu and param.dtype in _KERNEL_DTYPES and param.is_contiguous()):
                    _check_param(param, param_index, group_index)
                if grad.layout != torch.strided or not grad.is_contiguous():
                    grad = _dense_grad(grad, param_index, group_index)
                state = self.state[param]
                if "exp_avg" not in state or (param.dtype != torch.float32 and "master" not in state):
                    _ensure_state(param, state, self.allocate_state)
                state["step"] += 1
                target = param
                if not param.is_contiguous():  # the kernel writes dense memory: step a copy, copy it back
                    target = param.contiguous()
                    strided_back.append((param, target))
                master = state.get("master", target)
                out = None if master is target else target
                key = (state["step"], grad.dtype, None if out is None else out.dtype)
                batches.setdefault(key, []).append((master, grad, state["exp_avg"], state["exp_avg_sq"], out))
                stepped.append(param)
            for (step, _, _), rows in batches.items():
                step_tensors(rows, group_constants(group, step, grad_scale))
            for param, stepped_copy in strided_back:
                param.copy_(stepped_copy)
            if stepped:
                torch.autograd.graph.increment_version(stepped)  # written through raw pointers
        return loss

    def load_state_dict(self, state_dict: dict) -> None:
        """torch's load, checked first (nothing loads on an error); the state keeps its saved fp32
        (ExactStateLoading) and is copied, and a state dict of torch's AdamW loads too."""
        for group_index, group in enumerate(state_dict["param_groups"]):
            for setting in _TORCH_ONLY_SETTINGS:
                if group.get(setting):
                    raise ValueError(
                        f"state_dict: param group {group_index} sets {setting}=True, which CPUAdamW does not implement"
                    )
        saved_ids = [param_id for group in state_dict["param_groups"] for param_id in group["params"]]
        params = [param for group in self.param_groups for param in group["params"]]
        for param_id, param in zip(saved_ids, params):
            for key, value in state_dict["state"].get(param_id, {}).items():
                if key in _STATE_TENSORS and value.numel() != param.numel():
                    raise ValueError(
                        f"state_dict: {key} of parameter {param_id} has {value.numel()} elements, "
                        f"the parameter has {param.numel()}"
                    )
        default_keys = set(self.defaults)
        super().load_state_dict(state_dict)
        for key in set(self.defaults) - default_keys:  # torch's __setstate__ adds `differentiable`
            del self.defaults[key]
        for param in params:
            state = self.state.get(param)
            if not state:
                continue
            for key in _STATE_TENSORS:
                if key in state:  # the kernel's layout: fp32, contiguous (torch's AdamW may have saved bf16)
                    state[key] = state[key].to(torch.float32).reshape(param.shape).contiguous()
            state["step"] = int(state.get("step", 0))
        for group in self.param_groups:
            for key, value in self.defaults.items():
                group.setdefault(key, value)


def check_hyperparameters(lr, betas, eps, weight_decay) -> None:
    """torch.optim.AdamW's checks, with its messages; a value that is not a number (a string, None)
    fails the same check with a ValueError where torch would raise a TypeError."""
    if torch.is_tensor(lr) and lr.numel() != 1:
        raise ValueError("Tensor lr must be 1-element")
    if not _at_least_zero(lr):
        raise ValueError(f"Invalid learning rate: {lr}")
    if not _at_least_zero(eps):
        raise ValueError(f"Invalid epsilon value: {eps}")
    if not isinstance(betas, (tuple, list)) or len(betas) != 2:
        raise ValueError(f"Invalid betas: {betas!r} (expected two numbers)")
    for index, beta in enumerate(betas):
        if not (_at_least_zero(beta) and beta < 1.0):
            raise ValueError(f"Invalid beta parameter at index {index}: {beta}")
    if not _at_least_zero(weight_decay):
        raise ValueError(f"Invalid weight_decay value: {weight_decay}")


def _at_least_zero(value) -> bool:
    """0 <= value for a real number or a one-element floating tensor (torch accepts tensor lr)."""
    if torch.is_tensor(value):
        return value.numel() == 1 and value.is_floating_point() and bool(value >= 0)
    return isinstance(value, numbers.Real) and not isinstance(value, bool) and value >= 0


def _check_param(param: torch.Tensor, param_index: int, group_index: int) -> None:
    where = f"params: parameter {param_index} of group {group_index}"
    if param.device.type != "cpu":
        raise ValueError(f"{where} must be on the CPU, got {param.device}")
    if param.dtype not in GRAD_DTYPES:
        raise ValueError(
            f"{where} is {param.dtype}; CPUAdamW steps {', '.join(map(str, GRAD_DTYPES[:-1]))} and {GRAD_DTYPES[-1]}"
        )
    if param.layout != torch.strided:
        raise ValueError(f"{where} is {param.layout}; the kernel steps dense tensors")


def _dense_grad(grad: torch.Tensor, param_index: int, group_index: int) -> torch.Tensor:
    if grad.layout != torch.strided:
        raise ValueError(
            f"params: parameter {param_index} of group {group_index} has a sparse gradient ({grad.layout})"
        )
    if not grad.is_contiguous():
        warnings.warn(
            f"CPUAdamW: the gradient of parameter {param_index} of group {group_index} is not contiguous; "
            "stepping a contiguous copy",
            stacklevel=3,
        )
        grad = grad.contiguous()
    return grad


def _zeros(shape: tuple, dtype: torch.dtype) -> torch.Tensor:
    return torch.zeros(shape, dtype=dtype)


def _ensure_state(param: torch.Tensor, state: dict, allocate) -> None:
    """Creates what a first step, or a state loaded from torch's AdamW (no master), lacks."""
    if "exp_avg" not in state:
        state["step"] = state.get("step", 0)
        state["exp_avg"] = allocate(tuple(param.shape), torch.float32)
        state["exp_avg_sq"] = allocate(tuple(param.shape), torch.float32)
    if param.dtype != torch.float32 and "master" not in state:
        state["master"] = allocate(tuple(param.shape), torch.float32)
        state["master"].copy_(param.detach())


def group_constants(group: dict, step: int, grad_scale: float):
    """The fused kernel's constants for one param group of CPUAdamW at one step count."""
    beta1, beta2 = group["betas"]
    return adam_constants(
        step=step,
        lr=float(group["lr"]),
        beta1=beta1,
        beta2=beta2,
        eps=group["eps"],
        weight_decay=group["weight_decay"],
        adamw_mode=group["adamw_mode"],
        bias_correction=group["bias_correction"],
        grad_scale=grad_scale,
    )
