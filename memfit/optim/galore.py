"""GaLoreAdamW: AdamW whose moments live in a low-rank projection of each 2-D gradient.

A param group with a `rank` key is projected; other groups run plain AdamW (torch semantics,
eps 1e-8 by default), so galore-torch's param-group form works unchanged. Per projected matrix
the state is the two moments on the larger side (2 * max(m, n) * r) and the basis
(min(m, n) * r; none for the seeded `random` projector, which is regenerated from its seed).

The step per projected matrix W (m x n, gradient G), refreshed every update_proj_gap steps:
    R = project(G)                        # r x n or m x r
    M, V = Adam moments of R              # lerp / addcmul, in place
    N = (M / bias1) / (sqrt(V / bias2) + eps)
    W = (1 - lr * wd) * W - lr * scale * back(N)    # one addmm_, weight decay folded into beta
The basis comes from a randomized range finder unless projector="svd" (exact) or "random" is
asked; the range finder's refresh is about 4x cheaper than the SVD at the same validation loss
(benchmarks/converge.py).

correct_bias=False drops the bias correction (both moments), as in galore-torch.

galore_compat=True reproduces galore-torch 1.0 instead, for projected and plain groups alike
(memfit.optim.hf_adamw; the SVD unless a projector is named): eps defaults to 1e-6 and is not
bias-corrected, weight decay comes after the update with the unscaled lr, and the basis is kept
in the gradient's dtype with the sign the SVD returned. memfit.optim.galore_torch_compat has
the same class under galore-torch's name and arguments.
"""

import functools
import math
import zlib

import torch

from memfit.optim.adam_math import adam_step, bias_corrections, update_moments
from memfit.optim.checks import check_adam_hyperparameters, check_choice, check_flag, check_positive_int
from memfit.optim.contract import KeepsSettings, check_implementation_flags, check_real, dense_grad
from memfit.optim.exact_state import ExactStateLoading
from memfit.optim.groups import warn_nothing_projected
from memfit.optim.hf_adamw import hf_adam_direction, hf_adamw_step, hf_apply
from memfit.optim.projectors import (
    LEFT,
    METHODS,
    PROJ_TYPES,
    basis_rank,
    choose_side,
    compute_basis,
    dtype_bytes,
    low_rank_numels,
    project,
    project_back,
    random_basis,
)

MOMENT_MODES = ("keep", "reset", "project")
GALORE_TORCH_EPS = 1e-6  # galore-torch's (and Hugging Face's legacy AdamW's) default
REDUCED_DTYPES = (torch.bfloat16, torch.float16)


