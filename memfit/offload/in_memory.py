"""Phase 3 with the masters and optimizer state in memory, where the model runs or in the host
tier (the contract in interface.py).

OptimizerUpdate runs any torch.optim.Optimizer on the owned masters: fp32 copies of 16-bit
parameters, or the parameters themselves. KernelUpdate runs CPUAdamW on the owned compute
parameters themselves: the fused kernel reads their 16-bit gradients, updates the fp32 master
and moments (in the host tier) and writes the parameters in one pass, with the multiplier
applied inside that pass, so there is no fp32 gradient copy, no scaling pass and no write-back.
"""

import torch

from memfit.optim.fused_adam import adam_constants, step_tensors

# constants for a check-only kernel call: nothing is written, so their values do not matter
CHECK_ONLY = adam_constants(
    step=1,
    lr=0.0,
    beta1=0.9,
    beta2=0.999,
    eps=1e-8,
    weight_decay=0.0,
    adamw_mode=True,
    bias_correction=True,
    grad_scale=1.0,
)


def _nbytes(tensors) -> int:
    return sum(t.numel() * t.element_size() for t in tensors)


def _state_tensors(optimizer, skip=("master",)) -> list[torch.Tensor]:
    return [v for s in optimizer.state.values() for k, v in s.items() if torch.is_tensor(v) and k not in skip]


class OptimizerUpdate:
    def __init__(self, optimizer, masters, tier=None):
        self.optimizer, self.masters, self.tier = optimizer, masters, tier

    def gradients(self, touched_ids: set[int]) -> list[torch.Tensor]:
        self.masters.take_grads(touched_ids)
        return self.masters.grads()

    def nonfinite(self, grads: list[torch.Tensor]) -> bool:
        return any(not bool(torch.isfinite(grad).all()) for grad in grads)

    def apply(self, multiplier: torch.Tensor | None) -> None:
        if multiplier is not None:
            for grad in self.masters.grads():
                grad.mul_(multiplier.to(device=grad.device, dtype=grad.dtype))
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        self.masters.write_back()
        if self.tier is not None:
            self.tier.adopt(self.optimizer)

    def skip(self) -> None:
        self.optimizer.zero_grad(set_to_none=True)

    @property
    def master_bytes(self) -> int:
        return self.masters.num_bytes

    @property
    def state_bytes(self) -> int:
        return _nbytes(_state_tensors(self.optimizer, skip=()))


class KernelUpdate:
    def __init__(self, optimizer, owned_params: list[torch.Tensor], tier=None):
        self.optimizer, self.params, self.tier = optimizer, owned_params, tier

    def gradients(self, touched_ids: set[int]) -> list[torch.Tensor]:
        grads = []
        for param in self.params:
            if param.grad is not None and id(param) in touched_ids:
                grads.append(param.grad)
            else:
                param.grad = None
        return grads

    def nonfinite(self, grads: list[torch.Tensor]) -> bool:
        """The kernel's own check, which reads only the gradients; a tensor without state yet (the
        first step) is checked with torch."""
        rows, first_step = [], []
        for param in self.params:
            if param.grad is None:
                continue
            state = self.optimizer.state.get(param)
            if state and "exp_avg" in state:
                rows.append((state.get("master", param), param.grad, state["exp_avg"], state["exp_avg_sq"], None))
            else:
                first_step.append(param.grad)
        if rows and step_tensors(rows, CHECK_ONLY, nonfinite="check"):
            return True
        return any(not bool(torch.isfinite(grad).all()) for grad in first_step)

    def apply(self, multiplier: torch.Tensor | None) -> None:
        self.optimizer.step(grad_scale=1.0 if multiplier is None else float(multiplier))
        self.optimizer.zero_grad(set_to_none=True)

    def skip(self) -> None:
        self.optimizer.zero_grad(set_to_none=True)

    @property
    def master_bytes(self) -> int:
        return _nbytes(s["master"] for s in self.optimizer.state.values() if "master" in s)

    @property
    def state_bytes(self) -> int:
        return _nbytes(_state_tensors(self.optimizer))
