"""The contract every tier's update keeps: the engine drives phase 3 of a step (from the reduced
gradients of the tensors a rank owns to updated parameters) through these calls alone, whatever
holds the masters and the optimizer state. tests/unit/test_offload_contract.py runs one contract
test over every implementation:

  in memory (in_memory.py)   OptimizerUpdate: any torch optimizer on fp32 masters or the parameters,
                             state where the model runs or in the host tier; KernelUpdate: the fused
                             CPUAdamW in place on the compute parameters, state in the host tier
  on NVMe                    NvmeKernelUpdate (nvme_kernel.py): the fused step streamed through a
                             ring of host buffers; NvmeOptimizerUpdate (nvme_optimizer.py): torch
                             optimizers, sub-group by sub-group
"""

from typing import Protocol

import torch


class Update(Protocol):
    def gradients(self, touched_ids: set[int]) -> list:
        """The gradients the optimizer will read, in parameter order; a tensor no rank touched
        this step gets grad None, so the optimizer skips it as torch.optim does. An entry is a
        tensor, or a StoredGradient (streamed_step.py) for one resting in a swap file."""

    def nonfinite(self, grads: list) -> bool:
        """Whether any of them holds an inf or a nan (fp16 without clipping)."""

    def apply(self, multiplier: torch.Tensor | None) -> None:
        """The optimizer step, every gradient multiplied by `multiplier` (loss un-scaling and
        clipping; None for 1), the parameters written, the gradients dropped."""

    def skip(self) -> None:
        """Drops the gradients without stepping (an fp16 overflow)."""

    @property
    def master_bytes(self) -> int:
        """Bytes of fp32 master copies held, in any tier."""

    @property
    def state_bytes(self) -> int:
        """Bytes of optimizer state held, in any tier."""
