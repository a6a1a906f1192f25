"""FRUGAL blockwise: how many tensors are Adam-active at each renewal. The window walks backwards
over the group's tensors from where the last one stopped and takes the count of tensors whose
bytes are nearest to density x the group's bytes (ties: the smaller count), at least one when
density > 0 and none at density 0."""

import pytest
import torch

from memfit.optim import FRUGAL


def active_after_steps(shapes, density, steps=1, update_gap=1, dtypes=None):
    dtypes = dtypes or [torch.float32] * len(shapes)
    params = [torch.nn.Parameter(torch.randn(shape, dtype=dtype)) for shape, dtype in zip(shapes, dtypes)]
    optimizer = FRUGAL([{"params": params, "projectable": True}], lr=1e-3, density=density, update_gap=update_gap)
    windows = []
    for _ in range(steps):
        for param in params:
            param.grad = torch.ones_like(param)
        optimizer.step()
        windows.append({index for index, param in enumerate(params) if optimizer.state[param]["active"]})
    return windows, optimizer, params


@pytest.mark.parametrize(
    "density,expected",
    [(0.0, set()), (0.1, {1}), (0.25, {1}), (0.5, {1}), (0.75, {1}), (0.76, {0, 1}), (1.0, {0, 1})],
)
def test_two_equal_tensors(density, expected):
    (active,), _, _ = active_after_steps([(8, 8), (8, 8)], density)
    assert active == expected


@pytest.mark.parametrize(
    "density,count", [(0.2, 1), (0.25, 1), (0.4, 2), (0.5, 2), (0.6, 2), (0.625, 2), (0.65, 3), (0.9, 4), (1.0, 4)]
)
def test_four_equal_tensors_count_is_nearest_to_density(density, count):
    (active,), _, _ = active_after_steps([(4, 4)] * 4, density)
    assert active == set(range(4 - count, 4))  # the window starts at the last tensor


def test_unequal_sizes_take_the_count_nearest_in_bytes():
    shapes = [(16, 40), (40, 16), (24, 24), (8, 8)]  # 640, 640, 576, 64 elements; 1920 in all
    windows, optimizer, params = active_after_steps(shapes, 0.25, steps=4)
    # target 480: from the last tensor 64 or 640 -> 640 (tensors 3, 2); then from tensor 1:
    # 640 or 1280 -> 640 (tensor 1); then tensor 0 alone; then tensors 3 and 2 again.
    assert windows == [{2, 3}, {1}, {0}, {2, 3}]
    active_numel = sum(params[i].numel() for i in windows[-1])
    assert optimizer.state_bytes() == 2 * 4 * active_numel


def test_bytes_not_elements_decide():
    # window from the fp32 tensor (48 elements, 192 bytes), then the bf16 one (64 elements, 128
    # bytes): density 0.75 is 240 of 320 bytes (one tensor is nearer) but 84 of 112 elements (two)
    shapes, dtypes = [(8, 8), (8, 6)], [torch.bfloat16, torch.float32]
    (active,), _, _ = active_after_steps(shapes, 0.75, dtypes=dtypes)
    assert active == {1}


@pytest.mark.parametrize("density", [0.0, 0.05, 0.3, 0.5, 0.8, 1.0])
@pytest.mark.parametrize("seed", range(4))
def test_every_window_is_the_nearest_count(density, seed):
    generator = torch.Generator().manual_seed(seed)
    shapes = [(int(torch.randint(1, 9, (1,), generator=generator)), 4) for _ in range(7)]
    windows, _, params = active_after_steps(shapes, density, steps=8)
    sizes = [p.numel() * p.element_size() for p in params]
    total, pointer = sum(sizes), len(sizes) - 1
    for active in windows:
        order = [(pointer - offset) % len(sizes) for offset in range(len(sizes))]
        prefix = [sum(sizes[i] for i in order[:count]) for count in range(len(sizes) + 1)]
        counts = range(1, len(sizes) + 1) if density > 0 else [0]
        best = min(counts, key=lambda count: (abs(prefix[count] - density * total), count))
        assert active == set(order[:best])
        pointer = (pointer - best) % len(sizes)
    if density > 0:
        assert set().union(*windows) == set(range(len(sizes)))  # every tensor gets its turn


def test_one_tensor_and_zero_size_tensors():
    (active,), _, _ = active_after_steps([(3, 3)], 0.01)
    assert active == {0}
    (active,), _, _ = active_after_steps([(0, 4), (4, 4)], 0.5)  # 64 bytes either way: the smaller count
    assert active == {1}
    (active,), optimizer, _ = active_after_steps([(0, 4)], 1.0)
    assert active == {0} and optimizer.state_bytes() == 0
