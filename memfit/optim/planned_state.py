"""The optimizer state an optimizer will hold once every parameter has stepped, known before the
first step (when torch's optimizers have created none of it yet): what the snapshot slots, the
NVMe swap file and `memfit estimate` are sized by, so that a start that has room keeps it."""

import torch

FP32_BYTES = 4  # the masters memfit steps are fp32, and so is the state torch's optimizers make for them


def planned_state_bytes(optimizer: torch.optim.Optimizer) -> int:
    """Bytes of state tensors: the optimizer's own plan (GaLore, FRUGAL), else per group SGD's
    momentum buffer (with momentum), or the Adam family's two moments (Adam, AdamW, Lamb,
    CPUAdamW) plus amsgrad's running maximum of the second moment (max_exp_avg_sq). Step counters
    are numbers in a snapshot and are not counted."""
    if hasattr(optimizer, "planned_state_bytes"):
        return optimizer.planned_state_bytes()
    total = 0
    for group in optimizer.param_groups:
        numel = sum(param.numel() for param in group["params"])
        if isinstance(optimizer, torch.optim.SGD):
            per_element = 1 if group.get("momentum", 0) else 0
        else:
            per_element = 3 if group.get("amsgrad", False) else 2
        total += per_element * numel * FP32_BYTES
    return total
