"""The fused Adam step (memfit.optim.fused_adam) against a float64 reference of its own formulas,
bit-identity across dispatch levels and thread counts, inf/nan detection and argument checks.

The reference evaluates the documented formulas exactly (float64 from the float32 inputs and the
float32-rounded constants); the kernel rounds after every operation, so each result may differ
by a few units in the last place of the largest term that went into it. The bounds below are
4 such ulps for exp_avg and exp_avg_sq and 8 for the parameter (its update goes through a
sqrt, a fused multiply-add and a division first)."""

import functools
import itertools
import math
import os
import re
import subprocess
import sys
import time

import numpy as np
import pytest
import torch

from memfit.optim import fused_adam
from memfit.optim.fused_adam import (
    adam_constants,
    adam_isa,
    available_adam_isas,
    fused_adam_step,
    set_adam_isa,
    step_tensors,
)

SIZES = [0, 1, 15, 16, 17, 1023, 2**20 + 3]
GRAD_DTYPES = [torch.float32, torch.bfloat16, torch.float16]
OUT_DTYPES = [None, torch.bfloat16, torch.float16]
NATIVE_ISAS = [isa for isa in available_adam_isas() if isa != "torch"]
# (adamw_mode, bias_correction, grad_scale): each mode with and without bias correction, and a
# gradient scale other than one in each mode.
VARIANTS = [(True, True, 1.0), (True, False, 2.5), (False, True, 1.0), (False, False, 0.37)]
HYPER = dict(lr=3e-3, beta1=0.9, beta2=0.999, eps=1e-8, weight_decay=0.1)
ULP = 2.0**-23


@pytest.fixture
def use_isa(request):
    before = adam_isa()
    set_adam_isa(request.param)
    yield request.param
    set_adam_isa(before)


def make_buffers(numel, grad_dtype, out_dtype, seed=0):
    """Fresh copies of the same random buffers for the same arguments (generating is the slow part)."""
    return [None if t is None else t.clone() for t in _random_buffers(numel, grad_dtype, out_dtype, seed)]


@functools.lru_cache(maxsize=16)
def _random_buffers(numel, grad_dtype, out_dtype, seed):
    generator = torch.Generator().manual_seed(seed)
    master = torch.randn(numel, generator=generator)
    # Gradients over many magnitudes, as they come out of a network; finite in float16 too.
    grad = torch.randn(numel, generator=generator) * torch.exp(torch.randn(numel, generator=generator) * 3)
    grad = grad.clamp(-60000.0, 60000.0)
    exp_avg = torch.randn(numel, generator=generator) * 0.1
    exp_avg_sq = torch.rand(numel, generator=generator) * 0.01
    out = None if out_dtype is None else torch.empty(numel, dtype=out_dtype)
    return master, grad.to(grad_dtype), exp_avg, exp_avg_sq, out


def reference(
    master,
    grad,
    exp_avg,
    exp_avg_sq,
    *,
    step,
    adamw_mode,
    bias_correction,
    grad_scale,
    lr,
    beta1,
    beta2,
    eps,
    weight_decay,
):
    """The documented formulas in float64, with each constant rounded to float32 as the kernel does."""

    def f32(value):
        return float(np.float32(value))

    bias1 = 1 - beta1**step if bias_correction else 1.0
    bias2 = 1 - beta2**step if bias_correction else 1.0
    l2 = f32(0.0 if adamw_mode else weight_decay)
    decay = f32(1 - lr * weight_decay if adamw_mode else 1.0)
    p, m, v = (t.double().numpy() for t in (master, exp_avg, exp_avg_sq))
    scaled = grad.double().numpy() * f32(grad_scale)
    g = scaled + l2 * p
    new_m = m + f32(1 - beta1) * (g - m)
    new_v = f32(beta2) * v + f32(1 - beta2) * g * g
    denom = np.sqrt(new_v) * f32(1 / math.sqrt(bias2)) + f32(eps)
    step_term = f32(-lr / bias1) * new_m / denom
    new_p = p * decay + step_term
    # Error bounds in ulps of the terms that went in: g may cancel (L2), so its magnitude is that
    # of its parts, and a rounding in v moves the denominator by v's terms over v.
    g_size = np.abs(scaled) + np.abs(l2 * p)
    m_size = np.abs(m) + g_size
    v_size = f32(beta2) * v + f32(1 - beta2) * g_size * g_size
    bounds = {
        "exp_avg": 4 * ULP * m_size,
        "exp_avg_sq": 4 * ULP * v_size,
        "master": 8
        * ULP
        * (np.abs(p * decay) + abs(f32(-lr / bias1)) * m_size / denom + np.abs(step_term) * (1 + v_size / new_v)),
    }
    return {"master": new_p, "exp_avg": new_m, "exp_avg_sq": new_v}, bounds


