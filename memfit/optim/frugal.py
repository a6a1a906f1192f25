"""FRUGAL: AdamW on a subspace of each projectable gradient, a state-free step on the rest.

Groups with `projectable=True` (see frugal_param_groups) are split; other groups (embeddings,
norms, the output layer) run full AdamW. The subspace is renewed every update_gap steps.

proj_type:
  blockwise   whole tensors are Adam-active, the rest take signSGD (or SGD). The active set is
              chosen by bytes: a window over the group's tensors walks backwards, from the last
              tensor at the first renewal and from where the previous window stopped after that
              (so all take turns), and takes the number of tensors k whose bytes are nearest to
              density x the group's bytes: k minimizes |bytes of the first k - density x total|
              over k = 1..count, ties going to the smaller k; density 0 makes no tensor active.
              So every density > 0 keeps at least one tensor on Adam, and density 1 all of them.
              Inside memfit's engine each rank's optimizer holds only the tensors that rank owns,
              so every rank keeps about density x its own bytes of Adam state: the shares are as
              balanced as the ownership plan itself. At a renewal,
              reset_state_on_refresh (the reference's behaviour) restarts every active tensor's
              moments; with it off, a tensor that stays active keeps them.
  svd, randomized, random
              a rank round(density x side) basis per matrix (GaLore-style side choice); Adam on the
              projection, the state-free step on the residual G - back(project(G)).
The Adam part moves by lr x proj_scale, the state-free part by lr x proj_scale x
state_free_lr_scale; weight decay is decoupled and applied to every parameter first.
"""

import math

import torch

from memfit.optim.adam_math import bias_corrections, update_moments
from memfit.optim.checks import check_adam_hyperparameters, check_choice, check_positive_int
from memfit.optim.contract import KeepsSettings, check_implementation_flags, check_real, dense_grad
from memfit.optim.exact_state import ExactStateLoading
from memfit.optim.galore import adamw_step, param_seed
from memfit.optim.groups import warn_nothing_projected
from memfit.optim.projectors import (
    LEFT,
    basis_rank,
    choose_side,
    compute_basis,
    low_rank_numels,
    project,
    project_back,
    random_basis,
)

PROJ_TYPES = ("blockwise", "svd", "randomized", "random")
STATE_FREE = ("signsgd", "sgd")


