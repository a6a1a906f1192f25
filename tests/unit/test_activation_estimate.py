"""The traced activation estimate against memory measured on a real run: the example's model runs
forward and backward on the CPU (with memfit's own checkpointing where the case says so), and the
C allocator's bytes in use (glibc mallinfo2, sampled after every op) give what forward leaves for
backward and the peak. The estimate is within 15% of both, in fp32 and bf16, with and without
checkpointing."""

import ctypes
import ctypes.util
import functools
import gc
import os
import sys

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from memfit.runtime.activation_checkpointing import wrap_blocks
from memfit.runtime.activations import example_inputs, trace_factory, trace_model

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "..", "examples"))
from gpt_model import GPT, PRESETS  # noqa: E402

TOLERANCE = 0.15


class _MallInfo2(ctypes.Structure):
    _fields_ = [
        (name, ctypes.c_size_t)
        for name in ("arena", "ordblks", "smblks", "hblks", "hblkhd", "usmblks", "fsmblks", "uordblks", "fordblks")
        + ("keepcost",)
    ]


@functools.cache
def _libc():
    libc = ctypes.CDLL(ctypes.util.find_library("c"))
    if not hasattr(libc, "mallinfo2"):
        pytest.skip("needs glibc's mallinfo2 to measure the heap")
    libc.mallinfo2.restype = _MallInfo2
    return libc


def heap_bytes() -> int:
    """Bytes the C allocator has handed out and not taken back (small blocks and mmapped ones)."""
    info = _libc().mallinfo2()
    return info.uordblks + info.hblkhd


class _HeapPeak(TorchDispatchMode):
    def __init__(self):
        super().__init__()
        self.peak_bytes = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        self.peak_bytes = max(self.peak_bytes, heap_bytes())
        return out


def measure(model, inputs) -> tuple[int, int]:
    """(bytes held after forward, peak bytes) of one real forward and backward, above what was
    in use before; parameter gradients are freed as they land (memfit keeps them in buckets)."""
    for param in model.parameters():
        param.register_post_accumulate_grad_hook(lambda param: setattr(param, "grad", None))
    for _ in range(2):  # the first pass allocates the allocator's and the kernels' own state
        gc.collect()
        base = heap_bytes()
        with _HeapPeak() as peak:
            output = model(*inputs)
            held = heap_bytes() - base
            output.sum().backward()
            del output
    return held, peak.peak_bytes - base


def gpt(preset: str, dtype, blocks):
    torch.manual_seed(0)
    model = GPT(PRESETS[preset]).to(dtype)
    if blocks is not None:
        wrap_blocks(model, blocks, keep_inputs_on_host=False)
    return model


CASES = [
    ("tiny", torch.float32, None),
    pytest.param("tiny", torch.float32, "auto", marks=pytest.mark.slow),
    ("tiny", torch.bfloat16, None),
    ("tiny", torch.bfloat16, ["Block"]),
    pytest.param("small", torch.float32, None, marks=pytest.mark.slow),
    pytest.param("small", torch.float32, "auto", marks=pytest.mark.slow),
    pytest.param("small", torch.bfloat16, None, marks=pytest.mark.slow),
    pytest.param("small", torch.bfloat16, "auto", marks=pytest.mark.slow),
]


@pytest.mark.parametrize("preset,dtype,blocks", CASES)
def test_estimate_is_within_15_percent_of_a_measured_run(preset, dtype, blocks):
    micro = 4
    estimate = trace_factory(lambda: GPT(PRESETS[preset]), dtype, micro, blocks_spec=blocks)
    model = gpt(preset, dtype, blocks)
    held, peak = measure(model, (model.memfit_example_inputs(micro),))
    checkpointed = blocks is not None
    kept = estimate.checkpoint_kept_bytes if checkpointed else estimate.saved_bytes
    total = estimate.total_bytes(checkpointed)
    assert abs(kept - held) <= TOLERANCE * held, (kept, held)
    assert abs(total - peak) <= TOLERANCE * peak, (total, peak)


def test_checkpointing_keeps_the_block_inputs_and_one_block():
    config = PRESETS["tiny"]
    micro = 2
    estimate = trace_factory(lambda: GPT(config), None, micro)
    block_input_bytes = micro * config.seq_len * config.dim * 4  # fp32 hidden states
    assert estimate.num_blocks == config.n_layers and estimate.first_block == "blocks.0"
    assert estimate.block_inputs_bytes == config.n_layers * block_input_bytes
    assert estimate.total_bytes(True) < estimate.total_bytes(False) / 2
    host_split = estimate.tiers(True, cpu_checkpointing=True, device_type="cuda")
    assert host_split == {
        "device": estimate.total_bytes(True) - estimate.block_inputs_bytes,
        "host": estimate.block_inputs_bytes,
    }
    # on the CPU the device is host memory: everything is RAM
    assert estimate.tiers(True, cpu_checkpointing=True, device_type="cpu") == {
        "device": 0,
        "host": estimate.total_bytes(True),
    }


def test_a_real_model_is_traced_without_allocating_and_as_its_factory():
    model = GPT(PRESETS["tiny"])
    before = heap_bytes()
    estimate = trace_model(model, 2)
    assert heap_bytes() - before < 4 << 20  # fake tensors: the activations themselves are ~14 MiB
    assert estimate == trace_factory(lambda: GPT(PRESETS["tiny"]), None, 2)
    assert all(p.grad is None for p in model.parameters())


def test_models_without_a_hint_get_inputs_for_their_first_layer():
    linear = torch.nn.Sequential(torch.nn.Linear(16, 32), torch.nn.ReLU(), torch.nn.Linear(32, 4))
    estimate = trace_model(linear, 8)
    # ReLU saves its output (8 x 32 fp32), the second Linear its input (the same storage), the output 8 x 4
    assert estimate.saved_bytes == 8 * 32 * 4 + 8 * 4 * 4 + 8 * 16 * 4  # and the first Linear its input
    assert estimate.num_blocks == 0 and estimate.total_bytes(True) == estimate.total_bytes(False)
    embedding = torch.nn.Sequential(torch.nn.Embedding(10, 8), torch.nn.Linear(8, 8))
    with pytest.raises(ValueError, match="sequence length"):
        example_inputs(embedding, 2, None)
    assert trace_model(embedding, 2, seq_len=5).inputs.startswith("(2, 5) int64")
    with pytest.raises(ValueError, match="memfit_example_inputs"):
        trace_model(torch.nn.Sequential(torch.nn.ReLU()), 2)
