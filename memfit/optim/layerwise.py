"""LayerwiseStepper: one optimizer per parameter, stepped from its post-accumulate-grad hook, so
each gradient is freed as soon as it is used and peak gradient memory is about one tensor.

It steps only at accumulation boundaries: the hook counts the backward passes that reached each
parameter and steps on every grad_accum_steps-th, after the gradients of all micro-batches have
been summed (galore-torch's per-layer mode steps on every micro-batch, which silently breaks
accumulation). Scale each micro-batch's loss by 1 / grad_accum_steps, as in a normal loop.
Global gradient-norm clipping is impossible in this mode, since no gradient
outlives its own step; passing gradient_clipping > 0 raises."""

import torch


class LayerwiseStepper:
    def __init__(
        self,
        model: torch.nn.Module,
        optimizer_factory,
        grad_accum_steps: int = 1,
        *,
        gradient_clipping: float = 0.0,
        lr_scheduler_factory=None,
    ):
        if gradient_clipping and gradient_clipping > 0:
            raise ValueError(
                "gradient_clipping: global norm clipping is not possible in layer-wise mode "
                "(each gradient is freed at its own step); set it to 0"
            )
        if not isinstance(grad_accum_steps, int) or grad_accum_steps < 1:
            raise ValueError(f"grad_accum_steps: must be a positive integer, got {grad_accum_steps!r}")
        self.grad_accum_steps = grad_accum_steps
        self.optimizers: dict[str, torch.optim.Optimizer] = {}
        self.schedulers = {}
        self._passes: dict[str, int] = {}
        self._handles = []
        for name, param in model.named_parameters():
            if not param.requires_grad:
                continue
            optimizer = optimizer_factory([param])
            self.optimizers[name] = optimizer
            if lr_scheduler_factory is not None:
                self.schedulers[name] = lr_scheduler_factory(optimizer)
            self._passes[name] = 0
            self._handles.append(param.register_post_accumulate_grad_hook(self._hook(name)))

    def _hook(self, name):
        def step(param):
            self._passes[name] += 1
            if self._passes[name] % self.grad_accum_steps:
                return
            self.optimizers[name].step()
            param.grad = None
            if name in self.schedulers:
                self.schedulers[name].step()

        return step

    def state_dict(self) -> dict:
        return {"optimizers": {n: o.state_dict() for n, o in self.optimizers.items()}, "passes": dict(self._passes)}

    def load_state_dict(self, state: dict) -> None:
        for name, optimizer_state in state["optimizers"].items():
            self.optimizers[name].load_state_dict(optimizer_state)
        self._passes.update(state["passes"])

    def state_bytes(self) -> int:
        return sum(
            v.numel() * v.element_size()
            for o in self.optimizers.values()
            for s in o.state.values()
            for v in s.values()
            if torch.is_tensor(v)
        )

    def remove(self) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles = []
