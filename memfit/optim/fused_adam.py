"""The fused CPU Adam/AdamW step on flat buffers, for CPUAdamW and for the engine's offload tier.

One pass over memory per step: it reads the fp32 master, exp_avg, exp_avg_sq and the gradient
(fp32, bf16 or fp16) and writes the master, the moments and, optionally, the parameter rounded to
bf16/fp16 into a separate buffer. A gradient scale (loss un-scaling, clipping) is multiplied in,
and whether any scaled gradient element was inf or nan is returned. Per element, in float32:

    g = grad * grad_scale
    g = g + weight_decay * p                 (Adam mode: L2 decay through the gradient)
    m = m + (1 - beta1) * (g - m)
    v = beta2 * v + (1 - beta2) * g * g
    p = p * (1 - lr * weight_decay)          (AdamW mode: decoupled decay)
        - lr / bias1 * m / (sqrt(v) / sqrt(bias2) + eps)

bias1 = 1 - beta1^step and bias2 = 1 - beta2^step, or 1 without bias correction.

The kernel (csrc/adam, through memfit._C) runs AVX-512F, AVX2+FMA or scalar code chosen from the
CPU at import; MEMFIT_ADAM_ISA=torch|scalar|avx2|avx512 forces a level, as does set_adam_isa().
Every native level and thread count computes the same bits. "torch" is the fallback written
with torch operations (used under MEMFIT_NO_EXT=1 or without a built extension): the same
formulas, but rounded after each torch operation, so its results differ in the last bits.

Non-finite gradients: nonfinite="update" steps anyway and reports; "check" only reads the
gradients; "skip" checks every gradient first and then updates only when all are finite. The
check reads the gradients alone (2 or 4 bytes per element against the update's 28), so "skip"
moves 7% (bf16 gradients) to 14% (fp32) more bytes than "update" and never touches the state
twice; updating first and rolling back would rewrite all of it.

fused_adam_step steps one tensor. step_tensors steps many in one call, with the threads spread
over all their elements and one non-finite decision for all of them (what a rank's offload tier
wants for its whole shard); adam_constants gives it the per-step constants.
"""

import array
import math
import os
import warnings

import torch

from memfit.optim.adam_math import blend_moments

ISAS = ("torch", "scalar", "avx2", "avx512")
NONFINITE_MODES = ("update", "skip", "check")
GRAD_DTYPES = (torch.float32, torch.bfloat16, torch.float16)
OUT_DTYPES = (torch.bfloat16, torch.float16)
_DTYPE_CODES = {torch.float32: 0, torch.bfloat16: 1, torch.float16: 2, None: 3}
_FALLBACK_CHUNK = 1 << 16  # elements per torch operation in the fallback: bounds its temporaries


def _load_extension():
    if os.environ.get("MEMFIT_NO_EXT") == "1":
        return None
    try:
        from memfit import _C
    except ImportError as error:
        warnings.warn(f"memfit native extension unavailable ({error}); the Adam step uses torch", stacklevel=3)
        return None
    if not hasattr(_C, "adam_step"):
        warnings.warn(
            "memfit._C was built before the fused Adam kernel existed (rebuild: python setup.py build_ext "
            "--inplace); the Adam step uses torch",
            stacklevel=3,
        )
        return None
    return _C


_C = _load_extension()
_use_torch = _C is None


def available_adam_isas() -> tuple[str, ...]:
    """The levels this process can run, slowest first; "torch" is always there."""
    return ("torch",) if _C is None else ("torch", *_C.adam_supported_isas())


def adam_isa() -> str:
    """The level fused_adam_step runs now."""
    return "torch" if _use_torch else _C.adam_isa()


def set_adam_isa(name: str) -> None:
    """Selects a level for the whole process: "auto" (the fastest), or one of available_adam_isas()."""
    global _use_torch
    if name != "auto" and name not in ISAS:
        raise ValueError(f"isa: unknown level {name!r}; choose from auto, {', '.join(ISAS)}")
    available = available_adam_isas()
    if name not in ("auto", *available):
        raise ValueError(f"isa: {name!r} is not available on this machine; available: {', '.join(available)}")
    if name == "auto":
        name = available[-1]
    _use_torch = name == "torch"
    if not _use_torch:
        _C.adam_set_isa(name)