def bits(tensor):
    return tensor.view(torch.int16 if tensor.element_size() == 2 else torch.int32)


def reference_cases():
    """Every size, dtype pair and variant, except that the large size takes one variant per dtype
    pair (in turn), which keeps the suite fast."""
    cases = []
    for numel in SIZES:
        for index, (grad_dtype, out_dtype) in enumerate(itertools.product(GRAD_DTYPES, OUT_DTYPES)):
            variants = VARIANTS if numel < 2**20 else [VARIANTS[index % len(VARIANTS)]]
            cases += [
                pytest.param(numel, grad_dtype, out_dtype, *variant, id=f"{numel}-{grad_dtype}-{out_dtype}-{variant}")
                for variant in variants
            ]
    return cases


@pytest.mark.parametrize("use_isa", available_adam_isas(), indirect=True)
@pytest.mark.parametrize("numel,grad_dtype,out_dtype,adamw_mode,bias_correction,grad_scale", reference_cases())
def test_matches_float64_reference(use_isa, numel, grad_dtype, out_dtype, adamw_mode, bias_correction, grad_scale):
    master, grad, exp_avg, exp_avg_sq, out = make_buffers(numel, grad_dtype, out_dtype)
    options = dict(step=3, adamw_mode=adamw_mode, bias_correction=bias_correction, grad_scale=grad_scale, **HYPER)
    expected, bounds = reference(master, grad, exp_avg, exp_avg_sq, **options)
    grad_before = grad.clone()
    nonfinite = fused_adam_step(master, grad, exp_avg, exp_avg_sq, param_out=out, num_threads=2, **options)
    assert nonfinite is False
    assert torch.equal(bits(grad), bits(grad_before)), "the gradient is read-only"
    for name, actual in (("master", master), ("exp_avg", exp_avg), ("exp_avg_sq", exp_avg_sq)):
        error = np.abs(actual.double().numpy() - expected[name])
        worst = int(np.argmax(error - bounds[name])) if numel else 0
        assert np.all(error <= bounds[name]), (
            f"{name}[{worst}]: off by {error[worst]:.3g}, bound {bounds[name][worst]:.3g}"
        )
    if out is not None:
        assert torch.equal(bits(out), bits(master.to(out_dtype))), "param_out is master rounded to nearest even"


@pytest.mark.parametrize("numel", SIZES)
@pytest.mark.parametrize("grad_dtype", GRAD_DTYPES, ids=str)
@pytest.mark.parametrize("out_dtype", OUT_DTYPES, ids=str)
def test_bit_identical_across_levels_and_threads(numel, grad_dtype, out_dtype):
    before = adam_isa()
    results = {}
    try:
        for isa in NATIVE_ISAS:
            set_adam_isa(isa)
            for num_threads in (1, 2, 3):
                for adamw_mode in (True, False):
                    master, grad, exp_avg, exp_avg_sq, out = make_buffers(numel, grad_dtype, out_dtype, seed=numel)
                    options = dict(step=7, adamw_mode=adamw_mode, bias_correction=True, grad_scale=0.5, **HYPER)
                    fused_adam_step(
                        master, grad, exp_avg, exp_avg_sq, param_out=out, num_threads=num_threads, **options
                    )
                    outputs = [master, exp_avg, exp_avg_sq] + ([] if out is None else [out])
                    results[(isa, num_threads, adamw_mode)] = [bits(t).clone() for t in outputs]
    finally:
        set_adam_isa(before)
    for (isa, num_threads, adamw_mode), outputs in results.items():
        baseline = results[("scalar", 1, adamw_mode)]
        for name, actual, expected in zip(["master", "exp_avg", "exp_avg_sq", "param_out"], outputs, baseline):
            assert torch.equal(actual, expected), f"{name} differs: {isa} with {num_threads} threads vs scalar with 1"


@pytest.mark.parametrize("use_isa", available_adam_isas(), indirect=True)
@pytest.mark.parametrize("out_dtype", [torch.bfloat16, torch.float16], ids=str)
def test_param_out_rounds_like_torch_on_hard_values(use_isa, out_dtype):
    """With lr = 0 the master is unchanged and param_out is its 16-bit rounding: ties, subnormals,
    values that round up to the next binade or to inf, signed zeros."""
    info = torch.finfo(out_dtype)
    ties = torch.tensor([1.0 + k * 2.0**-8 for k in range(1, 8)] + [1.0 + k * 2.0**-11 for k in range(1, 8)])
    specials = torch.tensor(
        [
            0.0,
            -0.0,
            65504.0,
            65519.0,
            65520.0,
            70000.0,
            -65520.0,
            1e-8,
            2.0**-25,
            2.0**-24,
            3 * 2.0**-26,
            6e-5,
            6.1e-5,
            3.0e38,
        ]
    )
    specials = torch.cat(
        [specials, torch.tensor([float(info.max), float(info.tiny), float(info.tiny) / 3, 1.0 - 2.0**-20])]
    )
    generator = torch.Generator().manual_seed(1)
    spread = torch.randn(4099, generator=generator) * torch.exp2(
        torch.randint(-30, 20, (4099,), generator=generator).float()
    )
    master = torch.cat([ties, -ties, specials, spread])
    numel = master.numel()
    out = torch.empty(numel, dtype=out_dtype)
    grad, exp_avg, exp_avg_sq = torch.zeros(numel), torch.zeros(numel), torch.ones(numel)
    expected = master.clone()
    fused_adam_step(
        master,
        grad,
        exp_avg,
        exp_avg_sq,
        step=1,
        lr=0.0,
        beta1=0.9,
        beta2=0.999,
        eps=1e-8,
        weight_decay=0.0,
        param_out=out,
    )
    assert torch.equal(bits(master), bits(expected))
    assert torch.equal(bits(out), bits(expected.to(out_dtype)))


@pytest.mark.parametrize("use_isa", available_adam_isas(), indirect=True)
@pytest.mark.parametrize("grad_dtype", GRAD_DTYPES, ids=str)
@pytest.mark.parametrize("bad_value", [float("nan"), float("inf"), float("-inf")])
@pytest.mark.parametrize("position", [0, 500, 1022])  # first vector, a middle one, the scalar tail
def test_nonfinite_gradient_is_reported_in_every_mode(use_isa, grad_dtype, bad_value, position):
    options = dict(step=2, **HYPER)
    master, grad, exp_avg, exp_avg_sq, out = make_buffers(1023, grad_dtype, torch.bfloat16)
    grad[position] = bad_value
    before = [t.clone() for t in (master, exp_avg, exp_avg_sq, out)]
    for mode in ("check", "skip"):
        assert fused_adam_step(master, grad, exp_avg, exp_avg_sq, param_out=out, nonfinite=mode, **options) is True
        for after, saved in zip((master, exp_avg, exp_avg_sq, out), before):
            assert torch.equal(bits(after), bits(saved)), f"nonfinite={mode!r} wrote a buffer"
    assert fused_adam_step(master, grad, exp_avg, exp_avg_sq, param_out=out, nonfinite="update", **options) is True
    assert not torch.isfinite(master[position]), "update mode applies the step anyway"
    finite = torch.ones(1023, dtype=torch.bool)
    finite[position] = False
    assert torch.isfinite(master[finite]).all(), "one bad element spoils only its own position"


@pytest.mark.parametrize("use_isa", available_adam_isas(), indirect=True)
def test_finite_gradients_skip_mode_updates_like_update_mode(use_isa):
    options = dict(step=4, **HYPER)
    first = make_buffers(2**20 + 3, torch.bfloat16, torch.bfloat16, seed=5)
    second = make_buffers(2**20 + 3, torch.bfloat16, torch.bfloat16, seed=5)
    master, grad, exp_avg, exp_avg_sq, out = first
    assert (
        fused_adam_step(master, grad, exp_avg, exp_avg_sq, param_out=out, nonfinite="update", num_threads=3, **options)
        is False
    )
    master2, grad2, exp_avg2, exp_avg_sq2, out2 = second
    assert (
        fused_adam_step(
            master2, grad2, exp_avg2, exp_avg_sq2, param_out=out2, nonfinite="skip", num_threads=3, **options
        )
        is False
    )
    for a, b in zip(first, second):
        assert torch.equal(bits(a), bits(b))
    saved = master.clone()
    assert (
        fused_adam_step(master, grad, exp_avg, exp_avg_sq, param_out=out, nonfinite="check", num_threads=3, **options)
        is False
    )
    assert torch.equal(bits(master), bits(saved)), "check mode never writes"


@pytest.mark.parametrize("use_isa", available_adam_isas(), indirect=True)
def test_nonfinite_in_the_last_thread_share_and_after_scaling(use_isa):
    master, grad, exp_avg, exp_avg_sq, _ = make_buffers(2**20 + 3, torch.float32, None)
    grad[-1] = float("nan")
    assert fused_adam_step(master, grad, exp_avg, exp_avg_sq, step=1, nonfinite="check", num_threads=3, **HYPER) is True
    grad[-1] = 3e38  # finite, but the scaled gradient overflows
    assert (
        fused_adam_step(master, grad, exp_avg, exp_avg_sq, step=1, nonfinite="check", num_threads=3, **HYPER) is False
    )
    assert (
        fused_adam_step(
            master, grad, exp_avg, exp_avg_sq, step=1, grad_scale=4.0, nonfinite="check", num_threads=3, **HYPER
        )
        is True
    )


@pytest.mark.parametrize("use_isa", available_adam_isas(), indirect=True)
def test_empty_buffers_are_a_no_op(use_isa):
    master, grad, exp_avg, exp_avg_sq, out = make_buffers(0, torch.bfloat16, torch.float16)
    assert fused_adam_step(master, grad, exp_avg, exp_avg_sq, param_out=out, step=1, **HYPER) is False


def valid_buffers():
    return dict(master=torch.zeros(8), grad=torch.zeros(8), exp_avg=torch.zeros(8), exp_avg_sq=torch.zeros(8))


@pytest.mark.parametrize(
    "change,message",
    [
        (dict(master=torch.zeros(8, dtype=torch.float64)), "master: must be torch.float32, got torch.float64"),
        (dict(exp_avg=torch.zeros(8, dtype=torch.bfloat16)), "exp_avg: must be torch.float32, got torch.bfloat16"),
        (dict(exp_avg_sq=torch.zeros(8, dtype=torch.float16)), "exp_avg_sq: must be torch.float32"),
        (
            dict(grad=torch.zeros(8, dtype=torch.int32)),
            "grad: must be one of torch.float32, torch.bfloat16, torch.float16, got torch.int32",
        ),
        (dict(param_out=torch.zeros(8)), "param_out: must be one of torch.bfloat16, torch.float16, got torch.float32"),
        (dict(grad=torch.zeros(9)), "grad: has 9 elements, master has 8"),
        (dict(exp_avg_sq=torch.zeros(7)), "exp_avg_sq: has 7 elements, master has 8"),
        (dict(param_out=torch.zeros(4, dtype=torch.bfloat16)), "param_out: has 4 elements, master has 8"),
        (dict(exp_avg=torch.zeros(4, 4).t()[:2]), "exp_avg: is not contiguous"),
        (dict(grad=torch.zeros(16)[::2]), "grad: is not contiguous"),
        (dict(grad=torch.zeros(8, device="meta")), "grad: must be on the CPU, got meta"),
        (dict(master=torch.zeros(8, device="meta")), "master: must be on the CPU, got meta"),
        (dict(grad=[0.0] * 8), "grad: must be a torch.Tensor, got list"),
        (dict(grad=torch.zeros(8).to_sparse()), "grad: must be a dense tensor, got torch.sparse_coo"),
    ],
)
def test_bad_buffers_raise_value_error_naming_the_argument(change, message):
    arguments = {**valid_buffers(), **change}
    with pytest.raises(ValueError, match="^" + re.escape(message)):
        fused_adam_step(**arguments, step=1, **HYPER)


