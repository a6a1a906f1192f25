"""A drop-in for galore-torch 1.0: `from memfit.optim.galore_torch_compat import GaLoreAdamW` in
place of `from galore_torch import GaLoreAdamW` keeps a training script's arguments and its run,
step for step (the same SVD, projections, moments and weight decay, in the same order).

The class is memfit's GaLoreAdamW with galore_compat=True under galore-torch's signature
(params, lr, betas, eps=1e-6, weight_decay, correct_bias, no_deprecation_warning). Groups take
galore-torch's keys (rank, update_proj_gap, scale, proj_type), and its state dict holds
tensors and numbers only. What galore-torch has and memfit does not, proj_type "full" and the
Tucker projector for tensors of more than two dimensions, is refused with a ValueError.
"""

from memfit.optim.galore import GALORE_TORCH_EPS
from memfit.optim.galore import GaLoreAdamW as _MemfitGaLoreAdamW


class GaLoreAdamW(_MemfitGaLoreAdamW):
    def __init__(
        self,
        params,
        lr: float = 1e-3,
        betas: tuple[float, float] = (0.9, 0.999),
        eps: float = GALORE_TORCH_EPS,
        weight_decay: float = 0.0,
        correct_bias: bool = True,
        no_deprecation_warning: bool = False,
    ):
        # no_deprecation_warning silences galore-torch's own FutureWarning; memfit issues none.
        super().__init__(params, lr, betas, eps, weight_decay, correct_bias=correct_bias, galore_compat=True)