def _apply_environment() -> None:
    requested = os.environ.get("MEMFIT_ADAM_ISA", "auto")
    if requested != "auto" and requested not in ISAS:
        raise ValueError(f"MEMFIT_ADAM_ISA: unknown level {requested!r}; choose from auto, {', '.join(ISAS)}")
    if requested not in ("auto", *available_adam_isas()):
        warnings.warn(
            f"MEMFIT_ADAM_ISA={requested} is not available on this machine; using {available_adam_isas()[-1]}",
            stacklevel=3,
        )
        requested = "auto"
    set_adam_isa(requested)


_apply_environment()


def adam_constants(
    *, step, lr, beta1, beta2, eps, weight_decay, adamw_mode, bias_correction, grad_scale
) -> list[float]:
    """The per-step constants in the kernel's order (csrc/adam/adam.h, Constants), in double; the
    kernel rounds each to float once."""
    bias1 = 1.0 - beta1**step if bias_correction else 1.0
    bias2 = 1.0 - beta2**step if bias_correction else 1.0
    return [
        grad_scale,
        0.0 if adamw_mode else weight_decay,
        1.0 - beta1,
        beta2,
        1.0 - beta2,
        1.0 / math.sqrt(bias2),
        eps,
        -lr / bias1,
        1.0 - lr * weight_decay if adamw_mode else 1.0,
    ]


def check_step_options(*, step, lr, beta1, beta2, eps, weight_decay, grad_scale, nonfinite, num_threads) -> None:
    if not _is_positive_int(step):
        raise ValueError(f"step: must be an integer >= 1, got {step}")
    for name, value in (("lr", lr), ("eps", eps), ("weight_decay", weight_decay), ("grad_scale", grad_scale)):
        if not (isinstance(value, (int, float)) and math.isfinite(value) and value >= 0):
            raise ValueError(f"{name}: must be a finite number >= 0, got {value}")
    for name, value in (("beta1", beta1), ("beta2", beta2)):
        if not (isinstance(value, (int, float)) and 0.0 <= value < 1.0):
            raise ValueError(f"{name}: must be in [0, 1), got {value}")
    if nonfinite not in NONFINITE_MODES:
        raise ValueError(f"nonfinite: must be one of {', '.join(map(repr, NONFINITE_MODES))}, got {nonfinite!r}")
    if num_threads is not None and not _is_positive_int(num_threads):
        raise ValueError(f"num_threads: must be an integer >= 1, got {num_threads}")