def test_overlapping_buffers_are_refused():
    storage = torch.zeros(16)
    arguments = valid_buffers()
    with pytest.raises(ValueError, match="^exp_avg: overlaps master"):
        fused_adam_step(**{**arguments, "exp_avg": arguments["master"]}, step=1, **HYPER)
    with pytest.raises(ValueError, match="^exp_avg_sq: overlaps exp_avg"):
        fused_adam_step(**{**arguments, "exp_avg": storage[:8], "exp_avg_sq": storage[4:12]}, step=1, **HYPER)
    with pytest.raises(ValueError, match="^param_out: overlaps master"):
        fused_adam_step(**{**arguments, "param_out": arguments["master"].view(torch.bfloat16)[:8]}, step=1, **HYPER)


@pytest.mark.parametrize(
    "change,message",
    [
        (dict(step=0), "step: must be an integer >= 1, got 0"),
        (dict(step=1.5), "step: must be an integer >= 1, got 1.5"),
        (dict(lr=-1.0), "lr: must be a finite number >= 0, got -1.0"),
        (dict(lr=float("nan")), "lr: must be a finite number >= 0, got nan"),
        (dict(beta1=1.0), "beta1: must be in [0, 1), got 1.0"),
        (dict(beta2=-0.1), "beta2: must be in [0, 1), got -0.1"),
        (dict(eps=-1e-8), "eps: must be a finite number >= 0, got -1e-08"),
        (dict(weight_decay=float("inf")), "weight_decay: must be a finite number >= 0, got inf"),
        (dict(grad_scale=float("nan")), "grad_scale: must be a finite number >= 0, got nan"),
        (dict(grad_scale=-2.0), "grad_scale: must be a finite number >= 0, got -2.0"),
        (dict(nonfinite="ignore"), "nonfinite: must be one of 'update', 'skip', 'check', got 'ignore'"),
        (dict(num_threads=0), "num_threads: must be an integer >= 1, got 0"),
    ],
)
def test_bad_hyperparameters_raise_value_error_naming_the_argument(change, message):
    options = {"step": 1, **HYPER, **change}
    with pytest.raises(ValueError, match="^" + re.escape(message)):
        fused_adam_step(**valid_buffers(), **options)


def test_set_adam_isa_refuses_unknown_levels():
    with pytest.raises(ValueError, match="^isa: unknown level 'sse9'"):
        set_adam_isa("sse9")
    assert available_adam_isas()[0] == "torch"


def run_python(code, **env):
    environment = {**os.environ, **env}
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, env=environment)


@pytest.mark.parametrize("level", available_adam_isas())
def test_environment_variable_forces_a_level(level, monkeypatch):
    before = adam_isa()
    monkeypatch.setenv("MEMFIT_ADAM_ISA", level)
    try:
        fused_adam._apply_environment()  # what importing the module runs
        assert adam_isa() == level
    finally:
        set_adam_isa(before)


def test_environment_variable_with_an_unknown_level_is_an_error(monkeypatch):
    monkeypatch.setenv("MEMFIT_ADAM_ISA", "avx1024")
    with pytest.raises(ValueError, match="^MEMFIT_ADAM_ISA: unknown level 'avx1024'"):
        fused_adam._apply_environment()


