"""The global-norm clipping of 16-bit gradients is accumulated in fp32 without holding an fp32
copy of the gradients: on a 200M-parameter model the old norm held 4 bytes per owned parameter at
the step's peak. fp32 gradients: torch's norm, bit for bit; 16-bit ones within 2e-5 of float64."""

import subprocess
import sys

import pytest
import torch

from memfit.runtime.engine import fp32_norm

RSS_GROWTH_SCRIPT = """
import torch
from memfit.runtime.engine import fp32_norm

def rss_mib():
    with open("/proc/self/status") as status:
        return int(next(l for l in status if l.startswith("VmRSS")).split()[1]) / 1024

grads = [torch.randn(2048, 2048).bfloat16() for _ in range(16)]  # 64M elements, 128 MiB
before = rss_mib()
for _ in range(3):
    norms = [fp32_norm(g) for g in grads]
    total = torch.linalg.vector_norm(torch.stack(norms))
print(rss_mib() - before)
"""


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("numel", [0, 1, 4097, (1 << 18) + 5, 3 << 20])
def test_norm_matches_float64(dtype, numel):
    grad = torch.randn(numel, generator=torch.Generator().manual_seed(numel)).to(dtype)
    got = fp32_norm(grad)
    assert got.dtype == torch.float32
    if dtype == torch.float32:  # what torch's clip_grad_norm_ computes, bit for bit
        assert torch.equal(got, torch.linalg.vector_norm(grad))
    else:
        expected = torch.linalg.vector_norm(grad.double())
        assert abs(float(got) - float(expected)) <= 2e-5 * float(expected)


def test_norms_of_16_bit_gradients_hold_no_fp32_copy():
    result = subprocess.run([sys.executable, "-c", RSS_GROWTH_SCRIPT], capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    growth_mib = float(result.stdout)
    assert growth_mib < 64, f"resident memory grew by {growth_mib:.0f} MiB computing norms of 128 MiB of bf16"