def _is_positive_int(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= 1


def check_buffers(master, grad, exp_avg, exp_avg_sq, param_out) -> None:
    """Raises ValueError naming the first argument that the kernel cannot take as it is."""
    named = {"master": master, "grad": grad, "exp_avg": exp_avg, "exp_avg_sq": exp_avg_sq}
    if param_out is not None:
        named["param_out"] = param_out
    allowed = {"master": (torch.float32,), "grad": GRAD_DTYPES, "exp_avg": (torch.float32,)}
    allowed.update(exp_avg_sq=(torch.float32,), param_out=OUT_DTYPES)
    for name, tensor in named.items():
        if not isinstance(tensor, torch.Tensor):
            raise ValueError(f"{name}: must be a torch.Tensor, got {type(tensor).__name__}")
        if tensor.layout != torch.strided:
            raise ValueError(f"{name}: must be a dense tensor, got {tensor.layout}")
        if tensor.device.type != "cpu":
            raise ValueError(f"{name}: must be on the CPU, got {tensor.device}")
        if tensor.dtype not in allowed[name]:
            expected = allowed[name][0] if len(allowed[name]) == 1 else "one of " + ", ".join(map(str, allowed[name]))
            raise ValueError(f"{name}: must be {expected}, got {tensor.dtype}")
        if tensor.numel() != master.numel():
            raise ValueError(f"{name}: has {tensor.numel()} elements, master has {master.numel()}")
        if not tensor.is_contiguous():
            raise ValueError(f"{name}: is not contiguous (pass .contiguous() or a flat buffer)")
    spans = [(name, t.data_ptr(), t.data_ptr() + t.numel() * t.element_size()) for name, t in named.items()]
    for index, (name, start, end) in enumerate(spans):
        for other, other_start, other_end in spans[:index]:
            if start < other_end and other_start < end:
                raise ValueError(f"{name}: overlaps {other}; every buffer needs its own memory")


def fused_adam_step(
    master: torch.Tensor,
    grad: torch.Tensor,
    exp_avg: torch.Tensor,
    exp_avg_sq: torch.Tensor,
    *,
    step: int,
    lr: float,
    beta1: float,
    beta2: float,
    eps: float,
    weight_decay: float,
    adamw_mode: bool = True,
    bias_correction: bool = True,
    grad_scale: float = 1.0,
    param_out: torch.Tensor | None = None,
    nonfinite: str = "update",
    num_threads: int | None = None,
) -> bool:
    """One Adam (adamw_mode=False: L2) or AdamW step of one tensor, in place; returns True when the
    scaled gradient held an inf or nan (see the module docstring for nonfinite).

    master, exp_avg, exp_avg_sq: float32; grad: float32, bfloat16 or float16; param_out: None or a
    bfloat16/float16 buffer that receives the updated master rounded to nearest even. All on the
    CPU, contiguous, with the same number of elements (shapes may differ) and no shared memory.
    step counts from 1 and drives bias correction. num_threads defaults to torch.get_num_threads().
    """
    check_step_options(
        step=step,
        lr=lr,
        beta1=beta1,
        beta2=beta2,
        eps=eps,
        weight_decay=weight_decay,
        grad_scale=grad_scale,
        nonfinite=nonfinite,
        num_threads=num_threads,
    )
    check_buffers(master, grad, exp_avg, exp_avg_sq, param_out)
    constants = adam_constants(
        step=step,
        lr=lr,
        beta1=beta1,
        beta2=beta2,
        eps=eps,
        weight_decay=weight_decay,
        adamw_mode=adamw_mode,
        bias_correction=bias_correction,
        grad_scale=grad_scale,
    )
    written = [master, exp_avg, exp_avg_sq] + ([] if param_out is None else [param_out])
    result = step_tensors([(master, grad, exp_avg, exp_avg_sq, param_out)], constants, nonfinite, num_threads)
    for tensor in written:
        torch.autograd.graph.increment_version(tensor)
    return result


def step_tensors(rows, constants: list[float], nonfinite: str = "update", num_threads: int | None = None) -> bool:
    """Steps many tensors in one kernel call, threads spread over all their elements. rows:
    (master, grad, exp_avg, exp_avg_sq, param_out or None) tuples already checked as
    fused_adam_step checks them, all with the gradient dtype and the param_out dtype of the first
    row. The caller bumps autograd versions if it needs them."""
    if num_threads is None:
        num_threads = torch.get_num_threads()
    if _use_torch:
        return _torch_step(rows, constants, nonfinite)
    addresses = []
    for master, grad, exp_avg, exp_avg_sq, param_out in rows:
        out_address = 0 if param_out is None else param_out.data_ptr()
        addresses += (master.data_ptr(), grad.data_ptr(), exp_avg.data_ptr(), exp_avg_sq.data_ptr(), out_address)
        addresses.append(master.numel())
    table = array.array("q", addresses)  # rows of six int64: adam::TensorBuffers
    out = rows[0][4]
    return _C.adam_step(
        table.buffer_info()[0],
        len(rows),
        _DTYPE_CODES[rows[0][1].dtype],
        _DTYPE_CODES[None if out is None else out.dtype],
        constants,
        NONFINITE_MODES.index(nonfinite),
        num_threads,
    )


def _torch_step(rows, constants: list[float], nonfinite: str) -> bool:
    """The same formulas with torch operations, in chunks so temporaries stay small."""
    grad_scale, l2, one_minus_beta1, beta2, one_minus_beta2, inv_sqrt_bias2, eps, neg_step_size, decay = constants
    flat_rows = [[None if t is None else t.view(-1) for t in row] for row in rows]

    def scaled(grad_chunk):
        return grad_chunk.to(torch.float32, copy=True).mul_(grad_scale)

    def chunks(numel):
        return (slice(start, start + _FALLBACK_CHUNK) for start in range(0, numel, _FALLBACK_CHUNK))

    if nonfinite != "update":
        found = any(
            not torch.isfinite(scaled(grad[part])).all() for _, grad, *_ in flat_rows for part in chunks(grad.numel())
        )
        if found or nonfinite == "check":
            return found
    found = False
    for master, grad, exp_avg, exp_avg_sq, param_out in flat_rows:
        for part in chunks(master.numel()):
            g = scaled(grad[part])
            found = found or not bool(torch.isfinite(g).all())
            p, m, v = master[part], exp_avg[part], exp_avg_sq[part]
            if l2:
                g.add_(p, alpha=l2)
            blend_moments(m, v, g, one_minus_beta1, beta2, one_minus_beta2)
            denom = v.sqrt().mul_(inv_sqrt_bias2).add_(eps)
            p.mul_(decay).addcdiv_(m, denom, value=neg_step_size)
            if param_out is not None:
                param_out[part].copy_(p)
    return found