@pytest.mark.skipif("avx512" in available_adam_isas(), reason="this CPU has every level")
def test_environment_variable_with_an_unavailable_level_warns_and_uses_the_best(monkeypatch):
    monkeypatch.setenv("MEMFIT_ADAM_ISA", "avx512")
    with pytest.warns(UserWarning, match="MEMFIT_ADAM_ISA=avx512 is not available"):
        fused_adam._apply_environment()
    assert adam_isa() == available_adam_isas()[-1]


def test_no_extension_uses_the_torch_fallback():
    code = (
        "import torch\n"
        "from memfit.optim.fused_adam import adam_isa, available_adam_isas, fused_adam_step\n"
        "m, g = torch.ones(5), torch.ones(5, dtype=torch.bfloat16)\n"
        "flag = fused_adam_step(m, g, torch.zeros(5), torch.zeros(5), step=1, lr=0.1, beta1=0.9, beta2=0.999, eps=1e-8, weight_decay=0.0)\n"
        "print(adam_isa(), available_adam_isas(), flag, [round(x, 6) for x in m.tolist()])\n"
    )
    result = run_python(code, MEMFIT_NO_EXT="1")
    assert result.returncode == 0, result.stderr
    assert result.stdout.split()[0] == "torch"
    assert "('torch',)" in result.stdout
    assert "False [0.9, 0.9, 0.9, 0.9, 0.9]" in result.stdout


@pytest.mark.skipif(not NATIVE_ISAS, reason="the thread pool is native")
def test_concurrent_callers_and_a_forked_child_get_correct_results():
    """Two Python threads share the kernel's pool (the GIL is released), and a child made by fork
    after the pool started builds its own instead of waiting on threads it does not have."""
    import threading

    options = dict(step=2, num_threads=2, **HYPER)
    expected = make_buffers(2**18, torch.float32, torch.bfloat16, seed=9)
    fused_adam_step(*expected[:4], param_out=expected[4], **options)
    results = [make_buffers(2**18, torch.float32, torch.bfloat16, seed=9) for _ in range(4)]
    threads = [threading.Thread(target=lambda b=b: fused_adam_step(*b[:4], param_out=b[4], **options)) for b in results]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    for buffers in results:
        for actual, wanted in zip(buffers, expected):
            assert torch.equal(bits(actual), bits(wanted))

    # The child runs no torch operation: torch's own OpenMP pool is not usable after a fork.
    buffers = make_buffers(2**18, torch.float32, torch.bfloat16, seed=9)
    wanted = [bits(t).numpy() for t in expected]
    child = os.fork()
    if child == 0:  # the child must exit without returning into pytest
        fused_adam_step(*buffers[:4], param_out=buffers[4], **options)
        os._exit(0 if all(np.array_equal(bits(a).numpy(), b) for a, b in zip(buffers, wanted)) else 1)
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        finished, status = os.waitpid(child, os.WNOHANG)
        if finished:
            assert os.waitstatus_to_exitcode(status) == 0, "the child's step differs"
            return
        time.sleep(0.05)
    os.kill(child, 9)
    os.waitpid(child, 0)
    pytest.fail("the forked child hung in the kernel's thread pool")


@pytest.mark.parametrize("use_isa", available_adam_isas(), indirect=True)
def test_step_tensors_skips_every_tensor_when_any_gradient_is_not_finite(use_isa):
    rows = [make_buffers(numel, torch.bfloat16, torch.bfloat16, seed=numel) for numel in (17, 2**16 + 1, 1023, 5)]
    rows[-1][1][4] = float("inf")
    before = [[bits(t).clone() for t in row] for row in rows]
    constants = adam_constants(step=1, adamw_mode=True, bias_correction=True, grad_scale=1.0, **HYPER)
    assert step_tensors(rows, constants, "skip", num_threads=3) is True
    for row, saved in zip(rows, before):
        for tensor, expected in zip(row, saved):
            assert torch.equal(bits(tensor), expected), "no tensor is stepped when one gradient is bad"
    rows[-1][1][4] = 1.0
    assert step_tensors(rows, constants, "skip", num_threads=3) is False
    assert not torch.equal(bits(rows[0][0]), before[0][0])