class FRUGAL(KeepsSettings, ExactStateLoading, torch.optim.Optimizer):
    settings = ("seed",)

    def __init__(
        self,
        params,
        lr=1e-3,
        betas=(0.9, 0.999),
        eps=1e-8,
        weight_decay=0.0,
        *,
        density=0.25,
        update_gap=200,
        proj_type="blockwise",
        state_free="signsgd",
        state_free_lr_scale=1.0,
        proj_scale=1.0,
        reset_state_on_refresh=True,
        seed=0,
        foreach=None,
        fused=None,
        differentiable=False,
    ):
        check_implementation_flags(
            "FRUGAL", foreach=foreach, fused=fused, differentiable=differentiable, has_fused=False
        )
        defaults = dict(
            lr=lr,
            betas=tuple(betas),
            eps=eps,
            weight_decay=weight_decay,
            density=density,
            update_gap=update_gap,
            proj_type=proj_type,
            state_free=state_free,
            state_free_lr_scale=state_free_lr_scale,
            proj_scale=proj_scale,
            reset_state_on_refresh=reset_state_on_refresh,
            projectable=False,
        )
        super().__init__(params, defaults)
        self.seed = seed
        if not any(group["projectable"] and group["params"] for group in self.param_groups):
            warn_nothing_projected("FRUGAL", "projectable")

    def add_param_group(self, param_group: dict) -> None:
        """torch's add_param_group, then the same checks the constructor's groups get; a group
        they refuse is not kept."""
        super().add_param_group(param_group)
        group = self.param_groups[-1]
        try:
            self._check_group(group)
        except ValueError:
            self.param_groups.pop()
            raise
        group.setdefault("frugal_step", 0)
        group.setdefault("block_pointer", -1)

    @staticmethod
    def _check_group(group) -> None:
        check_adam_hyperparameters(group["lr"], group["betas"], group["eps"], group["weight_decay"])
        for param in group["params"]:
            check_real("FRUGAL", param)
        density = group["density"]
        if isinstance(density, bool) or not isinstance(density, (int, float)) or not 0.0 <= density <= 1.0:
            raise ValueError(f"Invalid density: {density!r} (expected 0 to 1)")
        check_positive_int("update_gap", group["update_gap"])
        check_choice("proj_type", group["proj_type"], PROJ_TYPES)
        check_choice("state_free", group["state_free"], STATE_FREE)
        if group["projectable"] and group["proj_type"] != "blockwise":
            for param in group["params"]:
                if param.dim() != 2:
                    raise ValueError(f"proj_type {group['proj_type']!r} needs 2-D tensors, got {tuple(param.shape)}")

    @torch.no_grad()
    def step(self, closure=None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            for param in group["params"]:
                if param.grad is not None:
                    dense_grad("FRUGAL", param)
        for group_index, group in enumerate(self.param_groups):
            if not group["projectable"]:
                for param in group["params"]:
                    if param.grad is not None:
                        adamw_step(param, param.grad, self.state[param], group)
                continue
            refresh = group["frugal_step"] % group["update_gap"] == 0
            group["frugal_step"] += 1
            if group["proj_type"] == "blockwise":
                if refresh:
                    self._choose_blocks(group)
                self._blockwise_step(group)
            else:
                for param_index, param in enumerate(group["params"]):
                    if param.grad is not None:
                        seed = param_seed(self.seed, group, group_index, param_index)
                        self._subspace_step(param, self.state[param], group, refresh, seed)
        return loss

    # ---- blockwise ------------------------------------------------------------------------------
    @staticmethod
    def _window(group) -> list[int]:
        """Indices of the tensors the next renewal makes Adam-active (see the module docstring)."""
        params = group["params"]
        count = len(params)
        if count == 0 or group["density"] == 0:
            return []
        start = group["block_pointer"] % count
        order = [(start - offset) % count for offset in range(count)]
        target = group["density"] * sum(_nbytes(p) for p in params)
        best_count, best_distance, window_bytes = 0, math.inf, 0
        for num_active, index in enumerate(order, start=1):
            window_bytes += _nbytes(params[index])
            distance = abs(window_bytes - target)
            if distance < best_distance:  # strict: a tie keeps the smaller count
                best_count, best_distance = num_active, distance
        return order[:best_count]

    def _choose_blocks(self, group) -> None:
        chosen = set(self._window(group))
        if group["params"]:
            group["block_pointer"] = (group["block_pointer"] - len(chosen)) % len(group["params"])
        for index, param in enumerate(group["params"]):
            state = self.state[param]
            state["active"] = int(index in chosen)
            if not state["active"] or group["reset_state_on_refresh"]:
                for key in ("exp_avg", "exp_avg_sq", "step"):
                    state.pop(key, None)  # inactive tensors hold no Adam state

    def _blockwise_step(self, group) -> None:
        adam_group = {**group, "lr": group["lr"] * group["proj_scale"]}
        for param in group["params"]:
            if param.grad is None:
                continue
            state = self.state[param]
            if state.get("active", 0):
                adamw_step(param, param.grad, state, adam_group)
            else:
                param.mul_(1 - group["lr"] * group["weight_decay"])
                self._state_free(param, param.grad, group)

    def _state_free(self, param, direction, group) -> None:
        lr_free = group["lr"] * group["proj_scale"] * group["state_free_lr_scale"]
        if group["state_free"] == "signsgd":
            param.add_(torch.sign(direction), alpha=-lr_free)
        else:
            param.add_(direction, alpha=-lr_free)

    # ---- subspaces ------------------------------------------------------------------------------
    def _basis(self, param, state):
        if "basis" in state:
            return state["basis"]
        return random_basis(tuple(param.shape), state["side"], state["rank"], state["seed"], param.device)

    def _side_and_rank(self, param, group) -> tuple[int, int]:
        """GaLore's std side, and rank round(density x that side's size)."""
        state = self.state.get(param, {})
        if "side" in state:
            return state["side"], state["rank"]
        shape = tuple(param.shape)
        side = choose_side(shape, "std")
        side_dim = shape[0] if side == LEFT else shape[1]
        return side, basis_rank(shape, round(group["density"] * side_dim))

    def _subspace_step(self, param, state, group, refresh, seed) -> None:
        grad = param.grad
        if "side" not in state:
            state["side"], state["rank"] = self._side_and_rank(param, group)
            state["num_refreshes"] = 0
        param.mul_(1 - group["lr"] * group["weight_decay"])
        if state["rank"] == 0:
            self._state_free(param, grad, group)
            return
        if refresh or state["num_refreshes"] == 0:  # a tensor's first gradient may come between refreshes
            refresh_seed = (seed * 1_000_003 + state["num_refreshes"]) % (1 << 62)
            if group["proj_type"] == "random":
                state["seed"] = refresh_seed
            else:
                generator = torch.Generator().manual_seed(refresh_seed)
                state["basis"] = compute_basis(
                    grad, state["side"], state["rank"], group["proj_type"], generator=generator
                )
            state["num_refreshes"] += 1
            if group["reset_state_on_refresh"]:
                for key in ("exp_avg", "exp_avg_sq", "step"):
                    state.pop(key, None)
        basis = self._basis(param, state)
        low_rank = project(grad.float(), basis, state["side"])
        if "exp_avg" not in state:
            state["step"] = 0
            state["exp_avg"] = torch.zeros_like(low_rank)
            state["exp_avg_sq"] = torch.zeros_like(low_rank)
        state["step"] += 1
        update_moments(state["exp_avg"], state["exp_avg_sq"], low_rank, group["betas"])
        bias1, bias2 = bias_corrections(group["betas"], state["step"], True)
        normalized = state["exp_avg"] / (state["exp_avg_sq"].sqrt() / math.sqrt(bias2)).add_(group["eps"])
        residual = grad.float() - project_back(low_rank, basis, state["side"])
        lr_full = group["lr"] * group["proj_scale"]
        param.add_(project_back(normalized, basis, state["side"]).to(param.dtype), alpha=-lr_full / bias1)
        self._state_free(param, residual.to(param.dtype), group)

    def state_bytes(self) -> int:
        """Exact bytes of optimizer state, bases included (a seeded random basis takes none); 0
        before the first step, since state is created there (see planned_state_bytes)."""
        return sum(v.numel() * v.element_size() for s in self.state.values() for v in s.values() if torch.is_tensor(v))

    def planned_state_bytes(self) -> int:
        """The bytes state_bytes() reports once every parameter has taken a step, computed from
        the shapes and settings alone (usable right after construction): AdamW moments for
        the plain groups and the active tensors (the current window, or the one the first
        renewal will take), fp32 moments and basis for the subspace types (no basis for
        `random`). Between blockwise renewals it stays exact; a later window may hold a few
        bytes more or less."""
        total = 0
        for group in self.param_groups:
            params = group["params"]
            if not group["projectable"]:
                total += 2 * sum(_nbytes(p) for p in params)
            elif group["proj_type"] == "blockwise":
                chosen = [p for p in params if "active" in self.state.get(p, {})]
                if chosen:
                    active = [p for p in chosen if self.state[p]["active"]]
                else:
                    active = [params[index] for index in self._window(group)]
                total += 2 * sum(_nbytes(p) for p in active)
            else:
                for param in params:
                    side, rank = self._side_and_rank(param, group)
                    moment_numel, basis_numel = low_rank_numels(tuple(param.shape), side, rank)
                    basis_numel = 0 if group["proj_type"] == "random" else basis_numel
                    total += (2 * moment_numel + basis_numel) * 4 if rank else 0
        return total


def _nbytes(tensor: torch.Tensor) -> int:
    return tensor.numel() * tensor.element_size()
