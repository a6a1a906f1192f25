"""Optimizer state that loads back exactly as it was saved.

torch.optim.Optimizer.load_state_dict casts every floating-point state tensor to the dtype of its
parameter. That is right for Adam's moments next to a plain parameter, and wrong for state kept
on purpose in another dtype: an fp32 projection basis or fp32 moments beside bf16 parameters (the
next step then fails, or loses precision), or a bf16 basis kept to save memory. memfit's
optimizers keep the saved dtype of every state tensor."""

import torch


class ExactStateLoading:
    """Mixin for a torch.optim.Optimizer subclass: load_state_dict keeps saved state dtypes."""

    def load_state_dict(self, state_dict: dict) -> None:
        saved_ids = [param_id for group in state_dict["param_groups"] for param_id in group["params"]]
        saved_state = state_dict["state"]
        super().load_state_dict(state_dict)
        params = [param for group in self.param_groups for param in group["params"]]
        for saved_id, param in zip(saved_ids, params):
            for key, value in saved_state.get(saved_id, {}).items():
                if torch.is_tensor(value) and value.is_floating_point() and key != "step":
                    self.state[param][key] = value.to(device=param.device, copy=True)