class GaLoreAdamW(KeepsSettings, ExactStateLoading, torch.optim.Optimizer):
    settings = ("galore_compat", "proj_dtype", "seed")

    def __init__(
        self,
        params,
        lr=1e-3,
        betas=(0.9, 0.999),
        eps=None,
        weight_decay=0.0,
        *,
        correct_bias=True,
        rank=None,
        update_proj_gap=200,
        scale=0.25,
        proj_type="std",
        projector=None,
        moments_on_refresh="keep",
        galore_compat=False,
        proj_dtype=torch.float32,
        seed=0,
        foreach=None,
        fused=None,
        differentiable=False,
    ):
        check_implementation_flags(
            "GaLoreAdamW", foreach=foreach, fused=fused, differentiable=differentiable, has_fused=False
        )
        if eps is None:
            eps = GALORE_TORCH_EPS if galore_compat else 1e-8
        check_adam_hyperparameters(lr, betas, eps, weight_decay)
        check_flag("correct_bias", correct_bias)
        if projector is None:
            projector = "svd" if galore_compat else "randomized"
        defaults = dict(
            lr=lr,
            betas=tuple(betas),
            eps=eps,
            weight_decay=weight_decay,
            correct_bias=correct_bias,
            rank=rank,
            update_proj_gap=update_proj_gap,
            scale=scale,
            proj_type=proj_type,
            projector=projector,
            moments_on_refresh=moments_on_refresh,
        )
        if proj_dtype not in (torch.float32, *REDUCED_DTYPES):
            raise ValueError(f"Invalid proj_dtype: {proj_dtype!r} (expected torch.float32, bfloat16 or float16)")
        # The options are checked before any group is: a rank whose share of a model holds no
        # projected tensor must refuse a bad option like one that holds them.
        self._check_projection_options(defaults)
        super().__init__(params, defaults)
        self.galore_compat = galore_compat
        self.proj_dtype = proj_dtype
        self.seed = seed
        if not any(group["rank"] is not None and group["params"] for group in self.param_groups):
            warn_nothing_projected("GaLoreAdamW", "rank")

    def add_param_group(self, param_group: dict) -> None:
        """torch's add_param_group, then the same checks the constructor's groups get; a group
        they refuse is not kept."""
        super().add_param_group(param_group)
        try:
            self._check_group(self.param_groups[-1])
        except ValueError:
            self.param_groups.pop()
            raise

    @staticmethod
    def _check_projection_options(options: dict) -> None:
        if options["rank"] is not None:
            check_positive_int("rank", options["rank"])
        check_positive_int("update_proj_gap", options["update_proj_gap"])
        check_choice("proj_type", options["proj_type"], PROJ_TYPES)
        check_choice("projector", options["projector"], METHODS)
        check_choice("moments_on_refresh", options["moments_on_refresh"], MOMENT_MODES)

    @classmethod
    def _check_group(cls, group) -> None:
        check_adam_hyperparameters(group["lr"], group["betas"], group["eps"], group["weight_decay"])
        check_flag("correct_bias", group["correct_bias"])
        for param in group["params"]:
            check_real("GaLoreAdamW", param)
        if group.get("rank") is None:
            return
        cls._check_projection_options(group)
        for param in group["params"]:
            if param.dim() != 2:
                raise ValueError(f"a group with 'rank' may hold only 2-D tensors, got shape {tuple(param.shape)}")

    @torch.no_grad()
    def step(self, closure=None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group_index, group in enumerate(self.param_groups):
            for param_index, param in enumerate(group["params"]):
                if param.grad is None:
                    continue
                grad = dense_grad("GaLoreAdamW", param)
                state = self.state[param]
                if group.get("rank") is None:
                    (hf_adamw_step if self.galore_compat else adamw_step)(param, grad, state, group)
                else:
                    self._galore_step(param, state, group, param_seed(self.seed, group, group_index, param_index))
        return loss

    def _basis(self, param, state, group):
        if "basis" in state:
            return state["basis"]
        return random_basis(tuple(param.shape), state["side"], state["rank"], state["seed"], param.device).to(
            self.proj_dtype
        )

    def _refresh(self, param, grad, state, group, seed_base):
        if "side" not in state:
            state["side"] = choose_side(tuple(param.shape), group["proj_type"])
            state["rank"] = basis_rank(tuple(param.shape), group["rank"])
            state["num_refreshes"] = 0
        old_basis = (
            self._basis(param, state, group)
            if "exp_avg" in state and group["moments_on_refresh"] == "project"
            else None
        )
        method = group["projector"]
        seed = (seed_base * 1_000_003 + state["num_refreshes"]) % (1 << 62)
        if method == "random":
            state["seed"] = seed
        else:
            generator = torch.Generator().manual_seed(seed)
            dtype = grad.dtype if self.galore_compat else self.proj_dtype
            basis = compute_basis(
                grad, state["side"], state["rank"], method, generator=generator, fix_signs=not self.galore_compat
            )
            state["basis"] = basis.to(dtype)
        state["num_refreshes"] += 1
        if "exp_avg" not in state:
            return
        mode = group["moments_on_refresh"]
        if mode == "reset":
            state["exp_avg"].zero_()
            state["exp_avg_sq"].zero_()
            state["moment_step"] = 0
        elif mode == "project":
            # Carry M into the new basis with C = P_new^T P_old (LEFT) or Q_old Q_new^T (RIGHT);
            # V has no exact rotation: its entries are carried with C squared, which keeps them
            # non-negative and of the right scale.
            new_basis = self._basis(param, state, group).float()
            old = old_basis.float()
            if state["side"] == LEFT:
                change = new_basis.t() @ old  # r x r
                state["exp_avg"].copy_(change @ state["exp_avg"].float())
                state["exp_avg_sq"].copy_(change.pow(2) @ state["exp_avg_sq"].float())
            else:
                change = old @ new_basis.t()  # r x r
                state["exp_avg"].copy_(state["exp_avg"].float() @ change)
                state["exp_avg_sq"].copy_(state["exp_avg_sq"].float() @ change.pow(2))

    def _galore_step(self, param, state, group, seed_base):
        grad = param.grad
        step = state.get("step", 0)
        if step % group["update_proj_gap"] == 0:
            self._refresh(param, grad, state, group, seed_base)
        basis = self._basis(param, state, group)
        if self.galore_compat:
            # galore-torch multiplies by a slice of LAPACK's column-major U or Vh. The same values
            # in row-major order send the products to other GEMM kernels, whose sums round
            # differently on some CPUs (AMD EPYC), so the basis is used column-major, however it
            # was stored or restored.
            basis = basis.t().contiguous().t()
        else:
            basis = basis.to(gemm_dtype(basis))
        low_rank = project(grad.to(basis.dtype), basis, state["side"]).to(grad.dtype)
        if "exp_avg" not in state:
            state["exp_avg"] = torch.zeros_like(low_rank)
            state["exp_avg_sq"] = torch.zeros_like(low_rank)
            state["moment_step"] = 0
        state["step"] = step + 1
        state["moment_step"] += 1
        if self.galore_compat:
            normalized, step_size = hf_adam_direction(state, low_rank, group, state["moment_step"])
            hf_apply(param, project_back(normalized, basis, state["side"]) * group["scale"], step_size, group)
            return
        exp_avg, exp_avg_sq = state["exp_avg"], state["exp_avg_sq"]
        update_moments(exp_avg, exp_avg_sq, low_rank, group["betas"])
        lr, weight_decay, scale = group["lr"], group["weight_decay"], group["scale"]
        bias1, bias2 = bias_corrections(group["betas"], state["moment_step"], group["correct_bias"])
        # (M / bias1) / (sqrt(V / bias2) + eps) == (sqrt(bias2) / bias1) * M / (sqrt(V) + eps sqrt(bias2)):
        # the constants move into addmm's alpha, saving a pass over the low-rank state.
        root_bias2 = math.sqrt(bias2)
        normalized = exp_avg / exp_avg_sq.sqrt().add_(group["eps"] * root_bias2)
        apply_back(
            param, normalized, basis, state["side"], beta=1 - lr * weight_decay, alpha=-lr * scale * root_bias2 / bias1
        )

    def state_bytes(self) -> int:
        """Exact bytes of optimizer state, bases included (a seeded random basis takes none); 0
        before the first step, since state is created there (see planned_state_bytes)."""
        return sum(v.numel() * v.element_size() for s in self.state.values() for v in s.values() if torch.is_tensor(v))

    def planned_state_bytes(self) -> int:
        """The bytes state_bytes() reports once every parameter has taken a step, computed from
        the shapes and settings alone (usable right after construction): plain tensors two
        moments of their own size; projected ones two moments of the projected size in the
        parameter's dtype and, unless the projector is `random`, the basis in proj_dtype (in
        the gradient's dtype with galore_compat)."""
        total = 0
        for group in self.param_groups:
            for param in group["params"]:
                if group["rank"] is None:
                    total += 2 * param.numel() * param.element_size()
                    continue
                state, shape = self.state.get(param, {}), tuple(param.shape)
                side = state.get("side", choose_side(shape, group["proj_type"]))
                rank = state.get("rank", basis_rank(shape, group["rank"]))
                moment_numel, basis_numel = low_rank_numels(shape, side, rank)
                total += 2 * moment_numel * param.element_size()
                if group["projector"] != "random":
                    total += basis_numel * dtype_bytes(param.dtype if self.galore_compat else self.proj_dtype)
        return total


def param_seed(base_seed: int, group: dict, group_index: int, param_index: int) -> int:
    """A per-parameter seed: from the parameter's name when the group carries `names` (as memfit's
    engine and the group helpers do), so a sharded optimizer draws the same numbers as an
    unsharded one; else from its shape, so a group draws the same numbers wherever it sits (built
    in the constructor or added with add_param_group). group_index is kept for callers' sake."""
    names = group.get("names")
    if names:
        key = names[param_index]
    else:
        key = "x".join(str(size) for size in group["params"][param_index].shape)
    return (base_seed * 1_000_003 + zlib.crc32(key.encode())) % (1 << 62)


@functools.cache
def _cpu_has_native(dtype: torch.dtype) -> bool:
    check = (
        torch.ops.mkldnn._is_mkldnn_bf16_supported
        if dtype == torch.bfloat16
        else torch.ops.mkldnn._is_mkldnn_fp16_supported
    )
    return bool(check())


def gemm_dtype(basis: torch.Tensor) -> torch.dtype:
    """The dtype the projection matmuls run in: the basis's own, except a bf16/fp16 basis on a CPU
    without native bf16/fp16 GEMM (no AVX512-BF16/AMX), where those GEMMs run several times slower
    than float32; there the basis is widened to float32 for the matmul (the stored basis stays
    reduced, so the memory saving remains)."""
    if basis.dtype in REDUCED_DTYPES and basis.device.type == "cpu" and not _cpu_has_native(basis.dtype):
        return torch.float32
    return basis.dtype


def apply_back(param, normalized, basis, side, *, beta, alpha) -> None:
    """param = beta * param + alpha * back(normalized), as one addmm_ (no full-size temporary)."""
    normalized = normalized.to(basis.dtype)
    if basis.dtype in REDUCED_DTYPES and basis.device.type == "cpu":
        # CPU bf16/fp16 GEMM takes a fast path only when the two operands' layouts differ; both
        # row-major (basis and the moments) runs about 15x slower. Transposing the small factor
        # costs one r x max(m, n) copy.
        normalized = normalized.t().contiguous().t()
    if param.dtype == basis.dtype:
        if side == LEFT:
            param.addmm_(basis, normalized, beta=beta, alpha=alpha)
        else:
            param.addmm_(normalized, basis, beta=beta, alpha=alpha)
        return
    update = basis @ normalized if side == LEFT else normalized @ basis
    param.mul_(beta).add_(update.to(param.dtype), alpha=alpha)


def adamw_step(param, grad, state, group) -> None:
    """torch.optim.AdamW's single-tensor step, same operations in the same order (a group with
    correct_bias false, GaLoreAdamW's option, skips the bias correction)."""
    adam_step(param, grad, state, group, bias_correction=group.get("correct_bias", True))
