"""fp32 master weights for the parameters a rank owns, when compute runs in 16 bits or the
optimizer runs in the host tier while the model runs elsewhere (a GPU)."""

import torch


class MasterWeights:
    """Maps owned compute parameters to the tensors the optimizer updates: fp32 copies (on the
    device `allocate` gives, else the parameter's), or the parameters themselves."""

    def __init__(self, owned: list[tuple[str, torch.nn.Parameter]], keep_fp32_copy: bool, allocate=None):
        """allocate(shape, dtype) -> tensor: where fp32 copies live (the host tier's arena under
        offload); torch's allocator by default."""
        self.names = [name for name, _ in owned]
        self.compute = [param for _, param in owned]
        self.separate = keep_fp32_copy
        if keep_fp32_copy:
            self.masters = []
            for param in self.compute:
                shape = tuple(param.shape)
                master = torch.empty(shape, device=param.device) if allocate is None else allocate(shape, torch.float32)
                master.copy_(param.detach())
                self.masters.append(torch.nn.Parameter(master))
        else:
            self.masters = self.compute

    def take_grads(self, touched_ids: set[int]) -> None:
        """Gives the optimizer the reduced gradients (as fp32 on separate masters). A parameter
        whose id is not in touched_ids got no gradient on any rank this step: its grad is None,
        so the optimizer skips it as torch.optim does."""
        for master, param in zip(self.masters, self.compute):
            got = param.grad is not None and id(param) in touched_ids
            if self.separate:
                master.grad = param.grad.to(device=master.device, dtype=torch.float32) if got else None
                param.grad = None
            elif not got:
                param.grad = None

    def write_back(self) -> None:
        if self.separate:
            with torch.no_grad():
                for master, param in zip(self.masters, self.compute):
                    param.copy_(master)  # casts, and crosses from the host tier to the device

    def grads(self) -> list[torch.Tensor]:
        return [m.grad for m in self.masters if m.grad is not None]

    @property
    def num_bytes(self) -> int:
        return sum(m.numel() * m.element_size() for m in self.masters) if self.separate else 0
